"""Cross-check the simulator against the real KVM on the built-in traces."""

from __future__ import annotations

from typing import Any, Callable

from ringenv.config import ConfigError
from ringenv.realkvm.arch import host_arch
from ringenv.realkvm.replay import kvm_counts_faults, kvm_replay_trace
from ringenv.realkvm.traces import builtin_traces

IDENTICAL = "identical"
SKIPPED = "skipped"  # the host refuses the trace's ring size (x86 with PML: 1024 entries at least)


def _first_diff(path: str, real: Any, sim: Any) -> str | None:
    if isinstance(real, dict) and isinstance(sim, dict):
        for key in real.keys() | sim.keys():
            if key not in real or key not in sim:
                return f"{path}.{key}: only in {'real' if key in real else 'sim'}"
        for key in real:
            diff = _first_diff(f"{path}.{key}", real[key], sim[key])
            if diff:
                return diff
        return None
    if isinstance(real, list) and isinstance(sim, list):
        for i, (a, b) in enumerate(zip(real, sim)):
            diff = _first_diff(f"{path}[{i}]", a, b)
            if diff:
                return diff
        if len(real) != len(sim):
            return f"{path}: length real {len(real)}, sim {len(sim)}"
        return None
    return None if real == sim else f"{path}: real {real!r}, sim {sim!r}"


def compare(real: dict, sim: dict) -> str | None:
    """First difference between a real and a simulated replay, or None if they agree.

    Compared: ring_entries, soft_limit, faults (when the real replay counted them: the data
    slot's stage-2 faults, all vCPUs; and per vCPU); per vCPU full_exits, lost (always 0 on the real side:
    KVM counts no overwritten entry, it only WARNs, so a simulated loss is a difference),
    batches (trigger, offsets in order) and exits (the kinds of its exits in order: full, sync,
    mmio, done). Resets: the whole top-level list for one vCPU; with several vCPUs (whose reset
    order depends on thread timing) each vCPU's own list and the final reset. Sound for traces
    whose outcome does not depend on thread timing (:func:`ringenv.replay.timing_dependent`),
    as every built-in one; for others the real KVM gives one of several outcomes.
    """
    keys = ("ring_entries", "soft_limit") + (("faults",) if "faults" in real else ())
    per_vcpu = ("full_exits", "lost", "batches", "exits") + (("faults",) if "faults" in real else ())
    if len(real["vcpus"]) > 1:
        per_vcpu += ("resets",)
    view = [
        lambda out: {k: out[k] for k in keys},
        lambda out: {"vcpus": [{k: v[k] for k in per_vcpu} for v in out["vcpus"]]},
        (lambda out: {"resets": out["resets"]}) if len(real["vcpus"]) == 1
        else (lambda out: {"final_reset": out["resets"][-1:]}),
    ]
    for pick in view:
        diff = _first_diff("", pick(real), pick(sim))
        if diff:
            return diff.lstrip(".")
    return None


def simulator() -> Callable[..., dict]:
    """``ringenv.replay.replay_trace`` (imported lazily: raises ImportError if missing)."""
    from ringenv.replay import replay_trace
    return replay_trace


def validate(traces: dict[str, dict] | None = None) -> dict[str, str]:
    """Run each trace on the real KVM and in the simulator: name -> "identical" or the diff."""
    replay_trace = simulator()
    profile = host_arch().profile_name()
    faults = kvm_counts_faults()  # (the fault counts are compared where the host counts them)
    result = {}
    for name, trace in (traces or builtin_traces()).items():
        try:
            real = kvm_replay_trace(trace, faults=faults)
        except ConfigError as exc:  # a ring size this host refuses: not a difference
            if "ring_entries" not in str(exc):
                raise
            result[name] = f"{SKIPPED}: {exc}"
            continue
        sim = replay_trace(trace, profile=profile, ring_entries=real["ring_entries"])
        result[name] = compare(real, sim) or IDENTICAL
    return result
