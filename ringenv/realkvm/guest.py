"""A real VM that runs write programs: the building block of replay, calibrate and errno checks."""

from __future__ import annotations

import errno
import threading
import time
from typing import Sequence

import numpy as np

from ringenv.realkvm.arch import Arch, WriteProgram, host_arch
from ringenv.realkvm.ioctl import (
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
    KVM_EXIT_DIRTY_RING_FULL, KVM_EXIT_MMIO,
    KVM_MEM_LOG_DIRTY_PAGES, PAGE_SIZE, KvmSystem, KvmUnavailable, RealVm, VcpuKicked, _Closing,
    install_kick_handler)

CODE_SLOT, DATA_SLOT = 0, 1


def unavailable_reason() -> str | None:
    """Why real-KVM guests with dirty rings cannot run here (no usable /dev/kvm, an unsupported
    arch, a KVM without the dirty ring: KVM_CAP_DIRTY_LOG_RING_ACQ_REL and _RING both 0), or None."""
    try:
        host_arch()
        with KvmSystem() as system, system.create_vm() as vm:
            if not (vm.check_extension(KVM_CAP_DIRTY_LOG_RING_ACQ_REL) or vm.check_extension(KVM_CAP_DIRTY_LOG_RING)):
                return ("real KVM has no dirty ring here (KVM_CHECK_EXTENSION of KVM_CAP_DIRTY_LOG_RING_ACQ_REL "
                        f"({KVM_CAP_DIRTY_LOG_RING_ACQ_REL}) and KVM_CAP_DIRTY_LOG_RING ({KVM_CAP_DIRTY_LOG_RING}) "
                        "are 0: Linux >= 5.11 needed)")
    except (OSError, NotImplementedError) as exc:
        return f"real KVM unavailable: {exc}"
    return None


class GuestError(RuntimeError):
    """The guest stopped in an unexpected way (an exit reason other than ring-full or MMIO)."""


class VcpuRefused(OSError):
    """KVM_CREATE_VCPU failed for one of the guest's vCPUs, the warm-up ones included (more than
    the host takes); the message says which."""


class BitmapRefused(KvmUnavailable):
    """The host's KVM has no KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP (x86: it needs none);
    enabling it would be EINVAL."""


class Guest(_Closing):
    """VM with a code slot (not logged) and a data slot (logged), one vCPU per program.

    ``ring_entries`` 0 means no dirty ring (the data slot then uses the dirty bitmap).
    ``unmapped_pages``: the programs may also write that many pages past the data slot's end,
    guest-physical memory no memslot maps (each such store is an MMIO exit).
    ``caps`` are extra KVM_ENABLE_CAP calls ``(cap, arg0, ...)`` made before the memslots.
    ``data_offset`` (bytes) puts the data slot that far past the architecture's data base, a
    guest-physical block boundary; ``data_page_size`` is the size of the guest's own pages
    over it (``Arch.build_image``); ``huge_pages`` backs it by transparent huge pages, its
    userspace address congruent to its guest-physical one modulo the huge page plus
    ``hva_skew`` bytes (``RealVm.set_user_memory_region``). ``populated``: userspace writes
    every page of the data slot before any vCPU runs (as QEMU's -mem-prealloc does), so the
    host page behind each is writable when the guest first touches it. ``warm_up``: before
    the programs' vCPUs exist, other vCPUs of the same VM run these programs (one each, the same
    sizes as ``programs``, aiming where no memslot is: past the data slot) to their done exits,
    with their write tables in place of the programs' (the same code slot layout): the code slot
    is then mapped as the programs will touch it, and the programs' vCPUs take no fault there
    (their fault counts are the data slot's alone). ``warm_up_timeout`` (seconds) bounds the
    whole warm-up: a warm-up vCPU still running then is kicked out of KVM_RUN and a TimeoutError
    is raised (everything released, as for any failure here); ``warm_up_s`` is then the wall
    time the warm-up took (0 without one).
    ``run(i)`` runs vCPU ``i`` until the next event and returns ``(kind, value)``:
    ("full", None) for KVM_EXIT_DIRTY_RING_FULL, ("sync", writes_done), ("done", writes_done),
    ("mmio", guest-physical address) for any other KVM_EXIT_MMIO (an access to an address no
    memslot maps: the next ``run`` completes it and goes on).
    """

    def __init__(self, programs: Sequence[WriteProgram], data_pages: int,
                 ring_entries: int = 0, with_bitmap: bool = False, log_dirty: bool = True,
                 caps: Sequence[tuple[int, ...]] = (),
                 system: KvmSystem | None = None, arch: Arch | None = None, unmapped_pages: int = 0,
                 data_offset: int = 0, data_page_size: int = PAGE_SIZE, huge_pages: bool = False,
                 hva_skew: int = 0, populated: bool = False, warm_up: Sequence[WriteProgram] = (),
                 warm_up_timeout: float | None = None):
        self.vm: RealVm | None = None
        self._own_system = False
        self.warm_up_s = 0.0
        self.arch = arch or host_arch()
        install_kick_handler()  # so that kick_all() can stop a vCPU stuck in the guest
        self.image = self.arch.build_image(data_pages, programs, unmapped_pages, data_offset=data_offset,
                                           data_page_size=data_page_size)
        self.system = system or KvmSystem()
        self._own_system = system is None
        try:
            self.vm = self.system.create_vm()
            if ring_entries:
                self.vm.enable_dirty_ring(ring_entries, extra_reserved=self.arch.extra_reserved_entries)
            if with_bitmap:
                if not self.vm.check_extension(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP):
                    raise BitmapRefused(errno.EINVAL, (  # what enabling it gives
                        "this host's KVM lacks KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP "
                        "(KVM_CHECK_EXTENSION(225) == 0; x86 does not need it): "
                        "drop \"with_bitmap\" from the trace"))
                self.vm.enable_cap(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
            for cap in caps:
                self.vm.enable_cap(*cap)
            code = self.vm.set_user_memory_region(
                CODE_SLOT, 0, self.image.code_gpa, len(self.image.code))
            if warm_up:
                if [len(p.writes) for p in warm_up] != [len(p.writes) for p in programs]:
                    raise ValueError("warm_up: one program per program, of the same length each (the same code "
                                     "slot layout)")
                t0 = time.monotonic()
                self._warm_up(code, warm_up, data_pages, unmapped_pages, data_offset, data_page_size,
                              warm_up_timeout)
                self.warm_up_s = time.monotonic() - t0
            code[:] = self.image.code
            data = self.vm.set_user_memory_region(
                DATA_SLOT, KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0,
                self.image.data_gpa, data_pages * PAGE_SIZE, huge_pages=huge_pages, hva_skew=hva_skew)
            if populated:  # one byte per page: the host allocates each page, writable
                at = self.vm.hva_offset[DATA_SLOT]
                np.frombuffer(data, dtype=np.uint8)[at: at + data_pages * PAGE_SIZE: PAGE_SIZE] = 1
            first = len(warm_up)
            for i in range(len(programs)):
                try:
                    vcpu = self.vm.create_vcpu(first + i)
                except OSError as exc:
                    raise VcpuRefused(exc.errno, f"KVM_CREATE_VCPU of vCPU {i} of {len(programs)}: "
                                                 f"{exc.strerror}") from None
                self.arch.setup_vcpu(self.system, vcpu, self.image, i)
        except BaseException:
            self.close()
            raise
        self.vcpus = self.vm.vcpus[first:]

    def _warm_up(self, code, programs: Sequence[WriteProgram], data_pages: int, unmapped_pages: int,
                 data_offset: int, data_page_size: int, timeout: float | None = None) -> None:
        """Run ``programs`` (the ``warm_up`` argument) on vCPUs of their own, one after the
        other, to their done exits, with their image in the code slot: a sync exit or an access
        past the data slot (MMIO) is gone on from; anything else is an error. After ``timeout``
        seconds (all of them together) a timer kicks the warm-up vCPUs out of KVM_RUN: a
        TimeoutError naming the vCPU still running."""
        image = self.arch.build_image(data_pages, programs, unmapped_pages, data_offset=data_offset,
                                      data_page_size=data_page_size)
        code[:] = image.code
        warm: list = []  # the warm-up vCPUs so far: only they are kicked
        expired = threading.Event()  # set before the kicks: a vCPU made after the timer fired kicks itself
        timer = None

        def expire() -> None:
            expired.set()
            for v in list(warm):
                v.kick()

        if timeout is not None:  # (threading's waits take at most TIMEOUT_MAX seconds)
            timer = threading.Timer(min(timeout, threading.TIMEOUT_MAX), expire)
            timer.daemon = True
            timer.start()
        try:
            for i in range(len(programs)):
                try:
                    vcpu = self.vm.create_vcpu(i)
                except OSError as exc:
                    raise VcpuRefused(exc.errno, f"KVM_CREATE_VCPU of warm-up vCPU {i} of {len(programs)}: "
                                                 f"{exc.strerror}") from None
                warm.append(vcpu)
                if expired.is_set():  # the timer fired before this vCPU was in ``warm``
                    vcpu.kick()
                self.arch.setup_vcpu(self.system, vcpu, image, i)
                try:
                    while (reason := vcpu.run()) == KVM_EXIT_MMIO:
                        addr, _, is_write = vcpu.mmio()
                        if is_write and addr == image.done_gpa:
                            break
                    else:
                        raise GuestError(f"warm-up vCPU {i}: unexpected {vcpu.exit_detail()} (reason {reason})")
                except VcpuKicked:
                    raise TimeoutError(f"the --faults warm-up (vCPU {i} of {len(programs)}) did not finish "
                                       f"within {timeout:g} s; stopped") from None
        finally:
            if timer is not None:
                timer.cancel()

    def close(self) -> None:
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self._own_system:
            self.system.close()

    def kick_all(self) -> None:
        """Stop every vCPU: KVM_RUN returns and ``run`` raises VcpuKicked (a timeout)."""
        if self.vm is not None:
            for vcpu in self.vm.vcpus:
                vcpu.kick()

    def run(self, index: int) -> tuple[str, int | None]:
        """KVM_RUN vCPU ``index`` once and classify the exit."""
        vcpu = self.vcpus[index]
        reason = vcpu.run()
        if reason == KVM_EXIT_DIRTY_RING_FULL:
            return "full", None
        if reason == KVM_EXIT_MMIO:
            addr, data, is_write = vcpu.mmio()
            if is_write and addr in (self.image.sync_gpa, self.image.done_gpa):
                kind = "sync" if addr == self.image.sync_gpa else "done"
                return kind, int.from_bytes(data, "little")
            return "mmio", addr  # an address no memslot maps: KVM_RUN completes the access
        raise GuestError(f"vCPU {index}: unexpected {vcpu.exit_detail()}")
