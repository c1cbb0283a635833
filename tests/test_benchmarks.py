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


# ------------------------------------------------------------------ every module's rows, on tiny budgets
def test_a_missing_benchmark_module_is_an_error_not_rows_left_out(monkeypatch):
    import benchmarks.__main__ as bench

    monkeypatch.setattr(bench, "MODULES", ["benchmarks.nosuch"])
    with pytest.raises(ModuleNotFoundError, match="benchmarks.nosuch"):
        bench.main([])


@pytest.mark.parametrize("runs", [
    [(1e9, True), (1e-9, False)],  # the first run by far the fastest, the bad one last
    [(1.0, False), (2.0, True)],  # the bad one first (a check of the last run only would miss it)
])
def test_the_vmm_rows_check_every_run_not_only_the_fastest(monkeypatch, runs):
    """A run that loses writes (verified False) shows whichever run was the fastest."""
    import types

    import benchmarks.vmm_speed as vmm_speed

    results = iter(runs)

    class Run:
        def __init__(self, scenario, seed):
            self.total_s, self.verified = next(results)

        def run(self):
            return types.SimpleNamespace(total_s=self.total_s, verified=self.verified)

    monkeypatch.setattr(vmm_speed, "MigrationRun", Run)
    x, total_s, verified = vmm_speed.speed("default", 2)
    assert total_s == max(t for t, _ in runs) and verified is False


def test_the_whole_simulator_memory_per_page_is_traced_and_within_the_bar():
    from benchmarks.vmm_speed import bytes_per_page
    from ringenv.config import scale_scenario

    b, pages = bytes_per_page(scale_scenario("default", "1GiB"), seconds=0.5)
    assert pages == (1 << 30) // 4096
    # the host's page arrays alone are 5 bytes a page and the VMM's bitmaps 6 more: a trace
    # that missed the VMM, or counted what an earlier run left in the recycler, falls outside
    assert 10 < b <= 16, b


def test_the_host_rows_count_lost_entries_over_every_run(monkeypatch):
    import benchmarks.host as host

    walls = iter([1.0, 2.0, 0.5, 3.0])  # size 0: second run fastest; size 1: first
    monkeypatch.setattr(host, "speed", lambda gib, s: {"wall": next(walls), "sim": s, "lost": gib})
    small, big = host.best_speeds([1, 10], 4.0, repeats=2)
    assert (small["wall"], big["wall"]) == (0.5, 2.0) and (small["lost"], big["lost"]) == (2, 20)


def test_the_floor_counts_every_module_that_defines_a_kernel():
    from benchmarks.env_floor import kernel_modules
    from ringenv.jit import kernel_sources

    mods = kernel_modules()
    assert len(mods) == len(kernel_sources())
    assert {"ringenv.kvm.pml", "ringenv.guest.trace", "ringenv.vmm.collectors", "ringenv.kvm.fault"} <= set(mods)


def test_every_module_of_make_bench_runs_its_rows_on_tiny_budgets(monkeypatch, capsys):
    """What `make bench` runs, end to end, shrunk: a renamed env argument or a changed internal
    breaks here, not only in `make bench`."""
    import benchmarks.__main__ as bench
    import benchmarks.env_floor as env_floor
    import benchmarks.env_speed as env_speed
    import benchmarks.host as host
    import benchmarks.memory as memory
    import benchmarks.vmm_speed as vmm_speed
    from ringenv.config import scale_scenario

    monkeypatch.setattr(host, "SIZES_GIB", (1, 2))
    monkeypatch.setattr(host, "SECONDS", 0.3)
    monkeypatch.setattr(host, "REPEATS", 1)
    monkeypatch.setattr(vmm_speed, "DEFAULT", scale_scenario("default", "256MiB"))
    monkeypatch.setattr(vmm_speed, "STRESS", scale_scenario("stress", "1GiB"))
    monkeypatch.setattr(vmm_speed, "DEFAULT_RUNS", 1)
    for mod in (env_speed, env_floor):
        monkeypatch.setattr(mod, "TIMESTEPS", 256)
    monkeypatch.setattr(env_speed, "PAIRS", 1)
    monkeypatch.setattr(env_speed, "RANDOM_RUNS", 1)
    monkeypatch.setattr(memory, "EPISODES", {"ringenv/Migration-v0": 3})
    monkeypatch.setattr(memory, "SHORT_EPISODES", 3)
    assert bench.main([]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("| ") and not ln.startswith("| figure")]
    assert len(rows) == 8 + 3 + 7 + 1 + 2, out
    cells = {c[0]: c[1] for c in ([x.strip() for x in ln.strip("|").split("|")] for ln in rows)}
    assert cells["host: lost ring entries, all 2 runs"] == "0"
    assert "all verified=True" in cells["vmm: default scenario (OLTP 8 vCPUs 16 GiB, 10 GbE), simulated s per wall s, "
                                        "best of 1"]
    assert cells["env: PPO steps/s on ringenv / on a null env, same spaces"].endswith("%")
    assert any(k.startswith("memory: resident set of a process of its own over 3 episodes") for k in cells)


def test_the_ring_vs_bitmap_sweep_prints_its_table(capsys):
    from benchmarks.ring_vs_bitmap import main

    assert main(["--rates", "5", "--memories", "1"]) == 0
    out = capsys.readouterr().out
    assert "| 1 GiB | 5 MB/s |" in out and "- 1 GiB: " in out
