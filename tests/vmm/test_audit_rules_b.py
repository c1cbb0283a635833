"""Three QEMU rules checked against cases worked by hand (QEMU 9.x), each test written to fail if
the rule is broken:

- the throttle trigger (migration/ram.c migration_bitmap_sync + migration_trigger_throttle): a
  sync only closes a period when more than 1 s has passed since the last one (a sync closer
  than that adds its pages to the open period and changes nothing else), and
  ``dirty_rate_high_cnt`` goes up on every high period and is reset only when it fires
  (``++cnt >= 2``), so a low period between two high ones does not stop the second from firing;
- dirty-limit's rate period (system/dirtylimit.c vcpu_dirty_rate_stat_collect with
  x-vcpu-dirty-limit-period, migration/dirtyrate.c vcpu_calculate_dirtyrate): each computation
  records the harvested counts, sleeps the period (that sleep is the duration the rates are
  divided by), then flushes the rings, waiting first for the vCPU threads asleep in a
  dirty-limit sleep; so with a 250 ms period the rates are computed over 250 ms and one
  computation follows the previous one by 250 ms plus that wait and the flush;
- the live dirty-rate estimate (QEMU calc-dirty-rate in dirty-ring mode): ring entries per second
  since the newest full harvest at least 1 s old, counting the entries still waiting in the
  rings (what QEMU's final flush would harvest). A guest writing new pages at a known rate reads
  that rate, whether the entries were harvested or still wait.
"""

from __future__ import annotations

import math

import pytest

from ringenv.config import load_scenario
from ringenv.vmm import MigrationRun
from ringenv.vmm.throttle import Trigger

from ._helpers import small

MS = 1_000_000
S = 1000 * MS
PAGE = 4096


def _syncs(trigger, syncs):
    """``trigger.on_sync`` for each (time in ns, new pages, bytes sent so far); what each returned."""
    return [trigger.on_sync(t, n, PAGE, xfer) for t, n, xfer in syncs]


# ------------------------------------------------------------------ the throttle trigger


def test_a_sync_less_than_a_second_after_the_period_start_closes_no_period():
    """QEMU migration_bitmap_sync: ``if (end_time > rs->time_last_bitmap_sync + 1000)`` the period
    is checked and its counters (start time, num_dirty_pages_period, bytes_xfer_prev) reset;
    otherwise the sync's new pages stay in num_dirty_pages_period for the next period.

    1.1 s: period 0 -> 1.1 s: 1000 pages (4096000 B) > 50% of 1 MB: high, cnt 1.
    1.8 s (0.7 s later): no period; its 100 pages wait in the open period.
    2.2 s (1.1 s after 1.1): period 1.1 -> 2.2 s: 100 + 100 pages = 819200 B against 50% of
    2 MB - 1 MB = 500000: high, cnt 2: fires, with (819200, 500000). (Had 1.8 s closed a period,
    it would have fired there: 409600 B > 50% of 0.5 MB; had its pages been dropped, 2.2 s would
    see 409600 < 500000.)"""
    t = Trigger(50)
    assert _syncs(t, [(1100 * MS, 1000, 1_000_000), (1800 * MS, 100, 1_500_000), (2200 * MS, 100, 2_000_000)]) \
        == [False, False, True]
    assert t.last == (200 * PAGE, 500_000)

    # exactly 1000 ms is not "more than 1 second": 2.1 s after a period closed at 1.1 s is no period
    t = Trigger(50)
    assert _syncs(t, [(1100 * MS, 1000, 1_000_000), (2100 * MS, 1000, 2_000_000), (2101 * MS, 0, 2_000_000)]) \
        == [False, False, True]
    assert t.last == (1000 * PAGE, 500_000)  # the 2.1 s pages, counted in the period closed at 2.101 s


def test_a_low_period_does_not_reset_the_high_count():
    """QEMU migration_trigger_throttle: ``if ((bytes_dirty_period > bytes_dirty_threshold) &&
    (++rs->dirty_rate_high_cnt >= 2)) { rs->dirty_rate_high_cnt = 0; ... }``: a low period leaves
    the count alone; only firing resets it.

    Periods of 1.1 s, 1 MB sent in each (threshold 500000 B): high (1000 pages, 4096000 B),
    low (10 pages, 40960 B), high: the count reads 1, 1, 2: the third fires with
    (4096000, 500000). Then high (count 1), high (count 2: fires). And high, low, low, high fires
    on the fourth."""
    t = Trigger(50)
    pages = [1000, 10, 1000, 1000, 1000]
    assert _syncs(t, [(int((k + 1) * 1.1 * S), n, (k + 1) * 1_000_000) for k, n in enumerate(pages)]) \
        == [False, False, True, False, True]
    assert t.last == (1000 * PAGE, 500_000)

    t = Trigger(50)
    pages = [1000, 10, 10, 1000]
    assert _syncs(t, [(int((k + 1) * 1.1 * S), n, (k + 1) * 1_000_000) for k, n in enumerate(pages)]) \
        == [False, False, False, True]


# ------------------------------------------------------------------ dirty-limit's period


def test_dirty_limit_computes_rates_every_period_ms():
    """x-vcpu-dirty-limit-period 250 ms (QEMU vcpu_dirty_rate_stat_collect: the migration's
    period while dirty-limit migrates). vcpu_calculate_dirtyrate: record the harvested counts at
    T, dirty_stat_wait(250 ms) whose duration (250 ms) divides the rates, then
    global_dirty_log_sync: kvm_dirty_ring_flush's synchronous kick waits for every vCPU thread
    asleep in its dirty-limit sleep, then reaps; then dirtylimit_process adjusts every vCPU; the
    loop starts again at once. So each computation divides by 250 ms, and the next one comes
    250 ms after it plus the wait for the sleepers, the big lock and the flush.

    The scenario (analytics at 256 MiB, a 0.5 Gb/s link, 1024-entry rings) engages dirty-limit
    at the second pass's sync (~6.8 s); its vCPUs dirty ~40 MiB/s against the 1 MiB/s quota, so
    they sleep seconds after each ring-full exit and the flush waits for them."""
    cfg = small("analytics", 256 << 20, vm={"vcpus": 2}, throttle="dirty-limit", rate_scale=0.06,
                ring_entries=1024, link={"gbps": 0.5, "give_up_s": 60}, dirty_limit={"period_ms": 250})
    run = MigrationRun(cfg)
    dl, col = run.throttle, run.collector
    started, rates, waits, flushes = [], [], {}, {}

    stat, rate_fn = dl._stat_thread, dl.rates

    def stat_spy():  # when the stat thread starts (its first period begins then)
        started.append(run.loop.now)
        yield from stat()

    def rates_spy(entries, dt_ms):
        rates.append((run.loop.now, dt_ms, dl.in_service))
        return rate_fn(entries, dt_ms)

    wait = run.run_on_all_vcpus

    def wait_spy():
        t0 = run.loop.now
        w = yield from wait()
        waits[t0] = w
        return w

    flush = col.flush

    def flush_spy():
        t0 = run.loop.now
        ns = flush()
        flushes[t0 + ns] = t0  # (the stat thread computes the rates when its flush is over)
        return ns

    dl._stat_thread, dl.rates = stat_spy, rates_spy
    run.run_on_all_vcpus, col.flush = wait_spy, flush_spy
    t = 0
    while len(rates) < 8 and not run.done and t < 40 * S:
        t += 100 * MS
        run.advance(t)
    assert len(started) == 1 and len(rates) >= 3, (started, rates)
    assert all(dt == 250 and on for _, dt, on in rates)

    prev, waited = started[0], 0
    for when, _, _ in rates:
        wake = prev + 250 * MS  # the period sleep, from the previous computation (or the start)
        assert wake in waits, (prev, wake, sorted(waits))  # the flush's wait for sleepers starts there
        flush_start = flushes[when]  # the flush ends when the rates are computed
        lock = flush_start - (wake + waits[wake])  # then the big lock
        assert 0 <= lock < 1 * MS, (wake, waits[wake], flush_start)
        waited += waits[wake] > 0
        prev = when
    assert waited >= 2  # the case the wait matters in did happen


# ------------------------------------------------------------------ the live dirty-rate estimate


def _writer(pattern):
    """1 GiB, 2 vCPUs, arm64 4K; the guest writes 40 MB/s (of 4 KiB stores: 9765.625 pages/s)
    over 3/4 of RAM, each vCPU in its own half at 20 MB/s; the 0.5 Gb/s link keeps the bulk pass
    (and so every migration sync) beyond the first 10 s, and 32768-entry rings hold everything
    written between two harvests (no ring-full exit)."""
    wl = {"name": f"{pattern}-40", "cpu_busy": 0.0,
          "regions": [{"name": "w", "fraction": 0.75, "rate_mbps": 40, "pattern": pattern, "share": "private"}]}
    return {"vm": {"memory": 1 << 30, "vcpus": 2}, "workload": wl, "link": {"gbps": 0.5}, "ring_entries": 32768}


RATE = 40e6  # B/s: 9765.625 new pages of 4096 B a second


def _uniform_distinct_Bps(t_s):
    """Uniform writes at W pages/s over N pages, nothing harvested since 0: the ring entries are the
    distinct pages written, N (1 - exp(-W t / N)) (each vCPU: N/2 pages at W/2, the same ratio)."""
    n, w = 0.75 * (1 << 18), RATE / PAGE
    return n * (1 - math.exp(-w * t_s / n)) * PAGE / t_s


@pytest.mark.parametrize("pattern, interval_ms, at_s, reaps, expect_Bps", [
    # the reaper sleeps past the measurement: the estimate since 0 is all entries still waiting
    ("scan", 5000, 3.0, 0, RATE),
    # reaps every 0.7 s (0.7, 1.4, 2.1, 2.8 s): at 3.5 s the window starts at the 2.1 s reap
    # (newest at least 1 s old): the 2.8 s reap's 0.7 s of entries were harvested, 0.7 s wait
    ("scan", 700, 3.5, 4, RATE),
    # uniform random over 196608 pages, nothing harvested: at 3 s 1 - exp(-0.149) of the
    # 29297 writes are to distinct pages, 37.16 MB/s
    ("uniform", 5000, 3.0, 0, _uniform_distinct_Bps(3.0)),
], ids=["scan-nothing-harvested", "scan-reaper-0.7s", "uniform-nothing-harvested"])
def test_the_dirty_rate_estimate_counts_the_entries_still_in_the_rings(pattern, interval_ms, at_s, reaps,
                                                                     expect_Bps):
    """Session._dirty_rate (QEMU calc-dirty-rate, dirty-ring mode: entries reaped over the window,
    its last flush reaping what waits in the rings): (harvested since the reference harvest + the
    entries waiting now) x page size / time since it. A guest writing new pages at a known rate
    reads that rate within 2%; without the waiting entries it would read 0 (no harvest since the
    reference) or half of it (the 0.7 s reaper)."""
    run = MigrationRun(load_scenario("default", interval_ms=interval_ms, **_writer(pattern)), host_sync_ms=100)
    run.advance(int(at_s * S))
    m = run.metrics()
    assert m.time_s == at_s and m.iterations == 1 and m.full_exits == 0  # only the set-up sync harvested
    assert run.reaper_runs == reaps
    assert sum(run.collector.ready().tolist()) > 0.25 * RATE / PAGE  # entries do wait
    assert m.dirty_rate_Bps == run.dirty_rate_Bps
    assert m.dirty_rate_Bps == pytest.approx(expect_Bps, rel=0.02)
