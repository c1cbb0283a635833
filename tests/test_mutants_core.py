"""Tests from a mutation run over the core: the dirty ring (ringenv/kvm/ring.py), the collectors
(ringenv/vmm/collectors.py), the userspace harvest (ringenv/vmm/reap.py) and the migration
bitmap bookkeeping (ringenv/vmm/dirty.py). Each kills a mutant the suite let survive, named in
its docstring; the expected values come from docs/reference/kvm-dirty-ring.md (the kernel's
ring, QEMU's collectors: sections 3, 5, 6, 8 and 9) and the documented contracts of the code."""

from __future__ import annotations

import numpy as np
import pytest

from ringenv.config import load_scenario
from ringenv.kvm.ring import DirtyRing, ring_room
from ringenv.vmm import CheckpointRun, MigrationRun
from ringenv.vmm.dirty import DirtyPages
from ringenv.vmm.reap import RingReader

MS = 1_000_000


# ------------------------------------------------------------------------------- helpers
def _two_vcpus(**overrides):
    """A ring migration of 2 vCPUs, 300 ms in: both rings hold entries not harvested yet
    (the reaper's interval is 5 s), the host seen at each 50 ms."""
    cfg = load_scenario("web", vm={"memory": "1GiB", "vcpus": 2}, interval_ms=5000, **overrides)  # (live at 300 ms)
    r = MigrationRun(cfg, host_sync_ms=50)
    r.advance(300 * MS)
    return r


def _ring_pages(r) -> np.ndarray:
    """Brute force: the RAM pages (slot 0) of the entries waiting in the rings, in QEMU's reading
    order (the run of DIRTY entries from each fetch index)."""
    out = []
    for rd in r.collector.readers:
        idx = (rd.fetch + np.arange(rd.count_ready())) & (rd.size - 1)
        e = rd.gfns[idx]
        out.append(e["offset"][e["slot"] == 0].astype(np.int64))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _unsaved_brute_force(r) -> int:
    """The pages a checkpoint taken now would save (RingCollector.unsaved_pages' contract):
    dirty in the migration bitmap, harvested into the slot bitmap, waiting in a ring or (x86)
    logged in a PML buffer; each page once."""
    d = r.dirty
    pend = d.mig | d.slot
    pend[_ring_pages(r)] = True
    pend[r.pml_logged()] = True
    return int(np.count_nonzero(pend))


# ------------------------------------------------------------------------------- ring.py
def test_ring_room_is_the_soft_limit_minus_the_entries_used_in_u32():
    """ring_room: per vCPU, the pushes left before its ring is soft-full, soft_limit - used,
    with used = dirty_index - reset_index as free-running u32 counters (reference s3): 256
    entries, 64 reserved, soft limit 192. A ring past its soft limit (an x86 PML flush can push
    past it) has negative room; counters that wrapped around 2^32 still give used = 8.
    Mutant killed: ring.py:88 room = soft_limit - used - 1."""
    rings = [DirtyRing(256, 64) for _ in range(4)]
    rings[1].push(0, np.arange(10, dtype=np.uint64))
    rings[2].push(0, np.arange(200, dtype=np.uint64))
    ctr = np.zeros((4, 4), dtype=np.int64)
    for ring, row in zip(rings, ctr):
        ring.attach_counters(row)
    ctr[3, :2] = (3, (1 << 32) - 5)  # dirty_index wrapped to 3, reset_index 2^32 - 5
    assert [ring.used for ring in rings] == [0, 10, 200, 8]
    soft = np.array([ring.soft_limit for ring in rings], dtype=np.int64)
    assert soft.tolist() == [192] * 4
    assert ring_room(ctr, soft).tolist() == [192, 182, -8, 184]
    assert rings[2].soft_full() and not rings[3].soft_full()


# ------------------------------------------------------------------------------- collectors.py
def test_the_reset_asserts_kvm_reset_exactly_the_entries_harvested():
    """QEMU's kvm_dirty_ring_reap_locked: after the harvest one KVM_RESET_DIRTY_RINGS, and
    assert(ret == total) (reference s5). If an entry was marked RESET behind the collector's
    back (here a second reader harvested the first entry of vCPU 0's ring), KVM resets one more
    entry than the collector harvested: the reset must fail loudly, not go on.
    Mutant killed: collectors.py:102 the check of KVM's count dropped."""
    r = _two_vcpus()
    c = r.collector
    assert min(rd.count_ready() for rd in c.readers) > 0
    stray = RingReader(r.vcpus[0].ring_gfns)
    stray.fetch = c.readers[0].fetch
    assert len(stray.reap(limit=1)[1]) == 1
    n, _ = c.reap()  # vCPU 0's ring stops at the entry marked DIRTY|RESET: only vCPU 1's harvested
    assert n > 0 and c.readers[0].count_ready() == 0
    with pytest.raises(AssertionError, match=f"reset {n + 1} entries, {n} were harvested"):
        c.reset(n)


def test_each_ring_sync_reports_the_pages_that_sync_made_dirty():
    """RingCollector.sync's ``last_new`` is QEMU's num_dirty_pages_period for that sync: the
    pages the merge newly set in the migration bitmap (what the sync's dirty rate and the
    throttles' trigger rule read), not a running total over the syncs.
    Mutant killed: collectors.py:128 last_new += merge_slot()."""
    r = _two_vcpus(link={"max_bandwidth_mibps": 256})  # still in the bulk stage 1 s in
    c, d = r.collector, r.dirty
    news = []
    for _ in range(2):
        before = d.mig_count
        c.sync()
        news.append(c.last_new)
        assert c.last_new == d.mig_count - before
        r.advance(r.now_ns + 200 * MS)
    assert min(news) > 0


def test_a_rebuilt_unsaved_count_looks_again_at_the_entries_waiting_in_the_rings():
    """RingCollector.look: when the rings' overflow count went up, the count of pages not yet
    saved is rebuilt from the bitmaps, and the entries still waiting in the rings (looked at
    before, their pages no longer in ``seen``) are looked at again: the rebuilt count is still
    every page in mig, the slot bitmap or a ring, once each. Checked between two checkpoints,
    when the rings hold pages that are in neither bitmap.
    Mutant killed: collectors.py:161 the rebuild keeps the old peek indexes."""
    cfg = load_scenario("checkpoint", vm={"memory": "256MiB", "vcpus": 2}, interval_ms=5000,
                        checkpoint={"period_s": 1.0, "horizon_s": 10.0})
    r = CheckpointRun(cfg, host_sync_ms=50)
    c, d = r.collector, r.dirty
    checked = 0
    while r.now_ns < 4000 * MS and checked < 3:
        r.advance(r.now_ns + 50 * MS)
        overflows = r.vm.vcpu_totals()[2]
        c.look(overflows)
        ring = _ring_pages(r)
        if r.phase != "wait" or not len(ring) or (d.mig | d.slot)[ring].all():
            continue
        want = _unsaved_brute_force(r)
        assert c.unsaved_pages() == want  # the count kept entry by entry
        c.look(overflows + 1)  # as after an overflow: rebuilt
        assert c.unsaved_pages() == want
        checked += 1
    assert checked == 3


def test_a_ring_checkpoint_counts_the_pages_logged_in_x86_pml_buffers():
    """x86 PML: a page the CPU logged in a vCPU's PML buffer reaches the ring only at the
    vCPU's next exit or host timer tick (1 ms here); a checkpoint taken now would save it (its
    kick flushes the buffer), so it is among the pages not yet saved. The host is seen on a
    50.5 ms grid, half the time between two ticks, so the buffers do hold such pages (on a
    50 ms grid every look falls on a tick, when the buffers were just flushed).
    Mutant killed: collectors.py:165 look ignores the PML buffers."""
    cfg = load_scenario("checkpoint", host="x86-pml", vm={"memory": "256MiB", "vcpus": 2}, interval_ms=200,
                        checkpoint={"period_s": 1.0, "horizon_s": 10.0})
    r = CheckpointRun(cfg, host_sync_ms=50.5)
    c, d = r.collector, r.dirty
    only_in_pml = 0
    for _ in range(60):
        r.advance(r.now_ns + 50_500_000)
        c.look(r.vm.vcpu_totals()[2])
        pml = r.pml_logged()
        if len(pml):
            elsewhere = d.mig | d.slot
            elsewhere[_ring_pages(r)] = True
            only_in_pml += int(np.count_nonzero(~elsewhere[np.unique(pml)]))
        assert c.unsaved_pages() == _unsaved_brute_force(r)
    assert only_in_pml > 0


def _bitmap_run_of_two_chunks():
    """A bitmap migration of 1.5 GiB (4 KiB pages): two 1 GiB CLEAR chunks, pages 0..262143
    and 262144..393215; after a sync of its own (every chunk waits for its CLEAR), with an empty
    migration bitmap."""
    cfg = load_scenario("idle", collector="bitmap", vm={"memory": "1536MiB", "vcpus": 1})
    r = MigrationRun(cfg)
    r.advance(1 * MS)
    c, d = r.collector, r.dirty
    assert c.chunk_pages == 1 << 18 and c.nchunks == 2
    c.sync()
    assert c.clear_pending.tolist() == [True, True]
    d.mig[:] = False
    d.mig_count = 0
    return r, c, d


def _take(d, pages, cursor, n):
    d.mig[pages] = True
    d.mig_count = len(pages)
    d.cursor = cursor
    return d.take(n)


def test_a_slice_that_wraps_back_into_its_first_chunk_is_cut_where_a_chunk_needs_its_clear():
    """BitmapCollector.limit_slice: a slice is cut before the second 1 GiB chunk that still
    needs its KVM_CLEAR_DIRTY_LOG (QEMU clears a chunk just before it sends its first page
    after a sync). A slice from the cursor in chunk 1 that wraps around to chunk 0 and back into
    chunk 1 starts and ends in the same chunk, yet chunk 0 comes second: the pages from the
    first of chunk 0 on go back to the migration bitmap and the search resumes there.
    Mutant killed: collectors.py:230 a slice starting and ending in one chunk is never cut."""
    r, c, d = _bitmap_run_of_two_chunks()
    pages = np.array([5, 6, 262_200, 300_000, 390_000, 393_215], dtype=np.int64)
    taken = _take(d, pages, 299_000, 6)
    assert taken.tolist() == [300_000, 390_000, 393_215, 5, 6, 262_200]
    kept = c.limit_slice(taken)
    assert kept.tolist() == [300_000, 390_000, 393_215]
    assert d.mig_count == 3 and np.flatnonzero(d.mig).tolist() == [5, 6, 262_200] and d.cursor == 5


def test_a_slice_into_a_chunk_already_cleared_is_not_cut():
    """BitmapCollector.limit_slice cuts only before a chunk whose CLEAR is still pending: once
    chunk 1 was cleared since the sync (before_send), a slice running from chunk 0 into
    chunk 1 is sent whole (chunk 0, its first chunk, is cleared by its own before_send).
    Mutant killed: collectors.py:233 cut at every chunk change."""
    r, c, d = _bitmap_run_of_two_chunks()
    c.before_send(np.array([300_000], dtype=np.int64))
    assert c.clear_pending.tolist() == [True, False]
    pages = np.array([262_140, 262_143, 262_144, 262_150], dtype=np.int64)
    taken = _take(d, pages, 0, 4)
    assert c.limit_slice(taken).tolist() == pages.tolist()
    assert d.mig_count == 0


def test_before_send_clears_a_chunk_once_per_sync():
    """QEMU's clear_bmap: the first page of a 1 GiB chunk sent after a sync issues that chunk's
    KVM_CLEAR_DIRTY_LOG (reference s8, 64-page aligned, of the bits the last GET returned); the
    chunk's later pages issue none, until the next sync.
    Mutant killed: collectors.py:248 a slice within one chunk clears it every time."""
    r, c, d = _bitmap_run_of_two_chunks()

    def clears():
        return r.clears, r.vm.stats.clear_dirty_log_calls

    c0, k0 = clears()
    assert c.before_send(np.array([5, 6], dtype=np.int64)) > 0
    assert clears() == (c0 + 1, k0 + 1)
    assert c.before_send(np.array([7, 100_000], dtype=np.int64)) == 0
    assert clears() == (c0 + 1, k0 + 1)
    assert c.clear_pending.tolist() == [False, True]
    c.sync()
    assert c.before_send(np.array([8], dtype=np.int64)) > 0
    assert clears() == (c0 + 2, k0 + 2)


# ------------------------------------------------------------------------------- dirty.py
def test_a_run_from_the_highest_page_sent_counts_that_page_as_re_sent():
    """DirtyPages.copy/copy_run: a page sent again counts in pages_resent, also when a run
    starts exactly at the highest page sent so far (by a scattered send or by a run).
    Mutants killed: dirty.py:176 the highest page sent recorded one too low; dirty.py:184 a run
    taken as all-new when it starts at the last page sent."""
    version = np.zeros(16, dtype=np.uint32)
    d = DirtyPages(16, with_slot=False)
    d.copy(np.array([2, 9], dtype=np.int64), version)  # scattered
    d.copy_run(9, 3, version)  # 9 again
    assert (d.pages_sent, d.pages_resent) == (5, 1)
    d.copy_run(11, 2, version)  # 11 again (the last page of the run before)
    assert (d.pages_sent, d.pages_resent) == (7, 2)
    d.copy_run(13, 3, version)  # past everything sent: none again
    assert (d.pages_sent, d.pages_resent) == (10, 2)
    assert np.flatnonzero(d.dest).tolist() == [2] + list(range(9, 16))


@pytest.mark.parametrize("tail", [[1000], [1000, 1002], [1001, 1002]])
def test_merge_slot_takes_the_pages_after_the_last_whole_word(tail):
    """DirtyPages.merge_slot over 1003 pages: the slot bitmap's whole u64 words cover pages
    0..999, the pages 1000..1002 are merged one by one; every harvested page reaches the
    migration bitmap (a page missed there is a lost write), counted once as new.
    Mutant killed: dirty.py:214 the page-by-page loop starts one page late."""
    d = DirtyPages(1003, with_slot=True)
    d.mig[1001] = True
    d.mig_count = 1
    d.mark_harvested(np.array([3] + tail, dtype=np.int64))
    new = len(set([3] + tail) - {1001})
    assert d.merge_slot() == new
    assert np.flatnonzero(d.mig).tolist() == sorted(set([3, 1001] + tail))
    assert d.mig_count == 1 + new and not d.slot.any()
