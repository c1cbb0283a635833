"""Environment overhead (issue: the Gymnasium environments).

PPO (stable-baselines3, MlpPolicy, one env) on ``ringenv/Migration-v0`` with the default
scenario against PPO on a null environment with the same spaces and episode length, measured in
the same run: the share of PPO's steps/s that remains. Also env steps per second under a random
policy, wall time per episode, and for reference the PPO share with a 200 ms control interval
(the default before: about 80 steps per episode, each simulating four times the guest time),
with an idle guest (the env's cost per step before any dirty page: the bound that the
environment's machinery alone sets) and on the default scenario scaled down 16x
(:func:`ringenv.config.scale_scenario`: 16x fewer dirty pages per step).

A short PPO run first warms torch and SB3 up (their first updates are slower), so that neither
side pays for it; then the ring and null runs alternate, ``PAIRS`` times, and each side keeps
its best: the machine's noise then hits both alike (the reference rows too keep the best of
``PAIRS`` runs each, and the random policy the best of ``RANDOM_RUNS``). Both sides run behind the same timing
wrapper, which splits each run's wall time into the env's and PPO's own: the environment costs
PPO time beyond its own steps, which shows as PPO's own time growing: its numpy and numba calls
between two of PPO's forward passes evict torch's code and data from the caches (the growth is
in PPO's rollout collection, not in its updates; a null env that spins as long in Python does
not cause it).
"""

from __future__ import annotations

import time

import gymnasium as gym

import ringenv  # noqa: F401
from ringenv.config import scale_scenario

TIMESTEPS = 4096
SCALED_MEMORY = 1 << 30  # the scaled-down row: the default scenario's 16 GiB / 16
PAIRS = 2
RANDOM_RUNS = 3


class NullEnv(gym.Env):
    """Same spaces as the ring environment, no work, fixed-length episodes."""

    def __init__(self, like: gym.Env, episode_steps: int = 310):
        self.observation_space = like.observation_space
        self.action_space = like.action_space
        self.n, self.t = episode_steps, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self.observation_space.low.copy(), {}

    def step(self, action):
        self.t += 1
        return self.observation_space.low.copy(), 0.0, self.t >= self.n, False, {}


class Timed(gym.Wrapper):
    """Wall time spent inside the wrapped env's step and reset (both sides of the PPO
    comparison get it, so it costs them alike)."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.seconds = 0.0

    def step(self, action):
        t0 = time.perf_counter()
        out = self.env.step(action)
        self.seconds += time.perf_counter() - t0
        return out

    def reset(self, **kwargs):
        t0 = time.perf_counter()
        out = self.env.reset(**kwargs)
        self.seconds += time.perf_counter() - t0
        return out


def ppo_run(env, timesteps: int | None = None) -> tuple[float, float, float]:
    """PPO's steps/s on ``env`` over ``timesteps`` (default TIMESTEPS), and per step: wall us
    inside the env (step and reset), wall us in the rest (PPO itself: rollouts, updates, SB3's
    wrappers)."""
    from stable_baselines3 import PPO

    timesteps = timesteps or TIMESTEPS
    env = Timed(env)
    from agents.common import sb3_logger

    model = PPO("MlpPolicy", env, n_steps=512, batch_size=64, seed=0, verbose=0, device="cpu")
    model.set_logger(sb3_logger())  # (no empty folder left in the temporary directory)
    t0 = time.perf_counter()
    model.learn(total_timesteps=timesteps)
    wall = time.perf_counter() - t0
    return timesteps / wall, env.seconds / timesteps * 1e6, (wall - env.seconds) / timesteps * 1e6


def random_policy(env, episodes: int = 6) -> tuple[float, float]:
    steps, t0 = 0, time.perf_counter()
    for ep in range(episodes):
        env.reset(seed=ep)
        env.action_space.seed(ep)
        while True:
            *_, te, tr, _ = env.step(env.action_space.sample())
            steps += 1
            if te or tr:
                break
    wall = time.perf_counter() - t0
    return steps / wall, wall / episodes


def best_ppo_run(make_env, runs: int) -> tuple[float, float, float]:
    """The fastest of ``runs`` :func:`ppo_run` calls, each on a new env from ``make_env()``."""
    return max(ppo_run(make_env()) for _ in range(runs))


def main() -> list[tuple[str, str, str]]:
    import torch

    torch.set_num_threads(1)
    env = gym.make("ringenv/Migration-v0")
    random_policy(env, episodes=1)  # warm-up (loads the compiled kernels), not measured
    rand_sps, per_episode = max(random_policy(env) for _ in range(RANDOM_RUNS))
    ppo_run(NullEnv(env), timesteps=1024)  # warm-up, not measured
    ring = null = (0.0, 0.0, 0.0)
    for _ in range(PAIRS):
        ring = max(ring, ppo_run(gym.make("ringenv/Migration-v0")))
        null = max(null, ppo_run(NullEnv(env)))
    ring, ring_env_us, ring_ppo_us = ring
    null, _, null_ppo_us = null
    coarse = best_ppo_run(lambda: gym.make("ringenv/Migration-v0", control_interval_ms=200.0), PAIRS)[0]
    idle = best_ppo_run(lambda: gym.make("ringenv/Migration-v0", workloads=["idle"]), PAIRS)
    scaled = best_ppo_run(lambda: gym.make("ringenv/Migration-v0", scenario=scale_scenario("default", SCALED_MEMORY)),
                          PAIRS)
    factor = env.unwrapped.scenario.vm.memory // SCALED_MEMORY
    ms = env.unwrapped.cfg.control_interval_ms
    return [
        (f"env: random-policy steps per wall s (default scenario, {ms:g} ms steps, best of {RANDOM_RUNS} runs of 6 "
         "episodes)", f"{rand_sps:.0f}",
         "(for reference)"),
        ("env: wall s per episode, random policy", f"{per_episode:.2f}", "(for reference)"),
        ("env: PPO steps/s on ringenv / on a null env, same spaces", f"{ring:.0f} / {null:.0f} = {ring / null:.0%}",
         ">= 80%"),
        ("env: in that run, us per step: in ringenv / PPO's own with ringenv / PPO's own with the null env",
         f"{ring_env_us:.0f} / {ring_ppo_us:.0f} / {null_ppo_us:.0f}",
         f"(80% leaves ringenv {null_ppo_us / 0.8 - null_ppo_us:.0f} us in all)"),
        ("env: the same with control_interval_ms=200 (~80 steps per episode)",
         f"{coarse:.0f} / {null:.0f} = {coarse / null:.0%}", "(for reference)"),
        ("env: the same with an idle guest (next to no dirty pages: what the env costs per step "
         "before any dirty page), us in ringenv / PPO's own",
         f"{idle[0]:.0f} / {null:.0f} = {idle[0] / null:.0%}, {idle[1]:.0f} / {idle[2]:.0f}", "(for reference)"),
        (f"env: the same on the default scenario scaled to {SCALED_MEMORY >> 30} GiB (memory, link and "
         f"every rate / {factor}: ~{factor}x fewer dirty pages per step; rings and costs not scaled), "
         "us in ringenv / PPO's own",
         f"{scaled[0]:.0f} / {null:.0f} = {scaled[0] / null:.0%}, {scaled[1]:.0f} / {scaled[2]:.0f}",
         "(for reference)"),
    ]
