"""Re-protect coalescing of KVM_RESET_DIRTY_RINGS (reference s6), masks worked by hand.

Rule: keep (cur_slot, cur_offset, mask). Same slot and 0 <= delta < 64: set bit delta.
Same slot and -64 < delta < 0 and (mask << -delta) loses no bit: cur_offset = new offset,
mask = (mask << -delta) | 1. Otherwise flush (one re-protect call) and restart with mask = 1.
"""

from __future__ import annotations

import numpy as np
import pytest

from ringenv.kvm import coalesce_reprotect

from ringenv.kvm.memory import protect_masked


def mask_pages(off, masks, span):
    """Pages one slot's re-protect calls write-protect: run the compiled re-protect kernel on a
    fresh 256-page slot and read back which pages it protected."""
    state = np.zeros(256, dtype=np.uint8)
    protect_masked(np.zeros(len(masks), np.uint32), off, masks, np.zeros(1, np.uint32), np.zeros(1, np.int64),
                   np.full(1, 256, np.int64), np.zeros(1, bool), np.zeros(1, np.uint8), state, np.zeros(1, np.uint8),
                   9, span, False, False)
    return None, np.flatnonzero(state & 1)

from ._helpers import Host

B63 = 1 << 63
ALL64 = (1 << 64) - 1


def calls(entries):
    """entries: [(slot, offset)] in ring order -> [(slot, offset, mask)] as Python ints."""
    if entries:
        s, o = zip(*entries)
    else:
        s, o = (), ()
    cs, co, cm = coalesce_reprotect(np.array(s, dtype=np.uint32), np.array(o, dtype=np.uint64))
    return [(int(a), int(b), int(c)) for a, b, c in zip(cs, co, cm)]


def test_empty_ring_makes_no_call():
    assert calls([]) == []


def test_single_entry_is_one_call_mask_1():
    assert calls([(0, 42)]) == [(0, 42, 1)]


def test_forward_within_64():
    """10 -> mask 1; 11: delta 1 -> bit 1; 13: delta 3 -> bit 3: one call (10, 0b1011)."""
    assert calls([(0, 10), (0, 11), (0, 13)]) == [(0, 10, 0b1011)]


def test_forward_delta_63_still_coalesces():
    """0 then 63: delta 63 < 64 -> bit 63: one call (0, 1 | 1 << 63)."""
    assert calls([(0, 0), (0, 63)]) == [(0, 0, 1 | B63)]


def test_forward_delta_exactly_64_flushes():
    """0 then 64: delta 64 is not < 64 -> two calls (0, 1), (64, 1)."""
    assert calls([(0, 0), (0, 64)]) == [(0, 0, 1), (0, 64, 1)]


def test_same_offset_twice_is_delta_0():
    """5, 5: delta 0 -> bit 0 again: one call (5, 1)."""
    assert calls([(0, 5), (0, 5)]) == [(0, 5, 1)]


def test_backward_move_when_no_bit_is_lost():
    """70 -> mask 1; 65: delta -5, 1 << 5 loses nothing -> offset 65, mask 0b100000 | 1."""
    assert calls([(0, 70), (0, 65)]) == [(0, 65, 0b100001)]


def test_backward_move_by_63():
    """100 then 37: delta -63 > -64, 1 << 63 keeps the bit -> (37, 1 << 63 | 1)."""
    assert calls([(0, 100), (0, 37)]) == [(0, 37, B63 | 1)]


def test_backward_delta_minus_64_flushes():
    """100 then 36: delta -64 is not > -64 -> two calls."""
    assert calls([(0, 100), (0, 36)]) == [(0, 100, 1), (0, 36, 1)]


def test_backward_move_refused_when_it_would_lose_a_bit():
    """100 -> mask 1; 163: delta 63 -> mask 1 | 1 << 63; 99: delta -1, but mask << 1 would
    push bit 63 out -> flush (100, 1 | 1 << 63), restart at (99, 1)."""
    assert calls([(0, 100), (0, 163), (0, 99)]) == [(0, 100, 1 | B63), (0, 99, 1)]


def test_backward_then_forward_in_one_mask():
    """20 -> 1; 18: delta -2 -> offset 18, mask 0b101; 25: delta 7 -> bit 7: (18, 0b10000101)."""
    assert calls([(0, 20), (0, 18), (0, 25)]) == [(0, 18, 0b10000101)]


def test_descending_run_of_64_is_one_call_with_all_bits():
    """63, 62, ..., 0: each step moves the mask down by one without losing a bit:
    one call (0, 2**64 - 1)."""
    assert calls([(0, o) for o in range(63, -1, -1)]) == [(0, 0, ALL64)]


def test_ascending_run_of_65_is_two_calls():
    """0..64: bits 0..63 at offset 0, then 64 has delta 64 -> flush: (0, all ones), (64, 1)."""
    assert calls([(0, o) for o in range(65)]) == [(0, 0, ALL64), (0, 64, 1)]


def test_gap_of_64_or_more_flushes():
    """0, 100, 1000: each gap >= 64 -> three calls."""
    assert calls([(0, 0), (0, 100), (0, 1000)]) == [(0, 0, 1), (0, 100, 1), (0, 1000, 1)]


def test_slot_change_flushes_even_when_offsets_are_adjacent():
    """(0, 5), (1, 6), (0, 7): each slot change flushes -> three calls although deltas are 1."""
    assert calls([(0, 5), (1, 6), (0, 7)]) == [(0, 5, 1), (1, 6, 1), (0, 7, 1)]


def test_as_id_in_the_slot_field_is_another_slot():
    """s1: slot = as_id << 16 | id; (0x10000 | 0, 5) is not slot 0: flush."""
    assert calls([(0, 5), (0x10000, 6)]) == [(0, 5, 1), (0x10000, 6, 1)]


# ---------------------------------------------------------------------------- mask -> pages
def test_mask_pages_span_includes_zero_bits_on_arm64():
    """s6: arm64 protects lowest..highest set bit, zero bits included: (65, 0b100001) -> 65..70;
    x86 protects exactly the set bits: 65 and 70."""
    off = np.array([65], dtype=np.int64)
    m = np.array([0b100001], dtype=np.uint64)
    assert mask_pages(off, m, True)[1].tolist() == [65, 66, 67, 68, 69, 70]
    assert mask_pages(off, m, False)[1].tolist() == [65, 70]


def test_mask_pages_span_of_a_single_high_bit():
    """(0, 1 << 63): lowest = highest = 63 -> only page 63, also with span."""
    off = np.array([0], dtype=np.int64)
    m = np.array([B63], dtype=np.uint64)
    assert mask_pages(off, m, True)[1].tolist() == [63]
    assert mask_pages(off, m, False)[1].tolist() == [63]


# ---------------------------------------------------------------------------- through the reset ioctl
@pytest.mark.parametrize("profile,pages", [("arm64-4k", 4), ("x86-nopml", 3)])
def test_reset_counts_one_reprotect_call_and_one_tlb_flush(profile, pages):
    """s6: ring [10, 11, 13] -> one call (10, 0b1011); arm64 protects 10..13 (4 pages), x86
    10, 11, 13 (3 pages). One VM-wide TLB flush for the whole reset."""
    h = Host([[10, 11, 13]], profile=profile)
    assert h.enter_and_run().kind == "done"
    st = h.vm.stats
    calls0, flush0 = st.reprotect_calls, st.tlb_flushes
    h.harvest()
    assert h.reset() == 3
    assert st.reprotect_calls - calls0 == 1
    assert st.pages_reprotected == pages
    assert st.tlb_flushes - flush0 == 1


def test_reset_counts_calls_over_all_rings():
    """s6: ring 0 [0, 64] -> 2 calls; ring 1 [200, 201] -> 1 call; one reset of both rings:
    3 calls, 4 entries, ONE TLB flush (after all rings)."""
    h = Host([[0, 64], [200, 201]])
    for i in (0, 1):
        assert h.enter(i) is None
    kinds = sorted([h.run().kind, h.run().kind])
    assert kinds == ["done", "done"]
    st = h.vm.stats
    calls0, flush0 = st.reprotect_calls, st.tlb_flushes
    h.harvest(0)
    h.harvest(1)
    assert h.reset() == 4
    assert st.reprotect_calls - calls0 == 3
    assert st.tlb_flushes - flush0 == 1


def test_reset_with_a_bogus_slot_entry_skips_it_silently():
    """s6: a bad slot in an entry is skipped silently. Userspace can write the mmapped ring:
    entry 0 (page 10) gets slot 77 (no such slot) before the harvest. Coalescing:
    (77, 10, 1) then slot 0 (11, 0b101). The reset must not raise, must count all 3 entries,
    must still re-protect 11..13, and must not protect page 10 (its entry named slot 77)."""
    h = Host([[10, 11, 13]], [[2]])
    assert h.enter_and_run().kind == "sync"
    h.vcpus[0].ring_gfns["slot"][0] = 77
    assert [s for s, _ in h.harvest_entries()] == [77, 0, 0]
    assert h.reset() == 3
    assert h.vm.stats.entries_reset == 3
    assert h.vcpus[0].ring.used == 0
    assert h.wp(11) and h.wp(12) and h.wp(13)
    assert not h.wp(10)


def test_reset_with_an_offset_past_the_slot_end_skips_it_silently():
    """s6: offset + fls(mask) >= npages -> skipped. Entry 1 (page 11) is rewritten to offset
    2**40 in a 1024-page slot: calls (0, 10, 1), (0, 2**40, 1), (0, 13, 1); the middle one is
    skipped, 10 and 13 are re-protected, page 11 stays writable; 3 entries counted."""
    h = Host([[10, 11, 13]], [[2]])
    assert h.enter_and_run().kind == "sync"
    h.vcpus[0].ring_gfns["offset"][1] = 1 << 40
    h.harvest()
    assert h.reset() == 3
    assert h.wp(10) and h.wp(13)
    assert not h.wp(11)


def test_reset_mask_running_past_the_slot_end_is_skipped_whole():
    """s6: the check is offset + fls(mask) < npages for the whole call. In a 64-page slot,
    entries 60, 63 and a forged 70 coalesce into (60, bits 0, 3, 10): 60 + 10 >= 64 -> the
    whole call is skipped, so even 60 and 63 stay writable."""
    h = Host([[60, 63, 61]], [[2]], slot_pages=64)
    assert h.enter_and_run().kind == "sync"
    h.vcpus[0].ring_gfns["offset"][2] = 70
    h.harvest()
    assert h.reset() == 3
    assert not h.wp(60) and not h.wp(63)


@pytest.mark.parametrize("profile,protected", [
    ("arm64-4k", [65, 66, 67, 68, 69, 70]),   # span of (65, 0b100001)
    ("x86-nopml", [65, 70]),                  # its set bits
])
def test_reset_reprotects_what_the_backward_moved_mask_names(profile, protected):
    """s6 end to end: writes 70, 65, 66..69 (all made writable by their faults); harvest only
    [70, 65] and reset: one call (65, 0b100001). arm64 protects 65..70, x86 65 and 70."""
    h = Host([[70, 65, 66, 67, 68, 69]], [[5]], profile=profile)
    assert h.enter_and_run().kind == "sync"
    assert h.harvest(limit=2) == [70, 65]
    assert h.reset() == 2
    assert h.vm.stats.reprotect_calls == 1
    assert [p for p in range(64, 72) if h.wp(p)] == [64] + protected + [71]


@pytest.mark.parametrize("profile,n", [("arm64-4k", 64), ("x86-nopml", 2)])
def test_reset_of_a_mask_with_bits_0_and_63(profile, n):
    """s6: harvest [0, 63] -> (0, 1 | 1 << 63): arm64 protects all 64 pages 0..63 (62 of them
    dirty and unharvested), x86 only 0 and 63."""
    h = Host([[0, 63] + list(range(1, 63))], [[63]], profile=profile)
    assert h.enter_and_run().kind == "sync"
    assert h.harvest(limit=2) == [0, 63]
    assert h.reset() == 2
    assert h.vm.stats.pages_reprotected == n
    assert sum(h.wp(p) for p in range(64)) == n


def test_reset_after_the_memslot_was_deleted_skips_its_entries():
    """s6: "a bad slot/offset in an entry is skipped silently" -- the natural way to get one:
    the memslot is deleted while its entries are still in the ring. Two slots (0 at gfn 0,
    1 at gfn 4096); the guest writes page 3 of each; slot 1 is deleted; harvest + reset must
    not raise and must count both entries; page 3 of slot 0 is protected again."""
    from ringenv.guest.trace import TraceProgram
    from ringenv.kvm import Vm
    from ringenv.kvm import uapi as U
    from ringenv.kvm.memory import WP
    from ringenv.vmm.reap import RingReader

    vm = Vm("arm64-4k")
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 4096)
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
    vm.set_user_memory_region(0, U.KVM_MEM_LOG_DIRTY_PAGES, 0, 1024 * 4096)
    vm.set_user_memory_region(1, U.KVM_MEM_LOG_DIRTY_PAGES, 4096 * 4096, 1024 * 4096)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[3, 4096 + 3]], [[]]))
    assert v.run() is None
    assert vm.run_until(1 << 40)[0].kind == "done"
    vm.set_user_memory_region(1, 0, 4096 * 4096, 0)  # delete slot 1
    slots, offs = RingReader(v.ring_gfns).reap()
    assert list(zip(slots.tolist(), offs.tolist())) == [(0, 3), (1, 3)]
    assert vm.reset_dirty_rings() == 2
    s0 = vm.slots[0]
    assert vm.state[s0.start + 3] & WP
