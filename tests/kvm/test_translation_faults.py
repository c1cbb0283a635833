"""Translation faults: every access to a page stage 2 does not map yet is a fault (a VM exit,
KVM's pf_fixed), whether the slot logs or not and whether the access loads or stores; on the
x86 shadow MMU, in a slot without dirty tracking, the fault also maps the other pages of its
aligned group of 8 whose host pages exist (direct_pte_prefetch / FNAME(pte_prefetch),
PTE_PREFETCH_NUM), so that their first accesses do not fault.

The x86-nopml rows are the counts measured on this project's host (shadow paging; the real-KVM
cross-check is tests/realkvm/test_realkvm_faults.py); x86-pml (the TDP MMU) and arm64 have no
prefetch."""

from __future__ import annotations

import pytest

from ringenv.guest.trace import TraceProgram
from ringenv.kvm import Vm
from ringenv.kvm import uapi as U
from ringenv.kvm.memory import UNMAPPED, WP

from ._fault_cases import ALL, CASES, PAGES

BASE = 1 << 18  # (gfn, a multiple of 8 and of the block)
# faults per profile, in CASES order
EXPECTED = {
    "x86-nopml": [192, 192, 1536, 192, 3072, 1536, 3072, 1536],  # measured (real-kvm-host.md)
    "x86-pml": [1536, 512, 1536, 1536, 3072, 1536, 3072, 1536],  # no prefetch with the TDP MMU
    # arm64: logging maps a load read-only (the store faults again) but for the ring-only slot
    # without a bitmap, which does not log (reference s11): there the load maps it writable
    "arm64-4k": [1536, 512, 1536, 1536, 3072, 1536, 3072, 3072],
}


def _vm(profile, logged, populated, base=BASE, pages=PAGES):
    vm = Vm(profile)
    cap = U.KVM_CAP_DIRTY_LOG_RING if vm.profile.arch == "x86" else U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL
    vm.enable_cap(cap, 4096 * 16)
    if vm.profile.with_bitmap_supported:
        vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
    vm.set_user_memory_region(0, U.KVM_MEM_LOG_DIRTY_PAGES if logged else 0, base * vm.page_size,
                              pages * vm.page_size, block_fraction=0.0, mapped_fraction=0.0, populated=populated)
    return vm


def _run(vm, accesses, loads, base=BASE):
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([accesses], [[]], reads=[sorted(loads)], base_gfn=base))
    while (e := v.run() or vm.run_until(vm.now + (1 << 50))[0]).kind != "done":
        raise AssertionError(e)
    return v


@pytest.mark.parametrize("profile", list(EXPECTED))
def test_every_access_to_an_unmapped_page_faults(profile):
    got = [_run(_vm(profile, logged, populated), acc, loads).stats.faults
           for acc, loads, logged, populated in CASES.values()]
    assert got == EXPECTED[profile]


@pytest.mark.parametrize("logged", [False, True])
def test_a_translation_fault_is_paid_as_an_exit(logged):
    """A load of a page not mapped yet exits (an EPT violation, a stage-2 abort): its service
    time is the profile's wp_fault_ns, as a write-protect fault's; the loads alone push nothing."""
    vm = _vm("arm64-4k", logged, populated=False)
    v = _run(vm, ALL[:100], ALL[:100])
    assert v.stats.faults == 100 and v.stats.pushes == 0
    assert v.stats.fault_ns == 100 * vm.profile.costs.wp_fault_ns


def test_prefetch_stays_in_the_slot_and_maps_only_host_pages_that_exist():
    """A slot from gfn BASE + 5 (its first group is 3 pages) of 20 pages whose every 4th page
    userspace wrote: a fault maps its own page and the written pages of its group of 8 (within
    the slot), writable; fresh pages stay unmapped and fault on their own."""
    base = BASE + 5
    vm = _vm("x86-nopml", logged=False, populated=False, base=base, pages=20)
    s = vm.memslot(0)
    written = [p for p in range(20) if p % 4 == 0]
    s.state[written] &= 0xFF ^ 16  # (memory.UNTOUCHED off: a host page exists)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[1, 2, 3, 4, 8, 12]], [[0]], base_gfn=base))
    run = lambda: v.run() or vm.run_until(vm.now + (1 << 50))[0]  # noqa: E731
    assert run().kind == "sync"
    # 1 is gfn BASE + 6: its group BASE .. BASE + 7 holds slot pages 0..2, of which 0 was written
    assert v.stats.faults == 1
    assert [p for p in range(20) if not s.state[p] & UNMAPPED] == [0, 1]  # 2 (fresh) stays unmapped
    assert run().kind == "done"
    # 2: fresh, its own fault; 3: group BASE + 8.. (slot pages 3..10), which maps 3 and the
    # written 4 and 8 (no fault for them); 12: the next group, which maps 12 and 16
    assert v.stats.faults == 1 + 3
    assert not (s.state[[3, 4, 8, 12, 16]] & (UNMAPPED | WP)).any()
    assert all(s.state[p] & UNMAPPED for p in (5, 6, 7, 9, 10, 11, 13))


def test_no_prefetch_into_a_slot_that_logs():
    vm = _vm("x86-nopml", logged=True, populated=True, pages=64)
    v = _run(vm, [9], [])
    assert v.stats.faults == 1 and v.stats.pushes == 1
    assert [p for p in range(64) if not vm.memslot(0).state[p] & UNMAPPED] == [9]


def test_a_translation_fault_exit_flushes_the_pml_buffer():
    """x86 PML: every VM exit flushes the vCPU's buffer into its ring (vmx_handle_exit), the EPT
    violation of a load that maps a page read-only too (it logs nothing itself). Pages 1, 2 are
    mapped (their stores are logged by the CPU), 40 not yet (fresh memory): store 1, load 40, store 2: the
    load's exit flushes 1, the exit at the end flushes 2. Two flushes; the ring holds 1, 2."""
    vm = Vm("x86-pml")
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING, 4096 * 16)
    vm.set_user_memory_region(0, 0, BASE * 4096, 64 * 4096, block_fraction=0.0, mapped_fraction=1.0)
    s = vm.memslot(0)
    s.state[32:] |= UNMAPPED | 16  # (nothing ever touched 32..63: memory.UNTOUCHED, the load maps the zero page)
    vm.set_user_memory_region(0, U.KVM_MEM_LOG_DIRTY_PAGES, BASE * 4096, 64 * 4096)
    v = _run(vm, [1, 40, 2], [1])
    assert v.stats.faults == 1 + 2  # the load's translation fault; the two stores, logged by PML
    assert v.stats.pml_flushes == 2 and v.stats.pushes == 2
    ring = v.ring
    assert [int(o) for o in ring.gfns["offset"][:2]] == [1, 2]
