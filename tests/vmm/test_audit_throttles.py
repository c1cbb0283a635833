"""The throttles and the migration thread's decisions against QEMU (migration/options.c,
migration/migration.c, migration/cpu-throttle.c, cpus-common.c): rules an audit found the
simulator departing from. Each test states QEMU's behaviour and fails on the current code."""

from __future__ import annotations

import pytest

from ringenv.config import ConfigError, load_host_profile, load_scenario
from ringenv.vmm import MigrationRun

from ._helpers import on_pause, small

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
    p = load_host_profile("arm64-4k")
    p = p.model_copy(update={"costs": p.costs.model_copy(update={"bitmap_scan_page_ns": 3000})})
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

    def holder():  # another thread (a reaper, a sync's merge) holds the BQL for 50 ms
        yield run.bql
        run.bql.release_at(run.loop.now + hold)
        yield hold

    run.spawn(holder(), run.PRIO_MAIN, "bql-holder")
    run.advance(run.loop.now)
    t0 = run.loop.now
    assert run.bql.held_at(t0)
    starts = {}
    sleep = run._throttle_sleep

    def spy(i, start, length):
        if length:
            starts.setdefault(i, start)
        return sleep(i, start, length)

    run._throttle_sleep = spy
    run.queue_throttle_work(2_500_001)  # cpu_throttle_thread at 20%
    run.advance(t0 + 100 * MS)
    assert sorted(starts) == [0, 1]
    assert all(s >= t0 + hold for s in starts.values()), {i: (s - t0) / MS for i, s in starts.items()}
