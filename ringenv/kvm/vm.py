"""The simulated KVM: a VM and its vCPUs, with methods shaped and named after the ioctls.

Userspace (ringenv.vmm, ringenv.replay) drives it as QEMU drives KVM:

    vm = Vm("arm64-4k")
    vm.enable_cap(KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 4096 * 16)   # ring size in bytes
    vm.enable_cap(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
    vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 16 << 30)
    vcpus = [vm.create_vcpu(i) for i in range(8)]
    vm.attach_guest(workload)
    for v in vcpus: v.run()                       # enter the guest (or an immediate exit)
    exits = vm.run_until(t)                       # simulated time passes; vCPUs fault, push, exit
    ...  harvest rings through vcpu.ring_gfns, then vm.reset_dirty_rings()

``Vcpu.run`` is KVM_RUN split in two: it enters the guest (or returns the exit KVM_RUN would
return at once), and ``Vm.run_until`` lets simulated time pass until some vCPU leaves the
guest. Errors are :class:`~ringenv.kvm.uapi.KvmError` carrying the errno KVM returns.
Kernel work done by an ioctl costs simulated time: ``Vm.last_ioctl_ns``.
"""

from __future__ import annotations

import errno
import mmap
import weakref
from dataclasses import dataclass

import numpy as np

from ..arrays import RECYCLER, shift_checked, unique
from ..config import HostProfile, load_host_profile
from ..guest.base import EXIT_NONE, NO_WRITE, GuestProgram, WriteBatch
from .fault import (CUT_DONE, CUT_FAULT, CUT_FULL, CUT_MMIO, CUT_NONE, CUT_PML_FULL, CUT_SYNC, CUT_TICK, FAULT_NS,
                    FAULTS, NOLOG, PML_FLUSHES, PREFETCH, PUSHES, READLOG, READONLY, SPLIT_EMPTY, SPLIT_FULL, SPLITS,
                    UNTRACKED, apply_batch, apply_window)
from .memory import EMPTY, SPLIT_HUGE, TABLED, UNMAPPED, WP_CLEAN, Memslot, protect_masked
from .pml import flush_all, flush_one, log_all
from .ring import DirtyRing, reset_rings, ring_room
from .uapi import (
    KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE,
    KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES,
    KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_CAP_MAX_VCPU_ID,
    KVM_CAP_MAX_VCPUS,
    KVM_CAP_MULTI_ADDRESS_SPACE,
    KVM_CAP_NR_MEMSLOTS,
    KVM_CAP_READONLY_MEM,
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_DIRTY_RING_MAX_ENTRIES,
    KVM_EXIT_DIRTY_RING_FULL,
    KVM_EXIT_INTR,
    KVM_EXIT_MMIO,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KvmError,
    UnbackedMapping,
    einval,
)

# KVM_MEM_SLOTS_NUM (SHRT_MAX) - KVM_INTERNAL_MEM_SLOTS (x86: 3, arm64: none)
KVM_USER_MEM_SLOTS = {"arm64": 32767, "x86": 32764}
# vCPU ids: KVM_MAX_VCPU_IDS (x86: KVM_MAX_VCPUS x KVM_VCPU_ID_RATIO 4; arm64: KVM_MAX_VCPUS, and
# kvm_arch_vcpu_precreate refuses ids >= kvm->max_vcpus); vCPUs per VM: kvm->max_vcpus (x86:
# KVM_MAX_VCPUS, 1024; arm64: the vGIC's limit, 512 with GICv3). Measured on the x86 host: 4096, 1024.
KVM_MAX_VCPU_IDS = {"arm64": 512, "x86": 4096}
KVM_MAX_VCPUS = {"arm64": 512, "x86": 1024}
U64_MAX = (1 << 64) - 1  # guest_phys_addr + memory_size is a u64 sum in the kernel
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1  # pages in one memslot at most


@dataclass(frozen=True)
class Exit:
    """A vCPU left the guest: KVM_RUN returned with ``reason`` (a KVM_EXIT_* value).

    ``kind`` says why in this simulator's terms: "full" (KVM_EXIT_DIRTY_RING_FULL), "sync" (the
    guest's MMIO sync write), "mmio" (KVM_EXIT_MMIO for a write to a KVM_MEM_READONLY memslot
    or an access to a gfn no memslot maps: the access completes as MMIO, memory is unchanged,
    nothing is logged), "done" (its program ended), "kick" (userspace forced it out)."""

    vcpu: int
    reason: int
    time_ns: int
    kind: str


@dataclass
class VmStats:
    """Kernel-side event counters of a VM (vCPU-side ones live on each :class:`Vcpu`)."""

    resets: int = 0  # KVM_RESET_DIRTY_RINGS calls
    entries_reset: int = 0
    reprotect_calls: int = 0  # kvm_arch_mmu_enable_log_dirty_pt_masked calls (ring resets, GET/CLEAR_DIRTY_LOG)
    pages_reprotected: int = 0  # stage-2 entries write-protected: a page, or a block leaf once per call
    tlb_flushes: int = 0  # VM-wide flushes (reset, dirty-log)
    splits: int = 0  # blocks split into pages
    get_dirty_log_calls: int = 0
    clear_dirty_log_calls: int = 0
    backup_bitmap_pages: int = 0  # writes with no running vCPU logged in the slot bitmap
    dropped_no_vcpu: int = 0  # writes with no running vCPU and nowhere to log them
    kernel_ns: int = 0  # simulated time spent in VM ioctls


#: VcpuStats fields kept in the VM's counter array, by column (the write path's apply_batch
#: updates them)
VCPU_COUNTERS = {"faults": FAULTS, "pushes": PUSHES, "splits": SPLITS, "fault_ns": FAULT_NS,
                 "pml_flushes": PML_FLUSHES}


def _counter(col: int, doc: str) -> property:
    def get(self) -> int:
        return int(self._row[col])

    def set_(self, value: int) -> None:
        self._row[col] = value

    return property(get, set_, doc=doc)


class VcpuStats:
    """Event counters of one vCPU. The ones the guest's writes move (faults, pushes, splits,
    fault_ns, pml_flushes) live in a row of the VM's per-vCPU counter array, which the write
    path updates for all vCPUs at once."""

    __slots__ = ("_row", "full_exits", "exits", "exit_ns", "extra")

    def __init__(self):
        self._row = np.zeros(len(VCPU_COUNTERS), dtype=np.int64)
        self.full_exits = 0
        self.exits = 0  # every return to userspace
        self.exit_ns = 0  # guest time lost to exits (kernel part of the round trip)
        self.extra: dict = {}

    faults = _counter(FAULTS, "stage-2 faults, KVM's pf_fixed: writes to protected pages (each logs the page if its "
                              "slot has dirty tracking; PML logs on x86-pml) and accesses to pages not mapped yet")
    pushes = _counter(PUSHES, "entries pushed to the vCPU's ring")
    splits = _counter(SPLITS, "blocks this vCPU's faults split into pages")
    fault_ns = _counter(FAULT_NS, "guest time lost in the kernel (faults, splits, PML flushes)")
    pml_flushes = _counter(PML_FLUSHES, "x86 PML: buffer flushes into the ring (full buffer, exits, ticks)")

    def __repr__(self) -> str:
        fields = {**{k: getattr(self, k) for k in VCPU_COUNTERS},
                  **{k: getattr(self, k) for k in self.__slots__[1:]}}
        return "VcpuStats(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"


_NO_ORDER = np.zeros(0, dtype=np.int64)  # apply_window: the batch is in order as given


class Vcpu:
    """A vCPU (the object behind a vCPU fd)."""

    def __init__(self, vm: Vm, vcpu_id: int, index: int):
        self.vm = vm
        self.id = vcpu_id
        self.index = index
        p = vm.profile
        self.ring: DirtyRing | None = DirtyRing(vm.ring_entries, p.reserved_entries) if vm.ring_entries else None
        self.request_soft_full = False  # KVM_REQ_DIRTY_RING_SOFT_FULL
        self.pending_store = NO_WRITE  # gfn of a faulted store that has not retired
        self.pending_code = EXIT_NONE  # and what the guest does right after it retires
        self.pending_read = False  # (the faulting access was a read)
        self.finished = False
        self.stats = VcpuStats()

    @property
    def pml(self) -> np.ndarray | None:
        """x86 PML: the buffer of logged gfns (a row of the VM's buffers; None without PML)."""
        return self.vm._pml[self.index] if self.vm.profile.pml else None

    @property
    def pml_count(self) -> int:
        """x86 PML: gfns logged in the buffer and not yet flushed into the ring."""
        return int(self.vm._pml_n[self.index])

    @pml_count.setter
    def pml_count(self, value: int) -> None:
        self.vm._pml_n[self.index] = value

    @property
    def in_guest(self) -> bool:
        """In the guest (KVM_RUN entered it and it has not exited since)."""
        return bool(self.vm._running[self.index])

    @in_guest.setter
    def in_guest(self, value: bool) -> None:
        self.vm._running[self.index] = value

    @property
    def ring_gfns(self) -> np.ndarray:
        """The ring as userspace maps it (mmap of the vCPU fd at KVM_DIRTY_LOG_PAGE_OFFSET,
        shared, read-write: :meth:`mmap_ring`): a structured array of ``struct kvm_dirty_gfn``
        shared with the kernel."""
        return self.mmap_ring()

    def mmap_ring(self, prot: int = mmap.PROT_READ | mmap.PROT_WRITE,
                  flags: int = mmap.MAP_SHARED) -> np.ndarray | UnbackedMapping:
        """mmap of the vCPU fd at KVM_DIRTY_LOG_PAGE_OFFSET. PROT_EXEC: EPERM, from the VFS
        before KVM sees the call (a vCPU fd is an anon inode, whose file system is noexec);
        MAP_PRIVATE: EINVAL (kvm_vcpu_mmap wants the ring shared); both as measured on the real
        host (tests/realkvm). Returns the ring's entries. Without a ring no page is the ring's,
        so kvm_vcpu_mmap maps it (shared or private) and the first access is SIGBUS
        (kvm_vcpu_fault): the mapping returned then raises :class:`SigBus` when touched. Without
        PROT_WRITE the entries come read-only: a store to them raises ValueError, where the process
        would take a SIGSEGV (userspace must write RESET into the flags: map it read-write)."""
        if prot & mmap.PROT_EXEC:
            raise KvmError(errno.EPERM, "mmap of a vCPU fd with PROT_EXEC (an anon inode: noexec)")
        if self.ring is None:
            return UnbackedMapping("KVM_DIRTY_LOG_PAGE_OFFSET of a vCPU without a dirty ring")
        if not flags & mmap.MAP_SHARED:
            raise KvmError(errno.EINVAL, "mmap of the dirty ring: it must be MAP_SHARED")
        if prot & mmap.PROT_WRITE:
            return self.ring.gfns
        view = self.ring.gfns.view()
        view.flags.writeable = False
        return view

    def run(self) -> Exit | None:
        """KVM_RUN: check requests, then enter the guest.

        Returns the exit at once if KVM_RUN would return without entering (SOFT_FULL pending and
        the ring still soft-full: KVM_EXIT_DIRTY_RING_FULL again; or the program is over).
        Otherwise the vCPU is in the guest from ``vm.now`` and None is returned; its next exit
        comes from :meth:`Vm.run_until`. A store that faulted and filled the ring re-executes
        first thing (if no memslot maps it any more, because userspace deleted or moved its slot
        meanwhile, it exits as MMIO at once: :meth:`Vm._apply`). A ring-full exit the vCPU took
        at a kernel IPI and that nothing returned yet (:meth:`Vm._kick`) is returned first."""
        vm = self.vm
        kicked = vm._kicked.pop(self.index, None)
        if kicked is not None:  # the KVM_RUN under way returns its exit at an IPI first (Vm._kick)
            return kicked
        if self.in_guest:  # KVM serialises KVM_RUN on vcpu->mutex: a second caller would wait
            raise RuntimeError(f"KVM_RUN on vCPU {self.index}, which is in KVM_RUN: KVM would block the call on "
                               "vcpu->mutex until the first returns; the simulator is single-threaded: run the "
                               "VM (Vm.run_until) to that exit first")
        if self.finished:
            return vm._exit(self, KVM_EXIT_MMIO, "done", count=False)
        if self.request_soft_full and self.ring is not None:
            if self.ring.soft_full():  # kvm_dirty_ring_check_request: re-arm and exit
                self.stats.full_exits += 1
                return vm._exit(self, KVM_EXIT_DIRTY_RING_FULL, "full")
            self.request_soft_full = False
        self.in_guest = True
        if vm.guest is not None:
            vm.guest.resumed(self.index, vm.now)
        if self.pending_store != NO_WRITE or self.pending_code != EXIT_NONE:
            gfn, code, read = self.pending_store, self.pending_code, self.pending_read
            self.pending_store, self.pending_code, self.pending_read = NO_WRITE, EXIT_NONE, False
            exits = vm._apply(np.array([vm.now], dtype=np.int64), np.array([self.index], dtype=np.int32),
                              np.array([gfn], dtype=np.int64), np.array([code], dtype=np.int8),
                              notify=False, reads=np.array([read], dtype=np.int8))[1]
            return exits[0] if exits else None
        return None

    def kick(self) -> Exit | None:
        """Force the vCPU out of the guest (QEMU's SIG_IPI: KVM_RUN returns with KVM_EXIT_INTR).
        A ring-full exit the vCPU took at a kernel IPI and not returned yet (:meth:`Vm._kick`) is
        what its KVM_RUN returns instead."""
        kicked = self.vm._kicked.pop(self.index, None)
        if kicked is not None:
            return kicked
        if not self.in_guest:
            return None
        return self.vm._exit(self, KVM_EXIT_INTR, "kick")


class _Closed:
    """What a Vm or Vcpu becomes when its fd is closed: every use fails with EBADF."""

    def __getattr__(self, name):
        raise KvmError(errno.EBADF, f"{name}: the fd is closed")


class Vm:
    """A VM (the object behind a VM fd) on a simulated host."""

    def __init__(self, profile: str | HostProfile | None = None, *, seed: int = 0, page_versions: bool = True):
        """``page_versions`` False: the VM keeps no page versions, for a run that never compares
        page contents (a dirty-rate sample): ``version`` is then scratch that the write path
        may bump but that holds no meaning (it is not cleared when the VM is built)."""
        self.profile = load_host_profile(profile)
        p = self.profile
        self.seed = seed
        self.page_versions = page_versions
        self.page_size = p.page_size
        self.block_pages = p.block_sizes[0] // p.page_size if p.block_sizes else 1
        self.block_shift = self.block_pages.bit_length() - 1  # block sizes are powers of two
        self.now = 0
        self.ring_entries = 0
        # where the compiled kernels find each vCPU's ring, its counters and soft limit (create_vcpu)
        self._ring_addr = np.zeros((0, 2), dtype=np.int64)
        self._ring_ctr = np.zeros((0, 4), dtype=np.int64)
        self._soft_limit = np.zeros(0, dtype=np.int64)
        self._running = np.zeros(0, dtype=bool)  # per vCPU: in the guest (Vcpu.in_guest)
        self._vstat = np.zeros((0, len(VCPU_COUNTERS)), dtype=np.int64)  # per vCPU: VcpuStats counters
        self._kernel_ns = None  # its FAULT_NS column, read-only (vcpu_kernel_ns)
        self._no_pml = np.zeros(0, dtype=np.int64)  # per vCPU: PML buffer fill (always 0 without PML)
        self._pml = np.zeros((0, p.pml_buffer_entries if p.pml else 0), dtype=np.int64)  # PML buffers (kvm/pml.py)
        self._pml_n = np.zeros(0, dtype=np.int64)  # and how many gfns each holds
        self._kicked: dict[int, Exit] = {}  # vCPU index -> its ring-full exit at an IPI, not yet returned (_kick)
        self._soft_full = np.zeros(0, dtype=bool)
        self._write_costs = (0, 0, 0)  # ns per fault, per split, per fault in an untracked slot (create_vcpu)
        self._empty_pending = False  # blocks a workload window's split left EMPTY (_write_out_empty)
        self._tlbi_ns = p.tlbi_broadcast_ns(0)  # one VM-wide TLB invalidation (create_vcpu updates it)
        # PML: the kernel-handled VM exits that flush the buffers, at multiples of this (0: none);
        # the next one's time, and the walk's flush count, cut time and window end (fault.walk_writes)
        self._tick_ns = max(1, round(p.kernel_exit_interval_us * 1000)) if p.pml and p.kernel_exit_interval_us else 0
        self._tick_state = np.array([self._tick_ns, 0, 0, 0], dtype=np.int64)
        self.with_bitmap = False
        self.manual_protect = 0
        self.eager_split_chunk = 0
        self.vcpus: list[Vcpu] = []
        self.slots: list[Memslot] = []
        self.guest: GuestProgram | None = None
        self.stats = VmStats()
        self.last_ioctl_ns = 0
        self.state = np.zeros(0, dtype=np.uint8)
        self.version = np.zeros(0, dtype=np.uint32)
        self._scratch_bufs = (np.empty(1024, dtype=np.int32), np.empty(1024, dtype=np.int64),
                              np.empty(1024, dtype=np.int32), np.empty(1024, dtype=np.int64))  # _batch_buffers
        self._zeros = {np.int8: np.zeros(0, dtype=np.int8), np.int64: np.zeros(0, dtype=np.int64)}  # _zeros_of
        self._layout()

    # ------------------------------------------------------------------ capabilities
    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd: the dirty-ring caps, and the VM's limits (memslot
        ids, vCPU ids and count, address spaces: the profile's; 0 with one, as the kernel
        reports it); 0 for a cap the simulator does not know."""
        p = self.profile
        max_bytes = KVM_DIRTY_RING_MAX_ENTRIES * 16
        if cap == KVM_CAP_DIRTY_LOG_RING:
            return 0 if p.acq_rel_only else max_bytes
        if cap == KVM_CAP_DIRTY_LOG_RING_ACQ_REL:
            return max_bytes
        if cap == KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP:
            return int(p.with_bitmap_supported)
        if cap == KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
            return KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET
        if p.arch == "arm64" and cap == KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE:
            return self.eager_split_chunk
        if p.arch == "arm64" and cap == KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES:
            return p.page_size | sum(p.block_sizes)
        if cap == KVM_CAP_NR_MEMSLOTS:
            return KVM_USER_MEM_SLOTS[p.arch]
        if cap == KVM_CAP_READONLY_MEM:
            return 1
        if cap == KVM_CAP_MAX_VCPUS:
            return KVM_MAX_VCPUS[p.arch]
        if cap == KVM_CAP_MAX_VCPU_ID:  # arm64 answers kvm->max_vcpus for both
            return KVM_MAX_VCPU_IDS[p.arch]
        if cap == KVM_CAP_MULTI_ADDRESS_SPACE:  # the case exists only where there are several
            return p.address_spaces if p.address_spaces > 1 else 0
        return 0

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM fd (``args`` is ``struct kvm_enable_cap.args``)."""
        self._write_out_empty()
        p = self.profile
        arg0 = int(args[0]) if args else 0
        if cap in (KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL):
            if not self.check_extension(cap):
                raise einval(f"capability {cap} is not offered on {p.arch} (use KVM_CAP_DIRTY_LOG_RING_ACQ_REL)")
            size = arg0 & 0xFFFFFFFF  # args[0] is read as a u32
            try:
                self._enable_dirty_log_ring(size)
            except KvmError as e:
                if size != arg0:  # (the message names the value given, not only what KVM read)
                    raise KvmError(e.errno, f"args[0] {arg0} is read as a u32 (struct kvm_enable_cap's size): "
                                            f"{e.rule}") from None
                raise
        elif cap == KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP:
            if not p.with_bitmap_supported:
                raise einval("KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP is not supported on this host")
            if not self.ring_entries:
                raise einval("WITH_BITMAP needs the dirty ring enabled first")
            if flags:
                raise einval("WITH_BITMAP takes no flags")
            if self.slots:
                raise einval("WITH_BITMAP must be enabled before any memslot exists")
            self.with_bitmap = True
        elif cap == KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
            allowed = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE  # INITIALLY_SET only together with it
            if arg0 & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
                allowed |= KVM_DIRTY_LOG_INITIALLY_SET
            if flags or arg0 & ~allowed:
                raise einval(f"MANUAL_DIRTY_LOG_PROTECT2: args[0] {arg0:#x} must be a subset of {allowed:#x} "
                             "(INITIALLY_SET needs MANUAL_PROTECT_ENABLE), flags 0")
            self.manual_protect = arg0
        elif cap == KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE and p.arch == "arm64":
            if flags:
                raise einval("EAGER_SPLIT_CHUNK_SIZE takes no flags")
            if self.slots:
                raise einval("EAGER_SPLIT_CHUNK_SIZE must be set before any memslot exists")
            if arg0 and arg0 not in p.eager_split_chunk_sizes:
                raise einval(f"EAGER_SPLIT_CHUNK_SIZE {arg0}: accepted 0 or {p.eager_split_chunk_sizes}")
            self.eager_split_chunk = arg0
        else:
            raise einval(f"KVM_ENABLE_CAP: capability {cap} cannot be enabled on this VM")

    def _enable_dirty_log_ring(self, size: int) -> None:
        """kvm_vm_ioctl_enable_dirty_log_ring (reference s2), rules in the kernel's order."""
        p = self.profile
        if size == 0 or size & (size - 1):
            raise einval(f"dirty ring size {size} bytes is not a power of two; accepted: powers of two from "
                         f"{p.min_ring_entries * 16} to {KVM_DIRTY_RING_MAX_ENTRIES * 16} bytes")
        if size < p.reserved_entries * 16 or size < p.page_size:
            raise einval(
                f"dirty ring size {size} bytes is below max(reserved {p.reserved_entries} x 16, "
                f"PAGE_SIZE {p.page_size}) = {max(p.reserved_entries * 16, p.page_size)}"
            )
        if size > KVM_DIRTY_RING_MAX_ENTRIES * 16:
            raise KvmError(errno.E2BIG, f"dirty ring size {size} bytes is above {KVM_DIRTY_RING_MAX_ENTRIES} x 16")
        if self.ring_entries:
            raise einval("the dirty ring is already enabled (it can be set once)")
        if self.vcpus:
            raise einval("the dirty ring must be enabled before any vCPU is created")
        self.ring_entries = size // 16

    # ------------------------------------------------------------------ memslots
    def set_user_memory_region(self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, *,
                               as_id: int = 0, block_fraction: float = 0.0, mapped_fraction: float = 1.0,
                               populated: bool = False) -> None:
        """KVM_SET_USER_MEMORY_REGION (``slot`` is the slot id, ``as_id`` its address space).

        ``block_fraction`` and ``mapped_fraction`` are not part of the ioctl: the share of the
        userspace memory behind the slot that is backed by huge pages (THP), i.e. mapped by stage-2
        blocks (of the slot's whole guest-physical blocks: its partial end blocks are pages,
        :meth:`Memslot.place`), and the share the guest has already touched (mapped at stage 2;
        the rest faults on first access, as in a fresh VM, a guest-physical block at a time).
        The untouched rest is fresh memory (the host's zero page behind it: a read fault maps it
        read-only, logging nothing) unless ``populated``: userspace wrote it all (QEMU's
        -mem-prealloc, a loaded image), so a read fault maps a writable page, which x86 logs in
        a dirty-tracked slot (make_spte) and arm64 in a ring-only one (reference s11).
        Of an existing slot (the same memory: its size and KVM_MEM_READONLY cannot change),
        changing only ``flags`` turns dirty logging on or off, a new ``guest_phys_addr`` moves it
        (KVM_MR_MOVE, :meth:`_move_memslot`); size 0 deletes a slot (EINVAL if there is none).

        Errors, in the kernel's order: EINVAL (flags; as_id >= the profile's address spaces or
        slot id >= KVM_USER_MEM_SLOTS; guest_phys_addr or memory_size outside the __u64 the
        ioctl's struct holds (negative, or >= 2^64: the Python call takes ints); guest_phys_addr
        or memory_size not page-aligned; guest_phys_addr + memory_size wraps 2^64; more than
        KVM_MEM_MAX_NR_PAGES (2^31 - 1) pages; deleting a slot that does not exist; resizing
        a slot or changing its KVM_MEM_READONLY), EEXIST (a new or moved slot overlaps another of
        its address space), then for a new or moved slot that does not fit in the profile's
        ``phys_addr_bits``: EINVAL on x86 (its last gfn above kvm_mmu_max_gfn), EFAULT on arm64
        (its end above the VM's IPA size).
        """
        self._write_out_empty()
        p = self.profile
        if flags & ~(KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY):
            raise einval(f"memslot flags {flags:#x}: accepted KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY")
        self._check_slot_id(slot, as_id, "KVM_SET_USER_MEMORY_REGION")
        for name, value in (("guest_phys_addr", guest_phys_addr), ("memory_size", memory_size)):
            if not 0 <= value <= U64_MAX:
                raise einval(f"{name} {value}: a __u64 field, accepted 0..2^64-1")
        if guest_phys_addr % p.page_size or memory_size % p.page_size or memory_size < 0:
            raise einval(f"guest_phys_addr and memory_size must be multiples of PAGE_SIZE {p.page_size}")
        if memory_size and guest_phys_addr + memory_size > U64_MAX:
            raise einval(f"guest_phys_addr {guest_phys_addr:#x} + memory_size {memory_size:#x} wraps 2^64")
        if memory_size // p.page_size > KVM_MEM_MAX_NR_PAGES:
            raise einval(f"memory_size {memory_size:#x}: more than KVM_MEM_MAX_NR_PAGES ({KVM_MEM_MAX_NR_PAGES}) pages")
        for name, f in (("block_fraction", block_fraction), ("mapped_fraction", mapped_fraction)):
            if not 0.0 <= f <= 1.0:
                raise ValueError(f"{name} {f}: accepted 0.0..1.0")
        if self._change_memslot(slot, as_id, flags, guest_phys_addr, memory_size, block_fraction, mapped_fraction,
                                populated):
            self._kick()  # x86 kvm_arch_memslots_updated: every vCPU kicked once the new memslots are in

    def _change_memslot(self, slot, as_id, flags, guest_phys_addr, memory_size, block_fraction,
                        mapped_fraction, populated=False) -> bool:
        """:meth:`set_user_memory_region` once the arguments are checked: create, delete, move
        or change the flags of the slot. Returns False if there was nothing to change."""
        p = self.profile
        old = self._slot(slot, as_id)
        base, npages = guest_phys_addr // p.page_size, memory_size // p.page_size
        if npages == 0:
            if old is None:
                raise einval(f"deleting memslot {slot}: it does not exist")
            ns = self._zap(old)
            self.slots.remove(old)
            self._layout()
            self.last_ioctl_ns = ns
            return True
        if old is None:
            self._check_overlap(slot, as_id, base, npages)
            self._check_gpa_range(base, npages)
            ms = Memslot(slot, as_id, base, npages, flags, self.block_pages, block_fraction, self.seed, mapped_fraction,
                         populated)
            ms.before_read = weakref.WeakMethod(self._write_out_empty)
            self.slots.append(ms)
            self._layout()
            # KVM_MR_CREATE: nothing is mapped in a new slot; memory the simulator lets start
            # mapped (mapped_fraction: touched before logging) gets the commit of logging turned
            # on over it
            fresh = bool((ms.state & UNMAPPED).all())
            self.last_ioctl_ns = self._logging_changed(ms, unmapped=fresh) if flags & KVM_MEM_LOG_DIRTY_PAGES else 0
            return True
        if npages != old.npages:
            raise einval("a memslot cannot be resized (delete it and create it again)")
        if (flags ^ old.flags) & KVM_MEM_READONLY:
            raise einval("KVM_MEM_READONLY cannot be changed on an existing memslot")
        if base != old.base_gfn:
            self._move_memslot(old, base, flags)
        elif flags != old.flags:  # KVM_MR_FLAGS_ONLY: LOG_DIRTY_PAGES changed
            old.flags = flags
            self.last_ioctl_ns = self._logging_changed(old)
        else:  # nothing to change: the kernel returns before touching the memslots
            self.last_ioctl_ns = 0
            return False
        return True

    def _check_slot_id(self, slot: int, as_id: int, ioctl: str) -> None:
        """as_id >= the profile's address spaces (kvm_arch_nr_memslot_as_ids) or slot id >=
        KVM_USER_MEM_SLOTS: EINVAL."""
        arch, nas = self.profile.arch, self.profile.address_spaces
        if not 0 <= as_id < nas:
            raise einval(f"{ioctl}: address space {as_id}: host {self.profile.name} has {nas}")
        if not 0 <= slot < KVM_USER_MEM_SLOTS[arch]:
            raise einval(f"{ioctl}: slot id {slot}: accepted 0..{KVM_USER_MEM_SLOTS[arch] - 1}")

    def _check_gpa_range(self, base: int, npages: int) -> None:
        """kvm_arch_prepare_memory_region for a new or moved slot: it must end within the
        profile's ``phys_addr_bits``. x86: last gfn > kvm_mmu_max_gfn -> EINVAL; arm64: end
        beyond the VM's IPA size -> EFAULT."""
        p = self.profile
        limit = p.gpa_pages
        if base + npages > limit:
            err = errno.EFAULT if p.arch == "arm64" else errno.EINVAL
            raise KvmError(err, f"memslot gfns {base:#x}..{base + npages - 1:#x} beyond the "
                                f"{p.phys_addr_bits}-bit guest-physical range of host {p.name}")

    def _check_overlap(self, slot: int, as_id: int, base: int, npages: int) -> None:
        """kvm_check_memslot_overlap: another slot of the address space in the range: EEXIST."""
        for s in self.slots:
            if s.as_id == as_id and s.id != slot and base < s.base_gfn + s.npages and s.base_gfn < base + npages:
                raise KvmError(errno.EEXIST, f"memslot {slot} overlaps memslot {s.id}")

    def _move_memslot(self, s: Memslot, base: int, flags: int) -> None:
        """KVM_MR_MOVE: the same memory (its page versions) at guest frame ``base``, with
        ``flags`` (LOG_DIRTY_PAGES may change). kvm_invalidate_memslot unmaps the old range at
        stage 2 (kvm_arch_flush_shadow_memslot: every page faults again, a block where a huge
        page is behind it unless logging forces pages, and only if the slot moved by whole
        blocks: else its memory no longer lines up with guest-physical blocks,
        :meth:`Memslot.place`); kvm_prepare_memory_region keeps the
        dirty bitmap if logging stays on (or allocates one, or frees it, as logging is turned on or
        off); kvm_arch_commit_memory_region then finds nothing mapped in the new range: x86
        kvm_mmu_slot_apply_flags returns for a move (change != KVM_MR_FLAGS_ONLY) before any
        walk, with logging on or off; arm64 with logging (and not INITIALLY_SET) runs
        kvm_mmu_wp_memory_region and kvm_mmu_split_memory_region over that empty range: one TLB
        flush (kvm_flush_remote_tlbs_memslot), nothing protected or split. The zap of the old
        range is charged as a delete's (:meth:`_zap`). Ring entries name the slot by id, so a later
        reset of an entry pushed before the move re-protects that offset of the moved slot."""
        self._check_overlap(s.id, s.as_id, base, s.npages)
        self._check_gpa_range(base, s.npages)
        zap = self._zap(s)
        s.place(base)
        self._layout()
        s.unmap_all()  # (zapped above) the huge pages that line up with its new blocks, if any
        s.flags = flags
        self.last_ioctl_ns = zap + self._logging_changed(s, unmapped=True)

    def _zap(self, s: Memslot) -> int:
        """kvm_arch_flush_shadow_memslot for a deleted or moved slot. arm64 unmaps the slot's
        stage-2 range (kvm_stage2_unmap_range); x86, with KVM_X86_QUIRK_SLOT_ZAP_ALL (on by
        default), zaps every mapping of the VM (kvm_mmu_zap_all_fast): every slot's pages fault
        again, and in a logging slot the new writable mapping logs its page once more. The walk
        is priced per page zapped as the write-protect walk when logging is turned on, plus one
        VM-wide TLB flush. Returns the kernel time, counted in the VM's."""
        zapped = self.slots if self.profile.arch == "x86" else [s]
        for t in zapped:
            t.unmap_all()
            if t is not s and t.logging:  # its next write faults and logs, as a clean page's
                t.state |= WP_CLEAN
        ns = int(self.profile.costs.protect_page_ns * sum(t.npages for t in zapped)) + self._flush_tlbs()
        self.stats.kernel_ns += ns
        return ns

    def leaf_mappings(self) -> tuple[int, int]:
        """Stage-2 leaves of the whole VM now: (pages mapped by a page, blocks mapped by a
        block), summed over its memslots (:meth:`Memslot.leaf_mappings`); on x86 the VM
        statistics pages_4k and pages_2m (KVM_GET_STATS_FD on the VM fd)."""
        counts = [s.leaf_mappings() for s in self.slots]  # (each writes out the empty tables first)
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def _slot(self, slot: int, as_id: int = 0) -> Memslot | None:
        for s in self.slots:
            if s.id == slot and s.as_id == as_id:
                return s
        return None

    def memslot(self, slot: int, as_id: int = 0) -> Memslot | None:
        """The memslot ``slot`` of address space ``as_id`` (None if there is none), its
        stage-2 state written out (:meth:`_write_out_empty`)."""
        self._write_out_empty()
        return self._slot(slot, as_id)

    def slot_versions(self, slot: int, as_id: int = 0) -> np.ndarray:
        """The page versions of memslot ``slot`` (its contents, as the simulator models them),
        without the stage-2 state (nothing written out): what sending pages reads."""
        s = self._slot(slot, as_id)
        if s is None:
            raise einval(f"memslot {slot} of address space {as_id} does not exist")
        return s.version

    def _write_out_empty(self) -> None:
        """Write out the tables the workload's splits left EMPTY (fault.walk_writes with
        ``defer_empty``: a split that maps only the faulting page marks the block instead of
        its 511 other pages, which would cost a cache miss per line of the block's state, on a
        run's first pass over a large memory mostly for nothing): each page of such a block not
        TABLED becomes UNMAPPED, as the split would have left it, and the block a plain table.
        Done before anything but the write walk and the reset's re-protect (which take EMPTY
        blocks as they are) reads the stage-2 state."""
        if not self._empty_pending:
            return
        self._empty_pending = False
        blocks = np.flatnonzero(self.block_map == EMPTY)
        if len(blocks):
            view = self.state.reshape(-1, self.block_pages)
            st = view[blocks]
            view[blocks] = np.where(st & TABLED, st & ~TABLED, st | UNMAPPED)
            self.block_map[blocks] = 0

    def _layout(self) -> None:
        """Lay the slots out in one global page index and rebuild lookup tables. Each slot's
        pages sit where its guest frames fall in their stage-2 blocks (a slot's page at gfn g
        is at ``start + g - base_gfn`` with ``start`` congruent to ``base_gfn`` modulo a
        block), so that a global block is a guest-physical one; the pages of a slot's partial
        end blocks that are not the slot's are padding no slot owns (their block is pages)."""
        bp = self.block_pages
        self.slots.sort(key=lambda s: (s.as_id, s.base_gfn))
        starts, pos = [], 0
        for s in self.slots:
            starts.append(pos + s.lead)
            pos += -(-(s.lead + s.npages) // bp) * bp
        state = RECYCLER.zeros(pos, np.uint8)
        version = (RECYCLER.zeros if self.page_versions else RECYCLER.empty)(pos, np.uint32)
        block_map = RECYCLER.zeros(pos // bp, np.uint8)
        for s, st in zip(self.slots, starts):
            fresh = s.state is None
            b0 = (st + s.head) // bp  # its first whole block
            if not fresh:  # a slot laid out before: carry its pages over
                state[st: st + s.npages] = s.state
                version[st: st + s.npages] = s.version
                if len(s.blocks) == s.nblocks:  # (else a move changed its blocks: _move_memslot lays them anew)
                    block_map[b0: b0 + s.nblocks] = s.blocks
            s.state = state[st: st + s.npages]
            s.version = version[st: st + s.npages]
            s.blocks = block_map[b0: b0 + s.nblocks]
            s.start = st
            if fresh:
                s.initialize()
        self.state, self.version, self.block_map = state, version, block_map
        as0 = [s for s in self.slots if s.as_id == 0]
        self._base = np.array([s.base_gfn for s in as0], dtype=np.int64)
        self._end = np.array([s.base_gfn + s.npages for s in as0], dtype=np.int64)
        self._start = np.array([s.start for s in as0], dtype=np.int64)
        self._gpi_end = self._start + np.array([s.npages for s in as0], dtype=np.int64)  # (global page index)
        # with one RAM slot, a gfn g is in it when lo <= g < hi, at global page index g + delta
        self._one_slot = None if len(as0) != 1 else (as0[0].base_gfn, as0[0].base_gfn + as0[0].npages,
                                                     as0[0].start - as0[0].base_gfn)
        self._as0 = as0
        self._by_kvm_slot = {s.kvm_slot: s for s in self.slots}
        self._kslot = np.array([s.kvm_slot for s in as0], dtype=np.uint32)
        self._refresh_slot_modes()

    def _logs(self, s: Memslot) -> bool:
        """memslot_is_logging as the fault path sees it: never for a read-only slot; on arm64 a
        ring-only slot without a bitmap is not logging (reference s11); on x86 the flag is
        enough."""
        return (s.logging and not s.flags & KVM_MEM_READONLY
                and (s.dirty_bitmap is not None or self.profile.ring_only_slot_logs))

    def _mode(self, s: Memslot) -> int:
        """The slot's mode bits for the fault path (fault.walk_writes): NOLOG (dirty-tracked but
        not logging: arm64 ring without a bitmap), UNTRACKED (no LOG_DIRTY_PAGES: faults log
        nothing), READONLY (writes exit as MMIO), READLOG (x86, dirty-tracked: a read fault
        whose host page is writable maps it writable and logs it, make_spte; arm64 maps a read
        fault read-only while logging), PREFETCH (the x86 shadow MMU in a slot without dirty
        tracking: a fault maps the other pages of its aligned group of 8 whose host pages exist,
        direct_pte_prefetch / FNAME(pte_prefetch); measured, docs/reference/real-kvm-host.md)."""
        if s.flags & KVM_MEM_READONLY:
            return READONLY | (0 if s.logging else UNTRACKED)
        p = self.profile
        return ((NOLOG if s.logging and not self._logs(s) else 0) | (0 if s.logging else UNTRACKED)
                | (READLOG if p.arch == "x86" and self._logs(s) else 0)
                | (PREFETCH if p.arch == "x86" and not p.tdp_mmu and not s.logging else 0))

    def _refresh_slot_modes(self) -> None:
        p = self.profile
        blockgran, pushall, split = [], [], []
        for s in self._as0:
            logs = self._logs(s)
            blockgran.append(s.logging and (not logs or not p.split_blocks))
            pushall.append(logs and not p.split_blocks)
            split.append((SPLIT_EMPTY if self._split_leaves_empty else SPLIT_FULL) if logs and p.split_blocks else 0)
        self._blockgran = np.array(blockgran, dtype=bool)
        self._pushall = np.array(pushall, dtype=bool)
        self._any_pushall = bool(self._pushall.any())
        self._split = np.array(split, dtype=np.uint8)
        self._slot_mode = np.array([self._mode(s) for s in self._as0], dtype=np.uint8)
        # every slot (all address spaces), for the re-protect kernel
        self._tab_kslot = np.array([s.kvm_slot for s in self.slots], dtype=np.uint32)
        self._tab_start = np.array([s.start for s in self.slots], dtype=np.int64)
        self._tab_npages = np.array([s.npages for s in self.slots], dtype=np.int64)
        self._tab_blockgran = np.array([s.logging and (not self._logs(s) or not p.split_blocks)
                                        for s in self.slots], dtype=bool)
        self._tab_mode = np.array([self._mode(s) & ~READLOG for s in self.slots],  # (non-zero: not logging)
                                  dtype=np.uint8)

    def _logging_changed(self, s: Memslot, unmapped: bool = False) -> int:
        """A slot's KVM_MEM_LOG_DIRTY_PAGES was set or cleared (created, flags changed or moved;
        ``unmapped``: a KVM_MR_MOVE, whose old stage 2 was unmapped before, or a KVM_MR_CREATE
        of memory nothing has touched: nothing of the slot is mapped): kvm_prepare_memory_region's
        dirty bitmap (allocated, or freed when logging goes off), then
        kvm_arch_commit_memory_region. Returns the kernel time."""
        if s.logging:
            if s.dirty_bitmap is None and (not self.ring_entries or self.with_bitmap):  # else kept
                s.alloc_bitmap(initially_set=bool(self.manual_protect & KVM_DIRTY_LOG_INITIALLY_SET))
            self._refresh_slot_modes()
            ns = self._commit_log_dirty_pages(s, unmapped)
        else:
            s.dirty_bitmap = None
            self._refresh_slot_modes()
            ns = self._commit_logging_off(s, unmapped)
        self.stats.kernel_ns += ns
        return ns

    def _commit_log_dirty_pages(self, s: Memslot, unmapped: bool = False) -> int:
        """kvm_arch_commit_memory_region with LOG_DIRTY_PAGES set, whatever the VM logs into
        (bitmap or ring) and whether the slot is logging (a ring-only arm64 slot, a read-only
        slot, which x86 skips): with INITIALLY_SET nothing is protected or split; else the slot
        is write-protected (kvm_mmu_wp_memory_region, one TLB flush) and, with an eager split
        chunk, its block mappings are split (kvm_mmu_split_memory_region; in a slot that is not
        logging the next fault maps the huge page as a block again). Either way a page not
        mapped yet gets WP: the fault that maps it writable logs it. On x86 the eager split is
        kvm_mmu_slot_try_split_huge_pages (module parameter eager_page_split, TDP MMU only),
        done in kvm_mmu_slot_apply_flags before write-protecting: its kernel time is the
        ioctl's, and it needs no TLB flush of its own. A table of pages over a huge page left
        by logging turned off earlier is a plain table again once the slot logs (the faults
        map pages). A move or a creation with nothing mapped (``unmapped``) costs no per-page
        walk: x86 kvm_mmu_slot_apply_flags does nothing but for KVM_MR_FLAGS_ONLY; arm64 flushes
        the TLBs once (kvm_mmu_wp_memory_region) and has nothing to split. Returns the kernel
        time."""
        p, c = self.profile, self.profile.costs
        if self._logs(s):
            s.blocks[s.blocks == SPLIT_HUGE] = 0
        if self.manual_protect & KVM_DIRTY_LOG_INITIALLY_SET:
            s.state[(s.state & UNMAPPED) != 0] |= WP_CLEAN
            return 0
        if p.arch == "x86" and s.flags & KVM_MEM_READONLY:  # kvm_mmu_slot_apply_flags: nothing to protect
            return 0
        s.state |= WP_CLEAN  # kvm_mmu_wp_memory_region
        if unmapped:  # every page is unmapped: WP only makes its fault log it
            return 0 if p.arch == "x86" else self._flush_tlbs()
        ns = int(c.protect_page_ns * s.npages) + self._flush_tlbs()
        if self._splits_eagerly and p.split_blocks:
            # arm64 kvm_mmu_split_memory_region, x86 kvm_mmu_slot_try_split_huge_pages
            n = s.split_all_blocks(keep_huge=not self._logs(s))
            self.stats.splits += n
            ns += n * c.split_ns
        return ns

    def _commit_logging_off(self, s: Memslot, unmapped: bool = False) -> int:
        """kvm_arch_commit_memory_region with LOG_DIRTY_PAGES cleared. The pages do not become
        writable at once: one still write-protected takes a write fault (a protection fault:
        wp_fault_ns, PML or not), which makes it writable and logs nothing (the slot is
        UNTRACKED now).
        arm64: stage 2 is left as it is; a huge page split into pages while logging is mapped as
        a block again by its next permission fault (:meth:`Memslot.mark_collapsible`).
        x86 (kvm_mmu_slot_apply_flags; nothing for a read-only slot): with PML the 4K mappings
        were never write-protected, only huge ones; kvm_mmu_recover_huge_pages then maps split
        huge pages as huge again in place with the TDP MMU, or zaps their 4K mappings with the
        shadow MMU (the next fault maps the huge page), a walk of the slot and one TLB flush;
        for a move (``unmapped``) kvm_mmu_slot_apply_flags returns before any of it (the old
        mappings are gone). Returns the kernel time."""
        p = self.profile
        if p.arch == "arm64":
            s.mark_collapsible()
            return 0
        if s.flags & KVM_MEM_READONLY or unmapped:
            return 0
        if p.pml:
            s.clear_small_page_protection()
        n = s.recover_huge_pages() if p.tdp_mmu else s.zap_collapsible()
        ns = int(p.costs.protect_page_ns * s.npages)
        if n:
            ns += self._flush_tlbs()
        return ns

    @property
    def _split_leaves_empty(self) -> bool:
        """A write fault that splits a huge mapping while logging maps only the faulting page,
        the block's other pages not mapped until each faults: arm64 (user_mem_abort forces a
        page under logging; kvm_pgtable_stage2_map of that page meets the block, and
        stage2_map_walk_leaf replaces it with a new, empty table: "accesses beyond 'end' that
        fall within the new table will be mapped lazily"), and the x86 shadow MMU (no TDP MMU:
        link_shadow_page -> drop_large_spte; measured on this project's kvm_pvm host: a write
        to one page of each 2 MiB block leaves pages_4k one higher per block, pages_2m one
        lower). The x86 TDP MMU splits the huge spte into a full table of 4 KiB children
        (tdp_mmu_split_huge_page), write-protected as the huge one was; so does an eager split
        on either (:meth:`Memslot.split_all_blocks`)."""
        return self.profile.arch == "arm64" or not self.profile.tdp_mmu

    @property
    def _splits_eagerly(self) -> bool:
        """Enabling logging splits huge mappings in the ioctl: arm64 with an eager split chunk
        (KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE), x86 with eager_page_split and the TDP MMU."""
        return bool(self.eager_split_chunk) if self.profile.arch == "arm64" else self.profile.x86_eager_split

    def __reduce_ex__(self, protocol):
        """A VM is a kernel object (its compiled paths hold the addresses of its rings): it can
        be neither copied nor pickled, as a VM fd cannot be cloned into a second VM."""
        raise TypeError("a Vm cannot be copied or pickled: create a new one (it stands for a kernel VM)")

    def close(self) -> None:
        """Close the VM fd and its vCPU fds: KVM frees the VM (memslots, stage 2, rings) now.
        Any later use of the VM or its vCPUs raises EBADF. The arrays go at once, without
        waiting for the cyclic garbage collector (vCPUs and the VM refer to each other)."""
        for v in self.vcpus:
            v.__dict__.clear()
            v.__class__ = _Closed
        self.__dict__.clear()
        self.__class__ = _Closed

    # ------------------------------------------------------------------ vCPUs
    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """KVM_CREATE_VCPU. With the ring enabled the vCPU gets its ring now.

        Errors in the kernel's order: id >= KVM_MAX_VCPU_IDS (x86 4096, arm64 512) EINVAL;
        already KVM_MAX_VCPUS vCPUs (x86 1024, arm64 512) EINVAL; an id in use EEXIST."""
        p = self.profile
        if not 0 <= vcpu_id < KVM_MAX_VCPU_IDS[p.arch]:
            raise einval(f"vCPU id {vcpu_id}: accepted 0..{KVM_MAX_VCPU_IDS[p.arch] - 1}")
        if len(self.vcpus) >= KVM_MAX_VCPUS[p.arch]:
            raise einval(f"the VM has {len(self.vcpus)} vCPUs, the most {p.arch} allows")
        if any(v.id == vcpu_id for v in self.vcpus):
            raise KvmError(errno.EEXIST, f"vCPU {vcpu_id} already exists")
        self._running = np.append(self._running, False)
        self._no_pml = np.zeros(len(self._running), dtype=np.int64)
        self._no_retries = np.zeros(len(self._running), dtype=bool)
        self._soft_full = np.zeros(len(self._running), dtype=bool)  # apply_batch's output
        if len(self._pml) <= len(self.vcpus):  # room for this vCPU's buffer (grown geometrically)
            self._pml = np.concatenate([self._pml, np.zeros((len(self._pml) + 4, self._pml.shape[1]), dtype=np.int64)])
        self._pml_n = np.append(self._pml_n, 0)
        v = Vcpu(self, vcpu_id, len(self.vcpus))
        self.vcpus.append(v)
        self._vstat = np.array([u.stats._row for u in self.vcpus], dtype=np.int64)
        for u, row in zip(self.vcpus, self._vstat):
            u.stats._row = row
        # what a fault costs the guest: a write-protect fault; with PML the logging (its
        # flushes into the ring are charged there), or into the dirty bitmap a flush per 512
        # pages, amortized (rounded to whole ns); a split: break-before-make and a broadcast TLB
        # invalidation (the ring is enabled, if at all, before the first vCPU: KVM refuses it afterwards); a
        # fault in a slot without dirty tracking (logging turned off) is a real protection or
        # translation fault, PML or not (kvm_tdp_page_fault, user_mem_abort)
        c, pml = p.costs, p.pml_buffer_entries if p.pml else 0
        self._tlbi_ns = p.tlbi_broadcast_ns(len(self.vcpus))
        self._write_costs = (c.wp_fault_ns if not pml else c.dirty_write_ns if self.ring_entries
                             else round(c.dirty_write_ns + c.pml_flush_entry_ns + c.pml_full_exit_ns / pml),
                             c.split_ns + self._tlbi_ns, c.wp_fault_ns)
        if v.ring is not None:
            self._ring_addr = np.array([(u.ring.gfns.ctypes.data, u.ring.size) for u in self.vcpus], dtype=np.int64)
            self._ring_ctr = np.zeros((len(self.vcpus), 4), dtype=np.int64)
            for u, row in zip(self.vcpus, self._ring_ctr):
                u.ring.attach_counters(row)
            self._soft_limit = np.array([u.ring.soft_limit for u in self.vcpus], dtype=np.int64)
        return v

    # ------------------------------------------------------------------ ring reset
    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: for every vCPU ring reset the entries userspace marked RESET
        from reset_index on (also past dirty_index, as the kernel does: :func:`ring.reset_rings`),
        coalescing the re-protect work (kvm_reset_dirty_gfn -> kvm_arch_mmu_enable_log_dirty_pt_masked;
        with INITIALLY_SET and eager splitting it also splits the spans' blocks:
        :attr:`_split_span`; with INITIALLY_SET on x86 it also write-protects the huge mappings
        at each call's ends: :attr:`_huge_ends`); one VM-wide TLB flush if anything was reset.
        Returns the number of entries reset."""
        if not self.ring_entries:
            raise einval("KVM_RESET_DIRTY_RINGS: the VM has no dirty ring")
        c = self.profile.costs
        total, calls, pages, splits = reset_rings(
            self._ring_addr, self._ring_ctr, self._tab_kslot, self._tab_start, self._tab_npages, self._tab_blockgran,
            self._tab_mode, self.state, self.block_map, self.block_shift, self.profile.reprotect_span, self._split_span,
            self._huge_ends)
        ns = c.reset_call_ns + total * c.reset_entry_ns + calls * c.reprotect_call_ns + int(pages * c.reprotect_page_ns)
        if total:
            ns += self._flush_tlbs()
        if splits:
            ns += self._count_splits(splits)
        st = self.stats
        st.resets += 1
        st.entries_reset += total
        st.reprotect_calls += calls
        st.pages_reprotected += pages
        st.kernel_ns += ns
        self.last_ioctl_ns = ns
        return total

    def _flush_tlbs(self) -> int:
        """kvm_flush_remote_tlbs: one VM-wide TLB flush (counted; returns its time). On x86 it is
        a request to every vCPU (KVM_REQ_TLB_FLUSH) with an IPI to those in the guest
        (:meth:`_kick`); arm64 broadcasts TLBI instructions and takes no vCPU out."""
        self.stats.tlb_flushes += 1
        self._kick()
        return self._tlbi_ns

    def _kick(self) -> None:
        """x86 PML: an IPI to every vCPU in the guest (kvm_make_all_cpus_request for a TLB flush or
        the zap of a memslot delete or move; kvm_vcpu_kick of every vCPU once new memslots are
        in place, kvm_arch_memslots_updated). Each takes a VM exit the kernel handles, which
        flushes its PML buffer into its ring (vmx_handle_exit -> vmx_flush_pml_buffer: the gfns
        looked up in the memslots as they are at the IPI; its time charged per entry), and
        re-enters, unless the flush left its ring soft-full: then it exits with
        KVM_EXIT_DIRTY_RING_FULL at once (the request, checked before re-entry), at ``now``.
        That exit is returned by the next :meth:`run_until` before anything runs, or by
        :meth:`Vcpu.kick` or :meth:`Vcpu.run` if they come first (KVM_RUN returns it). A vCPU
        out of the guest gets no IPI (its buffer was flushed at its exit)."""
        if not (self.profile.pml and self.ring_entries and self._pml_n.any()):
            return
        for e in self._flush_running():
            self._kicked[e.vcpu] = e

    @property
    def _split_span(self) -> bool:
        """kvm_arch_mmu_enable_log_dirty_pt_masked splits the span's huge pages too, with
        kvm_dirty_log_manual_protect_and_init_set and eager splitting (arm64: an eager split
        chunk, kvm_mmu_split_huge_pages; x86: eager_page_split with the TDP MMU,
        kvm_mmu_try_split_huge_pages, before write-protecting)."""
        return bool(self._splits_eagerly and self.manual_protect & KVM_DIRTY_LOG_INITIALLY_SET
                    and self.profile.split_blocks)

    @property
    def _huge_ends(self) -> bool:
        """x86 kvm_arch_mmu_enable_log_dirty_pt_masked with kvm_dirty_log_manual_protect_and_init_set
        also write-protects the huge mapping (PG_LEVEL_2M and up) of the first and of the last
        gfn of the mask (kvm_mmu_slot_gfn_write_protect), after the eager split where there is
        one (:func:`memory.protect_masked`). arm64 protects the block leaf in any case."""
        return bool(self.profile.arch == "x86" and self.manual_protect & KVM_DIRTY_LOG_INITIALLY_SET)

    def _count_splits(self, n: int) -> int:
        """Blocks split by a re-protect call: counted, and their kernel time returned."""
        self.stats.splits += n
        return n * self.profile.costs.split_ns

    def _zeros_of(self, dtype, n: int) -> np.ndarray:
        """n zeros of ``dtype`` (np.int8: "no exit", "not a read"; np.int64: "slot 0"), for
        read-only use, without allocating each batch."""
        z = self._zeros[dtype]
        if len(z) < n:
            z = self._zeros[dtype] = np.zeros(max(n, 2 * len(z), 1024), dtype=dtype)
        return z[:n]

    def _batch_buffers(self, maxpush: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """apply_batch's reusable output buffers: push_v, push_g of at least ``maxpush`` items,
        split_v, split_b of at least ``n`` (fresh large arrays would cost page faults on every
        call); a buffer too small is replaced by one of twice its size or more."""
        push_v, push_g, split_v, split_b = bufs = self._scratch_bufs
        if len(push_v) < maxpush or len(split_v) < n:
            if len(push_v) < maxpush:
                k = max(maxpush, 2 * len(push_v))
                push_v, push_g = np.empty(k, dtype=np.int32), np.empty(k, dtype=np.int64)
            if len(split_v) < n:
                k = max(n, 2 * len(split_v))
                split_v, split_b = np.empty(k, dtype=np.int32), np.empty(k, dtype=np.int64)
            bufs = self._scratch_bufs = (push_v, push_g, split_v, split_b)
        return bufs

    def _reprotect(self, kslots: np.ndarray, offsets: np.ndarray, masks: np.ndarray) -> tuple[int, int]:
        """Apply re-protect calls (slot, offset, mask) with :func:`memory.protect_masked`:
        arm64 write-protects the whole span of each mask (and the block leaf a page of it is
        mapped by), and with INITIALLY_SET and eager splitting splits the span's blocks; x86
        with INITIALLY_SET also write-protects the huge mappings at the mask's ends;
        calls naming a missing slot or running past its end are skipped, as the kernel does.
        Returns (pages write-protected, the kernel time of the blocks split)."""
        if len(masks) == 0:
            return 0, 0
        pages, splits, calls = protect_masked(
            np.ascontiguousarray(kslots, dtype=np.uint32), np.ascontiguousarray(offsets, dtype=np.int64),
            np.ascontiguousarray(masks, dtype=np.uint64), self._tab_kslot, self._tab_start, self._tab_npages,
            self._tab_blockgran, self._tab_mode, self.state, self.block_map, self.block_shift,
            self.profile.reprotect_span, self._split_span, self._huge_ends)
        self.stats.reprotect_calls += int(calls)
        self.stats.pages_reprotected += int(pages)
        return int(pages), self._count_splits(splits) if splits else 0

    # ------------------------------------------------------------------ dirty bitmap
    def get_dirty_log(self, slot: int, as_id: int = 0) -> np.ndarray:
        """KVM_GET_DIRTY_LOG: the slot's dirty bitmap (u64 words, little-endian bit order).
        Without manual protect the bitmap is also cleared and the dirty pages re-protected.
        With the ring it needs WITH_BITMAP (the backup bitmap), else ENXIO; then a slot id >=
        KVM_USER_MEM_SLOTS or an address space >= the profile's ``address_spaces`` is EINVAL,
        a slot that does not exist or is not logging ENOENT."""
        self._write_out_empty()
        if self.ring_entries and not self.with_bitmap:
            raise KvmError(errno.ENXIO, "KVM_GET_DIRTY_LOG: the VM uses the dirty ring without a bitmap")
        self._check_slot_id(slot, as_id, "KVM_GET_DIRTY_LOG")
        s = self._slot(slot, as_id)
        if s is None or s.dirty_bitmap is None:
            raise KvmError(errno.ENOENT, f"KVM_GET_DIRTY_LOG: memslot {slot} does not exist or is not logging")
        c = self.profile.costs
        bm = s.dirty_bitmap.copy()
        ns = int(c.get_dirty_log_page_ns * s.npages)
        if not self.manual_protect & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
            s.dirty_bitmap[:] = 0
            words = np.flatnonzero(bm)
            if len(words):
                n, split_ns = self._reprotect(np.full(len(words), s.kvm_slot, np.uint32), words.astype(np.int64) * 64,
                                              bm[words])
                ns += int(n * c.get_dirty_log_dirty_ns) + self._flush_tlbs() + split_ns
        self.stats.get_dirty_log_calls += 1
        self.stats.kernel_ns += ns
        self.last_ioctl_ns = ns
        return bm

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: np.ndarray, as_id: int = 0) -> None:
        """KVM_CLEAR_DIRTY_LOG (manual protect): clear the given bits and re-protect those pages,
        on 64-page aligned ranges. ``first_page`` and ``num_pages`` are read as the struct's
        __u64 and __u32 (a negative value is a huge one). Errors in the kernel's order: ENXIO
        (ring without a bitmap), EINVAL (slot id >= KVM_USER_MEM_SLOTS or address space >= the
        profile's ``address_spaces``, first_page not 64-aligned), ENOENT (no such logging slot),
        EINVAL (the range), EFAULT (the bitmap holds fewer than the range's words: copy_from_user
        cannot read them)."""
        self._write_out_empty()
        if self.ring_entries and not self.with_bitmap:
            raise KvmError(errno.ENXIO, "KVM_CLEAR_DIRTY_LOG: the VM uses the dirty ring without a bitmap")
        self._check_slot_id(slot, as_id, "KVM_CLEAR_DIRTY_LOG")
        first_page, num_pages = int(first_page) & (1 << 64) - 1, int(num_pages) & (1 << 32) - 1
        if first_page & 63:
            raise einval(f"KVM_CLEAR_DIRTY_LOG: first_page {first_page} is not a multiple of 64")
        s = self._slot(slot, as_id)
        if s is None or s.dirty_bitmap is None:
            raise KvmError(errno.ENOENT, f"KVM_CLEAR_DIRTY_LOG: memslot {slot} does not exist or is not logging")
        if (first_page > s.npages or num_pages > s.npages - first_page
                or (num_pages < s.npages - first_page and num_pages & 63)):
            raise einval(f"KVM_CLEAR_DIRTY_LOG: pages {first_page}+{num_pages} do not fit memslot of {s.npages} "
                         "pages in 64-page units")
        nwords = (num_pages + 63) // 64
        given = np.asarray(bitmap, dtype=np.uint64)[:nwords]
        if len(given) < nwords:
            raise KvmError(errno.EFAULT, f"KVM_CLEAR_DIRTY_LOG: the bitmap has {len(given)} words, the range "
                                         f"{nwords}: copy_from_user fails")
        if num_pages % 64:
            given = given.copy()
            given[-1] &= (np.uint64(1) << np.uint64(num_pages % 64)) - np.uint64(1)
        w0 = first_page // 64
        cur = s.dirty_bitmap[w0: w0 + nwords]
        mask = cur & given
        cur &= ~mask
        words = np.flatnonzero(mask)
        c = self.profile.costs
        # walking the range's bitmap costs what GET_DIRTY_LOG's copy costs per page; each page
        # actually cleared costs its re-protect
        ns = int(c.get_dirty_log_page_ns * num_pages)
        if len(words):
            n, split_ns = self._reprotect(np.full(len(words), s.kvm_slot, np.uint32),
                                          (w0 + words).astype(np.int64) * 64, mask[words])
            ns += int(c.clear_dirty_log_page_ns * n) + self._flush_tlbs() + split_ns
        self.stats.clear_dirty_log_calls += 1
        self.stats.kernel_ns += ns
        self.last_ioctl_ns = ns

    def write_without_vcpu(self, gfns: np.ndarray) -> None:
        """The kernel writes guest memory with no running vCPU (arm64: vGIC ITS table save,
        vGICv3 pending-table save). mark_page_dirty then logs into the slot bitmap (the backup
        bitmap, with WITH_BITMAP); with a ring and no bitmap the write is not logged anywhere.
        A gfn no memslot maps, or one in a KVM_MEM_READONLY slot (__gfn_to_hva_many refuses a
        write there), is EFAULT, and nothing is written or logged."""
        self._write_out_empty()
        gfns = np.asarray(gfns, dtype=np.int64)
        sidx, gpi = self._locate(gfns)
        for k in unique(sidx):
            s = self._as0[k]
            if s.flags & KVM_MEM_READONLY:
                g = int(gfns[np.flatnonzero(sidx == k)[0]])
                raise KvmError(errno.EFAULT, f"kernel write to gfn {g}: memslot {s.id} is KVM_MEM_READONLY")
        np.add.at(self.version, gpi, 1)
        for k in unique(sidx):
            s = self._as0[k]
            off = gpi[sidx == k] - s.start
            if s.logging and s.dirty_bitmap is not None:
                s.set_dirty_bits(off)
                self.stats.backup_bitmap_pages += len(off)
            elif s.logging:
                self.stats.dropped_no_vcpu += len(off)

    # ------------------------------------------------------------------ address lookup
    def _locate(self, gfn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """gfn -> (index into the address-space-0 slots, global page index), for the kernel's
        own writes to guest memory (kvm_write_guest): a gfn no memslot maps is EFAULT there
        (a vCPU's access to it is an MMIO exit instead: :meth:`_apply`)."""
        sidx, gpi, bad = self._lookup(gfn)
        if bad >= 0:
            raise KvmError(errno.EFAULT, f"kernel write to gfn {int(gfn[bad])}: no memslot maps it")
        return sidx, gpi

    def _lookup(self, gfn: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """gfn -> (index into the address-space-0 slots, global page index, position of the
        first gfn no memslot maps or -1); from that position on the two arrays mean nothing."""
        n = len(gfn)
        if self._one_slot is not None and n:  # one RAM slot: no search
            gpi = np.empty(n, dtype=np.int64)
            bad = shift_checked(gfn, *self._one_slot, gpi)
            return np.zeros(n, dtype=np.int64), gpi, bad
        k = np.searchsorted(self._base, gfn, side="right") - 1
        if not n:
            return k, k, -1
        if not len(self._base):
            return np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64), 0
        k0 = np.maximum(k, 0)
        outside = (k < 0) | (gfn >= self._end[k0])
        bad = int(outside.argmax()) if outside.any() else -1
        return k0, self._start[k0] + (gfn - self._base[k0]), bad

    def _slot_index_of_gpi(self, gpi: np.ndarray) -> np.ndarray:
        if len(self._start) == 1:
            return np.zeros(len(gpi), dtype=np.int64)
        return np.searchsorted(self._start, gpi, side="right") - 1

    # ------------------------------------------------------------------ running the guest
    def attach_guest(self, guest: GuestProgram) -> None:
        """Load the guest program the vCPUs execute."""
        self.guest = guest
        guest.attach(self)

    def run_until(self, until: int) -> list[Exit]:
        """Let simulated time pass up to ``until`` ns, or until a vCPU leaves the guest.

        Returns the exits that happened (empty if time reached ``until``); ``now`` is then the
        time of the exit. vCPUs that are out stay out until userspace calls ``Vcpu.run``.
        A guest access to a gfn no memslot maps is an MMIO exit when a vCPU gets to it (not
        before: an exit or a memslot change may come first): the accesses before it are
        applied, ``now`` is its time and that vCPU is out of the guest, the access completed
        as MMIO (:meth:`_apply`).

        With PML and the profile's ``kernel_exit_interval_us``, every vCPU in the guest takes a
        VM exit the kernel handles (a host timer tick) at each multiple of it, which flushes its
        PML buffer into its ring: in the walk, before the first access at or after the tick or
        at the window's end (:func:`ringenv.kvm.fault.walk_writes`); a window with no access
        ends at the tick if a buffer holds anything (:meth:`_kernel_exit`). A flush that leaves
        a ring soft-full makes that vCPU exit (KVM_EXIT_DIRTY_RING_FULL) at the tick. So does an
        IPI's flush since the last call (:meth:`_kick`): those exits are returned first."""
        until = int(until)
        guest = self.guest
        tick = self._tick_ns if self.ring_entries else 0  # (PML logs into the buffer only with a ring)
        if self._kicked:  # an IPI's flush (a reset's TLB flush, a memslot change) left a ring soft-full
            return [self._kicked.pop(i) for i in sorted(self._kicked)]
        while self.now < until:
            running = self._running  # the guest reads it (and copies what it keeps)
            if guest is None or True not in running.tolist():
                self.now = until
                break
            room = (ring_room(self._ring_ctr, self._soft_limit) if self.ring_entries
                    else np.full(len(self.vcpus), 1 << 30))
            if self.profile.pml:
                room -= self._pml_n
            batch = guest.window(self.now, until, running, room)
            end = max(self.now, min(batch.complete_until, until))
            if len(batch) == 0:  # nothing written, but the guest's time passed (a scan's pointer moves)
                if tick and self._pml_n.any():  # up to the next tick, where the buffers are flushed
                    end = max(self.now, min(end, int(self._tick_state[0])))
                self.now = end
                guest.consumed(0, end, self._no_pml, self._no_retries, 0)
                exits = []
            elif batch.first_touch and self._one_slot is not None and not self.profile.pml \
                    and batch.exit_after is None and batch.read is None:
                exits = self._apply_window(batch, end)
            else:
                batch = batch.ordered()
                _, exits = self._apply(batch.t, batch.vcpu, batch.gfn, batch.exit_after, end,
                                       reads=batch.read, first_touch=batch.first_touch, ticks=True,
                                       fault_cut=batch.fault_cut)
            if not exits and tick and self._tick_state[0] <= self.now:
                exits = self._kernel_exit()
            if exits:
                return exits
        return []

    def _kernel_exit(self) -> list[Exit]:
        """x86 PML: a tick passed (``now`` is at it or, if no buffer held anything, past it):
        every vCPU in the guest takes a kernel-handled VM exit, vmx_handle_exit flushes its PML
        buffer into the ring (:func:`ringenv.kvm.pml.flush_all`, its cost charged per entry). A
        vCPU whose ring the flush left soft-full exits to userspace with
        KVM_EXIT_DIRTY_RING_FULL (the soft-full request, before re-entry; every write logged so
        far has retired). Returns those exits."""
        tick = self._tick_ns
        self._tick_state[0] = (self.now // tick + 1) * tick
        return self._flush_running()

    def _flush_running(self) -> list[Exit]:
        """A VM exit the kernel handles, of every vCPU in the guest (a tick, an IPI): each flushes
        its PML buffer into its ring; returns the exits of those the flush left soft-full
        (:meth:`_soft_full_exits`)."""
        flush_all(self._running, *self._pml_args(), self._soft_full)
        self._soft_full_requests()
        return self._soft_full_exits()

    def _soft_full_exits(self) -> list[Exit]:
        """The vCPUs in the guest whose ring a PML flush at a tick or an IPI left soft-full exit
        to userspace (KVM_EXIT_DIRTY_RING_FULL: the request, checked before re-entry)."""
        exits = []
        for v in self.vcpus:
            if v.in_guest and v.request_soft_full:
                v.stats.full_exits += 1
                exits.append(self._exit(v, KVM_EXIT_DIRTY_RING_FULL, "full"))
        return exits

    def _exit(self, v: Vcpu, reason: int, kind: str, count: bool = True) -> Exit:
        """v leaves the guest now. Any exit flushes the PML buffer into the ring first."""
        if v.pml is not None and v.pml_count:
            self._pml_flush(v)
        v.in_guest = False
        if count:
            v.stats.exits += 1
            v.stats.exit_ns += self.profile.costs.exit_ns
        return Exit(v.index, reason, self.now, kind)

    def _pml_flush(self, v: Vcpu) -> None:
        """Copy the vCPU's PML buffer into its ring (vmx_flush_pml_buffer; PML logs into the
        buffer only with a ring, see :meth:`_apply`). The buffer holds gfns; each goes through
        kvm_vcpu_mark_page_dirty, which looks it up in the memslots as they are now
        (kvm_vcpu_gfn_to_memslot): a slot created, deleted or moved since the CPU logged it
        changes which slot and offset it is, a gfn no slot maps any more pushes nothing, nor
        does one in a slot whose logging was turned off (mark_page_dirty_in_slot). The flush's
        time is paid for every entry (:func:`ringenv.kvm.pml.flush_one`). (The simulator
        flushes at exits to userspace, at a write that finds the buffer full, at the profile's
        timer ticks and at the kernel's IPIs, :meth:`_kick`: any memslot change kicks the vCPUs
        in the guest, a delete or move while the slot is still found, so a buffer never holds a
        gfn of a slot gone by the time it is flushed.)"""
        flush_one(v.index, *self._pml_args(), self._soft_full)
        self._soft_full_requests()

    def _pml_args(self) -> tuple:
        """The arguments of the compiled PML flushes (:mod:`ringenv.kvm.pml`) after the mask."""
        return (self._pml, self._pml_n, self._base, self._end, self._kslot, self._slot_mode, self._ring_addr,
                self._ring_ctr, self._soft_limit, self._vstat, self.profile.costs.pml_flush_entry_ns)

    def _soft_full_requests(self) -> None:
        """Raise KVM_REQ_DIRTY_RING_SOFT_FULL for the vCPUs the compiled paths marked in
        ``_soft_full`` (then cleared)."""
        soft_full = self._soft_full
        if soft_full.any():
            for v_i in np.flatnonzero(soft_full).tolist():
                self.vcpus[v_i].request_soft_full = True
            soft_full[:] = False

    def _set_dirty(self, gpi: np.ndarray) -> None:
        """mark_page_dirty without a ring: set the pages' bits in their slots' dirty bitmaps."""
        if len(self._as0) == 1:
            s = self._as0[0]
            s.set_dirty_bits(gpi - s.start)
            return
        sidx = self._slot_index_of_gpi(gpi)
        for k in unique(sidx):
            s = self._as0[k]
            s.set_dirty_bits(gpi[sidx == k] - s.start)

    def _apply(self, t, vc, gfn, exit_after, end=None, notify=True, reads=None, first_touch=False, ticks=False,
               fault_cut=False):
        """Apply a time-ordered batch of guest writes up to the first event that takes a vCPU
        out of the guest, with its bookkeeping (:func:`ringenv.kvm.fault.apply_batch`).
        Returns (events consumed, the exits: none, or one, or with ``ticks`` the vCPUs a PML
        flush at a kernel-handled exit left soft-full; see :meth:`run_until`).

        An access to a gfn no memslot maps ends the walk: if the walk gets there (no exit
        before it) it is an access to an unbacked guest-physical address, which KVM hands to
        userspace as KVM_EXIT_MMIO (x86: the EPT violation or shadow page fault finds no
        memslot, kvm_mmu_page_fault has the instruction emulated, and the emulator's MMIO
        access exits; arm64: kvm_handle_guest_abort finds no memslot and calls io_mem_abort).
        It is handled as a write to a KVM_MEM_READONLY slot is: the access completes as MMIO
        (nothing written, mapped or logged, no fault), the vCPU exits ("mmio"), and an exit
        code attached to it (sync, done) comes at re-entry.

        With ``fault_cut`` (:attr:`WriteBatch.fault_cut`) the walk also ends after each access
        that faulted, with no exit: ``now`` is that access's time and the guest is told, so that
        it times its next accesses after the fault's service time."""
        p = self.profile
        n = len(t)
        if first_touch:  # a workload's candidate first writes: every access is a write
            sidx, gpi, bad = self._lookup(gfn)
        else:
            is_write = gfn != NO_WRITE
            sidx = np.zeros(n, dtype=np.int64)
            gpi = np.full(n, -1, dtype=np.int64)
            bad = -1
            if is_write.all():
                sidx, gpi, bad = self._lookup(gfn)
            elif is_write.any():
                sidx[is_write], gpi[is_write], bad = self._lookup(gfn[is_write])
                if bad >= 0:
                    bad = int(np.flatnonzero(is_write)[bad])
        code = exit_after if exit_after is not None else self._zeros_of(np.int8, n)
        reads = reads if reads is not None else self._zeros_of(np.int8, n)
        rings = self.ring_entries > 0
        pml = p.pml_buffer_entries if p.pml else 0
        tick = self._tick_ns if ticks and pml and rings else 0
        if bad >= 0:  # the walk ends at the access no memslot maps, walked as a no-op (a PML tick before it)
            vc_, sidx, reads_ = vc[:bad + 1], sidx[:bad + 1], reads[:bad + 1]
            gpi, code_ = gpi[:bad + 1].copy(), code[:bad + 1].copy()
            gpi[bad], code_[bad] = -1, 0
        else:
            vc_, code_, reads_ = vc, code, reads
        pml_count = self._pml_n.copy() if pml else self._no_pml  # (the walk counts; log_all fills the buffers)
        push_v, push_g, split_v, split_b = self._batch_buffers(n * (self.block_pages if self._any_pushall else 1), n)
        fault_cost, split_cost, wp_fault_cost = self._write_costs
        faults = np.zeros(len(self.vcpus), dtype=np.int64)
        tick_state = self._tick_state
        tick_state[1] = 0
        tick_state[3] = -1 if end is None or bad >= 0 else end  # (a walk to an unmapped access ends there)
        flush_at = np.empty(n + 1 if tick else 0, dtype=np.int64)
        m, cut, npush, nsplit, ndirty, retired, nsoft = apply_batch(
            gpi, vc_.astype(np.int32, copy=False), code_.astype(np.int8, copy=False),
            reads_.astype(np.int8, copy=False),
            first_touch, sidx, self.state, self.version, self.block_map,
            self._blockgran, self._pushall, self._split, self._slot_mode, self.block_shift,
            self._ring_ctr, self._soft_limit, pml_count, pml, rings, push_v, push_g, split_v, split_b,
            self._vstat, split_cost, fault_cost, wp_fault_cost, self._ring_addr, self._start, self._gpi_end,
            self._kslot, self._soft_full, faults, t, tick, tick_state, flush_at, fault_cut)
        i = m if cut == CUT_PML_FULL else m - 1  # (the log-full exit is at an access not consumed)
        if bad >= 0 and cut == CUT_NONE:  # the walk reached it: it exits as MMIO, consumed
            m, cut, i = bad + 1, CUT_MMIO, bad
        if cut == CUT_TICK:  # at the tick before event m
            cut_info = (int(tick_state[2]), 0, 0, 0, False)
        elif cut != CUT_NONE:
            cut_info = (int(t[i]), int(vc[i]), int(gfn[i]), int(code[i]), bool(reads[i]))
        else:
            cut_info = (0, 0, 0, 0, False)
        exits = self._after_batch(m, cut, npush, nsplit, ndirty, retired, nsoft, faults, push_v, push_g, end, notify,
                                  pml, *cut_info, flush_at=flush_at[:tick_state[1]] if tick else None)
        return m, exits

    def _apply_window(self, batch: WriteBatch, end: int) -> list[Exit]:
        """:meth:`_apply` for a workload's window of candidate first writes (``first_touch``, no
        reads or exit codes, events in ``batch.order``) on a VM with one RAM slot and no PML: the
        gather, the address check and the walk in one compiled call
        (:func:`ringenv.kvm.fault.apply_window`); the same results as :meth:`_apply` on the
        gathered batch, the MMIO exit included (when the walk reaches a write outside the slot)."""
        t, vc, gfn = batch.t, batch.vcpu, batch.gfn
        n = len(t)
        push_v, push_g, split_v, split_b = self._batch_buffers(n * (self.block_pages if self._any_pushall else 1), n)
        fault_cost, split_cost, _ = self._write_costs  # no PML: the same cost in every slot
        faults = np.zeros(len(self.vcpus), dtype=np.int64)
        m, cut, npush, nsplit, ndirty, retired, nsoft, last, bad = apply_window(
            _NO_ORDER if batch.order is None else batch.order, t, vc, gfn, *self._one_slot,
            self._zeros_of(np.int8, n), self._zeros_of(np.int64, n), self.state, self.version, self.block_map,
            self._blockgran, self._pushall, self._split, self._slot_mode, self.block_shift,
            self._ring_ctr, self._soft_limit, self._no_pml, self.ring_entries > 0, push_v, push_g, split_v, split_b,
            self._vstat, split_cost, fault_cost, self._ring_addr, self._start, self._gpi_end, self._kslot,
            self._soft_full, faults)
        if nsplit and self._split_leaves_empty:
            self._empty_pending = True  # (a split may have left its block EMPTY: fault.walk_writes)
        if bad >= 0 and cut == CUT_NONE:  # the walk reached a write outside the slot: an MMIO exit
            m, cut, last = m + 1, CUT_MMIO, bad
        return self._after_batch(m, cut, npush, nsplit, ndirty, retired, nsoft, faults, push_v, push_g, end, True, 0,
                                 *((int(t[last]), int(vc[last]), int(gfn[last]), EXIT_NONE, False)
                                   if cut != CUT_NONE else (0, 0, 0, 0, False)))

    def _after_batch(self, m, cut, npush, nsplit, ndirty, retired, nsoft, faults, push_v, push_g, end, notify, pml,
                     cut_t, cut_v, cut_gfn, cut_code, cut_read, flush_at=None) -> list[Exit]:
        """The Python side of a batch walked by apply_batch: split counts, soft-full requests,
        pushes into PML buffers (flushed at the ticks' push counts ``flush_at``) or slot
        bitmaps, the exit of the event that stopped the walk (``cut_*``: its time, vCPU, gfn,
        exit code and read flag; for CUT_TICK the tick's time, and every vCPU its flush left
        soft-full exits), the clock, and the guest told how far it got. Returns the exits."""
        rings = self.ring_entries > 0
        if nsplit:
            self.stats.splits += nsplit
        if nsoft:
            self._soft_full_requests()
        if pml and rings and (npush or (flush_at is not None and len(flush_at))):
            # into each vCPU's PML buffer, which holds GPAs (flushed when full and at the ticks)
            gfns = self._gfns_of(push_g[:npush])
            gfns[push_g[:npush] < 0] = -1  # (an exit's flush with no push)
            log_all(push_v[:npush], gfns, _NO_ORDER if flush_at is None else flush_at,
                    *self._pml_args(), self.profile.costs.pml_full_exit_ns, self._soft_full)
            self._soft_full_requests()
        elif npush and not rings:  # into the slot bitmaps (which vCPU wrote does not matter there)
            self._set_dirty(push_g[:npush])

        retried = np.zeros(len(self.vcpus), dtype=bool)
        exit_ = None
        exits = []
        if cut == CUT_TICK:
            self.now = max(self.now, cut_t)
            exits = self._soft_full_exits()
        elif cut == CUT_FAULT:  # the faulting access retired, its vCPU still in the guest
            self.now = max(self.now, cut_t)
        elif cut != CUT_NONE:
            self.now = max(self.now, cut_t)
            v = self.vcpus[cut_v]
            if cut in (CUT_FULL, CUT_PML_FULL):
                if cut == CUT_PML_FULL:
                    # the log-full VM exit at the write that found the buffer full (not done: the
                    # guest proposes it again after re-entry); its flush made the ring soft-full
                    v.stats.fault_ns += self.profile.costs.pml_full_exit_ns
                elif not retired:  # the access re-executes at re-entry, then its sync/done exit
                    v.pending_store = cut_gfn
                    v.pending_code = cut_code
                    v.pending_read = cut_read
                    retried[v.index] = True
                elif cut_code != EXIT_NONE:  # it retired (a PML what-if block): its sync/done exit comes at re-entry
                    v.pending_code = cut_code
                v.request_soft_full = True
                v.stats.full_exits += 1
                exit_ = self._exit(v, KVM_EXIT_DIRTY_RING_FULL, "full")
            elif cut == CUT_MMIO:  # a write to a read-only slot or no slot; its sync/done exit comes at re-entry
                if cut_code != EXIT_NONE:
                    v.pending_code = cut_code
                exit_ = self._exit(v, KVM_EXIT_MMIO, "mmio")
            else:
                if cut == CUT_DONE:
                    v.finished = True
                exit_ = self._exit(v, KVM_EXIT_MMIO, "sync" if cut == CUT_SYNC else "done")
        elif end is not None:
            self.now = max(self.now, int(end))
        if notify and self.guest is not None:
            self.guest.consumed(m, self.now, faults, retried, ndirty)
        return [exit_] if exit_ is not None else exits

    def _gfns_of(self, gpi: np.ndarray) -> np.ndarray:
        """Global page indexes of address-space-0 slots -> gfns (in the current layout)."""
        one = self._one_slot
        if one is not None:
            return gpi - one[2] if one[2] else gpi
        return gpi + (self._base - self._start)[self._slot_index_of_gpi(gpi)]

    # ------------------------------------------------------------------ inspection
    def vcpu_totals(self) -> tuple[int, int, int]:
        """(KVM_EXIT_DIRTY_RING_FULL exits, guest ns lost in the kernel, ring overflows), summed
        over the vCPUs: the totals of their ``stats.full_exits``, ``stats.fault_ns`` and
        ``ring.lost`` (0 without rings), read from the counter arrays at once."""
        lost = sum(self._ring_ctr[:, 2].tolist()) if self.ring_entries else 0
        return sum([v.stats.full_exits for v in self.vcpus]), sum(self._vstat[:, FAULT_NS].tolist()), lost

    def vcpu_kernel_ns(self) -> np.ndarray:
        """Per vCPU, the guest time lost in the kernel so far (``stats.fault_ns``: faults,
        splits, PML flushes), as a read-only view of the counter array (it moves on as the VM
        runs; the array is replaced when a vCPU is created)."""
        col = self._kernel_ns
        if col is None or col.base is not self._vstat:
            col = self._kernel_ns = self._vstat[:, FAULT_NS]
            col.flags.writeable = False
        return col

    @property
    def ring_bytes(self) -> int:
        """Kernel memory of all rings."""
        return self.ring_entries * 16 * len(self.vcpus)

