"""An episode's simulated host is freed when the next episode starts (or the env closes), by
reference counting alone: the VMM's generator processes, the event loop and the collector's ring
readers refer back to the run, and runs allocate too few Python objects for the cyclic collector
to come by often. With 20-step episodes the old runs used to pile up (RSS 193 -> 900 MiB over
1500 episodes; 8 MiB each: eight 65536-entry rings), freed only by an explicit gc.collect()."""

from __future__ import annotations

import gc
import weakref

import gymnasium as gym
import pytest

import ringenv  # noqa: F401  (registers the environments)


@pytest.fixture
def no_cyclic_gc():
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _refs(run):
    """Weak references to the run, its collector and a ring's entries (what the collector's
    readers map; the event loop and processes take no weak references: they hold the run)."""
    ring = [run.vcpus[0].ring_gfns] if run.cfg.collector == "ring" else []
    return [weakref.ref(x) for x in (run, run.collector, *ring)]


@pytest.mark.parametrize("env_id, kw", [
    ("ringenv/Migration-v0", {}),
    ("ringenv/Checkpoint-v0", {}),
    ("ringenv/Migration-v0", {"collector": "bitmap"}),
])
@pytest.mark.parametrize("end", ["reset", "close", "episode end"])
def test_an_episodes_run_is_freed_without_the_cyclic_collector(no_cyclic_gc, env_id, kw, end):
    env = gym.make(env_id, max_episode_s=0.5 if end == "episode end" else 30.0, **kw)
    env.reset(seed=3)
    done = False
    for _ in range(4 if end != "episode end" else 10**4):
        *_, te, tr, _ = env.step(env.action_space.sample())
        if te or tr:
            done = True
            break
    assert done == (end == "episode end")
    refs = _refs(env.unwrapped._session)
    if end == "close":
        env.close()
    else:
        env.reset(seed=4)
    alive = [r() for r in refs if r() is not None]
    assert not alive, f"still referenced after {end}: {[type(x).__name__ for x in alive]}"
    env.close()


def test_short_episodes_leave_no_run_behind(no_cyclic_gc):
    """Forty 3-step episodes: no episode's run outlives it."""
    env = gym.make("ringenv/Migration-v0")
    runs = []
    for ep in range(40):
        env.reset(seed=ep)
        for _ in range(3):
            env.step(env.action_space.sample())
        runs.append(weakref.ref(env.unwrapped._session))
    env.reset(seed=99)
    live = [r() for r in runs if r() is not None]
    assert live == [], f"{len(live)} runs of earlier episodes still live"
    env.close()


def test_a_closed_run_refuses_use_and_can_be_closed_again():
    from ringenv.config import load_scenario
    from ringenv.vmm.migration import MigrationRun

    run = MigrationRun(load_scenario("default", vm={"memory": "64MiB"}), seed=1)
    run.advance(run.now_ns + 20_000_000)
    m = run.metrics()
    run.close()
    run.close()
    for use in (lambda: run.advance(10**9), lambda: run.metrics(), lambda: run.now_ns):
        with pytest.raises(RuntimeError, match=r"MigrationRun\.\w+: the run is closed"):
            use()
    assert m.time_s == pytest.approx(0.02) and m.scenario == "default"  # taken before: still valid
