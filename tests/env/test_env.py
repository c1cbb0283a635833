"""The environment contract (docs/DESIGN.md "The environment"; the MigrationEnv docstring)."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env

import ringenv  # noqa: F401  (registers the ids)
from ringenv.config import ConfigError, load_workload_sets
from ringenv.env import OBS_FIELDS

IDS = ["ringenv/Migration-v0", "ringenv/MigrationDiscrete-v0", "ringenv/Checkpoint-v0",
       "ringenv/CheckpointDiscrete-v0"]
# a small VM on a fast link: episodes of a few steps
SMALL = {"vm": {"memory": "512MiB", "vcpus": 2}, "checkpoint": {"horizon_s": 2.0, "period_s": 0.5}}


def make(env_id="ringenv/Migration-v0", **kw):
    return gym.make(env_id, **{**SMALL, **kw})


def rollout(env, seed, actions=None, max_steps=400):
    """[(obs, reward, info)] from reset (reward None) to the episode's end, terminated,
    truncated. ``actions``: a list cycled through, a function of the step index, or None (random)."""
    obs, info = env.reset(seed=seed)
    out = [(obs, None, info)]
    rng = np.random.default_rng(seed)
    for t in range(max_steps):
        if callable(actions):
            a = actions(t)
        else:
            a = actions[t % len(actions)] if actions is not None else env.action_space.sample()
        if actions is None:
            env.action_space.seed(int(rng.integers(1 << 30)))
        obs, r, te, tr, info = env.step(a)
        out.append((obs, r, info))
        if te or tr:
            return out, te, tr
    raise AssertionError("episode did not end")


@pytest.mark.parametrize("render_mode", [None, "ansi", "rgb_array"])
@pytest.mark.parametrize("env_id", IDS)
def test_gymnasium_check_env(env_id, render_mode):
    """Gymnasium's checker passes with no warning (a warning is an error here), its render checks
    included (it also re-makes the env in every other render mode the metadata lists)."""
    env = make(env_id, render_mode=render_mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gym_check_env(env.unwrapped)


@pytest.mark.parametrize("env_id", IDS)
def test_sb3_check_env(env_id):
    """SB3's checker passes with no warning (it warns of what SB3 would mishandle: a warning is an
    error here)."""
    from stable_baselines3.common.env_checker import check_env

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(make(env_id).unwrapped, warn=True)


def test_spaces_match_the_docstring():
    env = make()
    u = env.unwrapped
    assert env.observation_space.shape == (len(OBS_FIELDS),) == (17,)
    assert list(env.action_space.nvec) == [len(u.ring_sizes), len(u.intervals_ms)]
    assert u.ring_sizes == (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)  # arm64-4k
    assert u.intervals_ms == (10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
    for name in ["Action Space", "Observation Space", "Rewards", "Starting State", "Episode End",
                 "Arguments", "Version History"]:
        assert f"## {name}" in type(u).__doc__
    for name, *_ in OBS_FIELDS:
        assert f"| {name} |" in type(u).__doc__
    d = make("ringenv/MigrationDiscrete-v0")
    assert d.action_space.n == 81
    assert d.unwrapped.decode_action(2 * 9 + 6) == (1024, 1000)


def test_reset_observation_carries_the_dirty_rate_sample():
    env = make(workloads=["memcached"])
    obs, info = env.reset(seed=1)
    assert obs[3] > 0 and info["sampled_dirty_rate_Bps"] > 0
    assert obs[14] == 0.0  # ring not chosen yet
    idle = make(workloads=["idle"])
    assert idle.reset(seed=1)[0][3] < obs[3]


def test_reset_observation_tells_a_hot_set_from_a_sweep():
    """redirty_rate/share: a Zipf key-value cache re-dirties pages within the sample, a
    sequential sweep of a large region (stream-scan, hpc-stencil) practically never does. The
    default 16 GiB VM (reset only: the sample is a second of simulated time)."""
    env = gym.make("ringenv/Migration-v0", workloads=["memcached"])
    hot, info = env.reset(seed=2)
    assert hot[15] > 0.01 and 0.1 < hot[16] < 0.5
    link = env.unwrapped.scenario.link.rate_Bps
    assert info["sampled_redirty_rate_Bps"] == pytest.approx(hot[15] * link, rel=1e-5)
    for sweeper in ("stream-scan", "hpc-stencil"):
        sweep, _ = gym.make("ringenv/Migration-v0", split="all", workloads=[sweeper]).reset(seed=2)
        assert sweep[15] < 1e-3 and sweep[16] < 0.01 and sweep[3] > 0.1
    # one dirty-log read is plain calc-dirty-rate: nothing can be re-dirtied
    one, _ = gym.make("ringenv/Migration-v0", workloads=["memcached"], sample_windows=1).reset(seed=2)
    assert one[15] == 0.0 and one[16] == 0.0 and one[3] == pytest.approx(hot[3], rel=0.02)


def test_bad_sample_windows_is_named():
    with pytest.raises(Exception, match="sample_windows"):
        make(sample_windows=0)


def test_ring_size_is_fixed_by_the_first_action():
    env = make(workloads=["oltp"])
    env.reset(seed=0)
    _, _, _, _, info = env.step(np.array([4, 6]))
    assert info["ring_entries"] == 4096 and info["ring_size_ignored"] is False
    _, _, te, tr, info = env.step(np.array([8, 2]))
    assert info["ring_entries"] == 4096 and info["ring_size_ignored"] is True
    assert info["interval_ms"] == 50


def test_same_seed_same_actions_bit_identical():
    acts = [np.array([3, 5]), np.array([3, 1]), np.array([0, 8])]
    a, *_ = rollout(make(workloads=["oltp", "bursty"]), 11, acts)
    b, *_ = rollout(make(workloads=["oltp", "bursty"]), 11, acts)
    assert len(a) == len(b)
    for (oa, ra, ia), (ob, rb, ib) in zip(a, b):
        assert np.array_equal(oa, ob) and oa.tobytes() == ob.tobytes()
        assert ra == rb
        assert repr(sorted(ia.items())) == repr(sorted(ib.items()))
    c, *_ = rollout(make(workloads=["oltp", "bursty"]), 12, acts)
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c))


def test_rate_scale_range_draws_each_episode_s_write_rate_factor():
    """Domain randomisation: each reset draws a factor log-uniformly from rate_scale_range (after the
    workload and the episode seed, which stay those of the env without it) and the episode is the
    one of a scenario whose rate_scale is that factor, bit for bit. [1, 1] draws nothing."""
    wide, plain = make(rate_scale_range=[0.5, 2.0]), make()
    factors = []
    for seed in range(40):
        _, info = wide.reset(seed=seed)
        _, base = plain.reset(seed=seed)
        assert info["workload"] == base["workload"] and wide.unwrapped.episode_seed == plain.unwrapped.episode_seed
        assert base["rate_scale"] == plain.unwrapped.rate_scale == 1.0
        assert info["rate_scale"] == wide.unwrapped.rate_scale
        factors.append(info["rate_scale"])
    logs = np.log(factors)
    assert logs.min() >= np.log(0.5) and logs.max() <= np.log(2.0)
    assert logs.min() < np.log(0.6) and logs.max() > np.log(1.6) and abs(logs.mean()) < 0.25  # log-uniform
    acts = [np.array([4, 6]), np.array([4, 2])]
    a, *_ = rollout(make(rate_scale_range=[0.5, 2.0], workloads=["kernel-build"]), 3, acts)
    s = a[0][2]["rate_scale"]
    b, *_ = rollout(make(rate_scale_range=[s, s], workloads=["kernel-build"]), 3, acts)
    c, *_ = rollout(make(workloads=["kernel-build"]), 3, acts)
    assert len(a) == len(b) and all(np.array_equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b))
    # the factor reaches the workload: the sample and the run see it
    ratio = a[0][2]["sampled_dirty_rate_Bps"] / c[0][2]["sampled_dirty_rate_Bps"]
    assert ratio == pytest.approx(s, rel=0.05)  # kernel-build: well below saturation here
    assert a[-1][2]["pages_resent"] != c[-1][2]["pages_resent"]


@pytest.mark.parametrize("kw, bad", [
    ({"rate_scale": 1e-3, "rate_scale_range": [0.01, 0.01]}, "1e-05"),
    ({"rate_scale": 0.002, "rate_scale_range": [0.4, 2.0]}, "0.0008"),
    ({"rate_scale": 1000, "rate_scale_range": [100, 100], "workloads": ["idle"]}, "100000"),
])
def test_an_episode_factor_times_the_scenario_rate_scale_outside_its_range_is_refused_at_make(kw, bad):
    """Each bound is valid alone, but an episode's rate_scale (the scenario's times the drawn factor)
    would leave 1e-3 .. 1e3: refused when the env is made, naming rate_scale_range, not at some step."""
    with pytest.raises(ConfigError, match=rf"rate_scale_range: .*{bad}.*accepted") as e:
        make(**kw)
    assert "rate_scale" in str(e.value)
    make(rate_scale=0.002, rate_scale_range=[0.5, 2.0]).reset(seed=0)  # 0.001 .. 0.004: fine


@pytest.mark.slow
def test_random_policy_100_episodes_all_workloads_no_lost_write():
    sets = load_workload_sets()["default"]
    env = make(split="all")
    seen = set()
    for ep in range(100):
        steps, te, tr = rollout(env, 1000 + ep)
        info = steps[-1][2]
        seen.add(info["workload"])
        assert np.all(np.isfinite([s[1] for s in steps[1:]]))
        for obs, _, _ in steps:
            assert env.observation_space.contains(obs)
        if te:
            assert info["verified"] is True and info["lost_writes"] == 0, info["workload"]
    assert seen == set(sets["train"]) | set(sets["test"])


def test_splits_use_disjoint_workloads():
    sets = load_workload_sets()["default"]
    assert make(split="train").unwrapped.workloads == tuple(sets["train"])
    assert make(split="test").unwrapped.workloads == tuple(sets["test"])
    assert len(set(sets["train"]) | set(sets["test"])) >= 12


def test_vector_envs_sync_and_async():
    for mode in ("sync", "async"):
        envs = gym.make_vec("ringenv/Migration-v0", num_envs=2, vectorization_mode=mode, **SMALL)
        obs, _ = envs.reset(seed=3)
        assert obs.shape == (2, len(OBS_FIELDS))
        for _ in range(5):
            obs, r, te, tr, info = envs.step(envs.action_space.sample())
            assert r.shape == (2,)
        envs.close()


def test_step_info_deep_copies_like_a_dict():
    """SB3 deep-copies every step's info: StepInfo's cheap deep copy must be a real one."""
    import copy
    import pickle

    from stable_baselines3.common.env_util import make_vec_env

    env = make()
    env.reset(seed=1)
    info = env.step(env.action_space.sample())[-1]
    info["added"] = {"nested": [1, [2]], "arr": np.arange(3)}  # what a wrapper might add
    c = copy.deepcopy(info)
    assert isinstance(c, dict) and c.keys() == info.keys()
    for k, v in info.items():
        if k == "added":
            continue
        assert c[k] == v and type(c[k]) is type(v)
        if isinstance(v, (list, dict)):
            assert c[k] is not v
    c["ring_fill"].append(9.0)
    c["reward_parts"]["vcpu"] = -1.0
    c["added"]["nested"][1].append(3)
    c["added"]["arr"][0] = 7
    assert 9.0 not in info["ring_fill"] and info["reward_parts"]["vcpu"] != -1.0
    assert info["added"]["nested"] == [1, [2]] and info["added"]["arr"][0] == 0
    back = pickle.loads(pickle.dumps(info))  # AsyncVectorEnv sends infos through pipes
    assert back.keys() == info.keys() and back["ring_fill"] == info["ring_fill"]
    vec = make_vec_env(lambda: make(), n_envs=1, seed=0)  # SB3's DummyVecEnv deep-copies infos
    vec.reset()
    _, _, _, infos = vec.step(np.array([vec.action_space.sample()]))
    assert infos[0]["workload"] and len(infos[0]["ring_fill"]) == SMALL["vm"]["vcpus"]


def test_invalid_actions_are_clear_errors():
    env = make()
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"\(ring size index 9 is out of range\): expected integers \[ring size index "
                                         r"0..8, interval index 0..8\]"):
        env.step(np.array([9, 0]))
    with pytest.raises(ValueError, match=r"\(interval index -1 is out of range\)"):
        env.step(np.array([0, -1]))
    with pytest.raises(ValueError, match=r"\[1.5, 0. \]\): expected integers \[ring size index"):
        env.step(np.array([1.5, 0.0]))
    d = make("ringenv/MigrationDiscrete-v0")
    d.reset(seed=0)
    with pytest.raises(ValueError, match="integer in 0..80"):
        d.step(81)


def test_the_action_forms_step_takes_are_the_documented_ones():
    """Integers as numpy or Python ints, a list for MultiDiscrete, a one-element array for
    Discrete (more lenient than contains); a bool or a float array is refused (the docstring's
    Action Space paragraph)."""
    d = make("ringenv/MigrationDiscrete-v0").unwrapped
    d.reset(seed=0)
    for a in (40, np.int64(40), np.array(40), np.array([40]), np.array([40], dtype=np.uint8)):
        assert d.decode_action(a) == d.decode_action(40)
    assert d.action_space.contains(40) and not d.action_space.contains(np.array([40]))
    for bad in (True, np.array([True]), np.array([40.0]), np.array([40, 1]), "40"):
        with pytest.raises(ValueError, match="expected an integer in 0..80"):
            d.decode_action(bad)
    env = make().unwrapped
    env.reset(seed=0)
    want = (env.ring_sizes[4], env.intervals_ms[3])
    for a in ([4, 3], (4, 3), np.array([4, 3], dtype=np.int32), [np.int64(4), 3]):
        assert env.decode_action(a) == want
    for bad in ([True, False], np.array([4.0, 3.0]), [[4, 3]], 4):
        with pytest.raises(ValueError, match="expected integers"):
            env.decode_action(bad)


def test_step_before_reset_and_after_end():
    env = make().unwrapped
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(np.array([0, 0]))
    steps, te, tr = rollout(env, 4, [np.array([4, 6])])
    assert te
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step(np.array([4, 6]))


def test_step_after_truncation_or_close_raises_until_reset():
    env = make(max_episode_s=0.2).unwrapped  # 4 steps of 50 ms: truncated long before the end
    steps, te, tr = rollout(env, 0, [np.array([4, 3])])
    assert tr and not te and len(steps) == 5
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step(np.array([4, 3]))
    env.reset(seed=0)
    env.step(np.array([4, 3]))
    env.close()
    with pytest.raises(RuntimeError, match=r"after close\(\); call reset\(\)"):
        env.step(np.array([4, 3]))
    env.close()  # idempotent
    env.reset(seed=0)  # usable again, from the start
    *_, info = env.step(np.array([4, 3]))
    assert info["time_s"] == pytest.approx(0.05)


@pytest.mark.parametrize("env_id", ["ringenv/Migration-v0", "ringenv/Checkpoint-v0"])
def test_truncation_before_the_bandwidth_is_measured_charges_the_configured_rate(env_id):
    """The bandwidth is measured over >= 100 ms of sending; a truncation before that charges the
    remaining bytes at the rate the run sends at (the link, or the checkpoint storage)."""
    env = make(env_id, max_episode_s=0.05, workloads=["oltp"], checkpoint={"horizon_s": 2.0, "period_s": 0.02},
               reward={"truncation": 10.0})
    env.reset(seed=1)
    _, r, te, tr, info = env.step(np.array([4, 3]))
    assert tr and not te and info["bandwidth_Bps"] == 0.0 and info["remaining_bytes"] > 0
    u = env.unwrapped
    rate = u.scenario.link.rate_Bps if u.kind == "migration" else u.scenario.checkpoint.storage_mbps * 1e6
    assert info["truncation_downtime_s"] == pytest.approx(info["remaining_bytes"] / rate)
    assert info["reward_parts"]["truncation"] == pytest.approx(10.0 * info["remaining_bytes"] / rate)
    assert -100 < r < 0


def test_checkpoint_run_longer_than_the_time_cap_is_truncated():
    """Checkpoint-v0 ends at its horizon; a run still writing a checkpoint at ``max_episode_s``
    (a big VM on slow storage) is truncated, as the docstring says."""
    env = make("ringenv/Checkpoint-v0", checkpoint={"horizon_s": 2.0, "period_s": 0.5, "storage_mbps": 20},
               max_episode_s=1.0)
    steps, te, tr = rollout(env, 0, [np.array([4, 3])])
    assert tr and not te and "max_episode_s" in type(env.unwrapped).__doc__.split("## Episode End")[1]


def test_render_after_reset_shows_no_step_of_the_previous_episode():
    env = make(render_mode="ansi")
    env.reset(seed=0)
    env.step(np.array([4, 6]))
    assert env.render().startswith("t=")
    env.reset(seed=1)
    assert env.render() == "(reset, no step yet)"


def test_render_before_the_first_reset_draws_an_empty_frame():
    """gym.make's order enforcing refuses it, but the class itself can be built and rendered:
    rgb_array raised AttributeError (no ring_entries) where ansi answered."""
    pytest.importorskip("matplotlib")
    from ringenv.env import MigrationEnv

    assert MigrationEnv(render_mode="ansi").render() == "(no episode yet: reset first)"
    frame = MigrationEnv(render_mode="rgb_array").render()
    assert frame.shape == (240, 480, 3) and frame.dtype == np.uint8


def test_rgb_render_leaves_the_matplotlib_backend_alone():
    matplotlib = pytest.importorskip("matplotlib")
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        env = make(render_mode="rgb_array")
        env.reset(seed=0)
        env.step(np.array([4, 6]))
        assert env.render().shape == (240, 480, 3)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


def test_reset_options():
    env = make(split="all")
    _, info = env.reset(seed=0, options={"workload": "redis"})
    assert info["workload"] == "redis"
    info["intervals_ms"].clear()  # the info's lists are the caller's
    info["ring_sizes"].clear()
    env.step(np.array([4, 8]))
    for options, match in [({"wrkload": "web"}, "options: unknown key 'wrkload'; accepted: workload"),
                           ("web", "options: expected a dict"),
                           ({"workload": "bogus"}, "unknown workload 'bogus'; accepted: .*redis")]:
        with pytest.raises(ConfigError, match=match):
            env.reset(seed=5, options=options)
    # nothing half-done: the episode under way goes on as if the bad calls never happened
    twin = make(split="all")
    twin.reset(seed=0, options={"workload": "redis"})
    twin.step(np.array([4, 8]))
    a, b = env.step(np.array([4, 2])), twin.step(np.array([4, 2]))
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[4]["time_s"] == b[4]["time_s"] == pytest.approx(0.1)


@pytest.mark.parametrize("kwargs,match", [
    ({"split": "validation"}, "split: 'validation'"),
    ({"control_interval_ms": -5}, "control_interval_ms"),
    ({"reward": {"downtyme": 1}}, "reward.downtyme: unknown key"),
    ({"intervals_ms": [0, 10]}, "intervals_ms"),
    ({"ring_sizes": [3000]}, "ring_sizes"),
    ({"ring_sizes": [128, 256]}, "ring_sizes: 128 is not accepted by arm64-4k; accepted: 256, 512, .*65536"),
    ({"ring_sizes": [512, 256, 512]}, "ring_sizes: 512 is given twice"),
    ({"intervals_ms": [10, 10]}, "intervals_ms: 10 is given twice"),
    ({"intervals_ms": [0.5, 10]}, r"intervals_ms: 0.5 .*accepted: 1 to 10000 ms"),
    ({"intervals_ms": [10, 20000]}, r"intervals_ms: 20000 .*accepted: 1 to 10000 ms"),
    ({"workloads": "web"}, "workloads: expected a list of workload names, got 'web'"),
    # a generator: env.spec could not copy it and a vector env's second env read it empty
    ({"workloads": (w for w in ["web", "redis"])}, r"workloads: generator .* is a one-shot iterator: .*accepted: a "
                                                   r"list or tuple of workload names"),
    ({"workloads": iter(["web"])}, r"workloads: list_iterator .* is a one-shot iterator"),
    ({"workloads": ["web", "bogus"]}, r"workloads\[1\]: unknown workload 'bogus'; accepted: "),
    ({"control_interval_ms": 1e-7}, r"control_interval_ms: .*greater than or equal to 0.000001"),
    ({"ring_sizes": [True]}, r"ring_sizes: \[True\]: True is not a number"),
    ({"intervals_ms": [10, False]}, r"intervals_ms: \[10, False\]: False is not a number"),
    ({"flatten_actions": "no"}, "flatten_actions: 'no'; accepted: True or False"),
    ({"rate_scale_range": [2, 1]},
     r"rate_scale_range: \[2.0, 1.0\] is not accepted; accepted: \[low, high\] with 0 < low"),
    ({"rate_scale_range": [0, 1]}, r"rate_scale_range: \[0.0, 1.0\] is not accepted; accepted: \[low, high\]"),
    ({"rate_scale_range": [1]}, r"rate_scale_range: \[1\] is not accepted; accepted: \[low, high\]"),
    ({"rate_scale_range": 2}, r"rate_scale_range: 2 is not accepted; accepted: \[low, high\]"),
    ({"bogus": 1}, "bogus: unknown argument; accepted: scenario, split, workloads, flatten_actions, render_mode, .*"
                   "control_interval_ms.*host, vm, rate_scale"),
    ({"vm": {"vcpus": 0}}, "vm.vcpus"),
    ({"scenario": "nope"}, "unknown scenario 'nope'"),
])
def test_invalid_arguments_name_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make(**kwargs)


def test_workloads_must_have_an_order_and_be_a_list_or_tuple():
    """A set's order follows the string hash, which differs between processes: the same seed
    would draw different workloads, so a set is refused. A generator (any one-shot iterator) is
    refused too: gym.make keeps the arguments in env.spec, which could not copy it (spec None),
    and a vector env's second env read it empty ("the chosen set is empty")."""
    with pytest.raises(ConfigError, match=r"workloads: a set has no fixed order .*pass a list"):
        make(workloads={"web", "idle"})
    with pytest.raises(ConfigError, match=r"workloads: a set has no fixed order"):
        make(workloads=frozenset({"web"}))
    for it in ((w for w in ["web", "idle"]), iter(["web", "bogus"]), map(str, ["web"])):
        with pytest.raises(ConfigError, match=r"is a one-shot iterator.*accepted: a list or tuple"):
            make(workloads=it)
    env = make(workloads=("web", "idle"))
    assert env.unwrapped.workloads == ("web", "idle") and env.spec.kwargs["workloads"] == ("web", "idle")
    assert gym.make(env.spec).unwrapped.workloads == ("web", "idle")
    with pytest.raises(ConfigError, match=r"workloads\[1\]: unknown workload 'bogus'"):
        make(workloads=["web", "bogus"])
    with pytest.raises(ConfigError, match=r"workloads: expected a list of workload names, got 3"):
        make(workloads=3)
    with pytest.raises(ConfigError, match=r"workloads: expected a list of workload names, got \['web', 3\]"):
        make(workloads=["web", 3])


def test_a_misspelt_kind_in_the_scenario_file_is_an_error_though_the_env_id_decides(tmp_path):
    """The env id decides what runs, whatever the file's ``kind``; a value that is neither kind
    is still a typo in the file, reported as any other bad field is."""
    from ringenv.config import load_scenario

    p = tmp_path / "typo.yaml"
    p.write_text("name: typo\nkind: migraton\nvm: {memory: 512MiB, vcpus: 2}\nworkload: web\n")
    for env_id in ("ringenv/Migration-v0", "ringenv/Checkpoint-v0"):
        with pytest.raises(ConfigError, match=r"typo.yaml.*\n  kind: 'migraton' is not accepted; accepted: "
                                              r"migration, checkpoint"):
            gym.make(env_id, scenario=str(p))
    with pytest.raises(ConfigError, match=r"kind: 'migraton' is not accepted"):
        load_scenario(str(p), kind="checkpoint")
    p.write_text("name: ok\nkind: checkpoint\nvm: {memory: 512MiB, vcpus: 2}\nworkload: web\n")
    assert gym.make("ringenv/Migration-v0", scenario=str(p)).unwrapped.scenario.kind == "migration"


def test_invalid_render_mode_names_the_field():
    from ringenv.env import MigrationEnv

    with pytest.raises(ConfigError, match="render_mode: 'vga'"):
        MigrationEnv(render_mode="vga", **SMALL)


def test_reward_is_minus_the_weighted_costs():
    env = make(workloads=["memcached"], reward={"vcpu": 0, "vmm": 0, "memory": 0, "time": 1.0, "downtime": 0})
    env.reset(seed=2)
    _, r, *_ = env.step(np.array([4, 6]))
    assert r == pytest.approx(-0.05)  # 50 ms (the default control interval) of migration at 1 per second
    env = make(workloads=["memcached"], reward={"scale": 10.0})
    env.reset(seed=2)
    _, r, _, _, info = env.step(np.array([4, 6]))
    assert r == pytest.approx(-sum(info["reward_parts"].values()) / 10.0)


def test_render_modes():
    env = make(render_mode="ansi")
    env.reset(seed=0)
    env.step(np.array([4, 6]))
    line = env.render()
    assert "ring=  4096" in line and "int=  1000ms" in line
    env = make(render_mode="rgb_array")
    env.reset(seed=0)
    env.step(np.array([4, 6]))
    img = env.render()
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.std() > 0


def _bar_pixels(img, rgb):
    return int((np.abs(img.astype(int) - rgb).sum(axis=2) < 12).sum())


def test_rgb_frame_after_reset_draws_the_empty_state_not_a_black_image():
    """RecordVideo's first frame is the one after reset: it shows the axes with every ring empty
    and nothing sent (no bar), then a step's frame shows the rings' fill."""
    pytest.importorskip("matplotlib")
    blue, green = (31, 119, 180), (44, 160, 44)  # matplotlib's tab:blue (fill) and tab:green (sent)
    for env_id in ("ringenv/Migration-v0", "ringenv/Checkpoint-v0"):
        # (2 GiB: still migrating after 4 steps; 512 MiB switches over within ~0.15 s)
        env = make(env_id, render_mode="rgb_array", workloads=["memcached"], vm={"memory": "2GiB", "vcpus": 2})
        env.reset(seed=0)
        img = env.render()
        assert img.shape == (240, 480, 3) and img.dtype == np.uint8
        assert (img > 200).all(axis=2).mean() > 0.5, "mostly white background, not a black frame"
        assert (img < 60).all(axis=2).sum() > 500, "axes, ticks and labels are drawn"
        assert _bar_pixels(img, blue) == 0 and _bar_pixels(img, green) == 0
        for _ in range(4):
            env.step(np.array([0, 3]))  # the smallest ring fills
        assert _bar_pixels(env.render(), blue) + _bar_pixels(env.render(), (214, 39, 40)) > 100
    env = make(render_mode="rgb_array", collector="bitmap")
    env.reset(seed=0)
    assert (env.render() > 200).all(axis=2).mean() > 0.5


def test_rgb_frames_reuse_one_figure_and_leave_nothing_of_the_last_frame():
    """The figure is built once per env and each frame redrawn on a saved background (blitting,
    ~3 ms a frame against ~75 ms): a frame after a reset is exactly a fresh env's, though the
    frame before showed full rings and progress; a copy of the env draws its own."""
    pytest.importorskip("matplotlib")
    import copy

    blue, red, green = (31, 119, 180), (214, 39, 40), (44, 160, 44)
    kw = dict(render_mode="rgb_array", workloads=["memcached"], vm={"memory": "2GiB", "vcpus": 2})
    env = make(**kw)
    env.reset(seed=0)
    for _ in range(4):
        env.step(np.array([0, 3]))
    full = env.render()
    assert _bar_pixels(full, blue) + _bar_pixels(full, red) > 100 and _bar_pixels(full, green) > 0
    env.reset(seed=0)
    fresh = make(**kw)
    fresh.reset(seed=0)
    assert np.array_equal(env.render(), fresh.render())
    twin = copy.deepcopy(fresh.unwrapped)
    assert np.array_equal(twin.render(), fresh.render())


@pytest.mark.slow
def test_no_memory_growth_over_many_episodes():
    """DESIGN reliability bar: resident memory stays flat over a long run (full-size default VM)."""
    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    env = gym.make("ringenv/Migration-v0", workloads=["web"])
    sizes = []
    for ep in range(14):
        rollout(env, ep, [np.array([4, 6])])
        sizes.append(rss_mib())
    assert max(sizes[6:]) - min(sizes[3:6]) < 64, sizes


def test_bitmap_baseline_episode():
    """collector="bitmap": the classic dirty log, the actions change nothing, no ring memory."""
    env = make(collector="bitmap", workloads=["oltp"])
    steps, te, tr = rollout(env, 5, [np.array([8, 0]), np.array([0, 8])])
    info = steps[-1][2]
    assert te and info["collector"] == "bitmap" and info["ring_entries"] == 0 and info["ring_bytes"] == 0
    assert info["verified"] is True and info["get_dirty_log_calls"] > 0


# ---------------------------------------------------------------------------------- review fixes
@pytest.mark.parametrize("field, words", [
    ("workload", ["workloads=[...]", "reset(options={'workload'"]),
    ("ring_entries", ["the action chooses", "ring_sizes=[...]"]),
    ("interval_ms", ["the action chooses", "intervals_ms=[...]"]),
    ("kind", ["the env id chooses", "ringenv/Checkpoint-v0"]),
    ("seed", ["reset(seed=...)"]),
    ("name", ["scenario="]),
])
def test_scenario_fields_the_env_sets_itself_are_rejected(field, words):
    """workload, ring_entries, interval_ms, kind, seed and name are scenario fields the env
    decides by other means: as keywords they would be ignored, so they are errors pointing to
    the right mechanism."""
    value = {"workload": "analytics", "ring_entries": 256, "interval_ms": 10, "kind": "checkpoint", "seed": 5,
             "name": "x"}[field]
    with pytest.raises(ConfigError) as e:
        make(**{field: value})
    msg = str(e.value)
    assert msg.startswith(f"{field}: "), msg
    for w in words:
        assert w in msg, (w, msg)
    # and the unknown-argument message does not offer them
    with pytest.raises(ConfigError) as e:
        make(bogus=1)
    accepted = str(e.value).split("scenario fields")[1]
    for f in ("workload", "ring_entries", "interval_ms", "kind", "seed", "name"):
        assert f" {f}," not in accepted and f" {f})" not in accepted, (f, accepted)
    doc = type(make().unwrapped).__doc__.split("## Arguments")[1]
    assert "`seed`" not in doc.split("## Version History")[0]


@pytest.mark.parametrize("env_id", ["ringenv/Migration-v0", "ringenv/Checkpoint-v0"])
def test_remaining_uses_the_runs_rate_before_the_bandwidth_is_measured(env_id):
    """Until the bandwidth is measured (~1 s into a run) ``remaining`` is scaled by the run's own
    rate, as the truncation charge is, not pinned at its high."""
    env = gym.make(env_id, workloads=["oltp"])
    env.reset(seed=0)
    o, _, _, _, info = env.step(np.array([4, 3]))
    u = env.unwrapped
    assert info["bandwidth_Bps"] == 0 and info["remaining_bytes"] > 0
    assert 0 < o[8] < 6
    if u.kind == "migration":  # bytes the run's rate sends within the downtime limit
        scale = u.scenario.link.rate_Bps * u.scenario.link.downtime_limit_ms / 1000
    else:  # bytes the storage writes in 1 ms
        scale = u.scenario.checkpoint.storage_mbps * 1e6 / 1000
    assert o[8] == pytest.approx(np.log10(1 + info["remaining_bytes"] / scale), rel=1e-5)


def test_checkpoint_observations_are_scaled_by_the_storage_rate():
    """Checkpoint-v0's rate observations are divided by the storage rate (the link plays no part
    in checkpointing); ``remaining`` is the pause in ms a stop-the-world write of the remaining
    dirty bytes would take at that rate. Migration-v0 keeps the link rate."""
    ck = gym.make("ringenv/Checkpoint-v0", scenario="checkpoint")
    u = ck.unwrapped
    storage = u.scenario.checkpoint.storage_mbps * 1e6
    assert u.obs_rate_Bps == storage != u.scenario.link.rate_Bps
    o, info = ck.reset(seed=0)
    assert o[3] == pytest.approx(info["sampled_dirty_rate_Bps"] / storage, rel=1e-5)
    assert o[15] == pytest.approx(info["sampled_redirty_rate_Bps"] / storage, rel=1e-5)
    high_bw = 0.0
    for k in range(40):
        o, _, _, _, info = ck.step(np.array([4, 6]))
        assert o[2] == pytest.approx(min(info["dirty_rate_Bps"] / storage, 10), rel=1e-5, abs=1e-7)
        assert o[9] == pytest.approx(min(info["bandwidth_Bps"] / storage, 2), rel=1e-5, abs=1e-7)
        assert o[8] == pytest.approx(np.log10(1 + info["remaining_bytes"] / (storage * 1e-3)), rel=1e-5, abs=1e-7)
        high_bw = max(high_bw, o[9])
    assert 0.5 < high_bw < 2.0  # measured: about the storage rate, not 15x the link's (clipped at 2)
    doc = type(u).__doc__
    assert "storage rate" in doc and "pause" in doc
    from agents.common import EnvFacts

    assert EnvFacts.from_env(ck).link_Bps == storage  # what the heuristics turn rate observations back with
    mg = gym.make("ringenv/Migration-v0", scenario="checkpoint")
    assert mg.unwrapped.obs_rate_Bps == mg.unwrapped.scenario.link.rate_Bps
    assert EnvFacts.from_env(mg).link_Bps == mg.unwrapped.scenario.link.rate_Bps


def test_scenario_of_a_wrong_type_names_the_argument():
    for bad in (5, 2.5, ["default"]):
        with pytest.raises(ConfigError, match=r"scenario: .* accepted: a scenario name .*a YAML path.*a mapping.*"
                                              r"ScenarioConfig"):
            make(scenario=bad) if not isinstance(bad, list) else gym.make("ringenv/Migration-v0", scenario=bad)
    with pytest.raises(ConfigError, match="ring_sizes: .*at least one"):
        make(ring_sizes=[])


def test_pickling_or_copying_a_stepped_env_is_a_clear_error():
    import copy
    import pickle

    env = make()
    pickle.loads(pickle.dumps(env))  # fresh
    copy.deepcopy(env)
    env.reset(seed=3)
    twin = pickle.loads(pickle.dumps(env))  # reset, not stepped: the copy runs the same episode
    a, b = env.step(np.array([3, 4])), twin.step(np.array([3, 4]))
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    # (a shallow copy of the gym.make wrappers shares the env: only the env itself refuses one)
    for copier, obj in ((pickle.dumps, env), (copy.deepcopy, env), (copy.copy, env.unwrapped)):
        with pytest.raises(TypeError, match=r"cannot be pickled or copied.*episode under way.*same arguments.*"
                                            r"same seed.*actions"):
            copier(obj)
    env.close()  # no episode under way: copies again
    pickle.loads(pickle.dumps(env))
    doc = type(env.unwrapped).__doc__
    assert "pickle" in doc and "deepcopy" in doc


def test_docstring_says_which_observations_clip():
    from ringenv.env import MigrationEnv

    obs_doc = MigrationEnv.__doc__.split("## Observation Space")[1].split("## Rewards")[0]
    assert "clipped" in obs_doc and "cpu_busy" in obs_doc
    for name in ("dirty_rate", "lost_vcpu", "vmm_cpu", "remaining", "bandwidth"):
        assert name in obs_doc.split("clipped")[1], name


def test_lost_vcpu_time_stays_within_the_elapsed_time_of_a_cpu_bound_vcpu():
    """The analytics workload (cpu_busy 1) on 1 vCPU: the open-loop guest lost 1.6 vCPU-seconds
    per second there; the closed loop keeps every step's share below 1 (and well above 0)."""
    env = gym.make("ringenv/Migration-v0", vm={"memory": "4GiB", "vcpus": 1}, workloads=["analytics"])
    env.reset(seed=0)
    prev, shares = None, []
    for _ in range(60):
        *_, te, tr, info = env.step([4, 4])
        lost = info["vcpu_fault_s"] + info["vcpu_exit_s"] + info["vcpu_stall_s"] + info["vcpu_throttle_s"]
        if prev is not None:
            shares.append((lost - prev[0]) / (info["time_s"] - prev[1]))
        prev = (lost, info["time_s"])
        if te or tr:
            break
    assert max(shares) < 1.0
    assert 0.3 < float(np.mean(shares)) < 0.9


def test_bitmap_collector_reports_no_interval():
    env = make(collector="bitmap", workloads=["oltp"])
    env.reset(seed=5)
    o, _, _, _, info = env.step(np.array([4, 6]))
    assert info["interval_ms"] == 0 and info["ring_entries"] == 0
    assert o[13] == 0.0


def test_docstring_documents_reset_info_attributes_truncation_and_time_cap():
    from ringenv.env import MigrationEnv

    doc = MigrationEnv.__doc__
    env = make()
    _, info = env.reset(seed=0)
    for k in info:
        assert f"`{k}`" in doc, k
    for attr in ("scenario", "cfg", "workloads", "ring_sizes", "intervals_ms", "flatten_actions", "workload",
                 "episode_seed", "rate_scale", "obs_rate_Bps"):
        assert f"`{attr}`" in doc.split("## Attributes")[1], attr
        assert hasattr(env.unwrapped, attr), attr
    rewards = doc.split("## Rewards")[1].split("## Starting State")[0]
    assert 'reward_parts["truncation"]' in rewards and "charged as downtime" not in rewards
    args = " ".join(doc.split("## Arguments")[1].split())
    assert "`max_episode_s`, simulated seconds before truncation, default 120" in args


def test_checkpoint_bandwidth_is_the_storage_rate_after_the_first_checkpoint_and_truncation_charges_it():
    """A checkpoint's bandwidth is measured while it writes, not across the wait since the last
    one: the ``bandwidth`` observation stays about 1 (the storage rate) after the first
    checkpoint, and a truncation charges the pause the remaining bytes take at the storage rate."""
    env = make("ringenv/Checkpoint-v0", workloads=["oltp"], max_episode_s=3.0,
               checkpoint={"horizon_s": 10.0, "period_s": 0.5, "storage_mbps": 500}, reward={"truncation": 10.0})
    steps, te, tr = rollout(env, 0, [np.array([4, 3])])
    assert tr and not te
    u = env.unwrapped
    storage = u.scenario.checkpoint.storage_mbps * 1e6
    after = [(o, info) for o, _, info in steps[1:] if info["checkpoints"] >= 1]
    assert len(after) > 10 and steps[-1][2]["checkpoints"] >= 3
    for o, info in after:
        assert info["bandwidth_Bps"] == pytest.approx(storage, rel=0.05)
        assert o[9] == pytest.approx(1.0, rel=0.05)
    info = steps[-1][2]
    assert info["remaining_bytes"] > 0
    assert info["reward_parts"]["truncation"] == pytest.approx(
        u.cfg.reward.truncation * info["remaining_bytes"] / storage, rel=0.05)


def test_an_env_override_is_merged_into_the_scenario_file_s_section(tmp_path):
    """A scenario file's env.reward weights stay unless an override names them: reward={"vcpu":
    1} on a file with downtime 5 keeps downtime 5 (as link={...} keeps the file's other link
    fields)."""
    import yaml

    from ringenv.config import CONFIG_DIR

    doc = yaml.safe_load((CONFIG_DIR / "scenarios" / "default.yaml").read_text())
    doc.setdefault("env", {}).setdefault("reward", {})["downtime"] = 5.0
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump(doc))
    env = gym.make("ringenv/Migration-v0", scenario=str(path), reward={"vcpu": 1.0})
    reward = env.unwrapped.cfg.reward
    assert (reward.downtime, reward.vcpu) == (5.0, 1.0)
    env.close()


def test_an_invalid_workload_file_is_blamed_on_the_argument_that_named_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nregions: []\n")
    with pytest.raises(ConfigError, match=r"^workloads\[1\]: invalid workload bad.yaml"):
        make(workloads=["web", str(bad)])
    env = make()
    with pytest.raises(ConfigError, match=r"^options: workload: invalid workload bad.yaml"):
        env.reset(seed=0, options={"workload": str(bad)})


def test_a_checkpoint_episode_truncated_mid_pause_is_charged_the_pause_so_far():
    """Checkpoint-v0 truncated while the VM is paused for a checkpoint: the truncation charge is
    the pause so far plus the write still to do (at the write rate), so truncating later in the
    pause costs about as much as truncating just before it (the whole pause), not less."""
    kw = dict(scenario="checkpoint", vm={"memory": "1GiB", "vcpus": 2}, workloads=["memcached"],
              checkpoint={"period_s": 5, "storage_mbps": 50, "horizon_s": 60})

    def episode(max_s):
        env = gym.make("ringenv/Checkpoint-v0", max_episode_s=max_s, reward={"truncation": 10.0}, **kw)
        env.reset(seed=3)
        steps = []
        while True:
            _, _, te, tr, info = env.step(np.array([2, 6]))
            steps.append((env.unwrapped.t / 1e9, info["phase"]))
            if te or tr:
                env.close()
                return info, steps

    _, steps = episode(40.0)
    first = next(t for t, phase in steps if phase == "paused")  # the end of the step where the pause began
    run = [t for t, phase in steps if phase == "paused" and t < first + 10]
    assert len(run) >= 20, run  # a pause of a second or more
    before, _ = episode(first - 0.05)
    mid, _ = episode(run[len(run) // 2])
    assert before["phase"] != "paused" and mid["phase"] == "paused"
    t_before, t_mid = before["reward_parts"]["truncation"], mid["reward_parts"]["truncation"]
    assert t_mid == pytest.approx(t_before, rel=0.05)
    assert t_mid > 10.0 * mid["remaining_bytes"] / 50e6 * 1.2  # more than the write still to do


def test_auto_converge_is_refused_for_checkpointing_whatever_the_scenario_s_kind():
    """The default scenario is a migration's; run as checkpoints (the Checkpoint env, a
    CheckpointRun) it still takes no auto-converge, which would only ever step up there."""
    from ringenv.vmm import CheckpointRun

    with pytest.raises(ConfigError, match="throttle: 'auto-converge' is a migration's"):
        gym.make("ringenv/Checkpoint-v0", throttle="auto-converge")
    with pytest.raises(ConfigError, match="throttle: 'auto-converge' is a migration's"):
        CheckpointRun("default", throttle="auto-converge")
    gym.make("ringenv/Checkpoint-v0", throttle="dirty-limit").close()


def test_a_migration_truncated_in_its_stop_and_copy_is_charged_the_downtime_it_will_have():
    """max-bandwidth 128 MiB/s (below the link) and a 2 s give-up: the stop-and-copy (at the
    link's rate) runs from ~2 s. Truncated in it at any point, the charge is the time stopped so
    far plus what is left at the link's rate: about the downtime the finished run reports."""
    kw = dict(vm={"memory": "2GiB", "vcpus": 2}, workloads=["oltp"],
              link={"max_bandwidth_mibps": 128, "give_up_s": 2})

    def episode(max_s):
        env = gym.make("ringenv/Migration-v0", max_episode_s=max_s, reward={"truncation": 10.0}, **kw)
        env.reset(seed=3)
        while True:
            _, _, te, tr, info = env.step(np.array([2, 6]))
            if te or tr:
                env.close()
                return te, info

    te, done = episode(60.0)
    assert te and not done["converged"]
    charged = []
    for max_s in (2.1, 3.0, 3.5):
        te, info = episode(max_s)
        assert not te and info["phase"] == "stop-copy"
        charged.append(info["reward_parts"]["truncation"])
    full = 10.0 * done["downtime_s"]  # the truncation weight given
    assert all(c == pytest.approx(full, rel=0.05) for c in charged), (charged, full)


@pytest.mark.parametrize("name, value", [("workloads", ["idle"]), ("kind", "checkpoint"), ("ring_sizes", [65536, 256]),
                                         ("intervals_ms", [5.0]), ("scenario", None), ("cfg", None),
                                         ("workload", "idle"), ("ring_entries", 256), ("interval_ms", 5.0),
                                         ("rate_scale", 2.0)])
def test_the_documented_read_only_attributes_cannot_be_assigned(name, value):
    """The env docstring's Attributes: read-only. Assigning one used to be accepted and changed
    the env under its spaces (ring_sizes: an action then meant another ring size)."""
    env = gym.make("ringenv/Migration-v0", max_episode_s=1.0)
    u = env.unwrapped
    env.reset(seed=0)
    before = getattr(u, name)
    with pytest.raises(AttributeError, match=f"{name} is read-only"):
        setattr(u, name, value)
    assert getattr(u, name) == before
    env.step(env.action_space.sample())  # the env still works
    u.t_extra = 1  # other attributes are the user's


@pytest.mark.parametrize("path, value", [("scenario.link.gbps", 1.0), ("scenario.vm.vcpus", 2),
                                         ("scenario.throttle", "dirty-limit"), ("cfg.ring_sizes", [4096]),
                                         ("cfg.reward.downtime", 0.0)])
def test_the_configs_behind_the_env_cannot_be_changed_field_by_field(path, value):
    """``u.scenario.link.gbps = 1.0`` was accepted: the run used 1 Gb/s while the observation
    still divided rates by 10 Gb/s (and ``u.cfg.ring_sizes = [...]`` changed nothing). Config
    objects are immutable: gym.make's keywords (or load_scenario / model_copy) make new ones."""
    u = gym.make("ringenv/Migration-v0", max_episode_s=1.0).unwrapped
    *parents, field = path.split(".")
    obj = u
    for p in parents:
        obj = getattr(obj, p)
    before = getattr(obj, field)
    with pytest.raises(ValueError, match="frozen"):
        setattr(obj, field, value)
    assert getattr(obj, field) == before


@pytest.mark.parametrize("name", ["workloads", "ring_sizes", "intervals_ms"])
def test_the_read_only_grids_cannot_be_changed_in_place(name):
    """They were lists: ``u.ring_sizes[0] = 65536`` was accepted and made action 0 mean another
    ring size than the one the env was made with."""
    u = gym.make("ringenv/Migration-v0", max_episode_s=1.0).unwrapped
    grid = getattr(u, name)
    assert isinstance(grid, tuple)
    with pytest.raises(TypeError):
        grid[0] = grid[-1]
    with pytest.raises(AttributeError):
        grid.append(grid[0])


@pytest.mark.parametrize("env_id, multi", [("ringenv/MigrationDiscrete-v0", "ringenv/Migration-v0"),
                                           ("ringenv/CheckpointDiscrete-v0", "ringenv/Checkpoint-v0")])
def test_the_discrete_ids_refuse_flatten_actions_false(env_id, multi):
    """gymnasium.make merges the caller's keywords over the id's: flatten_actions=False used to
    turn a Discrete id into a MultiDiscrete env without a word."""
    assert isinstance(gym.make(env_id).action_space, gym.spaces.Discrete)
    assert isinstance(gym.make(env_id, flatten_actions=True).action_space, gym.spaces.Discrete)
    with pytest.raises(ConfigError, match=f"flatten_actions: False; this is the Discrete variant .*make {multi}"):
        gym.make(env_id, flatten_actions=False)


def test_a_config_error_names_only_the_overrides_the_user_gave():
    """The env id chooses the kind (load_scenario's run_kind): an error's header named ``kind``
    among the keyword overrides, which the user never passed, and with none given said
    "with the keyword overrides (kind)"."""
    with pytest.raises(ConfigError) as ei:
        gym.make("ringenv/Migration-v0", vm={"memory": "1XB"})
    head = str(ei.value).splitlines()[0]
    assert head == "invalid scenario default.yaml with the keyword overrides (vm):", head
    with pytest.raises(ConfigError) as ei:
        gym.make("ringenv/Checkpoint-v0", scenario={"vm": {"vcpus": 0}})
    head = str(ei.value).splitlines()[0]
    assert "keyword overrides" not in head and "kind" not in head, head
    assert "vm.vcpus" in str(ei.value)
