"""The throttles and the migration thread's decisions against QEMU (migration/options.c,
migration/migration.c, migration/cpu-throttle.c, cpus-common.c), and a review of the changes
made for them (the throttle sleep under the big lock, the rate limiter): rules the simulator
departed from when audited. Each test states QEMU's behaviour and what the simulator did."""

from __future__ import annotations

import pytest

from ringenv.config import ConfigError, load_host_profile, load_scenario, scale_scenario
from ringenv.vmm import MigrationRun

from ._helpers import ended_at, hold_bql, on_pause, sleep_starts, small

MS = 1_000_000
MiB = 1 << 20


# ------------------------------------------------------------------ parameter checks


def test_max_cpu_throttle_below_cpu_throttle_initial_is_refused():
    """QEMU migrate_params_check (migration/options.c): ``max_cpu_throttle <
    cpu_throttle_initial || max_cpu_throttle > 99`` is refused, "Parameter 'max_cpu_throttle'
    expects an integer in the range of cpu_throttle_initial to 99". The simulator accepts
    initial 50 with max 30 and then runs a throttle QEMU cannot: mig_throttle_guest_down sets 50
    at the first trigger, then MIN(50 + 10, 30) = 30 at the second (the throttle goes DOWN)."""
    ok = load_scenario("analytics", throttle="auto-converge", auto_converge={"initial_pct": 30, "max_pct": 30})
    assert ok.auto_converge.max_pct == 30  # max == initial is accepted by QEMU
    with pytest.raises(ConfigError):
        load_scenario("analytics", throttle="auto-converge", auto_converge={"initial_pct": 50, "max_pct": 30})


# ------------------------------------------------------------------ the bandwidth measurement


def _rate_limited_idle(**link):
    """A 64 MiB idle guest migrated over 10 GbE with max-bandwidth 10 MiB/s (QEMU's rate limiter
    in force: a budget of 1 MiB per 100 ms window, sent in 0.84 ms at the link's rate)."""
    return load_scenario("idle", vm={"memory": 64 * MiB, "vcpus": 2},
                         link={"gbps": 10, "max_bandwidth_mibps": 10, "device_state_bytes": MiB, "give_up_s": 60,
                               **link})


def test_bandwidth_and_threshold_are_not_measured_again_once_the_vm_is_stopped():
    """QEMU migration_update_counters (bandwidth, threshold_size, expected_downtime) is called
    only from migration_rate_limit, at the bottom of migration_thread's loop; the switchover
    (migration_iteration_run -> migration_completion: vm stop, rate limit lifted, last sync,
    everything sent) happens inside migration_iteration_run, which then returns
    MIG_ITERATE_BREAK and leaves the loop. So no bandwidth window is measured during the
    stop-and-copy: threshold_size and the window's bandwidth stay what they were at the stop
    (Session.update_bandwidth's own docstring: "QEMU updates no counter once the completion
    has begun"; the simulator applies that to expected_downtime only).

    Here (downtime-limit 2 s, so ~20 MB are left for the stop-and-copy, 170 ms at the link's
    10 Gb/s with no rate limit) the simulator closes a window during the stop-and-copy: the
    record ends with bandwidth_Bps ~98 MB/s and threshold_bytes ~197 MB, the completion's
    unlimited rate, instead of ~10.5 MB/s and ~21 MB."""
    run = MigrationRun(_rate_limited_idle(gbps=1, downtime_limit_ms=2000))
    at_stop = []
    on_pause(run, lambda: at_stop.append((run.bandwidth_Bps, run.threshold_bytes, run.expected_downtime_s)))
    m = run.run()
    assert m.converged and len(at_stop) == 1
    bw, threshold, expected = at_stop[0]
    assert bw == pytest.approx(10 * MiB, rel=0.01)  # the rate-limited live windows
    assert m.expected_downtime_s == expected  # (already right)
    assert (m.bandwidth_Bps, m.threshold_bytes) == (bw, threshold)


def test_a_sync_that_fits_in_the_rate_limiter_s_window_costs_no_bandwidth():
    """QEMU's max-bandwidth is a budget per BUFFER_DELAY (100 ms) window, not a steady rate:
    migration_rate_exceeded stops ram_save_iterate once max-bandwidth / XFER_LIMIT_RATIO (10)
    bytes went out since the window began, and migration_rate_limit then waits
    (qemu_sem_timedwait) until iteration_start_time + BUFFER_DELAY, where
    migration_update_counters measures the window (transferred / time_spent) and resets the
    budget. The migration thread's other work in that window -- an exact sync in
    migration_iteration_run (ram_state_pending_exact), a KVM_CLEAR_DIRTY_LOG -- runs in the
    time the thread would otherwise wait: as long as it and the budget's sending fit in the
    100 ms, it costs no sending time and the window still measures max-bandwidth.

    Here: 10 MiB/s on 10 GbE (1 MiB per window, sent in 0.84 ms), a bitmap sync made to take
    ~49 ms (QEMU's scan at 3 us per page over 16384 pages), a guest dirtying 4 MB/s so that
    each exact sync is followed by more sending. In QEMU every live window measures
    >= 10 MiB/s. The simulator sends at a steady 10 MiB/s and adds each sync's 49 ms on top
    (Session.send_slice at MigrationRun.rate_Bps): the window that holds a sync measures
    ~7.9 MB/s (threshold_bytes ~25% low), and the run takes ~0.7 s longer than with fast syncs
    (QEMU: only the last exact sync and the stop-and-copy's, which no window absorbs)."""
    p = load_host_profile("arm64-4k").with_costs(bitmap_scan_page_ns=3000)
    wl = {"name": "uniform-4", "cpu_busy": 0.1, "regions": [{"fraction": 0.9, "rate_mbps": 4}]}
    cfg = load_scenario(_rate_limited_idle(), host=p, workload=wl, collector="bitmap")
    run = MigrationRun(cfg)
    windows = []
    update = run.update_bandwidth

    def spy():
        t0 = run._bw_t0
        update()
        if run._bw_t0 != t0 and run.paused_at is None:  # a window closed while the VM ran
            windows.append(run.bandwidth_Bps)

    run.update_bandwidth = spy
    m = run.run()
    assert m.converged and m.passes >= 3 and min(run.sync_ns) > 40 * MS  # syncs followed by sending
    assert min(windows) >= 0.99 * 10 * MiB, sorted(windows)[:3]


# ------------------------------------------------------------------ the throttle sleep


def test_an_auto_converge_sleep_begins_only_once_the_vcpu_thread_holds_the_big_lock():
    """cpu_throttle_timer_tick queues cpu_throttle_thread with async_run_on_cpu; the vCPU thread
    runs it from qemu_wait_io_event -> process_queued_cpu_work, which calls a (non-exclusive)
    work item with the BQL held: after the kick, kvm_cpu_exec returns only after bql_lock(). So
    a vCPU kicked for its throttle sleep while another thread holds the BQL starts the sleep
    (endtime_ns = now + sleeptime_ns, then qemu_cond_timedwait_bql) only once it has the lock.
    The simulator's vCPU thread takes the big lock only for a ring-full exit
    (Session._vcpu_out): here it starts a 2.5 ms sleep one exit round trip after the kick
    while the lock is held for 50 ms."""
    run = MigrationRun(small("idle", 64 * MiB, vm={"vcpus": 2}, throttle="auto-converge"))
    run.advance(300 * MS)  # past the set-up; the vCPUs run the (idle) guest
    hold = 50 * MS
    t0 = hold_bql(run, hold)
    starts = sleep_starts(run)
    run.queue_throttle_work(2_500_001)  # cpu_throttle_thread at 20%
    run.advance(t0 + 100 * MS)
    first = dict(reversed(starts))  # each vCPU's first sleep
    assert sorted(first) == [0, 1]
    assert all(s >= t0 + hold for s in first.values()), {i: (s - t0) / MS for i, s in first.items()}


# ====================================================================== change 4: the throttle sleep and the BQL
def _bql_held_for_50ms():
    """A 64 MiB idle guest, 2 vCPUs, auto-converge, past the set-up (both vCPUs in the guest);
    then another thread (a reaper, a sync's merge) takes the big lock and holds it 50 ms.
    Returns (run, t0, hold): the lock is held from t0 to t0 + hold."""
    run = MigrationRun(scale_scenario("idle", 64 * MiB, vm={"vcpus": 2}, throttle="auto-converge"))
    run.advance(300 * MS)
    hold = 50 * MS
    t0 = hold_bql(run, hold)
    assert run.bql.held_at(t0) and run.phase == "bulk"
    return run, t0, hold


def test_pause_does_not_wait_for_a_throttle_sleep_queued_behind_the_big_lock():
    """QEMU pause_all_vcpus sets cpu->stop, kicks, and waits on qemu_pause_cond releasing the
    BQL. A vCPU thread kicked for its throttle sleep and waiting for the BQL gets it, and
    qemu_wait_io_event -> qemu_wait_io_event_common (system/cpus.c) handles cpu->stop FIRST
    (qemu_cpu_stop: stopped, qemu_pause_cond broadcast) and only then runs its queued work
    (process_queued_cpu_work -> cpu_throttle_thread); even run first, cpu_throttle_thread's loop
    (while (sleeptime_ns > 0 && !cpu->stop)) would not sleep. So the pause completes when the
    lock is released, not a throttle sleep later.

    Here: lock held 50 ms from t0, sleep queued at t0 (990 ms, 99%), the pause asked at
    t0 + 1 ms: QEMU's pause completes at ~t0 + 50 ms. The simulator's vCPU thread takes the
    lock, then sleeps the whole 990 ms although the VM is being stopped (pause_vm only
    interrupts vCPUs already in SLEEP), and the pause completes at t0 + 1040 ms: a
    migration's downtime grows by the whole sleep."""
    run, t0, hold = _bql_held_for_50ms()
    run.queue_throttle_work(990_000_001)
    run.advance(t0 + 1 * MS)
    t = ended_at(run, run.pause_vm(), t0 + 1100 * MS)
    assert t is not None and t - t0 <= hold + 10 * MS, f"paused after {(t - t0) / MS:.1f} ms"


def test_a_throttle_tick_queues_no_second_sleep_while_the_first_waits_for_the_big_lock():
    """QEMU cpu_throttle_timer_tick queues cpu_throttle_thread only if
    !qatomic_xchg(&cpu->throttle_thread_scheduled, 1); cpu_throttle_thread clears the flag at
    its very end (after its sleep, the BQL held again). A tick while the vCPU thread still
    waits for the BQL to run the queued sleep therefore queues nothing. (The tick is a main-loop
    timer, run with the BQL held, so in QEMU the second one comes once the lock is free, at
    >= t0 + 50 ms, the flag still set: nothing queued either.)

    Here (20%: 2.5 ms sleeps, a tick every 12.5 ms): ticks at t0 and t0 + 12.5 ms, the lock
    held until t0 + 50 ms: each vCPU sleeps once in [t0, t0 + 60 ms) (50 -> 52.5 ms). The
    simulator zeroes throttle_work when the thread takes the work and the thread is OUT (not
    SLEEP) while it waits for the lock, so queue_throttle_work queues a second sleep: each vCPU
    sleeps twice (50 -> 52.5 and 52.5 -> 55 ms)."""
    run, t0, hold = _bql_held_for_50ms()
    starts = sleep_starts(run)
    run.queue_throttle_work(2_500_001)
    run.advance(t0 + 12_500_000)
    run.queue_throttle_work(2_500_001)  # the next tick
    run.advance(t0 + 60 * MS)
    assert sorted(i for i, _ in starts) == [0, 1], f"sleeps started per vCPU: {starts}"


def test_run_on_all_vcpus_waits_for_a_throttle_sleep_queued_ahead_of_its_work():
    """kvm_dirty_ring_flush -> kvm_cpu_synchronize_kick_all: run_on_cpu on each vCPU in turn,
    the caller waiting for its work item to be done. The vCPU's work list is FIFO and
    process_queued_cpu_work runs every item in order before the qemu_work_cond broadcast
    (cpus-common.c): a vCPU that has cpu_throttle_thread queued ahead of the kick runs the
    throttle sleep first. So the flush waits for that sleep, as run_on_all_vcpus's docstring
    says it does for a vCPU already asleep.

    Here: lock held 50 ms from t0, 2.5 ms sleeps queued at t0, the flush starts at t0 + 1 ms:
    it cannot return before t0 + 52.5 ms. The simulator sees the vCPU threads waiting for the
    lock as OUT ("runs it on its way back to KVM_RUN") and returns at once."""
    run, t0, hold = _bql_held_for_50ms()
    run.queue_throttle_work(2_500_001)
    run.advance(t0 + 1 * MS)
    t = ended_at(run, run.run_on_all_vcpus(), t0 + 100 * MS)
    assert t is not None and t - t0 >= hold + 2_500_001, f"returned after {(t - t0) / MS:.3f} ms"


# ====================================================================== change 5: the rate limiter
def test_rate_limited_bytes_are_on_the_wire_once_their_burst_is_sent():
    """With the rate limiter the migration thread writes a window's budget at the link's rate
    (ram_save_iterate ends with qemu_fflush) and then only waits (migration_rate_limit ->
    qemu_sem_timedwait): during the wait every byte of the window is on the wire and counted
    in QEMU's transferred bytes (migration_transferred_bytes).

    The first send here is 2540 pages (20 slices of 127) from t = 0.02 ms: windows of 256
    pages at 0.02, 100.02, ..., 800.02 ms (each burst over 0.84 ms later), the last 236 pages
    at 900.02 ms. At 50 ms the wire has carried 256 pages (1050624 bytes); at 850 ms 9 x 256
    pages (9455616 bytes). The simulator spreads the whole send pro rata over its 900.8 ms,
    waits included (Session._in_flight over Session._slice): bytes_sent 578385 at 50 ms (under
    the budget), 9836334 at 850 ms (more than has left), remaining_bytes and progress alike."""
    run = MigrationRun(_rate_limited_idle())
    bpp = run.page_wire_bytes
    run.advance(50 * MS)
    m = run.metrics()
    assert run.window_budget == MiB
    assert m.bytes_sent >= 256 * bpp, m.bytes_sent
    assert m.remaining_bytes <= (run.npages - 256) * run.page_size
    run.advance(850 * MS)
    m = run.metrics()
    assert m.bytes_sent <= 9 * 256 * bpp, m.bytes_sent


def test_rate_limited_pending_check_comes_only_when_a_window_has_ended():
    """QEMU migration_thread: migration_iteration_run (pending estimate, the exact sync when
    below threshold_size, the switchover) runs only while !migration_rate_exceeded (or
    urgent). ram_save_iterate sends until the budget is exceeded (or no dirty page is left,
    or 50 ms pass: not here, a budget takes 0.84 ms); migration_rate_limit then waits for the
    window's end, and the budget is reset (migration_update_counters -> migration_rate_reset,
    update_iteration_initial_status) before the next migration_iteration_run. So a pending
    check with dirty pages left always comes at the start of a window with nothing sent in it.

    The simulator sizes a send by ~50 ms slices at the average rate (send_slice's k from
    stop_below): its pending checks come mid-window. Here the exact sync that the estimate
    going below the threshold triggers starts at 6100.04 ms with 5 pages (20520 bytes) sent in
    the window and 763 pages dirty, a point where QEMU is still sending that window's budget."""
    run = MigrationRun(_rate_limited_idle())
    seen = []
    sync = run.sync

    def spy(last_stage=False):
        if not last_stage and run.paused_at is None:
            seen.append((run.loop.now / MS, run.bytes_sent - run._bw_b0, run.dirty.mig_count))
        return (yield from sync(last_stage))

    run.sync = spy
    m = run.run()
    assert m.converged and seen
    bad = [s for s in seen if s[1] and s[2]]
    assert not bad, f"(ms, bytes in the window, dirty pages) at a pending check: {bad}"


def test_max_bandwidth_below_ten_bytes_per_second_disables_the_rate_limiter():
    """QEMU migration_rate_set stores max-bandwidth / XFER_LIMIT_RATIO (integer division by
    10) as rate_limit_max, and migration_rate_exceeded returns false when rate_limit_max ==
    RATE_LIMIT_DISABLED (0): a max-bandwidth of 1..9 bytes/s is no limit at all, the
    migration runs at the link's rate (migration/migration-stats.c, migration-stats.h).

    Here 5 bytes/s on 10 GbE: all 64 MiB leave in ~54 ms. The simulator's window budget is
    int(5 x 0.1) = 0, taken as "no rate limiter", but MigrationRun.rate_Bps is the floor of one
    page per 100 ms (41040 B/s): ~8 KB sent in 200 ms."""
    run = MigrationRun(_rate_limited_idle(max_bandwidth_mibps=5 / MiB))
    run.advance(200 * MS)
    assert run.metrics().bytes_sent >= 32 * MiB
