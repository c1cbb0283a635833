"""Every observation field and every reward term against its formula in the MigrationEnv
docstring, step by step, from the metrics record the same step puts in ``info`` (tests written
after a mutation run found most of them unchecked: dropping a term, a unit or a per-vCPU
division went unnoticed)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

import ringenv  # noqa: F401
from ringenv.env import OBS_FIELDS as FIELDS, OBS_HIGH, _clip_observation, _lost_vcpu_s

from .test_env import make, rollout

OBS_FIELDS = [f[0] for f in FIELDS]
# weights that differ from each other and from the defaults: a term weighted by the wrong weight,
# or a scale not applied, shows
WEIGHTS = {"vcpu": 3.0, "vmm": 5.0, "memory": 0.7, "time": 0.11, "downtime": 13.0, "scale": 2.0}
MIB = 1 << 20


def lost(info) -> float:
    return info["vcpu_fault_s"] + info["vcpu_exit_s"] + info["vcpu_stall_s"] + info["vcpu_throttle_s"]


@pytest.fixture(scope="module")
def throttled():
    """A 2-vCPU memcached migration over 1 Gb/s with auto-converge: faults, ring-full exits and
    throttle sleeps all happen; the interval changes twice (10 ms, 5000 ms, 100 ms)."""
    env = make(workloads=["memcached"], link={"gbps": 1.0}, throttle="auto-converge", max_episode_s=20,
               reward=WEIGHTS)
    steps, te, tr = rollout(env, 1, lambda t: np.array([0, 0 if t < 40 else 8 if t < 80 else 3]))
    assert te and not tr
    end = steps[-1][2]
    assert end["vcpu_fault_s"] > 0 and end["vcpu_exit_s"] > 0 and end["vcpu_throttle_s"] > 0
    assert end["full_exits"] > 100 and end["downtime_s"] > 0 and end["iterations"] > 2
    return env, steps


def test_lost_vcpu_time_is_faults_exits_stalls_and_throttle_sleeps():
    m = SimpleNamespace(vcpu_fault_s=1.0, vcpu_exit_s=10.0, vcpu_stall_s=100.0, vcpu_throttle_s=1000.0)
    assert _lost_vcpu_s(m) == 1111.0


def test_every_observation_follows_its_formula_at_every_step(throttled):
    env, steps = throttled
    u = env.unwrapped
    rate, nv = u.obs_rate_Bps, u.scenario.vm.vcpus
    limit_s = u.scenario.link.downtime_limit_ms / 1000
    dt = u.cfg.control_interval_ms / 1000
    reset = steps[0][2]
    sampled, redirty = reset["sampled_dirty_rate_Bps"], reset["sampled_redirty_rate_Bps"]
    assert sampled > 0 and redirty > 0
    for t in range(1, len(steps)):
        obs, _, i = steps[t]
        prev = steps[t - 1][2] if t > 1 else None
        d = (lambda k: i[k] - (prev[k] if prev else 0))  # the metrics start at 0 (the first step's prev)
        bw = i["bandwidth_Bps"] or u._session.rate_Bps
        expect = {
            "fill_max": max(i["ring_fill"]),
            "fill_mean": sum(i["ring_fill"]) / nv,
            "dirty_rate": i["dirty_rate_Bps"] / rate,
            "sampled_rate": sampled / rate,
            "full_exits": math.log10(1 + d("full_exits") / nv / dt),
            "lost_vcpu": (lost(i) - (lost(prev) if prev else 0)) / nv / dt,
            "vmm_cpu": d("vmm_cpu_s") / dt,
            "progress": i["progress"],
            "remaining": math.log10(1 + i["remaining_bytes"] / (bw * limit_s)),
            "bandwidth": i["bandwidth_Bps"] / rate,
            "iteration": i["iterations"] / 32,
            "elapsed": t * dt / u.cfg.max_episode_s,
            "ring_size": math.log2(i["ring_entries"]) / 16,
            "interval": math.log10(i["interval_ms"]) / 4,
            "ring_fixed": 1.0,
            "redirty_rate": redirty / rate,
            "redirty_share": redirty / (sampled + redirty),
        }
        assert list(expect) == list(OBS_FIELDS)
        want = np.clip(np.array(list(expect.values())), 0.0, OBS_HIGH).astype(np.float32)
        np.testing.assert_allclose(obs, want, rtol=2e-6, atol=1e-7, err_msg=f"step {t}")
    # the episode moved every field that can move
    o = np.array([s[0] for s in steps[1:]])
    moving = ["fill_max", "fill_mean", "dirty_rate", "full_exits", "lost_vcpu", "vmm_cpu", "progress", "remaining",
              "bandwidth", "iteration", "elapsed", "interval"]
    for name in moving:
        assert np.ptp(o[:, OBS_FIELDS.index(name)]) > 0, name
    fills = np.array([s[2]["ring_fill"] for s in steps[1:]])
    assert (fills.max(axis=1) > fills.min(axis=1)).any()  # max and mean differ somewhere


def test_every_reward_term_is_its_weighted_cost_and_the_sum_is_divided_by_scale(throttled):
    env, steps = throttled
    u = env.unwrapped
    nv, dt = u.scenario.vm.vcpus, u.cfg.control_interval_ms / 1000
    for t in range(1, len(steps)):
        _, r, i = steps[t]
        prev = steps[t - 1][2] if t > 1 else {k: 0.0 for k in ("vmm_cpu_s", "downtime_s")}
        p = i["reward_parts"]
        assert set(p) == {"vcpu", "vmm", "memory", "time", "downtime", "truncation", "cancel"}
        assert p["truncation"] == 0.0 and p["cancel"] == 0.0
        assert p["vcpu"] == pytest.approx(3.0 * (lost(i) - (lost(prev) if t > 1 else 0)) / nv, rel=1e-9, abs=1e-15)
        assert p["vmm"] == pytest.approx(5.0 * (i["vmm_cpu_s"] - prev["vmm_cpu_s"]), rel=1e-9, abs=1e-15)
        assert p["memory"] == pytest.approx(0.7 * i["ring_bytes"] / MIB * dt, rel=1e-12)
        assert p["time"] == pytest.approx(0.11 * dt, rel=1e-12)
        assert p["downtime"] == pytest.approx(13.0 * (i["downtime_s"] - prev["downtime_s"]), rel=1e-9, abs=1e-15)
        assert r == pytest.approx(-sum(p.values()) / 2.0, rel=1e-12)
    # the per-step costs add up to the run's totals (deltas, not running totals)
    end = steps[-1][2]
    total = {k: sum(s[2]["reward_parts"][k] for s in steps[1:]) for k in ("vcpu", "vmm", "downtime")}
    assert total["vcpu"] == pytest.approx(3.0 * lost(end) / nv, rel=1e-9)
    assert total["vmm"] == pytest.approx(5.0 * end["vmm_cpu_s"], rel=1e-9)
    assert total["downtime"] == pytest.approx(13.0 * end["downtime_s"], rel=1e-9)
    # ring memory: 16-byte entries, every vCPU's ring (256 entries: the first ring size)
    assert end["ring_bytes"] == nv * 256 * 16


def test_a_truncation_charge_is_divided_by_scale_too():
    env = make(workloads=["memcached"], max_episode_s=0.05, reward={"scale": 10.0, "truncation": 3.0})
    env.reset(seed=2)
    _, r, te, tr, info = env.step(np.array([4, 6]))
    assert tr and not te and info["reward_parts"]["truncation"] > 0
    assert r == pytest.approx(-sum(info["reward_parts"].values()) / 10.0, rel=1e-12)


@pytest.mark.parametrize("kw", [{}, {"collector": "bitmap"}, {"intervals_ms": [10, 1000]}])
def test_interval_ms_is_a_float_in_every_info(kw):
    """info["interval_ms"] was an int with the ring and the default grid, 0.0 with the bitmap."""
    env = make(workloads=["web"], max_episode_s=0.2, **kw)
    env.reset(seed=0)
    _, _, _, _, info = env.step(env.action_space.sample())
    assert type(info["interval_ms"]) is float and type(env.unwrapped.interval_ms) is float
    assert all(type(x) is float for x in env.unwrapped.intervals_ms)


def test_by_default_a_truncation_is_not_charged():
    """A truncated episode is cut short: a learner bootstrapping there (SB3 on
    TimeLimit.truncated) values what it left undone, so the default charges nothing for it and
    only reports the downtime a switchover then would cause. reward_parts keeps its keys."""
    env = make(workloads=["memcached"], max_episode_s=0.05)
    env.reset(seed=2)
    _, r, te, tr, info = env.step(np.array([4, 6]))
    assert tr and not te
    assert info["reward_parts"]["truncation"] == 0.0 and info["truncation_downtime_s"] > 0
    assert r == pytest.approx(-sum(info["reward_parts"].values()), rel=1e-12)
    charged = make(workloads=["memcached"], max_episode_s=0.05, reward={"truncation": 10.0})
    charged.reset(seed=2)
    _, r2, _, _, info2 = charged.step(np.array([4, 6]))
    assert info2["truncation_downtime_s"] == info["truncation_downtime_s"]
    assert r2 == pytest.approx(r - 10.0 * info["truncation_downtime_s"], rel=1e-12)


def test_a_new_interval_reaches_the_reaper():
    """After the first step at 5 s, the agent asks for 10 ms: the reaper harvests every 10 ms
    from then on, 5 times per 50 ms step (the last observation's ``interval`` says 10 ms)."""
    env = make(workloads=["memcached"], vm={"memory": "2GiB", "vcpus": 2})
    steps, *_ = rollout(env, 3, lambda t: np.array([4, 8 if t == 0 else 0]))
    h = [s[2]["harvests"] for s in steps[1:]]
    assert h[0] == 1  # 5 s: only the migration set-up's sync (kvm_dirty_ring_flush) in the first 50 ms
    assert [b - a for a, b in zip(h[1:20], h[2:21])] == [5] * 19
    assert steps[5][0][OBS_FIELDS.index("interval")] == pytest.approx(math.log10(10) / 4)


@pytest.mark.parametrize("env_id, action, want", [
    # 5 ring sizes x 3 intervals, flattened: index = ring index x 3 + interval index
    ("ringenv/MigrationDiscrete-v0", 5, (512, 1000.0)),
    ("ringenv/MigrationDiscrete-v0", 13, (4096, 100.0)),
    ("ringenv/MigrationDiscrete-v0", 14, (4096, 1000.0)),
    ("ringenv/Migration-v0", np.array([1, 2]), (512, 1000.0)),
])
def test_actions_on_a_grid_that_is_not_square(env_id, action, want):
    env = make(env_id, ring_sizes=[256, 512, 1024, 2048, 4096], intervals_ms=[10, 100, 1000])
    u = env.unwrapped
    assert u.decode_action(action) == want
    back = u.encode_action(*want)
    assert (back == action).all() if isinstance(action, np.ndarray) else back == action


def test_encode_action_snaps_to_the_nearest_on_a_log_scale():
    u = make().unwrapped  # intervals 10 20 50 100 200 500 1000 2000 5000
    assert u.encode_action(4096, 320).tolist() == [4, 5]  # log: 320 is nearer 500 than 200 (linear: 200)
    assert u.encode_action(4096, 140).tolist() == [4, 3]  # log: 140 nearer 100 (linear as well)
    assert u.encode_action(3000, 10).tolist() == [4, 0]  # 3000 entries: nearer 4096 than 2048 on log2
    # +inf, and an int too large for a float, are nearest the largest; a non-positive one is refused
    last = [len(u.ring_sizes) - 1, len(u.intervals_ms) - 1]
    assert u.encode_action(float("inf"), 10**400).tolist() == u.encode_action(10**400, 1e300).tolist() == last
    with pytest.raises(ValueError, match=r"ring_entries -1000.*expected a number > 0"):
        u.encode_action(-(10**400), 10)


def test_the_bitmap_collector_ignores_the_ring_size_from_the_first_step():
    env = make(workloads=["oltp"], collector="bitmap")
    env.reset(seed=0)
    assert env.step(np.array([4, 6]))[4]["ring_size_ignored"] is True


def test_each_reset_seed_draws_its_own_episode():
    env = make(workloads=["oltp"])
    a = env.reset(seed=1)[1]["sampled_dirty_rate_Bps"], env.unwrapped.episode_seed
    b = env.reset(seed=2)[1]["sampled_dirty_rate_Bps"], env.unwrapped.episode_seed
    again = env.reset(seed=1)[1]["sampled_dirty_rate_Bps"], env.unwrapped.episode_seed
    assert again == a
    assert a[1] != b[1] and a[0] != b[0]


def test_the_reset_sample_lasts_sample_s():
    from ringenv.vmm.dirtyrate import sample_dirty_rate

    env = make(workloads=["bursty"], sample_s=0.5, sample_windows=5)
    _, info = env.reset(seed=2)
    u = env.unwrapped
    half = sample_dirty_rate(u.scenario, workload="bursty", seed=u.episode_seed, seconds=0.5, windows=5)
    one = sample_dirty_rate(u.scenario, workload="bursty", seed=u.episode_seed, seconds=1.0, windows=5)
    assert half != one
    assert (info["sampled_dirty_rate_Bps"], info["sampled_redirty_rate_Bps"]) == half


def test_an_observation_beyond_its_high_is_clipped():
    env = make(workloads=["memcached"], link={"gbps": 0.05})  # 6.25 MB/s: memcached dirties far more
    obs, info = env.reset(seed=2)
    i = OBS_FIELDS.index("sampled_rate")
    assert info["sampled_dirty_rate_Bps"] / env.unwrapped.obs_rate_Bps > OBS_HIGH[i] == 10
    assert obs[i] == OBS_HIGH[i]


def test_clipping_leaves_no_negative_zero():
    assert not np.signbit(_clip_observation([-0.0] * len(OBS_FIELDS))).any()


def test_checkpoint_truncation_charges_the_measured_bandwidth():
    env = make("ringenv/Checkpoint-v0", workloads=["oltp"], max_episode_s=3.0,
               checkpoint={"horizon_s": 10.0, "period_s": 0.5, "storage_mbps": 500}, reward={"truncation": 7.0})
    steps, te, tr = rollout(env, 0, [np.array([4, 3])])
    assert tr
    i = steps[-1][2]
    assert i["bandwidth_Bps"] != env.unwrapped._session.rate_Bps  # measured, not the configured rate
    assert i["reward_parts"]["truncation"] == pytest.approx(
        7.0 * i["remaining_bytes"] / i["bandwidth_Bps"], rel=1e-12)
    assert i["truncation_downtime_s"] == pytest.approx(i["remaining_bytes"] / i["bandwidth_Bps"], rel=1e-12)


def test_the_reward_defaults_are_the_docstring_s():
    from ringenv.config import RewardConfig
    from ringenv.env import MigrationEnv

    table = MigrationEnv.__doc__.split("## Rewards")[1].split("\n\n")[1]
    rows = [ln.strip().split("|") for ln in table.splitlines() if ln.strip().startswith("| ")][1:]
    doc = {r[1].strip(): float(r[3]) for r in rows}
    assert doc == {k: v for k, v in RewardConfig().model_dump().items() if k != "scale"}
    assert RewardConfig().scale == 1.0


@pytest.mark.parametrize("kw, field", [({"sample_windows": 101}, "sample_windows"),
                                       ({"reward": {"scale": 0}}, "reward.scale")])
def test_env_config_bounds(kw, field):
    from ringenv.config import ConfigError, EnvConfig

    with pytest.raises(ConfigError, match=field):
        EnvConfig.parse(kw, where="env")


def test_the_ansi_line_shows_the_fullest_ring():
    env = make(workloads=["oltp"], render_mode="ansi")
    env.reset(seed=0)
    for _ in range(20):
        obs, *_ = env.step(np.array([0, 8]))
        if f"{obs[0]:.2f}" != f"{obs[1]:.2f}":
            break
    assert f"{obs[0]:.2f}" != f"{obs[1]:.2f}"
    assert f"fill={obs[0]:.2f}" in env.render()


def test_the_documented_env_defaults_are_the_config_s():
    """Arguments: "`control_interval_ms`, ..., default 50; `max_episode_s`, ..., default 120;
    ...": each number the docstring gives is EnvConfig's default."""
    import re

    from ringenv.config import EnvConfig
    from ringenv.env import MigrationEnv

    args = " ".join(MigrationEnv.__doc__.split("## Arguments")[1].split("## Attributes")[0].split())
    doc = {m[1]: float(m[2]) for m in re.finditer(r"`(\w+)`, [^;`]*?default ([0-9.]+)", args)}
    assert set(doc) == {"control_interval_ms", "max_episode_s", "sample_s", "sample_windows"}
    cfg = EnvConfig()
    assert doc == {k: float(getattr(cfg, k)) for k in doc}
    assert cfg.intervals_ms == [10, 20, 50, 100, 200, 500, 1000, 2000, 5000]  # the action table's grid


def test_the_rgb_frame_s_bar_is_the_progress():
    """The right panel's green bar is ``progress`` (share of RAM sent) on a 0-1 axis: its height
    in pixels grows in proportion, full at the end of the migration."""
    env = make(workloads=["oltp"], render_mode="rgb_array")
    env.reset(seed=0)

    def green_rows(frame):
        right = frame[:, frame.shape[1] * 3 // 4:].astype(int)
        green = (abs(right[..., 0] - 44) < 8) & (abs(right[..., 1] - 160) < 8) & (abs(right[..., 2] - 44) < 8)
        return int(green.any(axis=1).sum())

    heights, progress = [], []
    while True:
        obs, _, te, tr, _ = env.step(np.array([4, 6]))
        heights.append(green_rows(env.render()))
        progress.append(float(obs[OBS_FIELDS.index("progress")]))
        if te or tr:
            break
    assert te and progress[-1] == 1.0
    full = heights[-1]
    assert full > 100
    mid = next(i for i, p in enumerate(progress) if 0.3 < p < 0.7)
    assert heights[mid] == pytest.approx(progress[mid] * full, abs=3)


def test_a_give_up_acts_only_before_the_time_cap():
    """link.give_up_s ends an episode (cancelled, with give_up_action cancel) only below
    max_episode_s; at equal times, as the shipped scenarios' 120 s against the default cap, the
    episode truncates first (the docstring's Episode End says so)."""
    def end(give_up_s):
        env = make(workloads=["memcached"], max_episode_s=1.0,  # (1 Gb/s: the 512 MiB take ~4 s)
                   link={"gbps": 1, "give_up_action": "cancel", "give_up_s": give_up_s})
        env.reset(seed=2)
        while True:
            _, _, te, tr, info = env.step(np.array([4, 6]))
            if te or tr:
                return te, tr, info["cancelled"], info["time_s"]

    assert end(1.0) == (False, True, False, pytest.approx(1.0))
    assert end(0.5) == (True, False, True, pytest.approx(0.5, abs=0.06))
