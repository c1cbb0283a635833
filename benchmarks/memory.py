"""No memory growth over long runs (DESIGN.md's reliability bar).

The resident set of a process while ``ringenv/Migration-v0`` runs episode after episode under
a random policy (every workload of the training split, a new VM and VMM run per episode), and
while ``ringenv/Checkpoint-v0`` does: measured after a warm-up (the compiled kernels loaded, the
page-array recycler filled) and at the end. The recycler keeps a few freed page arrays for the
next VM, so single readings move by a few tens of MB; a leak shows as a steady climb, hence
the highest reading of the second half against that of the first. Each row runs in a fresh
process of its own (spawned: no torch and none of the other benchmarks' memory in it), so that
the +5% bound is a share of what the env holds (~250 MB), not of a process several times that
size, where a leak of a few hundred kB per episode would stay under it.

A third row runs short episodes (``SHORT_STEPS`` steps, cut by a TimeLimit) and reads the resident
set without collecting first: what a run leaves for the cyclic collector shows there (a run of
numpy-heavy steps allocates too few Python objects for the collector to come by often), where
the other rows' gc.collect() would hide it.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import gymnasium as gym

import ringenv  # noqa: F401

EPISODES = {"ringenv/Migration-v0": 300, "ringenv/Checkpoint-v0": 40}
SHORT_EPISODES, SHORT_STEPS = 400, 20
WARMUP = 0.2  # share of the episodes before the first reading


def rss_mb() -> float:
    """This process's resident set now, MB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def growth(env_id: str, episodes: int, readings: int = 8, collect: bool = True,
           **kwargs) -> tuple[float, float, list[float]]:
    """(highest reading of the first half, of the second half, all readings), MB: readings taken
    (after gc, with ``collect``) at evenly spaced episode ends once ``WARMUP`` of the episodes ran."""
    env = gym.make(env_id, **kwargs)
    first = int(episodes * WARMUP)
    marks = {first + (episodes - 1 - first) * k // (readings - 1) for k in range(readings)}
    got = []
    for ep in range(episodes):
        env.reset(seed=ep)
        env.action_space.seed(ep)
        while True:
            *_, terminated, truncated, _ = env.step(env.action_space.sample())
            if terminated or truncated:
                break
        if ep in marks:
            if collect:
                gc.collect()
            got.append(rss_mb())
    env.close()
    half = len(got) // 2
    return max(got[:half]), max(got[half:]), got


def growth_alone(env_id: str, episodes: int, **kwargs) -> tuple[float, float, list[float]]:
    """:func:`growth` in a fresh process of its own (spawned), whose resident set is the env's."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(growth, env_id, episodes, **kwargs).result()


def main() -> list[tuple[str, str, str]]:
    rows = []

    def figure(a, b):
        return f"{a:.0f} / {b:.0f} MB ({b / a - 1:+.1%}, {b - a:+.0f} MB)"

    for env_id, n in EPISODES.items():
        a, b, _ = growth_alone(env_id, n)
        rows.append((f"memory: resident set of a process of its own over {n} episodes of {env_id} (random policy), "
                     "highest in the first / second half after warm-up", figure(a, b), "no growth (<= +5%)"))
    a, b, _ = growth_alone("ringenv/Migration-v0", SHORT_EPISODES, collect=False, max_episode_steps=SHORT_STEPS)
    rows.append((f"memory: the same over {SHORT_EPISODES} episodes cut at {SHORT_STEPS} steps, read without "
                 "gc.collect()", figure(a, b), "no growth (<= +5%)"))
    return rows


if __name__ == "__main__":
    for row in main():
        print(" | ".join(row))
