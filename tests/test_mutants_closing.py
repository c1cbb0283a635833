"""Tests from a mutation run over session 33's changes (72 hand-written mutants: 44 killed as the
suite stood, 9 equivalent; each test here kills one or more of the 19 survivors): a closed run's
event loop ends every process and empties its heap, the loop keeps only unfinished processes, a
closed run answers dunder probes with AttributeError, a list item's wrong type gets the list
field's range, the rgb_array figure is built once and draws each bar's colour and the right
title, the stratified interval leaves unpaired episodes out, the summary's counts and columns
each count their own kind, and t975 rounds a fractional df down."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest

import ringenv  # noqa: F401
from agents.evaluate import markdown_table, summarize, t975
from ringenv.config import ConfigError, load_scenario
from ringenv.vmm.migration import MigrationRun


def _run():
    return MigrationRun(load_scenario("default", vm={"memory": "64MiB"}), seed=1)


def test_close_ends_every_process_and_empties_the_heap():  # S1 S2 S5
    run = _run()
    run.advance(run.now_ns + 20_000_000)
    loop = run.loop
    procs = list(loop.procs)
    assert procs and loop.heap
    run.close()
    assert loop.heap == [] and loop.procs == set()
    assert all(not p.alive and p.pending is None and p.gen.gi_frame is None for p in procs)


def test_procs_holds_only_unfinished_processes():  # S3
    run = _run()
    loop = run.loop
    seen = set()
    while not run.done:
        run.advance(run.now_ns + 50_000_000)
        seen |= loop.procs
        assert all(p.alive for p in loop.procs)
    assert any(not p.alive for p in seen)  # some process did finish during the run


def test_a_list_items_wrong_type_gets_the_list_fields_range():  # C4
    with pytest.raises(ConfigError) as e:
        gym.make("ringenv/Migration-v0", intervals_ms=[10, None])
    assert "intervals_ms.1: Input should be a valid number (got None); accepted: 1 to 10000 ms" in str(e.value)


def test_the_rgb_figure_is_built_once_per_env():  # E5
    pytest.importorskip("matplotlib")
    env = gym.make("ringenv/Migration-v0", render_mode="rgb_array")
    env.reset(seed=0)
    env.render()
    f = env.unwrapped._rgb
    env.step(env.action_space.sample())
    env.render()
    assert env.unwrapped._rgb is f


def _px(img, rgb):
    return int((np.abs(img.astype(int) - rgb).sum(axis=2) < 12).sum())


def test_a_ring_at_0_9_is_red_and_turns_blue_again():  # E7 E11
    pytest.importorskip("matplotlib")
    from ringenv.env import _RgbFrame
    blue, red = (31, 119, 180), (214, 39, 40)
    fr = _RgbFrame(2, True)
    img = fr.draw(np.array([0.9, 0.0]), 0.0, "t", "r")
    assert _px(img, red) > 100 and _px(img, blue) == 0
    img = fr.draw(np.array([0.5, 0.0]), 0.0, "t", "r")
    assert _px(img, red) == 0 and _px(img, blue) > 50


def test_the_right_title_changes_with_the_iteration():  # E10
    pytest.importorskip("matplotlib")
    from ringenv.env import _RgbFrame
    fr = _RgbFrame(2, True)
    a = fr.draw(np.array([0.2, 0.3]), 0.5, "t", "iter 0")
    b = fr.draw(np.array([0.2, 0.3]), 0.5, "t", "iter 12")
    assert not np.array_equal(a, b)


def test_a_ring_below_the_reserved_entries_is_refused():  # R2
    from ringenv.kvm.ring import DirtyRing
    DirtyRing(64, 64)
    with pytest.raises(AssertionError):
        DirtyRing(64, 65)


def rec(spec, w, seed, reward, **kw):
    return {"spec": spec, "policy": spec, "workload": w, "seed": seed, "reward": reward, "downtime_s": 0.1,
            "total_s": 10.0, "exit_stall_s": 0.1, "vcpu_fault_s": 1.0, "vcpu_throttle_s": 0.5, "vmm_cpu_s": 0.0,
            "full_exits": 0, "converged": True, "ring_entries": 4096, "mean_interval_ms": 1000.0, **kw}


def test_an_unpaired_episode_is_left_out_of_the_within_interval():  # A8
    recs = [rec("qemu", "w", 0, -5.0), rec("qemu", "w", 1, -6.0),
            rec("x", "w", 0, -4.5), rec("x", "w", 1, -5.0), rec("x", "w", 2, -9.0)]
    x = {r["spec"]: r for r in summarize(recs, "qemu")}["x"]
    # diffs 0.5, 1.0: var 0.125, /2 = 0.0625, df 1: 12.706 * 0.25
    assert x["d_reward_ci_within"] == pytest.approx(12.706 * 0.25)


def test_reward_ci_within_worked_by_hand():  # A10
    recs = [rec("x", "a", k, v) for k, v in enumerate([1.0, 2.0, 3.0])] + \
           [rec("x", "b", k, v) for k, v in enumerate([10.0, 12.0])]
    x = summarize(recs, None)[0]
    assert x["reward_ci_within"] == pytest.approx(12.706 * math.sqrt(4 / 3) / 2)


def test_each_count_its_own_and_its_own_column():  # A11 A14
    recs = [rec("x", "w", k, -1.0) for k in range(6)]
    recs[0].update(ring_overflows=3)
    recs[1].update(truncated=True)
    recs[2].update(truncated=True)
    for r in recs[3:]:
        r.update(cancelled=True, truncated=False)
    row = summarize(recs, None)[0]
    assert (row["ring_overflow_episodes"], row["truncated_episodes"], row["cancelled_episodes"]) == (1, 2, 3)
    head, _, body = markdown_table([row], None).splitlines()
    assert head.endswith("| n | RING OVERFLOWS (episodes) | truncated (episodes) | cancelled (episodes) |")
    assert body.endswith("| 6 | 1 | 2 | 3 |")


def test_t975_rounds_a_fractional_df_down():  # A15 A16
    assert t975(1.68) == 12.706 and t975(2.5) == 4.303 and t975(31.7) == t975(31)


def test_a_closed_run_answers_dunder_probes_with_attributeerror():  # SE14
    run = _run()
    run.close()
    assert not hasattr(run, "__array_interface__") and not hasattr(run, "__length_hint__")


def test_the_lost_writes_column_appears_when_an_episode_lost_writes():  # A20
    recs = [rec("x", "w", k, -1.0) for k in range(3)]
    recs[0].update(lost_writes=5)
    row = summarize(recs, None)[0]
    assert row["lost_write_episodes"] == 1
    head, _, body = markdown_table([row], None).splitlines()
    assert head.endswith("| n | LOST WRITES (episodes) |") and body.endswith("| 3 | 1 |")
