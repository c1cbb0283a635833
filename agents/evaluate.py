"""Evaluate policies (heuristics or trained models) on the TEST workloads with several seeds.

Every policy runs the same episodes: for each workload of the split and each seed
``seed0 .. seed0 + seeds - 1``, ``env.reset(seed=s, options={"workload": w})``. Same seed, same
workload: same guest writes, so policies are compared on common random numbers and the paired
difference to QEMU's default is much tighter than either mean. Episodes run in ``workers``
processes (1 to 256; no more than there are episodes). Writes ``episodes.csv`` (one row per
episode) and ``summary.csv`` (per policy: mean and 95% interval of each metric) under ``--out``;
prints the Markdown table.

The intervals (:func:`mean_ci`) are Student-t intervals over the policy's n episodes (workloads x
seeds) taken as one sample. For the mean over the evaluated workloads they are conservative: the
spread between workloads widens them, though every policy plays the same workloads. The
``*_ci_within`` columns of summary.csv give the interval with the workloads held fixed and only
the seeds drawn (:func:`stratified_ci`: per-workload variances, Welch-Satterthwaite degrees of
freedom). Neither extends to workloads not evaluated: with few of them, read the per-workload
table. An episode that reaches
the time cap is charged the downtime a switchover then would cause, at the downtime weight
(:func:`scoring_overrides`; ``--set reward.truncation=W`` sets another weight). Trained models
act deterministically unless ``--stochastic`` (:class:`ModelPolicy`: sampled from each episode's
seed, reproducible).

    python -m agents.evaluate --policies qemu watermark runs/train/ppo-s0/best_model.zip
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import re
import sys
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ringenv.config import ConfigError, write_atomically
from ringenv.env import NOT_KEYWORDS

from .common import (MIGRATION, MODEL_RECORD, STATS_DIGEST, EnvFacts, check_env_id, check_out_dir, flag_config_error,
                     jsonable, make_env, module_main, parse_overrides, wrap_env)
from .heuristics import SPECS, Policy, heuristic_env_kwargs, is_heuristic, make_heuristic


@dataclass
class EvalSettings:
    """Where and how policies are evaluated (the settings `ringenv evaluate` and `ringenv compare`
    share)."""

    env_id: str = MIGRATION
    """environment id (a model's own env id is used for it: Discrete for DQN)"""
    scenario: str = "default"
    """scenario name (configs/scenarios) or YAML file"""
    split: str = field(default="test", metadata={"choices": ["train", "test", "all"]})
    """workload split of the scenario's workload set: test (held out from training), train or all"""
    workloads: list[str] = field(default_factory=list)
    """explicit workloads instead of the split"""
    seed0: int = 1000
    """first evaluation seed (training uses low seeds; keep these apart)"""
    set: list[str] = field(default_factory=list, metadata={"metavar": "KEY=VALUE"})
    """overrides KEY=VALUE of env settings or scenario fields, e.g. vm.vcpus=2 max_episode_s=60"""
    workers: int = 2
    """worker processes (episodes run in parallel), 1 to 256"""
    baseline: str = "qemu"
    """policy the paired reward difference is taken against (if evaluated)"""
    stochastic: bool = False
    """trained models sample their actions (PPO, A2C: from the policy's distribution; DQN: epsilon-greedy at its
    final exploration rate) instead of taking the most likely one; drawn from each episode's seed, so reproducible;
    the heuristics act as they always do"""
    progress: bool = True
    """show progress bars (on a terminal: none when stderr is a pipe or a file)"""


@dataclass
class Args(EvalSettings):
    """Evaluate policies on the test workloads of a scenario with several seeds."""

    policies: list[str] = field(default_factory=lambda: ["qemu"], metadata={"metavar": "SPEC"})
    """heuristic specs (qemu, fixed:ENTRIES:MS, watermark[:T[:ENTRIES|auto]], rate[:MIB[:ENTRIES]], bitmap,
    random[:SEED]; ENTRIES and MS must be members of the env's ring_sizes / intervals_ms, which --set can change)
    or trained models (path to a .zip saved by `ringenv train`, or its run directory; a .zip trained on normalised
    observations needs MODEL_vecnormalize.pkl beside it)"""
    seeds: int = 5
    """episodes per workload (seeds seed0, seed0+1, ...)"""
    out: str = "runs/evaluate"
    """directory for episodes.csv and summary.csv"""


# ---------------------------------------------------------------------------------- trained models
def find_model(path: str | Path) -> Path:
    """A trained model's .zip: the path itself, or in a run directory best_model.zip, then
    final_model.zip."""
    p = Path(path)
    if p.is_dir():
        for name in ("best_model.zip", "final_model.zip"):
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"{p}: no best_model.zip or final_model.zip")
    if not p.is_file() and p.with_suffix(".zip").is_file():
        p = p.with_suffix(".zip")
    if not p.is_file():
        raise FileNotFoundError(f"no such model {p}")
    return p


def _zip_data(model_path: Path) -> dict:
    """The attributes stable-baselines3 saved in a model's .zip (its ``data`` entry)."""
    try:
        with zipfile.ZipFile(model_path) as z:
            data = json.loads(z.read("data"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{model_path}: not a model saved by stable-baselines3 ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{model_path}: not a model saved by stable-baselines3 (its data is not a JSON object)")
    return data


def run_record_files(model_path: Path) -> list[Path]:
    """Where a model's run record (args.json) can be: next to it, or one level up for a snapshot
    in its run's ``checkpoints/`` (CheckpointCallback's folder), never above any other folder."""
    dirs = [model_path.parent] + ([model_path.parent.parent] if model_path.parent.name == "checkpoints" else [])
    return [d / "args.json" for d in dirs]


def model_meta(model_path: Path) -> dict:
    """The training run's record of a model: the run's args.json (:func:`run_record_files`) if it
    is this model's, else the record ``ringenv train`` saved in the model itself (MODEL_RECORD: a
    .zip copied out of its run directory), else {} (a model saved by another program, or before
    models carried their record). An args.json is another run's, and left aside, when the model's
    own record disagrees with it or, for a model without one, its algorithm is not the model's
    (a .zip copied into another run's directory runs as it was trained, not as that run);
    :func:`check_model` warns of it."""
    return _model_record(model_path)[0]


def _model_record(model_path: Path) -> tuple[dict, list[str]]:
    data = _zip_data(model_path)
    record = data.get(MODEL_RECORD)
    record = dict(record) if isinstance(record, dict) else None
    aside = []
    for f in run_record_files(model_path):
        if not f.is_file():
            continue
        try:
            meta = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{f}: not valid JSON ({e}); expected the args.json a training run writes") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{f}: a JSON {type(meta).__name__}; expected the object a training run writes")
        if record is not None:
            mine = json.loads(json.dumps(jsonable({k: meta.get(k) for k in record}), default=str))
            if mine != record:
                keys = [k for k in record if mine[k] != record[k]]
                aside.append(f"{f} contradicts the record saved in the model on {', '.join(keys)}")
                break
        elif meta.get("algo") and _algo_from_attributes(data) not in (None, meta["algo"]):
            aside.append(f"{f} is a {str(meta['algo']).upper()} run's, the model a "
                         f"{_algo_from_attributes(data).upper()} one")
            break
        return meta, aside
    return record or {}, aside


def model_algo(model_path: Path, meta: dict) -> str:
    """The model's algorithm: its record's, else told from the attributes saved in the .zip
    (DQN's exploration schedule, PPO's clip range, A2C: neither)."""
    if meta.get("algo"):
        return str(meta["algo"])
    algo = _algo_from_attributes(_zip_data(model_path))
    if algo is None:
        raise ValueError(f"{model_path}: cannot tell which algorithm saved it (PPO, A2C or DQN), and it has no "
                         "training record (no args.json next to it or above its checkpoints/ folder, none saved in "
                         "the model)")
    return algo


def _algo_from_attributes(data: dict) -> str | None:
    """PPO, A2C or DQN told from the attributes saved in a model's .zip, else None."""
    if "exploration_fraction" in data:
        return "dqn"
    if "clip_range" in data:
        return "ppo"
    if "gae_lambda" in data:
        return "a2c"
    return None


def normalizes_observations(meta: dict) -> bool:
    """Whether the run trained on VecNormalize-normalised observations (its ``normalize``:
    true, or keywords without ``norm_obs: false``)."""
    norm = meta.get("normalize")
    return bool(norm) and (not isinstance(norm, dict) or norm.get("norm_obs", True))


def vecnormalize_candidates(model_path: Path) -> list[Path]:
    """Where a model's VecNormalize statistics are looked for, in order: a snapshot's own
    (CheckpointCallback's naming), ``<model>_vecnormalize.pkl``, then ``vecnormalize.pkl``."""
    stem = model_path.with_suffix("")
    cands = [Path(f"{stem}_vecnormalize.pkl"), model_path.parent / "vecnormalize.pkl"]
    snapshot = re.fullmatch(r"(.*)_(\d+_steps)", model_path.stem)
    if snapshot:
        cands.insert(0, model_path.parent / f"{snapshot[1]}_vecnormalize_{snapshot[2]}.pkl")
    return cands


def model_stats(model_path: Path, needed: bool = True) -> Path | None:
    """The VecNormalize statistics file a model runs with: the first of
    :func:`vecnormalize_candidates` that exists; None if there is none, or if the model was saved
    recording that it had none (``STATS_DIGEST`` null: a file beside it is not its). A ValueError
    when the model records the digest of the statistics saved with it (``agents.common.save_model``)
    and the file holds other statistics: another save's (a training run stopped between the two
    writes, or a file copied over), with which its observations would be normalised wrongly; for a
    model that does not normalise its observations (not ``needed``: the statistics only scaled
    its training rewards) such a file is left aside instead (None)."""
    data = _zip_data(model_path)
    if STATS_DIGEST in data and data[STATS_DIGEST] is None:
        return None
    found = next((c for c in vecnormalize_candidates(model_path) if c.is_file()), None)
    want = data.get(STATS_DIGEST)
    if found is not None and want is not None:
        got = hashlib.sha1(found.read_bytes()).hexdigest()
        if got != want:
            if not needed:
                return None
            raise ValueError(f"model {model_path.name}: the VecNormalize statistics beside it, {found.name}, are not "
                             f"the ones saved with it (SHA-1 {got[:12]}, the model records {str(want)[:12]}): another "
                             "save's (a training run stopped between writing the two, or a file copied over), which "
                             "would normalise its observations wrongly; use the run's other model (final_model.zip "
                             "or a snapshot in checkpoints/) or copy the model's own statistics beside it")
    return found


def check_model(spec: str) -> str | None:
    """A clear error for a model that would not run as it was trained (its algorithm unknown,
    its observation statistics missing); returns a warning for a model without a training
    record (it runs with one decision per step, and with the VecNormalize statistics next to it
    if there are any) or whose run's args.json was left aside as another run's
    (named, with what it contradicts), else None."""
    model = find_model(spec)
    meta, aside = _model_record(model)
    algo = model_algo(model, meta)
    said = [f"model {spec}: {why}: left aside as another run's record, the model runs as it was trained"
            for why in aside]
    stats = model_stats(model, needed=normalizes_observations(meta))
    if normalizes_observations(meta) and stats is None:
        raise ValueError(f"--policies {spec!r}: the {algo.upper()} model {model.name} was trained on normalised "
                         f"observations (normalize: {meta['normalize']}), but its VecNormalize statistics are missing: "
                         f"none of {', '.join(c.name for c in vecnormalize_candidates(model))} is next to it (copy the "
                         "run's .pkl with the .zip, or pass the run directory)")
    if not meta:
        obs = f"observations normalised by the VecNormalize statistics {stats.name} next to it" if stats else \
            "raw observations (no VecNormalize statistics next to it)"
        said.append(f"model {spec} has no training record (no args.json of its run next to it, none saved in the "
                    f"model: saved by another program or an older ringenv): evaluated as {algo.upper()} (told from "
                    f"the file) with one decision per step (action_repeat 1), {obs} and no training wrapper")
    return "; ".join(said) or None


#: mixed into an episode's seed for a stochastic model's draws (another stream than the random
#: heuristic's, which takes the same episode seeds)
_STOCHASTIC_STREAM = 0x5702


class ModelPolicy(Policy):
    """A saved stable-baselines3 model with its VecNormalize statistics (observations normalised
    as in training). Deterministic actions (the most likely; DQN: greedy) unless ``stochastic``:
    then PPO and A2C sample each action from the policy's distribution, and DQN acts
    epsilon-greedily at its final exploration rate (``exploration_final_eps``, whenever in training
    the model was saved: a snapshot from early on would act mostly at random), as
    stable-baselines3's ``predict(deterministic=False)`` does once exploration has ended; from
    generators of the policy's own, seeded by :meth:`reset` from the episode's seed: an episode is the same in any
    process and in any order (the global torch and numpy generators are left alone)."""

    stochastic = False
    _rng = _torch_gen = None  # (a stochastic policy's generators: reset() seeds them)

    def __init__(self, path: str | Path, facts: EnvFacts | None = None, stochastic: bool = False):
        import pickle

        import stable_baselines3 as sb3

        self.path = find_model(path)
        meta = model_meta(self.path)
        self.algo = model_algo(self.path, meta)
        self.env_id = meta.get("env_id")
        self.model = getattr(sb3, self.algo.upper()).load(self.path, device="cpu")
        self.vecnorm = None
        stats = model_stats(self.path, needed=normalizes_observations(meta))
        if stats is not None:
            with open(stats, "rb") as f:
                self.vecnorm = pickle.load(f)
            self.vecnorm.training = False
        p = self.path
        if p.parent.name == "checkpoints":  # a snapshot: its run, and which snapshot
            self.name = f"{self.algo} {p.parent.parent.name} ({p.stem})"
        else:
            run = p.parent.name if p.stem in ("best_model", "final_model") else p.stem
            self.name = f"{self.algo} {run}" + ("" if p.stem == "best_model" else f" ({p.stem})")
        self.stochastic = bool(stochastic)
        if self.stochastic:
            self.name += " stochastic"
        self.reset()
        self.facts = facts
        self.action_repeat = int(meta.get("action_repeat", 1))
        self._held, self._age = None, 0
        if facts is not None:
            n = (len(facts.ring_sizes) * len(facts.intervals_ms),) if facts.flatten else (len(facts.ring_sizes),
                                                                                           len(facts.intervals_ms))
            space = self.model.action_space
            got = (int(space.n),) if hasattr(space, "n") else tuple(int(x) for x in space.nvec)
            if got != n:
                raise ValueError(f"model {self.path}: its action space {space} does not match the environment's "
                                 f"grids ({len(facts.ring_sizes)} ring sizes x {len(facts.intervals_ms)} intervals)")

    def reset(self, seed=None):
        """A new episode: no action held; a stochastic policy's generators seeded from ``seed``
        (None: fresh entropy)."""
        self._held, self._age = None, 0
        if self.stochastic:
            self._seed(seed)

    def _seed(self, seed) -> None:
        import torch

        seq = np.random.SeedSequence(None if seed is None else [int(seed), _STOCHASTIC_STREAM])
        self._rng = np.random.default_rng(seq)
        self._torch_gen = torch.Generator().manual_seed(int(seq.generate_state(1, np.uint64)[0] >> np.uint64(1)))

    def predict(self, observation, state=None, episode_start=None, deterministic: bool | None = None):
        """As the model's predict, on normalised observations; with ``action_repeat`` k (a model
        trained holding its actions) a new action every k calls of a single environment.
        ``deterministic`` None: the policy's own mode (deterministic unless made ``stochastic``)."""
        if deterministic is None:
            deterministic = not self.stochastic
        obs = np.asarray(observation, dtype=np.float32)
        if episode_start is not None and np.any(episode_start):
            self._held, self._age = None, 0
        if self.action_repeat > 1 and obs.ndim == 1 and self._held is not None and self._age < self.action_repeat:
            self._age += 1
            return self._held, state
        if self.vecnorm is not None:
            obs = self.vecnorm.normalize_obs(obs)
        if deterministic:
            action, state = self.model.predict(obs, state=state, episode_start=episode_start, deterministic=True)
        else:
            action = self._sample(obs)
        if self.action_repeat > 1 and obs.ndim == 1:
            self._held, self._age = action, 1
        return action, state

    def _sample(self, obs: np.ndarray) -> np.ndarray:
        """A stochastic action for (normalised) ``obs``, one observation or a batch, shaped as the
        model's predict returns it: DQN epsilon-greedy at ``exploration_final_eps`` (a uniformly drawn
        action with that probability, else the greedy one); PPO and A2C a draw from each action
        head's categorical distribution."""
        import torch

        if self._rng is None:  # (predict(deterministic=False) asked of a deterministic policy)
            self._seed(None)
        space = self.model.action_space
        if self.algo == "dqn":
            greedy, _ = self.model.predict(obs, deterministic=True)
            eps = float(self.model.exploration_final_eps)
            batch = np.atleast_1d(greedy).reshape(-1)
            explore = self._rng.random(len(batch)) < eps
            drawn = self._rng.integers(int(space.n), size=len(batch))
            return np.where(explore, drawn, batch).astype(greedy.dtype).reshape(np.shape(greedy))
        obs_t, vectorized = self.model.policy.obs_to_tensor(obs)
        with torch.no_grad():
            dist = self.model.policy.get_distribution(obs_t).distribution
        heads = dist if isinstance(dist, list) else [dist]
        cols = [torch.multinomial(h.probs, 1, generator=self._torch_gen)[:, 0] for h in heads]
        action = torch.stack(cols, dim=1).numpy().reshape((-1, *space.shape))
        return action if vectorized else action.squeeze(axis=0)

    def act(self, obs):
        return self.predict(obs)[0]


def load_policy(spec: str, facts: EnvFacts, stochastic: bool = False) -> Policy:
    """The policy of ``spec``: a heuristic, or a trained model (``stochastic``: sampling its
    actions, :class:`ModelPolicy`; a heuristic acts as it always does)."""
    if is_heuristic(spec):
        return make_heuristic(spec, facts)
    return ModelPolicy(spec, facts, stochastic=stochastic)


def policy_env_id(spec: str, default: str) -> str:
    """The env id a policy must run on: a model's training env (DQN: the Discrete id)."""
    if is_heuristic(spec):
        return default
    model = find_model(spec)
    meta = model_meta(model)
    if "env_id" in meta:
        return meta["env_id"]
    if model_algo(model, meta) == "dqn" and "Discrete" not in default:  # (a model without a record)
        return default.replace("-v", "Discrete-v")
    return default


# ---------------------------------------------------------------------------------- episodes
METRICS = ["reward", "downtime_s", "total_s", "exit_stall_s", "vcpu_fault_s", "vcpu_throttle_s", "vmm_cpu_s",
           "full_exits"]
EPISODE_FIELDS = ["policy", "spec", "workload", "seed", "reward", "steps", "downtime_s", "total_s", "converged",
                  "exit_stall_s", "vcpu_exit_s", "vcpu_stall_s", "vcpu_fault_s", "vcpu_throttle_s", "vmm_cpu_s",
                  "full_exits", "harvests", "resets", "entries_harvested", "iterations", "ring_entries",
                  "mean_interval_ms", "ring_size_changes_ignored", "r_vcpu", "r_vmm", "r_memory", "r_time",
                  "r_downtime", "r_truncation", "r_cancel", "truncated", "truncation_downtime_s", "cancelled",
                  "cancel_downtime_s", "collector", "verified",
                  "lost_writes", "ring_overflows", "wedged_vcpus", "wall_s"]


def run_episode(env, policy: Policy, seed: int, workload: str | None = None, trace: bool = False) -> dict:
    """One episode of ``policy``; the record of EPISODE_FIELDS (and with ``trace`` the per-step
    ring fill, harvests, exits, interval and reward under ``"trace"``)."""
    t0 = time.perf_counter()
    obs, info = env.reset(seed=seed, options={"workload": workload} if workload else None)
    policy.reset(seed)
    total, steps, parts, intervals, ignored = 0.0, 0, {}, [], 0
    steps_trace = []
    prev_h, prev_x = 0, 0
    state, start = None, np.ones((1,), dtype=bool)
    while True:
        action, state = policy.predict(obs, state=state, episode_start=start)  # (the policy's own mode)
        start = np.zeros((1,), dtype=bool)
        obs, r, term, trunc, info = env.step(action)
        total += r
        steps += 1
        for k, v in info["reward_parts"].items():
            parts[k] = parts.get(k, 0.0) + v
        intervals.append(info["interval_ms"])
        ignored += bool(info.get("ring_size_ignored"))
        if trace:
            steps_trace.append({"t": info["time_s"], "fill": list(info["ring_fill"]),
                                "harvests": info["harvests"] - prev_h,
                                "full_exits": info["full_exits"] - prev_x, "interval_ms": info["interval_ms"],
                                "reward": r, "phase": info["phase"], "dirty_rate_Bps": info["dirty_rate_Bps"]})
            prev_h, prev_x = info["harvests"], info["full_exits"]
        if term or trunc:
            break
    if not env.unwrapped.episode_over:  # a wrapper (a model's training env_wrapper) ended it first
        raise ValueError(f"policy {policy.name}: a wrapper of its environment ended an episode after {steps} steps, "
                         f"before the environment did ({info['phase']} at {info['time_s']:g} s); its episodes "
                         "would not be the other policies' (a model's env_wrapper is in its args.json)")
    rec = {
        "policy": policy.name, "workload": info["workload"], "seed": seed, "reward": total, "steps": steps,
        "downtime_s": info["downtime_s"], "total_s": info["total_s"], "converged": info["converged"],
        "exit_stall_s": info["vcpu_exit_s"] + info["vcpu_stall_s"],
        **{k: info[k] for k in ("vcpu_exit_s", "vcpu_stall_s", "vcpu_fault_s", "vcpu_throttle_s", "vmm_cpu_s",
                                "full_exits", "harvests", "resets", "entries_harvested", "iterations",
                                "collector", "verified", "lost_writes", "ring_overflows", "wedged_vcpus")},
        "ring_entries": info["ring_entries"], "mean_interval_ms": float(np.mean(intervals)),
        "ring_size_changes_ignored": ignored,
        **{f"r_{k}": 0.0 - parts.get(k, 0.0) for k in ("vcpu", "vmm", "memory", "time", "downtime", "truncation",
                                                                  "cancel")},
        "truncated": bool(trunc), "truncation_downtime_s": info["truncation_downtime_s"],
        "cancelled": info["cancelled"], "cancel_downtime_s": info["cancel_downtime_s"],
        "wall_s": time.perf_counter() - t0,
    }
    if trace:
        rec["trace"] = steps_trace
    return rec


# per-process caches: for each (policy spec, evaluation settings) its environment and loaded policy
_ENVS: dict = {}
_POLICIES: dict = {}


def _worker_init():
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


#: env settings a trained model brings to its evaluation: its action grids (:func:`model_grids`; an
#: evaluation's --set of the grids changes the heuristics' only; everything else, the
#: scenario and the reward, is the evaluation's: every policy of a table runs the same episodes, so
#: that the paired differences mean something; :func:`trained_settings_differences` says where a
#: model's training settings differ)
MODEL_ENV_KEYS = ("ring_sizes", "intervals_ms")
#: scenario fields the environment leaves aside (ringenv.env.NOT_KEYWORDS) and its ``env`` section
#: (compared as the env settings it gives)
_IGNORED_SCENARIO_FIELDS = frozenset(NOT_KEYWORDS) | {"env"}
#: env settings of training only: a randomised workload intensity (``rate_scale_range``) is how a
#: policy is trained, not a difference from the workloads it is judged on (as written)
_TRAINING_ONLY_SETTINGS = ("rate_scale_range",)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _spec_meta(spec: str) -> dict:
    """The training record (args.json and the model's own) of model ``spec``; {} for a heuristic
    or a model without one."""
    return {} if is_heuristic(spec) else model_meta(find_model(spec))


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def trained_settings_differences(spec: str, env_id: str = MIGRATION, scenario: str = "default",
                                 overrides: dict | None = None) -> list[str]:
    """The env settings (scenario fields and env settings, as the environments take them) of the
    model ``spec``'s training that differ from the evaluation's (``scenario`` with ``overrides``),
    each as ``"KEY TRAINED (evaluated: VALUE)"``; [] for a heuristic or a model without args.json.
    The action grids are not compared: a model brings its own (MODEL_ENV_KEYS)."""
    meta = _spec_meta(spec)
    if not meta:
        return []
    try:
        trained = make_env(policy_env_id(spec, env_id), meta.get("scenario") or "default", "all", None,
                           meta.get("env_kwargs") or {})
    except ValueError as e:  # ConfigError: a scenario file moved, a setting this version refuses
        return [f"its training settings cannot be loaded ({str(e).splitlines()[0]})"]
    evaluated = policy_env(spec, env_id, scenario, "all", None, overrides)  # the env the model runs in
    sides = []
    for env in (trained, evaluated):
        u = env.unwrapped
        sc = {k: v for k, v in u.scenario.model_dump().items() if k not in _IGNORED_SCENARIO_FIELDS}
        cfg = {k: v for k, v in u.cfg.model_dump().items() if k not in MODEL_ENV_KEYS + _TRAINING_ONLY_SETTINGS}
        cfg["reward"].pop("truncation", None)  # how the evaluation scores a truncation: not a setting the model saw
        sides.append({**_flat(sc), **_flat(cfg)})
        env.close()
    a, b = sides
    return [f"{k} {_fmt(a.get(k))} (evaluated: {_fmt(b.get(k))})" for k in dict.fromkeys([*a, *b])
            if a.get(k) != b.get(k)]


def trained_workloads(spec: str, env_id: str = MIGRATION) -> list[str]:
    """The workloads model ``spec`` was trained on (its run's explicit workloads, else its split of
    its workload set); [] for a heuristic, a model without a record, or settings that no longer load."""
    meta = _spec_meta(spec)
    if not meta:
        return []
    try:
        env = make_env(policy_env_id(spec, env_id), meta.get("scenario") or "default", meta.get("split") or "train",
                       meta.get("workloads") or None, meta.get("env_kwargs") or {})
    except ValueError:  # (said by trained_settings_differences)
        return []
    try:
        return list(env.unwrapped.workloads)
    finally:
        env.close()


def model_grids(spec: str, env_id: str = MIGRATION, scenario: str = "default", overrides: dict | None = None) -> dict:
    """The action grids model ``spec`` was trained on (what its actions mean), as env settings
    ``{ring_sizes, intervals_ms}``: those its record carries (``action_grids``: ``ringenv train``
    records the env's); for a model trained before runs recorded them, the grids of its training
    settings (its recorded scenario and env_kwargs; if these no longer load, the grids among its
    env_kwargs); for a model without a record, those of the evaluation's settings (``scenario``,
    ``overrides``) without their grid overrides. Never the evaluation's ``--set`` of the grids:
    that changes the heuristics' grids only."""
    meta = model_meta(find_model(spec))
    grids = meta.get("action_grids")
    if isinstance(grids, dict) and all(isinstance(grids.get(k), list) for k in MODEL_ENV_KEYS):
        return {k: list(grids[k]) for k in MODEL_ENV_KEYS}
    if meta:
        scenario, kw = meta.get("scenario") or "default", meta.get("env_kwargs") or {}
    else:
        kw = {k: v for k, v in (overrides or {}).items() if k not in MODEL_ENV_KEYS}
    try:
        env = make_env(policy_env_id(spec, env_id), scenario, "all", None, kw)
    except ValueError:  # (settings this version refuses: trained_settings_differences says so)
        return {k: v for k, v in (meta.get("env_kwargs") or {}).items() if k in MODEL_ENV_KEYS}
    try:
        return {"ring_sizes": list(env.unwrapped.ring_sizes), "intervals_ms": list(env.unwrapped.intervals_ms)}
    finally:
        env.close()


def policy_env(spec: str, env_id: str = MIGRATION, scenario: str = "default", split: str = "test",
               workloads=None, overrides: dict | None = None):
    """The environment policy ``spec`` runs in: the evaluation's settings, plus what the policy
    needs (the bitmap baseline's collector; a model's env id, its action grids (:func:`model_grids`)
    and its training wrappers)."""
    kw, wrapper, where = {}, None, ""
    if is_heuristic(spec):
        kw = heuristic_env_kwargs(spec)
    else:
        model = find_model(spec)
        meta = model_meta(model)
        wrapper = meta.get("env_wrapper")
        where = f"{spec}: env_wrapper (the training run's args.json)"
        # the action grids the model was trained on (its action space); the rest is the evaluation's
        kw = model_grids(spec, env_id, scenario, overrides)
    env = make_env(policy_env_id(spec, env_id), scenario, split, list(workloads or []) or None,
                   {**(overrides or {}), **kw})
    return wrap_env(env, wrapper, where=where) if wrapper else env


def _model_digest(spec: str) -> str | None:
    """A digest of a model spec's files (the model, its VecNormalize statistics, the run's
    args.json): a retrained run in the same directory is another policy (None: a heuristic)."""
    if is_heuristic(spec):
        return None
    model = find_model(spec)
    h = hashlib.sha1()
    for f in (model, model.with_name(model.stem + "_vecnormalize.pkl"), *run_record_files(model)):
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


def _get(spec: str, env_id: str, scenario: str, split: str, workloads: tuple, overrides_json: str,
         stochastic: bool = False):
    key = (spec, _model_digest(spec), env_id, scenario, split, workloads, overrides_json, stochastic)
    if key not in _POLICIES:
        for old in [k for k in _POLICIES if k[0] == spec and k[1] != key[1]]:  # an earlier model of that run
            _ENVS.pop(old).close()
            del _POLICIES[old]
        env = policy_env(spec, env_id, scenario, split, workloads, json.loads(overrides_json))
        _ENVS[key] = env
        _POLICIES[key] = load_policy(spec, EnvFacts.from_env(env), stochastic)
    return _ENVS[key], _POLICIES[key]


def _job(spec, env_id, scenario, split, workloads, overrides_json, stochastic, workload, seed, trace=False):
    env, policy = _get(spec, env_id, scenario, split, workloads, overrides_json, stochastic)
    rec = run_episode(env, policy, seed, workload, trace=trace)
    rec["spec"] = spec
    return rec


def check_spec(spec: str, facts: EnvFacts) -> str | None:
    """A clear error for a policy spec that is neither a heuristic nor a saved model, a
    heuristic naming a ring size or interval that is not on the action grid of ``facts`` (the
    evaluation environment's): it would run the nearest action under the requested label, or a
    model that would not run as trained (:func:`check_model`, whose warning is returned)."""
    if is_heuristic(spec):
        try:
            make_heuristic(spec, facts)
        except ValueError as e:  # ("policy SPEC: ...": named by the flag that gave it)
            raise ValueError(re.sub(r"^policy ", "--policies ", str(e))) from None
        return None
    try:
        find_model(spec)
    except FileNotFoundError as e:
        raise ValueError(f"--policies {spec!r}: not a heuristic ({SPECS}) and not a trained model ({e})") from None
    try:
        return check_model(spec)
    except ValueError as e:  # (a file that is no model: named by the spec that gave it)
        if str(e).startswith("--policies"):
            raise
        raise ValueError(f"--policies {spec!r}: {e}") from None


def check_same_task(spec: str, env_id: str, flag: str = "--policies") -> None:
    """A ValueError naming ``flag`` (where the spec was given) for a model trained on another
    task than the evaluation's ``env_id`` (checkpointing for a migration evaluation)."""
    trained_on = policy_env_id(spec, env_id)
    if trained_on.replace("Discrete", "") != env_id.replace("Discrete", ""):
        raise ValueError(f"{flag} {spec!r}: a model trained on {trained_on}, evaluated on {env_id} (--env-id) "
                         f"episodes: not the same task; evaluate it with --env-id {trained_on.replace('Discrete', '')}")


def unavailable(spec: str, env_id: str, scenario: str, split: str, workloads, overrides: dict) -> str | None:
    """Why the environment cannot run policy ``spec`` (None if it can): a heuristic needing an
    environment option (the bitmap collector) is tried for one step, and must get what it asked."""
    kw = heuristic_env_kwargs(spec) if is_heuristic(spec) else {}
    if not kw:
        return None
    try:  # (the evaluation's own environment was made: an error here comes from what the policy adds)
        env = policy_env(spec, env_id, scenario, split, workloads, overrides)
    except ValueError as e:
        return f"gymnasium.make(..., {', '.join(f'{k}={v!r}' for k, v in kw.items())}) is refused here ({e})"
    try:
        env.reset(seed=0)
        _, _, _, _, info = env.step(env.unwrapped.encode_action(4096, 1000))
    finally:
        env.close()
    if "collector" in kw and info.get("collector") != kw["collector"]:
        return (f"gymnasium.make(..., collector={kw['collector']!r}) ran the {info.get('collector')} collector "
                f"(the environment does not offer it)")
    return None


#: the usage error of an evaluation without policies
NO_POLICIES = (f"--policies: none given; expected one or more heuristic specs ({SPECS}) or trained models (a run "
               "directory or a .zip)")


def check_baseline(baseline: str, policies: list[str]) -> None:
    """--baseline must name one of the policies evaluated; the default (qemu) may be absent, and
    then the table has no Δ column."""
    if baseline not in policies and baseline != EvalSettings.baseline:
        raise ValueError(f"--baseline {baseline!r}: not among the policies evaluated ({', '.join(policies)})")


def scenario_label(scenario: str, set_items) -> str:
    """How a report names the episodes' scenario: with the ``--set`` overrides they ran with."""
    return f"{scenario} with --set {' '.join(set_items)}" if set_items else scenario


def workloads_label(split: str, workloads) -> str:
    """How a report names the episodes' workloads: the split, or "explicit workloads" when they
    were listed (--workloads; the split is then not used)."""
    return "explicit workloads" if workloads else f"split {split}"


def actions_label(stochastic: bool) -> str:
    """How a report says that the trained models sampled their actions (nothing if they did not)."""
    return "; trained models' actions sampled (--stochastic)" if stochastic else ""


def scoring_overrides(env_id: str, scenario: str, overrides: dict) -> dict:
    """``overrides`` with a truncated episode charged the downtime a switchover then would cause,
    at the downtime weight in force (``reward.truncation``), unless they set that weight: the
    environment charges nothing by default, for learners that bootstrap at a truncation, but an
    evaluation scores policies by their episodes' returns, with nothing to bootstrap from, and
    a policy that leaves more undone at the time cap must not score better for it."""
    reward = overrides.get("reward")
    if isinstance(reward, dict) and "truncation" in reward:
        return overrides
    env = make_env(env_id, scenario, "all", None, overrides)
    try:
        weight = env.unwrapped.cfg.reward.downtime
    finally:
        env.close()
    return {**overrides, "reward": {**(reward if isinstance(reward, dict) else {}), "truncation": weight}}


def evaluation_env(env_id: str, scenario: str, split: str, workloads: list[str] | None,
                   overrides: dict) -> tuple[list[str], EnvFacts]:
    """The workloads the episodes run (the explicit ones, else the split's) and the facts of the
    evaluation environment (its action grids: what heuristic specs are checked against)."""
    env = make_env(env_id, scenario, split, list(workloads or []) or None, overrides)
    try:
        return list(workloads or env.unwrapped.workloads), EnvFacts.from_env(env)
    finally:
        env.close()


#: the most worker processes an evaluation takes (as train's n_envs); no more start than episodes
MAX_WORKERS = 256


def evaluate(policies: list[str], env_id: str = MIGRATION, scenario: str = "default", split: str = "test",
             workloads: list[str] | None = None, seeds: int = 5, seed0: int = 1000, overrides: dict | None = None,
             workers: int = 2, progress: bool = True, desc: str = "episodes", stochastic: bool = False) -> list[dict]:
    """Run every policy on every (workload, seed); the episode records, in a stable order.
    ``stochastic``: trained models sample their actions (:class:`ModelPolicy`).
    Policies whose environment cannot provide them (the bitmap baseline on an env that forces
    the ring) are dropped with a note on stderr. A heuristic spec naming a ring size or interval
    off the environment's action grid is a ValueError before any episode runs."""
    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: expected an integer >= 1 (episodes per workload)")
    if seed0 < 0:
        raise ValueError(f"--seed0 {seed0}: expected an integer >= 0 (Gymnasium's reset takes seeds >= 0)")
    if not 1 <= workers <= MAX_WORKERS:  # (each worker process imports torch: ~300 MB)
        raise ValueError(f"--workers {workers}: expected an integer from 1 to {MAX_WORKERS} (1: every episode in "
                         "this process)")
    check_env_id(env_id)
    for flag, names in (("--workloads", workloads or []), ("--policies", policies)):
        twice = sorted({n for n in names if list(names).count(n) > 1})
        if twice:  # each would count its episodes twice (n doubled, the intervals too narrow)
            raise ValueError(f"{flag}: {', '.join(map(repr, twice))} given more than once")
    overrides = overrides or {}
    try:
        wls, facts = evaluation_env(env_id, scenario, split, workloads, overrides)
    except ConfigError as e:  # named by the flag that gave the bad value
        raise flag_config_error(e, overrides, workloads) from None
    overrides = scoring_overrides(env_id, scenario, overrides)
    warnings = {spec: check_spec(spec, facts) for spec in policies}  # every spec checked before anything runs
    for spec in policies:
        meta = _spec_meta(spec)
        check_same_task(spec, env_id)
        if warnings[spec]:
            print(f"warning: {warnings[spec]}", file=sys.stderr)
        if meta.get("interrupted"):
            print(f"warning: model {spec} comes from a training run that was interrupted (Ctrl-C): it had "
                  "less than its budget", file=sys.stderr)
        elif meta.get("failed") or not meta.get("finished", True):  # (a record without the key: finished)
            print(f"warning: model {spec} comes from a training run that did not finish "
                  f"({meta.get('failed') or 'no final record: still running, or killed'}): it had less than its "
                  "budget", file=sys.stderr)
        trained = trained_workloads(spec, env_id)
        seen = [w for w in wls if w in trained]
        if seen:
            how = f"--workloads {' '.join(meta['workloads'])}" if meta.get("workloads") else \
                f"split {meta.get('split')}"
            print(f"warning: model {spec} was trained on workloads it is evaluated on: {', '.join(seen)} (its "
                  f"training: {how}); its results there are not held-out ones (train on --split train, evaluate on "
                  "--split test)", file=sys.stderr)
        diff = trained_settings_differences(spec, env_id, scenario, overrides)
        if diff:
            print(f"warning: model {spec} was trained with other env settings than this evaluation's: "
                  f"{', '.join(diff)}; it runs with the evaluation's, as every policy here does (a model brings only "
                  "its action grids; --scenario and --set give it its own)", file=sys.stderr)
    available = []
    for spec in policies:
        why = unavailable(spec, env_id, scenario, split, workloads, overrides)
        if why:
            print(f"note: policy {spec!r} left out: {why}", file=sys.stderr)
        else:
            available.append(spec)
    if not available:  # (a usage error: nothing would be evaluated, the tables and CSV files empty)
        raise ValueError(f"--policies: every policy given ({', '.join(policies)}) was left out (see the notes above); "
                         "nothing to evaluate: give one this environment can run")
    policies = available
    ov = json.dumps(overrides, sort_keys=True)
    if stochastic and all(is_heuristic(spec) for spec in policies):
        print("note: --stochastic: no trained model among the policies; the heuristics act as they always do",
              file=sys.stderr)
    jobs = [(spec, env_id, scenario, split, tuple(workloads or ()), ov, bool(stochastic), w, seed0 + k)
            for spec in policies for w in wls for k in range(seeds)]
    records = []
    bar = _bar(len(jobs), desc, progress)
    if workers <= 1:
        _worker_init()
        for j in jobs:
            records.append(_job(*j))
            bar.update(1)
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), initializer=_worker_init,
                                 mp_context=_mp_context()) as ex:
            futs = [ex.submit(_job, *j) for j in jobs]
            try:
                for f in as_completed(futs):
                    records.append(f.result())
                    bar.update(1)
            except BaseException:  # Ctrl-C or a failed episode: the episodes not started yet are not run
                for f in futs:
                    f.cancel()
                raise
    bar.close()
    order = {(j[0], j[7], j[8]): i for i, j in enumerate(jobs)}
    records.sort(key=lambda r: order[(r["spec"], r["workload"], r["seed"])])
    specs_of = {}
    for r in records:
        specs_of.setdefault(r["policy"], set()).add(r["spec"])
    for r in records:  # two specs, one label (runs of the same name in two directories): say which is which
        if len(specs_of[r["policy"]]) > 1:
            r["policy"] = f"{r['policy']} [{r['spec']}]"
    for spec in policies:  # DESIGN: a lost write is reported loudly, never hidden
        lossy = [r for r in records if r["spec"] == spec and _lost(r)]
        if lossy:
            n = sum(r["spec"] == spec for r in records)
            print(f"LOST WRITES: policy {spec!r}: {len(lossy)} of {n} episodes lost writes "
                  f"({sum(r['lost_writes'] for r in lossy)} pages; workloads "
                  f"{', '.join(sorted({r['workload'] for r in lossy}))}): their destination differs from the source "
                  "(episodes.csv: verified, lost_writes)", file=sys.stderr)
        over = [r for r in records if r["spec"] == spec and r.get("ring_overflows")]
        if over:
            n = sum(r["spec"] == spec for r in records)
            print(f"RING OVERFLOW: policy {spec!r}: in {len(over)} of {n} episodes the kernel overwrote entries of "
                  f"a full ring ({sum(r['ring_overflows'] for r in over)} entries, its WARN; "
                  f"{sum(r['wedged_vcpus'] for r in over)} vCPUs wedged: the guest hung; workloads "
                  f"{', '.join(sorted({r['workload'] for r in over}))}): one write dirtied more pages than the "
                  "reserved entries hold, as a stage-2 block written with splitting off does "
                  "(episodes.csv: ring_overflows, wedged_vcpus)", file=sys.stderr)
    return records


def unsound(records: list[dict]) -> bool:
    """Whether any episode lost writes or overflowed a ring (the commands then exit 1, as
    ``ringenv migrate`` does)."""
    return any(_lost(r) or r.get("ring_overflows") for r in records)


def _lost(rec: dict) -> bool:
    """The episode's destination differs from its source (a record without the fields: no)."""
    return bool(rec.get("lost_writes")) or rec.get("verified") is False


def _mp_context():
    import multiprocessing as mp

    return mp.get_context("forkserver" if sys.platform.startswith("linux") else "spawn")


def _bar(total: int, desc: str, enabled: bool):
    """A progress bar on stderr when ``enabled`` and stderr is a terminal (none in a pipe or a log)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ep", disable=None if enabled else True, dynamic_ncols=True,
                file=sys.stderr)


# ---------------------------------------------------------------------------------- statistics
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    """Student's t 0.975 quantile with ``df`` degrees of freedom: the usual 3-decimal table to df 30
    (within 5e-4 of the exact quantile), beyond it the Cornish-Fisher expansion around the normal
    quantile (error below 1e-5 there). A fractional ``df`` is rounded down (conservative)."""
    df = int(df)
    if df <= len(_T975):
        return _T975[df - 1]
    z, v = 1.959963984540054, float(df)
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
            + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * v**4))


def mean_ci(x) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval (nan for fewer than two values)."""
    x = np.asarray(x, dtype=float)
    if len(x) == 0:
        return math.nan, math.nan
    m = float(x.mean())
    if len(x) < 2:
        return m, math.nan
    return m, float(t975(len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def stratified_ci(groups: list) -> tuple[float, float]:
    """Mean over ``groups`` (one array per workload, its seeds' values) of their means, and the
    95% half-width with the groups held fixed: variance sum(s_g^2 / n_g) / G^2, t quantile at the
    Welch-Satterthwaite degrees of freedom. nan if a group has fewer than two values; a half-width
    0 when every group is constant."""
    groups = [np.asarray(g, dtype=float) for g in groups]
    if not groups or any(len(g) == 0 for g in groups):
        return math.nan, math.nan
    m = float(np.mean([g.mean() for g in groups]))
    if any(len(g) < 2 for g in groups):
        return m, math.nan
    a = np.array([g.var(ddof=1) / len(g) for g in groups])
    if a.sum() == 0:
        return m, 0.0
    df = a.sum() ** 2 / float(sum(x * x / (len(g) - 1) for x, g in zip(a, groups)))
    return m, float(t975(max(1, math.floor(df))) * math.sqrt(a.sum()) / len(groups))


def _by_workload(pairs) -> list[list[float]]:
    """The values of (workload, value) pairs, grouped by workload (first-seen order)."""
    out: dict[str, list[float]] = {}
    for w, v in pairs:
        out.setdefault(w, []).append(v)
    return list(out.values())


def summarize(records: list[dict], baseline: str | None = "qemu") -> list[dict]:
    """Per policy (in first-seen order): n, mean and 95% half-width of METRICS, share converged,
    the episodes that lost writes, overflowed a ring, were truncated or cancelled, and the paired
    reward difference to ``baseline`` over the episodes both ran; the reward's and the
    difference's intervals with the workloads held fixed too (``*_ci_within``)."""
    specs = list(dict.fromkeys(r["spec"] for r in records))
    base = {(r["workload"], r["seed"]): r["reward"] for r in records if r["spec"] == baseline}
    rows = []
    for spec in specs:
        rs = [r for r in records if r["spec"] == spec]
        row = {"policy": rs[0]["policy"], "spec": spec, "n": len(rs)}
        for k in METRICS:
            row[k], row[k + "_ci"] = mean_ci([r[k] for r in rs])
        # vCPU time lost in all (exits, stalls, faults, throttle sleeps), its interval from the
        # per-episode sums (the parts are correlated)
        row["lost_s"], row["lost_s_ci"] = mean_ci([r["exit_stall_s"] + r["vcpu_fault_s"] + r["vcpu_throttle_s"]
                                                   for r in rs])
        row["converged"] = float(np.mean([bool(r["converged"]) for r in rs]))
        row["lost_write_episodes"] = sum(_lost(r) for r in rs)
        row["ring_overflow_episodes"] = sum(bool(r.get("ring_overflows")) for r in rs)
        row["truncated_episodes"] = sum(bool(r.get("truncated")) for r in rs)
        row["cancelled_episodes"] = sum(bool(r.get("cancelled")) for r in rs)
        paired = [(r["workload"], r["reward"] - base[(r["workload"], r["seed"])]) for r in rs
                  if (r["workload"], r["seed"]) in base]
        diffs = [d for _, d in paired]
        row["d_reward"], row["d_reward_ci"] = mean_ci(diffs) if diffs else (math.nan, math.nan)
        row["reward_ci_within"] = stratified_ci(_by_workload((r["workload"], r["reward"]) for r in rs))[1]
        row["d_reward_ci_within"] = stratified_ci(_by_workload(paired))[1] if diffs else math.nan
        row["ring_entries"] = _mode([r["ring_entries"] for r in rs])
        row["mean_interval_ms"] = float(np.mean([r["mean_interval_ms"] for r in rs]))
        rows.append(row)
    return rows


def per_workload(records: list[dict]) -> list[dict]:
    """Mean reward per (policy, workload)."""
    out = {}
    for r in records:
        out.setdefault((r["spec"], r["policy"]), {}).setdefault(r["workload"], []).append(r["reward"])
    return [{"policy": p, "spec": s, **{w: float(np.mean(v)) for w, v in d.items()}} for (s, p), d in out.items()]


def _mode(xs):
    """The most frequent value (a tie: the smallest of them)."""
    vals, counts = np.unique(np.asarray(xs), return_counts=True)
    return int(vals[np.argmax(counts)])


def _pm(m, h, fmt):
    if math.isnan(m):
        return "-"
    return f"{m:{fmt}} ± {h:{fmt.lstrip('+')}}" if not math.isnan(h) else f"{m:{fmt}}"


def markdown_table(rows: list[dict], baseline: str | None = "qemu") -> str:
    """The comparison table: mean ± 95% half-width per policy, best reward first. The episodes that
    lost writes, overflowed a ring, were truncated or cancelled each get a column when there are any."""
    has_base = any(r["spec"] == baseline for r in rows)
    counted = [(k, title) for k, title in (("lost_write_episodes", "LOST WRITES (episodes)"),
                                           ("ring_overflow_episodes", "RING OVERFLOWS (episodes)"),
                                           ("truncated_episodes", "truncated (episodes)"),
                                           ("cancelled_episodes", "cancelled (episodes)"))
               if any(r.get(k) for r in rows)]
    head = ["policy", "reward", f"Δ reward vs {baseline}" if has_base else None, "downtime s", "total s",
            "exit+stall s", "fault s", "VMM CPU s", "full exits", "ring", "interval ms", "n",
            *(title for _, title in counted)]
    head = [h for h in head if h]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    for r in sorted(rows, key=lambda r: -r["reward"]):
        cells = [r["policy"], _pm(r["reward"], r["reward_ci"], ".3f")]
        if has_base:
            cells.append(_pm(r["d_reward"], r["d_reward_ci"], "+.3f"))
        cells += [_pm(r["downtime_s"], r["downtime_s_ci"], ".3f"), _pm(r["total_s"], r["total_s_ci"], ".1f"),
                  _pm(r["exit_stall_s"], r["exit_stall_s_ci"], ".3f"),
                  _pm(r["vcpu_fault_s"], r["vcpu_fault_s_ci"], ".2f"),
                  _pm(r["vmm_cpu_s"], r["vmm_cpu_s_ci"], ".3f"), _pm(r["full_exits"], r["full_exits_ci"], ".0f"),
                  str(r["ring_entries"] or "-"),  # the bitmap collector: no ring, no reaper interval
                  f"{r['mean_interval_ms']:.0f}" if r["ring_entries"] and r["mean_interval_ms"] else "-", str(r["n"])]
        cells += [str(r.get(k, 0)) for k, _ in counted]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_per_workload(records: list[dict]) -> str:
    rows = per_workload(records)
    wls = list(dict.fromkeys(r["workload"] for r in records))
    lines = ["| policy | " + " | ".join(wls) + " |", "|---|" + "---:|" * len(wls)]
    for r in rows:
        lines.append(f"| {r['policy']} | " + " | ".join(f"{r[w]:.3f}" if w in r else "-" for w in wls) + " |")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict], fields: list[str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = fields or list(dict.fromkeys(k for r in rows for k in r if k != "trace"))
    f = io.StringIO(newline="")
    w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items() if k in fields})
    write_atomically(path, f.getvalue())


#: what evaluate and compare write into their --out directory
RESULT_FILES = ("episodes.csv", "summary.csv", "meta.json", "per_workload.csv", "table.md", "pareto.png",
                "timeline.png")


def write_results(out: str | Path, records: list[dict], rows: list[dict], meta: dict, also: tuple = ()) -> Path:
    """episodes.csv, summary.csv and meta.json into ``out``; the caller writes ``also`` next to
    them. An earlier run's result files that this one does not write are removed (saying so), so
    that a directory never mixes two runs' results; without a meta.json beside them they are no
    run's and are left alone (saying so). Each file is written whole or not at all. meta.json
    gains ``models``: each model spec's digest (:func:`_model_digest`: model, statistics and run
    record), so that results of a run retrained since tell which model they are of."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stale = [out / f for f in RESULT_FILES[3:] if f not in also and (out / f).is_file()]
    if stale and not (out / "meta.json").is_file():  # (every run writes meta.json: these are no run's results)
        print(f"note: {', '.join(f.name for f in stale)} in {out} left as they are: no meta.json beside them, so no "
              "earlier run's results", file=sys.stderr)
        stale = []
    for f in stale:
        f.unlink()
    if stale:
        print(f"note: removed {', '.join(f.name for f in stale)} of an earlier run in {out}", file=sys.stderr)
    write_csv(out / "episodes.csv", records, EPISODE_FIELDS)
    write_csv(out / "summary.csv", rows)
    specs = dict.fromkeys(r["spec"] for r in records)  # which model files were evaluated, by digest
    meta = {**meta, "models": {s: _model_digest(s) for s in specs if not is_heuristic(s)}}
    write_atomically(out / "meta.json", json.dumps(jsonable(meta), indent=1))
    return out


def main(args: Args) -> int:
    t0 = time.perf_counter()
    overrides = parse_overrides(args.set)
    check_out_dir(args.out)
    if not args.policies:
        raise ValueError(NO_POLICIES)
    check_baseline(args.baseline, args.policies)
    records = evaluate(args.policies, args.env_id, args.scenario, args.split, args.workloads, args.seeds,
                       args.seed0, overrides, args.workers, args.progress, stochastic=args.stochastic)
    rows = summarize(records, args.baseline)
    out = write_results(args.out, records, rows, {"args": dataclasses.asdict(args), "wall_s": time.perf_counter() - t0})
    wls = sorted({r["workload"] for r in records})
    print(f"\n{scenario_label(args.scenario, args.set)}, {workloads_label(args.split, args.workloads)} "
          f"({', '.join(wls)}), {args.seeds} seed(s) "
          "each; mean ± 95% "
          f"interval; reward per episode (higher is better){actions_label(args.stochastic)}\n")
    print(markdown_table(rows, args.baseline))
    print("\nmean reward per workload:\n")
    print(markdown_per_workload(records))
    print(f"\nwrote {out / 'episodes.csv'}, {out / 'summary.csv'}, {out / 'meta.json'} "
          f"({time.perf_counter() - t0:.0f} s)")
    return 1 if unsound(records) else 0


if __name__ == "__main__":
    module_main(main, Args, "agents.evaluate")
