"""QEMU's rules that the VMM follows beyond the main loop (docs/reference/migration.md s2,
kvm-dirty-ring.md s9), and metrics that must move as the simulated time passes: each test is a
case QEMU's code settles (migration_completion, kvm_dirty_ring_reaper_thread, run_on_cpu)."""

from __future__ import annotations

import pytest

from ringenv.vmm import CheckpointRun, MigrationRun
from ringenv.vmm.session import DLSLEEP, SLEEP

from ._helpers import small

MS = 1_000_000
NS = 1_000_000_000


def _step(run, step_ns, each=None):
    """Advance ``run`` to its end in steps of ``step_ns``, calling ``each(run)`` after every step."""
    t = 0
    while not run.done:
        t += step_ns
        run.advance(t)
        if each is not None:
            each(run)
    return run.metrics()


def test_stop_and_copy_is_not_rate_limited_by_max_bandwidth():
    """migration_completion disables the rate limit before the final save: the last pass and the
    device state go at the link's rate, not at max-bandwidth's."""
    cfg = small("web", 512 << 20, link={"max_bandwidth_mibps": 32})
    assert cfg.link.rate_Bps < 0.5 * cfg.link.link_Bps
    m = MigrationRun(cfg).run()
    assert m.verified
    at_link = m.pass_bytes[-1] / cfg.link.link_Bps
    assert at_link <= m.downtime_s < at_link * 1.15 + 0.005, (m.downtime_s, at_link)


def test_progress_never_goes_down():
    """``progress`` is the share of RAM sent at least once: a slice in flight that re-sends pages
    must not take back pages that were sent before."""
    seen = []
    m = _step(MigrationRun(small("default")), 20 * MS, lambda r: seen.append(r.metrics().progress))
    assert m.verified and m.passes >= 2 and m.pages_resent > 0
    assert all(b >= a for a, b in zip(seen, seen[1:])), [(a, b) for a, b in zip(seen, seen[1:]) if b < a][:3]
    assert seen[-1] == 1.0


def test_throttle_sleeps_count_as_they_pass():
    """An interval's cost is the difference of two records: a dirty-limit sleep of seconds counts
    as it passes, so no step shows more throttled time than its vCPUs had (the host synchronised
    with the steps, as the environment runs it)."""
    cfg = small("analytics", vm={"vcpus": 2}, throttle="dirty-limit", link={"give_up_s": 40})
    prev, worst = [0.0, 0.0], []

    def check(r):
        m = r.metrics()
        dt = (m.time_s - prev[0]) * 2
        if m.vcpu_throttle_s - prev[1] > dt + 1e-9:
            worst.append((m.time_s, m.vcpu_throttle_s - prev[1], dt))
        prev[:] = [m.time_s, m.vcpu_throttle_s]

    m = _step(MigrationRun(cfg, host_sync_ms=100), 100 * MS, check)
    assert m.vcpu_throttle_s > 1.0 and not worst, worst[:3]


def test_the_reaper_sleeps_while_dirty_limit_is_in_service():
    """kvm_dirty_ring_reaper_thread keeps sleeping while dirtylimit_in_service(): the ring-full
    exits then do all the reaping, per vCPU."""
    cfg = small("analytics", vm={"vcpus": 2}, throttle="dirty-limit", link={"give_up_s": 40})
    state = {}

    def note(r):
        if "runs" not in state and r.throttle.in_service:
            state["runs"], state["exits"] = r.reaper_runs, r.metrics().full_exits

    run = MigrationRun(cfg)
    m = _step(run, 50 * MS, note)
    assert "runs" in state and m.full_exits > state["exits"]  # the exits went on reaping
    assert run.reaper_runs <= state["runs"] + 1  # (one may have been waiting for the lock)


@pytest.mark.parametrize("throttle, states", [("dirty-limit", (DLSLEEP,)), ("auto-converge", (SLEEP,))])
def test_a_sync_waits_for_every_vcpu_thread_to_come_back(throttle, states):
    """kvm_dirty_ring_flush kicks every vCPU with a synchronous run_on_cpu: a vCPU thread asleep
    in a throttle sleep does the work when it wakes, so the sync lasts at least until then."""
    cfg = small("analytics", vm={"vcpus": 2}, throttle=throttle, link={"give_up_s": 40})
    snaps, syncs = [], []

    def note(r):
        sleeping = [r.vproc[i].pending[0] for i in range(2) if r.vstate[i] in states and r.vproc[i].pending]
        snaps.append((r.loop.now, sleeping))
        if len(r.sync_ns) > len(syncs):
            syncs.append((r._last_sync_ns - r.sync_ns[-1], r._last_sync_ns))

    _step(MigrationRun(cfg), 1 * MS, note)
    checked = 0
    for start, end in syncs[1:]:  # (the set-up sync comes before any throttle)
        for t, wakes in snaps:
            if t <= start:
                for w in wakes:
                    if w > start:
                        checked += 1
                        assert w <= end, (start / NS, end / NS, w / NS)
    assert checked > 0


def test_a_checkpoint_run_that_takes_none_is_not_verified_nor_on_schedule():
    """The base image alone outlasts the horizon: no checkpoint was taken, so nothing was verified
    and the schedule was not kept."""
    cfg = small("checkpoint", 512 << 20, checkpoint={"horizon_s": 12, "period_s": 4, "storage_mbps": 5})
    m = CheckpointRun(cfg).run()
    assert m.checkpoints == 0 and m.verified is None and m.converged is False and m.lost_writes == 0


def test_a_checkpoint_past_the_horizon_is_no_overrun():
    """The checkpoint under way at the horizon is finished; the next one would be due after the
    horizon, so none is late."""
    cfg = small("checkpoint", 512 << 20, checkpoint={"horizon_s": 11.0, "period_s": 1.0, "storage_mbps": 50},
                rate_scale=8)
    m = CheckpointRun(cfg).run()
    assert m.checkpoints == 1 and m.total_s > 11.0
    assert m.checkpoint_overruns == 0 and m.converged is True and m.verified is True


def test_remaining_bytes_keep_the_pages_taken_for_a_clear():
    """Bitmap collector: the pages the migration thread took before a KVM_CLEAR_DIRTY_LOG are
    still to send while the CLEAR runs: sent + remaining moves only at syncs (GET_DIRTY_LOG)."""
    bad = []
    prev = {}

    def check(r):
        m = r.metrics()
        if prev and m.harvests == prev["h"] and m.phase == prev["phase"] and m.phase in ("bulk", "iterate"):
            a = prev["sent"] + prev["rem"] // r.page_size
            b = m.pages_sent + m.remaining_bytes // r.page_size
            if a != b:
                bad.append((m.time_s, b - a))
        prev.update(h=m.harvests, phase=m.phase, sent=m.pages_sent, rem=m.remaining_bytes)

    m = _step(MigrationRun(small("web", 2 << 30, collector="bitmap")), 1 * MS, check)
    assert m.verified and m.clear_dirty_log_calls > 0 and not bad, bad[:3]


def test_the_dirty_rate_window_is_at_least_a_second_at_any_interval():
    """calc-dirty-rate's estimate spans >= 1 s of harvests even with a 10 ms reaper (100 reaps a
    second)."""
    run = MigrationRun(small("default", interval_ms=10, ring_entries=1024))
    for t in (3000, 5000):
        run.advance(t * MS)
        oldest = run._samples[0][0]
        assert run.vm.now - oldest >= NS, (t, (run.vm.now - oldest) / NS)
        assert run.vm.now - run._samples[1][0] < NS  # and no older sample than that one is kept
