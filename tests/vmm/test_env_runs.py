"""How the environment uses VMM runs (ringenv/env.py over ringenv/vmm): the costs it charges
from their metrics, and the workload timeline an episode's run continues from its dirty-rate
sample."""

from __future__ import annotations

import gymnasium as gym
import pytest

import ringenv  # noqa: F401  (registers the ids)
from ringenv.guest.workload import WorkloadProgram

SECOND = 1_000_000_000
SMALL = {"vm": {"memory": "512MiB", "vcpus": 2}, "checkpoint": {"horizon_s": 2.0, "period_s": 0.5}}


def test_a_checkpoint_episode_charges_every_pause_as_downtime():
    """CheckpointEnv: the downtime charged is the sum of the checkpoint pauses (each when it
    ends), not the longest pause (the metrics' ``downtime_s``)."""
    env = gym.make("ringenv/Checkpoint-v0", **SMALL)
    env.reset(seed=0)
    charged = 0.0
    while True:
        _, _, te, tr, info = env.step([4, 6])
        charged += info["reward_parts"]["downtime"]
        if te or tr:
            break
    assert info["checkpoints"] >= 3 and info["pause_total_s"] > info["downtime_s"] > 0
    assert charged == pytest.approx(env.unwrapped.cfg.reward.downtime * info["pause_total_s"], rel=1e-9)


def test_the_episode_run_continues_the_workload_where_the_dirty_rate_sample_left_it():
    """The reset's dirty-rate sample covers the sample_s seconds before the migration: the run
    starts sample_s into the same workload timeline (its phases are those of t + sample_s)."""
    env = gym.make("ringenv/Migration-v0", **SMALL, workloads=["bursty"], sample_s=1.5)
    env.reset(seed=2)
    env.step([4, 6])
    u = env.unwrapped
    run = u._session
    start = 3 * SECOND // 2
    assert run.guest.start_ns == start
    timeline = WorkloadProgram("bursty", 2, seed=u.episode_seed, rate_scale=run.cfg.rate_scale)
    timeline.attach(run.vm)
    for t in range(0, 10 * SECOND, SECOND // 4):
        mult, end = timeline.multiplier(t + start)
        assert run.guest.multiplier(t) == (mult, end - start), t
    env.close()
