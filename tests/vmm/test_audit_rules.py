"""QEMU's rules for who reaps the dirty rings, under which lock, and how a stop ends a throttle
sleep (QEMU 9.x accel/kvm/kvm-all.c, system/dirtylimit.c, system/cpu-throttle.c,
migration/ram.c), each checked on a real run of the VMM:

- kvm_cpu_exec, KVM_EXIT_DIRTY_RING_FULL: with dirty-limit in service the vCPU thread reaps its
  own ring only (``kvm_dirty_ring_reap(kvm_state, cpu)``), otherwise every ring (``NULL``);
- kvm_dirty_ring_flush (every migration sync with the ring): kvm_cpu_synchronize_kick_all first
  kicks every vCPU that is in the guest, so each pays one exit round trip before the reap;
- kvm_dirty_ring_reaper_thread: the reap and the KVM_RESET_DIRTY_RINGS are done holding the big
  QEMU lock, so a vCPU thread that wants it meanwhile waits (a stall);
- cpu_throttle_thread: the sleep loop ends when ``cpu->stop`` is set, so stopping the VM
  (pause_all_vcpus) does not wait for an auto-converge sleep to run out.

Each test was seen to fail on a mutant that drops the rule (see each docstring)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from ringenv.vmm import MigrationRun
from ringenv.vmm.session import PARKED, SLEEP

from ._helpers import on_pause, small

MS = 1_000_000
NS = 1_000_000_000


def _caller(depth=2):
    """The name of the function that called the spied method (``depth`` frames up)."""
    return sys._getframe(depth).f_code.co_name


def test_under_dirty_limit_in_service_a_ring_full_exit_reaps_only_its_own_ring():
    """kvm_cpu_exec: ``if (dirtylimit_in_service()) kvm_dirty_ring_reap(kvm_state, cpu); else
    kvm_dirty_ring_reap(kvm_state, NULL);``. Every ring-full reap on a vCPU thread passes that
    vCPU's index once dirty-limit is in service (and None before); the other rings' waiting
    entries are left where they are. Mutant killed: ``self.collector.reap(None)`` in
    ``Session._vcpu_out``."""
    cfg = small("analytics", vm={"vcpus": 2}, throttle="dirty-limit", link={"give_up_s": 40})
    run = MigrationRun(cfg)
    col = run.collector
    reap = col.reap
    calls, left_alone = [], []

    def spy(only=None):
        frame = sys._getframe(1)
        if frame.f_code.co_name != "_vcpu_out":
            return reap(only)
        i = frame.f_locals["i"]
        before = col.ready()
        out = reap(only)
        after = col.ready()
        others = [j for j in range(len(before)) if j != i]
        if only is not None:
            left_alone.append(all(after[j] == before[j] for j in others) and after[i] == 0)
        calls.append((i, only, run.throttle.in_service))
        return out

    col.reap = spy
    m = run.run()
    assert m.verified
    in_service = [(i, only) for i, only, svc in calls if svc]
    before = [(i, only) for i, only, svc in calls if not svc]
    assert len(in_service) >= 4 and {i for i, _ in in_service} == {0, 1}, calls
    assert all(only == i for i, only in in_service), in_service
    assert before and all(only is None for _, only in before), before  # not in service: every ring
    assert left_alone and all(left_alone)


def test_a_migration_sync_with_the_ring_kicks_every_vcpu_in_the_guest_first():
    """kvm_dirty_ring_flush -> kvm_cpu_synchronize_kick_all (from migration_bitmap_sync's
    log_sync_global): run_on_cpu on each vCPU in turn; a vCPU in the guest when its turn comes
    leaves it (one more exit, one exit round trip in the kernel's count and in its thread's
    ``exit_ns``), and the caller waits that round trip before the next kick; a vCPU out of the
    guest is not kicked again; only then are the rings reaped. Mutant killed: run_on_all_vcpus's
    kick (or its wait) dropped."""
    run = MigrationRun(small("analytics", vm={"vcpus": 2}, link={"give_up_s": 40}))
    costs = run.costs
    kicks = []  # (time, vCPU, in the guest before) of every kick

    def spy_kick(v, kick):
        def spy():
            kicks.append((run.loop.now, v.index, v.in_guest))
            return kick()
        return spy

    for v in run.vcpus:
        v.kick = spy_kick(v, v.kick)
    orig = run.run_on_all_vcpus
    seen, bad = [], []

    def spy():
        exits = [v.stats.exits for v in run.vcpus]
        kexit = [v.stats.exit_ns for v in run.vcpus]
        t0, n = run.loop.now, len(kicks)
        took = yield from orig()
        mine = kicks[n:]
        assert all(inside for _, _, inside in mine)  # only a vCPU in the guest is kicked
        kicked = [i for _, i, _ in mine]
        for i, v in enumerate(run.vcpus):
            want = kicked.count(i)
            if want > 1 or v.stats.exits - exits[i] != want or v.stats.exit_ns - kexit[i] != want * costs.exit_ns:
                bad.append((run.loop.now, i, want, v.stats.exits - exits[i]))
        if kicked and took == len(kicked) * costs.exit_ns:  # (no throttle sleep waited for)
            seen.append(kicked)
            # one after the other, each after the previous one's round trip
            if [t - t0 for t, _, _ in mine] != [k * costs.exit_ns for k in range(len(mine))]:
                bad.append((t0, [t - t0 for t, _, _ in mine]))
        elif took < len(kicked) * costs.exit_ns:
            bad.append((t0, took, kicked))
        return took

    run.run_on_all_vcpus = spy
    m = run.run()
    assert m.verified and not bad, bad[:3]
    assert len(seen) >= 2 and any(len(k) == 2 for k in seen), seen  # syncs found vCPUs in the guest

@pytest.mark.parametrize("collector", ["ring", "bitmap"])
def test_the_set_up_s_sync_kicks_every_vcpu_as_every_ring_sync_does(collector):
    """ram_init_bitmaps -> migration_bitmap_sync_precopy -> kvm_log_sync_global ->
    kvm_dirty_ring_flush: the set-up's first sync kicks each vCPU in the guest (one exit
    round trip each, after logging is on) before it reaps; the bitmap's does not (no flush).
    Mutant killed: the set-up calling the collector's sync directly."""
    run = MigrationRun(small("default", vm={"vcpus": 2}, collector=collector))
    kicks = []
    for v in run.vcpus:
        v.kick = (lambda v, kick: lambda: (kicks.append((run.loop.now, v.index, run.phase)), kick())[1])(v, v.kick)
    while run.iterations == 0:
        run.advance(run.now_ns + 1000)
    setup = [(t, i) for t, i, phase in kicks if phase == "setup"]
    if collector == "bitmap":
        assert setup == []
    else:
        assert [i for _, i in setup] == [0, 1]
        assert setup[1][0] - setup[0][0] == run.costs.exit_ns  # one after the other
        assert all(v.stats.exits == 1 for v in run.vcpus)


def test_the_reaper_reaps_and_resets_holding_the_big_lock():
    """kvm_dirty_ring_reaper_thread: ``bql_lock(); kvm_dirty_ring_reap(s, NULL); bql_unlock();``
    (the reap includes the KVM_RESET_DIRTY_RINGS). The reaper process owns ``bql`` while it
    reaps and resets, and keeps it for the time they take: a vCPU thread that asks for the
    lock as the reaper harvests (a ring-full exit arriving then, here a probe doing what the
    vCPU thread does) stalls until the reaper is done. Mutant killed: ``yield self.bql`` and
    ``self.bql.release_at(end)`` removed from ``Session._reaper``."""
    run = MigrationRun(small("analytics", vm={"vcpus": 2}, link={"give_up_s": 40}))
    col = run.collector
    reap, reset = col.reap, col.reset
    held, windows, stalls = [], [], []
    cur = {}

    def probe(t0):
        """A ring-full exit's first step on the vCPU thread: take the big lock (the wait is a
        stall), then let it go."""
        yield run.bql
        stalls.append((t0, run.loop.now))
        run.bql.release_at(run.loop.now)

    def spy_reap(only=None):
        if _caller() != "_reaper":
            return reap(only)
        held.append(run.bql.owner is run.reaper and run.loop.now >= run.bql.busy_until)
        n, work = reap(only)
        cur.update(t=run.loop.now, work=work)
        if len(windows) < 5:
            run.spawn(probe(run.loop.now), run.PRIO_VCPU, "probe")
        return n, work

    def spy_reset(n):
        if _caller() != "_reaper":
            return reset(n)
        held.append(run.bql.owner is run.reaper)
        ns = reset(n)
        windows.append((cur["t"], cur["t"] + cur["work"] + ns))
        return ns

    col.reap, col.reset = spy_reap, spy_reset
    m = run.run()
    assert m.verified and run.reaper_runs >= 10
    assert len(held) == 2 * run.reaper_runs and all(held), held
    assert len(stalls) == 5
    for (t0, got), (start, end) in zip(stalls, windows):
        assert t0 == start and end > start
        assert got >= end, ((got - t0), (end - start))  # stalled until the reaper let the lock go


def test_stopping_the_vm_cuts_an_auto_converge_sleep_short():
    """cpu_throttle_thread sleeps in ``while (sleeptime_ns > 0 && !cpu->stop)``; pause_all_vcpus
    sets ``cpu->stop`` and kicks (the halt condition is broadcast), so the sleep ends at once.
    Auto-converge forced to 99% (990 ms asleep every 1 s) from the start; the forced switchover
    at 2 s stops the VM while both vCPU threads are asleep for most of a second: every vCPU is
    parked long before those sleeps would end (here at once), and the sleeps count only up to
    the stop. Mutant killed: ``self.vproc[i].interrupt()`` removed from ``Session.pause_vm``."""
    cfg = small("analytics", vm={"vcpus": 2}, throttle="auto-converge", link={"give_up_s": 2})
    run = MigrationRun(cfg)
    th = run.throttle
    th.pct = 99.0  # as if the trigger had stepped it to max-cpu-throttle
    th.timer = run.spawn(th._tick(), run.PRIO_THROTTLE, "cpu-throttle")
    stops = []

    def note():
        wakes = [run.vproc[i].pending[0] for i in range(len(run.vcpus))
                 if run.vstate[i] == SLEEP and run.vproc[i] is not None and run.vproc[i].pending]
        stops.append((run.loop.now, wakes))

    on_pause(run, note)
    pause = run.pause_vm
    parked = []

    def timed_pause():
        yield from pause()
        parked.append((run.loop.now, list(run.vstate)))

    run.pause_vm = timed_pause
    m = run.run()
    assert m.verified and not m.converged and len(stops) == 1 and len(parked) == 1
    t_stop, wakes = stops[0]
    t_parked, states = parked[0]
    assert len(wakes) == len(run.vcpus) and min(wakes) - t_stop > 500 * MS, (t_stop / NS, wakes)
    assert states == [PARKED] * len(run.vcpus)
    assert t_parked - t_stop < 1 * MS, (t_stop / NS, t_parked / NS)  # not at the sleeps' end
    # the sleeps cut short count up to the stop, not to their planned end
    assert m.vcpu_throttle_s <= len(run.vcpus) * t_stop / NS
    assert np.all(run._throttle_len == 0)
