"""The VMM's dirty-page bookkeeping (ringenv.vmm.dirty): which pages a send takes and what the
destination then holds."""

import numpy as np
import pytest

from ringenv.vmm.dirty import DirtyPages


def _dirty(npages, pages):
    d = DirtyPages(npages, with_slot=False)
    d.mig[pages] = True
    d.mig_count = len(np.unique(pages))
    return d


def _reference_take(mig, cursor, maxn):
    """QEMU's order: set bits from the cursor to the end, then from 0 up to the cursor."""
    order = np.r_[np.flatnonzero(mig[cursor:]) + cursor, np.flatnonzero(mig[:cursor])]
    return order[:maxn]


def test_take_hand_worked_wraps_once_from_the_cursor():
    d = _dirty(40, [1, 2, 9, 17, 30, 31, 39])
    d.cursor = 17
    assert d.take(3).tolist() == [17, 30, 31]
    assert d.cursor == 32 and d.mig_count == 4
    assert d.take(3).tolist() == [39, 1, 2]  # wraps around to the start
    assert d.cursor == 3
    assert d.take(10).tolist() == [9]  # only one left
    assert d.mig_count == 0 and not d.mig.any()
    assert d.take(5).tolist() == []


def test_take_last_page_moves_the_cursor_to_zero():
    d = _dirty(16, [3, 15])
    d.cursor = 10
    assert d.take(1).tolist() == [15]
    assert d.cursor == 0
    assert d.take(1).tolist() == [3]


@pytest.mark.parametrize("npages", [64, 1000, 1003, 4096 + 5])
def test_take_matches_the_reference_order(npages):
    """Random bitmaps (sparse, with long zero runs that the word skipping jumps over, and
    dense), random cursors, sizes that are not multiples of 8."""
    rng = np.random.default_rng(npages)
    for density in (0.002, 0.05, 0.5, 1.0):
        for _ in range(20):
            pages = np.flatnonzero(rng.random(npages) < density)
            d = _dirty(npages, pages)
            d.cursor = int(rng.integers(npages))
            expect_mig = d.mig.copy()
            maxn = int(rng.integers(1, npages + 2))
            want = _reference_take(expect_mig, d.cursor, maxn)
            got = d.take(maxn)
            assert got.tolist() == want.tolist()
            expect_mig[want] = False
            assert np.array_equal(d.mig, expect_mig)
            assert d.mig_count == int(expect_mig.sum())
            if len(want):
                assert d.cursor == (int(want[-1]) + 1) % npages


def test_take_run_takes_what_take_would_when_it_is_a_run_and_nothing_otherwise():
    d = _dirty(40, list(range(10, 30)) + [35])
    d.cursor = 12
    assert d.take_run(8) == (12, 8)  # pages 12..19, all dirty
    assert d.cursor == 20 and d.mig_count == 13 and not d.mig[12:20].any() and d.mig[10:12].all()
    before = (d.mig.copy(), d.mig_count, d.cursor)
    assert d.take_run(11) is None  # 20..30 holds the clean page 30: not a run
    assert d.take_run(0) is None
    assert np.array_equal(d.mig, before[0]) and (d.mig_count, d.cursor) == before[1:]
    assert d.take(11).tolist() == list(range(20, 30)) + [35]  # take goes on as usual
    e = _dirty(16, [0, 1, 14, 15])
    e.cursor = 14
    assert e.take_run(4) is None  # a run that would wrap is no run
    assert e.take_run(2) == (14, 2) and e.cursor == 0  # the last page: the cursor wraps to 0
    assert _dirty(8, []).take_run(4) is None


def test_copy_run_is_copy_of_the_same_pages():
    rng = np.random.default_rng(3)
    version = rng.integers(0, 2**32, 64, dtype=np.uint64).astype(np.uint32)
    a, b = DirtyPages(64, with_slot=False), DirtyPages(64, with_slot=False)
    for first, n in [(5, 20), (0, 3), (15, 30), (60, 4)]:  # overlapping: re-sends counted
        a.copy(np.arange(first, first + n, dtype=np.int64), version)
        b.copy_run(first, n, version)
        version[first] += 1
    assert np.array_equal(a.dest, b.dest)
    assert (a.pages_sent, a.pages_resent) == (b.pages_sent, b.pages_resent) == (57, 10)  # 15..24 sent twice


def test_copy_run_counts_re_sends_after_scattered_sends_and_runs():
    """A run is only taken as all-new when it lies past every page sent before, by a run or
    by a scattered send: the re-sends are the same as a page-by-page count."""
    version = np.arange(100, dtype=np.uint32)
    d = DirtyPages(100, with_slot=False)
    d.copy(np.array([60, 61, 90, 3], dtype=np.int64), version)  # scattered, wrapping: 3 after 90
    d.copy_run(40, 30, version)  # 40..69: 60 and 61 again
    assert (d.pages_sent, d.pages_resent) == (34, 2)
    d.copy_run(70, 25, version)  # 70..94: 90 again, past the run before
    assert (d.pages_sent, d.pages_resent) == (59, 3)
    d.copy_run(95, 5, version)  # past everything sent: nothing again
    d.copy_run(0, 10, version)  # 3 again
    assert (d.pages_sent, d.pages_resent) == (74, 4)
    assert np.array_equal(d.dest != 0,
                          np.isin(np.arange(100), [3, 60, 61, 90] + list(range(40, 100)) + list(range(10))))


def test_untake_gives_pages_back_and_the_search_resumes_there():
    d = _dirty(100, [5, 6, 50, 70, 90])
    taken = d.take(5)
    d.untake(taken[3:])
    assert d.mig_count == 2 and d.cursor == 70
    assert d.take(5).tolist() == [70, 90]


def test_copy_sends_versions_and_counts_resent_pages():
    d = DirtyPages(16, with_slot=False)
    version = np.zeros(16, dtype=np.uint32)
    version[[2, 7, 9]] = [4, 1, np.iinfo(np.uint32).max]
    d.copy(np.array([2, 7, 9], dtype=np.int64), version)  # scattered: first send
    assert d.dest[[2, 7, 9]].tolist() == [5, 2, 0]  # version + 1, modulo 2^32 as stored
    assert d.pages_sent == 3 and d.pages_resent == 0
    version[2] += 1
    d.copy(np.array([1, 2, 3], dtype=np.int64), version)  # contiguous: page 2 again
    assert d.dest[[1, 2, 3]].tolist() == [1, 6, 1]
    assert d.pages_sent == 6 and d.pages_resent == 1
    assert d.lost_writes(version) == 16 - 5  # the pages never sent


@pytest.mark.parametrize("npages", [4096, 4099])
def test_merge_slot_adds_the_harvested_pages_once(npages):
    """The slot bitmap goes into the migration bitmap and is cleared; the new count is the
    pages that were not already to be sent (word-wise when the size allows, else bytewise)."""
    rng = np.random.default_rng(npages)
    d = DirtyPages(npages, with_slot=True)
    mig = rng.random(npages) < 0.3
    d.mig[:] = mig
    d.mig_count = int(mig.sum())
    harvested = np.flatnonzero(rng.random(npages) < 0.1)
    d.mark_harvested(harvested)
    expect = mig.copy()
    expect[harvested] = True
    assert d.merge_slot() == int(expect.sum() - mig.sum())
    assert np.array_equal(d.mig, expect) and d.mig_count == int(expect.sum())
    assert not d.slot.any() and d.slot_marked == 0
    assert d.merge_slot() == 0
