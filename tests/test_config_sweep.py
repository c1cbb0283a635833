"""A systematic sweep of every config field: a wrong type and, for numbers and enums, an
out-of-range or unknown value, fed through the public loaders. Each must raise ConfigError
naming the field's dotted path, the bad value and what is accepted (docs/DESIGN.md).

The fields are enumerated from ``model_fields``: a field added later is swept automatically."""

from __future__ import annotations

import math
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import numpy as np
import pydantic
import pytest
import yaml
from pydantic import BaseModel

from ringenv import config as C
from ringenv.config import ConfigError, EnvConfig, load_host_profile, load_scenario, load_workload

ACCEPTED_PHRASES = ("accepted", "expected", "Input should be", "must be", "greater than", "less than",
                    "unknown key", "remove it")

BASE_WORKLOAD = {"name": "w", "regions": [{"fraction": 0.5, "rate_mbps": 10.0}],
                 "phases": {"calm_multiplier": 1.0, "burst_multiplier": 2.0}}
BASE_HOST = yaml.safe_load((C.CONFIG_DIR / "hosts" / "arm64-4k.yaml").read_text())


def _with(d: dict, path: list, value) -> dict:
    """A deep copy of ``d`` with ``path`` (keys / list indices) set to ``value``."""
    import copy

    d = copy.deepcopy(d)
    cur = d
    for k in path[:-1]:
        cur = cur[k]
    cur[path[-1]] = value
    return d


def _host_loader(tmp_path: Path):
    def load(path: list, value):
        f = tmp_path / "h.yaml"
        f.write_text(yaml.safe_dump(_with(BASE_HOST, path, value)))
        C._LOAD_CACHE.clear()
        return load_host_profile(str(f))
    return load


def _scenario(path: list, value):
    over: Any = value
    for k in reversed(path):
        over = {k: over}
    return load_scenario("default", **over)


def _workload(path: list, value):
    return load_workload(_with(BASE_WORKLOAD, path, value))


def _env(path: list, value):
    over: Any = value
    for k in reversed(path[1:]):
        over = {k: over}
    return EnvConfig.parse({path[0]: over}, where="env")


# (model, loader name, path prefix inside the loader's input, dotted prefix in the message)
MODELS = [
    (C.ScenarioConfig, "scenario", [], ""),
    (C.VmConfig, "scenario", ["vm"], "vm."),
    (C.LinkConfig, "scenario", ["link"], "link."),
    (C.CheckpointConfig, "scenario", ["checkpoint"], "checkpoint."),
    (C.AutoConvergeConfig, "scenario", ["auto_converge"], "auto_converge."),
    (C.DirtyLimitConfig, "scenario", ["dirty_limit"], "dirty_limit."),
    (C.WorkloadConfig, "workload", [], ""),
    (C.RegionConfig, "workload", ["regions", 0], "regions.0."),
    (C.PhaseConfig, "workload", ["phases"], "phases."),
    (C.HostProfile, "host", [], ""),
    (C.HostCosts, "host", ["costs"], "costs."),
    (C.EnvConfig, "env", [], ""),
    (C.RewardConfig, "env", ["reward"], "reward."),
]

SIZE_FIELDS = {("VmConfig", "memory"), ("VmConfig", "eager_split_chunk"), ("LinkConfig", "device_state_bytes")}


def _base_types(ann) -> list:
    if get_origin(ann) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return [a for a in get_args(ann) if a is not type(None)]
    return [ann]


def _kind(model, name) -> str:
    f = model.model_fields[name]
    if (model.__name__, name) in SIZE_FIELDS:
        return "size"
    types = _base_types(f.annotation)
    if any(get_origin(t) is Literal for t in types):
        return "literal"
    if any(isinstance(t, type) and issubclass(t, BaseModel) for t in types):
        return "model"
    if bool in types:
        return "bool"
    if any(t in (int, float) for t in types):
        return "number"
    if any(get_origin(t) is list for t in types):
        return "list"
    if dict in types or any(get_origin(t) is dict for t in types):
        return "dict"
    if str in types:
        return "str"
    return "any"


def _cases():
    """(id, model, loader, path, value, dotted field, shown value)."""
    for model, loader, prefix, dotted in MODELS:
        for name in model.model_fields:
            kind = _kind(model, name)
            path, field = prefix + [name], dotted + name
            bad: list = []
            # a wrong type
            if kind in ("str", "literal"):
                bad.append(({"a": 1}, "{'a': 1}"))
            elif kind == "dict":
                bad.append(("bogus", "bogus"))
            elif kind == "model":
                bad.append((12345, "12345"))
            else:
                bad.append(("bogus", "bogus"))
            # out of range / unknown
            if kind == "literal":
                bad.append(("no-such-choice", "no-such-choice"))
            elif kind == "size":
                bad.append((-4096, "-4096"))
            elif kind == "number":
                b = C.field_bounds(model.model_fields[name])
                if "gt" in b:
                    bad.append((b["gt"], str(b["gt"])))
                if "ge" in b:
                    bad.append((b["ge"] - 1, str(b["ge"] - 1)))
                if "lt" in b:
                    bad.append((b["lt"], str(b["lt"])))
                if "le" in b:
                    bad.append((b["le"] + 1, str(b["le"] + 1)))
                if not b and name != "max_bandwidth_mibps":
                    bad.append((-1, "-1"))
                bad.append((True, "True"))  # a bool is not a number
                if loader != "host":  # (a host profile is read from YAML, which has no numpy bool)
                    bad.append((np.True_, repr(np.True_)))  # nor is numpy's (pydantic took it as 1)
                if name != "max_bandwidth_mibps":  # a quoted number is a string, not a number ('link' is its string)
                    bad.append(("5", "'5'"))
                ann = _base_types(model.model_fields[name].annotation)
                if float in ann:
                    bad.append((math.inf, "inf"))
                    bad.append((math.nan, "nan"))
            elif kind == "bool":
                bad.append(("maybe", "maybe"))
            elif kind == "list":
                bad.append((["x"], "x"))
                if any(a in (int, float) for t in _base_types(model.model_fields[name].annotation)
                       for a in get_args(t)):
                    bad.append(([1, "2"], "'2'"))  # a quoted number inside a list of numbers
            for i, (value, shown) in enumerate(bad):
                yield (f"{model.__name__}.{name}-{i}", loader, path, value, field, shown)


CASES = list(_cases())

TIME_SUFFIXES = ("_ms", "_s", "_us")  # a time in ms, s or us: below 1 ns it would round to 0 ns


def _huge_cases():
    """(id, loader, path, value, dotted field, shown value): every float field given 1e300, every int field (sizes
    too) 10**30, every time field in ms, s or us a positive time below 1 ns (it would round to 0 ns). Each was
    accepted once and then hung or overflowed deep inside (a loop of 0-ns steps, "cannot convert float infinity to
    integer", numba's TypingError on an int beyond int64): now a ConfigError naming the field and the accepted
    range. And every number field, and every list of floats, an int too large for a float (10**400: a raw
    OverflowError "int too large to convert to float" from max_bandwidth_mibps's check, "a valid number" without
    the range from a list's). And every float field, and every list of floats, NaN and infinity (pydantic's "a finite
    number" said no range)."""
    for model, loader, prefix, dotted in MODELS:
        for name in model.model_fields:
            kind = _kind(model, name)
            ann = _base_types(model.model_fields[name].annotation)
            path, field = prefix + [name], dotted + name
            if kind in ("list", "any") and any(float in get_args(t) for t in ann):  # (a tuple: "any")
                yield (f"{model.__name__}.{name}-huge-int", loader, path, [1, 10**400], field, "1" + "0" * 20)
                yield (f"{model.__name__}.{name}-nan", loader, path, [1, math.nan], field, "nan")
                yield (f"{model.__name__}.{name}-inf", loader, path, [1, math.inf], field, "inf")
            if kind not in ("number", "size") and name != "max_bandwidth_mibps":
                continue
            bad = [(10**400, "1" + "0" * 20)]
            if float in ann:
                bad += [(1e300, "1e+300"), (math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf")]
            if int in ann:
                bad.append((10**30, str(10**30)))
            if float in ann and name.endswith(TIME_SUFFIXES):
                bad.append((1e-12, "1e-12"))
            for i, (value, shown) in enumerate(bad):
                yield (f"{model.__name__}.{name}-huge{i}", loader, path, value, field, shown)


HUGE_CASES = list(_huge_cases())


def test_every_model_and_field_is_swept():
    models = {m for m in vars(C).values() if isinstance(m, type) and issubclass(m, C.Strict) and m is not C.Strict}
    assert models <= {m for m, *_ in MODELS}, f"add to MODELS: {models - {m for m, *_ in MODELS}}"
    assert len(CASES) > 150


def _loader(name: str, tmp_path):
    """The loader of a case (a scenario, workload, env or host field set to a bad value)."""
    return {"scenario": _scenario, "workload": _workload, "env": _env, "host": _host_loader(tmp_path)}[name]


def _error_line(case, tmp_path) -> tuple[str, str]:
    """The lines of the ConfigError ``case``'s bad value raises that name its field, and the whole
    message; there must be such a line, and it must show the bad value."""
    _, loader, path, value, field, shown = case
    with pytest.raises(ConfigError) as e:
        _loader(loader, tmp_path)(path, value)
    msg = str(e.value)
    lines = [ln for ln in msg.splitlines() if ln.strip().startswith((field + ":", field + "."))]
    assert lines, f"no line names {field!r}:\n{msg}"
    line = "\n".join(lines)
    assert shown in line, f"the bad value {shown!r} is not shown:\n{msg}"
    return line, msg


@pytest.mark.parametrize("case", HUGE_CASES, ids=[c[0] for c in HUGE_CASES])
def test_a_huge_or_sub_ns_value_names_the_field_the_value_and_the_accepted_range(case, tmp_path):
    """Finite but absurd: refused with what is accepted, not run until it hangs or overflows."""
    line, msg = _error_line(case, tmp_path)
    assert "accepted" in line, f"what is accepted is not said:\n{msg}"


def test_every_float_field_has_an_upper_bound_and_every_time_field_a_unit():
    """The huge-value sweep above covers every number field; here the reason it passes: each has
    a finite upper bound (or a rule of its own), and a field named *_ms, *_s, *_us or *_ns has its unit."""
    own_rule = {("ScenarioConfig", "ring_entries"), ("LinkConfig", "max_bandwidth_mibps")}
    for model, *_ in MODELS:
        for name, info in model.model_fields.items():
            if _kind(model, name) != "number" or (model.__name__, name) in own_rule:
                continue
            b = C.field_bounds(model.model_fields[name])
            assert "le" in b or "lt" in b, f"{model.__name__}.{name} has no upper bound"
            assert math.isfinite(b.get("le", b.get("lt")))
            if name.endswith(("_ms", "_s", "_us", "_ns")):
                assert C.field_unit(name, info) in ("ms", "s", "us", "ns"), name


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_bad_value_names_the_field_the_value_and_what_is_accepted(case, tmp_path):
    line, msg = _error_line(case, tmp_path)
    assert any(p in line for p in ACCEPTED_PHRASES), f"what is accepted is not said:\n{msg}"


# ------------------------------------------------------------------------------ cross-field rules
@pytest.mark.parametrize("loader, path, value, field, phrase", [
    ("workload", ["regions"], [{"fraction": 0.6, "rate_mbps": 1}, {"fraction": 0.5, "rate_mbps": 1}],
     "regions", "more than all of guest RAM"),
    ("workload", ["phases"], {"calm_multiplier": 0, "burst_multiplier": 0}, "phases", "accepted"),
    ("workload", ["regions", 0, "vcpu_weights"], [0, 0], "regions.0.vcpu_weights", "positive sum"),
    ("workload", ["regions", 0, "vcpu_weights"], [], "regions.0.vcpu_weights", "accepted: non-negative numbers"),
    ("workload", ["bogus"], 1, "bogus", "unknown key"),
    ("workload", ["regions", 0, "bogus"], 1, "regions.0.bogus", "unknown key"),
    ("scenario", ["env"], {"bogus": 1}, "env.bogus", "unknown key"),
    ("scenario", ["env"], {"control_interval_ms": 0}, "env.control_interval_ms", "greater than or equal to 0.000001"),
    ("scenario", ["vm", "memory"], 4096 * 64 + 1, "vm.memory", "multiple of the page size"),
    ("scenario", ["vm", "memory"], "16GB", "vm.memory", "G/GiB or T/TiB (binary multiples, as QEMU's -m)"),
    ("host", ["bogus"], 1, "bogus", "unknown key"),
    ("host", ["costs", "bogus"], 1, "costs.bogus", "unknown key"),
    ("host", ["block_sizes"], [1 << 30, 2 << 20], "block_sizes", "smallest first"),
    ("host", ["block_sizes"], [2 << 20, 2 << 20], "block_sizes", "smallest first"),
    ("host", ["block_sizes"], [3 << 20], "block_sizes", "powers of two"),
    ("host", ["block_sizes"], [2048], "block_sizes", "multiple of page_size"),
    ("host", ["block_sizes"], [2 << 20, 1 << 80], "block_sizes", "larger than the guest physical address space "
                                                                 "(phys_addr_bits 40: 1099511627776 bytes); accepted: "
                                                                 "powers of two from 8192 to 1099511627776"),
    ("host", ["pml"], True, "pml", "only an x86 host"),
    ("env", ["intervals_ms"], [10, 10], "intervals_ms", "twice"),
    ("env", ["intervals_ms"], [0.5], "intervals_ms", "accepted: 1 to 10000"),
    ("env", ["ring_sizes"], [1000], "ring_sizes", "powers of two"),
    ("env", ["ring_sizes"], [], "ring_sizes", "at least one size is needed"),
    ("env", ["workload_set"], "nope", "workload_set", "accepted"),
    # bounds said whole, in the field's unit
    ("scenario", ["interval_ms"], 1e-12, "interval_ms", "below 1 ns (a time is whole ns: it would round to 0 ns); "
                                                        "accepted: 1e-6 to 1e9 ms"),
    ("scenario", ["interval_ms"], 0, "interval_ms", "Input should be greater than 0 (got 0); accepted: 1e-6 to 1e9 ms"),
    ("scenario", ["checkpoint", "horizon_s"], 1e30, "checkpoint.horizon_s", "accepted: 1e-9 to 1e6 s"),
    ("scenario", ["link", "gbps"], 1e300, "link.gbps", "accepted: 0.001 to 100000 Gb/s"),
    ("scenario", ["link", "cancel_at_s"], 1e-10, "link.cancel_at_s", "accepted: 0, or 1e-9 to 1e6 s"),
    ("scenario", ["checkpoint", "storage_mbps"], 1e300, "checkpoint.storage_mbps", "up to 1e8 MB/s"),
    ("scenario", ["rate_scale"], 1e300, "rate_scale", "accepted: 0.001 to 1000"),
    ("scenario", ["auto_converge", "dirty_sync_timer_ms"], 1e300, "auto_converge.dirty_sync_timer_ms",
     "accepted: 0 (no timer), or 1 to 1e9 ms"),
    ("host", ["costs", "wp_fault_ns"], 10**30, "costs.wp_fault_ns", "accepted: more than 0, up to 1e9 ns"),
    ("host", ["kernel_exit_interval_us"], 1e300, "kernel_exit_interval_us", "accepted: 0, or 0.001 to 1e6 us"),
    ("env", ["control_interval_ms"], 1e300, "control_interval_ms", "accepted: 1e-6 to 1e9 ms"),
    ("env", ["rate_scale_range"], [1e-300, 1], "rate_scale_range", "low >= 0.01"),
    # what a workload writes in a phase: 0, or 0.01 to 1e7 MB/s (a tiny rate's gaps overflow int64 ns and the
    # sampler steps 1 ns at a time; a huge one's windows hold no end of writes)
    ("workload", ["phases", "burst_multiplier"], 1e-300, "phases.burst_multiplier", "is 0 or 0.01 to 1e7 MB/s"),
    ("workload", ["phases", "calm_multiplier"], 1e-9, "phases.calm_multiplier", "is 0 or 0.01 to 1e7 MB/s"),
    ("workload", ["regions", 0, "rate_mbps"], 1e-9, "regions", "is 0 or 0.01 to 1e7 MB/s"),
    ("workload", ["regions"], [{"fraction": 0.5, "rate_mbps": 9e6}, {"fraction": 0.5, "rate_mbps": 9e6}], "regions",
     "is 0 or 0.01 to 1e7 MB/s"),
])
def test_cross_field_rules(loader, path, value, field, phrase, tmp_path):
    with pytest.raises(ConfigError) as e:
        _loader(loader, tmp_path)(path, value)
    msg = str(e.value)
    assert field in msg and phrase in msg, msg


def test_nothing_is_half_written_on_assignment():
    cfg = load_scenario("default")
    before = cfg.model_dump()
    with pytest.raises(pydantic.ValidationError, match="frozen"):  # configs are frozen: a copy is made to change one
        cfg.vm.vcpus = 0
    assert cfg.model_dump() == before


def test_the_shipped_configs_all_load():
    scenarios = C.scenario_names()
    assert "default" in scenarios
    for n in scenarios:
        assert load_scenario(n).name == n
    workloads = sorted(q.stem for q in (C.CONFIG_DIR / "workloads").glob("*.yaml"))
    assert len(workloads) >= 12  # the bar: at least 12 distinct workloads
    for n in workloads:
        load_workload(n)
    assert {"arm64-4k", "x86-pml"} <= set(C.HOST_PROFILES)
    for n in C.HOST_PROFILES:
        load_host_profile(n)
    C.load_workload_sets()


def test_a_key_given_twice_is_an_error_naming_the_file_the_key_and_both_lines(tmp_path):
    """YAML forbids a key twice in one mapping; PyYAML keeps the last silently, so a second
    `vm:` line used to replace the first and the error (if any) named a field it dropped."""
    f = tmp_path / "s.yaml"
    f.write_text("vm: {memory: 1GiB, vcpus: 2}\nworkload: web\nvm: {memory: 2GiB}\n")
    with pytest.raises(ConfigError, match=r"s\.yaml: not valid YAML: duplicate key 'vm' \(first given on line 1\) "
                                          r"line 3, column 1"):
        load_scenario(f)
    with pytest.raises(ConfigError, match="duplicate key 'b'"):
        C.parse_yaml("a: {b: 1, b: 2}", "x.yaml")
    # a merge key's values may be overridden, as YAML allows
    assert C.parse_yaml("base: &b {x: 1, y: 2}\nd:\n  <<: *b\n  x: 3\n", "x.yaml")["d"] == {"x": 3, "y": 2}


def test_a_yaml_syntax_error_names_the_file_not_a_unicode_string(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("vm: {memory: 1GiB\n")
    with pytest.raises(ConfigError) as e:
        load_scenario(f)
    assert str(e.value).startswith("s.yaml: not valid YAML:") and "<unicode string>" not in str(e.value)
