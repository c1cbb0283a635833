"""Smoke runs of ``ringenv train | evaluate | compare | run`` as subprocesses with tiny budgets on a
small VM (1 GiB, 2 vCPUs), the saved model's round trip, and the evaluation's statistics."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--set", "vm.memory=1GiB", "vm.vcpus=2"]
TINY_PPO = ["--hp", "n_steps=32", "batch_size=32", "n_epochs=1"]


def ringenv(*args, timeout=300, tmpdir=None):
    env = dict(os.environ)
    if tmpdir is not None:  # the temporary directory the program sees
        env["TMPDIR"] = str(tmpdir)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    p = subprocess.run([sys.executable, "-m", "ringenv", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, f"ringenv {' '.join(map(str, args))} exited {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    """A PPO model trained for 256 steps (evaluation and a snapshot included)."""
    out = tmp_path_factory.mktemp("train")
    p = ringenv("train", "--timesteps", 256, "--n-envs", 2, "--vec-env", "dummy", "--evals", 2,
                "--checkpoints", 2, "--out", out, "--name", "ppo", "--no-progress", *SMALL, *TINY_PPO)
    (out / "train.log").write_text(p.stderr)
    return out / "ppo"


def test_train_without_tensorboard_leaves_nothing_in_the_temporary_directory(tmp_path):
    """stable-baselines3 makes a folder (SB3-<time>) in the temporary directory for every
    learn() that has no TensorBoard log, and leaves it there: train gives such a model a
    logger of its own instead. (torch keeps a cache folder there, reused from run to run.)"""
    (tmp_path / "tmp").mkdir()
    ringenv("train", "--timesteps", 64, "--n-envs", 1, "--vec-env", "dummy", "--out", tmp_path, "--name", "p",
            "--no-progress", "--no-tensorboard", *SMALL, *TINY_PPO, tmpdir=tmp_path / "tmp")
    assert (tmp_path / "p" / "final_model.zip").exists()
    assert [p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith("SB3-")] == []


def test_every_agent_subcommand_has_help():
    for cmd in ("run", "train", "evaluate", "compare"):
        p = ringenv(cmd, "--help")
        assert "usage: ringenv " + cmd in p.stdout and "--out" in p.stdout


def test_train_ppo_writes_models_stats_logs(ppo_run):
    for name in ("best_model.zip", "best_model_vecnormalize.pkl", "final_model.zip", "final_model_vecnormalize.pkl",
                 "args.json", "eval/evaluations.npz"):
        assert (ppo_run / name).is_file(), name
    assert list((ppo_run / "checkpoints").glob("rl_model_*_steps.zip"))
    meta = json.loads((ppo_run / "args.json").read_text())
    assert meta["algo"] == "ppo" and meta["env_id"] == "ringenv/Migration-v0"
    # configs/train/ppo.yaml's randomised intensity and ordinal heads reach the run (and its record)
    assert meta["env_kwargs"] == {"rate_scale_range": [0.5, 2.0], "vm": {"memory": "1GiB", "vcpus": 2}}
    assert meta["timesteps"] == 256 and meta["hyperparams"]["policy_kwargs"]["ordinal"] is True
    from stable_baselines3 import PPO
    assert PPO.load(ppo_run / "final_model.zip", device="cpu").policy.ordinal is True
    assert meta["wall_s"] > 0 and "best_eval" in meta


def test_train_counts_decisions_and_says_how_many_env_steps(ppo_run):
    """--timesteps 256 with configs/train/ppo.yaml's action_repeat 40: 256 decisions (SB3
    timesteps), each held for up to 40 environment steps of 50 ms; the log and args.json say so."""
    log = " ".join((ppo_run.parent / "train.log").read_text().split())
    assert "256 decisions x action_repeat 40 = up to 10240 env steps of 50 ms" in log, log
    meta = json.loads((ppo_run / "args.json").read_text())
    assert meta["timesteps"] == 256 and meta["decisions"] == 256 and meta["action_repeat"] == 40
    assert 256 <= meta["env_steps"] <= 256 * 40 and meta["env_steps"] > 256  # episodes end early sometimes
    assert meta["decisions_per_s"] > 0 and meta["env_steps_per_s"] == pytest.approx(
        meta["decisions_per_s"] * meta["env_steps"] / 256)
    assert f"256 decisions = {meta['env_steps']} env steps" in log, log
    assert not re.search(r"(?<!env) steps\b", log), log  # every count of steps says which steps


@pytest.mark.parametrize("algo", ["a2c", "dqn"])
def test_train_a2c_and_dqn(tmp_path, algo):
    hp = ["--hp", "n_steps=8"] if algo == "a2c" else ["--hp", "learning_starts=32", "buffer_size=1000"]
    hp += ["action_repeat=1", "env_wrapper={gymnasium.wrappers.TimeLimit: {max_episode_steps: 50}}"]
    ringenv("train", "--algo", algo, "--timesteps", 128, "--n-envs", 1, "--evals", 0, "--checkpoints", 0,
            "--out", tmp_path, "--name", algo, "--no-progress", "--no-tensorboard", *SMALL, *hp)
    meta = json.loads((tmp_path / algo / "args.json").read_text())
    assert meta["env_id"] == ("ringenv/MigrationDiscrete-v0" if algo == "dqn" else "ringenv/Migration-v0")
    assert meta["env_wrapper"] == {"gymnasium.wrappers.TimeLimit": {"max_episode_steps": 50}}
    if algo == "a2c":  # configs/train/a2c.yaml's ordinal heads, advantage normalisation and intensities reach the run
        from stable_baselines3 import A2C
        assert meta["env_kwargs"]["rate_scale_range"] == [0.5, 2.0]
        assert meta["hyperparams"]["policy_kwargs"]["ordinal"] is True and meta["hyperparams"]["normalize_advantage"]
        model = A2C.load(tmp_path / algo / "final_model.zip", device="cpu")
        assert model.policy.ordinal is True and model.normalize_advantage is True
    # evaluate loads it back on its own env id (Discrete for DQN)
    out = tmp_path / "eval"
    ringenv("evaluate", "--policies", tmp_path / algo, "--workloads", "oltp", "--seeds", 1, "--workers", 1,
            "--out", out, "--no-progress", *SMALL)
    rows = list(csv.DictReader((out / "episodes.csv").read_text().splitlines()))
    assert len(rows) == 1 and rows[0]["policy"].startswith(algo)


def test_a_run_records_what_its_numerics_depend_on(ppo_run):
    """A retraining elsewhere can give another model (README): args.json says with which Python,
    package versions, torch CPU kernels and threads, and CPU this one was trained."""
    import platform

    import numpy
    import torch

    v = json.loads((ppo_run / "args.json").read_text())["versions"]
    assert set(v) == {"python", "ringenv", "torch", "numpy", "gymnasium", "stable-baselines3", "numba",
                      "torch_cpu_capability", "torch_threads", "machine", "cpu"}, v
    assert (v["python"], v["torch"], v["numpy"]) == (platform.python_version(), torch.__version__, numpy.__version__)
    assert v["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability() and v["torch_threads"] >= 1


def test_saved_model_round_trip(ppo_run):
    """The loaded policy normalises observations with the saved statistics and acts as the model
    does; two evaluations of it give identical episodes."""
    import pickle

    import gymnasium as gym
    from stable_baselines3 import PPO

    from agents.common import EnvFacts
    from agents.evaluate import ModelPolicy, run_episode

    env = gym.make("ringenv/Migration-v0", split="test", vm={"memory": "1GiB", "vcpus": 2})
    pol = ModelPolicy(ppo_run, EnvFacts.from_env(env))
    assert pol.path.name == "best_model.zip" and pol.vecnorm is not None and pol.algo == "ppo"
    model = PPO.load(ppo_run / "best_model.zip", device="cpu")
    with open(ppo_run / "best_model_vecnormalize.pkl", "rb") as f:
        stats = pickle.load(f)
    obs, _ = env.reset(seed=3)
    repeat, held = pol.action_repeat, None
    for k in range(2 * repeat + 1):
        a, _ = pol.predict(obs)
        if k % repeat == 0:  # a decision: the model's own action on the normalised observation
            b, _ = model.predict(stats.normalize_obs(obs), deterministic=True)
            assert np.array_equal(a, b)
            held = a
        else:  # held for action_repeat steps, as in training
            assert np.array_equal(a, held)
        obs, _, te, tr, _ = env.step(a)
        if te or tr:
            break
    r1 = run_episode(env, pol, 7, "oltp")
    r2 = run_episode(env, ModelPolicy(ppo_run / "final_model.zip"), 7, "oltp")
    r3 = run_episode(env, pol, 7, "oltp")
    assert r1["reward"] == r3["reward"] and r1["steps"] == r3["steps"]
    assert r2["policy"].endswith("(final_model)")
    snap = sorted((ppo_run / "checkpoints").glob("rl_model_*_steps.zip"))[0]
    assert ModelPolicy(snap).vecnorm is not None
    env.close()


def test_evaluate_table_and_csv(ppo_run, tmp_path):
    p = ringenv("evaluate", "--policies", "qemu", "watermark", ppo_run, "--workloads", "oltp", "web",
                "--seeds", 2, "--workers", 2, "--out", tmp_path, *SMALL)
    assert "episodes:" not in p.stderr and "%|" not in p.stderr, p.stderr  # no progress bar into a pipe
    assert "| policy | reward | Δ reward vs qemu |" in p.stdout
    assert "qemu default" in p.stdout and "watermark 0.5" in p.stdout and "ppo ppo" in p.stdout
    rows = list(csv.DictReader((tmp_path / "episodes.csv").read_text().splitlines()))
    assert len(rows) == 3 * 2 * 2
    assert {r["workload"] for r in rows} == {"oltp", "web"} and {r["seed"] for r in rows} == {"1000", "1001"}
    summary = list(csv.DictReader((tmp_path / "summary.csv").read_text().splitlines()))
    q = next(r for r in summary if r["spec"] == "qemu")
    assert float(q["d_reward"]) == 0.0
    assert "progress" not in p.stdout and "episodes:" not in p.stdout  # (a bar goes to stderr, on a terminal only)
    assert "explicit workloads (oltp, web)" in p.stdout and "split test" not in p.stdout  # (not the split's)
    # meta.json names the model evaluated by its digest (the heuristics have none)
    from agents.evaluate import _model_digest
    models = json.loads((tmp_path / "meta.json").read_text())["models"]
    assert models == {str(ppo_run): _model_digest(str(ppo_run))} and len(models[str(ppo_run)]) == 40, models


def _draws(policy, obs, n):
    return np.array([policy.predict(obs)[0] for _ in range(n)])


def test_a_stochastic_model_samples_its_policys_distribution_from_the_episode_seed(ppo_run):
    """ModelPolicy(stochastic=True): each action head's draws follow the policy's categorical
    probabilities (4000 draws, within 5 standard errors of every probability); the same episode
    seed gives the same draws, another seed others; the global torch and numpy generators are
    left alone (an episode does not depend on what ran before it in the process); the name says
    so. Deterministic by default: the model's most likely action."""
    import gymnasium as gym
    import torch

    from agents.common import EnvFacts
    from agents.evaluate import ModelPolicy, run_episode

    env = gym.make("ringenv/Migration-v0", split="test", vm={"memory": "1GiB", "vcpus": 2})
    obs, _ = env.reset(seed=1)
    pol = ModelPolicy(ppo_run, EnvFacts.from_env(env), stochastic=True)
    assert pol.name == "ppo ppo stochastic" and ModelPolicy(ppo_run).name == "ppo ppo"
    pol.action_repeat = 1  # (a new decision every call: the draws, not the held action)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    pol.reset(5)
    draws = _draws(pol, obs, 4000)
    assert torch.equal(torch.get_rng_state(), torch_state) and np.array_equal(np.random.get_state()[1], np_state)
    obs_t, _ = pol.model.policy.obs_to_tensor(pol.vecnorm.normalize_obs(obs.astype(np.float32)))
    with torch.no_grad():
        heads = pol.model.policy.get_distribution(obs_t).distribution
    for i, head in enumerate(heads):
        probs = head.probs[0].numpy()
        freq = np.bincount(draws[:, i], minlength=len(probs)) / len(draws)
        se = np.sqrt(probs * (1 - probs) / len(draws))
        assert np.all(np.abs(freq - probs) < 5 * se + 1e-9), (i, probs, freq)
    pol.reset(5)
    assert np.array_equal(_draws(pol, obs, 50), draws[:50])
    pol.reset(6)
    assert not np.array_equal(_draws(pol, obs, 50), draws[:50])
    greedy = ModelPolicy(ppo_run, EnvFacts.from_env(env))
    greedy.action_repeat = 1
    model_action, _ = pol.model.predict(pol.vecnorm.normalize_obs(obs), deterministic=True)
    assert all(np.array_equal(a, model_action) for a in _draws(greedy, obs, 20))
    pol = ModelPolicy(ppo_run, EnvFacts.from_env(env), stochastic=True)  # (its own action_repeat)
    r1 = run_episode(env, pol, 7, "oltp")
    torch.manual_seed(123)  # (what ran before in the process: no matter)
    r2 = run_episode(env, pol, 7, "oltp")
    assert r1["reward"] == r2["reward"] and r1["steps"] == r2["steps"] and r1["policy"] == "ppo ppo stochastic"
    env.close()


def test_a_stochastic_dqn_acts_epsilon_greedily_at_its_final_exploration_rate(dqn_run):
    """DQN's stochastic actions are stable-baselines3's once exploration has ended: with
    probability exploration_final_eps a uniformly drawn action, else the greedy one, whatever the
    exploration rate when the model was saved (a snapshot's is higher); for one observation or a
    batch."""
    import gymnasium as gym

    from agents.evaluate import ModelPolicy

    env = gym.make("ringenv/MigrationDiscrete-v0", split="test", vm={"memory": "1GiB", "vcpus": 2})
    obs, _ = env.reset(seed=1)
    pol = ModelPolicy(dqn_run, stochastic=True)
    assert pol.model.exploration_final_eps == pytest.approx(0.05)
    pol.model.exploration_rate = 1.0  # (a snapshot from early in training: not what is used)
    pol.action_repeat = 1
    greedy, _ = pol.model.predict(pol.vecnorm.normalize_obs(obs), deterministic=True)
    n = int(env.action_space.n)
    pol.model.exploration_final_eps = 0.5
    pol.reset(3)
    draws = _draws(pol, obs, 4000)
    assert draws.shape == (4000,) and set(np.unique(draws)) <= set(range(n))
    off = float(np.mean(draws != greedy))
    expected = 0.5 * (n - 1) / n  # (a uniform draw is the greedy action 1 time in n)
    assert abs(off - expected) < 5 * np.sqrt(expected * (1 - expected) / len(draws)), (off, expected)
    pol.model.exploration_final_eps = 0.0
    assert np.all(_draws(pol, obs, 50) == greedy)
    pol.model.exploration_final_eps = 1.0
    batch, _ = pol.predict(np.stack([obs] * 3000))
    assert batch.shape == (3000,) and len(np.unique(batch)) == n  # (3000 uniform draws over 81 actions)
    env.close()


def test_evaluate_stochastic_is_reproducible_across_workers_and_says_so(ppo_run, tmp_path):
    """``evaluate --stochastic``: the model's episodes are the same with 1 or 2 worker processes
    (its draws come from each episode's seed), differ from the deterministic ones, are labelled
    so, and meta.json and the table header say so; the heuristics play as without the flag."""
    common = ["--policies", "qemu", ppo_run, "--workloads", "oltp-heavy", "--seeds", 3, "--no-progress", *SMALL]
    runs = {}
    for name, extra in (("w1", ["--stochastic", "--workers", 1]), ("w2", ["--stochastic", "--workers", 2]),
                        ("det", ["--workers", 2])):
        p = ringenv("evaluate", *common, *extra, "--out", tmp_path / name)
        rows = list(csv.DictReader((tmp_path / name / "episodes.csv").read_text().splitlines()))
        runs[name] = [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]
        runs[name + "_out"] = p.stdout
    assert runs["w1"] == runs["w2"]
    assert {r["policy"] for r in runs["w1"]} == {"qemu default", "ppo ppo stochastic"}
    assert "trained models' actions sampled (--stochastic)" in runs["w1_out"]
    assert "sampled" not in runs["det_out"]
    assert json.loads((tmp_path / "w1" / "meta.json").read_text())["args"]["stochastic"] is True
    heur = [[r for r in runs[k] if r["spec"] == "qemu"] for k in ("w1", "det")]
    assert heur[0] == heur[1]
    model = [[(r["reward"], r["mean_interval_ms"]) for r in runs[k] if r["spec"] != "qemu"] for k in ("w1", "det")]
    assert model[0] != model[1]


def test_compare_writes_table_csv_and_plots(ppo_run, tmp_path):
    p = ringenv("compare", "--policies", "qemu", "fixed:16384:5000", "rate", "bitmap", "--models", ppo_run,
                "--workloads", "oltp-heavy", "--seeds", 2, "--out", tmp_path, "--no-progress", *SMALL)
    for name in ("episodes.csv", "summary.csv", "per_workload.csv", "table.md", "pareto.png", "timeline.png"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "table.md").read_text()
    assert "fixed 16384/5000ms" in table and "ppo ppo" in table
    assert table.startswith("Scenario default with --set vm.memory=1GiB vm.vcpus=2, explicit workloads "
                            "(oltp-heavy),")
    # the environment runs only the ring collector: the bitmap baseline is left out, with a note
    if "bitmap |" not in table:
        assert "policy 'bitmap' left out" in p.stderr


def test_statistics():
    from agents.evaluate import mean_ci, summarize

    from agents.evaluate import t975

    m, h = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and abs(h - 4.303 * 1.0 / np.sqrt(3)) < 1e-9
    # Student's t 0.975 quantiles (exact values to 4 decimals), past the table too: the 40-seed
    # tables have n = 160 (not the normal 1.96)
    for df, t in ((1, 12.706), (30, 2.042), (31, 2.0395), (39, 2.0227), (60, 2.0003), (159, 1.9750), (1000, 1.9623)):
        assert t975(df) == pytest.approx(t, abs=6e-4), df
    x = np.arange(40.0)
    assert mean_ci(x)[1] == pytest.approx(2.0227 * x.std(ddof=1) / np.sqrt(40), rel=1e-4)
    recs = [{"spec": s, "policy": s, "workload": "w", "seed": k, "reward": r, "downtime_s": 0.1, "total_s": 10.0,
             "exit_stall_s": 0.1 * k, "vcpu_fault_s": 1.0 - 0.1 * k, "vcpu_throttle_s": 0.5, "vmm_cpu_s": 0.0,
             "full_exits": 0, "converged": True, "ring_entries": 4096, "mean_interval_ms": 1000.0}
            for s, rs in (("qemu", [-5.0, -6.0, -7.0]), ("x", [-4.5, -5.5, -6.5])) for k, r in enumerate(rs)]
    rows = summarize(recs, "qemu")
    x = next(r for r in rows if r["spec"] == "x")
    assert x["d_reward"] == pytest.approx(0.5) and x["d_reward_ci"] == pytest.approx(0.0)
    # all the vCPU time lost, throttle sleeps included, its interval from the per-episode sums
    assert x["lost_s"] == pytest.approx(1.5) and x["lost_s_ci"] == pytest.approx(0.0)
    assert x["vcpu_throttle_s"] == pytest.approx(0.5)


def test_fixed_ring_policy_and_action_repeat(tmp_path):
    """FixedRingPolicy: once the ring is fixed the ring head has all its mass on the ring in use
    (no gradient, entropy from the interval head only); a model trained with action_repeat k
    holds each action k steps when evaluated."""
    import gymnasium as gym
    import torch

    from agents.common import EnvFacts
    from agents.evaluate import ModelPolicy, run_episode

    ringenv("train", "--timesteps", 64, "--n-envs", 1, "--evals", 0, "--checkpoints", 0, "--out", tmp_path,
            "--name", "frp", "--no-progress", "--no-tensorboard", *SMALL, "--hp", "n_steps=32", "batch_size=32",
            "n_epochs=1", "action_repeat=3", "policy=agents.policies.FixedRingPolicy",
            "normalize={norm_obs: false, norm_reward: true}")
    env = gym.make("ringenv/Migration-v0", split="test", vm={"memory": "1GiB", "vcpus": 2})
    pol = ModelPolicy(tmp_path / "frp", EnvFacts.from_env(env))
    assert pol.action_repeat == 3 and type(pol.model.policy).__name__ == "FixedRingPolicy"
    net = pol.model.policy
    obs, _ = env.reset(seed=1)
    d0 = net.get_distribution(torch.as_tensor(obs[None]))
    assert d0.distribution[0].probs.min() > 0.01  # the first step chooses among all ring sizes
    obs, *_ = env.step(env.unwrapped.encode_action(16384, 1000))
    d1 = net.get_distribution(torch.as_tensor(obs[None]))
    ring = d1.distribution[0].probs[0].detach().numpy()
    assert ring[env.unwrapped.ring_sizes.index(16384)] == pytest.approx(1.0)
    assert d1.distribution[0].entropy().item() == pytest.approx(0.0, abs=1e-6)
    rec = run_episode(env, pol, 2, "oltp", trace=True)
    assert rec["ring_size_changes_ignored"] == 0
    ivs = [s["interval_ms"] for s in rec["trace"]]
    assert all(ivs[k] == ivs[k - k % 3] for k in range(len(ivs)))  # changes only every third step
    env.close()


#: (argv, what its one-line error must say); each a test of its own: some 30 interpreters (torch,
#: stable-baselines3 imported) were ~45 s in one test, past 120 s on a loaded 2-core machine
BAD_ARGUMENTS = ((["evaluate", "--policies", "nope"], "not a heuristic"),
                 (["compare", "--policies", "fixed:4096"], "--policies 'fixed:4096'"),
                 (["train", "--set", "vm.vcpus"], "KEY=VALUE"),
                 (["evaluate", "--set", "vm.vcpus=0"], "vm.vcpus"),
                 (["evaluate", "--policies", "qemu", "fixed:4096:150"], "interval 150 ms"),
                 (["evaluate", "--policies", "fixed:100000:7000"], "ENTRIES 100000"),
                 (["train", "--hp", "nosuch=1", "--timesteps", "10"], "--hp nosuch=1"),
                 (["train", "--hp", "n_steps"], "--hp 'n_steps': expected KEY=VALUE"),
                 (["evaluate", "--env-id", "ringenv/Foo-v0", "--seeds", "1"], "--env-id 'ringenv/Foo-v0'"),
                 (["compare", "--env-id", "CartPole-v1", "--seeds", "1"], "--env-id 'CartPole-v1'"),
                 (["evaluate", "--workers", "0", "--policies", "qemu"], "--workers 0"),
                 (["compare", "--workers", "257", "--policies", "qemu"],
                  "--workers 257: expected an integer from 1 to 256"),
                 (["evaluate", "--baseline", "nope", "--policies", "qemu"], "--baseline 'nope'"),
                 (["compare", "--timeline-workload", "nope", "--policies", "qemu"],
                  "--timeline-workload: unknown workload 'nope'"),
                 (["evaluate", "--policies", "qemu", "--workloads", "oltp", "oltp"],
                  "--workloads: 'oltp' given more than once"),
                 (["evaluate", "--policies", "qemu", "qemu", "rate"],
                  "--policies: 'qemu' given more than once"),
                 (["train", "--algo", "dqn", "--hp", "train_freq=[1, episode]", "--n-envs", "2"],
                  "train_freq [1, episode] trains on whole episodes"),
                 (["train", "--hp", "learning_rate=inf"], "--hp learning_rate=inf: expected a number > 0"),
                 (["train", "--hp", "gamma=-inf"], "--hp gamma=-inf: expected a finite number"),
                 (["train", "--hp", "policy_kwargs={net_arch: [-3]}", "--timesteps", "10"],
                  "net_arch [-3]; accepted: a list of layer sizes"),
                 (["evaluate", "--policies", "qemu", "--set", "split=train"], "given by the command's --split"),
                 (["evaluate", "--policies", "qemu", "--set", "foo=1"], "--set foo: unknown argument"),
                 (["compare", "--policies", "qemu", "--set", "reward.downtyme=1"],
                  "--set: invalid env:\n  reward.downtyme: unknown key"),
                 (["evaluate", "--policies", "qemu", "--workloads", "web", "nope"],
                  "--workloads: workloads[1]: unknown workload 'nope'"),
                 (["train", "--set", "workloads=[web]"], "given by the command's --workloads"),
                 (["train", "--device", "foo"], "--device 'foo'"),
                 (["train", "--hp", "max_grad_norm=1" + "0" * 400], "expected a finite number"),
                 (["train", "--hp", "n_steps=abc"], "--hp n_steps=abc: expected an integer from 1 to 10000000"),
                 (["train", "--hp", "env_wrapper=gymnasium.wrappers.TimeLimit"],
                  "cannot be called with the env and no keywords (missing a required argument: "
                  "'max_episode_steps'); give its keywords as a mapping {gymnasium.wrappers.TimeLimit: "),
                 (["compare", "--models", "runs/nope", "--seeds", "1"],
                  "--models 'runs/nope': not a trained model (no such model runs/nope); expected a run "
                  "directory or a .zip"))


def _ringenv_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


@pytest.mark.parametrize("args, words", BAD_ARGUMENTS, ids=[" ".join(a)[:60] for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_end_with_a_message_not_a_traceback(args, words):
    p = subprocess.run([sys.executable, "-m", "ringenv", *args], cwd=ROOT, env=_ringenv_env(), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and words in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)


def test_bad_arguments_to_the_agent_modules_end_with_a_message_not_a_traceback():
    """The same programs run as modules end the same way."""
    env = _ringenv_env()
    for module, args, words in (("agents.evaluate", ["--policies", "nope"], "not a heuristic"),
                                ("agents.train", ["--hp", "foo=1", "--timesteps", "10"], "--hp foo=1"),
                                ("agents.compare", ["--baseline", "nope"], "--baseline 'nope'")):
        p = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 2 and words in p.stderr and "Traceback" not in p.stderr, (module, p.stderr)


def test_a_file_that_is_no_model_is_named_by_the_flag_that_gave_it(tmp_path, capsys):
    from ringenv.cli import main

    (tmp_path / "bad.zip").write_text("not a zip")
    for cmd, flag in (("evaluate", "--policies"), ("compare", "--models")):
        assert main([cmd, flag, str(tmp_path / "bad.zip"), "--seeds", "1", "--out", str(tmp_path / cmd),
                     "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"{flag} '{tmp_path / 'bad.zip'}': " in err and "not a model saved by stable-baselines3" in err, err
        assert not (tmp_path / cmd).exists()


def test_evaluate_rejects_off_grid_specs_before_running_anything(tmp_path, capsys):
    """fixed:4096:150 would run the nearest interval (200 ms) labelled 150: an error naming the
    spec, the value and the env's grid, and nothing written; with 150 ms added to the grid
    (--set intervals_ms=[...]) it runs 150 ms."""
    from ringenv.cli import main

    out = tmp_path / "eval"
    for spec, words in (("fixed:4096:150", ["interval 150 ms", "intervals_ms", "10, 20, 50, 100, 200, 500, 1000, "
                                                                               "2000, 5000"]),
                        ("fixed:100000:7000", ["ENTRIES 100000", "ring_sizes", "256, 512, 1024"]),
                        ("watermark:0.5:3000", ["ENTRIES 3000", "ring_sizes"]),
                        ("rate:64:100", ["ENTRIES 100", "ring_sizes"])):
        assert main(["evaluate", "--policies", "qemu", spec, "--workloads", "oltp", "--seeds", "1", "--workers", "1",
                     "--out", str(out), "--no-progress", *SMALL]) == 2
        err = " ".join(capsys.readouterr().err.split())
        for w in [f"--policies {spec!r}", *words]:
            assert w in err, (w, err)
        assert not out.exists()
    assert main(["evaluate", "--policies", "fixed:4096:150", "--workloads", "oltp", "--seeds", "1", "--workers", "1",
                 "--out", str(out), "--no-progress", *SMALL, "intervals_ms=[100, 150, 1000]",
                 "max_episode_s=5"]) == 0
    rows = list(csv.DictReader((out / "episodes.csv").read_text().splitlines()))
    assert len(rows) == 1 and rows[0]["policy"] == "fixed 4096/150ms"
    assert float(rows[0]["mean_interval_ms"]) == 150.0 and rows[0]["ring_entries"] == "4096"


def test_train_small_budget_is_rounded_up_to_whole_rollouts(tmp_path):
    """--timesteps 1 with n_steps 32 x 2 envs: SB3 runs one rollout (64 decisions); the
    evaluations and snapshots are spaced over those 64 (2 each, not one per decision), and the
    log says the budget was rounded up."""
    p = ringenv("train", "--timesteps", 1, "--n-envs", 2, "--vec-env", "dummy", "--evals", 2, "--checkpoints", 2,
                "--out", tmp_path, "--name", "r", "--no-progress", "--no-tensorboard", *SMALL, *TINY_PPO,
                "action_repeat=1", timeout=300)
    log = " ".join(p.stderr.split())
    assert "1 decision requested, rounded up to 64 (whole rollouts of n_steps 32 x 2 envs)" in log, log
    assert "64 decisions = 64 env steps" in log or "up to 64 env steps" in log, log
    meta = json.loads((tmp_path / "r" / "args.json").read_text())
    assert meta["timesteps"] == 1 and meta["timesteps_rounded"] == 64 and meta["decisions"] == 64
    assert len(np.load(tmp_path / "r" / "eval" / "evaluations.npz")["timesteps"]) == 2
    assert len(list((tmp_path / "r" / "checkpoints").glob("rl_model_*_steps.zip"))) == 2


def test_train_dqn_budget_is_rounded_up_to_train_freq(tmp_path):
    ringenv("train", "--algo", "dqn", "--timesteps", 5, "--n-envs", 2, "--vec-env", "dummy", "--evals", 0,
            "--checkpoints", 0, "--out", tmp_path, "--name", "d", "--no-progress", "--no-tensorboard", *SMALL,
            "--hp", "learning_starts=0", "buffer_size=100", "train_freq=2", "action_repeat=1")
    meta = json.loads((tmp_path / "d" / "args.json").read_text())
    assert meta["timesteps"] == 5 and meta["timesteps_rounded"] == 8 and meta["decisions"] == 8


def test_evaluating_a_model_trained_with_other_settings_warns(ppo_run, tmp_path, capsys):
    """A model brings its action grids to its evaluation; its other env settings (scenario,
    control interval, time cap, ...) are the evaluation's, so that every policy of a table runs
    the same episodes. Where they differ from the model's training, one line says which."""
    from agents.evaluate import trained_settings_differences
    from ringenv.cli import main

    small = {"vm": {"memory": "1GiB", "vcpus": 2}}
    assert trained_settings_differences(str(ppo_run), "ringenv/Migration-v0", "default", small) == []
    # a randomised intensity is how a model is trained, not a difference from the workloads as written
    assert trained_settings_differences(str(ppo_run), "ringenv/Migration-v0", "default",
                                        {**small, "rate_scale_range": [0.5, 2]}) == []
    diff = trained_settings_differences(str(ppo_run), "ringenv/Migration-v0", "default",
                                        {**small, "control_interval_ms": 100, "max_episode_s": 120})
    assert diff == ["control_interval_ms 50 (evaluated: 100)"], diff
    diff = trained_settings_differences(str(ppo_run), "ringenv/Migration-v0", "default", {})
    assert "vm.memory 1073741824 (evaluated: 17179869184)" in diff and "vm.vcpus 2 (evaluated: 8)" in diff, diff
    assert main(["evaluate", "--policies", "qemu", str(ppo_run), "--workloads", "oltp", "--seeds", "1", "--workers",
                 "1", "--out", str(tmp_path), "--no-progress", *SMALL, "max_episode_s=2",
                 "control_interval_ms=100"]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if "trained with" in ln]
    assert len(err) == 1 and "control_interval_ms 50 (evaluated: 100)" in err[0] \
        and "max_episode_s 120 (evaluated: 2)" in err[0], err


def _episodes(tmp_path, *specs, name="e"):
    """(exit code, {policy spec: [(workload, reward, harvests)]}) of an in-process evaluate."""
    from ringenv.cli import main

    out = tmp_path / name
    code = main(["evaluate", "--policies", *map(str, specs), "--workloads", "oltp", "web", "--seeds", "1",
                 "--workers", "1", "--out", str(out), "--no-progress", *SMALL])
    if code != 0:
        return code, {}
    got = {}
    for r in csv.DictReader((out / "episodes.csv").read_text().splitlines()):
        got.setdefault(r["spec"], []).append((r["workload"], r["reward"], r["harvests"]))
    return code, got


def test_a_model_copied_out_of_its_run_runs_as_trained(ppo_run, tmp_path):
    """Every .zip of a run carries the run's record (algorithm, env id, action_repeat, the
    normalisation, the training wrapper and grids): one copied alone elsewhere acts as in its run
    directory, each decision held for the run's 40 steps."""
    from agents.evaluate import ModelPolicy

    loose = tmp_path / "shared" / "model.zip"
    loose.parent.mkdir()
    shutil.copy(ppo_run / "best_model.zip", loose)  # (PPO's file: norm_obs false, no statistics needed)
    pol = ModelPolicy(loose)
    assert (pol.algo, pol.action_repeat, pol.env_id) == ("ppo", 40, "ringenv/Migration-v0")
    code, got = _episodes(tmp_path, ppo_run, loose)
    assert code == 0 and got[str(loose)] == got[str(ppo_run)], got


def test_policies_that_would_share_a_label_are_told_apart(ppo_run, tmp_path, capsys):
    """Two runs of the same name (under different --out directories) would be two identical
    rows of the table: each then says which spec it is. A snapshot's label names its run. The
    table's header names the --set overrides the episodes ran with."""
    from agents.evaluate import ModelPolicy
    from ringenv.cli import main

    twin = tmp_path / "elsewhere" / ppo_run.name
    shutil.copytree(ppo_run, twin)
    snap = sorted((ppo_run / "checkpoints").glob("rl_model_*_steps.zip"))[0]
    assert ModelPolicy(snap).name == f"ppo {ppo_run.name} ({snap.stem})"
    out = tmp_path / "e"
    assert main(["evaluate", "--policies", "qemu", str(ppo_run), str(twin), "--workloads", "oltp", "--seeds", "1",
                 "--workers", "1", "--out", str(out), "--no-progress", *SMALL]) == 0
    printed = capsys.readouterr().out
    labels = {r["spec"]: r["policy"] for r in csv.DictReader((out / "summary.csv").read_text().splitlines())}
    assert labels["qemu"] == "qemu default"
    assert labels[str(ppo_run)] == f"ppo {ppo_run.name} [{ppo_run}]"
    assert labels[str(twin)] == f"ppo {ppo_run.name} [{twin}]"
    assert f"| ppo {ppo_run.name} [{twin}] |" in printed
    assert "default with --set vm.memory=1GiB vm.vcpus=2," in " ".join(printed.split())


@pytest.fixture(scope="module")
def dqn_run(tmp_path_factory):
    """A DQN model (configs/train/dqn.yaml: normalised observations) trained for 64 decisions."""
    out = tmp_path_factory.mktemp("train_dqn")
    ringenv("train", "--algo", "dqn", "--timesteps", 64, "--n-envs", 1, "--evals", 0, "--checkpoints", 0, "--out",
            out, "--name", "dqn", "--no-progress", "--no-tensorboard", *SMALL, "--hp", "learning_starts=32",
            "buffer_size=1000")
    return out / "dqn"


def test_each_saved_model_records_the_statistics_saved_with_it(dqn_run, ppo_run):
    """Every .zip a run saves (best, final, snapshots) records the SHA-1 of the VecNormalize
    statistics written with it (agents.common.save_model), and that is the file beside it."""
    import hashlib

    from agents.common import STATS_DIGEST
    from agents.evaluate import _zip_data, model_stats

    for run in (dqn_run, ppo_run):
        zips = [run / "final_model.zip", *sorted((run / "checkpoints").glob("*.zip"))]
        zips += [run / "best_model.zip"] if (run / "best_model.zip").is_file() else []
        assert len(zips) == (1 if run == dqn_run else 4), zips  # (dqn_run: no evaluations, no snapshots)
        for z in zips:
            stats = model_stats(z)
            assert stats is not None and stats.parent == z.parent, z
            assert _zip_data(z)[STATS_DIGEST] == hashlib.sha1(stats.read_bytes()).hexdigest(), z


def test_a_model_and_statistics_of_two_saves_are_refused_not_run(dqn_run, tmp_path, monkeypatch):
    """A run stopped between writing the statistics and the model (save_model writes the
    statistics first) leaves the new statistics beside the old model: evaluate refuses that
    pair, naming both files, instead of running the model on wrongly normalised observations. A
    model saved without statistics (its record: none) does not take a file that lies beside it."""
    import pickle

    import gymnasium as gym
    from stable_baselines3 import DQN
    from stable_baselines3.common.vec_env import DummyVecEnv

    import agents.common as common
    from agents.evaluate import ModelPolicy, check_spec, model_stats

    run = tmp_path / "dqn"
    shutil.copytree(dqn_run, run)
    model = DQN.load(run / "final_model.zip", device="cpu")
    with open(run / "final_model_vecnormalize.pkl", "rb") as f:
        stats = pickle.load(f)
    stats.set_venv(DummyVecEnv([lambda: gym.make("ringenv/MigrationDiscrete-v0", vm={"memory": "1GiB", "vcpus": 2})]))
    stats.obs_rms.mean = stats.obs_rms.mean + 1.0  # (statistics of a later evaluation)
    before = (run / "final_model.zip").read_bytes()
    real, calls = common.write_atomically, []

    def stopped_after_the_statistics(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(path, data)

    monkeypatch.setattr(common, "write_atomically", stopped_after_the_statistics)
    with pytest.raises(KeyboardInterrupt):
        common.save_model(model, run / "final_model.zip", stats, run / "final_model_vecnormalize.pkl")
    monkeypatch.undo()
    assert [c.name for c in calls] == ["final_model_vecnormalize.pkl", "final_model.zip"]
    assert (run / "final_model.zip").read_bytes() == before  # (the old model, whole)
    with pytest.raises(ValueError, match=r"--policies '.*dqn': model final_model.zip: the VecNormalize statistics "
                                         r"beside it, final_model_vecnormalize.pkl, are not the ones saved with it"):
        check_spec(str(run), None)
    with pytest.raises(ValueError, match="not the ones saved with it"):
        ModelPolicy(run)
    # a save completed: the pair agrees again
    common.save_model(model, run / "final_model.zip", stats, run / "final_model_vecnormalize.pkl")
    assert ModelPolicy(run).vecnorm.obs_rms.mean == pytest.approx(stats.obs_rms.mean)
    # saved without statistics: a file beside it is not its
    common.save_model(model, run / "bare.zip")
    shutil.copy(run / "final_model_vecnormalize.pkl", run / "bare_vecnormalize.pkl")
    assert model_stats(run / "bare.zip") is None


def test_train_warns_when_dqn_would_never_learn_and_refuses_a_missing_gpu(tmp_path):
    """DQN's updates start after learning_starts decisions (2000 in configs/train/dqn.yaml): a
    smaller budget trains nothing, and the log says so. A CUDA device this torch cannot use is
    an error (stable-baselines3 would run on the CPU, the run's record saying cuda)."""
    common = ["--algo", "dqn", "--n-envs", 1, "--evals", 0, "--checkpoints", 0, "--out", tmp_path,
              "--no-tensorboard", *SMALL]
    p = ringenv("train", "--timesteps", 64, "--name", "a", *common)
    log = " ".join(p.stderr.split())
    assert "dec/s" not in log and "%|" not in log and "━" not in log, log  # no progress bar into a pipe
    assert ("warning: DQN's learning_starts 2000 (from dqn.yaml (ringenv/MigrationDiscrete-v0)) is not below the "
            "budget of 64 decisions: the network is never trained") in log, log
    p = ringenv("train", "--timesteps", 64, "--name", "b", *common, "--hp", "learning_starts=32", "buffer_size=1000")
    assert "never trained" not in p.stderr
    import torch

    if not torch.cuda.is_available():
        q = subprocess.run([sys.executable, "-m", "ringenv", "train", "--device", "cuda:0", "--timesteps", "64",
                            "--name", "c", *map(str, common)], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert q.returncode == 2 and "--device 'cuda:0': CUDA is not available to this torch" in q.stderr, q.stderr
        assert not (tmp_path / "c").exists()


def test_a_model_trained_on_normalised_observations_needs_its_statistics(dqn_run, tmp_path, capsys):
    """Without the VecNormalize statistics a DQN model sees raw observations: another policy.
    Missing, they are an error naming the files looked for (exit 2, nothing written); copied
    with the .zip, the model runs as in its run directory."""
    meta = json.loads((dqn_run / "args.json").read_text())
    assert meta["normalize"]["norm_obs"] is True
    loose = tmp_path / "shared" / "dqn.zip"
    loose.parent.mkdir()
    shutil.copy(dqn_run / "final_model.zip", loose)
    stripped = tmp_path / "stripped"
    shutil.copytree(dqn_run, stripped)
    for f in stripped.glob("*.pkl"):
        f.unlink()
    for spec, missing in ((loose, "dqn_vecnormalize.pkl, vecnormalize.pkl"),
                          (stripped, "final_model_vecnormalize.pkl, vecnormalize.pkl")):
        code, _ = _episodes(tmp_path, spec, name="x")
        err = " ".join(capsys.readouterr().err.split())
        assert code == 2 and "trained on normalised observations" in err, err
        assert f"none of {missing} is next to it" in err, err
        assert not (tmp_path / "x").exists()
    shutil.copy(dqn_run / "final_model_vecnormalize.pkl", loose.parent / "dqn_vecnormalize.pkl")
    code, got = _episodes(tmp_path, dqn_run, loose)
    assert code == 0 and got[str(loose)] == got[str(dqn_run)], got


def test_a_model_without_a_training_record_runs_with_a_warning(ppo_run, dqn_run, tmp_path, capsys):
    """A model saved by another program (or an older ringenv) has no record: its algorithm is
    told from the file (DQN on the Discrete id), and a warning says how it runs (one decision per
    step, raw observations) instead of a traceback or a silent guess."""
    from stable_baselines3 import DQN, PPO

    from agents.common import MODEL_RECORD
    from agents.evaluate import ModelPolicy, policy_env_id

    bare = tmp_path / "bare"
    bare.mkdir()
    for cls, run, name in ((PPO, ppo_run, "p.zip"), (DQN, dqn_run, "d.zip")):
        model = cls.load(run / "final_model.zip", device="cpu")
        delattr(model, MODEL_RECORD)
        model.save(bare / name)
    assert ModelPolicy(bare / "p.zip").algo == "ppo" and ModelPolicy(bare / "p.zip").action_repeat == 1
    assert ModelPolicy(bare / "d.zip").algo == "dqn"
    assert policy_env_id(str(bare / "d.zip"), "ringenv/Migration-v0") == "ringenv/MigrationDiscrete-v0"
    code, got = _episodes(tmp_path, bare / "p.zip", bare / "d.zip")
    err = " ".join(capsys.readouterr().err.split())
    assert code == 0 and len(got) == 2, err
    for name, algo in (("p.zip", "PPO"), ("d.zip", "DQN")):
        assert (f"warning: model {bare / name} has no training record" in err
                and f"evaluated as {algo} (told from the file) with one decision per step" in err), err


def test_a_model_copied_into_another_run_s_directory_runs_as_it_was_trained(ppo_run, dqn_run, tmp_path, capsys):
    """args.json is the record of the models of its own run only: one level up is looked at only
    from a checkpoints/ folder, and an args.json that the model's own record contradicts (or, for
    a model without one, whose algorithm is not the model's) is another run's. Before, a DQN
    .zip under a PPO run's export/ folder was loaded as PPO (a TypeError traceback), and a model
    without a record silently took that run's action_repeat 40."""
    from stable_baselines3 import PPO

    from agents.common import MODEL_RECORD
    from agents.evaluate import ModelPolicy, check_model

    host = tmp_path / "ppo"
    shutil.copytree(ppo_run, host)
    (host / "export").mkdir()
    for where in (host / "export", host):  # under another run, and right in it
        shutil.copy(dqn_run / "final_model.zip", where / "dqn.zip")
        shutil.copy(dqn_run / "final_model_vecnormalize.pkl", where / "dqn_vecnormalize.pkl")
        pol = ModelPolicy(where / "dqn.zip")
        assert (pol.algo, pol.action_repeat, pol.env_id) == ("dqn", 40, "ringenv/MigrationDiscrete-v0")
    bare = PPO.load(ppo_run / "final_model.zip", device="cpu")
    delattr(bare, MODEL_RECORD)
    bare.save(host / "export" / "m.zip")
    assert ModelPolicy(host / "export" / "m.zip").action_repeat == 1
    assert "has no training record" in check_model(str(host / "export" / "m.zip"))
    (tmp_path / "d").mkdir()
    shutil.copy(dqn_run / "args.json", tmp_path / "d")
    bare.save(tmp_path / "d" / "m.zip")  # a PPO model without a record next to a DQN run's args.json
    assert ModelPolicy(tmp_path / "d" / "m.zip").algo == "ppo"
    said = check_model(str(tmp_path / "d" / "m.zip"))  # each args.json left aside is said, with why
    assert f"{tmp_path / 'd' / 'args.json'} is a DQN run's, the model a PPO one: left aside" in said, said
    said = check_model(str(host / "dqn.zip"))
    assert f"{host / 'args.json'} contradicts the record saved in the model on algo, env_id" in said, said
    snap = sorted((host / "checkpoints").glob("rl_model_*_steps.zip"))[0]
    assert ModelPolicy(snap).action_repeat == 40  # a snapshot: its run's record, one level up
    code, got = _episodes(tmp_path, host / "export" / "dqn.zip", name="ev")
    assert code == 0 and len(got) == 1, capsys.readouterr().err


def test_a_model_without_a_record_is_said_to_use_the_statistics_next_to_it(ppo_run, tmp_path):
    """The warning for a model without a training record said "raw observations" even when a
    VecNormalize .pkl next to it was loaded and applied: it now names the file it uses."""
    from stable_baselines3 import PPO

    from agents.common import MODEL_RECORD
    from agents.evaluate import ModelPolicy, check_model

    model = PPO.load(ppo_run / "final_model.zip", device="cpu")
    delattr(model, MODEL_RECORD)
    model.save(tmp_path / "m.zip")
    assert "raw observations (no VecNormalize statistics next to it)" in check_model(str(tmp_path / "m.zip"))
    shutil.copy(ppo_run / "final_model_vecnormalize.pkl", tmp_path / "m_vecnormalize.pkl")
    said = check_model(str(tmp_path / "m.zip"))
    assert "observations normalised by the VecNormalize statistics m_vecnormalize.pkl next to it" in said, said
    assert ModelPolicy(tmp_path / "m.zip").vecnorm is not None


def test_evaluating_a_model_on_workloads_it_was_trained_on_warns(ppo_run, tmp_path, capsys):
    """A policy is judged on workloads it never saw (the test split): one evaluated on its own
    training workloads gets a warning naming them and how it was trained; on the held-out split,
    none."""
    from agents.evaluate import trained_workloads
    from ringenv.config import load_workload_sets

    train = load_workload_sets()["default"]["train"]
    assert trained_workloads(str(ppo_run)) == train and trained_workloads("qemu") == []
    code, _ = _episodes(tmp_path, ppo_run, "qemu")  # oltp and web: training workloads
    err = " ".join(capsys.readouterr().err.split())
    assert code == 0 and (f"warning: model {ppo_run} was trained on workloads it is evaluated on: oltp, web (its "
                          "training: split train); its results there are not held-out ones") in err, err
    assert err.count("trained on workloads it is evaluated on") == 1, err  # (not for the heuristic)
    from ringenv.cli import main

    assert main(["evaluate", "--policies", str(ppo_run), "--workloads", "web-static", "--seeds", "1", "--workers", "1",
                 "--out", str(tmp_path / "held-out"), "--no-progress", *SMALL]) == 0
    assert "evaluated on" not in capsys.readouterr().err


def test_table_shows_no_interval_for_the_bitmap_collector():
    from agents.evaluate import markdown_table

    base = {"reward": -1.0, "reward_ci": 0.1, "d_reward": 0.0, "d_reward_ci": 0.0, "downtime_s": 0.2,
            "downtime_s_ci": 0.0, "total_s": 10.0, "total_s_ci": 0.0, "exit_stall_s": 0.0, "exit_stall_s_ci": 0.0,
            "vcpu_fault_s": 1.0, "vcpu_fault_s_ci": 0.0, "vmm_cpu_s": 0.1, "vmm_cpu_s_ci": 0.0, "full_exits": 0,
            "full_exits_ci": 0.0, "n": 2}
    rows = [{**base, "policy": "qemu default", "spec": "qemu", "ring_entries": 4096, "mean_interval_ms": 1000.0},
            {**base, "policy": "bitmap (no ring)", "spec": "bitmap", "ring_entries": 0, "mean_interval_ms": 0.0}]
    lines = markdown_table(rows).splitlines()
    bitmap = next(ln for ln in lines if ln.startswith("| bitmap"))
    assert bitmap.rstrip(" |").split(" | ")[-3:] == ["-", "-", "2"], bitmap
    qemu = next(ln for ln in lines if ln.startswith("| qemu"))
    assert qemu.rstrip(" |").split(" | ")[-3:] == ["4096", "1000", "2"], qemu


def test_timeline_of_a_bitmap_episode_draws_without_warnings(tmp_path):
    """The bitmap collector has no reaper (its interval is 0 in every step): the timeline leaves
    the interval axis out for it instead of asking matplotlib for a log scale of no positive
    value (a UserWarning in `make run`'s output), and its title says bitmap, not "ring 0"."""
    import warnings

    import gymnasium as gym

    from agents import plots
    from agents.common import EnvFacts
    from agents.evaluate import load_policy, run_episode

    env = gym.make("ringenv/Migration-v0", collector="bitmap", workloads=["idle"])
    ep = run_episode(env, load_policy("qemu", EnvFacts.from_env(env)), 0, trace=True)
    env.close()
    assert all(s["interval_ms"] == 0 for s in ep["trace"])
    figs = []
    save = plots._save
    plots._save = lambda fig, path: figs.append(fig) or save(fig, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = plots.timeline([ep], tmp_path / "t.png")
    finally:
        plots._save = save
    assert out.stat().st_size > 0
    title = figs[0].axes[0].get_title()
    assert "idle, bitmap collector (no ring)" in title and "ring 0" not in title, title


def test_a_second_run_into_the_same_directory_leaves_nothing_of_the_first(tmp_path):
    """The first run keeps a best model (an evaluation); the second, with no evaluation, must
    not leave it next to its own args.json, where ``evaluate`` would take it for the new one."""
    common = ["--timesteps", 32, "--n-envs", 1, "--vec-env", "dummy", "--checkpoints", 0, "--out", tmp_path,
              "--name", "r", "--no-progress", "--no-tensorboard", *SMALL, *TINY_PPO, "action_repeat=1"]
    ringenv("train", "--evals", 1, *common)
    assert (tmp_path / "r" / "best_model.zip").is_file() and (tmp_path / "r" / "eval").is_dir()
    p = ringenv("train", "--evals", 0, "--seed", 7, *common)
    assert "held an earlier run" in p.stderr and "best_model.zip" in p.stderr
    assert not (tmp_path / "r" / "best_model.zip").exists() and not (tmp_path / "r" / "eval").exists()
    assert json.loads((tmp_path / "r" / "args.json").read_text())["args"]["seed"] == 7
    assert (tmp_path / "r" / "final_model.zip").is_file()


def test_dotted_overrides_merge_into_the_file_s_mappings(tmp_path):
    """--set vm.vcpus=1 changes one key of the file's env_kwargs.vm (its memory stays), and --hp
    normalize.norm_reward=false one key of its normalize (its norm_obs: false stays)."""
    import yaml

    doc = yaml.safe_load((ROOT / "configs" / "train" / "ppo.yaml").read_text())
    doc["ringenv/Migration-v0"]["env_kwargs"] = {"vm": {"memory": "1GiB", "vcpus": 2}}
    hp = tmp_path / "ppo.yaml"
    hp.write_text(yaml.safe_dump(doc))
    ringenv("train", "--hyperparams", hp, "--timesteps", 32, "--n-envs", 1, "--evals", 0, "--checkpoints", 0,
            "--out", tmp_path, "--name", "r", "--no-progress", "--no-tensorboard", "--set", "vm.vcpus=1",
            "--hp", "n_steps=32", "batch_size=32", "n_epochs=1", "action_repeat=1", "normalize.norm_reward=false",
            "policy_kwargs={}")
    meta = json.loads((tmp_path / "r" / "args.json").read_text())
    assert meta["env_kwargs"] == {"vm": {"memory": "1GiB", "vcpus": 1}}
    assert meta["normalize"] == {"norm_obs": False, "norm_reward": False}
    # a key without dots replaces the file's value: only what the program adds (the ring grid)
    assert list(meta["hyperparams"]["policy_kwargs"]) == ["ring_sizes"]


def test_train_s_progress_bar_is_on_stderr_and_only_on_a_terminal(tmp_path, monkeypatch, capsys):
    """--progress (the default): "on a terminal: none when stderr is a pipe or a file". The bar
    (stable-baselines3's, rich's) went to stdout, into a pipe or a file too."""
    import io
    from types import SimpleNamespace

    from agents import train

    p = ringenv("train", "--timesteps", 64, "--n-envs", 1, "--evals", 0, "--checkpoints", 0, "--out", tmp_path,
                "--no-tensorboard", *SMALL, *TINY_PPO)
    assert "decisions" not in p.stdout and "dec/s" not in p.stdout and "━" not in p.stdout, p.stdout
    assert "dec/s" not in p.stderr and "%|" not in p.stderr, p.stderr

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    bar = train._decisions_bar(40)
    bar.locals = {"total_timesteps": 64}
    bar.model = SimpleNamespace(num_timesteps=0, get_env=lambda: SimpleNamespace(num_envs=2))
    bar._on_training_start()
    for _ in range(32):
        bar._on_step()
    bar._on_training_end()
    assert "decisions (each up to 40 env steps): 100%" in err.getvalue() and "64/64" in err.getvalue(), err.getvalue()
    assert capsys.readouterr().out == ""


def test_the_same_training_gives_the_same_model_with_either_vector_env(tmp_path):
    """DummyVecEnv keeps rewards in float32, SubprocVecEnv in float64: the program makes both
    float64, so VecNormalize's statistics and the weights do not depend on the choice (auto
    picks by core count)."""
    import torch
    from stable_baselines3 import PPO

    params = {}
    for vec in ("dummy", "subproc"):
        ringenv("train", "--timesteps", 128, "--n-envs", 2, "--vec-env", vec, "--evals", 0, "--checkpoints", 0,
                "--out", tmp_path, "--name", vec, "--no-progress", "--no-tensorboard", *SMALL, *TINY_PPO)
        params[vec] = PPO.load(tmp_path / vec / "final_model.zip", device="cpu").policy.state_dict()
    assert all(torch.equal(params["dummy"][k], params["subproc"][k]) for k in params["dummy"])


@pytest.mark.parametrize("vec_env", ["dummy", "subproc"])
def test_ctrl_c_saves_the_model_so_far_marked_interrupted_and_evaluate_warns(tmp_path, monkeypatch, capsys, vec_env):
    """Ctrl-C during learn: the model so far, its statistics and args.json (interrupted) are
    saved. With SubprocVecEnv the signal reaches its workers too: they are gone by then."""
    import stable_baselines3 as sb3

    from agents import evaluate, train

    learn = sb3.PPO.learn

    def interrupted_learn(self, total_timesteps, **kw):
        learn(self, total_timesteps=32, **kw)  # one rollout, then Ctrl-C
        if vec_env == "subproc":
            for proc in self.get_env().venv.processes:
                proc.terminate()
                proc.join()
        raise KeyboardInterrupt

    monkeypatch.setattr(sb3.PPO, "learn", interrupted_learn)
    args = train.Args(timesteps=256, n_envs=1, vec_env=vec_env, evals=0, checkpoints=0, out=str(tmp_path), name="r",
                      progress=False, tensorboard=False, set=["vm.memory=1GiB", "vm.vcpus=2"],
                      hp=["n_steps=32", "batch_size=32", "n_epochs=1", "action_repeat=2"])
    with pytest.raises(KeyboardInterrupt):
        train.main(args)
    run = tmp_path / "r"
    meta = json.loads((run / "args.json").read_text())
    assert meta["interrupted"] is True and meta["decisions"] == 32
    if vec_env == "subproc":  # the workers could not be asked
        assert meta["env_steps"] is None
    else:  # 2 per decision, fewer where an episode ended within one
        assert 32 < meta["env_steps"] <= 64
    assert (run / "final_model.zip").is_file() and (run / "final_model_vecnormalize.pkl").is_file()
    assert "INTERRUPTED after" in capsys.readouterr().err
    monkeypatch.setattr(sb3.PPO, "learn", learn)
    evaluate.evaluate([str(run)], workloads=["web"], seeds=1, overrides={"vm": {"memory": "1GiB", "vcpus": 2}},
                      workers=1, progress=False)
    assert f"warning: model {run} comes from a training run that was interrupted" in capsys.readouterr().err


@pytest.mark.parametrize("read", [0, 1])
def test_ctrl_c_with_step_results_pending_in_the_workers_pipes_is_still_recorded_as_interrupted(tmp_path,
                                                                                              monkeypatch, read):
    """SIGINT to the main process alone (not its workers) lands while SubprocVecEnv waits for
    the workers' step results: those stay in the pipes (all of them, or all but those already
    read). Asking the workers for their env_steps then read a step result as the answer
    (TypeError: exit 1, args.json without ``interrupted``); closing waited for results already
    read (a hang). The run is recorded as interrupted, the model saved, the workers ended."""
    import stable_baselines3 as sb3

    from agents import train

    learn = sb3.PPO.learn
    workers = []

    def interrupted_learn(self, total_timesteps, **kw):
        learn(self, total_timesteps=32, **kw)  # one rollout, then Ctrl-C in the middle of the next step
        venv = self.get_env().venv
        workers.extend(venv.processes)
        venv.step_async(np.array([self.action_space.sample() for _ in range(venv.num_envs)]))
        for remote in venv.remotes[:read]:
            remote.recv()
        raise KeyboardInterrupt

    monkeypatch.setattr(sb3.PPO, "learn", interrupted_learn)
    args = train.Args(timesteps=256, n_envs=2, vec_env="subproc", evals=0, checkpoints=0, out=str(tmp_path), name="r",
                      progress=False, tensorboard=False, set=["vm.memory=1GiB", "vm.vcpus=2"],
                      hp=["n_steps=16", "batch_size=32", "n_epochs=1", "action_repeat=2"])
    with pytest.raises(KeyboardInterrupt):
        train.main(args)
    meta = json.loads((tmp_path / "r" / "args.json").read_text())
    assert meta["interrupted"] is True and meta["finished"] is True and meta["decisions"] == 32
    assert meta["env_steps"] is None  # (unknown: the workers were not asked)
    assert (tmp_path / "r" / "final_model.zip").is_file()
    assert workers and not any(p.is_alive() for p in workers)


def test_evals_and_checkpoints_are_the_counts_asked_for_the_last_at_the_end(tmp_path):
    """64 decisions on 2 envs (32 steps each), --evals 9 --checkpoints 3: nine evaluations and
    three snapshots spread over the budget, the last of each at decision 64 (a frequency of
    64 // 9 // 2 = 3 steps ran ten, the last at 60)."""
    ringenv("train", "--timesteps", 64, "--n-envs", 2, "--vec-env", "dummy", "--evals", 9, "--checkpoints", 3,
            "--out", tmp_path, "--name", "r", "--no-progress", "--no-tensorboard", *SMALL,
            "--hp", "n_steps=8", "batch_size=16", "n_epochs=1", "action_repeat=1")
    ev = np.load(tmp_path / "r" / "eval" / "evaluations.npz")["timesteps"].tolist()
    assert len(ev) == 9 and ev[-1] == 64, ev
    snaps = sorted(int(re.search(r"_(\d+)_steps", p.name).group(1))
                   for p in (tmp_path / "r" / "checkpoints").glob("rl_model_*_steps.zip"))
    assert snaps == [22, 42, 64], snaps


def test_evaluate_charges_a_truncated_episode_at_the_downtime_weight(tmp_path):
    """The environment charges nothing at a truncation (a learner bootstraps there); an
    evaluation scores returns, so it charges the downtime a switchover then would cause at the
    downtime weight, unless --set reward.truncation=... says otherwise. Episodes cut at 0.5 s of
    oltp-heavy: each truncated, charged 10 x truncation_downtime_s; with the weight set to 0,
    charged nothing and scoring higher by exactly that."""
    from agents.evaluate import evaluate

    common = dict(workloads=["oltp-heavy"], seeds=2, workers=1, progress=False)
    small = {"vm": {"memory": "1GiB", "vcpus": 2}, "max_episode_s": 0.5}
    charged = evaluate(["qemu", "fixed:65536:5000"], overrides=small, **common)
    free = evaluate(["qemu", "fixed:65536:5000"], overrides={**small, "reward": {"truncation": 0}}, **common)
    assert len(charged) == len(free) == 4
    for c, f in zip(charged, free):
        assert c["truncated"] and f["truncated"] and not c["converged"]
        assert c["truncation_downtime_s"] == f["truncation_downtime_s"] > 0
        assert c["r_truncation"] == pytest.approx(-10.0 * c["truncation_downtime_s"])
        assert f["r_truncation"] == 0.0 and not np.signbit(f["r_truncation"])
        assert c["reward"] == pytest.approx(f["reward"] - 10.0 * c["truncation_downtime_s"])
    done = evaluate(["qemu"], overrides={"vm": {"memory": "1GiB", "vcpus": 2}}, **common)
    assert not any(r["truncated"] for r in done) and all(r["truncation_downtime_s"] == 0.0 for r in done)


def _stopped_run(tmp_path, monkeypatch, algo, stop_at, error, hp, **more):
    """A run of 256 decisions (--evals 4, --checkpoints 2) stopped by ``error`` after ``stop_at``."""
    import stable_baselines3 as sb3

    from agents import train

    cls = getattr(sb3, algo.upper())
    learn = cls.learn

    def stopped_learn(self, total_timesteps, **kw):
        learn(self, total_timesteps=stop_at, **kw)
        raise error

    monkeypatch.setattr(cls, "learn", stopped_learn)
    args = train.Args(algo=algo, timesteps=256, n_envs=1, vec_env="dummy", evals=4, checkpoints=2, out=str(tmp_path),
                      name=algo, progress=False, tensorboard=False, set=["vm.memory=1GiB", "vm.vcpus=2"], hp=hp, **more)
    with pytest.raises(type(error)):
        train.main(args)
    monkeypatch.setattr(cls, "learn", learn)
    return tmp_path / algo


def test_resume_after_ctrl_c_runs_the_rest_of_the_budget_as_planned(tmp_path, monkeypatch):
    """``train --resume RUN`` after Ctrl-C: from the final model (and its statistics) at 64 of
    256 decisions to the end of the budget, the evaluations and snapshots where the run planned
    them, args.json finished and saying where it resumed; the settings must be the recorded ones
    (a changed one is named, nothing written); a finished run has nothing to resume."""
    import stable_baselines3 as sb3
    import torch

    from agents import train

    run = _stopped_run(tmp_path, monkeypatch, "ppo", 64, KeyboardInterrupt(),
                       ["n_steps=32", "batch_size=32", "n_epochs=1", "action_repeat=2"])
    before = json.loads((run / "args.json").read_text())
    assert before["interrupted"] is True and before["decisions"] == 64
    stopped_params = sb3.PPO.load(run / "final_model.zip", device="cpu").policy.state_dict()
    with pytest.raises(ValueError, match=r"--resume: --timesteps, --seed, --no-tensorboard given; a resumed run keeps "
                                         r"the settings its args.json records; accepted with --resume: --progress"):
        train.main(train.Args(resume=str(run), timesteps=512, seed=3, tensorboard=False))
    edited = {**before, "hyperparams": {**before["hyperparams"], "gamma": 0.5}}
    (run / "args.json").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=r"its settings are not what they were when it ran: hyperparams"):
        train.main(train.Args(resume=str(run), progress=False))
    assert json.loads((run / "args.json").read_text()) == edited  # (nothing written)
    (run / "args.json").write_text(json.dumps(before))
    p = ringenv("train", "--resume", run, "--no-progress")
    assert f"resuming {run} from final_model.zip at 64 of 256 decisions" in p.stderr
    meta = json.loads((run / "args.json").read_text())
    assert meta["finished"] is True and meta["interrupted"] is False and meta["decisions"] == 256
    (entry,) = meta["resumed"]
    assert entry["stopped"] == "interrupted" and entry["from"] == "final_model.zip" and entry["decisions"] == 64
    assert entry["env_steps_before"] == before["env_steps"] and meta["env_steps"] > before["env_steps"]
    assert meta["evaluations"]["timesteps"] == [64, 128, 192, 256]  # (as an uninterrupted run's plan)
    assert sorted(p.name for p in (run / "checkpoints").glob("*.zip")) == ["rl_model_128_steps.zip",
                                                                           "rl_model_256_steps.zip"]
    final = sb3.PPO.load(run / "final_model.zip", device="cpu")
    assert final.num_timesteps == 256
    assert any(not torch.equal(final.policy.state_dict()[k], v) for k, v in stopped_params.items())  # (it learnt on)
    with pytest.raises(ValueError, match=r"the run finished its budget of 256 decisions: nothing to resume"):
        train.main(train.Args(resume=str(run)))


def test_resume_of_a_failed_dqn_run_continues_from_its_latest_snapshot_with_its_replay_buffer(tmp_path,
                                                                                                monkeypatch, dqn_run):
    """A DQN run that failed at 200 of 256 decisions resumes from its latest snapshot (128) with
    the replay buffer saved with it (127 transitions, checked against the snapshot's record of
    it); the evaluation made after that snapshot (192) is discarded and run again, recorded in
    args.json, and the best of all evaluations is still best_eval; a finished run keeps no
    replay buffer. A buffer of another save is refused."""
    from stable_baselines3 import DQN

    from agents import train

    run = _stopped_run(tmp_path, monkeypatch, "dqn", 200, RuntimeError("simulated crash"),
                       ["learning_starts=16", "buffer_size=1000", "action_repeat=2"], init_from=str(dqn_run))
    failed = json.loads((run / "args.json").read_text())
    assert "RuntimeError: simulated crash" in failed["failed"]
    assert failed["init_from"]["model"] == str((dqn_run / "final_model.zip").resolve())
    first = np.load(run / "eval" / "evaluations.npz")
    first = dict(zip(first["timesteps"].tolist(), first["results"].mean(axis=1).tolist()))
    assert sorted(first) == [64, 128, 192]
    buffer = run / "checkpoints" / "rl_model_replay_buffer_128_steps.pkl"
    saved = buffer.read_bytes()
    buffer.write_bytes(saved + b"\0")
    with pytest.raises(ValueError, match="rl_model_replay_buffer_128_steps.pkl is not the replay buffer saved with "
                                         "rl_model_128_steps.zip"):
        train.main(train.Args(resume=str(run), progress=False))
    buffer.write_bytes(saved)
    loaded = []
    load_buffer = DQN.load_replay_buffer

    def recording(self, path, *a, **kw):
        load_buffer(self, path, *a, **kw)
        loaded.append((Path(path).name, self.replay_buffer.pos))

    monkeypatch.setattr(DQN, "load_replay_buffer", recording)
    train.main(train.Args(resume=str(run), progress=False))
    # (stable-baselines3 stores a step's transition after the callbacks of that step: a snapshot's
    # buffer holds all but the last decision's, which the fresh episodes of the resumption cannot give)
    assert loaded == [("rl_model_replay_buffer_128_steps.pkl", 127)]
    meta = json.loads((run / "args.json").read_text())
    assert meta["finished"] is True and meta["decisions"] == 256 and "failed" not in meta
    assert meta["init_from"] == failed["init_from"]  # (the run's start, kept; the resumption is from its snapshot)
    (entry,) = meta["resumed"]
    assert entry["from"] == "checkpoints/rl_model_128_steps.zip" and "simulated crash" in entry["stopped"]
    assert entry["evaluations_discarded"] == {"timesteps": [192], "mean_reward": [first[192]]}
    assert meta["evaluations"]["timesteps"] == [64, 128, 192, 256]
    assert meta["evaluations"]["mean_reward"][:2] == [first[64], first[128]]
    everything = meta["evaluations"]["mean_reward"] + [first[192]]
    assert meta["best_eval"]["mean_reward"] == max(everything)
    assert not list(run.rglob("*replay_buffer*"))


def test_resume_refuses_what_it_cannot_continue(tmp_path):
    """--resume of a directory that is no run, or of a run stopped before its first snapshot
    (killed: no final record, no snapshot), with flags given, or of a run still training."""
    import argparse
    import fcntl

    from agents import train
    from agents.common import add_dataclass_arguments, dataclass_from_namespace

    with pytest.raises(ValueError, match=r"--resume '.*nowhere': no args.json there"):
        train.main(train.Args(resume=str(tmp_path / "nowhere")))
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "args.json").write_text(json.dumps({"algo": "ppo", "finished": False, "args": {"algo": "ppo"}}))
    with pytest.raises(ValueError, match=r"the run stopped \(killed, or still running\) before its first snapshot"):
        train.main(train.Args(resume=str(tmp_path / "r")))
    # flags given on the command line are refused even at their defaults (--seed 0 on a run of
    # another seed would be ignored silently)
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, train.Args)
    for line, named in ((["--seed", "0"], "--seed"), (["--tensorboard"], "--tensorboard"),
                        (["--no-progress", "--out", "runs/train"], "--out")):
        args = dataclass_from_namespace(train.Args, parser.parse_args(["--resume", str(tmp_path / "r"), *line]))
        with pytest.raises(ValueError, match=f"^--resume: {named} given; a resumed run keeps the settings"):
            train.main(args)
    # a run still training (its lock held) is named as such, snapshot or not
    with open(tmp_path / "r" / ".train.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.truncate(0)
        held.write("pid 4242\n")
        held.flush()
        with pytest.raises(ValueError, match=r"a training run is writing into it now \(pid 4242\)"):
            train.main(train.Args(resume=str(tmp_path / "r")))
    (tmp_path / "r" / "args.json").write_text("[1]")
    with pytest.raises(ValueError, match="records no arguments"):
        train.main(train.Args(resume=str(tmp_path / "r")))


def test_resume_of_ppo_stopped_in_the_middle_of_a_rollout_runs_that_rollout_again(tmp_path, monkeypatch):
    """Ctrl-C at decision 48 of a rollout of 32 (the second, 32..64): the model saved then has
    learnt from the first rollout only (stable-baselines3 trains once a rollout is complete), so
    the run resumes at 32, not 48: the budget ends at 256 as planned, and the evaluation at 64
    is made once."""
    from stable_baselines3.common.callbacks import BaseCallback, CallbackList

    from agents import train

    mark = train._learnt_mark

    class CtrlC(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps == 48:
                raise KeyboardInterrupt
            return True

    monkeypatch.setattr(train, "_learnt_mark", lambda: CallbackList([mark(), CtrlC()]))
    args = train.Args(timesteps=256, n_envs=1, vec_env="dummy", evals=4, checkpoints=2, out=str(tmp_path), name="r",
                      progress=False, tensorboard=False, set=["vm.memory=1GiB", "vm.vcpus=2"],
                      hp=["n_steps=32", "batch_size=32", "n_epochs=1"])
    with pytest.raises(KeyboardInterrupt):
        train.main(args)
    run = tmp_path / "r"
    assert json.loads((run / "args.json").read_text())["decisions"] == 48
    monkeypatch.setattr(train, "_learnt_mark", mark)
    p = ringenv("train", "--resume", run, "--no-progress")
    assert "at 32 of 256 decisions" in p.stderr and "saved at 48: the rollout under way then was not learnt" in p.stderr
    meta = json.loads((run / "args.json").read_text())
    assert meta["decisions"] == 256 and meta["resumed"][0]["decisions"] == 32
    assert meta["resumed"][0]["decisions_saved"] == 48
    assert meta["evaluations"]["timesteps"] == [64, 128, 192, 256]


def test_resume_of_a2c_with_its_hyperparameter_file_named_relative_to_where_it_started(tmp_path, monkeypatch):
    """A2C fills optimizer_class/optimizer_kwargs into the policy_kwargs it is given: args.json
    records the hyperparameters as given, so a resume recomputes the same ones. A --hyperparams
    path relative to the directory the run started in still names the file when the resume is
    started elsewhere."""
    from agents import train

    monkeypatch.chdir(ROOT)
    run = _stopped_run(tmp_path, monkeypatch, "a2c", 64, KeyboardInterrupt(), ["n_steps=8", "action_repeat=2"],
                       hyperparams="configs/train/a2c.yaml")
    assert "optimizer_class" not in json.loads((run / "args.json").read_text())["hyperparams"]["policy_kwargs"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    train.main(train.Args(resume=str(run), progress=False))
    meta = json.loads((run / "args.json").read_text())
    assert meta["finished"] is True and meta["decisions"] == 256 and meta["resumed"][0]["decisions"] == 64
    assert meta["evaluations"]["timesteps"] == [64, 128, 192, 256]
    assert meta["wall_s_total"] == pytest.approx(meta["wall_s"] + meta["resumed"][0]["wall_s_before"])


def test_a_run_directory_in_use_is_refused_and_a_broken_best_pair_is_replaced_on_resume(tmp_path, monkeypatch,
                                                                                       capsys):
    """While a training process holds RUN/.train.lock, ``--resume RUN`` and a new run into RUN
    are refused, nothing removed. A resume finding best_model.zip beside statistics of another
    save (Ctrl-C between its two writes) removes that pair, saying so, and its next evaluation
    saves the best model again: a pair evaluate runs, whose record names its evaluation."""
    import fcntl

    from agents import train
    from agents.evaluate import ModelPolicy, _zip_data

    run = _stopped_run(tmp_path, monkeypatch, "dqn", 200, RuntimeError("simulated crash"),
                       ["learning_starts=16", "buffer_size=1000", "action_repeat=2"])
    files = sorted(p.name for p in run.iterdir())
    with open(run / ".train.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.truncate(0)
        held.write("pid 4242\n")
        held.flush()
        with pytest.raises(ValueError, match=r"--resume '.*dqn': a training run is writing into it now \(pid 4242\)"):
            train.main(train.Args(resume=str(run), progress=False))
        with pytest.raises(ValueError, match=r"--out/--name '.*dqn': a training run is writing into it now"):
            train.main(train.Args(algo="dqn", timesteps=64, n_envs=1, evals=0, checkpoints=0, out=str(tmp_path),
                                  name="dqn", progress=False, tensorboard=False, set=["vm.memory=1GiB", "vm.vcpus=2"]))
    assert sorted(p.name for p in run.iterdir()) == files
    stats = run / "best_model_vecnormalize.pkl"
    stats.write_bytes(stats.read_bytes() + b"\0")  # (another save's)
    capsys.readouterr()
    train.main(train.Args(resume=str(run), progress=False))
    assert "best_model.zip: the VecNormalize statistics beside it" in capsys.readouterr().err
    meta = json.loads((run / "args.json").read_text())
    assert ModelPolicy(run).path.name == "best_model.zip"  # (the pair agrees again)
    recorded = _zip_data(run / "best_model.zip")[train.BEST_EVAL]
    assert meta["best_eval"] == recorded and recorded["timesteps"] > 128  # (saved after the resumption)
    assert recorded["mean_reward"] in meta["evaluations"]["mean_reward"]


def test_statistics_of_another_save_are_left_aside_for_a_model_they_do_not_normalise(ppo_run, tmp_path):
    """The shipped PPO file normalises rewards only: a mismatched statistics file beside its
    model is not needed to run it, and is left aside instead of refusing the model."""
    from agents.evaluate import ModelPolicy, check_spec

    run = tmp_path / "ppo"
    shutil.copytree(ppo_run, run)
    (run / "best_model_vecnormalize.pkl").write_bytes((run / "checkpoints" / "rl_model_vecnormalize_128_steps.pkl")
                                                      .read_bytes() + b"\0")
    assert check_spec(str(run), None) is None
    assert ModelPolicy(run).vecnorm is None


@pytest.mark.parametrize("charged", [False, True])
def test_eval_truncation_scores_the_training_evaluations_as_evaluate_does(tmp_path, monkeypatch, charged):
    """--eval-truncation: the evaluation environment (only it) charges a truncated episode the
    downtime a switchover would then cost, at the downtime weight, as ``ringenv evaluate`` does;
    without it every environment has the training reward."""
    import gymnasium as gym

    from agents import train

    made = []
    factory = train._env_factory

    def recording(env_id, scenario, split, workloads, overrides, episodes=None, *a, **kw):
        made.append((episodes is not None, overrides))
        return factory(env_id, scenario, split, workloads, overrides, episodes, *a, **kw)

    monkeypatch.setattr(train, "_env_factory", recording)
    train.main(train.Args(timesteps=32, n_envs=1, vec_env="dummy", evals=1, checkpoints=0, out=str(tmp_path),
                          name="r", progress=False, tensorboard=False, eval_truncation=charged,
                          set=["vm.memory=1GiB", "vm.vcpus=2"], hp=["n_steps=32", "batch_size=32", "n_epochs=1"]))
    weight = gym.make("ringenv/Migration-v0").unwrapped.cfg.reward.downtime
    for is_eval, overrides in made:
        expected = weight if (is_eval and charged) else None
        assert (overrides.get("reward") or {}).get("truncation") == expected, (is_eval, overrides)
    assert any(is_eval for is_eval, _ in made) and any(not is_eval for is_eval, _ in made)
    assert json.loads((tmp_path / "r" / "args.json").read_text())["args"]["eval_truncation"] is charged


def _tiny_args(tmp_path, name, algo="ppo", hp=(), **more):
    """A small run's arguments (64 decisions, no evaluations, no snapshots) for ``train.main``."""
    from agents import train

    base = ["n_steps=32", "batch_size=32", "n_epochs=1"] if algo == "ppo" else ["buffer_size=1000"]
    more = {"set": ["vm.memory=1GiB", "vm.vcpus=2"], **more}
    return train.Args(algo=algo, timesteps=64, n_envs=1, vec_env="dummy", evals=0, checkpoints=0, out=str(tmp_path),
                      name=name, progress=False, tensorboard=False, hp=base + list(hp), **more)


def _largest_difference(a, b) -> float:
    sa, sb = a.policy.state_dict(), b.policy.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


def test_init_from_starts_a_new_run_from_a_trained_model_s_weights_and_statistics(ppo_run, tmp_path):
    """--init-from RUN: the new run (another seed, a learning rate too small to move it) starts
    from the weights of the run's best model, not its own initialisation, and its VecNormalize
    return statistics go on from that model's; args.json records the model, its SHA-1 and its
    statistics."""
    import hashlib
    import pickle

    from stable_baselines3 import PPO

    from agents import train

    tuned = train.main(_tiny_args(tmp_path, "tuned", hp=["learning_rate=1e-12"], seed=1, init_from=str(ppo_run)))
    fresh = train.main(_tiny_args(tmp_path, "fresh", hp=["learning_rate=1e-12"], seed=1))
    source = ppo_run / "best_model.zip"
    trained = PPO.load(source, device="cpu")
    assert _largest_difference(trained, PPO.load(tuned / "final_model.zip", device="cpu")) < 1e-9
    assert _largest_difference(trained, PPO.load(fresh / "final_model.zip", device="cpu")) > 1e-3

    def returns_seen(path):
        with open(path, "rb") as f:
            return pickle.load(f).ret_rms.count

    own = returns_seen(fresh / "final_model_vecnormalize.pkl")  # (1e-4 + the run's own steps)
    before = returns_seen(ppo_run / "best_model_vecnormalize.pkl")
    assert returns_seen(tuned / "final_model_vecnormalize.pkl") == pytest.approx(before + own - 1e-4)
    assert json.loads((tuned / "args.json").read_text())["init_from"] == {
        "model": str(source.resolve()), "sha1": hashlib.sha1(source.read_bytes()).hexdigest(),
        "statistics": str((ppo_run / "best_model_vecnormalize.pkl").resolve())}
    assert "init_from" not in json.loads((fresh / "args.json").read_text())


def test_init_from_a_dqn_model_carries_its_observation_statistics(dqn_run, tmp_path):
    """A DQN model trained on normalised observations: the new run starts from its Q-network
    (learning_starts above the budget: never trained, so exactly it) and its observation
    statistics, which go on counting; a run that would not normalise them is refused."""
    import pickle

    from stable_baselines3 import DQN

    from agents import train

    tuned = train.main(_tiny_args(tmp_path, "tuned", "dqn", hp=["learning_starts=1000"], seed=1,
                                  init_from=str(dqn_run / "final_model.zip")))
    assert _largest_difference(DQN.load(dqn_run / "final_model.zip", device="cpu"),
                               DQN.load(tuned / "final_model.zip", device="cpu")) == 0.0
    with open(dqn_run / "final_model_vecnormalize.pkl", "rb") as f:
        before = pickle.load(f).obs_rms.count
    with open(tuned / "final_model_vecnormalize.pkl", "rb") as f:
        after = pickle.load(f).obs_rms.count
    assert before + 64 <= after <= before + 64 + 64  # (its 64 decisions and the resets of its episodes)
    with pytest.raises(ValueError, match=r"--init-from '.*dqn': trained on normalised observations, and this run does "
                                         r"not normalise them"):
        train.main(_tiny_args(tmp_path, "raw", "dqn", hp=["normalize={norm_obs: false}"], init_from=str(dqn_run)))
    assert not (tmp_path / "raw").exists()


def test_init_from_refuses_a_model_this_run_cannot_start_from(ppo_run, dqn_run, tmp_path):
    """Another algorithm's model, no model, other action grids, a network of another shape, and
    --init-from with --resume: each refused, named, before the run directory exists."""
    from agents import train

    cases = [
        (_tiny_args(tmp_path, "x", "dqn", init_from=str(ppo_run)),
         r"--init-from '.*ppo': a PPO model, and this run trains DQN \(--algo dqn\); accepted: a DQN model"),
        (_tiny_args(tmp_path, "x", init_from=str(tmp_path / "none")),
         r"--init-from '.*none': no such model .*none; expected a model's .zip or a training run's directory"),
        (_tiny_args(tmp_path, "x", init_from=str(ppo_run), set=["vm.memory=1GiB", "vm.vcpus=2", "ring_sizes=[4096]"]),
         r"trained on the action grids \{'ring_sizes': \[256, .*this run's are \{'ring_sizes': \[4096\]"),
        (_tiny_args(tmp_path, "x", hp=["policy_kwargs={net_arch: [8]}"], init_from=str(ppo_run)),
         r"--init-from '.*best_model.zip': its network does not fit this run's policy .*size mismatch"),
        (train.Args(resume=str(ppo_run), init_from=str(ppo_run)), r"--resume: --init-from given"),
    ]
    for args, words in cases:
        with pytest.raises(ValueError, match=words):
            train.main(args)
        assert not (tmp_path / "x").exists()
