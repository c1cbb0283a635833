"""Kernel times and counters of the dirty-log ioctls, KVM_CLEAR_DIRTY_LOG's range checks, and
ring entries of a VM with several memslots: worked by hand from the profile's costs and the
kernel's rules (kvm-dirty-ring.md; kvm_clear_dirty_log_protect, kvm_dirty_ring_push,
kvm_reset_dirty_gfn). A mutation run found each of these unchecked."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from ringenv.guest.trace import TraceProgram
from ringenv.kvm import KvmError, Vm
from ringenv.kvm import uapi as U
from ringenv.kvm.memory import WP, offsets_bitmap
from ringenv.kvm.ring import DirtyRing

from ._helpers import FOREVER, Host


def test_a_ring_reset_costs_its_call_entries_reprotect_calls_pages_and_one_tlb_flush():
    """Writes to offsets 0, 1, 2 and 100: 4 entries; 0-2 coalesce into one re-protect call
    (arm64 protects its mask's span: 3 pages), 100 is 98 pages away (more than a 64-bit mask)
    and needs a call of its own: 2 calls, 4 pages, one VM-wide TLB flush."""
    h = Host([[0, 1, 2, 100]])
    assert h.enter_and_run().kind == "done"
    assert h.harvest() == [0, 1, 2, 100]
    c, vm = h.profile.costs, h.vm
    before = vm.stats.reprotect_calls, vm.stats.pages_reprotected, vm.stats.resets
    assert h.reset() == 4
    assert (vm.stats.reprotect_calls - before[0], vm.stats.pages_reprotected - before[1]) == (2, 4)
    assert vm.last_ioctl_ns == (c.reset_call_ns + 4 * c.reset_entry_ns + 2 * c.reprotect_call_ns
                                + int(4 * c.reprotect_page_ns) + h.profile.tlbi_broadcast_ns(1))
    assert c.reset_entry_ns > 0 and c.reprotect_call_ns > 0  # (the profile charges both)
    # a reset with nothing to reset is still a call (and counted), without a flush
    flushes = vm.stats.tlb_flushes
    assert h.reset() == 0
    assert vm.last_ioctl_ns == c.reset_call_ns and vm.stats.tlb_flushes == flushes
    assert vm.stats.resets == before[2] + 2


def test_get_dirty_log_without_manual_protect_charges_each_dirty_page_it_reprotects():
    """The classic bitmap: KVM_GET_DIRTY_LOG copies and clears the bitmap (per page of the
    slot) and re-protects each dirty page (per dirty page), then flushes the TLBs."""
    vm = Vm("arm64-4k")
    vm.set_user_memory_region(0, U.KVM_MEM_LOG_DIRTY_PAGES, 0, 1024 * 4096)
    vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[0, 1, 2, 100]], [[]]))
    assert vm.vcpus[0].run() is None
    exits = vm.run_until(vm.now + FOREVER)
    assert [e.kind for e in exits] == ["done"]
    bitmap = vm.get_dirty_log(0)
    assert bitmap[0] == 0b111 and bitmap[1] == 1 << (100 - 64)
    c = vm.profile.costs
    assert c.get_dirty_log_dirty_ns > 0
    assert vm.last_ioctl_ns == (int(c.get_dirty_log_page_ns * 1024) + int(4 * c.get_dirty_log_dirty_ns)
                                + vm.profile.tlbi_broadcast_ns(1))


def _manual(npages=1024, initially_set=False):
    vm = Vm("arm64-4k")
    flags = U.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | (U.KVM_DIRTY_LOG_INITIALLY_SET if initially_set else 0)
    vm.enable_cap(U.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags)
    vm.set_user_memory_region(0, U.KVM_MEM_LOG_DIRTY_PAGES, 0, npages * 4096)
    vm.create_vcpu(0)
    return vm


@pytest.mark.parametrize("first, num", [
    (32, 64),  # first_page not a multiple of 64
    (0, 100),  # num_pages not a multiple of 64 and not reaching the slot's end
    (960, 128),  # past the end of the slot (1024 pages)
    (1088, 0),  # first_page beyond the slot
])
def test_clear_dirty_log_ranges_the_kernel_refuses(first, num):
    vm = _manual()
    with pytest.raises(KvmError) as e:
        vm.clear_dirty_log(0, first, num, np.zeros(max(1, -(-num // 64)), dtype=np.uint64))
    assert e.value.errno == errno.EINVAL


def test_clear_dirty_log_may_end_unaligned_at_the_end_of_the_slot():
    vm = _manual(npages=1000, initially_set=True)
    vm.clear_dirty_log(0, 960, 40, offsets_bitmap(np.arange(40), 40))  # 960 + 40 = the slot's end
    assert vm.get_dirty_log(0)[-1] == 0


def test_initially_set_sets_exactly_the_slot_s_pages():
    """KVM_DIRTY_LOG_INITIALLY_SET: the bitmap starts all ones, for the slot's pages only (a
    100-page slot: 64 + 36 bits)."""
    vm = _manual(npages=100, initially_set=True)
    assert vm.get_dirty_log(0).tolist() == [(1 << 64) - 1, (1 << 36) - 1]


def test_an_entry_names_the_memslot_that_holds_the_page():
    """Two logging memslots: 0 at gfn 0 (512 pages) and 1 at gfn 0x10000 (64 pages). A write to
    gfn 0x10000 is slot 1's offset 0, and to 0x1003f its offset 63; one to gfn 511 is slot 0's
    last page."""
    vm = Vm("arm64-4k")
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 256 * 16)
    vm.set_user_memory_region(0, U.KVM_MEM_LOG_DIRTY_PAGES, 0, 512 * 4096)
    vm.set_user_memory_region(1, U.KVM_MEM_LOG_DIRTY_PAGES, 0x10000 * 4096, 64 * 4096)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[0x10000, 0x1003F, 511]], [[]]))
    assert v.run() is None
    assert [e.kind for e in vm.run_until(vm.now + FOREVER)] == ["done"]
    g = v.ring_gfns[:3]
    assert [(int(x["flags"]), int(x["slot"]), int(x["offset"])) for x in g] == [
        (U.KVM_DIRTY_GFN_F_DIRTY, 1, 0), (U.KVM_DIRTY_GFN_F_DIRTY, 1, 63), (U.KVM_DIRTY_GFN_F_DIRTY, 0, 511)]


def test_a_reset_clears_only_the_flags_of_an_entry():
    """kvm_dirty_ring_reset: the entry's flags go to 0 (kvm_dirty_gfn_set_invalid); its slot
    and offset stay in the ring."""
    h = Host([[7]], slot_id=3, base_gfn=1000, slot_pages=64)
    assert h.enter_and_run().kind == "done"
    h.harvest()
    assert h.reset() == 1
    g = h.vcpus[0].ring_gfns[0]
    assert (int(g["flags"]), int(g["slot"]), int(g["offset"])) == (0, 3, 7)


def test_a_reset_skips_an_entry_beyond_a_recreated_slot_s_end():
    """An entry for offset 512 of slot 0 (1024 pages) is harvested; slot 0 is then deleted and
    made again with 512 pages, and a slot 1 without logging follows it at gfn 512. The reset
    finds offset 512 outside slot 0 (kvm_reset_dirty_gfn: offset >= npages is skipped) and
    protects nothing: slot 1's page 0 stays writable."""
    h = Host([[512]], slot_pages=1024)
    assert h.enter_and_run().kind == "done"
    assert h.harvest() == [512]
    vm = h.vm
    vm.set_user_memory_region(0, 0, 0, 0)  # delete
    vm.set_user_memory_region(0, U.KVM_MEM_LOG_DIRTY_PAGES, 0, 512 * 4096)
    vm.set_user_memory_region(1, 0, 512 * 4096, 512 * 4096)
    s1 = next(s for s in vm.slots if s.id == 1)
    assert not vm.state[s1.start] & WP
    pages, flushes = vm.stats.pages_reprotected, vm.stats.tlb_flushes
    assert h.reset() == 1
    assert vm.stats.pages_reprotected == pages
    # kvm_vm_ioctl_reset_dirty_pages flushes when it reset entries ("if (cleared)"), whether
    # or not any page was re-protected
    assert vm.stats.tlb_flushes == flushes + 1
    assert not vm.state[s1.start] & WP


def test_dirty_ring_counts_its_pushes():
    ring = DirtyRing(256, 64)
    ring.push(0, np.arange(5))
    assert ring.pushes == 5 and ring.used == 5


def _written(vm, pages):
    """The guest writes ``pages`` (arm64 with manual protect: each write's fault logs it)."""
    vm.attach_guest(TraceProgram([list(pages)], [[]]))
    assert vm.vcpus[0].run() is None
    assert [e.kind for e in vm.run_until(vm.now + FOREVER)] == ["done"]


def test_clear_dirty_log_reprotects_only_bits_set_in_both_bitmaps():
    """kvm_clear_dirty_log_protect: mask &= atomic_long_fetch_andnot(mask, p): only the pages
    dirty in the slot's bitmap AND named by userspace are cleared and re-protected; a word with
    nothing cleared makes no call, and no call at all no TLB flush. Pages 3 and 5 written; CLEAR
    names 3, 4, 5, 70: pages 3 and 5 re-protected (x86 would do the same; arm64's span 3..5
    protects page 4 too, which is clean and already protected). Again: nothing cleared."""
    vm = _manual()
    _written(vm, [3, 5])
    c, st = vm.profile.costs, vm.stats
    calls, pages, flushes = st.reprotect_calls, st.pages_reprotected, st.tlb_flushes
    ask = offsets_bitmap(np.array([3, 4, 5, 70]), 128)
    vm.clear_dirty_log(0, 0, 128, ask)
    assert (st.reprotect_calls - calls, st.pages_reprotected - pages, st.tlb_flushes - flushes) == (1, 3, 1)
    assert vm.last_ioctl_ns == (int(c.get_dirty_log_page_ns * 128) + int(c.clear_dirty_log_page_ns * 3)
                                + vm.profile.tlbi_broadcast_ns(1))
    assert vm.get_dirty_log(0)[:2].tolist() == [0, 0]
    calls, pages, flushes = st.reprotect_calls, st.pages_reprotected, st.tlb_flushes
    vm.clear_dirty_log(0, 0, 128, ask)
    assert (st.reprotect_calls, st.pages_reprotected, st.tlb_flushes) == (calls, pages, flushes)
    assert vm.last_ioctl_ns == int(c.get_dirty_log_page_ns * 128)


def test_get_dirty_log_with_manual_protect_only_copies():
    """With MANUAL_PROTECT_ENABLE, KVM_GET_DIRTY_LOG copies the bitmap and nothing else: the
    bits stay (a second GET returns them again), the written pages stay writable, no re-protect
    call, no TLB flush; it costs the copy, per page of the slot."""
    vm = _manual()
    _written(vm, [3, 100])
    c, st = vm.profile.costs, vm.stats
    calls, flushes = st.reprotect_calls, st.tlb_flushes
    want = [1 << 3, 1 << (100 - 64)] + [0] * 14
    assert vm.get_dirty_log(0).tolist() == want
    assert vm.get_dirty_log(0).tolist() == want
    assert not vm.state[3] & WP and not vm.state[100] & WP
    assert (st.reprotect_calls, st.tlb_flushes) == (calls, flushes)
    assert vm.last_ioctl_ns == int(c.get_dirty_log_page_ns * 1024)
