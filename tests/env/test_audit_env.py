"""Environment contract points found by an audit against the MigrationEnv docstring, README,
DESIGN and Gymnasium conventions: the step time and the time cap to the ns, rendering without
matplotlib, encode_action outside its domain."""

from __future__ import annotations

import math
import sys

import gymnasium as gym
import numpy as np
import pytest

import ringenv  # noqa: F401  (registers the ids)
from ringenv.config import load_scenario

SMALL_VM = {"memory": "512MiB", "vcpus": 2}


def _steps(env_id="ringenv/Migration-v0", n=3, seed=0, **kw):
    env = gym.make(env_id, workloads=["oltp"], vm=SMALL_VM, **kw)
    env.reset(seed=seed)
    out = []
    for _ in range(n):
        obs, r, te, tr, info = env.step(np.array([4, 6]))
        out.append((obs, r, info))
    return out


def test_a_control_interval_that_is_not_a_whole_float_number_of_ns_still_observes_each_step_s_end():
    """control_interval_ms=33.3: the env advances int(33.3 * 1e6) = 33_299_999 ns per step while
    the VMM's host-sync grid is round(33.3 * 1e6) = 33_300_000 ns, so no step ends on the grid
    and every observation shows the host as it was at the previous step's end (a whole control
    interval stale). Expected (docstring: `control_interval_ms`, simulated ms per step; the
    host is synchronised at every control interval so each observation describes the step's end
    exactly): 33.3 ms per step, the same episode as 33.30000001 ms (the same 33_300_000 ns)."""
    a = _steps(control_interval_ms=33.3)
    b = _steps(control_interval_ms=33.30000001)
    for k, ((oa, ra, ia), (ob, rb, ib)) in enumerate(zip(a, b)):
        assert ia["vcpu_fault_s"] == ib["vcpu_fault_s"], (f"step {k + 1}: the host state is the previous step's end",
                                                          [x[2]["vcpu_fault_s"] for x in a],
                                                          [x[2]["vcpu_fault_s"] for x in b])
        assert oa.tobytes() == ob.tobytes(), f"step {k + 1}"
        assert ra == rb
    assert a[0][2]["time_s"] == 0.0333, a[0][2]["time_s"]


def _steps_to_truncation(max_episode_s, **kw):
    """Steps of a slow migration (0.1 Gb/s) until the episode ends: (steps, info); it must be
    truncated, not terminated."""
    env = gym.make("ringenv/Migration-v0", workloads=["oltp"], vm=SMALL_VM, link={"gbps": 0.1},
                   max_episode_s=max_episode_s, **kw)
    env.reset(seed=0)
    for k in range(1, 200):
        _, _, te, tr, info = env.step(np.array([4, 6]))
        if te or tr:
            break
    env.close()
    assert tr and not te
    return k, info


def test_max_episode_s_truncates_as_soon_as_that_much_simulated_time_has_passed():
    """max_episode_s=4.15 with 50 ms steps: 4.15 s have passed after 83 steps, but the env
    compared t (int ns) with 4.15 * 1e9 = 4150000000.0000005 and ran an 84th step (to 4.2 s,
    the same episode length as max_episode_s=4.2). Docstring: truncated when `max_episode_s`
    of simulated time passed without convergence."""
    k, info = _steps_to_truncation(4.15)
    assert k == 83, f"truncated after {k} steps, at {info['time_s']} s"
    assert info["time_s"] == pytest.approx(4.15)


def test_max_episode_s_does_not_truncate_a_nanosecond_before_that_much_time_has_passed():
    """config.to_ns rounds: max_episode_s=1.001 is 1_001_000_000 ns (float 1.001e9 is
    1000999999.9999999); 89 steps of 11.247191 ms reach 1_000_999_999 ns, 1 ns short: the
    episode goes on, and the 90th step truncates. Mutant killed: the cap as int(s * 1e9)."""
    k, info = _steps_to_truncation(1.001, control_interval_ms=11.247191)
    assert k == 90, f"truncated after {k} steps, at {info['time_s']!r} s (max_episode_s=1.001)"
    assert info["time_s"] >= 1.001


def test_rgb_array_without_matplotlib_is_a_dependency_not_installed_error(monkeypatch):
    """matplotlib is only in the `rl` extra, not a core dependency, yet render_mode="rgb_array"
    is accepted and the first render after a step dies with a bare ModuleNotFoundError.
    Gymnasium's convention (cartpole, which DESIGN names as the style to follow, with its lazy
    rendering import) is gymnasium.error.DependencyNotInstalled saying what to install."""
    from gymnasium.error import DependencyNotInstalled

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(DependencyNotInstalled, match="matplotlib"):
        env = gym.make("ringenv/Migration-v0", render_mode="rgb_array", vm=SMALL_VM)
        env.reset(seed=0)
        env.step(np.array([4, 6]))
        env.render()


def test_encode_action_outside_its_domain_is_a_clear_error_or_the_nearest_action():
    """encode_action(entries, ms) is documented as "the action nearest to them". An infinite
    interval gives the SMALLEST interval (10 ms: every |log10(m) - inf| is inf, argmin takes
    index 0), and 0 entries or 0 ms give "math domain error" naming nothing."""
    u = gym.make("ringenv/Migration-v0", vm=SMALL_VM).unwrapped
    try:
        a = u.encode_action(4096, math.inf)
    except ValueError as e:
        assert "interval" in str(e), str(e)
    else:
        assert list(a) == [4, len(u.intervals_ms) - 1], f"{a}: an infinite interval encoded as the smallest one"
    for args, word in (((0, 100), "entries"), ((4096, 0), "interval")):
        with pytest.raises(ValueError) as e:
            u.encode_action(*args)
        assert "math domain error" not in str(e.value) and word in str(e.value), (args, str(e.value))


def test_a_scenario_mapping_is_fields_over_the_default_scenario():
    """`scenario` as a mapping need not name the fields the env decides itself (name, workload):
    it gives scenario fields over the default scenario's, as keywords do."""
    env = gym.make("ringenv/Migration-v0", scenario={"vm": {"memory": "1GiB", "vcpus": 2}, "host": "x86-pml"})
    obs, info = env.reset(seed=0)
    u, default = env.unwrapped, load_scenario("default")
    assert env.observation_space.contains(obs) and info["workload"] in u.workloads
    assert (u.scenario.vm.memory, u.scenario.vm.vcpus, u.scenario.host) == (1 << 30, 2, "x86-pml")
    assert u.scenario.link == default.link and u.scenario.collector == default.collector
    env.close()


def test_a_scenario_s_own_workload_is_left_aside_and_a_full_dump_round_trips():
    """The env draws each episode's workload from its split whatever the scenario names (a
    mapping, a file, a ScenarioConfig); a whole scenario dumped to JSON is a mapping that makes
    the same env, with an env.spec that serialises."""
    from ringenv.config import scale_scenario

    env = gym.make("ringenv/Migration-v0", scenario={"workload": "web", "vm": SMALL_VM}, workloads=["oltp"])
    assert env.reset(seed=0)[1]["workload"] == "oltp"
    sc = scale_scenario("default", "1GiB")
    env = gym.make("ringenv/Migration-v0", scenario=sc.model_dump(mode="json"))
    assert env.unwrapped.scenario == gym.make("ringenv/Migration-v0", scenario=sc).unwrapped.scenario
    assert gym.envs.registration.EnvSpec.from_json(env.spec.to_json()).kwargs["scenario"]["vm"]["memory"] == 1 << 30
