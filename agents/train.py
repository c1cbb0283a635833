"""Train a dirty-ring policy with stable-baselines3 (PPO by default, A2C, DQN).

One readable program, CleanRL style: the arguments are the dataclass below (the docstring under
each field is its --help); the algorithm's hyperparameters come from configs/train/ALGO.yaml
(RL Zoo layout: env id -> n_timesteps, n_envs, policy, normalize, action_repeat, env_wrapper,
env_kwargs, and keywords of the algorithm's constructor), then ``--hp`` overrides. Every key and
value is checked (:func:`check_hyperparams`) before anything is built or written: an unknown key
or a value stable-baselines3 would reject later is an error naming it and what is accepted.

    python -m ringenv train                      # PPO, the documented budget
    python -m ringenv train --algo dqn --timesteps 50000

What it does:
1. ``n_envs`` training environments on the TRAIN workloads (``SubprocVecEnv`` when there are
   several and more than one core, else ``DummyVecEnv``), each wrapped in ``Monitor``, then
   ``VecNormalize`` when the file has ``normalize``, with its keywords (the shipped files:
   rewards by the running return's spread; observations only in DQN's, ``norm_obs``).
2. An evaluation environment on fixed (workload, seed) episodes of the train workloads, never
   the test ones (those judge the final policy), scored by the training reward (with
   ``--eval-truncation`` as ``ringenv evaluate`` scores: a truncated episode charged the downtime
   a switchover would then cause); ``EvalCallback`` finds the best model, saved with its
   VecNormalize statistics; snapshots are saved under ``CheckpointCallback``'s names.
3. ``model.learn(total_timesteps=--timesteps)`` with TensorBoard logs under ``RUN/tb``. A
   stable-baselines3 timestep is one decision of the agent: with ``action_repeat`` k (the file's,
   40 for PPO) each decision is held for k environment steps (control intervals). SB3 runs whole
   rollouts (PPO, A2C: n_steps x n_envs decisions; DQN: train_freq x n_envs), so the budget N is
   rounded up to a multiple of that (:func:`rounded_timesteps`; the evaluations and snapshots are
   spaced over the rounded budget), and the run is up to (rounded N) x k environment steps; the
   log, the progress bar and ``args.json`` count both.
4. ``RUN/final_model.zip`` (+ ``_vecnormalize.pkl``), ``RUN/best_model.zip`` (+ stats),
   ``RUN/args.json`` (everything needed to load and evaluate it: ``ringenv evaluate --policies RUN``;
   and, under ``versions``, what a retraining's numerics depend on: :func:`training_versions`).
   Every saved .zip (best, snapshots, final) also carries the part of that record running it
   needs (``agents.common.MODEL_RECORD``), so that one copied out of ``RUN`` runs as trained.
   A run into a directory that holds an earlier one first removes the earlier run's models,
   evaluations, snapshots and ``args.json`` (it says so), so that they are never mixed; a
   directory holding such names but no ``args.json`` is no run's and is refused, nothing removed.
   ``args.json``, the evaluations' files, each model and its statistics are written whole or not
   at all, and each model records the digest of the statistics saved with it
   (:func:`agents.common.save_model`): a run stopped between the two writes leaves a pair that
   ``evaluate`` refuses, never one it runs with the wrong normalisation. Ctrl-C
   ends training early: the model so far and its statistics are saved as the final ones, and
   ``args.json`` says ``interrupted`` (``evaluate`` warns about such a model); exit code 130 (with
   ``SubprocVecEnv`` its workers are not asked how many env steps they took: ``env_steps`` null). A
   run that fails says ``failed`` (the error) and ``finished: false`` there, and ``evaluate`` warns
   about the models it left as well.
5. ``--resume RUN`` continues a run that did not finish its budget, with the settings its
   ``args.json`` records (recomputed, and refused if a file they come from changed since): from
   its final model if it was interrupted, else from its latest snapshot (PPO, A2C: at the end of
   the last rollout that model learnt from; the rollout under way is run again), with the model's
   optimiser state, its VecNormalize statistics and (DQN: saved with snapshots and with an
   interrupted run's final model) its replay buffer. The evaluations and snapshots fall where the
   run planned them; evaluations made after the snapshot it resumes from are discarded (kept in
   ``args.json`` under ``resumed``, and counted for ``best_eval``: ``best_model.zip`` may be of
   one). The environments start fresh episodes with a seed drawn from (seed, decisions done), so
   a resumed run is not bit-identical to an uninterrupted one. While a run trains, it holds
   ``RUN/.train.lock``: another ``train`` or ``--resume`` into that directory is refused.
6. ``--init-from MODEL`` starts a new run (fine-tuning: on another scenario, workload set or
   budget) from a trained model's policy weights instead of a random initialisation, with the
   VecNormalize statistics saved with it; the model must be of the same algorithm, spaces,
   action grids and observation normalisation (else refused, named, before anything is
   written). The new run's hyperparameters, optimiser and (DQN) replay buffer and exploration
   schedule start fresh; ``args.json`` records the model (path, SHA-1, statistics).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ringenv.config import ConfigError, write_atomically

from .common import (DEFAULT_ENV, MODEL_RECORD, MODEL_RECORD_KEYS, TRAIN_CONFIG_DIR, FixedEpisodes,
                     apply_overrides, check_env_id, check_out_dir, flag_config_error, import_named, jsonable,
                     load_hyperparams, make_env, module_main, parse_overrides, save_model, sb3_logger, wrap_env,
                     wrapper_specs)


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
    """agent decisions to train for, summed over the n_envs environments (stable-baselines3's total_timesteps;
    0: n_timesteps of the hyperparameter file), rounded up to whole rollouts as stable-baselines3 runs them (PPO and
    A2C: n_steps x n_envs decisions; DQN: train_freq x n_envs); each decision is held for action_repeat environment
    steps (the file's action_repeat: 40 control intervals of 50 ms for PPO), so the rounded budget R is up to R x
    action_repeat env steps"""
    n_envs: int = 0
    """parallel training environments (0: the file's n_envs)"""
    hyperparams: str = ""
    """hyperparameter file (default configs/train/ALGO.yaml)"""
    hp: list[str] = field(default_factory=list, metadata={"metavar": "KEY=VALUE"})
    """override hyperparameters of the file, KEY=VALUE, e.g. n_steps=64 batch_size=64 gamma=0.99: keywords of the
    algorithm's constructor, or n_timesteps, n_envs, policy, normalize, action_repeat, env_wrapper, env_kwargs"""
    seed: int = 0
    """seed of the model, the environments and their workload draws"""
    out: str = "runs/train"
    """parent directory of the run directory"""
    name: str = ""
    """run directory name (default ALGO-sSEED)"""
    evals: int = 8
    """evaluations during training, evenly spaced, the last at the end of the budget (0: none); the best model is
    kept (with train_freq in episodes the run goes on to the end of its episodes after the last one)"""
    eval_seeds: int = 1
    """evaluation episodes per training workload (fixed seeds, the same at every evaluation)"""
    eval_truncation: bool = False
    """the evaluations during training score as `ringenv evaluate` does: an episode that reaches the time cap is
    charged the downtime a switchover would then cause, at the downtime weight (reward.truncation), so that the best
    model is not one that runs into the cap; off: they score by the training reward (which charges nothing there)"""
    checkpoints: int = 4
    """snapshots saved during training, evenly spaced, the last at the end (0: none)"""
    vec_env: str = field(default="auto", metadata={"choices": ["auto", "subproc", "dummy"]})
    """auto (subprocesses if n_envs > 1 and there is more than one core), subproc or dummy"""
    tensorboard: bool = True
    """write TensorBoard logs under RUN/tb (needs the tensorboard package)"""
    progress: bool = True
    """show a progress bar (on a terminal: none when stderr is a pipe or a file)"""
    device: str = "cpu"
    """torch device"""
    verbose: int = 0
    """stable-baselines3 verbosity (0, 1, 2)"""
    init_from: str = field(default="", metadata={"metavar": "MODEL"})
    """start from a trained model's weights (fine-tuning) instead of a random initialisation: a .zip, or a run
    directory (its best_model.zip, else final_model.zip, as evaluate takes it). Its algorithm, spaces and action grids
    must be this run's, and it must normalise observations as this run does; the VecNormalize statistics saved with it
    seed this run's. This run's hyperparameters apply (DQN's exploration starts again at exploration_initial_eps); the
    optimiser state and a DQN's replay buffer start fresh. args.json records the model and its SHA-1. A run that
    stopped is continued with --resume instead"""
    resume: str = ""
    """continue the training run in this directory (RUN) to the end of its budget, with the settings its args.json
    records: from its final model if it was interrupted (Ctrl-C), else (killed, failed) from its latest snapshot; with
    the VecNormalize statistics and (DQN) the replay buffer saved with that model. The settings are recomputed from the
    files they came from, and refused if a hyperparameter file, scenario or workload set changed since. No other flag
    may be given but --progress, --verbose and --vec-env. The environments start fresh episodes with a new seed, so
    the result is not bit-identical to an uninterrupted run"""


def _env_factory(env_id, scenario, split, workloads, overrides, episodes=None, action_repeat=1, wrapper=None):
    """A picklable constructor of one Monitor-wrapped env (for SubprocVecEnv)."""

    def init():
        from stable_baselines3.common.monitor import Monitor

        env = wrap_env(make_env(env_id, scenario, split, workloads, overrides), wrapper, action_repeat)
        env = Monitor(env, info_keywords=("downtime_s", "full_exits", "workload"))
        return FixedEpisodes(env, episodes) if episodes else env

    return init


#: hyperparameter-file keys the program reads itself (not passed to the algorithm)
PROGRAM_KEYS = ("n_timesteps", "n_envs", "policy", "normalize", "action_repeat", "env_wrapper", "env_kwargs")
#: constructor keywords the program sets from its own arguments
SET_BY_PROGRAM = {"policy": "the file's policy key", "env": "the program", "seed": "--seed", "device": "--device",
                  "verbose": "--verbose", "tensorboard_log": "--tensorboard", "_init_setup_model": "the program"}
ACTIVATIONS = ("tanh", "relu", "elu")
#: value ranges stable-baselines3 assumes (some it asserts only when the model is built or trained)
_UNIT = {"gamma", "gae_lambda", "tau", "exploration_fraction", "exploration_initial_eps", "exploration_final_eps"}
_INT_MIN = {"n_steps": 1, "n_epochs": 1, "buffer_size": 1, "target_update_interval": 1, "stats_window_size": 1,
            "learning_starts": 0, "batch_size": 1, "action_repeat": 1, "n_envs": 1, "n_timesteps": 1}
#: the largest value of an integer hyperparameter: 2**31 - 1 (a count or a number of steps), less for what is built
#: up front (n_envs environments, each a process with SubprocVecEnv) or held in memory (buffers and batches)
INT_MAX = 2**31 - 1
_INT_MAX = {"n_envs": 256, "buffer_size": 10**7, "n_steps": 10**7, "batch_size": 10**7}
FLOAT32_MAX = 3.4028234663852886e38  # numpy.finfo(numpy.float32).max
_POSITIVE = {"learning_rate", "clip_range", "clip_range_vf", "target_kl", "max_grad_norm", "rms_prop_eps"}
_NONNEGATIVE = {"ent_coef", "vf_coef"}
_SCHEDULES = {"learning_rate", "clip_range", "clip_range_vf"}  # a number or lin_X (linear from X to 0)


def _policy_class(name):
    """``MlpPolicy`` stays a name; ``package.module.Class`` is imported (e.g.
    agents.policies.FixedRingPolicy)."""
    if not isinstance(name, str) or "." not in name:
        return name
    from .common import import_object

    return import_object(name)


def algorithm_class(algo: str):
    import stable_baselines3 as sb3

    return getattr(sb3, algo.upper())


def accepted_hyperparams(algo: str) -> list[str]:
    """The keys a hyperparameter file or --hp may set for ``algo``: the keywords of its
    constructor the program does not set itself, then :data:`PROGRAM_KEYS`."""
    import inspect

    params = inspect.signature(algorithm_class(algo).__init__).parameters
    return sorted(k for k in params if k != "self" and k not in SET_BY_PROGRAM) + list(PROGRAM_KEYS)


def rounded_timesteps(algo: str, total: int, hp: dict, n_envs: int) -> tuple[int, int | None]:
    """The decisions stable-baselines3 runs for ``total_timesteps=total``, and its unit: it
    collects whole rollouts until ``num_timesteps >= total``, n_steps x n_envs decisions each for
    PPO and A2C, train_freq x n_envs for DQN (a train_freq in episodes has no fixed size: then
    ``(total, None)``, the run ending with the episodes under way). ``hp`` as checked by
    :func:`check_hyperparams`."""
    import inspect

    params = inspect.signature(algorithm_class(algo).__init__).parameters
    if algo in ("ppo", "a2c"):
        per = int(hp.get("n_steps", params["n_steps"].default)) * n_envs
    else:
        freq = hp.get("train_freq", params["train_freq"].default)
        n, unit = (freq if isinstance(freq, (tuple, list)) else (freq, "step"))
        if unit != "step":
            return total, None
        per = int(n) * n_envs
    return -(-total // per) * per, per


def _linear(start: float):
    return lambda progress_remaining: progress_remaining * start


class _OutOfRange(ValueError):
    """A number beyond what torch takes: said as it is, not replaced by the key's general form."""


def check_hyperparams(algo: str, hp: dict, where: str | dict = "--hp", n_envs: int = 0) -> dict:
    """``hp`` (a hyperparameter file's entry merged with --hp) checked and converted for ``algo``:
    a ValueError naming the key (``where``: the source, per key or for all) and what is accepted
    for an unknown key or a bad value. Integer keywords are integers (an integral float is
    converted) up to 2**31 - 1, n_envs up to 256, buffer_size, n_steps and batch_size up to 1e7; other
    numbers within float32's range (torch's).
    A quoted number is refused in a file (a string there, as in every config file); from --hp
    (``where`` "--hp") it is read as the number. Converted: ``lin_X`` schedules,
    ``activation_fn`` by name, ``train_freq`` lists. Also PPO's ``n_steps x n_envs >= 2``, with
    ``n_envs`` (--n-envs) or else the file's."""
    import inspect

    cls = algorithm_class(algo)
    params = inspect.signature(cls.__init__).parameters
    name = cls.__name__
    accepted = accepted_hyperparams(algo)

    def src(k):
        w = where.get(k, "--hp") if isinstance(where, dict) else where
        return f"{w} {k}={_show(hp[k])}" if w == "--hp" else f"{w} {k}: {_show(hp[k])}"

    def bad(k, expected):
        return ValueError(f"{src(k)}: expected {expected}")

    def from_file(k) -> bool:
        return (where.get(k, "--hp") if isinstance(where, dict) else where) != "--hp"

    def int_range(k) -> str:
        low = 2 if (k == "batch_size" and algo == "ppo") else _INT_MIN.get(k, 1)
        return f"an integer from {low} to {_INT_MAX.get(k, INT_MAX)}"

    def number(k, v, integer=False, text=False, own_range=False):
        """``v`` as a number (an int with ``integer``: integral and at most the key's maximum). A string is
        refused in a file, as in every config file (a quoted number is text: ``batch_size: '64'``), but for
        the X of ``lin_X`` (``text``); a --hp value is text given on purpose. Within float32's range but with
        ``own_range`` (a key that checks its own)."""
        if isinstance(v, str):
            if from_file(k) and not text:
                raise bad(k, f"{'an integer' if integer else 'a number'}, not the string {v!r} (a quoted number is "
                             "text: write it without quotes)")
            try:
                v = float(v)
            except ValueError:
                raise bad(k, int_range(k) if integer else "a number") from None
        try:
            finite = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
        except OverflowError:  # an int beyond any float
            finite = False
        if not finite:
            raise bad(k, int_range(k) if integer else "a finite number")
        if integer:
            if float(v) != int(v):
                raise bad(k, int_range(k))
            if int(v) > _INT_MAX.get(k, INT_MAX):
                raise bad(k, int_range(k))
            return int(v)
        if abs(v) > FLOAT32_MAX and not own_range:  # torch's float32 tensors: beyond, an overflow deep in the optimiser
            raise _OutOfRange(bad(k, f"a number within float32's range, |x| <= {FLOAT32_MAX:.4g} "
                                     "(torch computes in float32)"))
        return v

    def number_or(k, v, accepted_values):
        """``v`` as a number (:func:`number`), else an error listing ``accepted_values`` (the key's
        other forms), but for a number out of range or quoted in a file, which :func:`number`'s
        own message says better."""
        try:
            return number(k, v)
        except _OutOfRange:
            raise
        except ValueError:
            if isinstance(v, str) and from_file(k):
                raise  # (a quoted number: say so)
            raise bad(k, accepted_values) from None

    out = {}
    for k, v in hp.items():
        if k in SET_BY_PROGRAM and k not in PROGRAM_KEYS:
            raise ValueError(f"{src(k)}: set by {SET_BY_PROGRAM[k]}, not a hyperparameter; accepted: "
                             f"{', '.join(accepted)}")
        if k not in accepted:
            raise ValueError(f"{src(k)}: {name} takes no hyperparameter {k!r}; accepted ({name}'s constructor keywords "
                             f"and the program's own keys): {', '.join(accepted)}")
        default = params[k].default if k in params else None
        if k in _SCHEDULES:
            if v is None and default is None:
                pass
            elif isinstance(v, str) and v.startswith("lin_"):
                start = number(k, v[4:], text=True)
                if start <= 0:
                    raise bad(k, "lin_X with X > 0")
                v = _linear(start)
            else:
                v = number_or(k, v, "a number > 0 or lin_X (a linear schedule from X to 0)")
        elif k == "train_freq":
            if isinstance(v, (list, tuple)):
                if len(v) != 2 or v[1] not in ("step", "episode"):
                    raise bad(k, "an integer >= 1 or [N, step] or [N, episode]")
                v = (number(k, v[0], integer=True), v[1])
                if v[0] < 1:
                    raise bad(k, "an integer >= 1 or [N, step] or [N, episode]")
            else:
                v = number(k, v, integer=True)
                if v < 1:
                    raise bad(k, "an integer >= 1 or [N, step] or [N, episode]")
        elif k == "gradient_steps":
            v = number(k, v, integer=True)
            if v < 1 and v != -1:
                raise bad(k, "an integer >= 1, or -1 (as many as environment steps)")
        elif k == "n_timesteps":
            v = number(k, v, own_range=True)
            if not 1 <= v <= INT_MAX:
                raise bad(k, f"a number from 1 to {INT_MAX} (decisions)")
            v = int(v)
        elif k == "policy":
            v = _check_policy(cls, v, src(k))
        elif k == "normalize":
            v = _check_normalize(v, src(k))
        elif k == "env_wrapper":
            wrapper_specs(v, src(k))
        elif k in ("policy_kwargs", "env_kwargs", "rollout_buffer_kwargs", "replay_buffer_kwargs"):
            if v is None:
                v = {}
            if not isinstance(v, dict):
                raise bad(k, "a mapping {key: value, ...}")
            if k == "policy_kwargs":
                v = dict(v)
                act = v.get("activation_fn")
                if isinstance(act, str):
                    if act.lower() not in ACTIVATIONS:
                        raise ValueError(f"{src(k)}: activation_fn {act!r}; accepted: {', '.join(ACTIVATIONS)}")
                    import torch.nn as nn

                    v["activation_fn"] = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU}[act.lower()]
        elif k in ("rollout_buffer_class", "replay_buffer_class"):
            if v is not None:
                v = import_named(v, src(k), "a class as package.module.Class")
        elif isinstance(default, bool):
            if not isinstance(v, bool):
                raise bad(k, "true or false")
        elif k in _INT_MIN or (isinstance(default, int) and k not in _POSITIVE | _NONNEGATIVE | _UNIT):
            v = number(k, v, integer=True)
        elif isinstance(default, (int, float)) or k in _POSITIVE | _NONNEGATIVE | _UNIT:
            if v is None and default is None:
                pass
            elif default is None:
                v = number_or(k, v, "a number or null (the default: none)")
            else:
                v = number(k, v)
        # ranges
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            low = 2 if (k == "batch_size" and algo == "ppo") else _INT_MIN.get(k)
            if low is not None and v < low:
                raise bad(k, f"an integer >= {low}" + (" (PPO asserts it)" if low == 2 else ""))
            if k in _UNIT and not 0 <= v <= 1:
                raise bad(k, "a number from 0 to 1")
            if k in _POSITIVE and not v > 0:
                raise bad(k, "a number > 0" + (" or lin_X (a linear schedule from X to 0)" if k in _SCHEDULES else ""))
            if k in _NONNEGATIVE and v < 0:
                raise bad(k, "a number >= 0")
        out[k] = v
    if out.get("policy_kwargs"):
        k = "policy_kwargs"
        _check_policy_kwargs(cls, out.get("policy", "MlpPolicy"), out[k], src(k))
    n_envs = n_envs or out.get("n_envs", 1)
    if algo == "ppo" and out.get("n_steps", params["n_steps"].default) * n_envs < 2:
        raise ValueError(f"n_steps {out.get('n_steps', params['n_steps'].default)} x n_envs {n_envs} < 2: PPO needs a "
                         "rollout of at least 2 decisions (raise --hp n_steps or --n-envs)")
    return out


def _show(v) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_show(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(map(_show, v)) + "]"
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def _check_policy(cls, v, where: str):
    """A policy alias of the algorithm (MlpPolicy, ...) stays a name; package.module.Class is
    imported (e.g. agents.policies.FixedRingPolicy)."""
    aliases = list(getattr(cls, "policy_aliases", {}))
    expected = f"{', '.join(aliases)} or a policy class as package.module.Class (e.g. agents.policies.FixedRingPolicy)"
    if isinstance(v, str) and v in aliases:
        return v
    if isinstance(v, str) and "." in v:
        obj = import_named(v, where, expected)
        if not isinstance(obj, type):
            raise ValueError(f"{where}: {v!r} is not a class; expected {expected}")
        return v
    raise ValueError(f"{where}: unknown policy; accepted: {expected}")


def _check_policy_kwargs(algo_cls, policy, kwargs: dict, where: str) -> None:
    """The entries of ``policy_kwargs`` against the policy's constructor (``policy``: an alias
    of the algorithm's or package.module.Class): a ValueError naming the entry, its value and
    what is accepted for an unknown keyword, a ``net_arch`` that is not a list of layer sizes
    (or, for an actor-critic policy, a mapping of them for ``pi`` and ``vf``), or a value of
    another type than the keyword's default (true/false, a number, a mapping)."""
    import inspect
    import numbers

    cls = _policy_class(policy)
    if isinstance(cls, str):  # an alias of the algorithm's
        cls = algo_cls.policy_aliases[cls]
    params: dict = {}
    for base in cls.__mro__:  # the keywords of each __init__ that passes **kwargs on to its base's
        if "__init__" not in vars(base):
            continue
        sig = inspect.signature(base.__init__).parameters
        for k, p in sig.items():
            if k not in ("self", "observation_space", "action_space", "lr_schedule") \
                    and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                params.setdefault(k, p)
        if not any(p.kind == p.VAR_KEYWORD for p in sig.values()):
            break
    from stable_baselines3.common.policies import ActorCriticPolicy

    actor_critic = issubclass(cls, ActorCriticPolicy)

    def layers(x) -> bool:
        return isinstance(x, list) and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in x)

    for k, v in kwargs.items():
        if k not in params:
            raise ValueError(f"{where}: {cls.__name__} takes no keyword {k!r}; accepted: {', '.join(params)}")
        default = params[k].default
        if k == "net_arch":
            ok = v is None or layers(v) or (actor_critic and isinstance(v, dict) and v.keys() <= {"pi", "vf"}
                                            and all(layers(x) for x in v.values()))
            if not ok:
                raise ValueError(f"{where}: net_arch {_show(v)}; accepted: a list of layer sizes (integers > 0)"
                                 + (", or a mapping {pi: [...], vf: [...]} of them" if actor_critic else ""))
        elif k == "activation_fn":
            continue  # (by name, checked above, or a class given in Python)
        elif isinstance(default, bool):
            if not isinstance(v, bool):
                raise ValueError(f"{where}: {k} {_show(v)}; accepted: true or false")
        elif isinstance(default, numbers.Real):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"{where}: {k} {_show(v)}; accepted: a finite number")
        elif k.endswith("_kwargs") and v is not None and not isinstance(v, dict):
            raise ValueError(f"{where}: {k} {_show(v)}; accepted: a mapping of keywords, or null")


def _check_normalize(v, where: str):
    """true, false, or VecNormalize keywords (gamma is the algorithm's)."""
    keys = {"norm_obs": bool, "norm_reward": bool, "clip_obs": float, "clip_reward": float, "epsilon": float}
    if isinstance(v, bool):
        return v
    if not isinstance(v, dict):
        raise ValueError(f"{where}: expected true, false or a mapping of VecNormalize keywords ({', '.join(keys)})")
    for k, x in v.items():
        if k not in keys:
            raise ValueError(f"{where}: unknown VecNormalize keyword {k!r}; accepted: {', '.join(keys)}")
        if keys[k] is bool and not isinstance(x, bool):
            raise ValueError(f"{where}: {k} expected true or false")
        if keys[k] is float and (isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0):
            raise ValueError(f"{where}: {k} expected a number > 0")
    return dict(v)


#: what a run writes into RUN (TensorBoard logs under RUN/tb are kept: each run has its own there)
RUN_OUTPUTS = ("args.json", "final_model.zip", "final_model_vecnormalize.pkl", "final_model_replay_buffer.pkl",
               "best_model.zip", "best_model_vecnormalize.pkl", "eval", "checkpoints")
#: the settings ``--resume`` takes besides the run's own (they do not change what is learnt)
RESUME_FREE = ("resume", "progress", "verbose", "vec_env")
#: the keys of args.json that the settings of a resumed run must give again as recorded
RESUME_SAME = ("algo", "env_id", "scenario", "split", "workloads", "env_kwargs", "action_grids", "env_wrapper",
               "action_repeat", "timesteps_rounded", "n_envs", "policy", "normalize", "hyperparams")


def training_versions() -> dict:
    """What a training's floating point depends on besides the code and the seed: Python, the
    packages' versions, torch's CPU capability (the vector kernels it picked) and its thread
    count, the machine. Trainings with all of these equal have given bit-identical models; with
    others, PPO's updates can amplify a last-bit difference into another policy (README,
    "Trained PPO against QEMU's default")."""
    import platform
    from importlib import metadata

    import torch

    out = {"python": platform.python_version()}
    for dist in ("ringenv", "torch", "numpy", "gymnasium", "stable-baselines3", "numba"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    out["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    out["torch_threads"] = torch.get_num_threads()
    out["machine"] = platform.machine()
    out["cpu"] = _cpu_model()
    return out


def _cpu_model() -> str | None:
    """The CPU's model name (Linux's /proc/cpuinfo), else platform.processor() or None."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _check_earlier_run(run: Path) -> None:
    """A ValueError naming --out/--name when ``run`` holds files of the names a run writes but no
    args.json (which every run writes before the others): not a run's directory, nothing of it
    is removed."""
    old = [name for name in RUN_OUTPUTS if (run / name).exists()]
    if old and not (run / "args.json").is_file():
        raise ValueError(f"--out/--name {str(run)!r}: holds {', '.join(old)} but no args.json: not a training run's "
                         "directory; nothing removed (choose another --name, or remove them)")


def _write_record(run: Path, meta: dict) -> None:
    """The run's record, ``RUN/args.json``, written whole (at the start, on failure, at the end)."""
    write_atomically(run / "args.json", json.dumps(jsonable(meta), indent=1, default=str))


def _clear_earlier_run(run: Path) -> None:
    """Remove what an earlier run wrote into ``run``: a new run into the same directory must not
    leave, e.g., the earlier best_model.zip next to its own args.json (``evaluate`` takes
    best_model.zip first). Says so on stderr."""
    old = [run / name for name in RUN_OUTPUTS if (run / name).exists()]
    if not old:
        return
    for p in old:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    print(f"train: {run} held an earlier run; its {', '.join(p.name for p in old)} removed", file=sys.stderr)


def _resume_args(args: Args) -> tuple[Args, Path, dict]:
    """``--resume RUN``: the run's recorded arguments (with the settings ``--resume`` takes, RESUME_FREE,
    from ``args``), its directory and its args.json. A ValueError for a directory that is no
    run's, a run that finished its budget, or another setting given with ``--resume``."""
    run = Path(args.resume)
    record = run / "args.json"
    if not record.is_file():
        raise ValueError(f"--resume {args.resume!r}: no args.json there: not the directory of a training run")
    try:
        meta = json.loads(record.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--resume {args.resume!r}: its args.json is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("args"), dict):
        raise ValueError(f"--resume {args.resume!r}: its args.json records no arguments (args): not written by ringenv "
                         "train")
    defaults, on_line = Args(), getattr(args, "given_flags", None)  # (the command line's; else: not the default)
    given = [f.name for f in dataclasses.fields(Args) if f.name not in RESUME_FREE and (
        f.name in on_line if on_line is not None else getattr(args, f.name) != getattr(defaults, f.name))]
    if given:
        flags = [("--no-" if getattr(args, n) is False else "--") + n.replace("_", "-") for n in given]
        raise ValueError(f"--resume: {', '.join(flags)} given; a resumed run keeps "
                         "the settings its args.json records; accepted with --resume: --progress, --verbose, --vec-env")
    if meta.get("finished") and not meta.get("interrupted"):
        raise ValueError(f"--resume {args.resume!r}: the run finished its budget of {meta.get('timesteps_rounded')} "
                         f"decisions: nothing to resume (to train it for more: a new run, --init-from {args.resume})")
    names = {f.name for f in dataclasses.fields(Args)}
    given = {k: v for k, v in meta["args"].items() if k in names}
    cwd = meta.get("cwd")
    for k in ("hyperparams", "scenario"):  # files named relative to where the run was started
        v = given.get(k)
        if isinstance(v, str) and v and cwd and not Path(v).is_absolute() and not Path(v).is_file() \
                and (Path(cwd) / v).is_file():
            given[k] = str(Path(cwd) / v)
    recorded = Args(**given)
    return dataclasses.replace(recorded, **{k: getattr(args, k) for k in RESUME_FREE}), run, meta


def _resume_point(run: Path, meta: dict, algo: str, normalize) -> tuple[Path, Path | None, Path | None, dict]:
    """The model a resumed run continues from (the final one of an interrupted run, else the
    latest snapshot), its VecNormalize statistics (None without normalisation) and, for DQN,
    its replay buffer, each checked to be the one saved with the model; and the model's saved
    attributes."""
    import hashlib
    import re

    from .common import BUFFER_DIGEST
    from .evaluate import _zip_data, model_stats

    if meta.get("interrupted"):
        model = run / "final_model.zip"
        buffer = run / "final_model_replay_buffer.pkl"
    else:
        snaps = [(int(m[1]), p) for p in (run / "checkpoints").glob("rl_model_*_steps.zip")
                 if (m := re.fullmatch(r"rl_model_(\d+)_steps", p.stem))]
        why = meta.get("failed") or "killed, or still running"
        if not snaps:
            raise ValueError(f"--resume {str(run)!r}: the run stopped ({why}) before its first snapshot (or was "
                             "trained with --checkpoints 0): nothing to resume from; train it again")
        steps, model = max(snaps)
        buffer = model.with_name(f"rl_model_replay_buffer_{steps}_steps.pkl")
    if not model.is_file():
        raise ValueError(f"--resume {str(run)!r}: {model.name} is missing: nothing to resume from")
    stats = model_stats(model)  # (a ValueError if beside it are another save's)
    if normalize and stats is None:
        raise ValueError(f"--resume {str(run)!r}: the VecNormalize statistics saved with {model.name} are missing")
    data = _zip_data(model)
    if algo != "dqn":
        return model, stats, None, data
    want = data.get(BUFFER_DIGEST)
    if want is None or not buffer.is_file():
        raise ValueError(f"--resume {str(run)!r}: the DQN model {model.name} has no replay buffer saved with it "
                         f"({buffer.name}): resuming would train on an empty buffer")
    if hashlib.sha1(buffer.read_bytes()).hexdigest() != want:
        raise ValueError(f"--resume {str(run)!r}: {buffer.name} is not the replay buffer saved with {model.name} "
                         "(another save's)")
    return model, stats, buffer, data


def _init_point(spec: str, algo: str, grids: dict, norm_obs: bool) -> tuple[Path, Path | None, dict]:
    """``--init-from``: the model's .zip (the path, or a run directory's as ``evaluate`` takes it),
    the VecNormalize statistics saved with it (None: none, or not needed and another save's), and
    what ``args.json`` records of it (its path and SHA-1). A ValueError naming ``--init-from`` for
    a model of another algorithm, with other action grids (its actions would mean other ring
    sizes and intervals) or another normalisation of its observations, before anything is built."""
    import hashlib

    from .evaluate import find_model, model_algo, model_meta, model_stats, normalizes_observations

    flag = f"--init-from {spec!r}"
    try:
        path = find_model(spec)
        meta = model_meta(path)
        theirs = model_algo(path, meta)
        stats = model_stats(path, needed=norm_obs)
    except FileNotFoundError as e:
        raise ValueError(f"{flag}: {e}; expected a model's .zip or a training run's directory") from None
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None
    if theirs != algo:
        raise ValueError(f"{flag}: a {theirs.upper()} model, and this run trains {algo.upper()} (--algo {algo}); "
                         f"accepted: a {algo.upper()} model")
    mine = json.loads(json.dumps(jsonable(grids)))
    if meta.get("action_grids") is not None and meta["action_grids"] != mine:
        raise ValueError(f"{flag}: trained on the action grids {meta['action_grids']}, this run's are {mine}: its "
                         "actions would mean other ring sizes and intervals; give this run its grids with --set "
                         "ring_sizes=[...] intervals_ms=[...]")
    if meta and normalizes_observations(meta) != norm_obs:
        said = ("normalised" if normalizes_observations(meta) else "raw", "normalises" if norm_obs else "does not")
        raise ValueError(f"{flag}: trained on {said[0]} observations, and this run {said[1]} normalise them "
                         "(normalize in the hyperparameter file or --hp); accepted: a model trained as this run trains")
    if norm_obs and stats is None:
        raise ValueError(f"{flag}: this run normalises observations, and no VecNormalize statistics were saved with "
                         f"{path.name} (expected one of its names beside it: {path.stem}_vecnormalize.pkl)")
    record = {"model": str(path.resolve()), "sha1": hashlib.sha1(path.read_bytes()).hexdigest(),
              "statistics": None if stats is None else str(stats.resolve())}
    return path, stats, record


def _init_weights(model, path: Path, stats: Path | None, device: str) -> None:
    """``--init-from``: the policy's weights of the model at ``path`` into ``model`` (its
    optimiser stays fresh), and the VecNormalize statistics ``stats`` into the run's VecNormalize
    (observations if it normalises them, returns if it scales rewards). A ValueError naming
    ``--init-from`` when the spaces or the network differ."""
    import pickle

    from stable_baselines3.common.save_util import load_from_zip_file

    flag = f"--init-from {str(path)!r}"
    data, params, _ = load_from_zip_file(path, device=device, load_data=True)
    for space in ("observation_space", "action_space"):
        theirs, mine = data.get(space), getattr(model, space)
        same = (theirs == mine) if space == "action_space" else (
            theirs is not None and theirs.shape == mine.shape and theirs.dtype == mine.dtype)
        if not same:
            raise ValueError(f"{flag}: its {space.replace('_', ' ')} is {theirs}, this run's {mine}")
    try:
        model.policy.load_state_dict(params["policy"])
    except (KeyError, RuntimeError) as e:
        raise ValueError(f"{flag}: its network does not fit this run's policy (policy and policy_kwargs: net_arch, "
                         f"...): {' '.join(str(e).split())[:400]}") from None
    norm = model.get_vec_normalize_env()
    if norm is not None and stats is not None:
        with open(stats, "rb") as f:
            saved = pickle.load(f)
        if norm.norm_obs:
            norm.obs_rms = saved.obs_rms
        if norm.norm_reward:
            norm.ret_rms = saved.ret_rms


#: the attribute of a PPO or A2C model that ``train`` saves: the decisions of the rollouts it has
#: been trained on (:func:`_learnt_mark`)
LEARNT = "ringenv_learnt_decisions"
#: the attribute of best_model.zip: the evaluation that made it the best ({timesteps, mean_reward})
BEST_EVAL = "ringenv_best_eval"


def learnt_decisions(algo: str, data: dict, per_rollout: int | None, snapshot: bool = False) -> int:
    """Where a resumed run goes on from a saved model (its saved attributes ``data``), so that it
    ends on its budget and runs every evaluation and snapshot it planned. PPO and A2C: the
    decisions of the whole rollouts the model was trained on (LEARNT: stable-baselines3 counts
    each decision as it is taken and trains once its rollout is complete, after the callbacks of
    the rollout's last step, so a snapshot, or Ctrl-C in the middle of a rollout, of its training
    or of an evaluation, has not learnt from the rollout under way: it is run again). Otherwise
    (DQN, or a model saved without LEARNT) the last whole round of ``per_rollout`` decisions
    (train_freq x n_envs for DQN) up to a ``snapshot`` (made after the evaluation planned at the
    same decision), and before the ``num_timesteps`` of an interrupted run's final model (Ctrl-C
    may have cut that round's evaluation or snapshot short); DQN's replay buffer keeps the
    transitions of the decisions run again."""
    saved = int(data.get("num_timesteps", 0))
    if isinstance(data.get(LEARNT), int):
        return min(saved, data[LEARNT])
    if not per_rollout:  # (train_freq in episodes: no rounds of a fixed size)
        return saved
    return per_rollout * max(0, saved // per_rollout if snapshot else (saved - 1) // per_rollout)


def _learnt_mark():
    """A callback keeping LEARNT up to date on a PPO or A2C model: at the start of each rollout
    (every rollout before it is trained on by then) and at the end of training."""
    from stable_baselines3.common.callbacks import BaseCallback

    class LearntMark(BaseCallback):
        def _on_rollout_start(self) -> None:
            setattr(self.model, LEARNT, int(self.model.num_timesteps))

        def _on_training_end(self) -> None:
            setattr(self.model, LEARNT, int(self.model.num_timesteps))

        def _on_step(self) -> bool:
            return True

    return LearntMark()


def _best_eval(run: Path, timesteps, means, resumed: list) -> dict | None:
    """The evaluation best_model.zip comes from, as the model records it (BEST_EVAL); for a model
    saved before it did, the best of every evaluation, those a resumption discarded too."""
    from .evaluate import _zip_data

    best = run / "best_model.zip"
    recorded = _zip_data(best).get(BEST_EVAL) if best.is_file() else None
    if isinstance(recorded, dict):
        return dict(recorded)
    seen = [(float(m), int(t)) for t, m in zip(timesteps, means)]
    for entry in resumed:
        d = entry.get("evaluations_discarded") or {}
        seen += [(float(m), int(t)) for t, m in zip(d.get("timesteps", []), d.get("mean_reward", []))]
    if not seen:
        return None
    m, t = max(seen, key=lambda x: x[0])
    return {"timesteps": t, "mean_reward": m}


def _resume_evaluations(run: Path, done: int) -> tuple[dict | None, dict]:
    """The evaluations of a resumed run up to ``done`` decisions (those after it, of a stretch a
    snapshot did not keep, are discarded and returned apart), and the best mean reward among all."""
    import io

    import numpy as np

    path = run / "eval" / "evaluations.npz"
    if not path.is_file():
        return None, {}
    ev = dict(np.load(path))
    keep = ev["timesteps"] <= done
    means = ev["results"].mean(axis=1)
    discarded = {"timesteps": ev["timesteps"][~keep].tolist(), "mean_reward": means[~keep].tolist()}
    kept = {k: v[keep] for k, v in ev.items()}
    buf = io.BytesIO()
    np.savez(buf, **kept)
    write_atomically(path, buf.getvalue())
    return {"kept": kept, "best": float(means.max()) if len(means) else -math.inf}, discarded


#: the lock files this process holds (:func:`_lock_run`), released when :func:`main` returns
_HELD: list = []


def _lock_run(run: Path, flag: str) -> None:
    """Hold ``RUN/.train.lock`` (an exclusive flock) while this process trains into ``run``: a
    second ``train`` or ``--resume`` into it meanwhile is refused (a ValueError naming ``flag``),
    nothing of it touched. The lock goes with the process, so a killed run's directory can be
    resumed at once."""
    import fcntl

    run.mkdir(parents=True, exist_ok=True)
    f = open(run / ".train.lock", "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        who = f.read().strip() or "another process"
        f.close()
        raise ValueError(f"{flag} {str(run)!r}: a training run is writing into it now ({who}); wait for it to end or "
                         "stop it, or choose another directory") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    _HELD.append(f)


def main(args: Args) -> Path:
    """Train (or, with ``--resume``, go on training) as the module docstring says; the run
    directory."""
    try:
        return _main(args)
    finally:
        while _HELD:
            _HELD.pop().close()  # (closing the file releases its flock)


def _main(args: Args) -> Path:
    import numpy as np
    import stable_baselines3 as sb3
    import torch
    from stable_baselines3.common.callbacks import BaseCallback, EvalCallback
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecNormalize

    # 0. arguments, algorithm, environment id, hyperparameters (file, then --hp overrides), all
    #    checked before anything is built or written (--resume: the run's recorded ones)
    resuming, old = bool(args.resume), {}
    if resuming:
        args, resume_run, old = _resume_args(args)
        _lock_run(resume_run, "--resume")  # (first: a run still training may have no snapshot yet)
    algo = args.algo.lower()
    if algo not in DEFAULT_ENV:
        raise ValueError(f"--algo {args.algo!r}: accepted: {', '.join(DEFAULT_ENV)}")
    for flag, value, low, note in (("--timesteps", args.timesteps, 0, " (0: n_timesteps of the hyperparameter file)"),
                                   ("--n-envs", args.n_envs, 0, " (0: n_envs of the hyperparameter file)"),
                                   ("--evals", args.evals, 0, " (0: none)"), ("--checkpoints", args.checkpoints, 0,
                                                                              " (0: none)"),
                                   ("--eval-seeds", args.eval_seeds, 1, ""), ("--verbose", args.verbose, 0, "")):
        if value < low:
            raise ValueError(f"{flag} {value}: expected an integer >= {low}{note}")
    if args.n_envs > _INT_MAX["n_envs"]:
        raise ValueError(f"--n-envs {args.n_envs}: expected an integer from 0 to {_INT_MAX['n_envs']} (0: n_envs of "
                         "the hyperparameter file)")
    if not 0 <= args.seed <= 2**32 - 1:  # SB3 seeds numpy's global generator with it
        raise ValueError(f"--seed {args.seed}: expected an integer from 0 to {2**32 - 1} (numpy's seed range)")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise ValueError(f"--device {args.device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():  # (stable-baselines3 would fall back to the CPU)
        raise ValueError(f"--device {args.device!r}: CUDA is not available to this torch (a CPU build, or no GPU "
                         "visible); accepted here: cpu")
    env_id = args.env_id or DEFAULT_ENV[algo]
    check_env_id(env_id)
    hp_file = Path(args.hyperparams) if args.hyperparams else TRAIN_CONFIG_DIR / f"{algo}.yaml"
    if args.hyperparams and not hp_file.is_file():
        what = "a directory, not a file" if hp_file.is_dir() else "no such file"
        raise ValueError(f"--hyperparams {args.hyperparams!r}: {what}; expected a YAML file of hyperparameters (RL Zoo "
                         f"layout: environment id -> hyperparameters, as {TRAIN_CONFIG_DIR / (algo + '.yaml')})")
    from_file = load_hyperparams(algo, env_id, hp_file)
    from_cli = parse_overrides(args.hp, flag="--hp")
    where = {k: f"{hp_file.name} ({env_id})" for k in from_file}
    where.update({k: "--hp" for k in from_cli})
    given = apply_overrides(from_file, args.hp, "--hp")  # (as written: lin_X, not the schedule it becomes)
    hp = check_hyperparams(algo, given, where, n_envs=args.n_envs)
    total = int(args.timesteps or hp.get("n_timesteps", 100_000))
    n_envs = int(args.n_envs or hp.get("n_envs", 1))
    tf = hp.get("train_freq")
    if isinstance(tf, tuple) and tf[1] == "episode" and n_envs > 1:
        raise ValueError(f"{where.get('train_freq', 'train_freq')}: train_freq [{tf[0]}, episode] trains on whole "
                         f"episodes, which stable-baselines3 does with one env only, and n_envs is {n_envs}; accepted: "
                         "[N, step], or --n-envs 1")
    for k in ("n_timesteps", "n_envs"):
        hp.pop(k, None)
    rounded, per_rollout = rounded_timesteps(algo, total, hp, n_envs)
    policy_name = hp.pop("policy", "MlpPolicy")
    normalize = hp.pop("normalize", True)
    norm_kw = dict(normalize) if isinstance(normalize, dict) else {}
    action_repeat = int(hp.pop("action_repeat", 1))
    wrapper = hp.pop("env_wrapper", None)
    env_kwargs = apply_overrides(hp.pop("env_kwargs", None) or {}, args.set)
    hp["policy_kwargs"] = dict(hp.get("policy_kwargs") or {})
    workloads = args.workloads or None
    try:
        probe = make_env(env_id, args.scenario, args.split, workloads, env_kwargs).unwrapped
    except ConfigError as e:  # named by the flag that gave the bad value
        raise flag_config_error(e, parse_overrides(args.set), workloads) from None
    train_workloads = list(probe.workloads)
    control_ms = float(probe.cfg.control_interval_ms)
    # the action grids the model's actions index (recorded: evaluate runs the model on these, whatever its --set)
    grids = {"ring_sizes": list(probe.ring_sizes), "intervals_ms": list(probe.intervals_ms)}
    policy = _policy_class(policy_name)
    if not isinstance(policy, str) and "ring_sizes" in policy.__init__.__code__.co_varnames:
        hp["policy_kwargs"].setdefault("ring_sizes", list(probe.ring_sizes))
        if normalize and norm_kw.get("norm_obs", True):
            raise ValueError(f"{policy.__name__} reads the raw observation: set normalize: {{norm_obs: false}}")
    probe.close()
    done, saved, start, stats, buffer = 0, 0, None, None, None
    init = None  # (--init-from: the model, its statistics, args.json's record of it)
    if args.init_from and not resuming:  # (a resumed run goes on from its own model)
        init = _init_point(args.init_from, algo, grids, bool(normalize) and norm_kw.get("norm_obs", True))
    if resuming:
        run = resume_run
        start, stats, buffer, data = _resume_point(run, old, algo, normalize)
        saved = int(data.get("num_timesteps", 0))
        done = learnt_decisions(algo, data, per_rollout, snapshot=not old.get("interrupted"))
    else:
        run = check_out_dir(args.out) / (args.name or f"{algo}-s{args.seed}")
        check_out_dir(run, "--out/--name")
        _check_earlier_run(run)
    torch.set_num_threads(1)  # the environments need the cores more than the small MLP does

    # 1. training environments (train workloads), normalised
    fns = [_env_factory(env_id, args.scenario, args.split, workloads, env_kwargs, None, action_repeat, wrapper)
           for _ in range(n_envs)]
    use_subproc = args.vec_env == "subproc" or (args.vec_env == "auto" and n_envs > 1 and (os.cpu_count() or 1) > 1)
    venv = SubprocVecEnv(fns, start_method="forkserver") if use_subproc else _dummy_vec_env(fns)
    if normalize:  # (resumed: the statistics saved with the model, still learning)
        venv = VecNormalize.load(str(stats), venv) if resuming else VecNormalize(venv, gamma=hp.get("gamma", 0.99),
                                                                                  **norm_kw)

    # 2. evaluation on fixed episodes of the training workloads (never the test ones); snapshots;
    #    the progress bar (in decisions)
    callbacks = [_learnt_mark()] if algo in ("ppo", "a2c") else []  # (what --resume continues from)
    if args.evals > 0:
        episodes = [(w, 10_000 + k) for k in range(args.eval_seeds) for w in train_workloads]
        eval_kwargs = env_kwargs
        if args.eval_truncation:  # (the training environments keep the training reward)
            from .evaluate import scoring_overrides

            eval_kwargs = scoring_overrides(env_id, args.scenario, env_kwargs)
        eval_env = DummyVecEnv([_env_factory(env_id, args.scenario, args.split, workloads, eval_kwargs, episodes,
                                             action_repeat, wrapper)])
        if normalize:
            eval_env = VecNormalize(eval_env, training=False, norm_reward=False, gamma=hp.get("gamma", 0.99),
                                    **{k: v for k, v in norm_kw.items() if k != "norm_reward"})

        class SaveBest(BaseCallback):
            """On a new best model: save it with its VecNormalize statistics (save_model: a pair
            that is told apart from another save's)."""

            def _on_step(self) -> bool:
                setattr(self.model, BEST_EVAL, {"timesteps": int(self.model.num_timesteps),
                                                "mean_reward": float(self.parent.best_mean_reward)})
                try:
                    save_model(self.model, run / "best_model.zip", self.model.get_vec_normalize_env(),
                               run / "best_model_vecnormalize.pkl")
                finally:
                    delattr(self.model, BEST_EVAL)  # (the best model's alone)
                return True

        class Rewind(BaseCallback):
            """After an evaluation: the next one starts from the first fixed episode again."""

            def _on_step(self) -> bool:
                eval_env.env_method("rewind")
                return True

        evals = _planned(EvalCallback, _after(_spread(rounded // n_envs, args.evals), done // n_envs))
        callbacks.append(evals(eval_env, callback_on_new_best=SaveBest(), callback_after_eval=Rewind(),
                               n_eval_episodes=len(episodes), eval_freq=1, log_path=str(run / "eval"),
                               deterministic=True, verbose=args.verbose))
    if args.checkpoints > 0:
        callbacks.append(_snapshots(run / "checkpoints", _after(_spread(rounded // n_envs, args.checkpoints),
                                                                done // n_envs), buffers=algo == "dqn"))
    if args.progress:
        callbacks.append(_decisions_bar(action_repeat))

    # 3. the model (stable-baselines3's own checks of what check_hyperparams cannot see, e.g.
    #    policy_kwargs, end as a clean error before the run directory exists) and its training
    tb = None
    if args.tensorboard:
        try:
            import tensorboard  # noqa: F401

            tb = str(run / "tb")
        except ImportError:
            print("train: tensorboard is not installed; no TensorBoard logs", file=sys.stderr)
    resume_seed = None
    try:
        if resuming:  # the model as saved (its optimiser too), its replay buffer; fresh episodes, a new seed
            model = getattr(sb3, algo.upper()).load(start, env=venv, device=args.device, tensorboard_log=tb)
            model.verbose = args.verbose
            if buffer is not None:
                model.load_replay_buffer(buffer)
            model.num_timesteps = done  # (PPO, A2C: back to the end of the last rollout learnt from)
            resume_seed = int(np.random.SeedSequence([args.seed, done]).generate_state(1)[0])
            model.set_random_seed(resume_seed)
        else:
            # (a copy of policy_kwargs: A2C fills optimizer_class/optimizer_kwargs into the dict it is
            # given, which would then differ from what --resume recomputes)
            model = getattr(sb3, algo.upper())(policy, venv, seed=args.seed, device=args.device, verbose=args.verbose,
                                               tensorboard_log=tb, **{**hp, "policy_kwargs": dict(hp["policy_kwargs"])})
    except (TypeError, ValueError, AssertionError, KeyError, RuntimeError) as e:  # (torch's: RuntimeError)
        venv.close()
        if resuming:
            raise ValueError(f"--resume {str(run)!r}: {start.name} does not load: {e}") from None
        raise ValueError(f"{algo.upper()} rejected the hyperparameters ({hp_file.name} and --hp): {e}") from None
    if init is not None:
        try:
            _init_weights(model, init[0], init[1], args.device)
        except ValueError:
            venv.close()
            raise
    if tb is None:  # (else SB3 leaves an empty folder in the temporary directory per run)
        model.set_logger(sb3_logger(args.verbose))
    if not resuming:  # (a resumption holds its run's lock from the start)
        try:
            _lock_run(run, "--out/--name")
        except ValueError:
            venv.close()
            raise
    if not resuming:
        _clear_earlier_run(run)
    meta = {"algo": algo, "env_id": env_id, "scenario": args.scenario, "split": args.split, "workloads": workloads,
            "env_kwargs": env_kwargs, "action_grids": grids, "env_wrapper": wrapper, "action_repeat": action_repeat,
            "timesteps": total,
            "timesteps_rounded": rounded,
            "control_interval_ms": control_ms, "n_envs": n_envs,
            "vec_env": "SubprocVecEnv" if use_subproc else "DummyVecEnv", "policy": policy_name,
            "normalize": normalize,
            "hyperparams": {k: (given.get(k, repr(v)) if callable(v) else v) for k, v in hp.items()},
            "args": dataclasses.asdict(args), "cwd": os.getcwd(), "versions": training_versions(),
            "finished": False}  # (True once the run's record is written)
    if init is not None or old.get("init_from"):
        meta["init_from"] = init[2] if init is not None else old["init_from"]
    if resuming:
        _resumed(meta, old, run, start, done, saved, resume_seed, venv, callbacks)
    _write_record(run, meta)
    # every .zip of the run (best, snapshots, final) carries what running it needs, so that one
    # copied out of RUN still runs as trained (stable-baselines3 saves a model's JSON attributes)
    setattr(model, MODEL_RECORD, json.loads(json.dumps(jsonable({k: meta[k] for k in MODEL_RECORD_KEYS}),
                                                       default=str)))
    if rounded != total:
        unit = (f"whole rollouts of n_steps {per_rollout // n_envs}" if algo in ("ppo", "a2c")
                else f"whole rounds of train_freq {per_rollout // n_envs}")
        budget = (f"{total} decision{'s' if total != 1 else ''} requested, rounded up to {rounded} ({unit} x "
                  f"{n_envs} env{'s' if n_envs != 1 else ''}): ")
    else:
        budget = ""
    if per_rollout is None:
        budget += f"{total} decisions or more (train_freq in episodes: the episodes under way end the run)"
        if action_repeat > 1:
            budget += f", each up to {action_repeat} env steps"
    elif action_repeat > 1:
        budget += f"{rounded} decisions x action_repeat {action_repeat} = up to {rounded * action_repeat} env steps"
    else:
        budget += f"{rounded} decisions = {rounded} env steps (action_repeat 1)"
    print(f"train: {algo.upper()} on {env_id} ({args.scenario}, {args.split}: {', '.join(train_workloads)}), "
          f"{budget} of {control_ms:g} ms, {n_envs} env{'s' if n_envs != 1 else ''} ({meta['vec_env']}); run {run}",
          file=sys.stderr)
    starts = int(hp.get("learning_starts", 100))  # (stable-baselines3's default for DQN)
    if algo == "dqn" and starts >= rounded:  # its updates begin once num_timesteps > learning_starts
        src = where.get("learning_starts", "stable-baselines3's default")
        print(f"train: warning: DQN's learning_starts {starts} (from {src}) is not below the budget of {rounded} "
              "decisions: the network is never trained, the model is its random initialisation", file=sys.stderr)
    t0 = time.perf_counter()
    interrupted = False
    try:
        if rounded > done:  # (resumed: the rest of the budget; its counters go on from the model's)
            model.learn(total_timesteps=rounded - done, callback=callbacks, progress_bar=False, tb_log_name=algo,
                        reset_num_timesteps=not resuming)
    except KeyboardInterrupt:  # keep what was learnt, marked as such (as rl-baselines3-zoo does)
        interrupted = True
        print("train: interrupted: saving the model so far", file=sys.stderr)
    except BaseException as e:  # the run failed: its record says so (evaluate warns about its models)
        meta.update(failed=f"{type(e).__name__}: {e}", wall_s=time.perf_counter() - t0)
        _write_record(run, meta)
        raise
    wall = time.perf_counter() - t0

    # 4. the final model and statistics, the run's record
    # (an interrupted DQN run: its replay buffer too, for --resume; a finished run needs none)
    kept_buffer = run / "final_model_replay_buffer.pkl"
    save_model(model, run / "final_model.zip", model.get_vec_normalize_env(), run / "final_model_vecnormalize.pkl",
               kept_buffer if interrupted and algo == "dqn" else None)
    if not interrupted:  # a finished run is not resumed: no replay buffer kept (an earlier stop's, a snapshot's)
        for old_buffer in [kept_buffer, *(run / "checkpoints").glob("rl_model_replay_buffer_*_steps.pkl")]:
            old_buffer.unlink(missing_ok=True)
    decisions = int(model.num_timesteps)  # a whole number of rollouts: can exceed --timesteps
    workers = venv.unwrapped if isinstance(venv.unwrapped, SubprocVecEnv) else None
    if interrupted and workers is not None:
        # the workers are not asked: their pipes may hold the step results the interrupted learn()
        # never read (a question would read one of those as its answer), or be broken (Ctrl-C
        # reached the workers too); the env steps taken are then unknown (null in args.json)
        env_steps = None if action_repeat > 1 else decisions
        _end_workers(workers)
    else:
        env_steps = sum(venv.get_attr("env_steps")) if action_repeat > 1 else decisions
        if resuming and action_repeat > 1:  # (this session's; with those before, if they are known)
            before = meta["resumed"][-1]["env_steps_before"]
            env_steps = None if before is None else before + env_steps
    # the rates are this session's (a resumed run: its decisions since the resumption)
    earlier = [e.get("wall_s_before") for e in meta.get("resumed", [])][-1:]  # (the sessions before, if known)
    meta.update(wall_s=wall, wall_s_total=wall + (earlier[0] or 0.0) if earlier else wall,
                decisions=decisions, env_steps=env_steps, decisions_per_s=(decisions - done) / wall,
                env_steps_per_s=None if env_steps is None or resuming else env_steps / wall,
                interrupted=interrupted, finished=True)
    if args.evals > 0 and (run / "eval" / "evaluations.npz").is_file():
        ev = np.load(run / "eval" / "evaluations.npz")
        means = ev["results"].mean(axis=1)
        meta["evaluations"] = {"timesteps": ev["timesteps"].tolist(), "mean_reward": means.tolist()}
        meta["best_eval"] = _best_eval(run, ev["timesteps"], means, meta.get("resumed", []))
    _write_record(run, meta)
    if not (interrupted and workers is not None):  # (those were ended above)
        venv.close()
    steps = "" if env_steps is None else f" = {env_steps} env steps"
    rates = "" if env_steps is None else f", {env_steps / wall:.0f} env steps/s"
    if resuming:
        steps, rates = (f" ({decisions - done} since the resumption)" + ("" if env_steps is None else
                                                                        f" = {env_steps} env steps"), "")
    print(f"train: {'INTERRUPTED after' if interrupted else 'done in'} {wall:.0f} s: {decisions} decisions{steps} "
          f"({(decisions - done) / wall:.0f} decisions/s{rates}); models in {run} (evaluate: ringenv evaluate "
          f"--policies {run} qemu{'' if not interrupted else '; continue: ringenv train --resume ' + str(run)})",
          file=sys.stderr)
    if interrupted:
        raise KeyboardInterrupt
    return run


def _resumed_best(run: Path, best_of_all: float, needs_stats: bool) -> float:
    """The mean reward a resumed run's evaluations must beat to replace best_model.zip: the one
    it records (BEST_EVAL; else the best of all evaluations so far). A best model that normalises
    its observations (``needs_stats``) beside statistics of another save (Ctrl-C between its two
    writes) is removed, saying so: evaluate would refuse it, and it would be kept for good."""
    from .evaluate import _zip_data, model_stats

    best = run / "best_model.zip"
    if not best.is_file():
        return -math.inf
    try:
        model_stats(best, needed=needs_stats)
    except ValueError as e:
        best.unlink()
        best.with_name("best_model_vecnormalize.pkl").unlink(missing_ok=True)
        print(f"train: {e}; removed: the next evaluation saves the best model", file=sys.stderr)
        return -math.inf
    recorded = _zip_data(best).get(BEST_EVAL)
    return float(recorded["mean_reward"]) if isinstance(recorded, dict) else best_of_all


def _resumed(meta: dict, old: dict, run: Path, start: Path, done: int, saved: int, seed: int, venv,
             callbacks) -> None:
    """``--resume``: the settings recomputed from the run's recorded arguments must be those it
    recorded (RESUME_SAME; a ValueError naming the ones that differ, before anything is written:
    a hyperparameter file, scenario or workload set edited since); ``meta`` gains the earlier
    resumptions and this one; the evaluation callback gets the evaluations so far."""
    from stable_baselines3.common.callbacks import EvalCallback

    def same(x):
        return json.loads(json.dumps(jsonable(x), default=str))

    differ = [k for k in RESUME_SAME if k in old and same(meta[k]) != same(old[k])]
    if differ:
        venv.close()
        raise ValueError(f"--resume {str(run)!r}: its settings are not what they were when it ran: "
                         f"{'; '.join(f'{k} {same(old[k])} then, {same(meta[k])} now' for k in differ)} (a "
                         "hyperparameter file, scenario or workload set edited since?); the rest of the run would "
                         "learn on others")
    evals = next((c for c in callbacks if isinstance(c, EvalCallback)), None)
    history, discarded = _resume_evaluations(run, done) if evals is not None else (None, {})
    if history is not None:
        kept = history["kept"]
        evals.evaluations_timesteps = kept["timesteps"].tolist()
        evals.evaluations_results = kept["results"].tolist()
        evals.evaluations_length = kept["ep_lengths"].tolist()
        from .evaluate import normalizes_observations

        evals.best_mean_reward = _resumed_best(run, history["best"], normalizes_observations(meta))
    stopped = "interrupted" if old.get("interrupted") else old.get("failed") or "killed (no final record)"
    entry = {"stopped": stopped, "from": start.relative_to(run).as_posix(), "decisions": done,
             "decisions_saved": saved, "seed": seed,
             "wall_s_before": old.get("wall_s_total", old.get("wall_s")),
             "env_steps_before": old.get("env_steps") if old.get("interrupted") else None}
    if discarded.get("timesteps"):  # (evaluated after the snapshot resumed from: that stretch is run again)
        entry["evaluations_discarded"] = discarded
    if same(old.get("versions")) != same(meta["versions"]):
        entry["versions_before"] = old.get("versions")
        print(f"train: warning: resuming {run} with other versions than it ran with (before: {old.get('versions')}; "
              f"now: {meta['versions']}): the rest of the run computes differently", file=sys.stderr)
    meta["resumed"] = list(old.get("resumed") or []) + [entry]
    rollout = "" if saved == done else (
        f"; saved at {saved}: " + ("the rollout under way then was not learnt from, and is run again"
                                   if meta["algo"] in ("ppo", "a2c") else
                                   "the round under way then is run again, its evaluation or snapshot with it"))
    print(f"train: resuming {run} from {entry['from']} at {done} of {meta['timesteps_rounded']} decisions "
          f"(environments reseeded: {seed}{rollout})", file=sys.stderr)


def _spread(steps: int, n: int) -> frozenset[int]:
    """``n`` callback calls (steps of the vector env) spread evenly over ``steps``, the last at
    the end (fewer if there are fewer steps)."""
    return frozenset(max(1, round(steps * i / n)) for i in range(1, n + 1))


def _planned(callback_cls, calls: frozenset[int]):
    """``callback_cls`` (an EvalCallback made with a frequency of 1) that acts only at the
    callback calls in ``calls``: --evals N evaluations exactly, the last at the end of the budget
    (a frequency of budget // N ran one more, and not at the end, whenever N did not divide the
    budget; :func:`_snapshots` takes the same plan)."""

    class Planned(callback_cls):
        def _on_step(self) -> bool:
            return super()._on_step() if self.n_calls in calls else True

    Planned.__name__ = f"Planned{callback_cls.__name__}"
    return Planned


def _after(calls: frozenset[int], done: int) -> frozenset[int]:
    """The planned callback calls still ahead after ``done`` calls, counted from there (a resumed
    run's callbacks start counting again)."""
    return frozenset(c - done for c in calls if c > done)


def _snapshots(folder: Path, calls: frozenset[int], buffers: bool = False):
    """A callback saving a snapshot at the callback calls in ``calls``, with its VecNormalize
    statistics if any (:func:`save_model`), under stable-baselines3's CheckpointCallback names:
    ``rl_model_N_steps.zip`` and ``rl_model_vecnormalize_N_steps.pkl``, N the decisions so far;
    with ``buffers`` (DQN) the replay buffer too, ``rl_model_replay_buffer_N_steps.pkl``, kept
    for the latest snapshot only (what ``--resume`` continues from), as stable-baselines3 holds it
    then: without the last decision's transitions, which it stores after the callbacks."""
    from stable_baselines3.common.callbacks import BaseCallback

    class Snapshots(BaseCallback):
        def _on_step(self) -> bool:
            if self.n_calls in calls:
                folder.mkdir(parents=True, exist_ok=True)
                n = self.num_timesteps
                kept = folder / f"rl_model_replay_buffer_{n}_steps.pkl"
                save_model(self.model, folder / f"rl_model_{n}_steps.zip", self.model.get_vec_normalize_env(),
                           folder / f"rl_model_vecnormalize_{n}_steps.pkl", kept if buffers else None)
                for old in folder.glob("rl_model_replay_buffer_*_steps.pkl"):
                    if old != kept:
                        old.unlink()
            return True

    return Snapshots()


def _end_workers(venv) -> None:
    """End the worker processes of an interrupted ``SubprocVecEnv`` without a word to them:
    ``close()`` would first wait for one step result per worker (one the interrupted learn()
    already read never comes: it would hang), and a worker that Ctrl-C reached is gone."""
    for process in venv.processes:
        if process.is_alive():
            process.terminate()
        process.join()
    for remote in venv.remotes:
        remote.close()
    venv.closed = True


def _dummy_vec_env(env_fns):
    """A DummyVecEnv with its rewards in float64, as SubprocVecEnv returns them (DummyVecEnv keeps
    float32): VecNormalize's statistics, hence the model, do not depend on which one runs."""
    import numpy as np
    from stable_baselines3.common.vec_env import DummyVecEnv

    venv = DummyVecEnv(env_fns)
    venv.buf_rews = np.zeros((venv.num_envs,), dtype=np.float64)
    return venv


def _decisions_bar(action_repeat: int):
    """A progress bar of the decisions (timesteps), each up to ``action_repeat`` env steps: on
    stderr, and only when stderr is a terminal (as evaluate's; stable-baselines3's own bar, rich's,
    writes to stdout, into a pipe or a file too)."""
    from stable_baselines3.common.callbacks import BaseCallback
    from tqdm.auto import tqdm

    class DecisionsBar(BaseCallback):
        def _on_training_start(self) -> None:
            label = "decisions" + (f" (each up to {action_repeat} env steps)" if action_repeat > 1 else "")
            self.pbar = tqdm(total=self.locals["total_timesteps"] - self.model.num_timesteps, desc=label, unit="dec",
                             disable=None, dynamic_ncols=True, file=sys.stderr)  # (None: none unless a terminal)

        def _on_step(self) -> bool:
            self.pbar.update(self.training_env.num_envs)  # (one decision per env per call)
            return True

        def _on_training_end(self) -> None:
            self.pbar.close()

    return DecisionsBar()


if __name__ == "__main__":
    module_main(main, Args, "agents.train")
