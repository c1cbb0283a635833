"""Guest throttles QEMU uses to make a migration converge (migration/ram.c, system/cpu-throttle.c,
system/dirtylimit.c), re-implemented from their documented behaviour.

Both are armed by the same rule, checked at a dirty-bitmap sync at most once per second
(``migration_trigger_throttle``): over the period since the last check, if the bytes dirtied
exceed ``throttle-trigger-threshold`` (50%) of the bytes transferred, a counter goes up; the
second such period (the counter is only reset when it fires) the throttle engages or steps up.

:class:`AutoConverge` -- CPU throttling: first ``cpu-throttle-initial`` (20%), then +
``cpu-throttle-increment`` (10%) per trigger up to ``max-cpu-throttle`` (99%) (with
``tailslow`` the steps are computed from the dirty/threshold ratio, in whole percents as QEMU
does: cpu_ideal = (100 - pct) x threshold / dirty truncated, step min(100 - pct - cpu_ideal,
increment)). A timer every 10 ms / (1 - pct) queues work on every vCPU (a kick when it is in
the guest) that sleeps pct / (1 - pct) x 10 ms + 1 ns (QEMU's fix for double rounding).
QEMU 9.2 and later also keep a dirty-sync timer while a migration with
auto-converge runs (``cpu_throttle_dirty_sync_timer``): every ``dirty_sync_timer_ms`` (5 s; 0:
off, as before 9.2), if no dirty sync happened since the previous tick and the first pass is
over, it syncs (and so checks the trigger rule) without waiting for the end of the pass.

:class:`DirtyLimit` -- per-vCPU dirty-rate quota (``vcpu-dirty-limit``, 1 MB/s by default,
ring only): every ``x-vcpu-dirty-limit-period`` (1 s) a thread flushes the rings (waiting, as
every flush does, for the vCPU threads asleep in a throttle sleep), measures each vCPU's dirty
rate from the entries harvested from its ring over the period, and adjusts the vCPU's sleep after
each ring-full exit (``throttle_us_per_full``): proportionally when the rate is far from the
quota (more than 50% off), by a tenth of the ring-full time otherwise, within 25 MB/s of the
quota it is left alone; never above 99 ring-full times. As in QEMU, rates and quota are whole
MiB/s (the pages x 1000 converted down to MiB, then divided by the period in ms) and the rule
works in integers: a vCPU dirtying less than 1 MiB/s reads 0. QEMU counts a harvested ring
entry as one page and converts pages in 4 KiB target pages (qemu_target_pages_to_MiB), while an
entry is a host page: on 16K and 64K arm64 hosts the rates and the ring's size read 4x and 16x
low, and so they do here. While it is in service a ring-full exit reaps only that vCPU's ring.
"""

from __future__ import annotations

import numpy as np

from ..config import to_ns

MS = 1_000_000
TIMESLICE_NS = 10 * MS  # CPU_THROTTLE_TIMESLICE_NS
DIRTYLIMIT_TOLERANCE_RANGE = 25  # MB/s
DIRTYLIMIT_LINEAR_ADJUSTMENT_PCT = 50
DIRTYLIMIT_THROTTLE_PCT_MAX = 99
#: QEMU's target page (TARGET_PAGE_SIZE on arm64 and x86): qemu_target_pages_to_MiB's unit
TARGET_PAGE_SIZE = 4096


class Trigger:
    """migration_bitmap_sync's rate period (RAMState's time_last_bitmap_sync,
    num_dirty_pages_period, bytes_xfer_prev), closed by a sync more than 1 s after it began:
    migration_update_rates sets ``dirty_pages_rate`` then, and migration_trigger_throttle
    checks the shared arming rule. Every run keeps one (with no throttle the rule's firing is
    ignored: the rate still feeds QEMU's expected-downtime)."""

    def __init__(self, threshold_pct: int):
        self.threshold_pct = threshold_pct
        self.period_start = 0
        self.dirty_pages_period = 0
        self.xfer_prev = 0
        self.high_cnt = 0
        self.last = (0, 0)  # (bytes dirtied, threshold) of the last firing period
        self.dirty_pages_rate = 0  # pages/s of the last closed period (QEMU's integer ms arithmetic)

    def begin(self, start: int, new_pages: int) -> None:
        """The set-up's sync, which began at ``start``: migration_bitmap_sync sets
        time_last_bitmap_sync then (the first period starts there) and counts its new pages."""
        self.period_start = start
        self.dirty_pages_period += new_pages

    def on_sync(self, now: int, new_pages: int, page_size: int, bytes_xfer: int) -> bool:
        self.dirty_pages_period += new_pages
        if now <= self.period_start + 1000 * MS:
            return False
        self.dirty_pages_rate = self.dirty_pages_period * 1000 // ((now - self.period_start) // MS)
        dirty = self.dirty_pages_period * page_size
        threshold = (bytes_xfer - self.xfer_prev) * self.threshold_pct // 100
        fire = False
        if dirty > threshold:
            self.high_cnt += 1
            if self.high_cnt >= 2:
                self.high_cnt = 0
                fire = True
                self.last = (dirty, threshold)
        self.period_start = now
        self.dirty_pages_period = 0
        self.xfer_prev = bytes_xfer
        return fire


class NoThrottle:
    name = "none"
    pct = 0.0
    in_service = False
    next_sync_tick = None  # ns: when a periodic dirty sync may be due (None: never)

    def __init__(self, session, threshold_pct: int):
        self.s = session
        self.trigger = Trigger(threshold_pct)  # the rate period and the arming rule

    def start(self, now: int) -> None:
        """The migration starts at ``now`` (its thread, before the set-up)."""

    def sync_due(self) -> bool:
        """Whether a periodic dirty sync is due now (see :class:`AutoConverge`)."""
        return False

    def on_setup_sync(self, start: int, new_pages: int) -> None:
        """The set-up's sync began at ``start`` and found ``new_pages`` (:meth:`Trigger.begin`)."""
        self.trigger.begin(start, new_pages)

    def on_sync(self, session, new_pages: int) -> None:
        """A sync found ``new_pages``: the rate period goes on (no throttle to arm)."""
        s = self.s
        self.trigger.on_sync(s.loop.now, new_pages, s.page_size, s.bytes_sent)

    def after_full_exit(self, i: int) -> int:
        return 0

    def stop(self) -> None:
        pass

    def on_cancel(self) -> None:
        """migrate_cancel (migration_cancel), as the command runs: only dirty-limit ends then."""


class AutoConverge(NoThrottle):
    name = "auto-converge"

    def __init__(self, session, cfg):
        super().__init__(session, cfg.trigger_threshold_pct)
        self.cfg = cfg
        self.pct = 0.0  # current throttle percentage, 0..99
        self.steps = 0
        self.timer = None
        self.stopped = False
        self._sync_period = to_ns(cfg.dirty_sync_timer_ms, MS)
        self._prev_syncs = 0  # the dirty-sync count at the timer's previous tick

    def start(self, now: int) -> None:
        """migration_thread: cpu_throttle_dirty_sync_timer(true) before the set-up (QEMU >= 9.2)."""
        if self._sync_period:
            self.next_sync_tick = now + self._sync_period
            self._prev_syncs = self.s.iterations

    def sync_due(self) -> bool:
        """cpu_throttle_dirty_sync_timer_tick for the ticks up to now: a tick finding the dirty
        sync count unchanged since the previous tick (and the set-up sync not the only one) asks
        for a sync, re-arming the timer after it (:meth:`on_sync`); any other tick re-arms it a
        period on. QEMU runs the sync from its main loop under the migration bitmap mutex,
        which the migration thread holds across each ram_save_iterate: it lands between two
        slices, where the migration loop calls this (the slices stop at the tick)."""
        if self.next_sync_tick is None or self.stopped:
            return False
        s = self.s
        while s.loop.now >= self.next_sync_tick:
            n = s.iterations
            if n > 1 and n == self._prev_syncs:
                return True
            self._prev_syncs = n
            self.next_sync_tick += self._sync_period
        return False

    def on_sync(self, session, new_pages: int) -> None:
        s = self.s
        if self.next_sync_tick is not None and s.loop.now >= self.next_sync_tick:
            # the sync a tick asked for: the timer is re-armed a period after it
            self._prev_syncs = s.iterations
            self.next_sync_tick = s.loop.now + self._sync_period
        if not self.trigger.on_sync(s.loop.now, new_pages, s.page_size, s.bytes_sent):
            return
        c = self.cfg
        if self.pct == 0:
            new = c.initial_pct
        elif not c.tailslow:
            new = min(self.pct + c.increment_pct, c.max_pct)
        else:  # mig_throttle_guest_down with tailslow: QEMU's integer percentages
            dirty, threshold = self.trigger.last
            cpu_now = 100 - int(self.pct)
            cpu_ideal = int(cpu_now * (threshold * 1.0 / dirty)) if dirty else cpu_now  # (uint64_t)
            new = min(int(self.pct) + min(cpu_now - cpu_ideal, c.increment_pct), c.max_pct)
        self.pct = float(new)
        self.steps += 1
        if self.timer is None or not self.timer.alive:
            self.timer = s.spawn(self._tick(), s.PRIO_THROTTLE, "cpu-throttle")

    def _tick(self):
        """cpu_throttle_timer_tick."""
        s = self.s
        while self.pct > 0 and not self.stopped and not s.finished:
            p = self.pct / 100.0
            # cpu_throttle_thread: "Add 1ns to fix double's rounding error (like 0.9999999...)"
            s.queue_throttle_work(int(p / (1.0 - p) * TIMESLICE_NS + 1))
            yield int(TIMESLICE_NS / (1.0 - p))

    def stop(self) -> None:
        """cpu_throttle_stop (at switchover; it also stops the dirty-sync timer); ``pct`` keeps
        the last value for the record."""
        self.stopped = True
        self.next_sync_tick = None


class DirtyLimit(NoThrottle):
    name = "dirty-limit"

    def __init__(self, session, cfg):
        # throttle-trigger-threshold is a migration parameter: auto-converge's config holds it
        super().__init__(session, session.cfg.auto_converge.trigger_threshold_pct)
        self.cfg = cfg
        nv = len(session.vcpus)
        self.in_service = False
        self.quota = int(cfg.vcpu_limit_mbps)
        self.throttle_us = np.zeros(nv, dtype=np.int64)  # cpu->throttle_us_per_full
        self.rate = np.zeros(nv, dtype=np.int64)  # last measured MiB/s per vCPU
        self.max_dirtyrate = 0
        self.proc = None
        self.pct = 0.0
        self.cancelled = False

    def on_cancel(self) -> None:
        """migration_cancel -> qmp_cancel_vcpu_dirty_limit: no sleep after a ring-full exit from
        now on (one under way runs out: a usleep in the vCPU thread), the rate thread stops, and
        no later sync sets a limit again. ``pct`` keeps its last value for the record."""
        self.cancelled = True
        self.in_service = False
        self.throttle_us[:] = 0

    def on_sync(self, session, new_pages: int) -> None:
        s = self.s
        if not self.trigger.on_sync(s.loop.now, new_pages, s.page_size, s.bytes_sent):
            return
        if self.in_service or self.cancelled:
            return  # migration_dirty_limit_guest: already limited to the same quota (or cancelled)
        self.in_service = True
        self.proc = s.spawn(self._stat_thread(), s.PRIO_THROTTLE, "dirtylimit")

    def _stat_thread(self):
        """vcpu_dirty_rate_stat_thread + dirtylimit_process, once per period.

        vcpu_calculate_dirtyrate: record each vCPU's harvested entries, sleep the period
        (dirty_stat_wait, whose elapsed time is the duration the rates are computed over), then
        global_dirty_log_sync: kvm_dirty_ring_flush runs a synchronous run_on_cpu on every
        vCPU in turn (:meth:`Session.run_on_all_vcpus`, waiting for those asleep in their
        dirty-limit sleep, as a migration sync does), then reaps and resets under the big lock;
        the entries harvested up to then over the duration are the rates. The wait and the
        flush are not part of the duration."""
        s = self.s
        period = int(self.cfg.period_ms * MS)
        col = s.collector
        while not (s.finished or self.cancelled):
            start = col.entries.copy()
            t0 = s.loop.now
            yield period
            if s.finished or self.cancelled:
                return
            dt_ms = max(1, (s.loop.now - t0) // MS)  # dirty_stat_wait's duration, in ms
            yield from s.run_on_all_vcpus()
            if s.finished or self.cancelled:
                return
            yield s.bql
            ns = col.flush()  # global_dirty_log_sync: reap, reset
            s.bql.release_at(s.loop.now + ns)
            yield ns
            if self.cancelled:
                return
            self.rate = self.rates(col.entries - start, dt_ms)
            for i in range(len(self.rate)):
                self._adjust(i, self.quota, int(self.rate[i]))
            self.pct = float(np.mean(self._sleep_share()))

    @staticmethod
    def rates(entries: np.ndarray, dt_ms: int) -> np.ndarray:
        """do_calculate_dirtyrate: whole MiB/s from the entries harvested over ``dt_ms``, an
        entry counted as one target page (see the module's docstring)."""
        return ((np.asarray(entries, dtype=np.int64) * 1000 * TARGET_PAGE_SIZE) >> 20) // max(1, int(dt_ms))

    def _ring_full_time_us(self, rate: int) -> int:
        """dirtylimit_dirty_ring_full_time: time to fill the ring at the highest rate seen, us
        (the ring's entries in target pages, as the rates)."""
        ring_mb = (self.s.cfg.ring_entries * TARGET_PAGE_SIZE) >> 20
        self.max_dirtyrate = max(self.max_dirtyrate, rate)
        return ring_mb * 1_000_000 // self.max_dirtyrate

    def _adjust(self, i: int, quota: int, current: int) -> None:
        """dirtylimit_adjust_throttle / dirtylimit_set_throttle, in whole MiB/s and us."""
        if abs(quota - current) <= DIRTYLIMIT_TOLERANCE_RANGE:
            return
        if current == 0:
            self.throttle_us[i] = 0
            return
        full_us = self._ring_full_time_us(current)
        hi, lo = max(quota, current), min(quota, current)
        if (hi - lo) * 100 // hi > DIRTYLIMIT_LINEAR_ADJUSTMENT_PCT:
            if quota < current:
                pct = (current - quota) * 100 // current
                self.throttle_us[i] += int(full_us * pct / (100 - pct))
            else:
                pct = (quota - current) * 100 // quota
                self.throttle_us[i] -= int(full_us * pct / (100 - pct))
        else:
            self.throttle_us[i] += full_us // 10 if quota < current else -(full_us // 10)
        self.throttle_us[i] = min(self.throttle_us[i], full_us * DIRTYLIMIT_THROTTLE_PCT_MAX)
        self.throttle_us[i] = max(self.throttle_us[i], 0)

    def _sleep_share(self) -> np.ndarray:
        full_us = self._ring_full_time_us(0) if self.max_dirtyrate > 0 else 0
        if full_us <= 0:
            return np.zeros_like(self.throttle_us)
        return 100.0 * self.throttle_us / (self.throttle_us + full_us)

    def after_full_exit(self, i: int) -> int:
        """dirtylimit_vcpu_execute: the sleep after a ring-full exit, ns."""
        if not self.in_service:
            return 0
        return int(self.throttle_us[i] * 1000)


def make_throttle(session):
    cfg = session.cfg
    if cfg.throttle == "auto-converge":
        return AutoConverge(session, cfg.auto_converge)
    if cfg.throttle == "dirty-limit":
        return DirtyLimit(session, cfg.dirty_limit)
    return NoThrottle(session, cfg.auto_converge.trigger_threshold_pct)
