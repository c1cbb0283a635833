"""The error cases of real-kvm-host.md ("Errors observed"), run against the real /dev/kvm.

``errno_table()`` returns ``{case: outcome}`` where outcome is the errno name ("EINVAL",
"E2BIG", "ENXIO"), "ok" for an accepted call, or the ioctl's return value for
KVM_RESET_DIRTY_RINGS. Each case runs on a fresh VM, so the simulator's ``ringenv.kvm.Vm``
can be put through the same calls and its table compared with this one.
"""

from __future__ import annotations

import mmap
from typing import Callable

from ringenv.realkvm.ioctl import (
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
    KVM_DIRTY_LOG_PAGE_OFFSET, KVM_MEM_LOG_DIRTY_PAGES, PAGE_SIZE, KvmSystem, RealVm, errno_name)

RING = KVM_CAP_DIRTY_LOG_RING_ACQ_REL
SMALL_RING = 4096  # bytes: the smallest ring (256 entries)


def _ring_after_vcpu(vm: RealVm):
    vm.create_vcpu(0)
    return vm.enable_cap(RING, SMALL_RING)


def _ring_twice(vm: RealVm):
    vm.enable_cap(RING, SMALL_RING)
    return vm.enable_cap(RING, SMALL_RING)


def _with_bitmap(vm: RealVm):
    vm.enable_cap(RING, SMALL_RING)
    return vm.enable_cap(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)


def _get_dirty_log_with_ring(vm: RealVm):
    vm.enable_cap(RING, SMALL_RING)
    vm.set_user_memory_region(0, 0, 16, KVM_MEM_LOG_DIRTY_PAGES)
    return vm.get_dirty_log(0)


def _ring_mmap_private(vm: RealVm):
    vm.enable_dirty_ring(SMALL_RING // 16)
    vcpu = vm.create_vcpu(0)
    mm = mmap.mmap(vcpu.fd, SMALL_RING, flags=mmap.MAP_PRIVATE,
                   offset=KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE)
    mm.close()


def _reset_with_ring(vm: RealVm):
    vm.enable_dirty_ring(SMALL_RING // 16)
    vm.create_vcpu(0)
    return vm.reset_dirty_rings()


CASES: dict[str, Callable[[RealVm], object]] = {
    "ring_size_0": lambda vm: vm.enable_cap(RING, 0),
    "ring_not_power_of_two": lambda vm: vm.enable_cap(RING, 6144),
    "ring_below_4096_bytes": lambda vm: vm.enable_cap(RING, 2048),
    "ring_2mib": lambda vm: vm.enable_cap(RING, 2 << 20),
    "ring_after_vcpu": _ring_after_vcpu,
    "ring_twice": _ring_twice,
    "plain_ring_192": lambda vm: vm.enable_cap(KVM_CAP_DIRTY_LOG_RING, SMALL_RING),
    "with_bitmap": _with_bitmap,
    "get_dirty_log_with_ring": _get_dirty_log_with_ring,
    "ring_mmap_private": _ring_mmap_private,
    "reset_without_ring": lambda vm: vm.reset_dirty_rings(),
    "reset_with_ring_nothing_harvested": _reset_with_ring,
}


def errno_table(system: KvmSystem | None = None) -> dict[str, str | int]:
    """Run every case of ``CASES`` on a fresh VM; errno name, "ok", or the reset count."""
    own = system is None
    system = system or KvmSystem()
    table: dict[str, str | int] = {}
    try:
        for name, case in CASES.items():
            with system.create_vm() as vm:
                try:
                    result = case(vm)
                except OSError as exc:
                    table[name] = errno_name(exc.errno)
                    continue
                table[name] = result if name.startswith("reset_") else "ok"
    finally:
        if own:
            system.close()
    return table
