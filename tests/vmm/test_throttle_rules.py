"""The throttles' arithmetic, worked by hand from QEMU (migration/ram.c migration_trigger_throttle
and mig_throttle_guest_down, system/cpu-throttle.c, system/dirtylimit.c): the trigger's periods,
auto-converge's steps, sleeps and timers, dirty-limit's adjustments. A mutation run found these
unchecked (and the tailslow step computed in floats where QEMU truncates)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from ringenv.config import AutoConvergeConfig, DirtyLimitConfig
from ringenv.vmm.throttle import AutoConverge, DirtyLimit, Trigger

MS = 1_000_000
S = 1000 * MS
PAGE = 4096


def _high(trigger, times_s):
    """Syncs at ``times_s`` each finding 1000 new pages (4 MB) while 1 MB went out: always
    above the 50% threshold."""
    out, xfer = [], 0
    for t in times_s:
        xfer += 1_000_000
        out.append(trigger.on_sync(int(t * S), 1000, PAGE, xfer))
    return out


def test_the_first_period_starts_at_the_set_up_sync():
    """migration_bitmap_sync: time_last_bitmap_sync is first set when the set-up's sync starts
    (after logging was enabled), and that sync's new pages count in the first period. Set-up
    sync from 0.2 s: a sync at 1.1 s closes no period (0.9 s), one at 1.3 s does."""
    t = Trigger(50)
    t.begin(200 * MS, 7)
    assert (t.period_start, t.dirty_pages_period) == (200 * MS, 7)
    assert t.on_sync(1100 * MS, 1000, PAGE, 1_000_000) is False
    assert (t.period_start, t.dirty_pages_period) == (200 * MS, 1007)
    t.on_sync(1300 * MS, 0, PAGE, 2_000_000)
    assert (t.period_start, t.dirty_pages_period, t.high_cnt) == (1300 * MS, 0, 1)


def test_a_run_starts_the_trigger_s_first_period_at_its_set_up_sync():
    """The session hands the throttle its set-up sync: the period starts when that sync began
    (after the kernel time of enabling logging), not at time 0, with that sync's new pages."""
    from ringenv.vmm import MigrationRun

    from ._helpers import small

    r = MigrationRun(small("analytics", memory=256 << 20, vm={"vcpus": 2}, throttle="auto-converge"))
    enabled = []
    enable = r.enable_logging

    def spy():
        ns = enable()
        enabled.append((r.loop.now, ns))
        return ns

    r.enable_logging = spy
    r.advance(10 * MS)
    (t0, ns), = enabled
    assert ns > 0 and r.iterations == 1
    assert r.throttle.trigger.period_start == t0 + ns
    assert r.throttle.trigger.dirty_pages_period == r.collector.last_new


def test_the_trigger_checks_at_most_once_a_second_and_fires_on_the_second_high_period():
    assert _high(Trigger(50), [0.5, 1.1, 1.6, 2.2]) == [False, False, False, True]
    assert _high(Trigger(50), [1.1, 2.2, 3.3, 4.4, 5.5]) == [False, True, False, True, False]


def test_the_trigger_compares_the_period_s_dirty_bytes_with_its_share_of_the_bytes_sent():
    t = Trigger(50)
    # 1.1 s: 122 pages (499712 B) against 50% of 1 MB: not above; 2.2 s and 3.3 s: 123 pages (503808 B)
    assert [t.on_sync(int(x * S), n, PAGE, xfer) for x, n, xfer in
            [(1.1, 122, 1_000_000), (2.2, 123, 2_000_000), (3.3, 123, 3_000_000)]] == [False, False, True]
    assert t.last == (123 * PAGE, 500_000)


class _Session(SimpleNamespace):
    PRIO_THROTTLE = 0

    def spawn(self, gen, prio, name):
        self.procs.append(gen)
        return SimpleNamespace(alive=True)

    def queue_throttle_work(self, ns):
        self.sleeps.append(ns)


def _auto(**cfg):
    s = _Session(loop=SimpleNamespace(now=0), page_size=PAGE, bytes_sent=0, iterations=2, finished=False,
                 procs=[], sleeps=[])
    return s, AutoConverge(s, AutoConvergeConfig(**cfg))


def _fire(s, ac, n=1):
    """``n`` firings of the trigger (two high periods each, 1.1 s apart)."""
    pcts = []
    for _ in range(2 * n):
        s.loop.now += int(1.1 * S)
        s.bytes_sent += 1_000_000
        ac.on_sync(s, 1000)
        pcts.append(ac.pct)
    return pcts[1::2]


def test_auto_converge_steps_from_initial_by_increment_up_to_max():
    s, ac = _auto()
    assert _fire(s, ac, 11) == [20, 30, 40, 50, 60, 70, 80, 90, 99, 99, 99]
    assert len(s.procs) == 1  # one timer


def test_tailslow_steps_in_whole_percents_as_qemu():
    """pct 20, the firing period dirtied 1050 against a threshold of 1000: cpu_now 80,
    cpu_ideal = (uint64)(80 x 1000 / 1050) = 76, step min(80 - 76, 10) = 4: 24 (not 23.81)."""
    s, ac = _auto(tailslow=True)
    ac.pct = 20.0
    ac.trigger.on_sync = lambda *a: True
    ac.trigger.last = (1050, 1000)
    ac.on_sync(s, 1)
    assert ac.pct == 24
    ac.trigger.last = (4000, 1000)  # far above: the full increment
    ac.on_sync(s, 1)
    assert ac.pct == 34


@pytest.mark.parametrize("pct, sleep, period", [
    (20, 2_500_001, 12_500_000),  # 0.25 x 10 ms + 1 ns every 10 ms / 0.8
    (50, 10_000_001, 20_000_000),
    (60, 15_000_000, 25_000_000),  # 1.4999999999999998 x 10 ms + 1 ns: QEMU's +1 ns fixes the round-down
    (99, 990_000_000, 999_999_999),  # 98.99999999999991 x 10 ms + 1 ns, every 10 ms / 0.010000000000000009 (truncated)
])
def test_the_throttle_timer_sleeps_pct_of_the_vcpu_s_time(pct, sleep, period):
    s, ac = _auto()
    ac.pct = float(pct)
    tick = ac._tick()
    assert next(tick) == period and s.sleeps == [sleep]
    assert sleep / period == pytest.approx(pct / 100, abs=1e-6)


def test_the_dirty_sync_timer_is_re_armed_a_period_after_the_sync_it_asked_for():
    s, ac = _auto(dirty_sync_timer_ms=5000)
    ac.start(0)
    s.iterations = 3
    s.loop.now = 5 * S
    assert not ac.sync_due()  # the count moved since the start: re-armed
    assert ac.next_sync_tick == 10 * S
    s.loop.now = 10 * S + 7 * MS
    assert ac.sync_due()  # nothing synced for a period: due
    s.loop.now += 30 * MS  # the sync ends 30 ms later
    s.iterations += 1
    ac.on_sync(s, 0)
    assert ac.next_sync_tick == 10 * S + 37 * MS + 5 * S


def _limit(ring_entries=4096, vcpus=2):
    s = SimpleNamespace(cfg=SimpleNamespace(ring_entries=ring_entries, auto_converge=AutoConvergeConfig()),
                        page_size=PAGE, vcpus=[None] * vcpus)
    return DirtyLimit(s, DirtyLimitConfig())


def test_dirty_limit_ring_full_time_in_whole_mib():
    d = _limit(ring_entries=65536)  # 256 MiB of pages
    assert d._ring_full_time_us(27) == 256 * 1_000_000 // 27 == 9_481_481


@pytest.mark.parametrize("host_page", [4096, 16384, 65536])
def test_dirty_limit_counts_a_ring_entry_as_one_4k_target_page_on_any_host(host_page):
    """QEMU counts each harvested ring entry as one dirty page (kvm_dirty_ring_reap_one:
    cpu->dirty_pages += count) and converts pages to MiB in TARGET pages
    (qemu_target_pages_to_MiB: 4 KiB on arm64 and x86), for the rates (do_calculate_dirtyrate)
    and the ring's size (dirtylimit_dirty_ring_full_time), while an entry is a HOST page: on a
    64K host both read 16x low, as QEMU reads them. 25600 entries in 1000 ms: 100 MiB/s on
    any host; a 4096-entry ring: 16 MiB."""
    d = _limit()
    d.s.page_size = host_page
    assert DirtyLimit.rates(np.array([25600]), 1000).tolist() == [100]
    assert d._ring_full_time_us(100) == 16 * 1_000_000 // 100


def test_dirty_limit_adjustments():
    d = _limit()  # 4096 x 4 KiB: 16 MiB, full in 16e6 / max rate us
    d._adjust(0, 1, 100)  # 99% off: proportional, pct 99: 160000 x 99 / 1
    assert d.throttle_us[0] == min(160_000 * 99, 160_000 * 99)
    d._adjust(1, 1, 50)  # the ring-full time uses the highest rate seen (100), pct 98
    assert d.throttle_us[1] == 160_000 * 98 // 2 == 7_840_000
    d = _limit()
    d.throttle_us[0] = 100_000
    d._adjust(0, 100, 60)  # 40% below the quota: a tenth of the ring-full time back (16e6 // 60 // 10)
    assert d.throttle_us[0] == 100_000 - 266_666 // 10 == 73_334
    d = _limit()
    d._adjust(0, 1, 1000)
    d._adjust(0, 1, 1000)  # never above 99 ring-full times
    assert d.throttle_us[0] == 16_000 * 99 == 1_584_000
    d._adjust(0, 1, 20)  # within 25 MiB/s of the quota: left alone
    assert d.throttle_us[0] == 1_584_000


def test_dirty_limit_sleep_share():
    d = _limit()
    d.max_dirtyrate = 1000  # full in 16000 us
    d.throttle_us[:] = [48_000, 0]
    assert d._sleep_share().tolist() == [75.0, 0.0]
    assert np.all(_limit()._sleep_share() == 0)
