"""Scripted dirty-ring collectors as policies.

Every policy answers ``predict(observation, state=None, episode_start=None, deterministic=True)
-> (action, state)`` as a stable-baselines3 model does (one observation or a batch), so the
evaluation treats a heuristic and a trained model alike. They read only the observation (see the
MigrationEnv docstring for its fields) and :class:`agents.common.EnvFacts` (action grids, the
rate the rate observations are divided by, page size, vCPUs, reserved ring entries). The ring
size is taken by the environment from the first action of an episode; a policy sees that it is
choosing it when ``ring_fixed`` (obs 14) is 0.

| name | spec | what it does |
|---|---|---|
| QEMU default | ``qemu`` | 4096 entries, reaper every 1000 ms (the ``dirty-ring-size`` QEMU's documentation suggests, its own default being 0: the bitmap; and its fixed 1 s sleep) |
| fixed | ``fixed:ENTRIES:MS`` | one member of the grid, held for the whole episode |
| fill watermark | ``watermark[:THRESHOLD[:ENTRIES or auto]]`` | the longest interval in which the fullest ring's predicted growth stays below THRESHOLD of its soft limit (the fill already there not counted); once the fill is above THRESHOLD, one control interval (ENTRIES default 4096) |
| rate-proportional | ``rate[:MIB[:ENTRIES]]`` | harvest every time the guest has dirtied MIB MiB: interval = MIB / dirty rate (ENTRIES default 4096) |
| bitmap | ``bitmap`` | the KVM_GET/CLEAR_DIRTY_LOG collector (needs ``collector="bitmap"`` honoured by the env) |
| random | ``random[:SEED]`` | a uniformly random action every step, drawn from the episode's seed (and SEED: another stream per SEED) |

A ring size or interval a policy names (ENTRIES, MS, and QEMU's 4096 entries / 1000 ms) must be a
member of the environment's action grid (``ring_sizes``, ``intervals_ms``): the action cannot say
anything else, and snapping it to the nearest member would run one thing under the label of
another. Off-grid values are an error naming the value and the grid; change the grid
(``--set intervals_ms=[...]`` / ``ring_sizes=[...]``) to use them. The watermark and
rate-proportional policies compute intervals and pick the nearest offered one by design.
"""  # noqa: E501  (markdown table rows)

from __future__ import annotations

import math

import numpy as np

from .common import EnvFacts

# observation indices (MigrationEnv docstring)
FILL_MAX, FILL_MEAN, DIRTY_RATE, SAMPLED_RATE, RING_SIZE, INTERVAL, RING_FIXED = 0, 1, 2, 3, 12, 13, 14


class Policy:
    """Base: a stateless map from one observation to one action, batched by :meth:`predict`."""

    name = "policy"
    #: keyword arguments the environment must be made with for this policy (e.g. the bitmap)
    env_kwargs: dict = {}

    def __init__(self, facts: EnvFacts):
        self.facts = facts

    def reset(self, seed: int | None = None) -> None:
        """Called at the start of each episode (a random policy reseeds here)."""

    def act(self, obs: np.ndarray):
        raise NotImplementedError

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):
        obs = np.asarray(observation, dtype=np.float64)
        if obs.ndim == 1:
            return self.act(obs), state
        return np.stack([np.asarray(self.act(o)) for o in obs]), state

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def check_ring(facts: EnvFacts, entries: int, what: str = "ENTRIES") -> int:
    """``entries`` if the action grid offers it, else a ValueError naming it and the grid."""
    if int(entries) not in facts.ring_sizes:
        raise ValueError(f"{what} {entries} is not one of the environment's ring sizes; accepted ring_sizes: "
                         f"{', '.join(map(str, facts.ring_sizes))} (change them with --set ring_sizes=[...])")
    return int(entries)


def check_interval(facts: EnvFacts, interval_ms: float, what: str = "interval") -> float:
    """The offered interval equal to ``interval_ms``, else a ValueError naming it and the grid."""
    for m in facts.intervals_ms:
        if math.isclose(float(m), float(interval_ms), rel_tol=1e-9):
            return float(m)
    raise ValueError(f"{what} {interval_ms:g} ms is not one of the environment's intervals; accepted intervals_ms: "
                     f"{', '.join(f'{m:g}' for m in facts.intervals_ms)} (change them with --set intervals_ms=[...])")


class Fixed(Policy):
    """One (ring entries, interval) pair for the whole episode; both must be members of the
    action grid (``strict=False``: the nearest members, for a policy whose action is ignored)."""

    def __init__(self, facts: EnvFacts, ring_entries: int, interval_ms: float, name: str | None = None,
                 strict: bool = True):
        super().__init__(facts)
        self.ring_entries, self.interval_ms = int(ring_entries), float(interval_ms)
        if strict:
            check_ring(facts, self.ring_entries, "ENTRIES")
            self.interval_ms = check_interval(facts, self.interval_ms, "interval")
        self.action = facts.encode(self.ring_entries, self.interval_ms)
        self.name = name or f"fixed {self.ring_entries}/{self.interval_ms:g}ms"

    def act(self, obs):
        return self.action


def QemuDefault(facts: EnvFacts) -> Fixed:
    """QEMU's defaults: ``dirty-ring-size=4096`` and the reaper's fixed 1 s sleep."""
    return Fixed(facts, 4096, 1000.0, name="qemu default")


def _entries_per_vcpu_s(facts: EnvFacts, rate_obs: float) -> float:
    """Ring entries pushed per vCPU per second for a dirty-rate observation (rate / ``facts.link_Bps``)."""
    return rate_obs * facts.link_Bps / facts.page_size / facts.vcpus


class FillWatermark(Policy):
    """Harvest before the fullest ring is predicted to reach ``threshold`` of its soft limit.

    From the dirty-rate estimate (ring entries per second) and the spread between the fullest and
    the mean ring (a hot vCPU fills faster than the average), the fullest ring grows by
    ``g = rate per vCPU x skew / soft limit`` per second; the interval is the longest offered one
    with ``g x interval <= threshold`` (the shortest if none is). When the fullest ring is
    already above the threshold, the shortest interval that is at least a control interval
    (to harvest at once, but not spin). The ring size is ``ring_entries``, or with ``"auto"`` the
    smallest ring whose threshold holds the sampled rate's entries for ``auto_interval_ms``.

    The prediction does not add the fill already in the ring, so the fullest ring can end an
    interval above the threshold (it did in 186 of 308 steps of oltp-heavy at threshold 0.2, with
    no ring-full exit); and above it the rule's one control interval (50 ms) can be longer than
    the 10-20 ms it picks just below. A baseline as documented, not a tuned one; the README's
    tables are this rule's."""

    def __init__(self, facts: EnvFacts, threshold: float = 0.5, ring_entries: int | str = 4096,
                 default_skew: float = 1.5, auto_interval_ms: float = 1000.0):
        super().__init__(facts)
        if not 0 < threshold <= 1:
            raise ValueError(f"watermark threshold {threshold}: expected 0 < threshold <= 1")
        if ring_entries != "auto":
            ring_entries = check_ring(facts, ring_entries, "ENTRIES")
        self.threshold, self.ring_entries, self.default_skew = threshold, ring_entries, default_skew
        self.auto_interval_ms = auto_interval_ms
        self.name = f"watermark {threshold:g}" + (f" ring {ring_entries}" if ring_entries != 4096 else "")

    def _skew(self, obs) -> float:
        if obs[FILL_MEAN] > 0.01:
            return float(np.clip(obs[FILL_MAX] / obs[FILL_MEAN], 1.0, self.facts.vcpus))
        return self.default_skew

    def choose_ring(self, obs) -> int:
        if self.ring_entries != "auto":
            return int(self.ring_entries)
        need = _entries_per_vcpu_s(self.facts, obs[SAMPLED_RATE]) * self.default_skew * self.auto_interval_ms / 1000
        sizes = sorted(self.facts.ring_sizes)  # (the env's grid may come in any order)
        for n in sizes:
            if self.threshold * self.facts.soft_limit(n) >= need:
                return n
        return sizes[-1]

    def interval_for(self, entries: int, rate_obs: float, skew: float, fill_max: float) -> float:
        ivs = sorted(self.facts.intervals_ms)
        if fill_max >= self.threshold:
            return next((m for m in ivs if m >= self.facts.control_interval_ms), ivs[-1])
        growth = _entries_per_vcpu_s(self.facts, rate_obs) * skew / self.facts.soft_limit(entries)  # fill per s
        if growth <= 0:
            return ivs[-1]
        ok = [m for m in ivs if growth * m / 1000 <= self.threshold]
        return ok[-1] if ok else ivs[0]

    def act(self, obs):
        if obs[RING_FIXED] < 0.5:  # first action: the ring size is chosen now; rate = pre-migration sample
            entries = self.choose_ring(obs)
            return self.facts.encode(entries, self.interval_for(entries, obs[SAMPLED_RATE], self.default_skew, 0.0))
        entries = int(round(2 ** (obs[RING_SIZE] * 16)))
        rate = max(obs[DIRTY_RATE], 0.0)
        return self.facts.encode(entries, self.interval_for(entries, rate, self._skew(obs), obs[FILL_MAX]))


class RateProportional(Policy):
    """Interval inversely proportional to the dirty rate: one harvest per ``mib`` MiB the guest
    dirties (VM-wide), clipped to the offered intervals; ring ``ring_entries`` (default 4096)."""

    def __init__(self, facts: EnvFacts, mib: float = 64.0, ring_entries: int = 4096):
        super().__init__(facts)
        if not mib > 0 or math.isinf(mib):
            raise ValueError(f"MIB {mib:g}: expected a number > 0 (MiB dirtied per harvest)")
        self.mib, self.ring_entries = mib, check_ring(facts, ring_entries, "ENTRIES")
        self.name = f"rate {mib:g}MiB" + (f" ring {ring_entries}" if ring_entries != 4096 else "")

    def interval_for(self, rate_obs: float) -> float:
        rate = rate_obs * self.facts.link_Bps
        ivs = self.facts.intervals_ms
        if rate <= 0:
            return max(ivs)
        return float(np.clip(self.mib * (1 << 20) / rate * 1000, min(ivs), max(ivs)))

    def act(self, obs):
        rate = obs[SAMPLED_RATE] if obs[RING_FIXED] < 0.5 else obs[DIRTY_RATE]
        return self.facts.encode(self.ring_entries, self.interval_for(rate))


class Bitmap(Fixed):
    """The dirty-bitmap collector (KVM_GET/CLEAR_DIRTY_LOG at every migration sync): the
    baseline the ring competes with. The action is irrelevant; the environment must be made with
    ``collector="bitmap"`` and report ``info["collector"] == "bitmap"`` (evaluation checks)."""

    env_kwargs = {"collector": "bitmap"}

    def __init__(self, facts: EnvFacts):
        super().__init__(facts, 4096, 1000.0, name="bitmap", strict=False)


class Random(Policy):
    """A uniformly random action every step, seeded at each episode start from the episode's
    seed, and with ``seed`` (random:SEED) from both: another stream per SEED."""

    name = "random"

    def __init__(self, facts: EnvFacts, seed: int | None = None):
        super().__init__(facts)
        if seed is not None and seed < 0:
            raise ValueError(f"SEED {seed}: expected an integer >= 0")
        self.seed = seed
        if seed is not None:
            self.name = f"random {seed}"
        self.rng = np.random.default_rng(seed)

    def reset(self, seed=None):
        if seed is not None:
            self.rng = np.random.default_rng(seed if self.seed is None else [self.seed, seed])

    def act(self, obs):
        i = int(self.rng.integers(len(self.facts.ring_sizes)))
        j = int(self.rng.integers(len(self.facts.intervals_ms)))
        return self.facts.encode(self.facts.ring_sizes[i], self.facts.intervals_ms[j])


#: the heuristics ``ringenv run`` compares by default
DEFAULT_SET = ["qemu", "fixed:65536:5000", "fixed:4096:100", "watermark", "watermark:0.5:auto", "rate", "bitmap",
               "random"]


SPECS = ("qemu, fixed:ENTRIES:MS, watermark[:THRESHOLD[:ENTRIES|auto]], rate[:MIB[:ENTRIES]], bitmap, "
         "random[:SEED]")


def _int(part: str, what: str) -> int:
    try:
        return int(part)
    except ValueError:
        raise ValueError(f"{what} {part!r} is not an integer") from None


def _number(part: str, what: str) -> float:
    try:
        return float(part)
    except ValueError:
        raise ValueError(f"{what} {part!r} is not a number") from None


def make_heuristic(spec: str, facts: EnvFacts) -> Policy:
    """A heuristic from its spec string (table in the module docstring), for the environment
    described by ``facts``: a ring size or interval the spec names must be on its action grid."""
    name, *args = spec.split(":")
    try:
        if name == "qemu" and not args:
            check_ring(facts, 4096, "QEMU's default ring size")
            check_interval(facts, 1000.0, "QEMU's default interval")
            return QemuDefault(facts)
        if name == "fixed" and len(args) == 2:
            return Fixed(facts, _int(args[0], "ENTRIES"), _number(args[1], "MS"))
        if name == "watermark" and len(args) <= 2:
            ring = (args[1] if args[1] == "auto" else _int(args[1], "ENTRIES")) if len(args) > 1 else 4096
            try:
                return FillWatermark(facts, _number(args[0], "THRESHOLD") if args else 0.5, ring)
            except ValueError as e:
                if len(args) > 1 or not str(e).startswith("ENTRIES"):
                    raise
                raise ValueError(f"{e}; ENTRIES is 4096 unless given: watermark:THRESHOLD:ENTRIES") from None
        if name == "rate" and len(args) <= 2:
            mib = _number(args[0], "MIB") if args else 64.0
            ring = _int(args[1], "ENTRIES") if len(args) > 1 else 4096
            try:
                return RateProportional(facts, mib, ring)
            except ValueError as e:
                if len(args) > 1 or not str(e).startswith("ENTRIES"):
                    raise
                raise ValueError(f"{e}; ENTRIES is 4096 unless given: rate:MIB:ENTRIES") from None
        if name == "bitmap" and not args:
            return Bitmap(facts)
        if name == "random" and len(args) <= 1:
            return Random(facts, _int(args[0], "SEED") if args else None)
    except ValueError as e:
        raise ValueError(f"policy {spec!r}: {e}") from None
    raise ValueError(f"policy {spec!r}: unknown; accepted: {SPECS}, or a trained model (a .zip path)")


def is_heuristic(spec: str) -> bool:
    return spec.split(":")[0] in {"qemu", "fixed", "watermark", "rate", "bitmap", "random"}


def heuristic_env_kwargs(spec: str) -> dict:
    """Keyword arguments of ``gymnasium.make`` the heuristic ``spec`` needs."""
    return dict(Bitmap.env_kwargs) if spec.split(":")[0] == "bitmap" else {}
