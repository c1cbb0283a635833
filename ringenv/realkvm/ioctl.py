"""Thin, architecture-neutral wrappers around the Linux KVM ioctl interface.

Numbers and struct layouts follow the uapi header ``linux/kvm.h``; the code is our own.
Every object is a context manager and releases its file descriptors and mappings on
``close()``, also when its construction fails half-way. Failed ioctls raise ``OSError``
carrying the kernel's errno (EINVAL, E2BIG, ENXIO, ...).

Mappings are Python ``mmap`` objects. A numpy view on a mapping pins it: ``close()``
drops this module's own views first; a view a caller keeps past ``close()`` (e.g. of
``RealVcpu.ring``) keeps that one mapping alive until the view is dropped.

The KVM device is ``/dev/kvm``, or the path in the environment variable ``RINGENV_KVM_DEV``
(read only by ``kvm_device_path()``, at each ``KvmSystem()``): tests point it at a missing
path to check the "no KVM" handling. When the device cannot serve a request (missing, no
permission, API version, a capability or ring size the host lacks) a ``KvmUnavailable`` is
raised: an ``OSError`` whose ``str()`` is one line naming the cause and what to do.

A vCPU blocked in KVM_RUN can be stopped from another thread with ``RealVcpu.kick()``
(immediate_exit + a signal to the running thread; the no-op handler for ``KICK_SIGNAL`` is
installed by ``install_kick_handler()``, which must run in the main thread).
"""

from __future__ import annotations

import ctypes
import errno as _errno
import fcntl
import mmap
import os
import signal
import struct
import threading

import numpy as np

PAGE_SIZE = mmap.PAGESIZE
HUGE_PAGE_SIZE = 2 << 20  # a transparent huge page (PMD) with 4 KiB pages: x86, arm64 4K granule
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # (Python < 3.13 lacks it; Linux's value)

# --- ioctl number encoding (asm-generic/ioctl.h; x86 and arm64 use the generic one) ---
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, typ: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (typ << 8) | nr


def _IO(typ: int, nr: int) -> int:
    return _IOC(_IOC_NONE, typ, nr, 0)


def _IOR(typ: int, nr: int, size: int) -> int:
    return _IOC(_IOC_READ, typ, nr, size)


def _IOW(typ: int, nr: int, size: int) -> int:
    return _IOC(_IOC_WRITE, typ, nr, size)


def _IOWR(typ: int, nr: int, size: int) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, typ, nr, size)


# --- structs ---
class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("guest_phys_addr", ctypes.c_uint64), ("memory_size", ctypes.c_uint64),
                ("userspace_addr", ctypes.c_uint64)]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [("cap", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("args", ctypes.c_uint64 * 4), ("pad", ctypes.c_uint8 * 64)]


class kvm_dirty_log(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("padding1", ctypes.c_uint32),
                ("dirty_bitmap", ctypes.c_uint64)]


class kvm_clear_dirty_log(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("num_pages", ctypes.c_uint32),
                ("first_page", ctypes.c_uint64), ("dirty_bitmap", ctypes.c_uint64)]


KVMIO = 0xAE
KVM_API_VERSION = 12
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_GET_DIRTY_LOG = _IOW(KVMIO, 0x42, ctypes.sizeof(kvm_dirty_log))
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, ctypes.sizeof(kvm_userspace_memory_region))
KVM_RUN = _IO(KVMIO, 0x80)
KVM_ENABLE_CAP = _IOW(KVMIO, 0xA3, ctypes.sizeof(kvm_enable_cap))
KVM_CLEAR_DIRTY_LOG = _IOWR(KVMIO, 0xC0, ctypes.sizeof(kvm_clear_dirty_log))
KVM_RESET_DIRTY_RINGS = _IO(KVMIO, 0xC7)
KVM_GET_STATS_FD = _IO(KVMIO, 0xCE)

KVM_CAP_MAX_VCPUS = 66
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223
KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP = 225

KVM_MEM_LOG_DIRTY_PAGES = 1
KVM_DIRTY_LOG_PAGE_OFFSET = 64
KVM_DIRTY_GFN_F_DIRTY = 1
KVM_DIRTY_GFN_F_RESET = 2
KVM_DIRTY_RING_RSVD_ENTRIES = 64

KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_DIRTY_RING_FULL = 31

DIRTY_GFN_DTYPE = np.dtype([("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])

#: request number -> name, for error messages; architecture modules add theirs
IOCTL_NAMES = {v: k for k, v in globals().items() if k.startswith("KVM_") and isinstance(v, int)
               and (v >> 8) & 0xFF == KVMIO}


def ioctl(fd: int, request: int, arg=0) -> int:
    """fcntl.ioctl with the ioctl's name in the error message; keeps the kernel's errno."""
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        name = IOCTL_NAMES.get(request, hex(request))
        raise OSError(exc.errno, f"{name}: {os.strerror(exc.errno)}") from None


def address_of(buf) -> int:
    """Address of a writable buffer (mmap, bytearray, numpy array) without keeping it pinned."""
    obj = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(obj)
    finally:
        del obj


def errno_name(code: int) -> str:
    return _errno.errorcode.get(code, str(code))


# struct kvm_stats_header: flags, name_size, num_desc, id_offset, desc_offset, data_offset
_STATS_HEADER = struct.Struct("<6I")
# struct kvm_stats_desc without its name: flags, exponent, size (values), offset, bucket_size
_STATS_DESC = struct.Struct("<IhHII")


def read_stats(fd: int) -> dict[str, int]:
    """Binary statistics of a VM or vCPU fd (KVM_GET_STATS_FD, api.rst "KVM_GET_STATS_FD"):
    name -> value of every one-value statistic, read once (the values are live counters).

    The ioctl returns a new read-only fd: a header, one descriptor per statistic (its name
    padded to the header's name_size, the number of u64 values it has and their offset in the
    data block) and the data block. A statistic with several values (a histogram) is left out.
    x86 VM statistics include pages_4k, pages_2m and pages_1g: the leaf mappings of each size
    KVM has now in its MMU (the TDP MMU, or the shadow MMU's sptes; kvm_update_page_stats
    counts each leaf installed and zapped), and remote_tlb_flush; x86 vCPU statistics
    include pf_fixed, pf_taken, pf_emulate, exits."""
    sfd = ioctl(fd, KVM_GET_STATS_FD)
    try:
        _, name_size, num_desc, _, desc_offset, data_offset = _STATS_HEADER.unpack(
            os.pread(sfd, _STATS_HEADER.size, 0))
        size = _STATS_DESC.size + name_size
        descs = os.pread(sfd, size * num_desc, desc_offset)
        fields = [(descs[i * size + _STATS_DESC.size: (i + 1) * size].split(b"\0", 1)[0].decode(),
                   *_STATS_DESC.unpack_from(descs, i * size)[2:4]) for i in range(num_desc)]
        end = max((offset + 8 * count for _, count, offset in fields), default=0)
        data = os.pread(sfd, end, data_offset)
        return {name: struct.unpack_from("<Q", data, offset)[0]
                for name, count, offset in fields if count == 1}
    finally:
        os.close(sfd)


KVM_DEV_ENV = "RINGENV_KVM_DEV"


def kvm_device_path() -> str:
    """The KVM device node: $RINGENV_KVM_DEV if set, else /dev/kvm (the one place it is read)."""
    return os.environ.get(KVM_DEV_ENV) or "/dev/kvm"


class KvmUnavailable(OSError):
    """The host's KVM cannot do what was asked; ``str()`` is one line: the cause and the fix."""

    def __init__(self, code: int | None, message: str):
        super().__init__(message)
        self.errno = code


class SlotMemoryRefused(OSError):
    """The host refused the memory behind a memslot (mmap ENOMEM: overcommit disabled, an
    RLIMIT_AS); ``slot`` and ``nbytes`` say which and how much."""

    def __init__(self, slot: int, nbytes: int, why: str):
        super().__init__(_errno.ENOMEM, f"the {nbytes}-byte memory of memslot {slot} could not be mapped "
                                        f"({why}: the host's overcommit policy or an address-space limit)")
        self.slot, self.nbytes = slot, nbytes


class RingSizeRefused(KvmUnavailable):
    """KVM_ENABLE_CAP refused the dirty-ring size (``entries``); ``accepted`` lists the sizes
    (in entries) this host takes."""

    def __init__(self, code: int, entries: int, accepted: list[int]):
        self.entries, self.accepted = entries, accepted
        span = f"{accepted[0]}..{accepted[-1]}" if accepted else "none"
        super().__init__(code, f"a dirty ring of {entries} entries ({entries * 16} bytes) is "
                               f"refused by KVM_ENABLE_CAP on this host with {errno_name(code)}; "
                               f"accepted: powers of two {span} entries")


def _open_device(path: str) -> int:
    """os.open the KVM device, turning every failure into a one-line KvmUnavailable."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KvmUnavailable(_errno.ENOENT, (
            f"{path} does not exist: KVM is not available here (enable virtualization and load "
            f"the kvm module, or run on a KVM host; {KVM_DEV_ENV} selects another device)")) from None
    except PermissionError as exc:
        raise KvmUnavailable(exc.errno, (
            f"no permission to open {path}: add your user to its group (usually 'kvm': "
            f"sudo usermod -aG kvm $USER, then log in again) or run as root")) from None
    except OSError as exc:
        raise KvmUnavailable(exc.errno, f"cannot open {path}: {os.strerror(exc.errno)} "
                                        f"(is KVM loaded and usable on this host?)") from None


KICK_SIGNAL = signal.SIGUSR2
_kick_handler_installed = False


def _noop_handler(signum, frame) -> None:
    pass


def install_kick_handler() -> bool:
    """Install a no-op handler for KICK_SIGNAL (if the signal has none) so that a signal sent to
    a thread blocked in KVM_RUN makes it return EINTR. Only possible in the main thread;
    returns whether kicking by signal is available."""
    global _kick_handler_installed
    if not _kick_handler_installed and threading.current_thread() is threading.main_thread():
        if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
            signal.signal(KICK_SIGNAL, _noop_handler)
        _kick_handler_installed = signal.getsignal(KICK_SIGNAL) not in (
            signal.SIG_DFL, signal.SIG_IGN, None)
    return _kick_handler_installed


class VcpuKicked(TimeoutError):
    """KVM_RUN was interrupted by ``RealVcpu.kick()`` (a timeout or a shutdown)."""


def _unmap(mm: mmap.mmap) -> None:
    """Close a mapping; if a caller still holds a view, it is unmapped when that is dropped."""
    try:
        mm.close()
    except BufferError:
        pass


class _Closing:
    """Context-manager mixin: ``close()`` must be idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class KvmSystem(_Closing):
    """The /dev/kvm system fd."""

    def __init__(self, path: str | None = None):
        self.fd = -1
        self.path = path or kvm_device_path()
        self.fd = _open_device(self.path)
        try:
            try:
                version = ioctl(self.fd, KVM_GET_API_VERSION)
            except OSError as exc:
                raise KvmUnavailable(exc.errno, (
                    f"{self.path} is not a KVM device (KVM_GET_API_VERSION: "
                    f"{os.strerror(exc.errno)}): point {KVM_DEV_ENV} at /dev/kvm or unset it")) from None
            if version != KVM_API_VERSION:
                raise KvmUnavailable(_errno.EINVAL, (
                    f"{self.path} speaks KVM API version {version}, this tool needs "
                    f"{KVM_API_VERSION}: use a standard Linux KVM"))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the system fd."""
        return ioctl(self.fd, KVM_CHECK_EXTENSION, cap)

    def get_vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: bytes of the per-vCPU kvm_run mapping."""
        return ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE)

    def create_vm(self, machine_type: int = 0) -> "RealVm":
        """KVM_CREATE_VM."""
        fd = ioctl(self.fd, KVM_CREATE_VM, machine_type)
        try:
            return RealVm(self, fd)
        except BaseException:
            os.close(fd)
            raise


class RealVm(_Closing):
    """A VM fd, its memslots (anonymous mappings) and its vCPUs."""

    def __init__(self, system: KvmSystem, fd: int):
        self.system, self.fd = system, fd
        self.ring_bytes = 0
        self.vcpus: list[RealVcpu] = []
        self.memory: dict[int, mmap.mmap] = {}
        self.hva_offset: dict[int, int] = {}  # where in ``memory[slot]`` the slot starts
        self._regions: dict[int, kvm_userspace_memory_region] = {}

    def close(self) -> None:
        """Close vCPUs, then the VM fd, then unmap guest memory (the VM holds its address)."""
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for mem in self.memory.values():
            _unmap(mem)
        self.memory = {}

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd."""
        return ioctl(self.fd, KVM_CHECK_EXTENSION, cap)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> int:
        """KVM_ENABLE_CAP (VM ioctl)."""
        arg = kvm_enable_cap(cap=cap, flags=flags)
        for i, value in enumerate(args):
            arg.args[i] = value
        return ioctl(self.fd, KVM_ENABLE_CAP, arg)

    def enable_dirty_ring(self, entries: int, acq_rel: bool = True, extra_reserved: int = 0) -> int:
        """KVM_ENABLE_CAP(DIRTY_LOG_RING[_ACQ_REL], entries * 16 bytes); returns the cap used.

        Raises KvmUnavailable if the host has no dirty ring, RingSizeRefused if it refuses
        the size (EINVAL, E2BIG), listing the sizes it takes: powers of two from a page and
        from the reserved entries (64 + ``extra_reserved``, the arch's: 512 on x86 with PML)
        up to the cap's maximum. A size above that maximum (KVM_CHECK_EXTENSION) is refused
        here, before the ioctl, with E2BIG (EINVAL if it is no power of two: KVM checks that
        first): KVM reads the size as a u32, so one whose bytes do not fit 32 bits would be taken
        modulo 2^32 (2^28 + 256 entries: a 256-entry ring) instead of being refused as any other
        too-big size. An EINVAL for a size the host takes
        is about the order, not the size (the ring can be enabled once, before the first vCPU):
        that is an OSError(EINVAL) saying so."""
        cap = KVM_CAP_DIRTY_LOG_RING_ACQ_REL if acq_rel else KVM_CAP_DIRTY_LOG_RING
        max_bytes = self.check_extension(cap)
        if acq_rel and not max_bytes:
            cap = KVM_CAP_DIRTY_LOG_RING
            max_bytes = self.check_extension(cap)
        if not max_bytes:
            raise KvmUnavailable(_errno.EOPNOTSUPP, (
                f"this host's KVM lacks KVM_CAP_DIRTY_LOG_RING (KVM_CHECK_EXTENSION({cap}) == 0): "
                "use a Linux >= 5.11 KVM host with the dirty ring, or the simulator (`ringenv replay`)"))
        max_entries, accepted = max_bytes // DIRTY_GFN_DTYPE.itemsize, []
        # KVM takes a power of two of at least a page and of the reserved entries' bytes
        least = max(mmap.PAGESIZE, (KVM_DIRTY_RING_RSVD_ENTRIES + extra_reserved) * DIRTY_GFN_DTYPE.itemsize)
        size = (1 << (least - 1).bit_length()) // DIRTY_GFN_DTYPE.itemsize
        while size <= max_entries:
            accepted.append(size)
            size *= 2
        if entries * DIRTY_GFN_DTYPE.itemsize > max_bytes:  # (EINVAL's size checks come first)
            raise RingSizeRefused(_errno.E2BIG if entries & (entries - 1) == 0 else _errno.EINVAL, entries, accepted)
        try:
            self.enable_cap(cap, entries * DIRTY_GFN_DTYPE.itemsize)
        except OSError as exc:
            if exc.errno not in (_errno.EINVAL, _errno.E2BIG, _errno.ENOSPC):
                raise
            if exc.errno == _errno.EINVAL and entries in accepted:
                why = ("a vCPU exists already" if self.vcpus else "the ring is already enabled" if self.ring_bytes
                       else "the ring is already enabled or a vCPU exists")
                raise OSError(exc.errno, (
                    f"KVM_ENABLE_CAP: a dirty ring of {entries} entries is a size this host takes, but {why}: "
                    "the ring can be enabled once per VM, before its first vCPU (KVM_CREATE_VCPU)")) from None
            raise RingSizeRefused(exc.errno, entries, accepted) from None
        self.ring_bytes = entries * DIRTY_GFN_DTYPE.itemsize
        return cap

    def set_user_memory_region(self, slot: int, flags: int, guest_phys_addr: int,
                               memory_size: int, *, huge_pages: bool = False,
                               hva_skew: int = 0) -> mmap.mmap:
        """KVM_SET_USER_MEMORY_REGION for a new slot, backed by a new anonymous mapping
        (arguments in the order of the uapi struct, as ``ringenv.kvm.Vm`` takes them).

        ``huge_pages``: back the slot by transparent huge pages, as QEMU backs guest RAM. The
        mapping is made larger than the slot so that the slot's userspace address can be chosen
        congruent to ``guest_phys_addr`` modulo ``HUGE_PAGE_SIZE`` (plus ``hva_skew`` bytes, a
        multiple of the page: a skew that is not a multiple of the huge page puts every huge
        page across two guest-physical blocks), and the huge pages around the slot, its partial
        ends included, are madvise(MADV_HUGEPAGE)d and touched once from userspace, so that
        they are huge pages already when the guest first faults on them (:meth:`huge_backed`
        says whether the host managed to). KVM maps a guest-physical block by one leaf only if
        the memory behind it is a huge page, the block lies wholly in the slot, and the gfn and
        the userspace frame agree modulo the block (x86 kvm_alloc_memslot_metadata disallows
        large pages in the whole slot otherwise; arm64 fault_supports_stage2_huge_mapping).
        The slot starts ``hva_offset[slot]`` bytes into the returned mapping."""
        if hva_skew % PAGE_SIZE:
            raise ValueError(f"hva_skew must be a multiple of the page ({PAGE_SIZE} bytes)")
        span = memory_size + 3 * HUGE_PAGE_SIZE if huge_pages else memory_size
        # MAP_NORESERVE: a slot larger than the host's memory is fine while the guest touches
        # only some of it (a trace writes a few pages of a large slot)
        try:
            mem = mmap.mmap(-1, span, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
        except OSError as exc:
            if exc.errno != _errno.ENOMEM:
                raise
            raise SlotMemoryRefused(slot, span, exc.strerror) from None
        try:
            offset = 0
            if huge_pages:
                base = address_of(mem)
                first = -(-base // HUGE_PAGE_SIZE) * HUGE_PAGE_SIZE  # first huge page in the mapping
                offset = first + (guest_phys_addr + hva_skew) % HUGE_PAGE_SIZE - base
                end = -(-(base + offset + memory_size) // HUGE_PAGE_SIZE) * HUGE_PAGE_SIZE
                mem.madvise(mmap.MADV_HUGEPAGE, first - base, end - first)
                for at in range(first - base, end - base, HUGE_PAGE_SIZE):
                    mem[at] = 0  # the write fault allocates the huge page
            elif hasattr(mmap, "MADV_NOHUGEPAGE"):  # 4 KiB pages whatever the host's THP setting: with
                mem.madvise(mmap.MADV_NOHUGEPAGE)  # "always", a huge page, if one is free, would be mapped
            region = kvm_userspace_memory_region(
                slot=slot, flags=flags, guest_phys_addr=guest_phys_addr,
                memory_size=memory_size, userspace_addr=address_of(mem) + offset)
            ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, region)
        except BaseException:
            mem.close()
            raise
        self.memory[slot] = mem
        self.hva_offset[slot] = offset
        self._regions[slot] = region
        return mem

    def userspace_addr(self, slot: int) -> int:
        """The slot's userspace address (kvm_userspace_memory_region.userspace_addr)."""
        return self._regions[slot].userspace_addr

    def huge_backed(self, slot: int) -> int:
        """Bytes of the slot's memory that the host backs by huge pages now (AnonHugePages of
        /proc/self/smaps over the huge pages the slot touches, whole)."""
        region = self._regions[slot]
        lo = region.userspace_addr // HUGE_PAGE_SIZE * HUGE_PAGE_SIZE
        hi = -(-(region.userspace_addr + region.memory_size) // HUGE_PAGE_SIZE) * HUGE_PAGE_SIZE
        return anon_huge_bytes(lo, hi)

    def stats(self) -> dict[str, int]:
        """The VM's binary statistics (:func:`read_stats`): on x86 pages_4k, pages_2m and
        pages_1g (the leaf mappings of each size in the VM's MMU now), remote_tlb_flush,
        mmu_shadow_zapped..."""
        return read_stats(self.fd)

    def set_memory_flags(self, slot: int, flags: int) -> None:
        """KVM_SET_USER_MEMORY_REGION on an existing slot, changing only its flags
        (e.g. turning KVM_MEM_LOG_DIRTY_PAGES on write-protects the whole slot)."""
        region = kvm_userspace_memory_region.from_buffer_copy(self._regions[slot])
        region.flags = flags
        ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, region)
        self._regions[slot] = region

    def create_vcpu(self, vcpu_id: int) -> "RealVcpu":
        """KVM_CREATE_VCPU, then map kvm_run and (if enabled) the dirty ring."""
        run_size = self.system.get_vcpu_mmap_size()
        fd = ioctl(self.fd, KVM_CREATE_VCPU, vcpu_id)
        vcpu = RealVcpu.__new__(RealVcpu)
        try:
            vcpu.__init__(fd, vcpu_id, run_size, self.ring_bytes)  # owns fd once it holds it
            self.vcpus.append(vcpu)
        except BaseException:  # also an interrupt between the ioctl and the append
            if getattr(vcpu, "fd", None) is None:  # the vCPU never took the fd: it is ours to close
                os.close(fd)
            else:  # the vCPU's (closed already if its __init__ failed: close() is idempotent)
                vcpu.close()
            raise
        return vcpu

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: returns the number of entries reset (all rings)."""
        return ioctl(self.fd, KVM_RESET_DIRTY_RINGS)

    def get_dirty_log(self, slot: int) -> np.ndarray:
        """KVM_GET_DIRTY_LOG: the slot's bitmap as uint64 words (bit i = page i). For a slot
        this VM never created the ioctl is made with no bitmap, for the kernel's errno: ENOENT
        (no such memslot), EINVAL (an id past the user slots), ENXIO (a ring without a bitmap)."""
        if slot not in self._regions:
            ioctl(self.fd, KVM_GET_DIRTY_LOG, kvm_dirty_log(slot=slot, dirty_bitmap=0))
            raise OSError(_errno.EFAULT, f"KVM_GET_DIRTY_LOG: memslot {slot} was not created by this RealVm")
        pages = self._regions[slot].memory_size // PAGE_SIZE
        words = np.zeros((pages + 63) // 64, dtype=np.uint64)
        ioctl(self.fd, KVM_GET_DIRTY_LOG, kvm_dirty_log(slot=slot,
                                                        dirty_bitmap=words.ctypes.data))
        return words

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int,
                        bitmap: np.ndarray) -> None:
        """KVM_CLEAR_DIRTY_LOG (needs MANUAL_DIRTY_LOG_PROTECT2): re-protect the set bits.
        ``bitmap`` must hold ``num_pages`` bits (the kernel reads that many from it): a
        shorter one is a ValueError, not a read past the buffer."""
        words = np.ascontiguousarray(bitmap, dtype=np.uint64)
        if num_pages > 0 and words.size * 64 < num_pages:
            raise ValueError(f"bitmap: {words.size} uint64 words hold {words.size * 64} bits, fewer than "
                             f"num_pages {num_pages}; accepted: at least {(num_pages + 63) // 64} words")
        ioctl(self.fd, KVM_CLEAR_DIRTY_LOG, kvm_clear_dirty_log(
            slot=slot, num_pages=num_pages, first_page=first_page,
            dirty_bitmap=words.ctypes.data))


def dirty_pages(words: np.ndarray) -> np.ndarray:
    """Page indices set in a dirty bitmap of uint64 words."""
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")
    return np.flatnonzero(bits)


def anon_huge_bytes(start: int, end: int) -> int:
    """Bytes of anonymous memory in [start, end) of this process backed by transparent huge
    pages: the AnonHugePages of the /proc/self/smaps mappings in that range (smaps counts per
    mapping: one that reaches past the range counts at most its overlap with it)."""
    total, lo, hi = 0, 0, 0
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                a, b = (int(x, 16) for x in head.split("-"))
                lo, hi = max(a, start), min(b, end)
            elif head == "AnonHugePages:" and lo < hi:
                total += min(int(line.split()[1]) * 1024, hi - lo)
    return total


class RealVcpu(_Closing):
    """A vCPU fd with its kvm_run mapping and, if the VM has one, its dirty ring."""

    def __init__(self, fd: int, vcpu_id: int, run_size: int, ring_bytes: int = 0):
        self.fd, self.id = fd, vcpu_id
        self.kicked = False
        self._thread: int | None = None  # ident of the thread inside KVM_RUN
        self._run_mm = self._ring_mm = None
        self.ring: np.ndarray | None = None
        self._words: tuple[memoryview, ...] = ()
        self.fetch = 0  # userspace's free-running harvest index
        try:
            self._run_mm = mmap.mmap(fd, run_size, flags=mmap.MAP_SHARED)
            if ring_bytes:
                self._ring_mm = mmap.mmap(fd, ring_bytes, flags=mmap.MAP_SHARED,
                                          offset=KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE)
                self.ring = np.frombuffer(self._ring_mm, dtype=DIRTY_GFN_DTYPE)
                view = memoryview(self._ring_mm)
                self._words = (view.cast("I"), view.cast("Q"))  # u32 flags/slot, u64 offset
                view.release()
        except BaseException:
            self.close()
            raise

    def mmap_ring(self, prot: int = mmap.PROT_READ | mmap.PROT_WRITE, flags: int = mmap.MAP_SHARED,
                  length: int = PAGE_SIZE) -> mmap.mmap:
        """A new mapping of the vCPU fd at KVM_DIRTY_LOG_PAGE_OFFSET (the caller closes it);
        the kernel refuses MAP_PRIVATE with EINVAL and PROT_EXEC with EPERM (errno_table)."""
        return mmap.mmap(self.fd, length, flags=flags, prot=prot, offset=KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE)

    def close(self) -> None:
        """Idempotent; also on a vCPU whose ``__init__`` stopped part way (attributes not set)."""
        if getattr(self, "_thread", None) is not None:  # another thread is in KVM_RUN: stop it first
            self.kick()
        for view in getattr(self, "_words", ()):
            view.release()
        self.ring, self._words = None, ()
        for mm in (getattr(self, "_ring_mm", None), getattr(self, "_run_mm", None)):
            if mm is not None:
                _unmap(mm)
        self._ring_mm = self._run_mm = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def run(self) -> int:
        """KVM_RUN (retried on EINTR); returns kvm_run.exit_reason. Raises VcpuKicked once
        ``kick()`` was called (also before this call)."""
        self._thread = threading.get_ident()
        try:
            while True:
                if self.kicked:
                    raise VcpuKicked(f"vCPU {self.id}: stopped (kicked out of KVM_RUN)")
                try:
                    ioctl(self.fd, KVM_RUN)
                    return self.exit_reason
                except InterruptedError:
                    continue
        finally:
            self._thread = None

    def kick(self) -> None:
        """Make KVM_RUN return (now, or at its next call) and ``run()`` raise VcpuKicked:
        sets kvm_run.immediate_exit and signals the thread inside KVM_RUN, if any."""
        self.kicked = True
        if self._run_mm is not None and not self._run_mm.closed:
            self._run_mm[1] = 1  # kvm_run.immediate_exit
        tid = self._thread
        if tid is not None and tid != threading.get_ident() and _kick_handler_installed:
            try:
                signal.pthread_kill(tid, KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    # kvm_run fields, read from the shared page without pinning it.
    @property
    def exit_reason(self) -> int:
        return struct.unpack_from("<I", self._run_mm, 8)[0]

    def mmio(self) -> tuple[int, bytes, bool]:
        """kvm_run.mmio: (phys_addr, data[:len], is_write)."""
        addr, data, length, is_write = struct.unpack_from("<Q8sIB", self._run_mm, 32)
        return addr, data[:length], bool(is_write)

    def exit_detail(self) -> str:
        """A readable description of the last exit, for error messages."""
        reason = self.exit_reason
        if reason == KVM_EXIT_MMIO:
            addr, data, is_write = self.mmio()
            return f"MMIO {'write' if is_write else 'read'} at {addr:#x} data {data.hex()}"
        words = struct.unpack_from("<4Q", self._run_mm, 32)
        return f"exit_reason {reason} detail {[hex(w) for w in words]}"

    def stats(self) -> dict[str, int]:
        """The vCPU's binary statistics (:func:`read_stats`), e.g. x86 pf_fixed (page faults
        KVM fixed in place: a write-protect fault is one), pf_taken, pf_emulate."""
        return read_stats(self.fd)

    def harvest(self) -> list[tuple[int, int]]:
        """Collect this ring's entries as QEMU's kvm_dirty_ring_reap_one does.

        While the entry at ``fetch`` has flags == DIRTY: record (slot, offset), set RESET,
        advance ``fetch``. The caller then issues KVM_RESET_DIRTY_RINGS on the VM.
        (Plain memoryviews of the ring: faster per entry than numpy scalars.) A vCPU without a
        ring (its VM never enabled one) is a ValueError saying so.
        """
        if not self._words:
            raise ValueError(f"vCPU {self.id}: no dirty ring to harvest (the VM enabled none before creating its "
                             "vCPUs, or the vCPU is closed)")
        u32, u64 = self._words
        mask = len(u64) // 2 - 1
        out = []
        while u32[4 * (self.fetch & mask)] == KVM_DIRTY_GFN_F_DIRTY:
            i = self.fetch & mask
            out.append((u32[4 * i + 1], u64[2 * i + 1]))
            u32[4 * i] = KVM_DIRTY_GFN_F_DIRTY | KVM_DIRTY_GFN_F_RESET
            self.fetch += 1
        return out
