"""Train a dirty-ring policy with stable-baselines3 (PPO by default, A2C, DQN).

One readable program, CleanRL style: the arguments are the dataclass below (the docstring under
each field is its --help); the algorithm's hyperparameters come from configs/train/ALGO.yaml
(RL Zoo layout: env id -> n_timesteps, n_envs, policy, normalize, SB3 keywords).

    python -m ringenv train                      # PPO, the documented budget
    python -m ringenv train --algo dqn --timesteps 50000

What it does:
1. ``n_envs`` training environments on the TRAIN workloads (``SubprocVecEnv`` when there are
   several and more than one core, else ``DummyVecEnv``), each wrapped in ``Monitor``, then
   ``VecNormalize`` (observations, and rewards by the running return's spread).
2. An evaluation environment on fixed (workload, seed) episodes of the train workloads, never
   the test ones (those judge the final policy); ``EvalCallback`` keeps the best model with its
   VecNormalize statistics, ``CheckpointCallback`` saves snapshots.
3. ``model.learn(..., progress_bar=True)`` with TensorBoard logs under ``RUN/tb``.
4. ``RUN/final_model.zip`` (+ ``_vecnormalize.pkl``), ``RUN/best_model.zip`` (+ stats),
   ``RUN/args.json`` (everything needed to load and evaluate it: ``ringenv evaluate --policies RUN``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .common import (DEFAULT_ENV, FixedEpisodes, wrap_env, jsonable, load_hyperparams, make_env, parse_dataclass_args,
                     parse_overrides)


@dataclass
class Args:
    """Train a dirty-ring policy with stable-baselines3."""

    algo: str = field(default="ppo", metadata={"choices": ["ppo", "a2c", "dqn"]})
    """algorithm: ppo or a2c (MultiDiscrete action) or dqn (Discrete action)"""
    env_id: str = ""
    """environment id (default: ringenv/Migration-v0; ringenv/MigrationDiscrete-v0 for dqn)"""
    scenario: str = "default"
    """scenario name (configs/scenarios) or YAML file"""
    split: str = field(default="train", metadata={"choices": ["train", "test", "all"]})
    """workload split to train on (the test split is held out for evaluation)"""
    workloads: list[str] = field(default_factory=list)
    """explicit training workloads instead of the split"""
    set: list[str] = field(default_factory=list, metadata={"metavar": "KEY=VALUE"})
    """overrides KEY=VALUE of env settings or scenario fields, e.g. vm.vcpus=2 (added to the file's env_kwargs)"""
    timesteps: int = 0
    """total environment steps (0: n_timesteps of the hyperparameter file)"""
    n_envs: int = 0
    """parallel training environments (0: the file's n_envs)"""
    hyperparams: str = ""
    """hyperparameter file (default configs/train/ALGO.yaml)"""
    hp: list[str] = field(default_factory=list, metadata={"metavar": "KEY=VALUE"})
    """override hyperparameters of the file, KEY=VALUE, e.g. n_steps=64 batch_size=64 gamma=0.99"""
    seed: int = 0
    """seed of the model, the environments and their workload draws"""
    out: str = "runs/train"
    """parent directory of the run directory"""
    name: str = ""
    """run directory name (default ALGO-sSEED)"""
    evals: int = 8
    """evaluations during training, evenly spaced (0: none); the best model is kept"""
    eval_seeds: int = 1
    """evaluation episodes per training workload (fixed seeds, the same at every evaluation)"""
    checkpoints: int = 4
    """snapshots saved during training, evenly spaced (0: none)"""
    vec_env: str = field(default="auto", metadata={"choices": ["auto", "subproc", "dummy"]})
    """auto (subprocesses if n_envs > 1 and there is more than one core), subproc or dummy"""
    tensorboard: bool = True
    """write TensorBoard logs under RUN/tb (needs the tensorboard package)"""
    progress: bool = True
    """show a progress bar"""
    device: str = "cpu"
    """torch device"""
    verbose: int = 0
    """stable-baselines3 verbosity (0, 1, 2)"""


def _env_factory(env_id, scenario, split, workloads, overrides, episodes=None, action_repeat=1, wrapper=None):
    """A picklable constructor of one Monitor-wrapped env (for SubprocVecEnv)."""

    def init():
        from stable_baselines3.common.monitor import Monitor

        env = wrap_env(make_env(env_id, scenario, split, workloads, overrides), wrapper, action_repeat)
        env = Monitor(env, info_keywords=("downtime_s", "full_exits", "workload"))
        return FixedEpisodes(env, episodes) if episodes else env

    return init


def _policy_kwargs(spec):
    """policy_kwargs from YAML: a mapping; ``activation_fn`` by name (tanh, relu)."""
    import torch.nn as nn

    kw = dict(spec or {})
    if isinstance(kw.get("activation_fn"), str):
        kw["activation_fn"] = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU}[kw["activation_fn"].lower()]
    return kw


def _policy_class(name):
    """``MlpPolicy`` stays a name; ``package.module.Class`` is imported (e.g.
    agents.policies.FixedRingPolicy)."""
    if not isinstance(name, str) or "." not in name:
        return name
    import importlib

    mod, _, cls = name.rpartition(".")
    return getattr(importlib.import_module(mod), cls)


def _schedule(v):
    """``lin_3e-4`` (RL Zoo) -> a linear schedule from 3e-4 to 0; numbers stay."""
    if isinstance(v, str) and v.startswith("lin_"):
        start = float(v[4:])
        return lambda progress_remaining: progress_remaining * start
    return v


def main(args: Args) -> Path:
    import numpy as np
    import stable_baselines3 as sb3
    import torch
    from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback, EvalCallback
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecNormalize

    # 0. algorithm, environment id, hyperparameters (file, then --hp overrides)
    algo = args.algo.lower()
    if algo not in DEFAULT_ENV:
        raise ValueError(f"--algo {args.algo!r}: accepted: {', '.join(DEFAULT_ENV)}")
    env_id = args.env_id or DEFAULT_ENV[algo]
    hp = {**load_hyperparams(algo, env_id, args.hyperparams or None), **parse_overrides(args.hp)}
    total = int(float(args.timesteps or hp.get("n_timesteps", 100_000)))
    n_envs = int(args.n_envs or hp.get("n_envs", 1))
    for k in ("n_timesteps", "n_envs"):
        hp.pop(k, None)
    policy_name = hp.pop("policy", "MlpPolicy")
    normalize = hp.pop("normalize", True)
    norm_kw = dict(normalize) if isinstance(normalize, dict) else {}
    action_repeat = int(hp.pop("action_repeat", 1))
    wrapper = hp.pop("env_wrapper", None)
    env_kwargs = {**(hp.pop("env_kwargs", None) or {}), **parse_overrides(args.set)}
    hp["policy_kwargs"] = _policy_kwargs(hp.get("policy_kwargs"))
    for k in ("learning_rate", "clip_range"):
        if k in hp:
            hp[k] = _schedule(hp[k])
    workloads = args.workloads or None
    probe = make_env(env_id, args.scenario, args.split, workloads, env_kwargs).unwrapped
    train_workloads = list(probe.workloads)
    policy = _policy_class(policy_name)
    if not isinstance(policy, str) and "ring_sizes" in policy.__init__.__code__.co_varnames:
        hp["policy_kwargs"].setdefault("ring_sizes", list(probe.ring_sizes))
        if normalize and norm_kw.get("norm_obs", True):
            raise ValueError(f"{policy.__name__} reads the raw observation: set normalize: {{norm_obs: false}}")
    run = Path(args.out) / (args.name or f"{algo}-s{args.seed}")
    run.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # the environments need the cores more than the small MLP does

    # 1. training environments (train workloads), normalised
    fns = [_env_factory(env_id, args.scenario, args.split, workloads, env_kwargs, None, action_repeat, wrapper)
           for _ in range(n_envs)]
    use_subproc = args.vec_env == "subproc" or (args.vec_env == "auto" and n_envs > 1 and (os.cpu_count() or 1) > 1)
    venv = SubprocVecEnv(fns, start_method="forkserver") if use_subproc else DummyVecEnv(fns)
    if normalize:
        venv = VecNormalize(venv, gamma=hp.get("gamma", 0.99), **norm_kw)

    # 2. evaluation on fixed episodes of the training workloads (never the test ones); snapshots
    callbacks = []
    if args.evals > 0:
        episodes = [(w, 10_000 + k) for k in range(args.eval_seeds) for w in train_workloads]
        eval_env = DummyVecEnv([_env_factory(env_id, args.scenario, args.split, workloads, env_kwargs, episodes,
                                             action_repeat, wrapper)])
        if normalize:
            eval_env = VecNormalize(eval_env, training=False, norm_reward=False, gamma=hp.get("gamma", 0.99),
                                    **{k: v for k, v in norm_kw.items() if k != "norm_reward"})

        class SaveStats(BaseCallback):
            """On a new best model: save the VecNormalize statistics next to it."""

            def _on_step(self) -> bool:
                if isinstance(self.model.get_vec_normalize_env(), VecNormalize):
                    self.model.get_vec_normalize_env().save(str(run / "best_model_vecnormalize.pkl"))
                return True

        class Rewind(BaseCallback):
            """After an evaluation: the next one starts from the first fixed episode again."""

            def _on_step(self) -> bool:
                eval_env.env_method("rewind")
                return True

        callbacks.append(EvalCallback(eval_env, callback_on_new_best=SaveStats(), callback_after_eval=Rewind(),
                                      n_eval_episodes=len(episodes), eval_freq=max(total // args.evals // n_envs, 1),
                                      log_path=str(run / "eval"), best_model_save_path=str(run), deterministic=True,
                                      verbose=args.verbose))
    if args.checkpoints > 0:
        callbacks.append(CheckpointCallback(max(total // args.checkpoints // n_envs, 1), str(run / "checkpoints"),
                                            save_vecnormalize=bool(normalize)))

    # 3. the model and its training
    tb = None
    if args.tensorboard:
        try:
            import tensorboard  # noqa: F401

            tb = str(run / "tb")
        except ImportError:
            print("train: tensorboard is not installed; no TensorBoard logs", file=sys.stderr)
    model = getattr(sb3, algo.upper())(policy, venv, seed=args.seed, device=args.device, verbose=args.verbose,
                                       tensorboard_log=tb, **hp)
    meta = {"algo": algo, "env_id": env_id, "scenario": args.scenario, "split": args.split, "workloads": workloads,
            "env_kwargs": env_kwargs, "env_wrapper": wrapper, "action_repeat": action_repeat, "timesteps": total, "n_envs": n_envs,
            "vec_env": "SubprocVecEnv" if use_subproc else "DummyVecEnv", "policy": policy_name,
            "normalize": normalize, "hyperparams": {k: (repr(v) if callable(v) else v) for k, v in hp.items()},
            "args": dataclasses.asdict(args)}
    (run / "args.json").write_text(json.dumps(jsonable(meta), indent=1, default=str))
    print(f"train: {algo.upper()} on {env_id} ({args.scenario}, {args.split}: {', '.join(train_workloads)}), "
          f"{total} steps, {n_envs} envs ({meta['vec_env']}); run {run}", file=sys.stderr)
    t0 = time.perf_counter()
    model.learn(total_timesteps=total, callback=callbacks, progress_bar=args.progress, tb_log_name=algo)
    wall = time.perf_counter() - t0

    # 4. the final model and statistics, the run's record
    model.save(run / "final_model")
    if normalize:
        venv.save(str(run / "final_model_vecnormalize.pkl"))
    venv.close()
    meta.update(wall_s=wall, steps_per_s=total / wall)
    if args.evals > 0 and (run / "eval" / "evaluations.npz").is_file():
        ev = np.load(run / "eval" / "evaluations.npz")
        means = ev["results"].mean(axis=1)
        meta["evaluations"] = {"timesteps": ev["timesteps"].tolist(), "mean_reward": means.tolist()}
        meta["best_eval"] = {"timesteps": int(ev["timesteps"][means.argmax()]), "mean_reward": float(means.max())}
    (run / "args.json").write_text(json.dumps(jsonable(meta), indent=1, default=str))
    print(f"train: done in {wall:.0f} s ({total / wall:.0f} steps/s); models in {run} "
          f"(evaluate: ringenv evaluate --policies {run} qemu)", file=sys.stderr)
    return run


if __name__ == "__main__":
    main(parse_dataclass_args(Args))
