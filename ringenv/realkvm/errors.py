"""The error cases of real-kvm-host.md ("Errors observed"), as a table to compare.

``errno_table()`` runs every case on a fresh real VM and returns ``{case: outcome}``:
the errno name ("EINVAL", "E2BIG", "ENXIO"), "ok" for an accepted call, or the return value
of KVM_RESET_DIRTY_RINGS. The cases use only calls the simulator's ``ringenv.kvm.Vm`` also
has (enable_cap, create_vcpu, set_user_memory_region, reset_dirty_rings, get_dirty_log, and
the vCPU's mmap_ring), so ``errno_table(lambda: Vm("x86-nopml"))`` gives the simulator's table.
"""

from __future__ import annotations

import contextlib
import mmap
from typing import Any, Callable

from ringenv.realkvm.ioctl import (
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
    KVM_MEM_LOG_DIRTY_PAGES, PAGE_SIZE, KvmSystem, errno_name)

RING = KVM_CAP_DIRTY_LOG_RING_ACQ_REL
SMALL_RING = 4096  # bytes: the smallest ring (256 entries)


def _ring_after_vcpu(vm):
    vm.create_vcpu(0)
    return vm.enable_cap(RING, SMALL_RING)


def _ring_twice(vm):
    vm.enable_cap(RING, SMALL_RING)
    return vm.enable_cap(RING, SMALL_RING)


def _with_bitmap(vm):
    vm.enable_cap(RING, SMALL_RING)
    return vm.enable_cap(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)


def _get_dirty_log_with_ring(vm):
    vm.enable_cap(RING, SMALL_RING)
    vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 16 * PAGE_SIZE)
    return vm.get_dirty_log(0)


def _ring_mmap(vm, **prot_flags):
    """mmap of a vCPU's ring with ``prot``/``flags`` (the real one is closed again)."""
    vm.enable_cap(RING, SMALL_RING)
    mm = vm.create_vcpu(0).mmap_ring(**prot_flags)
    if hasattr(mm, "close"):
        mm.close()


def _reset_with_ring(vm):
    vm.enable_cap(RING, SMALL_RING)
    vm.create_vcpu(0)
    return vm.reset_dirty_rings()


CASES: dict[str, Callable[[Any], object]] = {
    "ring_size_0": lambda vm: vm.enable_cap(RING, 0),
    "ring_not_power_of_two": lambda vm: vm.enable_cap(RING, 6144),
    "ring_below_4096_bytes": lambda vm: vm.enable_cap(RING, 2048),
    "ring_2mib": lambda vm: vm.enable_cap(RING, 2 << 20),
    "ring_after_vcpu": _ring_after_vcpu,
    "ring_twice": _ring_twice,
    "plain_ring_192": lambda vm: vm.enable_cap(KVM_CAP_DIRTY_LOG_RING, SMALL_RING),
    "with_bitmap": _with_bitmap,
    "get_dirty_log_with_ring": _get_dirty_log_with_ring,
    "ring_mmap_private": lambda vm: _ring_mmap(vm, flags=mmap.MAP_PRIVATE),
    "ring_mmap_exec": lambda vm: _ring_mmap(vm, prot=mmap.PROT_READ | mmap.PROT_EXEC),
    "reset_without_ring": lambda vm: vm.reset_dirty_rings(),
    "reset_with_ring_nothing_harvested": _reset_with_ring,
}


def errno_table(new_vm: Callable[[], Any] | None = None) -> dict[str, str | int]:
    """Run each case on a VM from ``new_vm()`` (default: a real VM on /dev/kvm)."""
    with contextlib.ExitStack() as stack:
        if new_vm is None:
            system = stack.enter_context(KvmSystem())
            new_vm = system.create_vm
        cases = CASES
        table: dict[str, str | int] = {}
        for name, case in cases.items():
            vm = new_vm()
            with contextlib.closing(vm) if hasattr(vm, "close") else contextlib.nullcontext():
                try:
                    result = case(vm)
                except OSError as exc:
                    table[name] = errno_name(exc.errno)
                    continue
            table[name] = result if name.startswith("reset_") else "ok"
    return table
