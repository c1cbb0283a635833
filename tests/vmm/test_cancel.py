"""A migration cancelled at give-up (``link.give_up_action: cancel``): QEMU's migrate_cancel,
OpenStack nova's default live_migration_timeout_action (abort).

The migration thread leaves its loop at ``give_up_s`` (nothing more is sent), the clean-up
stops the throttle and dirty logging (KVM_SET_USER_MEMORY_REGION without
KVM_MEM_LOG_DIRTY_PAGES, under the big lock), and the VM runs on at the source: no downtime,
nothing verified. Up to ``give_up_s`` a cancelled run is the forced one, event for event."""

from __future__ import annotations


import gymnasium as gym
import numpy as np
import pytest

import ringenv  # noqa: F401
from ringenv.config import ConfigError, load_scenario
from ringenv.kvm import uapi as U
from ringenv.vmm import CheckpointRun, MigrationRun
from ringenv.vmm.session import NS

from ._helpers import on_pause, run_cli, small

GIVE_UP_S = 2.0


def _runs(throttle="none", host="arm64-4k", **link):
    """The analytics scenario (does not converge unthrottled) at 1 GiB, 2 vCPUs, cancelled and
    forced at give-up, same seed."""
    out = []
    for action in ("cancel", "switchover"):
        cfg = small("analytics", vm={"vcpus": 2}, throttle=throttle, host=host,
                    link={"give_up_s": GIVE_UP_S, "give_up_action": action, **link})
        out.append(MigrationRun(cfg))
    return out


def _forced_at_give_up(forced):
    """The forced run's metrics and time when it acts on the give-up (as it starts to stop the
    VM), then run to its end."""
    seen = []
    on_pause(forced, lambda: seen.append((forced.loop.now, forced.metrics())))
    forced.run()
    return seen[0]


def test_cancelled_run_reports_the_attempt():
    cancel, forced = _runs()
    m = cancel.run()
    assert m.done and m.cancelled and m.phase == "done"
    assert not m.converged
    assert m.downtime_s == 0.0
    assert m.verified is None and m.lost_writes == 0  # no destination will run: nothing to compare
    assert m.remaining_bytes > 0  # it gave up with dirty pages left
    # up to the give-up the runs are one: the cancel comes where the forced run stops the VM
    # (the first check of the loop at or after give_up_s: after a slice), plus the clean-up
    t_check, _ = _forced_at_give_up(forced)
    assert t_check >= GIVE_UP_S * NS
    assert m.total_s * NS == pytest.approx(t_check + cancel.vm.last_ioctl_ns, abs=1)
    f = forced.metrics()
    assert f.done and not f.cancelled and not f.converged and f.downtime_s > 0 and f.verified is True


@pytest.mark.parametrize("host", ["arm64-4k", "x86-nopml"])  # logging off: free on arm64, a zap on x86
def test_cancel_sends_nothing_more_and_stops_logging(host):
    cancel, forced = _runs(host=host)
    m = cancel.run()
    _, at_give_up = _forced_at_give_up(forced)
    assert m.bytes_sent == at_give_up.bytes_sent and m.pages_sent == at_give_up.pages_sent
    assert m.entries_harvested == at_give_up.entries_harvested
    # the clean-up's KVM_SET_USER_MEMORY_REGION is the VMM's only work after the give-up
    assert m.vmm_cpu_s - at_give_up.vmm_cpu_s == pytest.approx(cancel.vm.last_ioctl_ns / NS, abs=1e-12)
    assert (cancel.vm.last_ioctl_ns > 0) == (host == "x86-nopml")
    assert not cancel.vm.memslot(0).flags & U.KVM_MEM_LOG_DIRTY_PAGES
    assert forced.vm.memslot(0).flags & U.KVM_MEM_LOG_DIRTY_PAGES  # the forced run kept logging
    # the pass under way at the cancel is reported, as a forced switchover's is
    assert sum(m.pass_bytes) == m.bytes_sent


def test_cancel_stops_the_throttle():
    cancel, _ = _runs(throttle="auto-converge")
    m = cancel.run()
    assert m.cancelled
    assert m.throttle_pct == 0.0
    assert cancel.throttle.pct == 0


def test_a_migration_that_converges_is_not_cancelled():
    cfg = small("web", vm={"vcpus": 2}, link={"give_up_s": 60, "give_up_action": "cancel"})
    m = MigrationRun(cfg).run()
    assert m.converged and not m.cancelled and m.verified is True and m.downtime_s > 0


def test_checkpoint_runs_are_never_cancelled():
    m = CheckpointRun(small("checkpoint", memory=256 << 20, vm={"vcpus": 2},
                            checkpoint={"horizon_s": 3, "period_s": 1})).run()
    assert m.cancelled is False


def test_bad_give_up_action_names_the_field_and_the_accepted_values():
    with pytest.raises(ConfigError) as e:
        load_scenario("default", link={"give_up_action": "abort"})
    msg = str(e.value)
    assert "link.give_up_action" in msg and "'switchover'" in msg and "'cancel'" in msg and "abort" in msg
    assert load_scenario("default").link.give_up_action == "switchover"


def test_cli_give_up_flags():
    rc, out, err = run_cli("migrate", "--scenario", "analytics", "--give-up-s", "1", "--give-up-action", "cancel",
                        "--json")
    assert rc == 0
    import json
    d = json.loads(out)
    assert d["cancelled"] is True and d["downtime_s"] == 0.0 and 1.0 <= d["total_s"] < 1.1
    assert "cancelled at give-up (1 s)" in err
    rc, out, err = run_cli("migrate", "--scenario", "analytics", "--give-up-s", "-1")
    assert rc != 0 and "link.give_up_s (--give-up-s)" in err
    rc, out, err = run_cli("migrate", "--give-up-action", "abort")
    assert rc == 2 and "'switchover', 'cancel'" in err


def _episode(env, seed=0):
    obs, info = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    keys, total = set(), 0.0
    while True:
        obs, r, te, tr, info = env.step(rng.integers(env.action_space.nvec))
        keys.add(tuple(sorted(info["reward_parts"])))
        total += r
        if te or tr:
            return te, tr, info, r, keys


@pytest.mark.parametrize("weight", [None, 0.0, 3.0])
def test_env_episode_ends_cancelled_and_is_charged(weight):
    kw = {} if weight is None else {"reward": {"cancel": weight}}
    env = gym.make("ringenv/Migration-v0", scenario=small("default", vm={"vcpus": 2}), workloads=["analytics"],
                   link={"give_up_s": GIVE_UP_S, "give_up_action": "cancel"}, **kw)
    te, tr, info, r, keys = _episode(env)
    assert te and not tr
    assert info["cancelled"] and not info["converged"] and info["downtime_s"] == 0.0
    assert len(keys) == 1 and "cancel" in next(iter(keys))  # the same reward keys on every step
    s = env.unwrapped._session
    rate = info["bandwidth_Bps"] if info["bandwidth_Bps"] > 0 else s.rate_Bps
    assert info["cancel_downtime_s"] == pytest.approx(info["remaining_bytes"] / rate)
    assert info["cancel_downtime_s"] > 0
    w = 10.0 if weight is None else weight  # default: the downtime weight's default
    assert info["reward_parts"]["cancel"] == pytest.approx(w * info["cancel_downtime_s"])
    assert r == pytest.approx(-sum(info["reward_parts"].values()))
    assert info["truncation_downtime_s"] == 0.0


def test_env_default_forces_the_switchover():
    env = gym.make("ringenv/Migration-v0", scenario=small("default", vm={"vcpus": 2}), workloads=["analytics"],
                   link={"give_up_s": GIVE_UP_S})
    te, tr, info, r, keys = _episode(env)
    assert te and not info["cancelled"] and info["downtime_s"] > 0
    assert info["cancel_downtime_s"] == 0.0 and info["reward_parts"]["cancel"] == 0.0
