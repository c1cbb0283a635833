"""Units of the agents package worked by hand: the comparison statistics, the episode record,
held actions, the wrappers, the heuristics' arithmetic and the FixedRingPolicy's mask in
training (a mutation run found each of these unchecked)."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest

import ringenv  # noqa: F401
from agents.common import ActionRepeat, EnvFacts, FixedEpisodes
from agents.evaluate import ModelPolicy, markdown_table, mean_ci, run_episode, stratified_ci, summarize, t975
from agents.heuristics import Fixed, FillWatermark, RateProportional

SMALL = {"vm": {"memory": "512MiB", "vcpus": 2}}
RINGS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
INTERVALS = (10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0)
MIB = 1 << 20


def record(spec, seed, reward, converged=True, ring=4096):
    return {"spec": spec, "policy": spec, "workload": "w", "seed": seed, "reward": reward, "downtime_s": 0.1,
            "total_s": 10.0, "exit_stall_s": 0.1, "vcpu_fault_s": 1.0, "vcpu_throttle_s": 0.5, "vmm_cpu_s": 0.0,
            "full_exits": 0, "converged": converged, "ring_entries": ring, "mean_interval_ms": 1000.0}


def test_summary_pairs_episodes_with_the_baseline_and_counts_ties():
    recs = [record("qemu", k, r) for k, r in enumerate([-5.0, -6.0, -7.0])]
    recs += [record("x", k, r, c, ring) for k, (r, c, ring) in
             enumerate(zip([-4.5, -6.0, -6.5], [True, False, True], [4096, 4096, 8192]))]
    rows = {r["spec"]: r for r in summarize(recs, "qemu")}
    x = rows["x"]
    assert x["converged"] == pytest.approx(2 / 3)  # a share, not "all converged"
    assert x["ring_entries"] == 4096  # the most frequent ring
    # paired differences 0.5, 0 (a tie counts), 0.5: mean 1/3, half-width t(2) s / sqrt(3)
    assert x["d_reward"] == pytest.approx(1 / 3)
    assert x["d_reward_ci"] == pytest.approx(4.302653 * np.std([0.5, 0, 0.5], ddof=1) / math.sqrt(3), rel=2e-4)
    assert (rows["qemu"]["d_reward"], rows["qemu"]["d_reward_ci"]) == (0.0, 0.0)
    lines = markdown_table(list(rows.values()), "qemu").splitlines()
    assert lines[2].startswith("| x |") and lines[3].startswith("| qemu |")  # best mean reward first


def test_t_quantiles_and_intervals():
    assert t975(1) == pytest.approx(12.706, abs=1e-3)
    assert t975(30) == pytest.approx(2.042, abs=1e-3)
    assert t975(31) == pytest.approx(2.0395, abs=1e-4)
    assert t975(159) == pytest.approx(1.9750, abs=1e-4)
    m, h = mean_ci([1.0])
    assert m == 1.0 and math.isnan(h)


def test_the_interval_with_the_workloads_held_fixed_worked_by_hand():
    """Groups [1, 2, 3] and [10, 12]: means 2 and 11, mean of means 6.5; variances of the means
    1/3 and 1, sum 4/3; Welch-Satterthwaite df (4/3)^2 / ((1/3)^2 / 2 + 1^2 / 1) = 32/19 = 1.68,
    rounded down to 1: half-width 12.706 x sqrt(4/3) / 2 = 7.336."""
    m, h = stratified_ci([[1.0, 2.0, 3.0], [10.0, 12.0]])
    assert m == 6.5 and h == pytest.approx(12.706 * math.sqrt(4 / 3) / 2)
    assert stratified_ci([[1.0, 1.0], [5.0, 5.0]]) == (3.0, 0.0)  # constant within: no seed spread
    assert math.isnan(stratified_ci([[1.0, 2.0], [3.0]])[1]) and math.isnan(stratified_ci([])[0])


def test_the_summary_gives_both_intervals_and_counts_every_kind_of_failed_episode():
    """Two workloads x 3 seeds; x beats qemu by 1 on workload a and by 3 on b, +-0.1 by seed: the
    pooled interval of the differences holds the 2-point spread between the workloads, the one
    with the workloads held fixed only the seeds' 0.1. An overflow, a truncation and a cancel are
    each counted and each get a table column (none when no episode had one)."""
    recs = []
    for w, gain in (("a", 1.0), ("b", 3.0)):
        for k, noise in enumerate((-0.1, 0.0, 0.1)):
            recs.append({**record("qemu", k, -10.0 + noise), "workload": w})
            recs.append({**record("x", k, -10.0 + noise + gain + (0.1 if k == 2 else 0.0)), "workload": w})
    recs[1].update(ring_overflows=12, wedged_vcpus=2)
    recs[3].update(truncated=True)
    recs[5].update(cancelled=True, truncated=False)
    rows = {r["spec"]: r for r in summarize(recs, "qemu")}
    x = rows["x"]
    diffs = [1.0, 1.0, 1.1, 3.0, 3.0, 3.1]
    assert x["d_reward"] == pytest.approx(np.mean(diffs))
    assert x["d_reward_ci"] == pytest.approx(t975(5) * np.std(diffs, ddof=1) / math.sqrt(6))
    assert x["d_reward_ci_within"] == pytest.approx(stratified_ci([[1.0, 1.0, 1.1], [3.0, 3.0, 3.1]])[1])
    assert x["d_reward_ci_within"] < x["d_reward_ci"] / 5
    assert (x["ring_overflow_episodes"], x["truncated_episodes"], x["cancelled_episodes"]) == (1, 1, 1)
    assert (rows["qemu"]["ring_overflow_episodes"], rows["qemu"]["d_reward_ci_within"]) == (0, 0.0)
    head, _, *body = markdown_table(list(rows.values()), "qemu").splitlines()
    assert head.endswith("| n | RING OVERFLOWS (episodes) | truncated (episodes) | cancelled (episodes) |")
    assert body[0].startswith("| x |") and body[0].endswith("| 6 | 1 | 1 | 1 |")
    plain = markdown_table(summarize([r for r in recs if r["spec"] == "qemu"], "qemu"), "qemu")
    assert "episodes)" not in plain


class _ThreeStepEnv:
    """Three steps: intervals 10, 1000, 1000 ms; the second ignores a ring change; each step
    charges time 0.1 and vcpu 0.2; the run's exit and stall time 0.2 and 0.3 s."""

    def reset(self, seed=None, options=None):
        self.k = 0
        return np.zeros(17, np.float32), {}

    @property
    def unwrapped(self):
        return self

    @property
    def episode_over(self):
        return self.k == 3

    def step(self, action):
        self.k += 1
        info = {"reward_parts": {"time": 0.1, "vcpu": 0.2}, "interval_ms": [10.0, 1000.0, 1000.0][self.k - 1],
                "ring_size_ignored": [False, True, False][self.k - 1], "workload": "w", "downtime_s": 0.0,
                "total_s": 0.15, "converged": True, "vcpu_exit_s": 0.2, "vcpu_stall_s": 0.3, "vcpu_fault_s": 0.0,
                "vcpu_throttle_s": 0.0, "vmm_cpu_s": 0.0, "full_exits": 0, "harvests": 0, "resets": 0,
                "entries_harvested": 0, "iterations": 1, "collector": "ring", "verified": True, "lost_writes": 0,
                "ring_overflows": 0, "wedged_vcpus": 0,
                "ring_entries": 4096, "truncation_downtime_s": 0.0, "cancelled": False, "cancel_downtime_s": 0.0}
        return np.zeros(17, np.float32), -0.3, self.k == 3, False, info


def test_the_episode_record_sums_and_averages_over_the_steps():
    facts = EnvFacts(ring_sizes=(4096,), intervals_ms=(10.0, 1000.0), link_Bps=1.25e9, page_size=4096, vcpus=2)
    rec = run_episode(_ThreeStepEnv(), Fixed(facts, 4096, 1000.0), 0)
    assert rec["steps"] == 3 and rec["reward"] == pytest.approx(-0.9)
    assert rec["mean_interval_ms"] == pytest.approx((10 + 1000 + 1000) / 3)
    assert rec["ring_size_changes_ignored"] == 1
    assert (rec["r_time"], rec["r_vcpu"]) == (pytest.approx(-0.3), pytest.approx(-0.6))  # minus the costs
    assert rec["exit_stall_s"] == pytest.approx(0.5)


class _CountingModel:
    def __init__(self):
        self.calls = 0

    def predict(self, obs, state=None, episode_start=None, deterministic=True):
        self.calls += 1
        return np.array([0, self.calls]), state


def test_a_model_trained_with_action_repeat_holds_each_action_k_steps():
    p = object.__new__(ModelPolicy)
    p.model, p.vecnorm, p.action_repeat = _CountingModel(), None, 3
    p.reset()
    got = [int(p.predict(np.zeros(17, np.float32))[0][1]) for _ in range(7)]
    assert got == [1, 1, 1, 2, 2, 2, 3]
    p.predict(np.zeros(17, np.float32), episode_start=np.array([True]))  # a new episode asks the model again
    assert p.model.calls == 4


def test_action_repeat_sums_the_rewards_of_its_steps():
    env = gym.make("ringenv/Migration-v0", **SMALL, workloads=["memcached"],
                   reward={"vcpu": 0, "vmm": 0, "memory": 0, "time": 1.0, "downtime": 0})
    wrapped = ActionRepeat(env, 3)
    wrapped.reset(seed=2)
    _, r, *_ = wrapped.step(np.array([4, 6]))
    assert r == pytest.approx(-3 * 0.05) and wrapped.env_steps == 3
    with pytest.raises(ValueError, match="action_repeat 0"):
        ActionRepeat(env, 0)


def test_fixed_episodes_cycle_through_their_list():
    env = FixedEpisodes(gym.make("ringenv/Migration-v0", **SMALL, workloads=["oltp"]), [("oltp", 1), ("memcached", 2)])
    assert [env.reset()[1]["workload"] for _ in range(3)] == ["oltp", "memcached", "oltp"]


def test_env_facts_soft_limit_and_a_flattened_grid():
    facts = EnvFacts(ring_sizes=(256, 512, 1024, 2048, 4096), intervals_ms=(10.0, 100.0, 1000.0), link_Bps=1.25e9,
                     page_size=4096, vcpus=2, flatten=True)
    assert facts.soft_limit(4096) == 4096 - 64  # KVM keeps 64 entries back
    assert facts.encode(4096, 100.0) == 4 * 3 + 1 and facts.decode(13) == (4096, 100.0)
    assert facts.decode(5) == (512, 1000.0)


def test_watermark_interval_at_its_threshold():
    """2016 entries/s per vCPU into a 4096-entry ring (soft limit 4032): half full after exactly
    1 s, so a 0.5 watermark takes 1000 ms, not 2000 (1.0 full) nor 500."""
    facts = EnvFacts(ring_sizes=RINGS, intervals_ms=INTERVALS, link_Bps=4096 * 8, page_size=4096, vcpus=8)
    # rate observation 2016: 2016 x link / page / vCPUs = 2016 entries per vCPU per second
    assert FillWatermark(facts, 0.5).interval_for(4096, 2016.0, 1.0, 0.0) == 1000.0
    assert FillWatermark(facts, 0.5).interval_for(4096, 2016.0 * 2, 1.0, 0.0) == 500.0  # twice the rate
    assert FillWatermark(facts, 0.5).interval_for(4096, 2016.0, 2.0, 0.0) == 500.0  # the fullest ring 2x the mean


def test_rate_proportional_harvests_once_per_mib_dirtied():
    facts = EnvFacts(ring_sizes=RINGS, intervals_ms=INTERVALS, link_Bps=1.25e9, page_size=4096, vcpus=8)
    # 640 MiB/s dirtied, one harvest per 64 MiB: every 100 ms
    assert RateProportional(facts, 64).interval_for(640 * MIB / 1.25e9) == pytest.approx(100.0, rel=1e-12)
    assert RateProportional(facts, 64).interval_for(0.0) == 5000.0


def test_rate_features_are_log_rates():
    import torch as th

    from agents.policies import RateFeatures
    from ringenv.env import OBS_HIGH

    obs = th.zeros((1, 17))
    obs[0, 2], obs[0, 3], obs[0, 15], obs[0, 16] = 0.999, 0.0, 0.009, 0.5
    feats = RateFeatures(gym.spaces.Box(np.zeros(17, np.float32), OBS_HIGH))(obs)
    # (log10(rate + 0.001) + 3) / 3 of dirty_rate, sampled_rate and redirty_rate
    assert feats[0, :17].tolist() == obs[0].tolist()
    assert feats[0, 17:].tolist() == pytest.approx([1.0, 0.0, 1 / 3], abs=1e-6)


def test_training_log_probs_of_a_fixed_ring_come_from_the_interval_head_only():
    """PPO's update (evaluate_actions) sees the same mask as the rollout: once the ring is fixed,
    the ring head adds nothing to the log-probability or the entropy, whatever ring the stored
    action names."""
    import torch as th
    from stable_baselines3 import PPO

    from agents.policies import FixedRingPolicy

    env = gym.make("ringenv/Migration-v0", **SMALL, workloads=["oltp"])
    model = PPO(FixedRingPolicy, env, policy_kwargs={"ring_sizes": env.unwrapped.ring_sizes}, seed=0, device="cpu")
    obs = th.zeros((1, 17))
    obs[0, 12], obs[0, 14] = math.log2(16384) / 16, 1.0  # ring 16384, fixed
    dist = model.policy.get_distribution(obs)
    interval = dist.distribution[1]
    assert dist.distribution[0].probs[0, RINGS.index(16384)].item() == pytest.approx(1.0)
    _, logp, entropy = model.policy.evaluate_actions(obs, th.tensor([[6, 3]]))
    assert logp.item() == pytest.approx(interval.log_prob(th.tensor([3])).item(), abs=1e-5)
    assert entropy.item() == pytest.approx(interval.entropy().item(), abs=1e-5)
    obs[0, 14] = 0.0  # before the ring is fixed both heads count
    _, logp, _ = model.policy.evaluate_actions(obs, th.tensor([[6, 3]]))
    d = model.policy.get_distribution(obs).distribution
    assert logp.item() == pytest.approx((d[0].log_prob(th.tensor([6])) + d[1].log_prob(th.tensor([3]))).item(),
                                        abs=1e-5)
    assert logp.item() < interval.log_prob(th.tensor([3])).item() - 0.1


def test_ppo_needs_a_rollout_of_two_decisions():
    from agents.train import check_hyperparams

    with pytest.raises(ValueError, match="at least 2"):
        check_hyperparams("ppo", {"n_steps": 1}, n_envs=1)
    assert check_hyperparams("ppo", {"n_steps": 1}, n_envs=2)["n_steps"] == 1


def test_compare_s_timeline_shows_the_baseline_and_the_best_policy(tmp_path, monkeypatch):
    from agents import compare, plots

    shown = []
    monkeypatch.setattr(plots, "timeline", lambda eps, path, title="": shown.append(eps) or path)
    monkeypatch.setattr(plots, "pareto", lambda rows, path, title="": path)
    args = compare.Args(policies=["qemu", "fixed:256:10", "fixed:65536:5000"], workloads=["memcached"], seeds=1,
                        set=["vm.memory=512MiB", "vm.vcpus=2"], workers=1, progress=False, out=str(tmp_path))
    rows = compare.main(args)["rows"]
    best = max(rows, key=lambda r: r["reward"])
    worst = min(rows, key=lambda r: r["reward"])
    assert best["spec"] != "qemu" and worst["spec"] != best["spec"]
    assert [ep["policy"] for ep in shown[0]] == ["qemu default", best["policy"]]


def test_ordinal_logits_by_hand():
    """x = (0, ln 3, -ln 3): s = (1/2, 3/4, 1/4); the three classes' products 1/2 1/4 3/4, 1/2 3/4 3/4
    and 1/2 3/4 1/4 normalise to 0.2, 0.6, 0.2. x = 0 is uniform."""
    import torch as th

    from agents.policies import ordinal_logits

    p = th.softmax(ordinal_logits(th.tensor([[0.0, math.log(3), -math.log(3)]])), dim=1)
    assert p[0].tolist() == pytest.approx([0.2, 0.6, 0.2], abs=1e-6)
    assert th.softmax(ordinal_logits(th.zeros(2, 9)), dim=1).flatten().tolist() == pytest.approx([1 / 9] * 18)


def test_an_ordinal_head_moves_the_neighbours_with_the_chosen_size():
    """A policy-gradient step that raises one ring size's log-probability also raises the sizes next to
    it with the ordinal logits (what lets PPO walk 16384 -> 32768 -> 65536 entries); with plain logits
    every other size loses."""
    import torch as th

    from agents.policies import ordinal_logits

    def step(transform):
        x = th.zeros(9, requires_grad=True)
        p0 = th.softmax(transform(x), 0).detach()
        th.log_softmax(transform(x), 0)[6].backward()
        return th.softmax(transform((x + 0.5 * x.grad).detach()), 0) - p0

    ordinal, plain = step(ordinal_logits), step(lambda x: x)
    assert ordinal[6] > 0 and ordinal[5] > 0 and ordinal[7] > 0 and ordinal[8] > 0 and ordinal[:4].lt(0).all()
    assert plain[6] > 0 and th.cat([plain[:6], plain[7:]]).lt(0).all()


def test_ordinal_policy_keeps_the_mask_and_loads_back(tmp_path):
    import torch as th
    from stable_baselines3 import PPO

    from agents.policies import FixedRingPolicy, ordinal_logits

    env = gym.make("ringenv/Migration-v0", **SMALL, workloads=["oltp"])
    model = PPO(FixedRingPolicy, env, policy_kwargs={"ring_sizes": env.unwrapped.ring_sizes, "ordinal": True},
                seed=0, device="cpu")
    obs = th.zeros((1, 17))
    obs[0, 12], obs[0, 14] = math.log2(16384) / 16, 1.0  # ring 16384, fixed
    assert model.policy.get_distribution(obs).distribution[0].probs[0, RINGS.index(16384)].item() == pytest.approx(1.0)
    obs[0, 14] = 0.0
    policy = model.policy
    with th.no_grad():  # outputs far from 0, where the ordinal and the plain logits differ
        policy.action_net.bias.copy_(th.linspace(-2.0, 2.0, len(policy.action_net.bias)))
    with th.no_grad():  # the head's logits are the ordinal transform of the network's outputs
        x = policy.action_net(policy.mlp_extractor.forward_actor(
            policy.extract_features(obs, policy.pi_features_extractor)))
    want = th.softmax(ordinal_logits(x[:, :len(RINGS)]), dim=1)
    got = model.policy.get_distribution(obs).distribution[0].probs
    assert (got - th.softmax(x[:, :len(RINGS)], dim=1)).abs().max() > 0.05
    assert got[0].tolist() == pytest.approx(want[0].tolist(), abs=1e-6)
    model.save(tmp_path / "m.zip")
    back = PPO.load(tmp_path / "m.zip", device="cpu")
    assert back.policy.ordinal is True
    assert back.policy.get_distribution(obs).distribution[0].probs[0].tolist() == pytest.approx(got[0].tolist(),
                                                                                            abs=1e-6)
    with pytest.raises(ValueError, match=r"ordinal: 'yes' is not accepted; accepted: true or false"):
        FixedRingPolicy(env.observation_space, env.action_space, lambda _: 1e-3, ordinal="yes")


def test_pareto_labels_of_close_and_coinciding_points_do_not_overlap(tmp_path, monkeypatch):
    """Policies whose means coincide (a fixed ring that never fills and a watermark on the same
    ring) or lie close: each label gets a place of its own inside the axes, in its point's color."""
    pytest.importorskip("matplotlib")
    from matplotlib.text import Text

    from agents import plots

    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig) or path)
    points = [(0.0, 283.9), (0.0, 283.9), (0.0, 286.8), (0.0, 282.9), (0.0, 279.9), (0.015, 286.8), (0.022, 283.8),
              (0.034, 287.6), (0.063, 284.4)]
    rows = []
    for k, (x, y) in enumerate(points):
        rows.append({"policy": f"policy number {k}", "reward": -1.0 - k, "downtime_s": y / 1000, "downtime_s_ci": 0.01,
                     "exit_stall_s": x, "exit_stall_s_ci": 0.02, "lost_s": 6.7, "lost_s_ci": 4.3})
    plots.pareto(rows, tmp_path / "p.png")
    fig = figs[0]
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        labels = [t for t in ax.texts if t.get_text().startswith("policy number")]
        assert sorted(t.get_text() for t in labels) == sorted(r["policy"] for r in rows)
        for t in labels:
            t.update_positions(renderer)
        boxes = [Text.get_window_extent(t, renderer) for t in labels]  # the texts, not their leaders
        inside = ax.get_window_extent(renderer)
        for i, a in enumerate(boxes):
            assert inside.x0 <= a.x0 and a.x1 <= inside.x1 and inside.y0 <= a.y0 and a.y1 <= inside.y1
            for b in boxes[i + 1:]:
                assert not a.overlaps(b), (labels[i].get_text(), a, b)
        colors = {t.get_text(): t.get_color() for t in labels}
        assert colors["policy number 0"] != colors["policy number 1"]
    import matplotlib.pyplot as plt

    plt.close(fig)


@pytest.mark.parametrize("error, seeds, workers, pool", [
    (RuntimeError("episode failed"), 3, 200, 3),  # no more worker processes than episodes
    (KeyboardInterrupt(), 3, 2, 2),  # Ctrl-C cancels the queue too; no more processes than --workers
    (RuntimeError("episode failed"), 1, 256, 1),  # the largest --workers accepted
    (RuntimeError("episode failed"), 5, 2, 2)])
def test_a_failed_episode_cancels_the_episodes_not_started(monkeypatch, error, seeds, workers, pool):
    """With workers, an episode's failure or Ctrl-C (which arrives the same way in the loop)
    cancels the queued episodes: before, every one of them ran before the error was shown. The
    pool has no more processes than episodes, nor than --workers."""
    from concurrent.futures import Future

    import agents.evaluate as ev

    futures: list[Future] = []
    sizes: list[int] = []

    class Pool:  # the pool's queue, nothing run: the first episode fails, the others wait
        def __init__(self, **kwargs):
            sizes.append(kwargs["max_workers"])

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, *args):
            f = Future()
            if not futures:
                f.set_exception(error)
            futures.append(f)
            return f

    monkeypatch.setattr(ev, "ProcessPoolExecutor", Pool)
    with pytest.raises(type(error)):
        ev.evaluate(["qemu"], workloads=["idle"], seeds=seeds, workers=workers, progress=False)
    assert len(futures) == seeds and all(f.cancelled() for f in futures[1:])
    assert sizes == [pool]
