"""arm64 stage-2 behaviour behind the ring (reference s6 re-protect span, s7 splitting, s3 and
s11 WITH_BITMAP / backup bitmap)."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from ringenv.config import load_host_profile
from ringenv.guest.base import NO_WRITE
from ringenv.guest.trace import TraceProgram
from ringenv.kvm import KvmError, Vm
from ringenv.kvm import uapi as U
from ringenv.kvm.memory import SPLIT_HUGE, UNMAPPED, WP
from ringenv.vmm.reap import RingReader

from ._helpers import Host, any_block_mapped, block_mapped, profile_without_split

FULL = U.KVM_EXIT_DIRTY_RING_FULL
MiB = 1 << 20


# ---------------------------------------------------------------------------- logging on / faults
def test_enabling_logging_write_protects_the_whole_slot_with_one_tlb_flush():
    """s7: enabling dirty logging write-protects the whole slot (plus a TLB flush)."""
    vm = Vm("arm64-4k")
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 4096)
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
    vm.set_user_memory_region(0, 0, 0, 256 * 4096)
    assert not (vm.state[:256] & WP).any()
    flushes = vm.stats.tlb_flushes
    vm.set_user_memory_region(0, U.KVM_MEM_LOG_DIRTY_PAGES, 0, 256 * 4096)
    assert (vm.state[:256] & WP).all()
    assert vm.stats.tlb_flushes == flushes + 1


def test_slot_without_logging_pushes_nothing():
    """s3/s7: only a logging (write-protected) slot faults on write, so only it pushes."""
    vm = Vm("arm64-4k")
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 4096)
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
    vm.set_user_memory_region(0, 0, 0, 256 * 4096)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[1, 2, 3]], [[]]))
    assert v.run() is None
    assert vm.run_until(1 << 40)[0].kind == "done"
    assert v.ring.dirty_index == 0 and v.stats.pushes == 0
    assert vm.version[1:4].tolist() == [1, 1, 1]


def test_write_fault_relaxes_exactly_one_page():
    """s7: a permission fault relaxes that one page; its neighbours stay protected."""
    h = Host([[10]])
    assert h.enter_and_run().kind == "done"
    assert not h.wp(10)
    assert h.wp(9) and h.wp(11)
    assert h.harvest() == [10]


# ---------------------------------------------------------------------------- s6 span re-protect
@pytest.mark.parametrize("profile,protected,unprotected", [
    ("arm64-4k", [0, 1, 2, 3, 4, 5], []),          # span lowest..highest set bit
    ("x86-nopml", [0, 5], [1, 2, 3, 4]),           # exactly the set bits
])
def test_reprotect_span_includes_zero_bits_on_arm64_only(profile, protected, unprotected):
    """s6: writes 0, 5, 1, 2, 3, 4 (all dirty, ring [0, 5, 1, 2, 3, 4]); harvest only the first
    two entries [0, 5] and reset: one call (0, 0b100001). arm64 write-protects pages 0..5 --
    including 1..4, dirty and NOT harvested; x86 protects only 0 and 5."""
    h = Host([[0, 5, 1, 2, 3, 4]], [[5]], profile=profile)
    assert h.enter_and_run().kind == "sync"
    assert all(not h.wp(p) for p in range(6))
    assert h.harvest(limit=2) == [0, 5]
    assert h.reset() == 2
    assert h.vm.stats.reprotect_calls == 1
    assert h.vm.stats.pages_reprotected == len(protected)
    assert [p for p in range(6) if h.wp(p)] == protected
    assert [p for p in range(6) if not h.wp(p)] == unprotected


@pytest.mark.parametrize("profile,rest", [
    ("arm64-4k", [1, 2, 3, 4, 3]),    # page 3 protected by the span: its next write pushes again
    ("x86-nopml", [1, 2, 3, 4]),      # page 3 still writable: no second entry
])
def test_span_reprotect_duplicates_an_unharvested_dirty_page(profile, rest):
    """s6: continuing the sequence above, the guest writes page 3 again. On arm64 page 3 was
    re-protected although its entry is still unharvested, so the write faults and pushes a
    second entry: the unharvested part of the ring is [1, 2, 3, 4, 3]."""
    h = Host([[0, 5, 1, 2, 3, 4, 3]], [[5]], profile=profile)
    assert h.enter_and_run().kind == "sync"
    h.harvest(limit=2)
    h.reset()
    assert h.enter_and_run().kind == "done"
    assert h.harvest() == rest
    assert h.version(3) == 2


@pytest.mark.parametrize("profile,ring1", [("arm64-4k", [1, 1]), ("x86-nopml", [1])])
def test_other_vcpus_reset_span_duplicates_interleaved_pages(profile, ring1):
    """s11 (two vCPUs on interleaved pages, each harvesting only its own ring), made
    deterministic: vCPU 1 writes page 1 and syncs (not harvested). vCPU 0 writes 0, 2, syncs,
    harvests ITS ring [0, 2] and resets: one call (0, 0b101) -> arm64 protects 0..2, page 1
    included. vCPU 1 writes page 1 again: fault, second push: back-to-back [1, 1] on arm64."""
    h = Host([[0, 2], [1, 1]], [[1], [0]], profile=profile)
    assert h.enter(1) is None
    e = h.run()
    assert (e.vcpu, e.kind) == (1, "sync")
    assert h.enter(0) is None
    e = h.run()
    assert (e.vcpu, e.kind) == (0, "sync")
    assert h.harvest(0) == [0, 2]
    assert h.reset() == 2
    assert h.enter(1) is None
    e = h.run()
    assert (e.vcpu, e.kind) == (1, "done")
    assert h.harvest(1) == ring1


def test_disjoint_halves_no_cross_vcpu_duplicates():
    """s11: with the vCPUs on disjoint halves (0..3 and 512..515; 512 pages apart, never in one
    mask) the other vCPU's reset protects nothing of ours: [512] only once."""
    h = Host([[0, 2], [512, 512]], [[1], [0]])
    assert h.enter(1) is None and h.run().kind == "sync"
    assert h.enter(0) is None and h.run().kind == "sync"
    h.harvest(0)
    h.reset()
    assert h.enter(1) is None and h.run().kind == "done"
    assert h.harvest(1) == [512]


# ---------------------------------------------------------------------------- s7 splitting
def test_lazy_split_on_first_write_fault_only():
    """s7: 1024 pages = 2 blocks of 512, all THP-backed, WITH_BITMAP, no eager split.
    Enabling logging leaves the blocks. Write 10: the first fault splits block 0 (1 split, one
    push); write 20 (same block): a plain page fault, no split; write 600: splits block 1."""
    h = Host([[10, 20, 600]], [[0, 1]], block_fraction=1.0)
    v = h.vcpus[0]
    assert h.vm.stats.splits == 0 and h.block_mapped(0) and h.block_mapped(600)
    assert h.enter_and_run().kind == "sync"
    assert (h.vm.stats.splits, v.stats.splits, v.stats.pushes, v.stats.faults) == (1, 1, 1, 1)
    assert not h.block_mapped(0) and not h.block_mapped(511) and h.block_mapped(512)
    # after the split the block is pages: only page 10 was made writable
    assert not h.wp(10) and h.wp(11) and h.wp(20)
    assert h.enter_and_run().kind == "sync"
    assert (h.vm.stats.splits, v.stats.splits, v.stats.pushes) == (1, 1, 2)
    assert h.enter_and_run().kind == "done"
    assert (h.vm.stats.splits, v.stats.splits, v.stats.pushes) == (2, 2, 3)
    assert h.harvest() == [10, 20, 600]  # one fault = one push


@pytest.mark.parametrize("eager,leaves", [(None, [(1, 1), (2, 1)]), (2 * MiB, [(1024, 0), (1024, 0)])])
def test_lazy_split_maps_only_the_faulting_page_an_eager_split_the_whole_table(eager, leaves):
    """s7: 2 THP-backed blocks, writes 10 and 11 (one sync after 10). The lazy split
    (user_mem_abort under logging forces a page: kvm_pgtable_stage2_map of one page meets the
    block, and stage2_map_walk_leaf replaces it with a new, empty table) maps page 10 only:
    leaves (1 page, 1 block); the rest of the block is mapped lazily, each page by its own
    fault. The eager split (EAGER_SPLIT_CHUNK_SIZE, kvm_pgtable_stage2_split) builds full
    tables of write-protected pages when logging is enabled: 1024 pages, no block. Either
    way page 11 is write-protected until written, and its write faults and logs once."""
    h = Host([[10, 11]], [[0]], block_fraction=1.0, eager_chunk=eager)
    v = h.vcpus[0]
    assert h.enter_and_run().kind == "sync"
    assert h.vm.leaf_mappings() == leaves[0]
    assert h.wp(11) and bool(h.vm.state[11] & UNMAPPED) == (eager is None)
    assert h.enter_and_run().kind == "done"
    assert h.vm.leaf_mappings() == leaves[1]
    assert (v.stats.faults, v.stats.pushes, h.vm.stats.splits) == (2, 2, 1 if eager is None else 2)
    assert h.harvest() == [10, 11]


def test_split_cost_is_charged_to_the_faulting_vcpu():
    """s7: the split (break-before-make + broadcast TLB invalidation) happens in the faulting
    vCPU's fault: vCPU 0's first fault costs wp_fault + split + broadcast TLBI (2 vCPUs);
    vCPU 1, faulting later in the already split block, pays only wp_fault."""
    h = Host([[10], [20]], block_fraction=1.0)
    p = h.profile
    assert h.enter(0) is None and h.run().vcpu == 0
    assert h.enter(1) is None and h.run().vcpu == 1
    s0, s1 = h.vcpus[0].stats, h.vcpus[1].stats
    assert (s0.splits, s1.splits, h.vm.stats.splits) == (1, 0, 1)
    assert s0.fault_ns == p.costs.wp_fault_ns + p.costs.split_ns + p.tlbi_broadcast_ns(2)
    assert s1.fault_ns == p.costs.wp_fault_ns


def test_without_splitting_one_write_pushes_the_whole_block_and_overflows():
    """s7: with splitting off (a HostProfile copy with split_blocks False), a write to a 2 MiB
    block dirties 512 pages at once: 512 pushes into a 256-entry ring between two entry
    checks. s3: pushes while used >= entries overwrite: 512 - 256 = 256 lost."""
    h = Host([[10]], profile=profile_without_split(), block_fraction=1.0)
    e = h.enter_and_run()
    v = h.vcpus[0]
    assert e.reason == FULL
    assert v.stats.faults == 1
    assert v.stats.pushes == 512
    assert v.ring.lost == 256


def test_without_splitting_a_big_ring_takes_the_block_without_loss():
    """Same write with a 1024-entry ring (soft limit 960): 512 entries, the block's pages, no
    loss, no full exit."""
    h = Host([[10]], profile=profile_without_split(), block_fraction=1.0, entries=1024)
    assert h.enter_and_run().kind == "done"
    assert h.vcpus[0].ring.lost == 0
    assert sorted(h.harvest()) == list(range(512))


def test_without_splitting_a_reset_of_the_block_writes_its_leaf_once_per_call():
    """s6 + s7 what-if: the block's 512 entries coalesce into 8 calls of 64 pages (masks of
    all ones); each call's range lies in the one block leaf, which the walk write-protects
    once: 8 entries write-protected in all (not 512 per page of each call)."""
    h = Host([[10]], profile=profile_without_split(), block_fraction=1.0, entries=1024)
    assert h.enter_and_run().kind == "done"
    assert len(h.harvest()) == 512
    st = h.vm.stats
    assert h.reset() == 512
    assert (st.reprotect_calls, st.pages_reprotected) == (8, 8)
    assert all(h.wp(p) for p in range(512))


@pytest.mark.parametrize("chunk", [2 * MiB, 1 << 30, 4096])
def test_eager_split_splits_every_block_when_logging_is_enabled(chunk):
    """s7: EAGER_SPLIT_CHUNK_SIZE > 0 set before memslots: enabling logging splits all blocks
    (2 here); later write faults split nothing and push one entry each."""
    h = Host([[10, 600]], block_fraction=1.0, eager_chunk=chunk)
    assert h.vm.stats.splits == 2
    assert not any_block_mapped(h.vm, h.slot.npages)
    assert h.enter_and_run().kind == "done"
    assert h.vcpus[0].stats.splits == 0 and h.vm.stats.splits == 2
    assert h.harvest() == [10, 600]


def test_eager_split_happens_when_logging_is_turned_on_not_at_slot_creation():
    """s7: the eager split runs "when logging was enabled": a slot created without logging
    keeps its blocks; setting LOG_DIRTY_PAGES later splits both."""
    vm = Vm("arm64-4k")
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 4096)
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
    vm.enable_cap(U.KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE, 2 * MiB)
    vm.set_user_memory_region(0, 0, 0, 4 * MiB, block_fraction=1.0)
    assert vm.stats.splits == 0 and block_mapped(vm, 0) and block_mapped(vm, 512)
    vm.set_user_memory_region(0, U.KVM_MEM_LOG_DIRTY_PAGES, 0, 4 * MiB, block_fraction=1.0)
    assert vm.stats.splits == 2 and not any_block_mapped(vm, 1024)


def test_no_eager_split_by_default():
    """s1/s7: EAGER_SPLIT_CHUNK_SIZE 0 (default) = split lazily: enabling logging keeps blocks."""
    h = Host([[10]], block_fraction=1.0)
    assert h.vm.stats.splits == 0
    assert h.block_mapped(0) and h.block_mapped(1023)


# ---------------------------------------------------------------------------- s11 WITHOUT WITH_BITMAP
def test_arm64_without_bitmap_reports_a_block_once_and_misses_other_writes():
    """s11: without WITH_BITMAP a ring-only slot is not logging on arm64: blocks stay (no
    split); writes to pages 10, 20, 30 of one 2 MiB block give ONE entry for the whole block.
    The other pages' writes are never named by the ring: a harvest-based copy misses them
    (their versions are 1, the copy never re-read them) -- the "lost" writes."""
    h = Host([[10, 20, 30]], with_bitmap=False, block_fraction=1.0)
    assert h.enter_and_run().kind == "done"
    assert h.vm.stats.splits == 0 and h.block_mapped(10)
    got = h.harvest()
    assert len(got) == 1
    assert 0 <= got[0] < 512  # the one entry names a page of block 0 (which one: see report)
    missed = [p for p in (10, 20, 30) if p not in got and h.version(p) == 1]
    assert len(missed) >= 2


def test_arm64_without_bitmap_reset_reprotects_the_whole_block():
    """s11 + s6: the block is one stage-2 entry: after harvest + reset it is protected again,
    the next write anywhere in it pushes one entry, and later writes in it none."""
    h = Host([[10, 20, 30, 20, 30]], [[2]], with_bitmap=False, block_fraction=1.0)
    assert h.enter_and_run().kind == "sync"
    assert len(h.harvest()) == 1
    assert h.reset() == 1
    assert h.wp(10) and h.wp(20) and h.wp(511)
    assert h.enter_and_run().kind == "done"
    assert len(h.harvest()) == 1


def test_arm64_without_bitmap_reset_writes_the_block_leaf_once():
    """s6 + s11: the reset's one call (the entry's page, mask 1) walks the stage-2 range of
    that page (stage2_wp_range) and finds one leaf, the block: ONE entry write-protected, not
    one per page of the block, and the reset's kernel time charges that one entry."""
    h = Host([[10, 20, 30, 20, 30]], [[2]], with_bitmap=False, block_fraction=1.0)
    assert h.enter_and_run().kind == "sync"
    assert len(h.harvest()) == 1
    st, c = h.vm.stats, h.profile.costs
    assert h.reset() == 1
    assert (st.reprotect_calls, st.pages_reprotected) == (1, 1)
    assert h.vm.last_ioctl_ns == (c.reset_call_ns + c.reset_entry_ns + c.reprotect_call_ns
                                  + int(c.reprotect_page_ns) + h.vm.profile.tlbi_broadcast_ns(1))
    assert all(h.wp(p) for p in range(512))  # the whole block, through its one leaf


def test_arm64_without_bitmap_page_mapped_memory_still_pushes_per_page():
    """s11 blames the BLOCK mappings that stay: where memory is mapped by 4K pages (no THP),
    each page is its own stage-2 entry, so a ring-only slot still reports each written page."""
    h = Host([[10, 20, 30]], with_bitmap=False, block_fraction=0.0)
    assert h.enter_and_run().kind == "done"
    assert h.harvest() == [10, 20, 30]


def test_arm64_with_bitmap_tracks_every_4k_page_of_a_block():
    """s11: with WITH_BITMAP only writes push and memory is tracked per 4K page: the same writes
    give 3 entries (after one lazy split)."""
    h = Host([[10, 20, 30]], with_bitmap=True, block_fraction=1.0)
    assert h.enter_and_run().kind == "done"
    assert h.harvest() == [10, 20, 30]
    assert h.vm.stats.splits == 1


def test_x86_ring_only_slot_tracks_every_page():
    """x86 has no WITH_BITMAP and needs none (real-kvm-host.md: every first write to a clean
    page is one fault and one push): 3 entries with huge pages backing the slot."""
    h = Host([[10, 20, 30]], profile="x86-nopml", block_fraction=1.0)
    assert h.enter_and_run().kind == "done"
    assert h.harvest() == [10, 20, 30]


# ---------------------------------------------------------------------------- s3 no running vCPU
def test_write_without_vcpu_goes_to_the_backup_bitmap():
    """s3: with no running vCPU (vGIC table save) the page goes to the backup bitmap
    (WITH_BITMAP), read with KVM_GET_DIRTY_LOG; vCPU writes go to the ring only."""
    h = Host([[3]])
    assert h.enter_and_run().kind == "done"
    h.vm.write_without_vcpu(np.array([7, 70]))
    bm = h.vm.get_dirty_log(0)
    assert int(bm[0]) == 1 << 7 and int(bm[1]) == 1 << (70 - 64)
    assert not bm[2:].any()
    assert h.vm.stats.backup_bitmap_pages == 2
    assert h.vm.stats.dropped_no_vcpu == 0
    assert h.harvest() == [3]  # the ring has only the vCPU's write
    assert h.version(7) == 1 and h.version(70) == 1


def test_get_dirty_log_without_manual_protect_clears_the_backup_bitmap():
    """s8: GET without manual protect copies, clears and re-protects: a second GET is empty."""
    h = Host([[]])
    h.vm.write_without_vcpu(np.array([7]))
    assert int(h.vm.get_dirty_log(0)[0]) == 1 << 7
    assert not h.vm.get_dirty_log(0).any()


def test_write_without_vcpu_and_without_bitmap_is_dropped():
    """s3/s11: arm64 ring without WITH_BITMAP: the write is logged nowhere (counted as
    dropped); the ring is untouched and GET_DIRTY_LOG is ENXIO."""
    h = Host([[]], with_bitmap=False)
    h.vm.write_without_vcpu(np.array([7, 8]))
    assert h.vm.stats.dropped_no_vcpu == 2
    assert h.vm.stats.backup_bitmap_pages == 0
    assert h.vcpus[0].ring.dirty_index == 0
    with pytest.raises(KvmError) as ei:
        h.vm.get_dirty_log(0)
    assert ei.value.errno == errno.ENXIO


# ---------------------------------------------------------------------------- s4 x s6: the retried store
@pytest.mark.parametrize("profile,pushed_again", [("arm64-4k", True), ("x86-nopml", False)])
def test_span_reprotect_of_the_pending_store_page_makes_it_push_again(profile, pushed_again):
    """s4 + s6: ring 256 (soft 192). Writes 0, 2, 3..191 (189 pages), 1: the store to page 1 is
    the 192nd push -> full exit, store pending. Harvest only [0, 2] and reset: call (0, 0b101).
    arm64 protects 0..2, so page 1 (unharvested AND pending) is protected again: the retried
    store faults and pushes 1 a second time (used 190 + 1 = 191 < 192: the vCPU goes on).
    x86 protects 0 and 2 only: the store retires without a fault."""
    h = Host([[0, 2] + list(range(3, 192)) + [1]], profile=profile)
    e = h.enter_and_run()
    assert e.reason == FULL
    assert h.ring_offsets()[-1] == 1 and h.version(1) == 0
    assert h.harvest(limit=2) == [0, 2]
    assert h.reset() == 2
    assert h.wp(1) == pushed_again
    assert h.enter_and_run().kind == "done"
    rest = h.harvest()
    assert rest == list(range(3, 192)) + ([1, 1] if pushed_again else [1])
    assert h.version(1) == 1  # the store retired exactly once


def test_retried_store_can_refill_the_ring_at_once():
    """s4 + s6 with two vCPUs: vCPU 1 has entries [0, 2] (synced, not harvested); vCPU 0 fills
    its ring with 3..193 and then page 1 (192nd push, store pending). Userspace harvests ONE
    entry of ring 0 ([3]) and all of ring 1 ([0, 2]), reset -> 3. vCPU 1's call (0, 0b101)
    protects page 1 on arm64. KVM_RUN on vCPU 0: 191 < 192, the request is dropped, the vCPU
    enters, the retried store faults and pushes 1 -> 192 again -> exit 31 before the store
    retires: KVM_RUN itself returns the full exit, the ring ends with 1, 1."""
    h = Host([list(range(3, 194)) + [1], [0, 2]], [[], [1]])
    assert h.enter(1) is None
    e = h.run()
    assert (e.vcpu, e.kind) == (1, "sync")
    assert h.enter(0) is None
    e = h.run()
    assert (e.vcpu, e.reason) == (0, FULL)
    assert h.harvest(0, limit=1) == [3]
    assert h.harvest(1) == [0, 2]
    assert h.reset() == 3
    assert h.wp(1)
    e = h.enter(0)
    assert e is not None and e.reason == FULL
    r = h.vcpus[0].ring
    assert r.used == 192
    assert h.ring_offsets(0)[-2:] == [1, 1]
    assert h.version(1) == 0  # still not retired
    h.harvest(0)
    assert h.reset() == 192
    assert h.enter_and_run(0).kind == "done"
    assert h.harvest(0) == [1]
    assert h.version(1) == 1


# ---------------------------------------------------------------------------- s3 who pushes
def test_each_vcpu_pushes_its_own_faults_to_its_own_ring():
    """s3: mark_page_dirty with a running vCPU pushes to THAT vCPU's ring."""
    h = Host([[1, 2], [3, 4]])
    assert h.enter(0) is None and h.enter(1) is None
    assert sorted([h.run().kind, h.run().kind]) == ["done", "done"]
    assert h.harvest(0) == [1, 2]
    assert h.harvest(1) == [3, 4]


def test_a_page_dirtied_by_one_vcpu_is_not_pushed_by_another():
    """s3: write protection de-duplicates across vCPUs too: vCPU 0 writes 7 (fault, push to
    ring 0); vCPU 1 then writes 7: already writable, no fault, ring 1 stays empty."""
    h = Host([[7], [7]])
    assert h.enter(0) is None and h.run().vcpu == 0
    assert h.enter(1) is None and h.run().vcpu == 1
    assert h.harvest(0) == [7]
    assert h.harvest(1) == []
    assert h.version(7) == 2


def test_clear_dirty_log_costs_the_pages_it_reprotects_plus_a_bitmap_walk():
    """KVM_CLEAR_DIRTY_LOG walks the range's bitmap (cheap, per page) and re-protects only the
    pages whose bit is set: clearing one dirty page of a 1 GiB range must not cost 262144
    re-protects."""
    from ringenv.kvm import Vm, uapi
    from ringenv.kvm.memory import offsets_bitmap

    vm = Vm("arm64-4k")
    vm.enable_cap(uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                  uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | uapi.KVM_DIRTY_LOG_INITIALLY_SET)
    vm.set_user_memory_region(0, uapi.KVM_MEM_LOG_DIRTY_PAGES, 0, 1 << 30)
    vm.create_vcpu(0)
    n = 1 << 18
    c = vm.profile.costs
    vm.clear_dirty_log(0, 0, n, offsets_bitmap(np.array([5]), n))
    one = vm.last_ioctl_ns
    assert one == (int(c.get_dirty_log_page_ns * n) + int(c.clear_dirty_log_page_ns * 1)
                   + vm.profile.tlbi_broadcast_ns(1))
    vm.clear_dirty_log(0, 0, n, offsets_bitmap(np.arange(64, 64 + 4096), n))
    assert vm.last_ioctl_ns == int(c.get_dirty_log_page_ns * n) + int(c.clear_dirty_log_page_ns * 4096) \
        + vm.profile.tlbi_broadcast_ns(1)


def test_x86_pml_logs_bitmap_mode_writes_without_faults():
    """With PML the CPU logs dirty GPAs also when KVM uses the dirty bitmap: a logged page costs
    a few ns plus its share of a buffer flush, not a 2.3 us write-protect fault."""
    from ringenv.guest.trace import TraceProgram
    from ringenv.kvm import Vm, uapi

    def fault_ns(profile):
        vm = Vm(profile)
        vm.set_user_memory_region(0, uapi.KVM_MEM_LOG_DIRTY_PAGES, 0, 4 << 20)
        v = vm.create_vcpu(0)
        vm.attach_guest(TraceProgram([list(range(512))], [[]]))
        v.run()
        vm.run_until(1 << 40)
        assert v.stats.faults == 512
        return v.stats.fault_ns / 512

    c = Vm("x86-pml").profile.costs
    assert fault_ns("x86-pml") == pytest.approx(c.dirty_write_ns + c.pml_flush_entry_ns + c.pml_full_exit_ns / 512,
                                                abs=1)
    assert fault_ns("x86-nopml") == Vm("x86-nopml").profile.costs.wp_fault_ns


@pytest.mark.parametrize("npages,count", [(1000, 0), (1000, 7), (130, 129), (1 << 20, 40), (1 << 20, 400_000)])
def test_bitmap_offsets_round_trip_sparse_and_dense(npages, count):
    from ringenv.kvm.memory import bitmap_offsets, offsets_bitmap

    rng = np.random.default_rng(npages + count)
    off = np.unique(rng.integers(0, npages, count)).astype(np.int64)
    got = bitmap_offsets(offsets_bitmap(off, npages), npages)
    assert got.dtype == np.int64 and np.array_equal(got, off)


# ---------------------------------------------------------------------------- no memslot
@pytest.mark.parametrize("profile,entries", [("arm64-4k", 256), ("x86-nopml", 256), ("x86-pml", 1024)])
@pytest.mark.parametrize("offset", [1024, 5000, -1])
def test_write_to_a_gfn_no_memslot_maps_is_an_mmio_exit(offset, profile, entries):
    """A guest store to a gfn outside every memslot (slot: gfns 4096..5119) is an access to
    an unbacked guest-physical address: KVM_RUN returns KVM_EXIT_MMIO (x86: the EPT violation
    finds no memslot, the access is emulated and exits as MMIO; arm64: kvm_handle_guest_abort
    -> io_mem_abort), as for a write to a KVM_MEM_READONLY slot. The stores before it are done
    (pushed, written), the vCPU is out of the guest at the store's time, the store itself
    completed as MMIO (nothing written, mapped or logged, no fault): the next KVM_RUN goes on
    after it."""
    h = Host([[3, 5, offset, 6]], base_gfn=4096, slot_pages=1024, profile=profile, entries=entries)
    v = h.vcpus[0]
    assert h.enter(0) is None
    e = h.run()
    assert (e.reason, e.kind, e.vcpu) == (U.KVM_EXIT_MMIO, "mmio", 0)
    assert not v.in_guest and h.vm.now == e.time_ns == 2 * 5  # the third store, 5 ns apart
    assert h.ring_offsets() == [3, 5] and v.stats.pushes == 2 and v.stats.faults == 2
    assert h.version(3) == 1 and h.version(5) == 1 and int(h.vm.version.sum()) == 2
    assert v.pending_store == NO_WRITE and v.stats.exits == 1
    assert h.enter_and_run().kind == "done"
    assert h.harvest_entries() == [(0, 3), (0, 5), (0, 6)]
    assert int(h.vm.version.sum()) == 3


def test_a_read_of_a_gfn_no_memslot_maps_is_an_mmio_exit_too():
    """A load from an unbacked guest-physical address exits as MMIO as well (userspace
    supplies the data): the walk stops there, nothing is mapped or logged."""
    vm = _vm()
    vm.set_user_memory_region(0, LOG, 0, 64 * 4096)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[3, 900, 4]], [[]], reads=[[1]]))
    assert _run(vm, v).kind == "mmio"
    assert v.ring.dirty_index == 1
    assert _run(vm, v).kind == "done"
    assert v.ring.gfns["offset"][:2].tolist() == [3, 4]


def test_the_exit_after_a_write_no_memslot_maps_comes_at_reentry():
    """A sync point on the unbacked store is not lost: MMIO exit, then at re-entry the sync,
    then done (the same as after a write to a read-only slot)."""
    h = Host([[5, 2000, 6]], [[1]], slot_pages=64)
    assert [h.enter_and_run().kind for _ in range(3)] == ["mmio", "sync", "done"]
    assert h.harvest() == [5, 6]


def test_a_store_retried_after_a_full_exit_whose_memslot_was_deleted_exits_as_mmio():
    """A store that filled the ring re-executes at the next KVM_RUN; if its memslot was deleted
    meanwhile, no memslot maps its gfn any more: it exits as MMIO at once and completes there
    (nothing written); the guest goes on after it at the next KVM_RUN."""
    h = Host([list(range(193))], slot_pages=1024)
    v = h.vcpus[0]
    assert h.enter_and_run().kind == "full"
    assert v.pending_store == 191
    h.harvest(), h.reset()
    h.vm.set_user_memory_region(0, 0, 0, 0)  # delete the slot
    e = h.enter(0)
    assert (e.reason, e.kind) == (U.KVM_EXIT_MMIO, "mmio")
    assert not v.in_guest and v.pending_store == NO_WRITE
    h.vm.set_user_memory_region(0, LOG, 0, 1024 * 4096)
    h.slot = h.vm.slots[0]
    assert h.enter_and_run().kind == "done"
    assert h.harvest() == [192]
    assert h.version(191) == 0 and h.version(192) == 1


def test_a_write_that_a_later_memslot_move_maps_is_no_fault():
    """The guest syncs (exits) after writing page 5 of a 64-page slot; userspace moves the slot
    up by 64 pages; the guest then writes gfn 64 + 6, which only the moved slot maps. The walk
    stops at the sync, so that write is only looked up after the move: no MMIO exit, pushed as
    offset 6 of the slot (as the real kernel does: tests/realkvm/test_realkvm_limits.py)."""
    h = Host([[5, 64 + 6]], [[0]], slot_id=1, slot_pages=64)
    assert h.enter_and_run().kind == "sync"
    h.vm.set_user_memory_region(1, LOG, 64 * 4096, 64 * 4096)
    assert h.enter_and_run().kind == "done"
    assert h.harvest_entries() == [(1, 5), (1, 6)]


def test_a_full_exit_before_a_write_outside_every_memslot_comes_first():
    """192 pushes fill a 256-entry ring (soft limit 192): the vCPU exits before its next store,
    which no memslot maps, is reached: a full exit, no MMIO exit."""
    h = Host([list(range(192)) + [5000]], slot_pages=1024)
    assert h.enter_and_run().kind == "full"
    assert len(h.harvest()) == 192


# ---------------------------------------------------------------------------- a slot that is not dirty-tracked
LOG, RO = U.KVM_MEM_LOG_DIRTY_PAGES, U.KVM_MEM_READONLY
ACQ, PLAIN, BITMAP = U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, U.KVM_CAP_DIRTY_LOG_RING, U.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP
MP2, EAGER = U.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, U.KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE
ENA, INIT = U.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, U.KVM_DIRTY_LOG_INITIALLY_SET
FOREVER = 1 << 62


def _vm(profile="arm64-4k", entries=256, bitmap=None, mp2=None, eager=None):
    """A VM with a ring of ``entries`` (0: no ring, the dirty bitmap), WITH_BITMAP where the
    host offers it unless ``bitmap`` says otherwise, and the given caps; no memslot yet."""
    vm = Vm(profile)
    if entries:
        vm.enable_cap(ACQ if vm.profile.acq_rel_only else PLAIN, entries * 16)
        if vm.profile.with_bitmap_supported if bitmap is None else bitmap:
            vm.enable_cap(BITMAP)
    if mp2 is not None:
        vm.enable_cap(MP2, mp2)
    if eager is not None:
        vm.enable_cap(EAGER, eager)
    return vm


def _run(vm, v):
    """KVM_RUN on v, then let time pass to its next exit."""
    e = v.run()
    return e if e is not None else vm.run_until(FOREVER)[0]


@pytest.mark.parametrize("profile,entries", [("arm64-4k", 256), ("x86-nopml", 256), ("x86-pml", 1024)])
def test_write_fault_after_logging_off_pushes_nothing(profile, entries):
    """mark_page_dirty_in_slot logs only in a slot with KVM_MEM_LOG_DIRTY_PAGES
    (kvm_slot_dirty_track_enabled). Page 7 is written (one push), logging is turned off, then
    the entry is harvested and reset: kvm_reset_dirty_gfn re-protects page 7 whatever the
    slot's flags. The next write to 7 faults (the fault is paid) and makes the page writable,
    but pushes nothing."""
    h = Host([[7, 7]], [[0]], profile=profile, entries=entries)
    v = h.vcpus[0]
    assert h.enter_and_run().kind == "sync"
    assert v.stats.pushes == 1
    h.vm.set_user_memory_region(0, 0, 0, 1024 * h.profile.page_size)
    assert h.harvest() == [7]
    assert h.reset() == 1
    assert h.wp(7)
    faults = v.stats.faults
    assert h.enter_and_run().kind == "done"
    assert v.stats.pushes == 1 and v.ring.dirty_index == 1
    assert v.stats.faults == faults + 1
    assert not h.wp(7) and h.version(7) == 2


def test_write_fault_in_a_slot_recreated_without_logging_pushes_nothing():
    """The entry (slot 0, offset 7) outlives its memslot: slot 0 is deleted and created again
    without logging; the reset re-protects offset 7 of the new slot 0 (the entry names the
    slot id), and the write that then faults on it pushes nothing."""
    h = Host([[7, 7]], [[0]])
    vm, v = h.vm, h.vcpus[0]
    assert h.enter_and_run().kind == "sync"
    vm.set_user_memory_region(0, 0, 0, 0)
    vm.set_user_memory_region(0, 0, 0, 1024 * 4096)
    assert h.harvest() == [7]
    assert h.reset() == 1
    s = vm.slots[0]
    assert vm.state[s.start + 7] & WP
    assert h.enter_and_run().kind == "done"
    assert v.stats.pushes == 1 and v.stats.faults == 2
    assert not vm.state[s.start + 7] & WP and int(vm.version[s.start + 7]) == 1


# ---------------------------------------------------------------------------- KVM_MEM_READONLY
@pytest.mark.parametrize("profile", ["arm64-4k", "x86-nopml"])
def test_write_to_a_read_only_slot_is_an_mmio_exit(profile):
    """api.rst: writes to a KVM_MEM_READONLY slot are posted to userspace as KVM_EXIT_MMIO
    (arm64 kvm_handle_guest_abort: a write fault on a slot that is not writable goes to
    io_mem_abort before user_mem_abort). Nothing is mapped, logged or written; the store is
    consumed (it completes as an MMIO write at re-entry). RAM slot 0 (logging) at gfn 0, a
    ROM slot 1 with LOG_DIRTY_PAGES (never logging) at gfn 1024. Writes: RAM 3, ROM 1029,
    RAM 4: push 3, exit MMIO, then push 4 and the end."""
    vm = _vm(profile)
    ps = vm.page_size
    vm.set_user_memory_region(0, LOG, 0, 1024 * ps)
    vm.set_user_memory_region(1, LOG | RO, 1024 * ps, 64 * ps)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[3, 1029, 4]], [[]]))
    e = _run(vm, v)
    assert (e.reason, e.kind) == (U.KVM_EXIT_MMIO, "mmio")
    assert (v.stats.pushes, v.stats.faults) == (1, 1)
    rom = vm.slots[1]
    assert int(vm.version[rom.start + 5]) == 0
    assert _run(vm, v).kind == "done"
    assert v.stats.pushes == 2
    assert v.ring.gfns["offset"][:2].tolist() == [3, 4]
    if vm.with_bitmap:
        assert not vm.get_dirty_log(1).any()


def test_the_exit_after_a_read_only_write_comes_at_reentry():
    """The trace's sync after the ROM write is not lost: MMIO exit, then the sync, then done."""
    vm = _vm(entries=0)
    vm.set_user_memory_region(0, RO, 0, 64 * 4096)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[5]], [[0]]))
    assert [_run(vm, v).kind for _ in range(3)] == ["mmio", "sync", "done"]
    assert int(vm.version[5]) == 0


def test_read_only_slot_is_never_logging_even_ring_only_on_arm64():
    """memslot_is_logging() is false for a read-only slot and its mappings are never writable,
    so mark_page_dirty_in_slot is never reached: on arm64 without WITH_BITMAP, where a read
    of an unmapped page of a LOG_DIRTY_PAGES slot pushes (reference s11), reads of the ROM
    push nothing (each is a translation fault that maps the ROM read-only)."""
    vm = _vm(bitmap=False)
    vm.set_user_memory_region(0, LOG | RO, 0, 1024 * 4096, block_fraction=1.0, mapped_fraction=0.0)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[3, 600]], [[]], reads=[[0, 1]]))
    assert _run(vm, v).kind == "done"
    assert v.stats.pushes == 0 and v.stats.faults == 2


# ---------------------------------------------------------------------------- KVM_MR_MOVE
def test_move_keeps_the_memory_and_the_dirty_bitmap_and_unmaps_stage2():
    """KVM_MR_MOVE (same size, new guest_phys_addr): kvm_invalidate_memslot unmaps the old
    range (kvm_arch_flush_shadow_memslot); logging stays on, so kvm_prepare_memory_region keeps
    the dirty bitmap; the memory is the same (page versions move with it). Bitmap mode, 128
    pages at gfn 0: the guest writes 5; the slot moves to gfn 4096: bit 5 is still set and no
    page is mapped; the write to gfn 4096 + 6 takes a translation fault, which logs it."""
    vm = _vm(entries=0)
    vm.set_user_memory_region(0, LOG, 0, 128 * 4096)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[5]], [[0]]))
    assert _run(vm, v).kind == "sync"
    vm.set_user_memory_region(0, LOG, 4096 * 4096, 128 * 4096)
    s = vm.slots[0]
    assert s.base_gfn == 4096
    assert (vm.state[s.start: s.start + 128] & UNMAPPED).all()
    assert int(vm.version[s.start + 5]) == 1
    vm.attach_guest(TraceProgram([[4096 + 6]], [[]]))  # the guest's accesses after the move
    assert _run(vm, v).kind == "done"
    bm = vm.get_dirty_log(0)
    assert int(bm[0]) == (1 << 5) | (1 << 6) and not bm[1]
    assert int(vm.version[s.start + 6]) == 1


def test_move_entries_pushed_before_it_reprotect_the_moved_slot():
    """A ring entry is (slot id, offset): kvm_reset_dirty_gfn looks the slot up by id, so an
    entry pushed before the move re-protects that offset of the moved slot. Page 5 is
    written (entry 1), the slot moves, page 5 at its new gfn is written (translation fault:
    entry 2); both are harvested and reset: page 5 is protected again and its next write
    pushes a third entry."""
    vm = _vm()
    vm.set_user_memory_region(0, LOG, 0, 128 * 4096)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[5]], [[0]]))
    assert _run(vm, v).kind == "sync"
    vm.set_user_memory_region(0, LOG, 4096 * 4096, 128 * 4096)
    vm.attach_guest(TraceProgram([[4096 + 5, 4096 + 5]], [[0]]))  # the guest's accesses after the move
    assert _run(vm, v).kind == "sync"
    from ringenv.vmm.reap import RingReader
    slots, offs = RingReader(v.ring_gfns).reap()
    assert list(zip(slots.tolist(), offs.tolist())) == [(0, 5), (0, 5)]
    assert vm.reset_dirty_rings() == 2
    s = vm.slots[0]
    assert vm.state[s.start + 5] & WP
    assert _run(vm, v).kind == "done"
    assert v.stats.pushes == 3


def test_move_can_turn_logging_on_or_off():
    """A move may change KVM_MEM_LOG_DIRTY_PAGES (only READONLY is fixed): off -> on allocates
    the bitmap and logs the move's first writes; on -> off drops the bitmap (ENOENT)."""
    vm = _vm(entries=0)
    vm.set_user_memory_region(0, 0, 0, 128 * 4096)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[4096 + 9]], [[]]))
    vm.set_user_memory_region(0, LOG, 4096 * 4096, 128 * 4096)
    assert _run(vm, v).kind == "done"
    assert int(vm.get_dirty_log(0)[0]) == 1 << 9
    vm.set_user_memory_region(0, 0, 0, 128 * 4096)
    with pytest.raises(KvmError) as ei:
        vm.get_dirty_log(0)
    assert ei.value.errno == errno.ENOENT


def test_move_rules():
    """kvm_set_memory_region: an existing slot keeps its size and READONLY (EINVAL); a move
    onto another slot's range is EEXIST; the same flags at the same address change nothing."""
    vm = _vm(entries=0)
    vm.set_user_memory_region(0, LOG, 0, 128 * 4096)
    vm.set_user_memory_region(1, 0, 1024 * 4096, 128 * 4096)
    for args, err in [((0, LOG, 0, 256 * 4096), errno.EINVAL), ((0, LOG | RO, 4096 * 4096, 128 * 4096), errno.EINVAL),
                      ((0, LOG, 1000 * 4096, 128 * 4096), errno.EEXIST)]:
        with pytest.raises(KvmError) as ei:
            vm.set_user_memory_region(*args)
        assert ei.value.errno == err
    assert [(s.id, s.base_gfn) for s in vm.slots] == [(0, 0), (1, 1024)]
    vm.set_user_memory_region(0, LOG, 0, 128 * 4096)
    vm.set_user_memory_region(0, LOG, 64 * 4096, 128 * 4096)  # overlapping its own old range: fine
    assert vm.slots[0].base_gfn == 64


def test_move_with_eager_split_splits_nothing_and_a_logging_fault_maps_a_page():
    """arm64 commit of a move with logging: kvm_mmu_wp_memory_region + kvm_mmu_split_memory_region
    over a range where nothing is mapped: no split. The write then takes a translation fault,
    which under logging maps one page (force_pte): no split either, one push. A move without
    logging (by whole blocks: its huge pages still line up, test_block_alignment.py): a write
    maps its whole huge page (a block) again."""
    vm = _vm(eager=2 * MiB)
    vm.set_user_memory_region(0, 0, 0, 1024 * 4096, block_fraction=1.0)
    vm.set_user_memory_region(1, 0, 8192 * 4096, 1024 * 4096, block_fraction=1.0)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[4096 + 10, 9216 + 10]], [[]]))
    vm.set_user_memory_region(0, LOG, 4096 * 4096, 1024 * 4096)
    vm.set_user_memory_region(1, 0, 9216 * 4096, 1024 * 4096)
    assert vm.stats.splits == 0
    assert _run(vm, v).kind == "done"
    assert (vm.stats.splits, v.stats.splits, v.stats.pushes) == (0, 0, 1)
    s0, s1 = vm.slots
    assert not block_mapped(vm, s0.start + 10)
    assert block_mapped(vm, s1.start + 10)
    assert not (vm.state[s1.start: s1.start + 512] & UNMAPPED).any()
    assert (vm.state[s1.start + 512: s1.start + 1024] & UNMAPPED).all()



def _logged_after_move(vm, v, entries, offset):
    """Was ``offset`` of slot 0 logged (its ring entry, or its bit in the dirty bitmap)?"""
    if entries:
        r = v.ring
        return (0, offset) in list(zip(r.gfns["slot"][: r.dirty_index].tolist(),
                                       r.gfns["offset"][: r.dirty_index].tolist()))
    return bool(int(vm.get_dirty_log(0)[offset // 64]) >> (offset % 64) & 1)


@pytest.mark.parametrize("before,after", [(0, LOG), (LOG, 0), (LOG, LOG)])
@pytest.mark.parametrize("profile,entries", [("x86-nopml", 0), ("x86-nopml", 256), ("x86-pml", 0),
                                             ("x86-pml", 1024)])
def test_x86_move_costs_no_slot_walk(profile, entries, before, after):
    """KVM_MR_MOVE on x86: kvm_invalidate_memslot zaps the old range at stage 2
    (kvm_arch_flush_shadow_memslot), so nothing is mapped in the new range;
    kvm_mmu_slot_apply_flags returns for a move (change != KVM_MR_FLAGS_ONLY) before any walk:
    nothing to write-protect (logging on), nothing to recover or to clear (logging off), no TLB
    flush. The ioctl's kernel time is the zap's alone (the walk of the old range, priced per
    page as the write-protect walk, and one TLB flush), whether the move turns logging on, off
    or keeps it. The first write after the move is logged if the moved slot logs (its
    translation fault), not otherwise."""
    vm = _vm(profile, entries=entries)
    vm.set_user_memory_region(0, before, 0, 1024 * 4096, block_fraction=1.0)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[5, 4096 + 7]], [[0]]))
    assert _run(vm, v).kind == "sync"
    flushes, kernel = vm.stats.tlb_flushes, vm.stats.kernel_ns
    vm.set_user_memory_region(0, after, 4096 * 4096, 1024 * 4096)
    zap = int(vm.profile.costs.protect_page_ns * 1024) + vm._tlbi_ns
    assert (vm.last_ioctl_ns, vm.stats.tlb_flushes, vm.stats.kernel_ns) == (zap, flushes + 1, kernel + zap)
    assert _run(vm, v).kind == "done"
    if after:
        assert _logged_after_move(vm, v, entries, 7)
    else:
        assert v.stats.pushes == (1 if before and entries else 0)


@pytest.mark.parametrize("profile,flushes", [("arm64-4k", 1), ("x86-nopml", 0), ("x86-pml", 0)])
def test_creating_a_logging_slot_over_untouched_memory_walks_nothing(profile, flushes):
    """KVM_MR_CREATE with LOG_DIRTY_PAGES: nothing is mapped in a new slot. x86
    kvm_mmu_slot_apply_flags returns for anything but KVM_MR_FLAGS_ONLY: no walk, no flush, no
    eager split (the TDP MMU and eager_page_split on, 2 MiB huge pages behind it); arm64's
    commit write-protects an empty range (one TLB flush) and splits nothing. The first write
    still faults and is logged (the mapping fault of a logging slot)."""
    prof = load_host_profile(profile)
    if prof.arch == "x86":
        prof = prof.model_copy(update={"tdp_mmu": True, "eager_page_split": True})
    vm = Vm(prof)
    vm.enable_cap(ACQ if prof.acq_rel_only else PLAIN, 1024 * 16)
    if prof.with_bitmap_supported:
        vm.enable_cap(BITMAP)
    kernel = vm.stats.kernel_ns
    vm.set_user_memory_region(0, LOG, 0, 1024 * 4096, block_fraction=1.0, mapped_fraction=0.0)
    assert vm.last_ioctl_ns == flushes * vm.profile.tlbi_broadcast_ns(0)
    assert (vm.stats.tlb_flushes, vm.stats.splits, vm.stats.kernel_ns - kernel) == (flushes, 0, vm.last_ioctl_ns)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[5]], [[]]))
    assert _run(vm, v).kind == "done"
    assert v.stats.pushes == 1 and int(v.ring.gfns["offset"][0]) == 5


@pytest.mark.parametrize("after", [LOG, 0])
def test_arm64_move_with_logging_flushes_tlbs_and_walks_nothing(after):
    """arm64 kvm_arch_commit_memory_region for a move with logging: kvm_mmu_wp_memory_region
    walks the new range, where nothing is mapped (the old range was unmapped by
    kvm_arch_flush_shadow_memslot), and flushes the TLBs (kvm_flush_remote_tlbs_memslot); the
    split walk finds nothing either. The commit costs one TLB flush, no per-page walk; without
    logging it does nothing at stage 2. Before it the zap of the old range: its walk (per page,
    as the write-protect walk) and one TLB flush."""
    vm = _vm(eager=2 * MiB)
    vm.set_user_memory_region(0, LOG, 0, 1024 * 4096, block_fraction=1.0)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[5, 4096 + 7]], [[0]]))
    assert _run(vm, v).kind == "sync"
    flushes, splits = vm.stats.tlb_flushes, vm.stats.splits
    vm.set_user_memory_region(0, after, 4096 * 4096, 1024 * 4096)
    zap = int(vm.profile.costs.protect_page_ns * 1024) + vm._tlbi_ns
    assert vm.last_ioctl_ns == zap + (vm._tlbi_ns if after else 0)
    assert vm.stats.tlb_flushes == flushes + (2 if after else 1) and vm.stats.splits == splits
    assert _run(vm, v).kind == "done"
    assert v.stats.pushes == (2 if after else 1)


@pytest.mark.parametrize("profile,again", [("arm64-4k", 0), ("x86-nopml", 1)])
def test_deleting_a_slot_zaps_every_slot_on_x86_only(profile, again):
    """x86 kvm_arch_flush_shadow_memslot with KVM_X86_QUIRK_SLOT_ZAP_ALL (the default) zaps
    every mapping of the VM (kvm_mmu_zap_all_fast), arm64 only the deleted slot's range. Page 3
    of slot 0 is written (one push, now writable), slot 1 is deleted, page 3 is written again:
    on x86 it faults (its translation is gone) and, the slot logging, the new writable mapping
    logs it once more; on arm64 it is still mapped writable: no fault, no push. The walk is
    priced per page of what is zapped (both slots on x86), with one TLB flush."""
    vm = _vm(profile)
    vm.set_user_memory_region(0, LOG, 0, 1024 * 4096)
    vm.set_user_memory_region(1, LOG, 4096 * 4096, 1024 * 4096)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[3, 3]], [[0]]))
    assert _run(vm, v).kind == "sync"
    assert (v.stats.faults, v.stats.pushes) == (1, 1)
    vm.set_user_memory_region(1, 0, 4096 * 4096, 0)
    c = vm.profile.costs
    assert vm.last_ioctl_ns == int(c.protect_page_ns * 1024 * (1 + again)) + vm._tlbi_ns
    assert _run(vm, v).kind == "done"
    assert (v.stats.faults, v.stats.pushes) == (1 + again, 1 + again)
    r = v.ring
    assert list(zip(r.gfns["slot"][: r.dirty_index].tolist(), r.gfns["offset"][: r.dirty_index].tolist())) \
        == [(0, 3)] * (1 + again)


@pytest.mark.parametrize("profile", ["arm64-4k", "x86-nopml", "x86-pml"])
def test_delete_reports_its_own_kernel_time(profile):
    """Vm.last_ioctl_ns is the kernel time of the last ioctl: after enabling logging (a walk of
    the slot and a TLB flush), deleting a slot reports its own: the zap
    (kvm_arch_flush_shadow_memslot: the walk of its 1024 pages, priced as the write-protect
    walk, and one TLB flush), counted in the VM's kernel time."""
    vm = _vm(profile, entries=0)
    vm.set_user_memory_region(0, 0, 0, 1024 * 4096)
    vm.create_vcpu(0)
    vm.set_user_memory_region(0, LOG, 0, 1024 * 4096)
    assert vm.last_ioctl_ns > 0
    flushes, kernel = vm.stats.tlb_flushes, vm.stats.kernel_ns
    vm.set_user_memory_region(0, 0, 0, 0)
    zap = int(vm.profile.costs.protect_page_ns * 1024) + vm._tlbi_ns
    assert vm.last_ioctl_ns == zap and not vm.slots
    assert (vm.stats.tlb_flushes, vm.stats.kernel_ns) == (flushes + 1, kernel + zap)


# ---------------------------------------------------------------------------- INITIALLY_SET and stage 2
def test_clear_with_initially_set_eager_splits_the_cleared_span():
    """arm64 kvm_arch_mmu_enable_log_dirty_pt_masked: with manual protect and INITIALLY_SET
    (kvm_dirty_log_manual_protect_and_init_set) it write-protects the span and then splits its
    huge pages (kvm_mmu_split_huge_pages; a no-op with EAGER_SPLIT_CHUNK_SIZE 0). Turning
    logging on split and protected nothing (INITIALLY_SET). CLEAR of pages 0..63 splits block
    0 and leaves block 1; all of block 0 is protected (its leaf was protected, then split)."""
    vm = _vm(entries=0, mp2=ENA | INIT, eager=2 * MiB)
    vm.set_user_memory_region(0, LOG, 0, 1024 * 4096, block_fraction=1.0)
    vm.create_vcpu(0)
    assert vm.stats.splits == 0 and not (vm.state & WP).any()
    vm.clear_dirty_log(0, 0, 64, np.array([~np.uint64(0)], dtype=np.uint64))
    assert vm.stats.splits == 1
    assert not block_mapped(vm, 0) and block_mapped(vm, 512)
    assert (vm.state[:512] & WP).all() and not (vm.state[512:] & WP).any()


def test_clear_of_part_of_a_block_write_protects_the_whole_block_leaf():
    """kvm_stage2_wp_range over pages 0..63 of a 2 MiB block mapping updates that one leaf
    entry (the walker visits the block and changes its permission): all 512 pages are
    protected. Without eager split the block stays; the write to page 100 faults, splits it
    lazily and logs page 100 (its bit was never cleared: INITIALLY_SET)."""
    vm = _vm(entries=0, mp2=ENA | INIT)
    vm.set_user_memory_region(0, LOG, 0, 1024 * 4096, block_fraction=1.0)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[100]], [[]]))
    vm.clear_dirty_log(0, 0, 64, np.array([~np.uint64(0)], dtype=np.uint64))
    assert (vm.state[:512] & WP).all() and not (vm.state[512:] & WP).any()
    assert block_mapped(vm, 0) and vm.stats.splits == 0
    assert _run(vm, v).kind == "done"
    assert (v.stats.faults, v.stats.splits) == (1, 1)
    bm = vm.get_dirty_log(0)
    assert int(bm[0]) == 0 and int(bm[1]) == ~np.uint64(0)


@pytest.mark.parametrize("profile", ["arm64-4k", "x86-nopml"])
def test_initially_set_with_a_ring_and_no_bitmap_protects_nothing(profile):
    """kvm_arch_commit_memory_region (arm64) / kvm_mmu_slot_apply_flags (x86) return before
    write-protecting when kvm_dirty_log_manual_protect_and_init_set(), whether the VM logs
    into a bitmap or a ring: with a ring and no bitmap, turning logging on protects nothing
    and the guest's write to a mapped page pushes nothing."""
    vm = _vm(profile, bitmap=False, mp2=ENA | INIT)
    vm.set_user_memory_region(0, 0, 0, 64 * 4096)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[5]], [[]]))
    vm.set_user_memory_region(0, LOG, 0, 64 * 4096)
    assert not (vm.state & WP).any()
    assert _run(vm, v).kind == "done"
    assert v.stats.pushes == 0 and v.stats.faults == 0


@pytest.mark.parametrize("profile", ["arm64-4k", "x86-nopml"])
def test_initially_set_unmapped_page_is_logged_by_the_fault_that_maps_it(profile):
    """The fault that maps a page writable in a dirty-tracked slot logs it (user_mem_abort /
    make_spte -> mark_page_dirty_in_slot), INITIALLY_SET or not: the same ring with untouched
    memory (mapped_fraction 0): the write's translation fault pushes."""
    vm = _vm(profile, bitmap=False, mp2=ENA | INIT)
    vm.set_user_memory_region(0, 0, 0, 64 * 4096, mapped_fraction=0.0)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[5, 5]], [[]]))
    vm.set_user_memory_region(0, LOG, 0, 64 * 4096)
    assert _run(vm, v).kind == "done"
    assert v.stats.pushes == 1
    assert v.ring.gfns["offset"][0] == 5


def test_initially_set_reset_eager_splits_a_ring_only_block_and_its_next_fault_maps_it_again():
    """arm64, ring without WITH_BITMAP (the slot is not logging: reference s11), manual protect
    with INITIALLY_SET and eager splitting. Page 10 is not mapped yet: its write's translation
    fault maps the whole block (not logging: no force_pte) and pushes one entry. The reset's
    call (10, mask 1) write-protects the block leaf, then splits the span's block
    (kvm_mmu_split_huge_pages): a table over a huge page in a slot that does not log
    (SPLIT_HUGE), not a plain table. The write to page 20 faults, and user_mem_abort maps the
    huge page as a block again (transparent_hugepage_adjust): one more entry, no split, the
    block mapped and writable whole."""
    vm = _vm(bitmap=False, mp2=ENA | INIT, eager=2 * MiB)
    vm.set_user_memory_region(0, LOG, 0, 1024 * 4096, block_fraction=1.0, mapped_fraction=0.0)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[10, 20]], [[0]]))
    assert _run(vm, v).kind == "sync"
    assert (v.stats.faults, v.stats.pushes) == (1, 1) and block_mapped(vm, 0)
    reader = RingReader(v.ring_gfns)
    assert reader.reap()[1].tolist() == [10]
    assert vm.reset_dirty_rings() == 1
    assert vm.stats.splits == 1 and int(vm.block_map[0]) == SPLIT_HUGE
    assert (vm.state[:512] & WP).all()
    assert _run(vm, v).kind == "done"
    assert (v.stats.faults, v.stats.pushes, v.stats.splits) == (2, 2, 0)
    assert v.ring.gfns["offset"][1] == 20
    assert block_mapped(vm, 0) and not (vm.state[:512] & WP).any()


# ---------------------------------------------------------------------------- eager split, ring only
def test_eager_split_applies_to_a_ring_only_slot_and_the_first_write_maps_the_block_again():
    """arm64 kvm_arch_commit_memory_region splits (kvm_mmu_split_memory_region) whenever
    LOG_DIRTY_PAGES is turned on without INITIALLY_SET, with no check for a dirty bitmap: the
    ring-only slot's 4 blocks are split. The slot is still not logging (no bitmap), so the
    first write fault in a huge page maps it as a block again (user_mem_abort ->
    transparent_hugepage_adjust; the table is replaced by a block): one push, and the later
    writes in that block are not reported (reference s11). Turning logging off and on again
    splits only that block again: the other three are still tables."""
    vm = _vm(bitmap=False, eager=2 * MiB)
    vm.set_user_memory_region(0, 0, 0, 2048 * 4096, block_fraction=1.0)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[10, 20]], [[]]))
    vm.set_user_memory_region(0, LOG, 0, 2048 * 4096)
    assert vm.stats.splits == 4 and not any_block_mapped(vm, 2048)
    assert _run(vm, v).kind == "done"
    assert v.stats.pushes == 1 and v.stats.splits == 0
    assert block_mapped(vm, 0) and not block_mapped(vm, 512)
    assert int(vm.version[20]) == 1
    vm.set_user_memory_region(0, 0, 0, 2048 * 4096)
    vm.set_user_memory_region(0, LOG, 0, 2048 * 4096)
    assert vm.stats.splits == 5 and not any_block_mapped(vm, 2048)
