"""An operator's migrate_cancel at any moment (``link.cancel_at_s``, ``MigrationRun.cancel()``).

QEMU's migrate_cancel runs in the main loop under the big lock: it waits for the lock, sets the
state to cancelling and shuts the migration stream down. What the migration thread is doing then
decides what follows:

- sending a slice: the next write fails, nothing more goes on the wire (what the socket still
  held is lost), and the thread leaves its loop;
- waiting for the rate limiter's window to end: the wait is not cut short (migrate_fd_cancel
  posts no semaphore), the thread leaves its loop at the window's end;
- holding the big lock (the setup, a sync, the stop-and-copy): the cancel waits for it. After a
  sync the thread leaves its loop at once; the stop-and-copy holds the lock to its end, so the
  migration completes and the cancel finds nothing to cancel;
- stopping the VM for the switchover (vm_stop waits for the vCPUs without the lock): the
  completion then runs its last sync, every write fails, and the VM is started again at the
  source (migration_iteration_finish): the guest was stopped for nothing (``downtime_s``).

Then migrate_fd_cleanup turns dirty logging off under the big lock, as a cancel at give-up does
(tests/vmm/test_cancel.py)."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest

import ringenv  # noqa: F401
from ringenv.config import ConfigError, load_scenario
from ringenv.kvm import uapi as U
from ringenv.vmm import CheckpointRun, MigrationRun
from ringenv.vmm.session import NS

from ._helpers import hold_bql, on_pause, run_cli, sleep_starts, small

US = 1000
#: counters a cancel freezes where the stream was shut down
SENT = ("bytes_sent", "pages_sent", "pages_resent", "zero_pages", "progress", "remaining_bytes", "passes",
        "iterations")


def _cfg(host="arm64-4k", **link):
    """The analytics scenario (does not converge unthrottled) at 1 GiB, 2 vCPUs."""
    return small("analytics", vm={"vcpus": 2}, host=host, link={"give_up_s": 60, **link})


def _at(cfg, t_ns):
    """A run of ``cfg`` advanced to ``t_ns`` (not cancelled): what the cancel shuts down."""
    ref = MigrationRun(cfg)
    ref.advance(t_ns)
    return ref


def _cancelled(cfg, t_ns):
    return MigrationRun(cfg.model_copy(update={"link": cfg.link.model_copy(update={"cancel_at_s": t_ns / NS})}))


def _same_sent(m, ref_m):
    for k in SENT:
        assert getattr(m, k) == getattr(ref_m, k), k


@pytest.mark.parametrize("host", ["arm64-4k", "x86-nopml"])
def test_cancel_mid_slice_stops_the_stream_there(host):
    cfg = _cfg(host)
    t = 1_500_000 * US  # 1.5 s: mid-pass, the migration thread sending
    ref = _at(cfg, t)
    assert ref._slice is not None and ref._slice[0] < t < ref._slice[0] + ref._slice[1]  # (mid-slice)
    assert not ref.bql.held_at(t)
    run = _cancelled(cfg, t)
    m = run.run()
    assert m.done and m.cancelled and not m.converged and m.phase == "done"
    assert m.downtime_s == 0.0 and m.verified is None and m.lost_writes == 0
    # what was on the wire by the cancel is what was sent: the rest of the slice is lost
    _same_sent(m, ref.metrics())
    assert m.remaining_bytes > 0
    # the cancel, then the clean-up's KVM_SET_USER_MEMORY_REGION (logging off) under the big lock
    assert m.total_s * NS == t + run.vm.last_ioctl_ns
    assert (run.vm.last_ioctl_ns > 0) == (host == "x86-nopml")
    assert not run.vm.memslot(0).flags & U.KVM_MEM_LOG_DIRTY_PAGES
    assert sum(m.pass_bytes) == m.bytes_sent
    assert not run.paused  # the VM runs on at the source


def test_cancel_before_it_is_due_changes_nothing():
    """Up to the cancel a cancelled run is the plain one, event for event."""
    cfg = _cfg()
    t = 1_500_000 * US
    ref, run = MigrationRun(cfg), _cancelled(cfg, t)
    for u in (0, 100_000 * US, 700_000 * US, t - 1):
        ref.advance(u)
        run.advance(u)
        assert run.metrics() == ref.metrics()


def test_the_cancel_waits_for_the_big_lock():
    """migrate_cancel is a QMP command: it runs under the big lock. A thread holding it (here
    another of the VMM's, for 40 ms) delays the cancel (behind the vCPU threads that queued for
    the lock before it), and the slice goes on meanwhile."""
    cfg = _cfg()
    t = 1_500_000 * US
    hold = 40_000 * US
    run = _cancelled(cfg, t)
    run.advance(t - 1)
    now = run.loop.now  # (the last event before t)
    assert hold_bql(run, t + hold - now) == now  # taken before t, free at t + hold
    m = run.run()
    assert m.cancelled
    assert t + hold <= run.cancel_ns < t + hold + 5_000 * US
    assert m.total_s * NS == run.cancel_ns + run.vm.last_ioctl_ns
    ref = _at(cfg, run.cancel_ns)
    assert ref._slice is not None  # (sending then)
    assert m.bytes_sent > _at(cfg, t).metrics().bytes_sent  # the slice went on during the wait


@pytest.mark.parametrize("collector", ["ring", "bitmap"])
def test_cancel_in_the_setup_comes_when_the_setup_lets_the_lock_go(collector):
    """The setup (ram_init_bitmaps: logging on, every page dirty, the first sync) holds the big
    lock, but for the ring's flush, whose run_on_cpu waits let it go: a cancel right at the
    start is served once logging is on (ring) or once the sync is done (bitmap); the setup's
    sync runs to its end either way, and nothing is sent."""
    cfg = load_scenario(_cfg(host="x86-nopml"), collector=collector)  # logging on write-protects every page
    run = _cancelled(cfg, 1 * US)
    marks = {}
    enable, sync = run.enable_logging, run.collector.sync

    def spy_enable():
        ns = enable()
        marks["logging on"] = run.loop.now + ns
        return ns

    def spy_sync(*a, **kw):
        ns = sync(*a, **kw)
        marks.setdefault("synced", run.loop.now + ns)
        return ns

    run.enable_logging, run.collector.sync = spy_enable, spy_sync
    m = run.run()
    assert m.cancelled and m.bytes_sent == 0 and m.pages_sent == 0 and m.downtime_s == 0.0
    assert m.sync_s > 0 and m.iterations == 1  # the setup's sync ran, and no other
    served = marks["logging on" if collector == "ring" else "synced"]  # (the bitmap's logging on is
    assert served > 100 * US and run.cancel_ns == served              # free: initially set, no protection)
    assert m.remaining_bytes == cfg.vm.memory  # every page still to send


def test_cancel_in_a_rate_limit_wait_is_noticed_at_the_windows_end():
    """With max-bandwidth below the link the thread sends a window's budget at the link's rate
    and then waits for the window's end. migrate_fd_cancel posts nothing to that wait: the
    thread leaves at the window's end, having sent the window's bytes. A cancel during a burst
    cuts it short."""
    cfg = _cfg(max_bandwidth_mibps=4)  # 4 MiB/s, on a 1 GiB guest's scaled link
    probe = _at(cfg, 1_500_000 * US)
    assert probe._slice is not None and probe._slice[5]  # a rate-limited send: its bursts
    t0, dt, _, _, _, bursts, _ = probe._slice
    late = [(a, b) for a, b, _ in bursts if a > 1_100_000 * US]
    gaps = [(b, a) for (_, b), (a, _) in zip(late, late[1:], strict=False)] + [(late[-1][1], t0 + dt)]
    gap_start, gap_end = next((b, a) for b, a in gaps if a - b > 2_000 * US)
    t_wait = (gap_start + gap_end) // 2 // US * US
    run = _cancelled(cfg, t_wait)
    m = run.run()
    assert m.cancelled and t_wait <= run.cancel_ns < gap_end
    assert m.total_s * NS == gap_end + run.vm.last_ioctl_ns  # not before the window's end
    _same_sent(m, _at(cfg, gap_end).metrics())
    # in a burst: cut where the cancel got the lock
    a, b = next((a, b) for a, b in late if b - a > 20 * US)
    run = _cancelled(cfg, (a + b) // 2 // US * US)
    m = run.run()
    assert m.cancelled and run.cancel_ns < b
    assert m.total_s * NS == run.cancel_ns + run.vm.last_ioctl_ns
    _same_sent(m, _at(cfg, run.cancel_ns).metrics())
    assert m.bytes_sent < _at(cfg, b).metrics().bytes_sent


def test_cancel_while_the_vm_stops_restarts_it_at_the_source():
    """A cancel that gets the big lock while vm_stop waits for the vCPUs: the completion runs its
    last sync, sends nothing (the stream is shut), and the VM is started again at the source.
    The guest was stopped from the stop to the restart."""
    cfg = small("web", vm={"vcpus": 2}, link={"give_up_s": 60})
    ref = MigrationRun(cfg)
    stops = []
    on_pause(ref, lambda: stops.append((ref.loop.now, ref.metrics())))
    r = ref.run()
    assert r.converged and len(stops) == 1
    t_stop, at_stop = stops[0]

    run = MigrationRun(cfg)
    on_pause(run, run.cancel)  # the operator's cancel arrives as the switchover begins
    m = run.run()
    assert m.done and m.cancelled and not m.converged and m.verified is None
    assert m.downtime_s > 0  # stopped, then started again
    assert not run.paused and run._resume.fired  # started again (vm_start: the parked vCPUs go on)
    assert m.bytes_sent == at_stop.bytes_sent  # nothing more went on the wire
    assert m.sync_s > at_stop.sync_s  # the completion's last sync ran
    assert m.remaining_bytes > 0
    assert not run.vm.memslot(0).flags & U.KVM_MEM_LOG_DIRTY_PAGES
    assert m.total_s * NS >= t_stop + m.downtime_s * NS


def test_cancel_during_the_stop_and_copy_finds_it_complete():
    """The stop-and-copy holds the big lock from after the stop to its end: a cancel then waits
    for it and finds the migration completed: nothing changes."""
    cfg = small("web", vm={"vcpus": 2}, link={"give_up_s": 60})
    ref = MigrationRun(cfg)
    r = ref.run()
    t = int(ref.end_ns - r.downtime_s * NS / 4) // US * US  # in the last quarter of the downtime
    m = _cancelled(cfg, t).run()
    assert m == r and not m.cancelled and m.verified is True


def test_cancel_after_the_end_and_twice():
    cfg = small("web", vm={"vcpus": 2}, link={"give_up_s": 60})
    run = MigrationRun(cfg)
    m = run.run()
    run.cancel()
    run.advance(run.end_ns + NS)
    assert run.metrics() == m and not m.cancelled
    run = MigrationRun(_cfg())
    t = 1_200_000 * US
    run.advance(t)
    run.cancel()
    run.cancel()  # a second cancel while the first is under way: no more to do
    m = run.run()
    assert m.cancelled and t <= run.cancel_ns < t + 5_000 * US
    assert m.total_s * NS == run.cancel_ns + run.vm.last_ioctl_ns


def test_give_up_before_the_cancel_acts_first():
    cfg = _cfg(give_up_s=1.0, give_up_action="switchover", cancel_at_s=5.0)
    m = MigrationRun(cfg).run()
    assert not m.cancelled and m.downtime_s > 0 and m.verified is True


def test_bad_cancel_at_names_the_field():
    for bad in (-1, "soon", float("nan"), True):
        with pytest.raises(ConfigError) as e:
            load_scenario("default", link={"cancel_at_s": bad})
        assert "link.cancel_at_s" in str(e.value) and str(bad) in str(e.value)
    assert load_scenario("default").link.cancel_at_s is None
    with pytest.raises(ConfigError) as e:
        load_scenario("checkpoint", link={"cancel_at_s": 3})
    assert "link.cancel_at_s" in str(e.value) and "checkpoint" in str(e.value)


def test_the_kind_that_runs_decides_what_cancel_at_and_auto_converge_may_be():
    """The env id and the CLI command decide the kind, whatever the scenario's own: a checkpoint
    run refuses ``link.cancel_at_s`` (and auto-converge) on a migration scenario, and a
    migration takes both on a checkpoint scenario."""
    with pytest.raises(ConfigError, match=r"link\.cancel_at_s: 1\.0 is for a migration"):
        gym.make("ringenv/Checkpoint-v0", link={"cancel_at_s": 1.0})
    with pytest.raises(ConfigError, match=r"link\.cancel_at_s"):
        CheckpointRun(small("default"), link={"cancel_at_s": 1.0})
    with pytest.raises(ConfigError, match=r"throttle: 'auto-converge' is a migration's"):
        gym.make("ringenv/Checkpoint-v0", throttle="auto-converge")
    env = gym.make("ringenv/Migration-v0", scenario="checkpoint", link={"cancel_at_s": 1.0}, throttle="auto-converge")
    assert env.unwrapped.scenario.kind == "migration" and env.unwrapped.scenario.link.cancel_at_s == 1.0
    env.close()
    rc, out, err = run_cli("migrate", "--scenario", "checkpoint", "--cancel-at", "0.5", "--throttle", "auto-converge",
                           "--json")
    assert rc == 0 and json.loads(out)["cancelled"] is True, err
    rc, out, err = run_cli("checkpoint", "--scenario", "analytics", "--throttle", "auto-converge")
    assert rc == 2 and "--throttle" in err


def test_cli_cancel_at():
    rc, out, err = run_cli("migrate", "--scenario", "analytics", "--cancel-at", "2", "--json")
    assert rc == 0
    d = json.loads(out)
    assert d["cancelled"] is True and d["downtime_s"] == 0.0 and 2.0 <= d["total_s"] < 2.1
    assert "cancelled (migrate_cancel at 2 s)" in err
    rc, out, err = run_cli("migrate", "--cancel-at", "-1")
    assert rc == 2 and "link.cancel_at_s (--cancel-at)" in err


def test_env_episode_ends_cancelled():
    env = gym.make("ringenv/Migration-v0", scenario=small("default", vm={"vcpus": 2}), workloads=["analytics"],
                   link={"give_up_s": 60, "cancel_at_s": 1.0})
    env.reset(seed=0)
    while True:
        _, r, te, tr, info = env.step(env.action_space.sample())
        if te or tr:
            break
    assert te and not tr and info["cancelled"] and info["downtime_s"] == 0.0
    assert info["reward_parts"]["cancel"] == pytest.approx(10.0 * info["cancel_downtime_s"]) and r < 0
    assert 1.0 <= info["total_s"] < 1.1


@pytest.mark.parametrize("how", ["operator", "give-up"])
def test_cancel_ends_dirty_limit_with_the_command(how):
    """migration_cancel cancels the dirty limit (qmp_cancel_vcpu_dirty_limit) as it runs: no
    vCPU sleeps after a ring-full exit from then on (one under way runs out), and the rate
    thread stops. nova's abort at give-up is the same command."""
    link = {"cancel_at_s": 25.0} if how == "operator" else {"give_up_s": 25.0, "give_up_action": "cancel"}
    cfg = small("analytics", vm={"vcpus": 2}, throttle="dirty-limit", ring_entries=512, link={"give_up_s": 60})
    ref = MigrationRun(cfg)
    ref_sleeps = sleep_starts(ref)
    ref.run()
    run = MigrationRun(cfg.model_copy(update={"link": cfg.link.model_copy(update=link)}))
    sleeps = sleep_starts(run)
    m = run.run()
    assert m.cancelled and run.throttle.cancelled and not run.throttle.in_service
    t_cancel = run.cancel_ns if how == "operator" else int(m.total_s * NS) - run.vm.last_ioctl_ns
    assert 25 * NS <= t_cancel < 25.1 * NS
    assert sleeps and sleeps[0][1] < t_cancel  # the limit was in force
    assert any(t > t_cancel for _, t in ref_sleeps)  # and would have gone on
    assert all(t < t_cancel for _, t in sleeps)  # no sleep begins after the cancel
    assert not run.throttle.throttle_us.any()


def test_cancel_during_a_clear_sends_none_of_its_pages():
    """With the bitmap, a slice's KVM_CLEAR_DIRTY_LOG runs before its pages are sent (not under
    the big lock: the cancel does not wait for it). The thread notices the shut stream when the
    CLEAR returns: none of the pages it took goes out, and they count as still to send."""
    cfg = small("analytics", vm={"vcpus": 2}, collector="bitmap", link={"give_up_s": 60})
    ref = MigrationRun(cfg)
    clears = []
    before_send = ref.collector.before_send

    def spy(pages):
        ns = before_send(pages)
        if ns:
            clears.append((ref.loop.now, ns, len(pages)))
        return ns

    ref.collector.before_send = spy
    ref.advance(20 * NS)
    t, ns, n = next(c for c in clears if c[0] > NS)
    t_c = (t + ns // 2) // US * US
    run = _cancelled(cfg, t_c)
    m = run.run()
    assert m.cancelled and run.cancel_ns == t_c
    assert m.total_s * NS == t + ns + run.vm.last_ioctl_ns  # left when the CLEAR returned
    at = _at(cfg, t_c)
    assert at._taken == n  # (the CLEAR's pages, still to send then)
    _same_sent(m, at.metrics())


CASES = [  # (scenario, overrides) across collectors, throttles, hosts and the rate limiter
    ("analytics", {"host": "x86-pml"}),
    ("analytics", {"throttle": "auto-converge"}),
    ("analytics", {"throttle": "dirty-limit", "ring_entries": 512}),
    ("analytics", {"collector": "bitmap", "host": "arm64-64k"}),
    ("web", {"host": "x86-nopml", "link": {"max_bandwidth_mibps": 6}}),
    ("oltp", {"host": "arm64-16k"}),
]


@pytest.mark.parametrize("name,ov", CASES)
def test_a_cancel_at_any_moment_leaves_a_consistent_run(name, ov):
    """Cancels at random moments of a run (seeded): each either finds the migration completed
    (and changes nothing) or cancels it, with what was sent, the passes, the logging and the
    time all consistent, and never more sent than the run without the cancel had by then."""
    ov = dict(ov)
    link = {"give_up_s": 60, **ov.pop("link", {})}
    cfg = small(name, vm={"vcpus": 2}, link=link, **ov)
    ref = MigrationRun(cfg)
    r = ref.run()
    rng = np.random.default_rng(sum(map(ord, name + repr(ov))))
    for t in sorted(rng.integers(0, ref.end_ns + 1, size=4).tolist()) + [ref.end_ns - 1]:
        run = _cancelled(cfg, t)
        m = run.run()
        if not m.cancelled:  # the stop-and-copy held the big lock to its end
            assert m == r and t >= ref.end_ns - r.downtime_s * NS
            continue
        assert m.done and not m.converged and m.verified is None and m.lost_writes == 0
        assert run.cancel_ns >= t and m.total_s * NS >= run.cancel_ns
        assert m.bytes_sent <= _at(cfg, run.cancel_ns + 200_000 * US).metrics().bytes_sent
        assert sum(m.pass_bytes) == m.bytes_sent
        assert m.pages_resent <= m.pages_sent and 0 <= m.progress <= 1 and m.remaining_bytes >= 0
        assert not run.vm.memslot(0).flags & U.KVM_MEM_LOG_DIRTY_PAGES
        assert not run.paused and run.throttle.next_sync_tick is None
        assert (m.downtime_s > 0) == (run.paused_at is None and run._resume.fired)
