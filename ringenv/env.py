"""The Gymnasium environments: tune the dirty ring while a VM live-migrates or checkpoints."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from .config import (MAX_RATE_SCALE, MAX_RATE_SCALE_FACTOR, MIN_RATE_SCALE, MIN_RATE_SCALE_FACTOR, ConfigError,
                     EnvConfig, ScenarioConfig, check_peak_rate, deep_merge, load_scenario, load_workload,
                     load_workload_sets, to_ns)
from .vmm.dirtyrate import sample_dirty_rate

SECOND = 1_000_000_000
MS = 1_000_000

#: Observation fields, in order: (name, unit / transform, upper bound). The docstring table of
#: RingEnv is this list.
OBS_FIELDS = [
    ("fill_max", "max over vCPUs of ring entries used / soft limit", 1.0),
    ("fill_mean", "mean over vCPUs of ring entries used / soft limit", 1.0),
    ("dirty_rate", "current dirty-rate estimate / link rate (bytes/s over bytes/s)", 10.0),
    ("sampled_rate", "pre-migration dirty-rate sample / link rate", 10.0),
    ("full_exits", "log10(1 + ring-full exits per vCPU per second, last interval)", 6.0),
    ("lost_vcpu", "share of vCPU time lost to dirty tracking (faults, exits, stalls, throttling), last interval", 1.0),
    ("vmm_cpu", "VMM CPU seconds per second, last interval", 8.0),
    ("progress", "share of guest RAM sent at least once", 1.0),
    ("remaining", "log10(1 + remaining dirty bytes / (bandwidth x downtime limit))", 6.0),
    ("bandwidth", "measured bandwidth / link rate", 2.0),
    ("iteration", "pre-copy iterations / 32", 4.0),
    ("elapsed", "elapsed simulated time / episode time cap", 1.0),
    ("ring_size", "log2(ring entries) / 16 (0 before the ring is chosen)", 1.0),
    ("interval", "log10(harvest interval in ms) / 4", 1.0),
    ("ring_fixed", "1 once the ring size is fixed (after the first step)", 1.0),
    ("redirty_rate", "pre-migration re-dirty rate / link rate (pages dirtied again within the sample)", 10.0),
    ("redirty_share", "re-dirtied share of the pre-migration sample's dirty events", 1.0),
]
#: Scenario fields the environment decides by other means: as keywords of ``gymnasium.make`` they
#: are errors saying what to use instead (they would be ignored; in a scenario file they serve
#: ``ringenv migrate`` / ``checkpoint`` and the environment leaves them aside).
NOT_KEYWORDS = {
    "workload": "not an env argument: each episode's workload is drawn from the env's workloads; pass "
                "workloads=[...] (the names to draw from) or reset(options={'workload': name}) (one episode's)",
    "ring_entries": "not an env argument: the action chooses the ring size (at the first step); to offer other "
                    "sizes pass ring_sizes=[...]",
    "interval_ms": "not an env argument: the action chooses the harvest interval (every step); to offer other "
                   "intervals pass intervals_ms=[...]",
    "kind": "not an env argument: the env id chooses it (ringenv/Migration-v0 or ringenv/Checkpoint-v0, and their "
            "Discrete variants)",
    "seed": "not an env argument: reset(seed=...) seeds the episodes (a scenario's seed serves `ringenv migrate` "
            "and `ringenv checkpoint` only)",
    "name": "not an env argument: a scenario file's label, which the env does not use; pass scenario=NAME or a "
            "path to choose a scenario",
    "description": "not an env argument: a scenario file's label, which the env does not use; pass scenario=NAME "
                   "or a path to choose a scenario",
}

#: The observation's upper bounds (the Box's ``high``), as float32 and as the Python floats
#: :func:`_clip_observation` compares with.
OBS_HIGH = np.array([f[2] for f in OBS_FIELDS], dtype=np.float32)
_OBS_HIGH_LIST = OBS_HIGH.tolist()


#: attributes of ``env.unwrapped`` documented as read-only: the env sets them itself
#: (:meth:`RingEnv._own`); assigning one raises AttributeError
READ_ONLY = frozenset({"scenario", "cfg", "split", "workloads", "ring_sizes", "intervals_ms", "flatten_actions", "kind",
                       "obs_rate_Bps", "workload", "episode_seed", "rate_scale", "ring_entries", "interval_ms"})


class RingEnv(gym.Env):
    """Base of :class:`MigrationEnv` and :class:`CheckpointEnv` (the docstrings of those are the
    specification)."""

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 5}
    kind = "migration"

    def __setattr__(self, name, value):
        if name in READ_ONLY:
            raise AttributeError(f"{name} is read-only: the env's action grids, workloads and settings are "
                                 "fixed when it is made (pass them to gymnasium.make), its episode's values by "
                                 "reset and step")
        super().__setattr__(name, value)

    def __delattr__(self, name):
        if name in READ_ONLY:
            raise AttributeError(f"{name} is read-only: it cannot be deleted")
        super().__delattr__(name)

    def _own(self, **values) -> None:
        """Set read-only attributes (:data:`READ_ONLY`): the env's own writes."""
        self.__dict__.update(values)

    def __init__(self, scenario: Any = "default", *, split: str = "train", workloads: list[str] | None = None,
                 flatten_actions: bool = False, render_mode: str | None = None, **overrides):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ConfigError(f"render_mode: {render_mode!r}; accepted: None, 'ansi', 'rgb_array'")
        if not isinstance(flatten_actions, bool):
            raise ConfigError(f"flatten_actions: {flatten_actions!r}; accepted: True or False")
        for k in overrides:
            if k in NOT_KEYWORDS:
                raise ConfigError(f"{k}: {NOT_KEYWORDS[k]}")
            if k not in EnvConfig.model_fields and k not in ScenarioConfig.model_fields:
                raise ConfigError(f"{k}: unknown argument; accepted: scenario, split, workloads, flatten_actions, "
                                  "render_mode, "
                                  f"the env settings ({', '.join(EnvConfig.model_fields)}) and the scenario fields "
                                  f"({', '.join(f for f in ScenarioConfig.model_fields if f not in NOT_KEYWORDS)})")
        env_overrides = {k: overrides.pop(k) for k in list(overrides) if k in EnvConfig.model_fields}
        if isinstance(scenario, dict):  # fields over the default scenario's, as keywords are
            scenario = deep_merge(load_scenario("default").model_dump(exclude_unset=True), scenario)
        # validated as the kind the env id runs, whatever the scenario's own kind
        self._own(scenario=load_scenario(scenario, run_kind=self.kind, **overrides))
        # a mapping is merged into its section (reward={"vcpu": 1} keeps the file's other weights)
        self._own(cfg=EnvConfig.parse(deep_merge(dict(self.scenario.env or {}), env_overrides), where="env"))
        if split not in ("train", "test", "all"):
            raise ConfigError(f"split: {split!r}; accepted: 'train', 'test', 'all'")
        self._own(split=split)
        if workloads is not None:
            if isinstance(workloads, (set, frozenset)):  # ordered by the string hash: per process
                raise ConfigError(f"workloads: a set has no fixed order (it follows the string hash, which differs "
                                  f"from process to process), so the same seed would draw different workloads; pass "
                                  f"a list, e.g. sorted({workloads!r})")
            if isinstance(workloads, (str, bytes)) or not isinstance(workloads, Iterable):
                raise ConfigError(f"workloads: expected a list of workload names, got {workloads!r}")
            if isinstance(workloads, Iterator):
                raise ConfigError(f"workloads: {type(workloads).__name__} {workloads!r} is a one-shot iterator: "
                                  "gym.make keeps the arguments in env.spec (which cannot copy it) and each env of a "
                                  "vector env would read what the first left (nothing); accepted: a list or tuple of "
                                  "workload names, e.g. list(...) of it")
            names = tuple(workloads)
            if not all(isinstance(w, str) for w in names):
                raise ConfigError(f"workloads: expected a list of workload names, got {list(names)!r}")
            self._own(workloads=names)
            for i, w in enumerate(self.workloads):
                load_workload(w, where=f"workloads[{i}]")  # an unknown name is an error now, not at some reset
        else:
            sets = load_workload_sets()[self.cfg.workload_set]
            by_split = {"train": sets["train"], "test": sets["test"], "all": sets["train"] + sets["test"]}
            self._own(workloads=tuple(by_split[split]))
        if not self.workloads:
            raise ConfigError("workloads: the chosen set is empty")
        self._check_episode_rate_scale()
        for w in self.workloads:
            self._check_peak_rate(w)
        prof = self.scenario.profile
        for n in self.cfg.ring_sizes or ():
            if n not in prof.ring_sizes:
                raise ConfigError(f"ring_sizes: {n} is not accepted by {prof.name}; accepted: "
                                  f"{', '.join(map(str, prof.ring_sizes))}")
        self._own(ring_sizes=tuple(self.cfg.ring_sizes or prof.ring_sizes), intervals_ms=tuple(self.cfg.intervals_ms),
                  flatten_actions=flatten_actions)
        n_sizes, n_int = len(self.ring_sizes), len(self.intervals_ms)
        self.action_space = (spaces.Discrete(n_sizes * n_int) if flatten_actions
                             else spaces.MultiDiscrete([n_sizes, n_int]))
        self.observation_space = spaces.Box(np.zeros_like(OBS_HIGH), OBS_HIGH.copy(), dtype=np.float32)
        self.render_mode = render_mode
        #: what the rate observations (dirty_rate, sampled_rate, bandwidth, redirty_rate) are divided
        #: by: the rate a migration sends at (min(link, max-bandwidth)), or the checkpoint storage rate
        self._own(obs_rate_Bps=self.scenario.link.rate_Bps if self.kind == "migration"
                  else self.scenario.checkpoint.storage_mbps * 1e6)
        self._session = None
        self._last = None
        self._ended = None  # why step() needs a reset first: the episode ended, or close()

    # ------------------------------------------------------------------ actions
    def decode_action(self, action) -> tuple[int, int]:
        """(ring entries, harvest interval in ms) for an action; a clear error if it is invalid.

        Integer indices in range are decoded at once (:func:`_integer_indices`); anything else
        is checked against the action space, which gives the error."""
        ij = _integer_indices(action, len(self.ring_sizes), len(self.intervals_ms), self.flatten_actions)
        if ij is not None:
            return self.ring_sizes[ij[0]], self.intervals_ms[ij[1]]
        if self.flatten_actions:
            a = np.asarray(action)
            if (a.shape not in ((), (1,)) or not np.issubdtype(a.dtype, np.integer)
                    or not self.action_space.contains(int(a.reshape(())))):
                raise ValueError(f"action {action!r}: expected an integer in 0..{self.action_space.n - 1}")
            i, j = divmod(int(a.reshape(())), len(self.intervals_ms))
        else:
            a = np.asarray(action)
            if (a.shape != (2,) or not np.issubdtype(a.dtype, np.integer)
                    or not self.action_space.contains(a.astype(np.int64))):
                what = ""
                if a.shape == (2,) and np.issubdtype(a.dtype, np.integer):  # say which index is out of range
                    bad = [f"{name} index {int(x)} is out of range" for name, x, n in
                           (("ring size", a[0], len(self.ring_sizes)), ("interval", a[1], len(self.intervals_ms)))
                           if not 0 <= x < n]
                    what = f" ({'; '.join(bad)})" if bad else ""
                raise ValueError(f"action {action!r}{what}: expected integers [ring size index "
                                 f"0..{len(self.ring_sizes) - 1}, interval index 0..{len(self.intervals_ms) - 1}]")
            i, j = int(a[0]), int(a[1])
        return self.ring_sizes[i], self.intervals_ms[j]

    @property
    def episode_over(self) -> bool:
        """The episode has ended by this environment's own rule (terminated or truncated; a
        wrapper may end it earlier, then this is still False): step() needs a reset."""
        return self._ended == "the episode ended"

    def encode_action(self, ring_entries: float, interval_ms: float):
        """The action choosing the nearest available ring size and interval (for scripted
        policies; see :func:`nearest_choices`)."""
        i, j = nearest_choices(self.ring_sizes, self.intervals_ms, ring_entries, interval_ms)
        return i * len(self.intervals_ms) + j if self.flatten_actions else np.array([i, j], dtype=np.int64)

    # ------------------------------------------------------------------ episode
    def _check_episode_rate_scale(self) -> None:
        """A ConfigError if an episode's rate_scale (the scenario's times a factor drawn from
        ``rate_scale_range``) can leave the range a scenario's ``rate_scale`` accepts: each is valid
        alone, but the episode's scenario would be refused at its first step."""
        lo, hi = self.cfg.rate_scale_range
        base = self.scenario.rate_scale
        if base * lo < MIN_RATE_SCALE or base * hi > MAX_RATE_SCALE:
            raise ConfigError(
                f"rate_scale_range: [{lo:g}, {hi:g}] with the scenario's rate_scale {base:g} gives episodes a "
                f"rate_scale of {base * lo:g} to {base * hi:g}; accepted: an episode rate_scale of "
                f"{MIN_RATE_SCALE:g} to {MAX_RATE_SCALE:g}, so with this scenario a rate_scale_range within "
                f"[{max(MIN_RATE_SCALE_FACTOR, MIN_RATE_SCALE / base):.6g}, "
                f"{min(MAX_RATE_SCALE_FACTOR, MAX_RATE_SCALE / base):.6g}]")

    def _check_peak_rate(self, workload: str, prefix: str = "") -> None:
        """A ConfigError if the episode factors can take ``workload`` past the fastest rate a
        workload may write (:func:`ringenv.config.check_peak_rate`): its rates times the
        scenario's ``rate_scale`` times the high end of ``rate_scale_range``."""
        lo, hi = self.cfg.rate_scale_range  # an episode's factor is drawn up to hi, on top of the scenario's
        too_fast = check_peak_rate(load_workload(workload), self.scenario.rate_scale * hi, "rate_scale_range",
                                   f"[{lo:g}, {hi:g}] (with the scenario's rate_scale {self.scenario.rate_scale:g})")
        if too_fast:
            raise ConfigError(prefix + too_fast)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        workload = _workload_option(options)  # checked before anything changes
        if workload is not None:
            self._check_peak_rate(workload, "options: workload: ")
        super().reset(seed=seed)
        if workload is None:
            workload = self.workloads[int(self.np_random.integers(len(self.workloads)))]
        self._own(workload=workload, episode_seed=int(self.np_random.integers(0, 2**31 - 1)))
        lo, hi = self.cfg.rate_scale_range  # drawn only when it is a range: a fixed factor changes no draw
        self._own(rate_scale=lo if lo == hi else math.exp(self.np_random.uniform(math.log(lo), math.log(hi))))
        self._episode_scenario = self.scenario if self.rate_scale == 1.0 else self.scenario.model_copy(
            update={"rate_scale": self.scenario.rate_scale * self.rate_scale})
        self._drop_session()
        self.sampled_rate, self.redirty_rate = sample_dirty_rate(self._episode_scenario, workload=workload,
                                                                 seed=self.episode_seed, seconds=self.cfg.sample_s,
                                                                 windows=self.cfg.sample_windows)
        self._own(ring_entries=0, interval_ms=0.0)
        self.t = 0
        self._prev = None
        self._last = None
        self._ended = None
        self._obs_const = self._observation_constants()
        obs = self._observe(None, 0)
        info = {"workload": workload, "rate_scale": self.rate_scale, "sampled_dirty_rate_Bps": self.sampled_rate,
                "sampled_redirty_rate_Bps": self.redirty_rate, "ring_sizes": list(self.ring_sizes),
                "intervals_ms": list(self.intervals_ms)}
        return obs, info

    def step(self, action):
        if not hasattr(self, "workload"):
            raise RuntimeError("step() before reset()")
        if self._ended is not None:
            raise RuntimeError(f"step() after {self._ended}; call reset()")
        entries, interval_ms = self.decode_action(action)
        info = StepInfo()
        if self._session is None:
            self._own(ring_entries=entries if self.scenario.collector == "ring" else 0)
            self._session = _open_session(self.kind, self._episode_scenario, self.workload, self.episode_seed,
                                          entries, to_ns(interval_ms, MS), self.cfg.control_interval_ms,
                                          self.cfg.sample_s)
            self._prev = self._session.metrics()
            info["ring_size_ignored"] = not self.ring_entries
        else:
            info["ring_size_ignored"] = entries != self.ring_entries
        if interval_ms != self.interval_ms and self.ring_entries:
            self._session.set_harvest_interval(to_ns(interval_ms, MS))
        self._own(interval_ms=interval_ms if self.ring_entries else 0.0)  # the bitmap collector has no reaper
        dt = to_ns(self.cfg.control_interval_ms, MS)  # the session's host-sync grid, to the ns
        self.t += dt
        self._session.advance(self.t)
        m = self._session.metrics()
        costs = self._interval_costs(self._prev, m)
        reward, parts = self._reward(m, dt, costs)
        terminated = bool(self._session.done)
        truncated = (not terminated) and self.t >= self._obs_const[2]
        forced = 0.0
        if truncated:  # the downtime a switchover (a pause) now would cause, and of one under way its time so far
            s = self._session
            rate = s.final_rate_Bps if s.paused_at is not None else self._send_rate(m)  # (stopped: sends at that)
            forced = m.remaining_bytes / rate + s.pause_so_far_s()
            reward -= self._charge(parts, "truncation", self.cfg.reward.truncation, forced)
        cancel_s = 0.0
        if terminated and m.cancelled:  # what a switchover then would have cost (the migration is to be redone)
            cancel_s = m.remaining_bytes / self._send_rate(m)
            reward -= self._charge(parts, "cancel", self.cfg.reward.cancel, cancel_s)
        obs = self._observe(m, dt, costs)
        self._prev = m
        if terminated or truncated:
            self._ended = "the episode ended"  # (episode_over)
        info.update(m.to_dict())
        info["reward_parts"] = parts
        info["truncation_downtime_s"] = forced
        info["cancel_downtime_s"] = cancel_s
        info["workload"] = self.workload
        info["ring_entries"] = self.ring_entries
        info["interval_ms"] = self.interval_ms
        self._last = (obs, reward, info)
        return obs, float(reward), terminated, truncated, info

    # ------------------------------------------------------------------ reward and observation
    def _interval_costs(self, prev, m) -> tuple[float, float, float, int]:
        """What the step between two metrics records cost, as the reward charges and the
        observation reports it: (vCPU-seconds lost per vCPU, VMM CPU seconds, downtime seconds,
        ring-full exits). Downtime: a migration's (``downtime_s``, at the switchover); for
        checkpointing the pauses that ended in the step (``pause_total_s``: the metrics'
        ``downtime_s`` is the longest pause)."""
        lost = (_lost_vcpu_s(m) - _lost_vcpu_s(prev)) / self.scenario.vm.vcpus
        down = m.pause_total_s - prev.pause_total_s if self.kind == "checkpoint" else m.downtime_s - prev.downtime_s
        return lost, m.vmm_cpu_s - prev.vmm_cpu_s, down, m.full_exits - prev.full_exits

    def _reward(self, m, dt: int, costs: tuple[float, float, float, int]) -> tuple[float, dict]:
        """Minus the weighted costs of this interval (see the class docstring); ``costs`` from
        :meth:`_interval_costs`."""
        w = self.cfg.reward
        lost, vmm_s, downtime_s, _ = costs
        dt_s = dt / SECOND
        parts = {
            "vcpu": w.vcpu * lost,
            "vmm": w.vmm * vmm_s,
            "memory": w.memory * (m.ring_bytes / (1 << 20)) * dt_s,
            "time": w.time * dt_s,
            "downtime": w.downtime * downtime_s,
            "truncation": 0.0,  # (charged by step at a truncation)
            "cancel": 0.0,  # (charged by step when the migration is cancelled)
        }
        return -sum(parts.values()) / w.scale, parts

    def _charge(self, parts: dict, key: str, weight: float, seconds: float) -> float:
        """Charge ``seconds`` of a switchover's downtime at ``weight`` as ``parts[key]`` (left
        0 with no weight); returns what it takes off the reward (after ``reward.scale``)."""
        if not weight:
            return 0.0
        parts[key] = weight * seconds
        return parts[key] / self.cfg.reward.scale

    def _send_rate(self, m) -> float:
        """The rate the dirty bytes left would be sent at (``remaining``, the truncation charge):
        the measured bandwidth (a checkpoint's over the writes of the current or last checkpoint:
        the storage rate), or the run's configured rate before it is measured (the first >= 100 ms
        of sending)."""
        return m.bandwidth_Bps if m.bandwidth_Bps > 0 else self._session.rate_Bps

    def _observation_constants(self) -> tuple[float, float, float, int, float, float, float]:
        """What the observation reads that cannot change during an episode (taken at reset): the
        rate the rate observations are divided by (:attr:`obs_rate_Bps`), the time ``remaining``
        is counted in (s: a migration's downtime limit, a checkpoint's 1 ms), the episode time
        cap (ns), vCPUs, and the three observations of the pre-migration sample (sampled_rate,
        redirty_rate, redirty_share)."""
        rate = self.obs_rate_Bps
        unit_s = self.scenario.link.downtime_limit_ms / 1000 if self.kind == "migration" else 1e-3
        share = self.redirty_rate / (self.sampled_rate + self.redirty_rate) if self.redirty_rate > 0 else 0.0
        return (rate, unit_s, to_ns(self.cfg.max_episode_s, SECOND), self.scenario.vm.vcpus,
                self.sampled_rate / rate, self.redirty_rate / rate, share)

    def _observe(self, m, dt: int, costs: tuple[float, float, float, int] | None = None) -> np.ndarray:
        """The observation (see the class docstring) after a step ending with metrics ``m``
        (``costs`` from :meth:`_interval_costs`), or at reset (``m`` None: only the sample and
        the interval are known)."""
        rate, unit_s, cap, nv, sampled, redirty, share = self._obs_const
        interval = math.log10(max(self.interval_ms, 1.0)) / 4 if self.interval_ms else 0.0
        if m is None:
            o = [0.0] * len(OBS_FIELDS)
            o[3], o[13], o[15], o[16] = sampled, interval, redirty, share
            return _clip_observation(o)
        lost, vmm_s, _, exits = costs
        fill = m.ring_fill
        dts = max(dt / SECOND, 1e-9)
        # remaining: a migration's in bytes sent within the downtime limit, a checkpoint's in bytes
        # the storage writes in 1 ms (the pause's ms), at the rate the truncation charge uses
        limit_bytes = self._send_rate(m) * unit_s
        return _clip_observation([
            max(fill) if fill else 0.0,  # fill_max
            _mean(fill),  # fill_mean
            m.dirty_rate_Bps / rate,
            sampled,
            math.log10(1 + exits / nv / dts),  # full_exits
            lost / dts,  # lost_vcpu
            vmm_s / dts,  # vmm_cpu
            m.progress,
            math.log10(1 + m.remaining_bytes / limit_bytes),  # remaining
            m.bandwidth_Bps / rate,
            m.iterations / 32,
            self.t / cap,  # elapsed
            math.log2(self.ring_entries) / 16 if self.ring_entries else 0.0,  # ring_size
            interval,
            1.0,  # ring_fixed
            redirty,
            share,
        ])

    # ------------------------------------------------------------------ rendering
    def render(self):
        if self.render_mode is None:
            gym.logger.warn("render() called without a render_mode")
            return None
        if self._last is None:  # before the first step: every ring empty, nothing sent
            if self.render_mode == "ansi":
                return "(reset, no step yet)" if hasattr(self, "workload") else "(no episode yet: reset first)"
            return _render_rgb(self, None, {})
        obs, reward, info = self._last
        if self.render_mode == "ansi":
            return (f"t={self.t / SECOND:7.2f}s {self.workload:12s} ring={self.ring_entries:6d} "
                    f"int={self.interval_ms:6.0f}ms fill={obs[0]:.2f} rate={obs[2]:.2f} exits={info['full_exits']:6d} "
                    f"iter={info['iterations']:3d} prog={obs[7]:.2f} r={reward:+.4f}")
        return _render_rgb(self, obs, info)

    def close(self):
        self._drop_session()
        if hasattr(self, "workload"):
            self._ended = "close()"

    def __getstate__(self):
        """Pickling and copying: while no episode is under way (fresh, reset but not stepped, ended,
        closed). An episode's VMM run is made of generator processes, which cannot be copied."""
        if self._session is not None and self._ended is None:
            raise TypeError(
                f"a {type(self).__name__} cannot be pickled or copied with an episode under way: its VMM run "
                "(generator-based processes) cannot be copied. To duplicate the episode, make a new env with the "
                "same arguments, reset it with the same seed (and options) and replay the same actions: the "
                "results are bit-identical. A fresh env, one reset but not stepped, or one whose episode ended "
                "can be copied.")
        state = self.__dict__.copy()
        state["_session"] = None  # an ended episode's run: of no further use (step() needs a reset)
        state.pop("_rgb", None)  # the rgb_array figure: built again at the next render
        return state

    def _drop_session(self) -> None:
        """Free the last episode's VM now: the VMM's processes and the VM reference each other,
        and numpy-heavy runs allocate too few Python objects for the cyclic collector to come
        by often, so without closing the session the arrays of old episodes pile up."""
        if self._session is not None:
            self._session.close()
            self._session = None
            self._prev = None


class MigrationEnv(RingEnv):
    """Tune the dirty ring while a VM live-migrates (one episode = one pre-copy migration).

    ## Description
    A simulated arm64 KVM host runs a VM whose vCPUs dirty guest memory; KVM logs the dirty pages
    in per-vCPU dirty rings (Linux 6.2 arm64 port: a vCPU exits with KVM_EXIT_DIRTY_RING_FULL
    when its ring is soft-full). A QEMU-like VMM migrates the VM with pre-copy: it harvests the
    rings (a reaper thread at the interval you choose, plus the vCPU thread at every full exit,
    plus every migration sync), resets them with KVM_RESET_DIRTY_RINGS and re-sends dirtied
    pages until the rest fits in the downtime limit. You choose the ring size (once, as KVM fixes
    it when vCPUs are created) and the harvest interval (every control interval).

    ## Action Space
    `MultiDiscrete([len(ring_sizes), len(intervals_ms)])` (or `Discrete(product)` with
    `flatten_actions=True`, index = size_index * len(intervals_ms) + interval_index):

    | component | meaning | default values |
    |---|---|---|
    | 0 | ring entries per vCPU | the powers of two the host accepts (arm64-4k: 256 .. 65536) |
    | 1 | reaper harvest interval (ms) | 10, 20, 50, 100, 200, 500, 1000, 2000, 5000 |

    The ring size is taken from the FIRST action of an episode; later ring-size components are
    ignored and `info["ring_size_ignored"]` says so.

    `step` takes the action as integers: numpy integers or Python ints (a list `[i, j]` for the
    MultiDiscrete action). It is a little more lenient than `action_space.contains`: a `Discrete`
    action may also come as a one-element integer array (as some wrappers pass a single env's
    action). A bool or an array of bools is refused (not an index; `contains` takes `True` as 1).

    ## Observation Space
    `Box(0, high, (17,), float32)`:

    | index | name | meaning | high |
    |---|---|---|---|
    | 0 | fill_max | max over vCPUs of ring entries used / soft limit | 1 |
    | 1 | fill_mean | mean over vCPUs of ring entries used / soft limit | 1 |
    | 2 | dirty_rate | current dirty-rate estimate / link rate | 10 |
    | 3 | sampled_rate | pre-migration dirty-rate sample / link rate (set at reset) | 10 |
    | 4 | full_exits | log10(1 + ring-full exits per vCPU per second), last interval | 6 |
    | 5 | lost_vcpu | share of vCPU time lost to dirty tracking (as the `vcpu` cost), last interval | 1 |
    | 6 | vmm_cpu | VMM CPU seconds per second, last interval | 8 |
    | 7 | progress | share of guest RAM sent at least once | 1 |
    | 8 | remaining | log10(1 + remaining dirty bytes / (bandwidth x downtime limit)), bandwidth: the measured one, or the run's configured rate before it is measured | 6 |
    | 9 | bandwidth | measured bandwidth / link rate (0 until measured, ~1 s into the run) | 2 |
    | 10 | iteration | pre-copy iterations / 32 | 4 |
    | 11 | elapsed | elapsed simulated time / `max_episode_s` | 1 |
    | 12 | ring_size | log2(ring entries) / 16 (0 before the ring is chosen) | 1 |
    | 13 | interval | log10(interval in ms) / 4 (0 before the first step and under the bitmap collector) | 1 |
    | 14 | ring_fixed | 1 once the ring size is fixed | 1 |
    | 15 | redirty_rate | pre-migration re-dirty rate / link rate (set at reset) | 10 |
    | 16 | redirty_share | redirty_rate / (sampled_rate + redirty_rate) (set at reset) | 1 |

    "Link rate" is the rate the migration sends at, min(link, max-bandwidth) (the env's
    `obs_rate_Bps`). Every value is clipped to [0, high], so a value at its high means "at least
    this". Those that reach it in practice: `dirty_rate`,
    `sampled_rate` and `redirty_rate` for a guest dirtying more than 10x the link rate (a slow
    link or a low max-bandwidth); `iteration` after 128 pre-copy iterations (a run that does not
    converge). `vmm_cpu`, `full_exits` and `remaining` have room to spare in every shipped
    scenario, and `bandwidth` stays at ~1 at most: it is the rate the migration sends at, and
    the switchover's last pass, which runs at the full link rate when max-bandwidth is below
    it, is not measured (as in QEMU, nothing is once the VM has stopped). `lost_vcpu` stays below 1: a vCPU out of the guest (an exit, a lock wait, a
    throttle sleep) writes nothing, and the time it spends in write-protect faults slows its
    workload once the workload's own work (`cpu_busy`, a workload setting) and the faults
    would take more than all of its time (the analytics workload on 1 vCPU: 0.60 over an
    episode, up to 0.84 in a step; the guest model was open-loop before and charged 1.6
    there). The slow-down is measured per sampling window and applied from the next one, so a
    window right after a sudden rise of the faults (the first, one after a bitmap sync
    re-protected many pages) runs at the earlier speed and a step holding it can pass 1 a
    little. The reward is not clipped. `ring_fixed` is 0 in the
    reset observation only (where the ring size is chosen): stable-baselines3's `VecNormalize`
    turns it into -sqrt((1 - p) / p), p the share of the observations it saw that were reset ones
    (about -2.6 with configs/train/dqn.yaml, whose decisions each hold 40 steps: one in eight or
    nine is a reset's; -10, its clip value by default, once p < 1/101), a mark the policy can
    still read there.

    `dirty_rate` is QEMU's estimate as each collector gives it: with the ring, entries harvested
    (or waiting) per second over the last >= 1 s (in the migration's first second, over the run
    so far: a noisier estimate for the first ~20 steps); with the bitmap (`collector="bitmap"`), QEMU's
    dirty-pages-rate: the pages newly dirty per second over the last rate period, which a sync
    more than 1 s after the period began closes, 0 until one has. `bandwidth` is bytes on the
    stream per second: a scenario with `vm.zero_fraction` > 0 sends its zero pages as 9 bytes
    per 4 KiB, so the bulk stage over them shows a low bandwidth (QEMU's does too).

    The reset observation already holds `sampled_rate`, measured over the `sample_s` simulated
    seconds before migration (QEMU's calc-dirty-rate with the dirty bitmap), so the ring size can
    be chosen knowing the workload; the migration then goes on from where the sample left the
    workload (its calm or burst phase, its sequential sweeps), with writes of its own. The
    sample reads the bitmap `sample_windows` times (each read re-protects the pages, as
    KVM_GET_DIRTY_LOG does); `redirty_rate` counts the dirty events of
    a window on a page already dirtied in an earlier window. Those are the write-protect faults
    that recur after every harvest: a hot set (a database buffer pool, a key-value cache) has
    many and is cheaper with a big ring harvested rarely; a sequential sweep has none and gains
    nothing from it but pays the ring memory.

    ## Rewards
    Each step: minus the weighted costs of the control interval, divided by `reward.scale`:

    | cost | measure | default weight |
    |---|---|---|
    | vcpu | vCPU-seconds lost to dirty tracking, divided by the vCPU count | 10 |
    | vmm | VMM CPU seconds (harvesting, resets, bitmap syncs) | 1 |
    | memory | ring memory in MiB (all vCPUs) x seconds | 0.002 |
    | time | seconds of migration | 0.05 |
    | downtime | downtime seconds (when the VM stops at switchover; at the end) | 10 |
    | truncation | at a truncation, the downtime seconds a switchover then would cause | 0 |
    | cancel | at a cancel (`link.give_up_action: cancel`, `link.cancel_at_s`), the downtime seconds a switchover then would have caused | 10 |

    The `memory` and `time` costs of the last step, and its per-second observations, are for a
    whole control interval, though the migration ends within it (at most one interval's time
    cost, 0.0025 at the default weights; a terminal observation is not bootstrapped).

    The lost vCPU time is the write-protect faults and block splits, the ring-full exits (with
    the reaping done on the vCPU thread), the waits for QEMU's big lock and the throttle sleeps
    (the metrics' `vcpu_fault_s`, `vcpu_exit_s`, `vcpu_stall_s`, `vcpu_throttle_s`). The
    fault time slows a busy workload down (see the observation notes): for a CPU-bound one
    (`cpu_busy` 1) the `vcpu` cost equals the work the slow-down took from it; for one with
    spare time it also charges faults the workload did not feel. Downtime
    and lost vCPU time are weighted alike: both are seconds the whole VM does not run. At
    truncation the downtime a switchover would cause at that moment (remaining dirty bytes /
    measured bandwidth, or / the run's configured rate before any is measured; in a
    stop-and-copy under way, / the rate it sends at, the link's, plus the time the VM has been
    stopped) is the info's `truncation_downtime_s` (0 on other steps); it is charged only with
    a `truncation` weight (default 0), as the info's `reward_parts["truncation"]`
    (`reward_parts["downtime"]` is the downtime that happened). A truncated episode is cut
    short, not over: a learner that bootstraps there (stable-baselines3 does, on
    `TimeLimit.truncated`) already values what it left undone, and a charge would count it
    twice; give the weight (e.g. the `downtime` weight) to score policies by their episodes'
    returns where episodes truncate. A migration cancelled at `link.give_up_s` (with
    `link.give_up_action: cancel`, OpenStack nova's abort; the default `switchover` forces the
    switchover instead), or by an operator's migrate_cancel at `link.cancel_at_s` (as QEMU
    serves one then: ringenv/vmm/migration.py; one that comes as the VM stops for the
    switchover restarts it, and that stop is `downtime_s`, at the `downtime` weight), ends the
    episode with the migration still to be done: the downtime a
    switchover would have caused then (remaining dirty bytes / the rate as above) is the info's
    `cancel_downtime_s`, charged at the `cancel` weight (default 10, the `downtime` weight's
    default: a run that gives up does not score better than one forced to switch over).
    `reward_parts` has the same keys on every step.

    ## Starting State
    A VM (scenario: host profile, memory, vCPUs, link) running a workload drawn from the env's
    split of the workload set (`reset(options={"workload": name})` picks one by name, any known
    workload; `options` takes no other key); migration starts at the first step, `sample_s`
    into the workload's timeline (the reset's sample covered the seconds before). The seed
    gives the workload draw first, then the episode's own seed (`env.unwrapped.episode_seed`,
    see Attributes); with a workload in `options` nothing is drawn for it, so
    `reset(seed=s, options={"workload": w})` is another episode of `w` than the one
    `reset(seed=s)` gives when it draws `w`: replay an episode with the same call. With a
    `rate_scale_range` wider than one value, the seed then draws the episode's factor on the
    workload's write rates, log-uniformly from that range (after the other two draws, which stay
    those of an env without it); the episode is the one a scenario with that `rate_scale` gives.

    `reset()`'s `info`: `workload` (the episode's), `rate_scale` (the episode's factor on the
    workload's write rates: 1 unless `rate_scale_range` says otherwise), `sampled_dirty_rate_Bps` and
    `sampled_redirty_rate_Bps` (the pre-migration sample in bytes/s: observations 3 and 15
    before scaling), `ring_sizes` and `intervals_ms` (the action grids, as lists the caller may
    keep).

    ## Episode End
    - terminated: the migration completed (the VM was switched over and verified), or it was
      cancelled at `link.give_up_s` (`link.give_up_action: cancel`) or at `link.cancel_at_s`
      (info `cancelled`, charged at the `cancel` weight, Rewards). A give-up acts only if
      `link.give_up_s` is below `max_episode_s`: the shipped scenarios' (120 s and more) are not
      below the default 120 s, so their episodes truncate first (at equal times too)
    - truncated: `max_episode_s` of simulated time passed without convergence; the downtime a
      switchover would cause then (remaining dirty bytes / measured bandwidth, or / the run's
      configured rate, min(link, max-bandwidth), before the bandwidth is measured; during the
      stop-and-copy, / the link rate it sends at, plus the time stopped so far) is the info's
      `truncation_downtime_s`, charged with a `truncation` weight (Rewards). With such a weight,
      prefer `max_episode_s` to gymnasium's `max_episode_steps`: its TimeLimit truncates
      without the charge (and `truncation_downtime_s` stays 0).

    `step()` after the episode ended, or after `close()`, raises `RuntimeError` until `reset()`.

    Every step's `info` holds the VMM's metrics record (`ringenv.vmm.metrics.Metrics`, its
    tuple fields as lists), `reward_parts`, `truncation_downtime_s`, `cancel_downtime_s`, `workload`, `ring_entries`,
    `interval_ms` and `ring_size_ignored`; it is a `StepInfo`, a dict whose deep copy (which SB3 makes of every
    step's info) is cheap.

    ## Arguments
    `gymnasium.make("ringenv/Migration-v0", scenario="default", split="train", workloads=None,
    flatten_actions=False, render_mode=None, **overrides)`: `scenario` a name in
    configs/scenarios/ (None: "default"), a YAML path, a mapping (scenario fields over the default scenario's,
    e.g. `{"vm": {"memory": "1GiB"}, "host": "x86-pml"}`) or a ScenarioConfig; the fields the
    env decides itself are left aside in any of these as in a scenario file (its `workload`
    too: the env draws its workloads, below); `split` "train", "test" or
    "all" of the workload set; `workloads` an explicit list of workload names instead (a list or
    tuple; a set is refused: its order, hence each seed's draw, differs by process; so is a
    generator or other one-shot iterator: env.spec and a vector env's other envs need it again);
    `flatten_actions` True for the `Discrete` variant; `render_mode` None, "ansi" (`render()`
    returns one status line per step: simulated time, workload, ring size, interval, ring fill,
    dirty rate, ring-full exits, iteration, progress, reward) or "rgb_array" (a 240 x 480 x 3
    uint8 frame: each vCPU's ring fill against its soft limit, red from 0.9, and the share of
    memory sent; after reset the empty rings; drawn with matplotlib, the `rl` extra); env settings
    (`control_interval_ms`, simulated ms per step, default 50, 1e-6 (1 ns) to 1e9; `max_episode_s`,
    simulated seconds before truncation, default 120, up to 1e6; `sample_s`, the
    pre-migration sample's simulated seconds, default 1, up to 1e6; `sample_windows`, default 5;
    `ring_sizes` (each one the host accepts, once; default all of them), `intervals_ms` (each in
    1 .. 10000 ms, once), `reward`, `workload_set`, `rate_scale_range` ([low, high], 0.01 <= low <=
    high <= 100, default [1, 1]: each episode multiplies its workload's write rates by a factor
    drawn log-uniformly from it, on top of the scenario's `rate_scale`, with which it must keep
    an episode's rate_scale within 1e-3 .. 1e3 (checked when the env is made); domain randomisation for
    training, so that a policy meets each workload at other intensities than the one written
    down; `ringenv evaluate` runs the workloads as written and does not count it as a
    difference from a model's training)) and scenario fields (e.g. `vm`, `link`,
    `checkpoint`, `collector`, `throttle`; a mapping is merged into its section:
    `vm={"vcpus": 2}`) as keywords. The scenario fields the env decides itself are errors
    saying what to use instead: `workload` (`workloads=[...]`, or
    `reset(options={"workload": ...})`), `ring_entries` and `interval_ms` (the action; offer
    others with `ring_sizes` / `intervals_ms`), `kind` (the env id), the scenario's seed
    (`reset(seed=...)` seeds each episode), `name` and `description`.
    `collector="bitmap"` runs the classic dirty-bitmap collector instead (the baseline the ring
    competes with): the actions then change nothing, and `ring_entries` and `interval_ms` are 0.

    ## Attributes
    Of `env.unwrapped`, read-only: `scenario` (the validated `ringenv.config.ScenarioConfig`),
    `cfg` (the `EnvConfig`: control interval, time cap, grids, reward weights), `workloads` (the
    names episodes are drawn from), `ring_sizes` and `intervals_ms` (the action grids; these
    three are tuples), `flatten_actions`, `kind` ("migration" or "checkpoint"), `obs_rate_Bps` (what the rate
    observations are divided by, bytes/s); after a reset `workload`, `episode_seed` (the
    seed of the episode's VMM run, drawn from reset's seed) and `rate_scale` (as in `info`),
    after a step `ring_entries` and `interval_ms` (as in `info`); `episode_over` (the episode
    ended by the env's own rule, terminated or truncated: step() needs a reset). `decode_action(action)`
    gives (ring entries, interval ms), `encode_action(entries, ms)` the action nearest to them.

    An env pickles and deep-copies (`pickle`, `copy.deepcopy`) while no episode is under way:
    fresh, reset but not stepped, ended or closed. During an episode its VMM run (generator
    processes) cannot be copied and both raise `TypeError`: to duplicate an episode, make a new
    env with the same arguments, reset it with the same seed (and options) and replay the
    actions (same seed and actions give bit-identical observations, rewards and infos).

    ## Version History
    - v0: initial version; the observation gained `redirty_rate` and `redirty_share` (indices 15,
      16) and `sample_windows` before any release, and the default `control_interval_ms` became
      50 (was 200: 70 to 108 steps per migration; now 276 to 404); also before any release,
      `remaining` counts in the run's configured rate until the bandwidth is measured (it sat
      at its high for the first ~1 s) and the migration continues the workload the reset's
      sample measured (it replayed the sample's own second); and the time a vCPU spends in
      faults slows its workload past the workload's spare time (`cpu_busy`; the guest was
      open-loop, and `lost_vcpu` could exceed 1); with the bitmap collector `dirty_rate` is
      QEMU's rate over a >= 1 s period (it was the rate between the last two syncs, which spiked
      at the stop-and-copy's sync); a truncation is charged only with a `truncation` weight
      (default 0; it was charged at the `downtime` weight, which learners that bootstrap at
      truncation counted twice), and `reward_parts` has the `truncation` key on every step;
      `link.give_up_action: cancel` ends an episode cancelled, charged at the `cancel` weight
      (`reward_parts["cancel"]`, info `cancelled` and `cancel_downtime_s`), as does an
      operator's cancel at `link.cancel_at_s`; the `rate_scale_range` setting and reset's info
      `rate_scale` were added (the default draws nothing: episodes are unchanged); with the
      dirty-limit throttle, the part of a throttle sleep that a stop waits out counts as
      downtime only (it was charged as lost vCPU time too); `workloads` takes a list or tuple
      (a generator, which env.spec could not copy, is refused)
    """  # noqa: E501  (markdown table rows)

    kind = "migration"


class CheckpointEnv(RingEnv):
    """Tune the dirty ring while a VM is checkpointed periodically (a fixed horizon of checkpoints).

    ## Description
    As :class:`MigrationEnv`, but the VMM writes an incremental checkpoint every period (the
    first as soon as the base image is written): it harvests the dirty set and writes those
    pages to storage at the storage bandwidth; with a stop-the-world checkpoint the guest pauses
    while the final dirty set is saved (that pause is the checkpoint's downtime). Fewer dirty
    pages per period make the ring win.

    ## Action Space, Observation Space
    As :class:`MigrationEnv`, except that the link plays no part: the rate observations
    (`dirty_rate`, `sampled_rate`, `bandwidth`, `redirty_rate`) are divided by the checkpoint
    storage rate (`checkpoint.storage_mbps` x 10^6 bytes/s: the env's `obs_rate_Bps`), and
    `remaining` is log10(1 + the pause in ms a stop-the-world write of the dirty bytes not yet
    checkpointed would take at the storage rate), i.e. log10(1 + remaining bytes / (write rate
    x 1 ms)): 1 for a 9 ms pause, 3 for 1 s, 6 (the high) for 1000 s; the write rate is the
    bandwidth last measured (over >= 100 ms windows of writing: the base image's, then that of
    each checkpoint that writes that long; a few % below the storage rate, as a checkpoint's
    sync and pause count in its window), the storage rate before any is measured. `progress` is the share
    of RAM in the image (1 once the base image is written), `iteration` the dirty syncs so far /
    32 (the set-up's, then one per stop-the-world checkpoint, two per live one).

    ## Rewards
    As :class:`MigrationEnv`, downtime being each checkpoint's pause, charged in the step where
    it ends: over an episode, the sum of the pauses (`info["pause_total_s"]`; `info["downtime_s"]`
    is the longest one).

    ## Episode End
    - terminated: the checkpoint horizon (`checkpoint.horizon_s` of the scenario) is over (a
      checkpoint under way at the horizon is finished first)
    - truncated: `max_episode_s` of simulated time passed first: a horizon longer than that, or
      checkpoints that take longer (a big VM on slow storage: the base image of the `stress`
      scenario alone takes longer than the default 120 s). The pause writing the dirty bytes not
      yet checkpointed would take at the write rate (as for `remaining`; during a pause, at the
      storage rate the pause writes at), and of a pause under way the time the VM has been
      paused, is the info's `truncation_downtime_s`, charged with a `truncation` weight (as in
      MigrationEnv's Rewards).

    ## Arguments
    `gymnasium.make("ringenv/Checkpoint-v0", scenario="default", ...)`, as MigrationEnv. The
    checkpoint settings are the scenario's `checkpoint` section: the `default` scenario has none,
    so it checkpoints with the section's defaults (every 10 s at 2000 MB/s for 60 s,
    stop-the-world) its 16 GiB guest; the shipped `checkpoint` scenario (8 GiB, 4 vCPUs)
    checkpoints every 5 s (`scenario="checkpoint"`), and `checkpoint={"period_s": 5}` changes
    one setting.

    ## Version History
    - v0: initial version; before any release the rate observations became relative to the
      storage rate (were the link's), `remaining` a pause in ms, and every pause is charged
      (only a new longest one was); the guest became closed-loop as in MigrationEnv; a
      truncation is charged only with a `truncation` weight (as in MigrationEnv); with the
      dirty-limit throttle, a pause that waits out a throttle sleep is charged as the pause only
      (the sleep's rest was charged as lost vCPU time too)
    """

    kind = "checkpoint"


# ---------------------------------------------------------------------------------- helpers
_ATOMS = frozenset({int, float, bool, str, type(None), np.float64, np.int64, np.bool_})


class _Discrete:
    """The ``Discrete`` variant of an env (its ``…Discrete-v0`` id): ``flatten_actions`` is True
    and cannot be turned off (use the ``MultiDiscrete`` id for that)."""

    _multi_id = ""

    def __init__(self, scenario: Any = "default", *, flatten_actions: bool = True, **kwargs):
        if flatten_actions is not True:
            raise ConfigError(f"flatten_actions: {flatten_actions!r}; this is the Discrete variant (accepted: True); "
                              f"make {self._multi_id} for the MultiDiscrete action")
        super().__init__(scenario, flatten_actions=True, **kwargs)


class MigrationDiscreteEnv(_Discrete, MigrationEnv):
    """``ringenv/MigrationDiscrete-v0``: :class:`MigrationEnv` with its action flattened into one
    ``Discrete`` (for DQN)."""

    _multi_id = "ringenv/Migration-v0"


class CheckpointDiscreteEnv(_Discrete, CheckpointEnv):
    """``ringenv/CheckpointDiscrete-v0``: :class:`CheckpointEnv` with its action flattened into one
    ``Discrete`` (for DQN)."""

    _multi_id = "ringenv/Checkpoint-v0"


class StepInfo(dict):
    """The ``info`` dict of a step (a plain dict in every other respect).

    stable-baselines3's DummyVecEnv deep-copies every step's infos; a generic deep copy of this
    one (some 50 entries) would cost a large share of a step. Its values are numbers, strings
    and flat lists or dicts of numbers, so ``copy.deepcopy`` copies those one level deep
    (exactly a deep copy: their items are immutable) and deep-copies anything else, e.g. what a
    wrapper adds, as usual."""

    __slots__ = ()

    def __deepcopy__(self, memo):
        out = StepInfo()
        for k, v in self.items():
            t = type(v)
            if t in _ATOMS:
                out[k] = v
            elif t is list and all([type(x) in _ATOMS for x in v]):
                out[k] = v.copy()
            elif t is dict and all([type(x) in _ATOMS for x in v.values()]):
                out[k] = v.copy()
            else:
                out[k] = copy.deepcopy(v, memo)
        memo[id(self)] = out
        return out


def _workload_option(options) -> str | None:
    """The ``workload`` of reset's ``options`` (None: drawn from the split), checked: options
    must be None or a dict whose only key is ``workload``, a known workload's name."""
    if options is None:
        return None
    if not isinstance(options, dict):
        raise ConfigError(f"options: expected a dict such as {{'workload': 'web'}}, or None; got {options!r}")
    for k in options:
        if k != "workload":
            raise ConfigError(f"options: unknown key {k!r}; accepted: workload")
    workload = options.get("workload")
    if workload is not None:
        if not isinstance(workload, str):
            raise ConfigError(f"options: workload: expected a workload name, got {workload!r}")
        load_workload(workload, where="options: workload")
    return workload


def _lost_vcpu_s(m) -> float:
    """vCPU-seconds the guest did not run because of dirty tracking: write-protect faults and
    splits, ring-full exits (with the reaping done on the vCPU thread), waits for the big lock,
    and throttle sleeps."""
    return m.vcpu_fault_s + m.vcpu_exit_s + m.vcpu_stall_s + m.vcpu_throttle_s


def _integer_indices(action, n_sizes: int, n_intervals: int, flat: bool) -> tuple[int, int] | None:
    """(ring size index, interval index) of an action given as integers in range (a numpy
    integer array or scalar, or Python ints): every such action is in the action space. None
    for anything else (:meth:`RingEnv.decode_action` then checks it against the space)."""
    a = np.asarray(action)
    if a.dtype.kind not in "iu":
        return None
    if flat:
        if a.shape not in ((), (1,)):
            return None
        k = a.item()
        return divmod(k, n_intervals) if 0 <= k < n_sizes * n_intervals else None
    if a.shape != (2,):
        return None
    i, j = a.tolist()
    return (i, j) if 0 <= i < n_sizes and 0 <= j < n_intervals else None


def _mean(values: tuple[float, ...]) -> float:
    """The mean as numpy's ``mean`` computes it (its pairwise sum), 0 for no values."""
    return float(np.add.reduce(np.array(values))) / len(values) if values else 0.0


def _clip_observation(values: list[float]) -> np.ndarray:
    """The observation as float32, each value clipped to [0, its bound] exactly as ``np.clip``
    clips a float64 array (NaN kept; -0.0 becomes 0.0), without building that array."""
    return np.array([(x if x < high else high) if x > 0.0 else (0.0 if x == x else x)
                     for x, high in zip(values, _OBS_HIGH_LIST)], dtype=np.float32)


def _open_session(kind, scenario, workload, seed, ring_entries, interval_ns, control_interval_ms, sample_s):
    """The VMM run behind an episode: a MigrationRun or CheckpointRun of the scenario with the
    episode's workload, seed and ring size (ringenv.vmm). The host is synchronised with the VMM
    at every control interval, so each observation describes the step's end exactly. The run
    starts ``sample_s`` into the workload's timeline: the reset's dirty-rate sample covered the
    seconds before it (``workload_start_s``, see ringenv.vmm.dirtyrate)."""
    if kind == "migration":
        from .vmm.migration import MigrationRun as Run
    else:
        from .vmm.checkpoint import CheckpointRun as Run
    return Run(scenario, seed=seed, workload=workload, ring_entries=ring_entries,
               interval_ms=interval_ns / MS, host_sync_ms=control_interval_ms, workload_start_s=sample_s)


def nearest_choices(ring_sizes, intervals_ms, ring_entries: float, interval_ms: float) -> tuple[int, int]:
    """The indexes of the offered ring size and harvest interval nearest to ``ring_entries`` and
    ``interval_ms`` on a log scale (a tie goes to the first offered); +inf is nearest the
    largest, as is an int too large for a float. A value that is not a number > 0 is a ValueError
    naming the argument."""
    out = []
    for name, choices, value in (("ring_entries", ring_sizes, ring_entries),
                                 ("interval_ms", intervals_ms, interval_ms)):
        try:
            v = float(value)
        except (TypeError, ValueError):
            v = math.nan
        except OverflowError:  # an int too large for a float: as an infinity of its sign
            v = math.inf if value > 0 else -math.inf
        if not v > 0:
            raise ValueError(f"{name} {value!r}: expected a number > 0 (the nearest of "
                             f"{', '.join(map(str, choices))} is taken)")
        if math.isinf(v):
            out.append(int(np.argmax(choices)))
        else:
            out.append(min(range(len(choices)), key=lambda k: abs(math.log(choices[k]) - math.log(v))))
    return out[0], out[1]


def _render_rgb(env: RingEnv, obs: np.ndarray | None, info: dict) -> np.ndarray:
    """The rgb_array frame. The figure is built once per env (:class:`_RgbFrame`) and each frame
    redraws only what changes on the saved background (~5 ms a frame; ~75 ms when every frame
    built and laid out a new figure)."""
    frame = env.__dict__.get("_rgb")
    if frame is None:
        frame = _RgbFrame(env.scenario.vm.vcpus, env.scenario.collector == "ring")
        env._rgb = frame
    ring = env.scenario.collector == "ring"
    fill = np.asarray(info.get("ring_fill", np.zeros(env.scenario.vm.vcpus if ring else 0)), dtype=float)
    if not ring:
        how = "bitmap collector (no ring)"
    elif not getattr(env, "ring_entries", 0):  # (none before the first reset, either)
        how = "ring size chosen by the first step's action"
    else:
        how = f"ring {env.ring_entries}, every {env.interval_ms:.0f} ms"
    return frame.draw(fill, 0.0 if obs is None else float(obs[7]),
                      f"{getattr(env, 'workload', 'no episode yet')}: {how}", f"iter {info.get('iterations', 0)}")


class _RgbFrame:
    """An Agg canvas of its own (no pyplot: the caller's matplotlib backend and figures are left
    alone): each vCPU's ring fill against its soft limit (red from 0.9) and the share of memory
    sent. Laid out and drawn once without the bars and titles, whose background is kept; a
    frame restores it and draws those on it (blitting)."""

    def __init__(self, vcpus: int, ring: bool):
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as e:
            raise gym.error.DependencyNotInstalled(
                'render_mode="rgb_array" draws with matplotlib, which is not installed: pip install matplotlib '
                '(or the rl extra: pip install "ringenv[rl]")') from e
        self.fig = fig = Figure(figsize=(6.4, 3.2), dpi=75)
        self.canvas = FigureCanvasAgg(fig)
        a1, a2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
        n = vcpus if ring else 0
        self.fill = list(a1.bar(np.arange(n), np.zeros(n), color="tab:blue"))
        a1.set_xlim(-0.6, vcpus - 0.4)
        a1.set_ylim(0, 1.05)
        a1.set_xlabel("vCPU")
        a1.set_ylabel("ring fill / soft limit")
        self.sent = a2.bar([0], [0.0], color="tab:green")[0]
        a2.set_ylim(0, 1)
        a2.set_xticks([0], ["sent"])
        self.titles = (a1.set_title(" ", fontsize=8), a2.set_title(" ", fontsize=8))
        fig.tight_layout()
        self.dynamic = [*self.fill, self.sent, *self.titles]
        for a in self.dynamic:
            a.set_animated(True)
        self.canvas.draw()
        self.background = self.canvas.copy_from_bbox(fig.bbox)

    def draw(self, fill: np.ndarray, sent: float, title: str, right_title: str) -> np.ndarray:
        self.canvas.restore_region(self.background)
        for bar, f in zip(self.fill, fill.tolist()):
            bar.set_height(f)
            bar.set_color("tab:red" if f >= 0.9 else "tab:blue")
        self.sent.set_height(sent)
        self.titles[0].set_text(title)
        self.titles[1].set_text(right_title)
        for a in self.dynamic:
            self.fig.draw_artist(a)
        return np.asarray(self.canvas.buffer_rgba())[..., :3].copy()
