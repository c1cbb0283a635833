"""`make bench` stays runnable: its measurement functions that reach into the simulator's
internals run on tiny budgets (the figures themselves are checked by `make bench`, not here)."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest

import ringenv  # noqa: F401
from benchmarks.env_speed import NullEnv, ppo_run, random_policy
from benchmarks.host import compiled_vs_python


def test_the_walk_comparison_captures_a_window_and_times_both_versions():
    ratio, events = compiled_vs_python()
    assert math.isfinite(ratio) and ratio > 0
    # the largest batch is a workload window (walked by apply_window), not a stray small batch
    # of the general path: ~400 MB/s over 8 vCPUs fills a 4096-entry ring every ~0.33 s
    assert events >= 1000


def test_the_null_env_has_the_ring_envs_spaces_and_the_random_policy_runs():
    env = gym.make("ringenv/Migration-v0", max_episode_s=2.0)
    null = NullEnv(env, episode_steps=3)
    assert null.observation_space == env.observation_space and null.action_space == env.action_space
    obs, _ = null.reset(seed=0)
    assert null.observation_space.contains(obs)
    steps_per_s, wall_per_episode = random_policy(env, episodes=1)
    assert steps_per_s > 0 and wall_per_episode > 0
    assert np.isfinite([steps_per_s, wall_per_episode]).all()


def test_the_ppo_run_splits_its_wall_time_between_the_env_and_ppo():
    null = NullEnv(gym.make("ringenv/Migration-v0"), episode_steps=5)
    steps_per_s, env_us, ppo_us = ppo_run(null, timesteps=512)  # one rollout
    assert steps_per_s > 0 and 0 < env_us < ppo_us
    assert env_us + ppo_us == pytest.approx(1e6 / steps_per_s)


def test_the_floor_profile_finds_the_kernels_and_splits_the_env_time():
    from benchmarks.env_floor import floor, kernel_keys

    names = {name for _, _, name in kernel_keys()}
    assert {"apply_window", "reset_rings", "_sample_window", "reap_rings", "_take"} <= names
    f = floor(timesteps=512)  # one rollout
    assert 0 < f["kernels_us"] < f["env_profiled_us"] and f["numpy_us"] >= 0
    assert f["top"] and all(us > 0 for us, _ in f["top"])


def test_the_memory_benchmark_reads_the_resident_set_after_each_marked_episode():
    from benchmarks.memory import growth, rss_mb

    assert rss_mb() > 10
    first, second, readings = growth("ringenv/Migration-v0", 4, readings=2, max_episode_s=1.0)
    assert len(readings) == 2 and first == readings[0] and second == readings[1] and first > 10


def test_the_trace_replay_figure_times_the_whole_trace():
    from benchmarks.host import trace_replay_us

    us, writes = trace_replay_us(repeats=1)
    assert writes == 21000 and 0 < us < 1000


def test_the_bench_command_has_help_and_rejects_unknown_names_before_running(capsys):
    from benchmarks.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "host, vmm_speed, env_speed, env_floor, memory" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit) as e:
        main(["host", "hots"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'hots'" in err and "accepted: host, vmm_speed" in err


def test_the_bench_command_runs_only_the_modules_named(monkeypatch, capsys):
    import sys
    import types

    import benchmarks.__main__ as bench

    ran = []
    for name in ("first", "second"):
        mod = types.ModuleType(f"benchmarks.{name}")
        mod.main = lambda name=name: ran.append(name) or [(f"{name}: a figure", "1x", ">= 1x")]
        monkeypatch.setitem(sys.modules, f"benchmarks.{name}", mod)
    monkeypatch.setattr(bench, "NAMES", ["first", "second"])
    assert bench.main(["second", "first"]) == 0
    assert ran == ["second", "first"]
    out = capsys.readouterr().out
    assert "| second: a figure | 1x | >= 1x |" in out and out.index("second:") < out.index("first:")
