"""What the agents' programs share: making the environments from a few strings, the facts a
scripted policy needs about an environment, RL Zoo-style hyperparameter files, and dataclass
arguments turned into command-line flags (the docstring under each field is its --help)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import gymnasium as gym

import ringenv  # noqa: F401  (registers the ringenv/ environments)
from ringenv.config import CONFIG_DIR, parse_yaml, read_text, write_atomically
from ringenv.env import nearest_choices

MIGRATION = "ringenv/Migration-v0"
MIGRATION_DISCRETE = "ringenv/MigrationDiscrete-v0"
ENV_IDS = [MIGRATION, MIGRATION_DISCRETE, "ringenv/Checkpoint-v0", "ringenv/CheckpointDiscrete-v0"]
#: which env id an algorithm trains on by default (DQN needs the flattened Discrete action)
DEFAULT_ENV = {"ppo": MIGRATION, "a2c": MIGRATION, "dqn": MIGRATION_DISCRETE}
TRAIN_CONFIG_DIR = CONFIG_DIR / "train"
#: the attribute of a model that ``ringenv train`` saves with it (stable-baselines3 keeps a
#: model's JSON attributes in its .zip): what loading and running it needs, so that a .zip
#: copied out of its run directory still runs as trained (agents.evaluate.model_meta)
MODEL_RECORD = "ringenv_model"
#: the keys of a run's args.json that MODEL_RECORD carries
MODEL_RECORD_KEYS = ("algo", "env_id", "scenario", "split", "workloads", "env_kwargs", "env_wrapper", "action_repeat",
                     "control_interval_ms", "policy", "normalize", "action_grids")
#: the attributes of a model saved by :func:`save_model` naming the VecNormalize statistics and the
#: replay buffer saved with it (the SHA-1 of their files), or None when it was saved without
STATS_DIGEST = "ringenv_vecnormalize_sha1"
BUFFER_DIGEST = "ringenv_replay_buffer_sha1"


def save_model(model, path: str | Path, stats=None, stats_path: str | Path | None = None,
               buffer_path: str | Path | None = None) -> None:
    """Save ``model`` to ``path`` (a .zip), ``stats`` (its VecNormalize, or None) to
    ``stats_path`` and, with ``buffer_path``, its replay buffer there (an off-policy model's:
    what resuming its training needs), each file whole or not at all: the others first, then the
    model, which records their digests (STATS_DIGEST, BUFFER_DIGEST). A model and files of two
    different saves (a run stopped between the writes leaves the new statistics beside the old
    model) are then told apart when loaded (``agents.evaluate.model_stats``,
    ``agents.train``'s ``--resume``), not used together."""
    import hashlib
    import io
    import pickle

    buffer = getattr(model, "replay_buffer", None) if buffer_path is not None else None
    for attr, obj, where in ((BUFFER_DIGEST, buffer, buffer_path),
                             (STATS_DIGEST, stats if stats_path is not None else None, stats_path)):
        digest = None
        if obj is not None:
            blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)  # (as VecNormalize.save, save_to_pkl)
            digest = hashlib.sha1(blob).hexdigest()
            write_atomically(where, blob)
        setattr(model, attr, digest)
    buf = io.BytesIO()
    model.save(buf)
    write_atomically(path, buf.getvalue())


# ---------------------------------------------------------------------------------- environments
def check_env_id(env_id: str) -> str:
    """``env_id`` if it is one of ringenv's ids, else a ValueError naming --env-id."""
    if env_id not in ENV_IDS:
        raise ValueError(f"--env-id {env_id!r}: unknown environment id; accepted: {', '.join(ENV_IDS)}")
    return env_id


def _override(item: str, flag: str) -> tuple[list[str], Any]:
    """``"vm.vcpus=2"`` -> (["vm", "vcpus"], 2): the key's parts and the value read as a YAML scalar."""
    if "=" not in item:
        example = "vm.vcpus=2" if flag == "--set" else "n_steps=256"
        raise ValueError(f"{flag} {item!r}: expected KEY=VALUE (e.g. {example})")
    key, raw = item.split("=", 1)
    return key.strip().split("."), (parse_yaml(raw, f"{flag} {item!r}") if raw else "")


def parse_overrides(items: list[str] | None, flag: str = "--set") -> dict:
    """``["vm.memory=1GiB", "vm.vcpus=2", "max_episode_s=60"]`` -> ``{"vm": {"memory": "1GiB",
    "vcpus": 2}, "max_episode_s": 60}``: values are read as YAML scalars, dots nest. ``flag``:
    the command-line flag the items came from (named in errors)."""
    out: dict = {}
    for item in items or []:
        parts, value = _override(item, flag)
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"{flag} {item!r}: {p} is both a value and a section")
        node[parts[-1]] = value
    return out


def apply_overrides(base: dict, items: list[str] | None, flag: str = "--set") -> dict:
    """A copy of ``base`` with the KEY=VALUE ``items`` applied in order: a dotted key changes one
    entry of a mapping (``vm.vcpus=2`` keeps the other keys of ``vm``), a key without dots
    replaces the whole value (``policy_kwargs={}`` clears it)."""
    import copy

    out = copy.deepcopy(dict(base))
    for item in items or []:
        parts, value = _override(item, flag)
        node = out
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return out


#: the env arguments the commands take as flags of their own, not as --set or env_kwargs entries
OWN_FLAGS = {"scenario": "--scenario", "split": "--split", "workloads": "--workloads"}


def make_env(env_id: str = MIGRATION, scenario: str = "default", split: str = "test",
             workloads: list[str] | None = None, overrides: dict | None = None, **kwargs) -> gym.Env:
    """``gymnasium.make`` of a ringenv id with a scenario, a split (or explicit workloads) and
    keyword overrides (env settings and scenario fields, see the MigrationEnv docstring; not
    the three arguments of this function's own: a ValueError naming their flags)."""
    for k, flag in OWN_FLAGS.items():
        if k in (overrides or {}):
            raise ValueError(f"{k}={overrides[k]!r}: the env's {k} is given by the command's {flag} (or the "
                             f"function's {k} argument), not by --set or a hyperparameter file's env_kwargs")
    return gym.make(env_id, scenario=scenario, split=split, workloads=workloads or None,
                    **(overrides or {}), **kwargs)


def flag_config_error(e: ValueError, overrides: dict, workloads=None) -> ValueError:
    """``e`` (an error of making an environment: ringenv's ConfigError) named by the command-line
    flag that gave the bad value: ``--scenario`` for an unknown scenario, ``--workloads``, ``--set``
    (``overrides``: the settings --set gave); else ``e`` itself."""
    # the fields named, line by line, each by its top-level key (vm.vcpus, workloads[1]: vm, workloads)
    roots = [re.split(r"[.\[]", ln.strip().split(":", 1)[0])[0] for ln in str(e).splitlines()]
    text = str(e)
    if roots[0] == "scenario" and text.startswith("scenario: "):
        return type(e)(f"scenario (--scenario): {text[len('scenario: '):]}")
    if roots[0] == "workloads" and workloads:
        return type(e)(f"--workloads: {text}")
    if roots[0] in overrides:
        # the env's list of its arguments starts with the three the commands take as flags
        own = f"accepted: {', '.join(OWN_FLAGS)}, "
        if own in text:
            text = text.replace(own, "accepted: ", 1) + (
                f" (the {', '.join(OWN_FLAGS)} are the command's {', '.join(OWN_FLAGS.values())})")
        return type(e)(f"--set {text}")
    if any(r in overrides for r in roots[1:]):
        return type(e)(f"--set: {text}")
    return e


@dataclasses.dataclass(frozen=True)
class EnvFacts:
    """What a scripted policy needs to turn rates and fills into actions. Read once from an
    environment (:meth:`from_env`) or given by hand in tests."""

    ring_sizes: tuple  #: ring entries the action offers, smallest first
    intervals_ms: tuple  #: harvest intervals the action offers, ms
    #: the rate the rate observations (dirty_rate, sampled_rate, redirty_rate) are divided by, bytes/s:
    #: the env's ``obs_rate_Bps`` (a migration's link rate, a checkpoint's storage rate)
    link_Bps: float
    page_size: int  #: bytes per ring entry's page
    vcpus: int  #: vCPUs (one ring each)
    reserved_entries: int = 64  #: ring entries KVM keeps back: soft limit = entries - this
    control_interval_ms: float = 50.0  #: simulated ms between two actions
    flatten: bool = False  #: the env takes a flattened Discrete action

    @classmethod
    def from_env(cls, env: gym.Env) -> EnvFacts:
        u = env.unwrapped
        sc = u.scenario  # the env's validated ScenarioConfig (ringenv.config)
        return cls(ring_sizes=tuple(u.ring_sizes), intervals_ms=tuple(u.intervals_ms), link_Bps=u.obs_rate_Bps,
                   page_size=sc.profile.page_size, vcpus=sc.vm.vcpus, reserved_entries=sc.profile.reserved_entries,
                   control_interval_ms=u.cfg.control_interval_ms, flatten=bool(u.flatten_actions))

    def soft_limit(self, entries: int) -> int:
        return max(entries - self.reserved_entries, 1)

    def encode(self, ring_entries: float, interval_ms: float):
        """The action for the nearest offered ring size and interval (on a log scale), as
        ``env.unwrapped.encode_action`` does."""
        i, j = nearest_choices(self.ring_sizes, self.intervals_ms, ring_entries, interval_ms)
        if self.flatten:
            return i * len(self.intervals_ms) + j
        import numpy as np

        return np.array([i, j], dtype=np.int64)

    def decode(self, action) -> tuple[int, float]:
        import numpy as np

        a = np.asarray(action).reshape(-1)
        if self.flatten:
            i, j = divmod(int(a[0]), len(self.intervals_ms))
        else:
            i, j = int(a[0]), int(a[1])
        return self.ring_sizes[i], self.intervals_ms[j]


# ---------------------------------------------------------------------------------- hyperparameters
def load_hyperparams(algo: str, env_id: str, path: str | Path | None = None) -> dict:
    """The hyperparameters of ``algo`` for ``env_id`` from ``configs/train/ALGO.yaml`` (RL Zoo
    layout: a mapping env id -> {n_timesteps, n_envs, policy, normalize, ...SB3 keywords}). A top-level key
    that is no ringenv env id is an error naming it and the ids."""
    p = Path(path) if path else TRAIN_CONFIG_DIR / f"{algo}.yaml"
    if not p.is_file():
        raise FileNotFoundError(f"no hyperparameter file {p}")
    data = parse_yaml(read_text(p), p.name)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{p.name}: a {type(data).__name__} at the top; expected a mapping of environment id -> "
                         "hyperparameters (RL Zoo layout)")
    for key in data:  # (an unknown key would be ignored: a typo of an env id, a misplaced hyperparameter)
        if key not in ENV_IDS:
            raise ValueError(f"{p.name}: {key!r} is not an environment id; accepted at the top: {', '.join(ENV_IDS)} "
                             "(RL Zoo layout: environment id -> hyperparameters)")
    if env_id not in data:
        raise KeyError(f"{p.name} has no entry for {env_id} (a ringenv environment; {algo.upper()}'s hyperparameters "
                       f"for it are missing); entries: {', '.join(map(str, data)) or 'none'}; add one, or pass "
                       "--hyperparams FILE with one")
    entry = data[env_id]
    if not isinstance(entry, dict):
        raise ValueError(f"{p.name}: {env_id}: {entry!r} is not a mapping; expected the hyperparameters as KEY: VALUE "
                         "lines (n_timesteps, n_envs, policy, ... and the algorithm's keywords)")
    return dict(entry)


# ---------------------------------------------------------------------------------- dataclass CLI
def field_docs(cls) -> dict[str, str]:
    """Field name -> the docstring written under it (CleanRL style), base dataclasses included."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr) \
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str):
                docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, *, skip: tuple = (), short: dict | None = None):
    """One flag per field of the dataclass ``cls``, typed from its default / annotation, the
    field's docstring as help. A flag not given parses as None, which stands for the field's
    default until :func:`dataclass_from_namespace` (so that it can tell the flags given)."""
    docs = field_docs(cls)
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        names = [_flag(f.name)] + ([short[f.name]] if short and f.name in short else [])
        help_ = docs.get(f.name, "") + (f" (default: {default})" if default not in (None, [], "") else "")
        hint = str(hints[f.name])
        if isinstance(default, bool):
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=docs.get(f.name, "") + f" (default: {default})")
        elif isinstance(default, list) or hint.startswith("list"):
            # a repeated flag adds to the values given before (not the default: None stands for
            # it until dataclass_from_namespace)
            parser.add_argument(*names, dest=f.name, nargs="*", action="extend", default=None,
                                metavar=f.metadata.get("metavar", f.name.rstrip("s").upper()), help=help_)
        else:
            typ = int if "int" in hint and "float" not in hint else float if "float" in hint else str
            choices = f.metadata.get("choices")
            parser.add_argument(*names, dest=f.name, type=typ, default=None, choices=choices,
                                metavar=None if choices else f.metadata.get("metavar") or (
                                    f.name.upper().split("_")[-1] if typ is str else typ.__name__.upper()),
                                help=help_)
    return parser


def dataclass_from_namespace(cls, ns: argparse.Namespace):
    """``cls`` from the parsed flags; a flag not given (None) takes the field's default. The
    instance's ``given_flags`` (not a field) names the fields whose flags were given, whatever
    their values (``train --resume`` refuses any other)."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(ns).items() if k in names and v is not None}
    obj = cls(**given)
    obj.given_flags = frozenset(given)
    return obj


def parse_dataclass_args(cls, argv: list[str] | None = None, description: str | None = None):
    ap = argparse.ArgumentParser(description=description or (cls.__doc__ or "").strip().splitlines()[0])
    add_dataclass_arguments(ap, cls)
    return dataclass_from_namespace(cls, ap.parse_args(argv))


def jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x):
        return {k: jsonable(v) for k, v in dataclasses.asdict(x).items()}
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "item"):
        return x.item()
    return x


class FixedEpisodes(gym.Wrapper):
    """Cycle through a fixed list of (workload, seed) episodes, whatever seed ``reset`` is given:
    every evaluation of a training run then sees the same episodes, so successive models are
    compared on common random numbers."""

    def __init__(self, env: gym.Env, episodes: list[tuple[str, int]]):
        super().__init__(env)
        if not episodes:
            raise ValueError("FixedEpisodes: no episodes")
        self.episodes, self.k = list(episodes), 0

    def rewind(self) -> None:
        """The next reset starts the list again."""
        self.k = 0

    def reset(self, *, seed=None, options=None):
        workload, s = self.episodes[self.k % len(self.episodes)]
        self.k += 1
        return self.env.reset(seed=s, options={**(options or {}), "workload": workload})


class ActionRepeat(gym.Wrapper):
    """Hold each action for ``k`` control intervals (rewards summed, the last observation and
    info returned): the agent decides every k x control_interval_ms of simulated time, and one
    step of this wrapper (one decision, one stable-baselines3 timestep) is up to k environment
    steps (fewer when the episode ends within it; ``env_steps`` counts them). A trained model
    remembers its k (args.json) and holds its actions the same way when evaluated."""

    def __init__(self, env: gym.Env, k: int):
        super().__init__(env)
        if k < 1:
            raise ValueError(f"action_repeat {k}: expected >= 1")
        self.k = int(k)
        self.env_steps = 0  #: environment steps taken so far (all episodes)

    def step(self, action):
        total = 0.0
        for _ in range(self.k):
            obs, r, term, trunc, info = self.env.step(action)
            self.env_steps += 1
            total += r
            if term or trunc:
                break
        return obs, total, term, trunc, info


def import_object(path: str):
    """``package.module.Name`` -> the object."""
    import importlib

    mod, _, name = path.rpartition(".")
    if not mod:
        raise ValueError(f"{path!r}: expected package.module.Name")
    return getattr(importlib.import_module(mod), name)


def import_named(path, where: str, what: str):
    """``import_object(path)``, or a ValueError naming ``where`` and saying ``what`` is expected."""
    if not isinstance(path, str) or "." not in path:
        raise ValueError(f"{where}: {path!r}: expected {what}")
    try:
        return import_object(path)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{where}: cannot import {path!r} ({e}); expected {what}") from None


def wrapper_specs(wrapper, where: str = "env_wrapper") -> list[tuple[type, dict]]:
    """``env_wrapper`` (RL Zoo style: a dotted class name, a mapping {name: kwargs}, or a list of
    those) as (class, keywords) pairs, each class imported and its keywords bound to its
    constructor after the env; anything else is a ValueError naming ``where``."""
    expected = "a wrapper class as package.module.Class, a mapping {Class: {kwargs}}, or a list of those"
    out = []
    for spec in (wrapper if isinstance(wrapper, list) else [wrapper] if wrapper else []):
        if isinstance(spec, dict) and len(spec) == 1:
            name, kwargs = next(iter(spec.items()))
            if kwargs is not None and not isinstance(kwargs, dict):
                raise ValueError(f"{where}: the keywords of {name} must be a mapping")
        elif isinstance(spec, str):
            name, kwargs = spec, None
        else:
            raise ValueError(f"{where}: {spec!r}; expected {expected}")
        cls = import_named(name, where, expected)
        kwargs = dict(kwargs or {})
        try:
            inspect.signature(cls).bind(None, **kwargs)
        except TypeError as e:
            given = f"the keywords {kwargs}" if kwargs else "no keywords"
            raise ValueError(f"{where}: {name}{inspect.signature(cls)} cannot be called with the env and {given} "
                             f"({e}); give its keywords as a mapping {{{name}: {{keyword: value}}}}") from None
        except ValueError:  # no signature to check (a builtin): its constructor will say
            pass
        out.append((cls, kwargs))
    return out


def wrap_env(env: gym.Env, wrapper=None, action_repeat: int = 1, where: str = "env_wrapper") -> gym.Env:
    """The wrappers a training run used, in its order: ``env_wrapper`` (:func:`wrapper_specs`),
    then ActionRepeat."""
    for cls, kwargs in wrapper_specs(wrapper, where):
        env = cls(env, **kwargs)
    if action_repeat > 1:
        env = ActionRepeat(env, action_repeat)
    return env


def sb3_logger(verbose: int = 0):
    """A stable-baselines3 logger writing to stdout (``verbose`` > 0) or nowhere. Without one,
    every ``learn()`` without a TensorBoard log makes a folder in the system's temporary
    directory (SB3's configure_logger) and leaves it there, empty."""
    from stable_baselines3.common.logger import Logger, make_output_format

    return Logger(folder=None, output_formats=[make_output_format("stdout", "")] if verbose else [])


def check_out_dir(path, flag: str = "--out") -> Path:
    """``path`` as an output directory that can be made or written later, checked before any work
    (a run's results must not be lost at the end): not a file, under no file, writable."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {str(p)!r}: a file, not a directory; expected a directory to write into (made if "
                         "missing)")
    parent = p
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {str(p)!r}: {str(parent)!r} is a file; expected a directory to write into (made if "
                         "missing)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {str(p)!r}: {str(parent)!r} is not writable")
    return p


def run_reporting(fn, prefix: str) -> int:
    """``fn()``'s exit code (0 if it returns none); a bad flag value (a ValueError such as
    ringenv's ConfigError, an unknown key, a missing file) ends with "PREFIX: message" on stderr
    and exit code 2, not a traceback; Ctrl-C with "PREFIX: interrupted" and 130."""
    try:
        rc = fn()
    except KeyboardInterrupt:  # (train saved the model so far first, marked interrupted)
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"{prefix}: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        from ringenv.cli import end_for_closed_stdout, stdout_reader_gone

        if stdout_reader_gone():  # `... | head`: stop quietly, as a pipeline expects
            return end_for_closed_stdout()
        raise
    return rc if isinstance(rc, int) else 0


def module_main(main, args_cls, prog: str) -> None:
    """``python -m agents.NAME``: the flags parsed into ``args_cls``, then ``main``, its errors
    reported as through ``ringenv NAME`` (:func:`run_reporting`)."""
    sys.exit(run_reporting(lambda: main(parse_dataclass_args(args_cls)), f"python -m {prog}"))
