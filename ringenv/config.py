"""Typed, validated configuration: host profiles (and, as the project grows, VMs, workloads,
scenarios and rewards).

Everything that comes from a user (YAML file, keyword argument, command-line flag) is validated
here, at the boundary; the simulator itself works on plain numbers and numpy arrays.

Every invalid field produces a :class:`ConfigError` whose message names the field, the bad
value and what is accepted. Unknown keys are errors too.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import re
import stat
import sys
import tempfile
import types as types_
import typing
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


def _config_dir() -> Path:
    """The shipped YAML: the checkout's top-level configs/ (a source tree or an editable
    install), else the copy an installed wheel carries in the package (ringenv/configs)."""
    package = Path(__file__).resolve().parent
    checkout = package.parent / "configs"
    return checkout if (checkout / "workload-sets.yaml").is_file() else package / "configs"


CONFIG_DIR = _config_dir()

HOST_PROFILES = ("arm64-4k", "arm64-16k", "arm64-64k", "x86-pml", "x86-nopml")
DEFAULT_HOST = "arm64-4k"


def to_ns(value: float, unit_ns: int) -> int:
    """A time setting in a unit of ``unit_ns`` ns (ms: 1_000_000, s: 1_000_000_000) as whole
    ns, rounded to the nearest: the one conversion every layer uses, so that two of them given
    the same setting land on the same ns (33.3 ms is 33_300_000 ns, not int()'s 33_299_999)."""
    return int(round(float(value) * unit_ns))


class ConfigError(ValueError):
    """An invalid configuration value: the message names the field, the value and what is accepted."""


def check_checkpoint_throttle(throttle: str, error=None) -> None:
    """A checkpoint run takes no auto-converge: it slows the guest more at every trigger until a
    pre-copy converges, and an incremental checkpoint, which always writes what was dirtied,
    meets the trigger every time (it would only ever step up). ``error``: the exception type
    (ConfigError by default)."""
    if throttle == "auto-converge":
        raise (error or ConfigError)(
            "throttle: 'auto-converge' is a migration's (it slows the guest more at every trigger until the "
            "pre-copy converges; an incremental checkpoint always writes what was dirtied, so it would only ever "
            "step up); accepted for checkpointing: 'none', 'dirty-limit' (a fixed per-vCPU quota)")


def check_run_kind(cfg, kind: str, error=None) -> None:
    """What a run of ``kind`` ("migration" or "checkpoint") refuses in a scenario ``cfg``, whatever
    the scenario's own ``kind`` (the env id or the CLI command decides what runs): a checkpoint
    takes no auto-converge (:func:`check_checkpoint_throttle`) and no ``link.cancel_at_s`` (a
    migrate_cancel). ``error``: the exception type (ConfigError by default)."""
    if kind == "checkpoint":
        check_checkpoint_throttle(cfg.throttle, error)
        if cfg.link.cancel_at_s is not None:
            raise (error or ConfigError)(f"link.cancel_at_s: {cfg.link.cancel_at_s!r} is for a migration "
                                         "(migrate_cancel); accepted for checkpointing: null")


def is_finite(value) -> bool:
    """``math.isfinite`` for any real number, False where it would raise: an int too large for a float
    (10**400: "int too large to convert to float") is no finite float either."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def checked_number(value, field: str, accepted: str, valid, *, integral: bool = False):
    """``value`` if it is a real number (with ``integral``, an integer), not a bool, finite (as a float,
    without ``integral``), and ``valid(value)``; else a :class:`ConfigError` "FIELD: VALUE is not accepted;
    accepted: ACCEPTED" (a ``valid`` that overflows on the value refuses it too). (The checks of arguments that
    are no config field, e.g. a session's ``host_sync_ms``.)"""
    kind = numbers.Integral if integral else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, (bool, np.bool_))
    try:
        ok = ok and (integral or is_finite(value)) and bool(valid(value))
    except (OverflowError, ValueError, TypeError):
        ok = False
    if not ok:
        raise ConfigError(f"{field}: {value!r} is not accepted; accepted: {accepted}")
    return value


#: the longest simulated time a setting may give, s (11.6 days: far past any migration or checkpoint run, and in
#: int64 ns with room to add to it); its ms and us forms are 1e9 ms and 1e12 us
MAX_SIM_S = 1e6
#: the most a host event may cost, ns (1 s: slower than any ioctl or fault, and any count of them fits int64 ns)
MAX_COST_NS = 1e9
#: the fastest a workload may write in any phase, MB/s (10 TB/s, past any host's memory bandwidth: the sampler's
#: work grows with the writes), and the slowest it may write in a phase where it writes at all (10 kB/s: below, with
#: the smallest rate_scale and rate_scale_range factors, the expected gap between two writes leaves int64 ns)
MAX_WORKLOAD_MBPS = 1e7
MIN_WORKLOAD_MBPS = 0.01
#: the phases' rate multipliers, and the scenario's rate_scale (a factor on every workload rate)
MAX_MULTIPLIER = 1e3
MIN_RATE_SCALE, MAX_RATE_SCALE = 1e-3, 1e3
#: the device state a switchover sends, bytes (1 TiB)
MAX_DEVICE_STATE = 1 << 40
#: the largest guest RAM any host addresses (52-bit guest physical addresses), bytes
MAX_MEMORY = 1 << 52
#: a reward weight (and 1 / the smallest reward scale)
MAX_REWARD_WEIGHT = 1e6
#: ns per unit of a time setting, by the unit its field's name ends with
_TIME_UNIT_NS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}
_NAME_UNITS = (("_ns", "ns"), ("_us", "us"), ("_ms", "ms"), ("_s", "s"), ("gbps", "Gb/s"), ("_mibps", "MiB/s"),
               ("_mbps", "MB/s"), ("_pct", "%"), ("_bytes", "bytes"))


def num_text(x) -> str:
    """A bound as the accepted ranges show it: integers in full, other numbers short (1e-06 as 1e-6, 1e+09 as 1e9)."""
    if isinstance(x, int):
        return str(x)
    return re.sub(r"e([+-])0*(\d)", lambda m: "e" + ("-" if m.group(1) == "-" else "") + m.group(2), f"{x:g}")


def _pydantic_num(x) -> str:
    """A bound as pydantic's own messages show it (1e-06 as 0.000001, 1.0 as 1): the phrases stay the same."""
    return str(x) if isinstance(x, int) else np.format_float_positional(x, trim="-")


def _schema_extra(info) -> dict:
    """A field's ``json_schema_extra`` mapping (its ``accepted`` text, its ``unit``, if any), or {}."""
    return info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}


def field_unit(name: str, info) -> str:
    """The unit of a number field: its ``json_schema_extra`` ``unit``, else the one its name ends with (``_ms``,
    ``_s``, ``_ns``, ``_us``, ``gbps``, ``_mbps``, ...); "" for a factor or a count."""
    extra = _schema_extra(info)
    if "unit" in extra:
        return extra["unit"]
    return next((u for suffix, u in _NAME_UNITS if name.endswith(suffix)), "")


def field_bounds(info) -> dict:
    """The ``gt``/``ge``/``lt``/``le`` bounds of a field (its Field's metadata)."""
    out = {}
    for m in info.metadata:
        for attr in ("gt", "ge", "lt", "le"):
            if getattr(m, attr, None) is not None:
                out[attr] = getattr(m, attr)
    return out


def accepted_range(name: str, info) -> str:
    """What a bounded number field accepts, said once for every such field from its bounds and unit: "1e-6 to 1e9
    ms". A time field (ms, s, us) bounded only by > 0 starts at 1 ns (a time is whole ns: below 1 ns it would round
    to 0 ns); one that accepts 0 says "0, or 1 ns to ..." (a time in (0, 1 ns) rounds to 0 ns). A field whose
    rule is narrower than its bounds says its own (its ``json_schema_extra`` ``accepted``)."""
    extra = _schema_extra(info)
    if "accepted" in extra:
        return extra["accepted"]
    b, unit = field_bounds(info), field_unit(name, info)
    u = f" {unit}" if unit else ""
    hi = (f"{num_text(b['le'])}" if "le" in b else f"below {num_text(b['lt'])}" if "lt" in b else None)
    one_ns = 1 / _TIME_UNIT_NS[unit] if unit in _TIME_UNIT_NS and unit != "ns" else None
    if one_ns is not None and b.get("gt") == 0:
        lo = num_text(one_ns)
    elif one_ns is not None and b.get("ge") == 0:
        return f"0, or {num_text(one_ns)} to {hi}{u} (1 ns and up)" if hi else f"0, or >= {num_text(one_ns)}{u}"
    elif "ge" in b:
        lo = num_text(b["ge"])
    elif "gt" in b:
        return f"more than {num_text(b['gt'])}" + (f", up to {hi}{u}" if hi else u)
    else:
        return f"up to {hi}{u}" if hi else "a number"
    return f"{lo} to {hi}{u}" if hi else f">= {lo}{u}"


def check_field_range(name: str, info, v) -> None:
    """The one range rule of every bounded number field, applied before pydantic's own: a finite number outside
    the field's bounds, or a positive time in ms, s or us below 1 ns (it would round to 0 ns: a zero-length
    interval or gap would loop for ever), is a ValueError saying pydantic's phrase, the value and the whole
    accepted range (:func:`accepted_range`); so is NaN or an infinity (pydantic's "a finite number", with the range)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        return
    b = field_bounds(info)
    if not b:
        return
    if not isinstance(v, numbers.Integral) and not math.isfinite(v):
        raise ValueError(f"Input should be a finite number (got {v!r}); accepted: {accepted_range(name, info)}")
    unit = field_unit(name, info)
    phrase = None
    if "gt" in b and not v > b["gt"]:
        phrase = f"greater than {_pydantic_num(b['gt'])}"
    elif "ge" in b and not v >= b["ge"]:
        phrase = f"greater than or equal to {_pydantic_num(b['ge'])}"
    elif "lt" in b and not v < b["lt"]:
        phrase = f"less than {_pydantic_num(b['lt'])}"
    elif "le" in b and not v <= b["le"]:
        phrase = f"less than or equal to {_pydantic_num(b['le'])}"
    elif unit in _TIME_UNIT_NS and unit != "ns" and 0 < v * _TIME_UNIT_NS[unit] < 1:
        raise ValueError(f"{v!r} {unit} is below 1 ns (a time is whole ns: it would round to 0 ns); accepted: "
                         f"{accepted_range(name, info)}")
    if phrase:
        raise ValueError(f"Input should be {phrase} (got {v!r}); accepted: {accepted_range(name, info)}")


_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "literal", "any"}
_FIELD_PREFIX = re.compile(r"([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)*): ")


def _clean_loc(loc) -> str:
    """The dotted path of a field, without pydantic's union-member tags (``host.str``,
    ``workload.function-after[_check(), WorkloadConfig]``)."""
    parts = [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS))]
    return ".".join(parts)


def _models_in(annotation) -> list[type[BaseModel]]:
    """The config models an annotation holds (``X``, ``X | None``, ``list[X]``, ``str | X``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _models_in(a)]


def _model_at(model: type[BaseModel] | None, loc) -> type[BaseModel] | None:
    """The config model validating the mapping at pydantic error location ``loc`` (list indexes
    and union-member tags skipped; a tag naming one of a union's models picks it), or None."""
    cands = [model] if model is not None else []
    for p in loc:
        if isinstance(p, int) or not cands:
            continue
        named = [m for m in cands if m.__name__ in p]
        if named and p not in cands[0].model_fields:
            cands = named
            continue
        field = cands[0].model_fields.get(p)
        if field is not None:
            cands = _models_in(field.annotation)
    return cands[0] if cands else None


def _field_range(model: type[BaseModel] | None, loc) -> str | None:
    """What the bounded number field at error location ``loc`` accepts (:func:`accepted_range`; a
    list item's: its list field's), or None where ``loc`` is no such field."""
    parts = list(loc)
    while parts and isinstance(parts[-1], int):
        parts.pop()
    section = _model_at(model, parts[:-1]) if parts else None
    field = section.model_fields.get(parts[-1]) if section is not None and isinstance(parts[-1], str) else None
    if field is None:
        return None
    extra = _schema_extra(field)
    return accepted_range(parts[-1], field) if field_bounds(field) or "accepted" in extra else None


def _format_validation_error(where: str, err: ValidationError, model: type[BaseModel] | None = None) -> str:
    """One line per error: the field's dotted path, what is wrong, the value given. A whole-model
    check names its own field (its message starts ``field: ``, which is appended to the path) and
    does not echo the whole input back. The members of a union (``host: str | HostProfile``) that
    all refused a value make one line. An unknown key lists the keys its section accepts (those of
    ``model``'s field at that path, ``model`` being the one validated)."""
    lines = [f"invalid {where}:"]
    union: dict[str, list] = {}  # a union's path -> [value, the members' messages]
    nested: set[str] = set()  # unions a member of which (a mapping for a model) got further
    for e in err.errors():
        loc = _clean_loc(e["loc"])
        tags = [i for i, p in enumerate(e["loc"]) if _clean_loc([p]) == "" and isinstance(p, str)]
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if tags:
            head = _clean_loc(e["loc"][:tags[0]])
            if tags[-1] < len(e["loc"]) - 1 or e["type"] == "value_error":
                nested.add(head)  # the value was taken as that member: report its own errors
            elif e["type"] != "extra_forbidden":
                union.setdefault(head, [e.get("input"), []])
                m = msg.removeprefix("Input should be ")
                if m not in union[head][1]:
                    union[head][1].append(m)
                    if len(union[head][1]) == 1:
                        lines.append(("union", head))
                continue
        if e["type"] == "extra_forbidden":
            section = _model_at(model, e["loc"][:-1])
            keys = f"; accepted keys: {', '.join(section.model_fields)}" if section is not None else ""
            lines.append(f"  {loc}: unknown key (value {e.get('input')!r}); remove it or check its spelling{keys}")
        elif e["type"] == "missing":
            lines.append(f"  {loc}: missing; this field is required")
        elif e["type"] == "value_error" or not loc:
            for part in msg.splitlines():
                part = part.strip()
                if loc:
                    part = part.removeprefix(loc + ": ").removeprefix(loc.split(".")[-1] + ": ")
                if loc and _FIELD_PREFIX.match(part) and not part.startswith(("invalid ", "profile: ")):
                    lines.append(f"  {loc}.{part}")
                elif loc:
                    lines.append(f"  {loc}: {part}")
                else:
                    lines.append(f"  {part}")
        else:
            rng = _field_range(model, e["loc"])
            lines.append(f"  {loc}: {msg} (got {e.get('input')!r})" + (f"; accepted: {rng}" if rng else ""))
    out = []
    for ln in lines:
        if isinstance(ln, tuple):
            head = ln[1]
            if head in nested:
                continue
            value, msgs = union[head]
            ln = f"  {head}: Input should be {' or '.join(msgs)} (got {value!r})"
        out.append(ln)
    return "\n".join(out)


class Strict(BaseModel):
    """Base for every config model: unknown keys are errors; the objects are immutable (a field
    cannot be assigned: a run or an env built from one could not follow the change), changed
    copies come from :func:`load_scenario` with overrides or ``model_copy(update=...)``."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, v, info):
        """YAML's true/false and quoted strings are not numbers: pydantic would take them as 1, 0
        and the number the string spells (sizes such as '16GiB' have their own validators, which
        run first). Nor are numbers and strings booleans (pydantic would take 0, 1, 'yes', 'off'). A number outside
        the field's bounds is refused with the whole accepted range (:func:`check_field_range`)."""
        if not isinstance(v, bool) and v is not None:
            ann = cls.model_fields[info.field_name].annotation
            if ann is bool or ann == (bool | None):
                raise ValueError(f"{v!r} is not true or false; expected true or false"
                                 + (" (or null)" if ann is not bool else ""))
        not_num = (bool, np.bool_, str)  # (numpy's bool too: pydantic takes np.True_ as 1)
        if isinstance(v, not_num) or (isinstance(v, (list, tuple)) and any(isinstance(x, not_num) for x in v)):
            ann = cls.model_fields[info.field_name].annotation
            types = typing.get_args(ann) if typing.get_origin(ann) in (typing.Union, types_.UnionType) else (ann,)
            if not isinstance(v, not_num):  # a list of numbers: its items' types
                types = tuple(a for t in types if typing.get_origin(t) in (list, tuple) for a in typing.get_args(t))
                bad = next(x for x in v if isinstance(x, not_num))
                if type(bad) not in types and any(t in (int, float) for t in types):
                    rng = _field_range(cls, [info.field_name])
                    raise ValueError(f"{v!r}: {bad!r} is not a number; expected numbers"
                                     + (f"; accepted: {rng}" if rng else ""))
            elif type(v) not in types and any(t in (int, float) for t in types):
                what = "a string" if isinstance(v, str) else "not a number"
                rng = _field_range(cls, [info.field_name])
                raise ValueError(f"{v!r} is {what}; expected a number" + (f"; accepted: {rng}" if rng else ""))
        if isinstance(v, (list, tuple)):  # NaN, inf, an int too large for a float: pydantic's error has no range
            bad = next((x for x in v if isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))
                        and not is_finite(x)), None)
            info_ = cls.model_fields[info.field_name]
            if bad is not None and any(a is float for t in typing.get_args(info_.annotation) or (info_.annotation,)
                                       for a in (typing.get_args(t) or (t,))):
                extra = _schema_extra(info_)
                what = (f"too large for a number (at most {num_text(sys.float_info.max)}, the largest float)"
                        if isinstance(bad, numbers.Integral) else "not a finite number")
                raise ValueError(f"{v!r}: {bad!r} is {what}; accepted: {extra.get('accepted', 'finite numbers')}")
        check_field_range(info.field_name, cls.model_fields[info.field_name], v)
        return v

    @classmethod
    def parse(cls, data: Any, where: str | None = None):
        """Validate ``data`` (a mapping) into this model, raising :class:`ConfigError` on failure."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(_format_validation_error(where or cls.__name__, e, cls)) from None


def _pos(desc: str, **kw):
    """A host cost > 0 ns, at most :data:`MAX_COST_NS`."""
    return Field(gt=0, le=MAX_COST_NS, description=desc, **kw)


def _nonneg(desc: str, **kw):
    """A host cost >= 0 ns, at most :data:`MAX_COST_NS`."""
    return Field(ge=0, le=MAX_COST_NS, description=desc, **kw)


class HostCosts(Strict):
    """Simulated cost of each host event, in integer nanoseconds (floats are accepted for
    sub-nanosecond per-page costs), each at most 1e9 ns (1 s, :data:`MAX_COST_NS`). Where each
    default comes from is said in the YAML files."""

    wp_fault_ns: int = _pos("write-protect (permission) fault on one page, incl. the ring push")
    dirty_write_ns: int = _nonneg("a guest write to a page that is already writable")
    exit_ns: int = _pos("exit from the guest to userspace and back into the guest")
    harvest_entry_ns: int = _nonneg("userspace: read one ring entry, record it, mark it RESET")
    harvest_ring_ns: int = _nonneg("userspace: fixed cost to visit one ring while harvesting")
    reset_call_ns: int = _nonneg("KVM_RESET_DIRTY_RINGS: fixed cost of the ioctl")
    reset_entry_ns: int = _nonneg("KVM_RESET_DIRTY_RINGS: per entry reset")
    reprotect_call_ns: int = _nonneg("one kvm_arch_mmu_enable_log_dirty_pt_masked call")
    reprotect_page_ns: float = _nonneg("per page write-protected by a re-protect call")
    tlbi_base_ns: int = _nonneg("VM-wide (broadcast) TLB invalidation: fixed part")
    tlbi_per_vcpu_ns: float = _nonneg("VM-wide TLB invalidation: part growing with the vCPU count")
    tlbi_per_vcpu_sq_ns: float = _nonneg("VM-wide TLB invalidation: contention part, times vCPUs squared")
    split_ns: int = _nonneg("break-before-make split of one block into a table of pages")
    protect_page_ns: float = _nonneg("write-protecting one page when dirty logging is enabled on a slot")
    get_dirty_log_page_ns: float = _nonneg("KVM_GET_DIRTY_LOG: per page of the slot (bitmap copy)")
    get_dirty_log_dirty_ns: float = _nonneg("KVM_GET_DIRTY_LOG without manual protect: per dirty page re-protected")
    clear_dirty_log_page_ns: float = _nonneg("KVM_CLEAR_DIRTY_LOG: per page cleared and re-protected "
                                             "(the range's bitmap walk costs get_dirty_log_page_ns per page)")
    bitmap_scan_page_ns: float = _nonneg("userspace: per page of RAM scanned when syncing a dirty bitmap")
    pml_flush_entry_ns: float = _nonneg("x86 PML: per logged GPA flushed from the buffer into the ring")
    pml_full_exit_ns: int = _nonneg("x86 PML: the in-kernel exit taken when the 512-entry buffer is full")
    zero_page_check_ns: float = _nonneg("QEMU's migration thread: checking one 4 KiB target page that turns out "
                                        "zero (buffer_is_zero reads all of it; a page with data stops early); "
                                        "default 300, the shipped profiles' estimate", default=300.0)


class HostProfile(Strict):
    """A simulated host: architecture, granule, the dirty-ring rules it follows and its costs.

    Loaded from ``configs/hosts/NAME.yaml`` by :func:`load_host_profile`.
    """

    name: str
    description: str = ""
    measured: str | None = Field(None, description="date the costs were measured, for calibrated profiles")
    arch: Literal["arm64", "x86"]
    page_size: Literal[4096, 16384, 65536]
    block_sizes: list[int] = Field(description="stage-2 block (huge mapping) sizes in bytes, smallest first")
    pml: bool = Field(False, description="x86 Page Modification Logging: a 512-entry hardware buffer")
    pml_buffer_entries: int = Field(512, ge=1, le=65536)
    kernel_exit_interval_us: float = Field(
        0.0, ge=0, le=MAX_COST_NS / 1000, allow_inf_nan=False,
        description="time between the VM exits KVM handles in the kernel on each running vCPU (host timer "
        "ticks, guest timer and IPI exits), at multiples of it: with PML each flushes the buffer into the ring "
        "(vmx_flush_pml_buffer runs at every VM exit); 0: none modelled, the buffer is flushed only when full "
        "and at exits to userspace. Used only with pml; 0, or 0.001 (1 ns) to 1e6 us (1 s)",
    )
    arch_dirty_log_size: int = Field(0, ge=0, le=65536 - 64 - 1,
                                     description="extra reserved ring entries (kvm_cpu_dirty_log_size), 0 to 65471: "
                                     "the largest ring (65536 entries) keeps at least one entry above the 64 + "
                                     "arch_dirty_log_size reserved ones")
    acq_rel_only: bool = Field(description="only KVM_CAP_DIRTY_LOG_RING_ACQ_REL is offered (weakly ordered arch)")
    with_bitmap_supported: bool = Field(description="KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP is offered")
    reprotect_span: bool = Field(
        description="a re-protect call write-protects the whole lowest..highest-bit span of its mask (arm64)"
    )
    ring_only_slot_logs: bool = Field(
        True,
        description="a ring-only memslot (no bitmap) counts as logging; false on arm64, where block "
        "mappings then stay and faults that map a page writable push entries",
    )
    eager_split_chunk_sizes: list[int] = Field(
        default_factory=list, description="accepted KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE values besides 0"
    )
    eager_page_split: bool = Field(
        False,
        description="x86 kvm module parameter eager_page_split (default Y, Linux 5.18+): enabling dirty "
        "logging splits the slot's huge mappings in the ioctl (with manual protect and INITIALLY_SET: each "
        "KVM_CLEAR_DIRTY_LOG range's); it acts only with the TDP MMU (tdp_mmu). x86 only: arm64 controls "
        "eager splitting with KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE",
    )
    tdp_mmu: bool = Field(
        False,
        description="x86 kvm module parameter tdp_mmu (default Y where the CPU has EPT or NPT): the TDP MMU, "
        "without which eager_page_split does nothing and turning logging off zaps the collapsible small "
        "mappings instead of recovering huge ones in place. x86 only",
    )
    split_blocks: bool = Field(
        True,
        description="split block mappings into pages while logging (the kernel's behaviour); false is "
        "a what-if switch under which one write to a block dirties all its pages at once",
    )
    address_spaces: int = Field(
        ge=1, le=2,
        description="memslot address spaces of a VM (kvm_arch_nr_memslot_as_ids): 2 on x86 with SMM "
        "(CONFIG_KVM_SMM), else 1; as_id >= it is EINVAL",
    )
    phys_addr_bits: int = Field(
        ge=32, le=52,
        description="guest-physical address bits a memslot must fit in: x86 kvm_mmu_max_gfn (host "
        "MAXPHYADDR with TDP, 52 with shadow paging; beyond: EINVAL), arm64 the VM's IPA size "
        "(default 40, KVM_PHYS_SHIFT; beyond: EFAULT)",
    )
    costs: HostCosts

    @model_validator(mode="after")
    def _check(self):
        for i, b in enumerate(self.block_sizes):
            if b & (b - 1):
                raise ValueError(f"block_sizes: {b} is not accepted; expected powers of two (bytes)")
            if i and b <= self.block_sizes[i - 1]:
                raise ValueError(f"block_sizes: {self.block_sizes} is not accepted; expected distinct sizes, "
                                 "smallest first")
            if b <= self.page_size or b % self.page_size:
                raise ValueError(
                    f"block_sizes: {b} is not a multiple of page_size {self.page_size} larger than it"
                )
            if b > 1 << self.phys_addr_bits:
                raise ValueError(f"block_sizes: {b} is larger than the guest physical address space (phys_addr_bits "
                                 f"{self.phys_addr_bits}: {1 << self.phys_addr_bits} bytes); accepted: powers of two "
                                 f"from {2 * self.page_size} to {1 << self.phys_addr_bits}")
        if self.pml and self.arch != "x86":
            raise ValueError("pml: only an x86 host has Page Modification Logging")
        if not self.ring_sizes:  # KVM_DIRTY_RING_MAX_ENTRIES: a ring must hold the reserved entries
            raise ValueError(f"arch_dirty_log_size: {self.arch_dirty_log_size} leaves no ring size that runs (a "
                             f"ring must hold more than the 64 + {self.arch_dirty_log_size} reserved entries, be at "
                             f"least {self.page_size} bytes and at most 65536 entries); accepted: 0 to 65471")
        for name in ("eager_page_split", "tdp_mmu"):
            if getattr(self, name) and self.arch != "x86":
                raise ValueError(f"{name}: true is accepted only for an x86 host (a kvm module parameter of "
                                 f"x86; on {self.arch} use false or leave it out"
                                 + ("; arm64 splits eagerly with KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE, see "
                                    "eager_split_chunk_sizes)" if name == "eager_page_split" else ")"))
        if self.address_spaces != 1 and self.arch != "x86":
            raise ValueError("address_spaces: only x86 (SMM) has a second memslot address space")
        chunks = [self.page_size, *self.block_sizes]  # kvm_is_block_size_supported: the page and block sizes
        chunks_ok = (f"accepted: distinct sizes among the page size and the block sizes "
                     f"({', '.join(map(str, chunks))})")
        for i, c in enumerate(self.eager_split_chunk_sizes):
            if c not in chunks:
                raise ValueError(f"eager_split_chunk_sizes: {c} is not the page size or a block size; {chunks_ok}")
            if c in self.eager_split_chunk_sizes[:i]:
                raise ValueError(f"eager_split_chunk_sizes: {c} is given twice in {self.eager_split_chunk_sizes}; "
                                 f"{chunks_ok}")
        return self

    @property
    def x86_eager_split(self) -> bool:
        """x86 eager page splitting is in effect: the module parameter is on and so is the TDP
        MMU (kvm_mmu_slot_try_split_huge_pages and kvm_mmu_try_split_huge_pages return at once
        without it)."""
        return self.eager_page_split and self.tdp_mmu

    @property
    def reserved_entries(self) -> int:
        """KVM_DIRTY_RING_RSVD_ENTRIES + arch_dirty_log_size (64, or 576 on x86 with PML)."""
        return 64 + self.arch_dirty_log_size

    def with_costs(self, **costs) -> HostProfile:
        """This profile with some of its ``costs`` replaced (a frozen config: a new object)."""
        return self.model_copy(update={"costs": self.costs.model_copy(update=costs)})

    @property
    def min_ring_entries(self) -> int:
        """Smallest ring that runs: a power of two of bytes >= PAGE_SIZE with more entries than the reserved ones
        (KVM accepts bytes == reserved*16 too, but such a ring's soft limit is 0: soft-full even when empty, so after
        its first push the vCPU never re-enters the guest; the simulated host reproduces that, a run could not end)."""
        nbytes = max((self.reserved_entries + 1) * 16, self.page_size)
        return 1 << (nbytes - 1).bit_length() >> 4

    @property
    def gpa_pages(self) -> int:
        """Guest-physical pages the profile's ``phys_addr_bits`` hold: a memslot must end
        within them (KVM_SET_USER_MEMORY_REGION)."""
        return 1 << (self.phys_addr_bits - (self.page_size.bit_length() - 1))

    @property
    def ring_sizes(self) -> list[int]:
        """Every ring size (entries, powers of two) this host accepts, smallest first."""
        out, n = [], self.min_ring_entries
        while n <= 65536:
            out.append(n)
            n *= 2
        return out

    def tlbi_broadcast_ns(self, nr_vcpus: int) -> int:
        """Cost of one VM-wide TLB invalidation with ``nr_vcpus`` vCPUs."""
        c = self.costs
        return int(c.tlbi_base_ns + c.tlbi_per_vcpu_ns * nr_vcpus + c.tlbi_per_vcpu_sq_ns * nr_vcpus * nr_vcpus)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader reading a number in exponent notation without a dot (``1e3``,
    ``2E-6``) as the float YAML 1.2 makes it, not as the string YAML 1.1 does, and refusing a
    key given twice in one mapping (YAML forbids it; PyYAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # (``<<:`` merges may be overridden)
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class says so
                    break
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given on line {first})", key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def parse_yaml(text: str, where: str) -> Any:
    """``text`` read as YAML (see :class:`_Loader`); a syntax error is a ConfigError naming
    ``where`` (a file name, or the flag a value came from) and the place in the text."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a safe loader)
    except yaml.YAMLError as e:
        msg = " ".join(str(e).split()).replace('in "<unicode string>", ', "")
        raise ConfigError(f"{where}: not valid YAML: {msg}") from None


def read_text(path: Path, what: str = "") -> str:
    """A config or trace file's text: UTF-8, else a ConfigError naming the file."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what}{' ' if what else ''}{Path(path).name}: not UTF-8 text (byte {e.start}: "
                          f"{e.object[e.start:e.start + 1]!r}); accepted: a UTF-8 YAML or JSON file") from None


def write_atomically(path: str | Path, text: str | bytes) -> None:
    """Write ``text`` (a str: UTF-8, line ends as given; or bytes) to ``path`` whole or not at all: into a
    temporary file in the same directory, then renamed over ``path`` (``os.replace``), so that a
    failure or an interrupt leaves an existing file as it was and no partial file, and a reader
    sees the old file or the new one. The file keeps an existing file's permission bits (a new
    one: 0666 less the umask, as ``open``); a symbolic link's target is replaced, the link kept."""
    target = os.path.realpath(path)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        umask = os.umask(0o022)
        os.umask(umask)
        mode = 0o666 & ~umask
    directory, name = os.path.split(target)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        binary = isinstance(text, (bytes, bytearray))
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            os.fchmod(fd, mode)
            f.write(text)
            f.flush()
            os.fsync(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_yaml(path: Path) -> Any:
    return parse_yaml(read_text(path), Path(path).name)


def is_yaml_path(name: str | Path) -> bool:
    """Whether a config argument names a YAML file (its suffix .yaml or .yml, in any case:
    'SMALL.YAML' too) rather than a config by name."""
    return Path(name).suffix.lower() in (".yaml", ".yml")


def load_host_profile(name_or_path: str | Path | HostProfile | None = None) -> HostProfile:
    """Load a host profile by name (one of :data:`HOST_PROFILES`, a file in configs/hosts/) or by
    path to a YAML file (a str or a pathlib.Path), or a HostProfile (returned as it is). ``None`` gives the default,
    ``arm64-4k``. Anything else is a ConfigError saying what is accepted."""
    if isinstance(name_or_path, HostProfile):
        return name_or_path
    if not isinstance(name_or_path, (str, Path)) and name_or_path is not None:
        known = config_names("hosts")
        raise ConfigError(f"profile: {name_or_path!r} ({type(name_or_path).__name__}) is not accepted; accepted: a "
                          f"host profile name ({', '.join(known)}), a YAML path (str or pathlib.Path), a HostProfile, "
                          f"or None (the default, {DEFAULT_HOST})")
    name_or_path = DEFAULT_HOST if name_or_path is None else name_or_path
    p = Path(name_or_path)
    if is_yaml_path(p):
        if not p.is_file():
            raise ConfigError(f"profile: no such file {str(p)!r}")
        path = p
    else:
        path = CONFIG_DIR / "hosts" / f"{name_or_path}.yaml"
        if not path.is_file():
            known = config_names("hosts")
            raise ConfigError(f"profile: unknown host profile {str(name_or_path)!r}; accepted: {', '.join(known)}")
    return HostProfile.parse(_read_yaml(path), where=f"host profile {path.name}")


# ---------------------------------------------------------------------------------- workloads
_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MIB": 1 << 20,
               "G": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TIB": 1 << 40}


def size_accepted(zero: bool = False) -> str:
    """What :func:`parse_size` accepts, as its errors say it (with ``zero``: 0 too)."""
    return (f"a whole number of bytes {'>= 0' if zero else '> 0'}: an integer, or digits (a decimal point allowed, "
            "no exponent: not a float such as 4.3e9) with a unit B, K/KiB, "
            "M/MiB, G/GiB or T/TiB (binary multiples, as QEMU's -m) that make whole bytes, e.g. "
            + ("0, '0MiB', " if zero else "") + "4096, '2MiB', '1.5GiB', '16GiB'")


def parse_size(value: Any, field: str = "size", *, zero: bool = False) -> int:
    """Bytes from an int or a string such as '16GiB', '512 MiB', '4k'. K, M, G and T are
    binary multiples with or without "iB" (as QEMU's ``-m 16G``); decimal units such as "GB"
    are refused rather than guessed. The size must be whole bytes ('1.5GiB' is; '1.5' and
    '1.00000000001GiB' are not: nothing is rounded) and > 0 (with ``zero``, >= 0: '0MiB' too).
    Anything else is a :class:`ConfigError` showing the value as given and what is accepted."""
    accepted = size_accepted(zero)
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        n = int(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if not m or m.group(2).upper() not in _SIZE_UNITS:
            raise ConfigError(f"{field}: {value!r} is not a size; accepted: {accepted}")
        from fractions import Fraction

        exact = Fraction(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]  # exact: '1.5GiB' is 1610612736
        if exact.denominator != 1:
            raise ConfigError(f"{field}: {value!r} is not a whole number of bytes; accepted: {accepted}")
        n = int(exact)
    else:
        raise ConfigError(f"{field}: {value!r} is not a size; accepted: {accepted}")
    if n < 0 or (n == 0 and not zero):
        raise ConfigError(f"{field}: {value!r} is not accepted; accepted: {accepted}")
    return n


#: what RegionConfig.vcpu_weights accepts (its errors say so)
VCPU_WEIGHTS_ACCEPTED = ("non-negative numbers with a positive sum that is finite as a float (relative write rates, "
                         "one per vCPU, repeated cyclically), or null (equal)")


class RegionConfig(Strict):
    """A part of guest RAM with one write pattern.

    ``fraction`` of guest RAM; ``rate_mbps`` raw writes into it in MB/s (10^6 bytes/s of 4 KiB
    stores); ``pattern`` uniform (every page equally likely), zipf (page popularity ~ 1/rank^s),
    or scan (a sequential sweep that wraps around); ``layout`` contiguous or scattered (pages of
    the region spread over its address range by a fixed permutation, as a hash table's are);
    ``share`` shared (any vCPU writes any page) or private (each vCPU its own slice);
    ``vcpu_weights`` the relative write rate of each vCPU (default equal, repeated cyclically).
    A shared scan is one sequential writer (a log, a loader thread): the vCPU of the largest
    weight (the first of equals) sweeps the whole region at its rate; a private scan gives each
    vCPU a sweep of its own slice at its weighted share of the rate."""

    name: str = ""
    fraction: float = Field(gt=0, le=1)
    rate_mbps: float = Field(ge=0, le=MAX_WORKLOAD_MBPS)
    pattern: Literal["uniform", "zipf", "scan"] = "uniform"
    zipf_s: float = Field(1.0, gt=0, le=3)
    layout: Literal["contiguous", "scattered"] = "contiguous"
    share: Literal["shared", "private"] = "shared"
    vcpu_weights: list[float] | None = Field(None, json_schema_extra={"accepted": VCPU_WEIGHTS_ACCEPTED})

    @model_validator(mode="after")
    def _check(self):
        if "zipf_s" in self.model_fields_set and self.pattern != "zipf" and self.zipf_s != 1.0:
            # (1.0, the default, is what a dump of any region holds: it must validate again)
            raise ValueError(f"zipf_s: {self.zipf_s:g} is given for pattern {self.pattern!r}; it applies to "
                             "pattern 'zipf' only")
        if self.vcpu_weights is not None and (not self.vcpu_weights or min(self.vcpu_weights) < 0
                                              or not 0 < sum(self.vcpu_weights) < math.inf):
            raise ValueError(f"vcpu_weights: {self.vcpu_weights} is not accepted; accepted: {VCPU_WEIGHTS_ACCEPTED}")
        return self


class PhaseConfig(Strict):
    """Calm/burst modulation of every region's rate: a two-state Markov process with
    exponentially distributed durations (means in seconds, 1 ms to 1e6 s) and rate multipliers
    (0 to 1000; the workload bounds the rates they give: :meth:`WorkloadConfig._check_rates`)."""

    calm_multiplier: float = Field(1.0, ge=0, le=MAX_MULTIPLIER)
    burst_multiplier: float = Field(4.0, ge=0, le=MAX_MULTIPLIER)
    mean_calm_s: float = Field(5.0, ge=1e-3, le=MAX_SIM_S)
    mean_burst_s: float = Field(1.0, ge=1e-3, le=MAX_SIM_S)

    @model_validator(mode="after")
    def _check(self):
        if self.calm_multiplier == 0 and self.burst_multiplier == 0:
            raise ValueError("burst_multiplier: 0 with calm_multiplier 0 is not accepted (the guest would never "
                             "write); expected at least one multiplier > 0")
        return self


class WorkloadConfig(Strict):
    """A seeded guest workload (configs/workloads/NAME.yaml): its regions' write rates, the
    calm/burst phases that modulate them, and ``cpu_busy``, how much of each vCPU's time its own
    work takes (the write rates are those of a vCPU the kernel never stops; the time faults
    take slows them down past what the vCPU has spare: :class:`ringenv.guest.WorkloadProgram`)."""

    name: str
    description: str = ""
    regions: list[RegionConfig] = Field(min_length=1)
    phases: PhaseConfig | None = None
    cpu_busy: float = Field(0.0, ge=0, le=1, allow_inf_nan=False, description=(
        "share of each vCPU's time the workload's own work takes when nothing slows it, 0 to 1: "
        "the kernel's fault time fills the rest first, and only beyond it do the writes slow "
        "down (1: a CPU-bound job, every ns in a fault delays it; 0: the writes wait only when "
        "faults alone would take all of the vCPU's time)"))

    @model_validator(mode="after")
    def _check(self):
        total = sum(r.fraction for r in self.regions)
        if total > 1.0 + 1e-9:
            raise ValueError(f"regions: fractions add up to {total:.3f}, more than all of guest RAM (1.0)")
        self._check_rates()
        return self

    def _check_rates(self) -> None:
        """What the workload writes in each phase (the sum of the regions' ``rate_mbps`` times the phase's
        multiplier, 1 without phases) is 0, or MIN_WORKLOAD_MBPS to MAX_WORKLOAD_MBPS (0.01 to 1e7 MB/s): faster,
        the sampler's work has no bound; slower but not 0, the expected gap between two writes, with the smallest
        rate_scale factors, leaves int64 ns (a window of 1 ns, then another, for ever). The error names the
        multiplier of the phase at fault (or ``regions`` without phases)."""
        rate = self.rate_mbps
        ph = self.phases
        phases = [("regions", 1.0)] if ph is None else [("phases.calm_multiplier", ph.calm_multiplier),
                                                        ("phases.burst_multiplier", ph.burst_multiplier)]
        for field, m in phases:
            r = rate * m
            if r == 0 or MIN_WORKLOAD_MBPS <= r <= MAX_WORKLOAD_MBPS:
                continue
            said = (f"{m!r} makes the workload write {r:g} MB/s in that phase (its regions' {rate:g} MB/s times "
                    "it)" if ph is not None else f"the regions' rate_mbps add up to {r:g} MB/s")
            raise ValueError(
                f"{field}: {said}; accepted: what the workload writes in a phase (the sum of the regions' rate_mbps "
                f"times the phase's multiplier) is 0 or {num_text(MIN_WORKLOAD_MBPS)} to "
                f"{num_text(MAX_WORKLOAD_MBPS)} MB/s")

    @property
    def rate_mbps(self) -> float:
        return sum(r.rate_mbps for r in self.regions)

    @property
    def peak_mbps(self) -> float:
        """What the workload writes in its fastest phase, MB/s (``rate_mbps`` times the larger
        phase multiplier; ``rate_mbps`` without phases)."""
        ph = self.phases
        return self.rate_mbps * (max(ph.calm_multiplier, ph.burst_multiplier) if ph is not None else 1.0)


def check_peak_rate(workload: WorkloadConfig, factor: float, field: str, shown: str) -> str | None:
    """The message for a factor on a workload's rates (a scenario's ``rate_scale``, an env's
    ``rate_scale_range``) that makes it write more than MAX_WORKLOAD_MBPS in its fastest phase
    (each bound alone holds, their product need not: the sampler's work grows with the writes),
    or None when it does not. ``field`` and ``shown``: the setting and its value, as said."""
    peak = workload.peak_mbps * factor
    if peak <= MAX_WORKLOAD_MBPS:
        return None
    return (f"{field}: {shown} makes workload {workload.name!r} write {peak:g} MB/s in its fastest phase "
            f"({workload.peak_mbps:g} MB/s times {factor:g}); accepted: at most {num_text(MAX_WORKLOAD_MBPS)} MB/s in "
            f"any phase, i.e. a factor up to {MAX_WORKLOAD_MBPS / workload.peak_mbps:g} for this workload")


def load_workload(name_or_path: str | Path | WorkloadConfig | dict, where: str = "workload") -> WorkloadConfig:
    """A workload by name (configs/workloads/NAME.yaml), path, mapping or object. A file is read
    and validated once while it is unchanged (every episode builds its workload): the object
    returned is shared, treat it as read-only. ``where``: the field or argument errors name."""
    if isinstance(name_or_path, WorkloadConfig):
        return name_or_path
    if not isinstance(name_or_path, (str, Path, dict)):
        known = config_names("workloads")
        raise ConfigError(f"{where}: {name_or_path!r} ({type(name_or_path).__name__}) is not accepted; accepted: a "
                          f"workload name ({', '.join(known)}), a YAML path (str or pathlib.Path), a mapping of "
                          "workload fields or a WorkloadConfig")
    try:
        if isinstance(name_or_path, dict):
            return WorkloadConfig.parse(name_or_path, where="workload")
        return _cached_load(_workload_file, "workloads", name_or_path)
    except ConfigError as e:
        msg = str(e)
        if where == "workload":
            raise
        raise ConfigError(where + msg[len("workload"):] if msg.startswith("workload:") else f"{where}: {msg}") from None


def _workload_file(name_or_path: str | Path) -> WorkloadConfig:
    p = Path(name_or_path)
    if not is_yaml_path(p):
        p = CONFIG_DIR / "workloads" / f"{name_or_path}.yaml"
        if not p.is_file():
            known = config_names("workloads")
            raise ConfigError(f"workload: unknown workload {str(name_or_path)!r}; accepted: {', '.join(known)}")
    elif not p.is_file():
        raise ConfigError(f"workload: no such file {str(p)!r}")
    return WorkloadConfig.parse(_read_yaml(p), where=f"workload {p.name}")


# ---------------------------------------------------------------------------------------------
# ---- scenarios (VMM) -------------------------------------------------------------------------
# A scenario is one run of the userspace VMM (ringenv/vmm): the host, the VM, the guest
# workload, the link or storage, the dirty-page collector and its tuning, the throttle.
# Loaded from configs/scenarios/NAME.yaml by load_scenario().

from pydantic import PrivateAttr  # noqa: E402  (used by the scenario section only)


#: MAX_MEMORY as the errors say it
MAX_MEMORY_TEXT = "4 PiB (2**52 bytes, the widest guest-physical address space)"


def _size_field(field: str, max_bytes: int = MAX_MEMORY, max_text: str = MAX_MEMORY_TEXT, *, zero: bool = False):
    """A ``mode='before'`` validator turning '16GiB'-style sizes into bytes (:func:`parse_size`; with ``zero``, 0 is
    accepted in any form: 0, 0.0, '0', '0MiB'), at most ``max_bytes`` (``max_text``): a bigger size is an error
    showing it as given (the string, not a rounded byte count)."""

    def conv(cls, v):
        if zero and isinstance(v, float) and v == 0:
            return 0
        n = parse_size(v, field, zero=zero)
        if n > max_bytes:
            raise ValueError(f"{v!r} is not accepted; accepted: a size up to {max_text}")
        return n

    return field_validator(field, mode="before")(conv)


class VmConfig(Strict):
    """The simulated VM: one RAM memslot of ``memory`` bytes and ``vcpus`` vCPUs.

    ``block_fraction`` is the share of RAM backed by huge pages (THP), mapped by stage-2 blocks
    until dirty logging splits them; ``with_bitmap`` enables KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP
    (default: whenever the host offers it, as QEMU does on arm64; false on arm64 shows the losses
    of kvm-dirty-ring.md s11); ``eager_split_chunk`` is KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE in
    bytes (0: split lazily on the first write fault, the kernel default).

    ``zero_fraction`` is the share of RAM that holds only zeros when the VM starts (memory the
    guest has never used), spread evenly over RAM (:func:`ringenv.vmm.dirty.initially_zero`);
    a page stays zero until the guest first writes it. QEMU checks every page it sends and
    puts a zero page on the stream as its header and one byte (save_zero_page), which costs
    the migration thread the host's ``zero_page_check_ns`` instead of the page's wire time.
    The default, 0, is a guest whose every page holds data."""

    memory: int = Field(description="guest RAM in bytes, or a size such as '16GiB'")
    vcpus: int = Field(ge=1, le=512, description="number of vCPUs")
    block_fraction: float = Field(0.5, ge=0.0, le=1.0, description="share of RAM backed by huge pages")
    with_bitmap: bool | None = Field(None, description="enable WITH_BITMAP (null: if the host offers it)")
    eager_split_chunk: int = Field(0, ge=0, description="EAGER_SPLIT_CHUNK_SIZE in bytes, 0 = lazy")
    zero_fraction: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False,
                                 description="share of RAM that is zero when the VM starts (never used)")

    _v_memory = _size_field("memory")
    _v_chunk = _size_field("eager_split_chunk", zero=True)


class LinkConfig(Strict):
    """The migration channel and QEMU's migration parameters.

    ``gbps`` is the link rate in Gb/s (10^9 bit/s); ``max_bandwidth_mibps`` QEMU's max-bandwidth
    in MiB/s (QEMU's default 128; "link" means the link rate); ``downtime_limit_ms`` QEMU's
    downtime-limit; ``device_state_bytes`` the device state sent during the downtime;
    ``give_up_s`` the simulated time after which the VMM gives up on converging, and
    ``give_up_action`` what it then does: ``switchover`` forces the switchover (stop-and-copy of
    whatever remains, as an operator raising downtime-limit would, or libvirt's
    ``--timeout-suspend``) and reports not converged; ``cancel`` cancels the migration
    (QEMU's migrate_cancel: OpenStack nova's default ``live_migration_timeout_action`` abort)
    and reports it cancelled, the VM running on at the source. ``cancel_at_s`` (null: never)
    is an operator's migrate_cancel that many seconds into the migration, whatever it is doing
    then (:mod:`ringenv.vmm.migration`); migration only."""

    gbps: float = Field(10.0, ge=1e-3, le=1e5, description="link rate, Gb/s (1e-3: 1 Mb/s, a 4 KiB page in 33 ms, "
                        "to 1e5: 100 Tb/s; the give-up time is checked between pages)")
    max_bandwidth_mibps: Any = Field(128.0, description="QEMU max-bandwidth, MiB/s or 'link'")
    downtime_limit_ms: float = Field(300.0, gt=0, le=MAX_SIM_S * 1e3, description="QEMU downtime-limit, ms")
    device_state_bytes: int = Field(1 << 20, ge=0, le=MAX_DEVICE_STATE, description="device state sent at "
                                    "switchover, bytes or a size such as '1MiB' (at most 1 TiB)")
    give_up_s: float = Field(600.0, gt=0, le=MAX_SIM_S, description="give up on converging after this many seconds")
    give_up_action: Literal["switchover", "cancel"] = Field(
        "switchover", description="at give_up_s: force the switchover, or cancel the migration")
    cancel_at_s: float | None = Field(None, ge=0, le=MAX_SIM_S,
                                      description="an operator's migrate_cancel at this many seconds")

    _v_dev = _size_field("device_state_bytes", MAX_DEVICE_STATE, "1 TiB", zero=True)

    @field_validator("max_bandwidth_mibps", mode="before")
    @classmethod
    def _v_bw(cls, v):
        if v == "link":
            return v
        if isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and is_finite(v) and v > 0:
            return float(v)
        raise ValueError(f"{v!r} is not accepted; accepted: a finite number of MiB/s > 0 (at most "
                         f"{num_text(sys.float_info.max)}, the largest float), or 'link' (the link rate)")

    @property
    def link_Bps(self) -> float:
        return self.gbps * 1e9 / 8

    @property
    def rate_Bps(self) -> float:
        """What the migration thread can push: min(link, max-bandwidth), bytes/s."""
        if self.max_bandwidth_mibps == "link":
            return self.link_Bps
        return min(self.link_Bps, float(self.max_bandwidth_mibps) * (1 << 20))


class CheckpointConfig(Strict):
    """Periodic incremental checkpointing for ``horizon_s`` of simulated time: the base image
    (all of RAM) is written live to storage at ``storage_mbps`` (MB/s, 10^6 bytes/s); the first
    checkpoint is taken as soon as it is written (a live-written base image is not consistent
    by itself), then one ``period_s`` after each checkpoint's start, each writing the pages
    dirtied since the last one. A ``period_s`` longer than the horizon is one checkpoint; a
    base image that outlasts the horizon, none (the run then reports ``converged`` False).
    ``stop_the_world``: the guest is paused while the dirty set is written (the pause is the
    downtime); otherwise it is written live and only the pages dirtied meanwhile are written
    during a short pause. Times are 1 ns to 1e6 s, ``storage_mbps`` at most 1e8 (100 TB/s)."""

    period_s: float = Field(10.0, gt=0, le=MAX_SIM_S)
    storage_mbps: float = Field(2000.0, gt=0, le=1e8)
    horizon_s: float = Field(60.0, gt=0, le=MAX_SIM_S)
    stop_the_world: bool = True


class AutoConvergeConfig(Strict):
    """QEMU auto-converge (migration parameters cpu-throttle-*, throttle-trigger-threshold)."""

    initial_pct: int = Field(20, ge=1, le=99)
    increment_pct: int = Field(10, ge=1, le=99)
    max_pct: int = Field(99, ge=1, le=99)
    trigger_threshold_pct: int = Field(50, ge=1, le=100)
    tailslow: bool = False
    dirty_sync_timer_ms: float = Field(5000.0, ge=0, le=MAX_SIM_S * 1e3, description="QEMU >= 9.2: a dirty sync "
                                       "when none happened over a tick of this period "
                                       "(CPU_THROTTLE_DIRTY_SYNC_TIMESLICE_MS); 0: no timer (QEMU before 9.2)",
                                       json_schema_extra={"accepted": f"0 (no timer), or 1 to "
                                                                      f"{num_text(MAX_SIM_S * 1e3)} ms"})

    @model_validator(mode="after")
    def _check(self):
        if 0 < self.dirty_sync_timer_ms < 1:
            info = type(self).model_fields["dirty_sync_timer_ms"]
            raise ValueError(f"dirty_sync_timer_ms: {self.dirty_sync_timer_ms!r} is not accepted; accepted: "
                             f"{accepted_range('dirty_sync_timer_ms', info)}")
        if self.max_pct < self.initial_pct:  # QEMU migrate_params_check refuses it too
            raise ValueError(f"max_pct: {self.max_pct} is below initial_pct ({self.initial_pct}); accepted: "
                             f"initial_pct ({self.initial_pct}) to 99")
        return self


class DirtyLimitConfig(Strict):
    """QEMU dirty-limit (migration parameters vcpu-dirty-limit, x-vcpu-dirty-limit-period). It
    engages by the same rule as auto-converge (``auto_converge.trigger_threshold_pct``, QEMU's
    throttle-trigger-threshold) and needs the ring collector."""

    vcpu_limit_mbps: int = Field(1, ge=1, le=10**7, json_schema_extra={"unit": "MiB/s"},
                                 description="per-vCPU quota, whole MiB/s (QEMU's vcpu-dirty-limit)")
    period_ms: int = Field(1000, ge=1, le=1000, description="how often the sleep is adjusted, ms "
                           "(QEMU's x-vcpu-dirty-limit-period: 1..1000)")


class ScenarioConfig(Strict):
    """One VMM run (configs/scenarios/NAME.yaml).

    ``kind``: migration (pre-copy live migration over ``link``) or checkpoint (``checkpoint``).
    ``collector``: ring (KVM dirty ring, ``ring_entries`` per vCPU, reaper every ``interval_ms``)
    or bitmap (KVM_GET/CLEAR_DIRTY_LOG with manual protect). ``throttle``: none, auto-converge or
    dirty-limit (ring only). ``switchover``: qemu (sync when the pending estimate is below
    bandwidth x downtime-limit, QEMU's loop) or pass-end (one sync at the end of every pass over
    the dirty set, the textbook model of migration.md s1). ``rate_scale`` multiplies every
    workload rate (scaled-down variants keep M/R and D/R with memory and link scaled alike), 0.001 to
    1000. ``interval_ms`` is 1e-6 (1 ns) to 1e9 ms. With collector bitmap, ``ring_entries`` and
    ``interval_ms`` are not used (not checked against the host, only that they are positive; the metrics
    report 0 for both).
    ``env`` is reserved for the environment's settings."""

    name: str
    description: str = ""
    kind: Literal["migration", "checkpoint"] = "migration"
    host: str | HostProfile = DEFAULT_HOST
    vm: VmConfig
    workload: str | WorkloadConfig
    rate_scale: float = Field(1.0, ge=MIN_RATE_SCALE, le=MAX_RATE_SCALE)
    link: LinkConfig = Field(default_factory=LinkConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    collector: Literal["ring", "bitmap"] = "ring"
    ring_entries: int = 4096  # > 0 and, for the ring, one the host accepts: checked in _check, listing the sizes
    interval_ms: float = Field(1000.0, gt=0, le=MAX_SIM_S * 1e3)
    throttle: Literal["none", "auto-converge", "dirty-limit"] = "none"
    auto_converge: AutoConvergeConfig = Field(default_factory=AutoConvergeConfig)
    dirty_limit: DirtyLimitConfig = Field(default_factory=DirtyLimitConfig)
    switchover: Literal["qemu", "pass-end"] = "qemu"
    seed: int = Field(0, ge=0, le=2**63 - 1)
    env: dict | None = None

    @field_validator("env")
    @classmethod
    def _v_env(cls, v):
        """The ``env:`` section is checked now (not when an environment is made), field by field."""
        if v is not None:
            try:
                EnvConfig.parse(v, where="env")
            except ConfigError as e:
                lines = e.args[0].splitlines()  # (the heading "invalid env:" is this field's name here)
                raise ValueError("\n".join(lines[1:]) if lines[0] == "invalid env:" else e.args[0]) from None
        return v

    _profile: Any = PrivateAttr(None)
    _workload: Any = PrivateAttr(None)

    @model_validator(mode="after")
    def _check(self):
        try:
            prof = _cached_load(load_host_profile, "hosts", self.host)
        except ConfigError as e:
            raise ValueError(f"host: {e}") from None
        try:
            wl = load_workload(self.workload)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        self._profile, self._workload = prof, wl
        too_fast = check_peak_rate(wl, self.rate_scale, "rate_scale", f"{self.rate_scale:g}")
        if too_fast:
            raise ValueError(too_fast)
        v = self.vm
        mem_ok = (f"accepted on host {prof.name}: a multiple of the page size {prof.page_size} from "
                  f"{64 * prof.page_size} (64 pages) to {1 << prof.phys_addr_bits} bytes")
        if v.memory % prof.page_size:
            raise ValueError(f"vm.memory: {v.memory} bytes is not a multiple of the page size {prof.page_size}; "
                             f"{mem_ok}")
        if v.memory < 64 * prof.page_size:
            raise ValueError(f"vm.memory: {v.memory} bytes is below 64 pages of {prof.page_size}; {mem_ok}")
        if v.memory > 1 << prof.phys_addr_bits:
            raise ValueError(f"vm.memory: {v.memory} bytes is more than host {prof.name} addresses "
                             f"({prof.phys_addr_bits}-bit guest physical addresses: up to {1 << prof.phys_addr_bits}); "
                             f"{mem_ok}")
        if v.with_bitmap and not prof.with_bitmap_supported:
            raise ValueError(f"vm.with_bitmap: host {prof.name} does not offer KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP")
        if v.eager_split_chunk and v.eager_split_chunk not in prof.eager_split_chunk_sizes:
            raise ValueError(f"vm.eager_split_chunk: {v.eager_split_chunk} not accepted by host {prof.name}; "
                             f"accepted: 0, {prof.eager_split_chunk_sizes}")
        if self.collector == "ring" and self.ring_entries not in prof.ring_sizes:
            raise ValueError(f"ring_entries: {self.ring_entries} is not accepted by host {prof.name}; "
                             f"accepted: {', '.join(map(str, prof.ring_sizes))}")
        if self.ring_entries <= 0:
            raise ValueError(f"ring_entries: {self.ring_entries}; accepted: more than 0 (not used by collector "
                             f"{self.collector})")
        if self.throttle == "dirty-limit" and self.collector != "ring":
            raise ValueError("throttle: dirty-limit needs collector ring (QEMU measures the rate with the ring)")
        check_run_kind(self, self.kind, ValueError)
        return self

    @property
    def profile(self) -> HostProfile:
        """The host profile named by ``host`` (loaded once, at validation)."""
        return self._profile

    @property
    def workload_config(self) -> WorkloadConfig:
        """The workload named by ``workload`` (loaded once, at validation)."""
        return self._workload


_LOAD_CACHE: dict = {}


def _cached_load(loader, subdir: str, name):
    """``loader(name)`` for a name or path, memoised on the file's path, mtime and size (a session is
    built per episode; re-reading and re-validating the same YAML each time is wasted work).
    Objects are returned as they are: treat them as read-only (use ``model_copy``)."""
    if not isinstance(name, (str, Path)):
        return loader(name)
    p = Path(name)
    path = p if is_yaml_path(p) else CONFIG_DIR / subdir / f"{name}.yaml"
    try:
        st = path.stat()
        key = (loader.__name__, str(path), st.st_mtime_ns, st.st_size)  # (size: a rewrite within one mtime tick)
    except OSError:
        return loader(name)  # let the loader report the missing file or unknown name
    if key not in _LOAD_CACHE:
        _LOAD_CACHE[key] = loader(name)
    return _LOAD_CACHE[key]


def deep_merge(base: dict, over: dict) -> dict:
    """``base`` updated by ``over``, a mapping in both merged key by key (at every depth)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def config_names(kind: str) -> list[str]:
    """The names of the shipped configs of ``kind`` ("hosts", "workloads", "scenarios"): their
    files in configs/KIND/, sorted."""
    return sorted(q.stem for q in (CONFIG_DIR / kind).glob("*.yaml"))


def scenario_names() -> list[str]:
    return config_names("scenarios")


def load_scenario(name_or_path: str | Path | ScenarioConfig | dict | None = None, *, run_kind: str | None = None,
                  **overrides) -> ScenarioConfig:
    """A scenario by name (configs/scenarios/NAME.yaml; None gives ``default``), path, mapping
    or object, with keyword ``overrides`` of its fields (a mapping value is merged into the
    nested section, e.g. ``vm={"memory": "1GiB"}``). Everything is validated: a bad value
    raises :class:`ConfigError` naming the field and what is accepted. ``run_kind`` is the kind
    the caller runs (an env id, a command), which replaces the scenario's own ``kind`` as
    ``kind=`` would, but is not named among the keyword overrides in an error (the user gave
    none). In a scenario file, a relative ``host:`` or ``workload:`` path (a name ending in
    .yaml or .yml) is the file's neighbour: resolved against the file's directory, not the
    current one."""
    where = "scenario"
    if name_or_path is None:
        name_or_path = "default"
    if not isinstance(name_or_path, (str, Path, ScenarioConfig, dict)):
        raise ConfigError(f"scenario: {name_or_path!r} ({type(name_or_path).__name__}) is not accepted; accepted: a "
                          f"scenario name ({', '.join(scenario_names())}), a YAML path (str or pathlib.Path), a "
                          "mapping of scenario fields or a ScenarioConfig")
    if isinstance(name_or_path, ScenarioConfig) and not overrides and run_kind in (None, name_or_path.kind):
        return name_or_path
    if isinstance(name_or_path, ScenarioConfig):
        data = name_or_path.model_dump(exclude_unset=True)  # (re-validated: defaults come back as defaults)
        where = f"scenario {name_or_path.name}"
    elif isinstance(name_or_path, dict):
        data = dict(name_or_path)
    else:
        p = Path(name_or_path)
        if p.is_dir():
            raise ConfigError(f"scenario: {str(p)!r} is a directory; expected a scenario name or a YAML file")
        if not is_yaml_path(p):
            p = CONFIG_DIR / "scenarios" / f"{name_or_path}.yaml"
            if not p.is_file():
                raise ConfigError(f"scenario: unknown scenario {str(name_or_path)!r}; accepted: "
                                  f"{', '.join(scenario_names())} or a YAML file")
        elif not p.is_file():
            raise ConfigError(f"scenario: no such file {str(p)!r}")
        data = _read_yaml(p)
        if not isinstance(data, dict):
            raise ConfigError(f"scenario {p.name}: expected a mapping of fields")
        where = f"scenario {p.name}"
        for key in ("host", "workload"):  # a relative path in the file: beside the file
            v = data.get(key)
            if isinstance(v, str) and is_yaml_path(v) and not Path(v).is_absolute():
                data[key] = str(p.parent / v)
    replaced = run_kind or overrides.get("kind")
    if replaced is not None and "kind" in data:  # (the env id or command replaces it: a typo would go unseen)
        kinds = typing.get_args(ScenarioConfig.model_fields["kind"].annotation)
        if data["kind"] not in kinds:
            raise ConfigError(f"invalid {where}:\n  kind: {data['kind']!r} is not accepted; accepted: "
                              f"{', '.join(kinds)} (what runs is chosen by the env id or the command, "
                              f"{replaced} here, but the file's own value must be one of them)")
    if overrides:
        data = deep_merge(data, overrides)
        where = f"{where} with the keyword overrides ({', '.join(overrides)})"
    if run_kind is not None:
        data = {**data, "kind": run_kind}
    return ScenarioConfig.parse(data, where=where)


def scale_scenario(scenario: str | Path | ScenarioConfig | dict | None, memory: int | str,
                   **overrides) -> ScenarioConfig:
    """A scaled-down (or up) variant of a scenario: guest memory ``memory`` (bytes or a size such as
    '1GiB'), and the link rate (and a numeric max-bandwidth), the checkpoint storage bandwidth
    and every workload rate scaled by the same factor ``memory / scenario memory``. M/R, and D/R
    within a few % where the guest has CPU time to spare and no Zipf region, hence the pre-copy
    dynamics in simulated seconds, are kept while the simulation does that factor less work. D/R
    moves where a Zipf region's popularity, spread over the region's pages, changes shape with
    their number (at 1/16: memcached +18%, web +11%, redis +7%), and for a guest its faults slow
    down (the host's costs are not scaled, so each vCPU takes that factor fewer faults per
    second and runs faster: analytics +17-18%, bulk-load +11-13%, stream-scan +11-12%, hpc-stencil
    +7-8%; calc-dirty-rate over 1 to 5 s, 3 seeds).
    Ring sizes, the device state, the host's costs and the dirty-limit quota (an absolute rate
    per vCPU, beside QEMU's fixed tolerances) are not scaled: a ring of a given size fills that
    factor slower, fixed costs weigh more, and the quota is that factor looser. One host cost is
    scaled, as the link is, when the VM has zero pages (``vm.zero_fraction`` > 0):
    ``zero_page_check_ns``, a page's sending time when the page is zero (the host profile then
    becomes an object of the same name). ``overrides`` as :func:`load_scenario`'s (applied
    last)."""
    cfg = load_scenario(scenario)
    given, memory = memory, parse_size(memory, "memory")
    if memory > MAX_MEMORY:  # (nor could the factor be a float: 10**400 / memory overflows)
        raise ConfigError(f"memory: {given!r} is not accepted; accepted: a size up to {MAX_MEMORY_TEXT}")
    f = memory / cfg.vm.memory
    link: dict = {"gbps": cfg.link.gbps * f}
    if cfg.link.max_bandwidth_mibps != "link":
        link["max_bandwidth_mibps"] = cfg.link.max_bandwidth_mibps * f
    scaled = {"vm": {"memory": memory}, "rate_scale": cfg.rate_scale * f, "link": link,
              "checkpoint": {"storage_mbps": cfg.checkpoint.storage_mbps * f}}
    out = load_scenario(cfg, **deep_merge(scaled, overrides))
    if out.vm.zero_fraction > 0 and f != 1:
        p = out.profile
        out = load_scenario(out, host=p.with_costs(zero_page_check_ns=p.costs.zero_page_check_ns / f))
    return out


# ---------------------------------------------------------------------------------------------
# ---- environment (ringenv/env.py) ------------------------------------------------------------
# The `env:` section of a scenario, and keyword overrides of gymnasium.make.

DEFAULT_INTERVALS_MS = [10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0]


class RewardConfig(Strict):
    """Weights of the costs the reward subtracts (see the MigrationEnv docstring), per unit:
    vcpu per vCPU-second lost divided by the vCPU count, vmm per VMM CPU second, memory per MiB
    of rings per second, time per second of migration, downtime per second, truncation per
    second of the downtime a switchover would cause when the episode is truncated (0 by
    default: a learner that bootstraps at truncation, as stable-baselines3 does, already
    values what the episode left undone), cancel per second of the downtime a switchover would
    have caused when the migration is cancelled (at give_up_s with ``link.give_up_action:
    cancel``, or at ``link.cancel_at_s``: the episode terminates with the migration to be done
    again; the downtime weight's default).
    The sum is divided by ``scale``. Weights are 0 to 1e6, ``scale`` 1e-6 to 1e6 (a reward stays finite)."""

    vcpu: float = Field(10.0, ge=0, le=MAX_REWARD_WEIGHT)
    vmm: float = Field(1.0, ge=0, le=MAX_REWARD_WEIGHT)
    memory: float = Field(0.002, ge=0, le=MAX_REWARD_WEIGHT)
    time: float = Field(0.05, ge=0, le=MAX_REWARD_WEIGHT)
    downtime: float = Field(10.0, ge=0, le=MAX_REWARD_WEIGHT)
    truncation: float = Field(0.0, ge=0, le=MAX_REWARD_WEIGHT)
    cancel: float = Field(10.0, ge=0, le=MAX_REWARD_WEIGHT)
    scale: float = Field(1.0, ge=1 / MAX_REWARD_WEIGHT, le=MAX_REWARD_WEIGHT)


#: what each of EnvConfig.intervals_ms accepts (its errors say so)
INTERVALS_MS_ACCEPTED = "1 to 10000 ms (the observation holds log10(ms) / 4), each once"
#: the bounds of EnvConfig.rate_scale_range's factors
MIN_RATE_SCALE_FACTOR, MAX_RATE_SCALE_FACTOR = 0.01, 100.0
#: what EnvConfig.rate_scale_range accepts (its errors say so)
RATE_SCALE_RANGE_ACCEPTED = (f"[low, high] with 0 < low <= high <= {MAX_RATE_SCALE_FACTOR:g} and low >= "
                             f"{MIN_RATE_SCALE_FACTOR:g} (factors on the workload's write rates)")


class EnvConfig(Strict):
    """Environment settings: the control interval (simulated ms between actions), the episode
    time cap, the pre-migration dirty-rate sample, the action grids, the workload set and the
    reward weights."""

    @classmethod
    def parse(cls, data: Any, where: str | None = None):
        """As :meth:`Strict.parse`, the workload sets file read first: an error in it is its own
        (naming the file, the set, the split and the position), not one of these settings'."""
        load_workload_sets()
        return super().parse(data, where)

    control_interval_ms: float = Field(50.0, ge=1e-6, le=MAX_SIM_S * 1e3,
                                       description="simulated ms between two actions (1e-6: 1 ns, to 1e9)")
    max_episode_s: float = Field(120.0, gt=0, le=MAX_SIM_S, description="simulated seconds before truncation")
    sample_s: float = Field(1.0, gt=0, le=MAX_SIM_S, description="pre-migration dirty-rate sample, simulated s")
    sample_windows: int = Field(5, ge=1, le=100, description="dirty-log reads over the sample (re-dirty rate)")
    ring_sizes: list[int] | None = Field(None, description="ring entries offered (default: all the host accepts)")
    intervals_ms: list[float] = Field(default_factory=lambda: list(DEFAULT_INTERVALS_MS), min_length=1,
                                      json_schema_extra={"accepted": INTERVALS_MS_ACCEPTED})
    workload_set: str = "default"
    rate_scale_range: tuple[float, float] = Field(
        (1.0, 1.0),
        description="[low, high]: each episode multiplies its workload's write rates by a factor drawn log-uniformly "
                    "from it (domain randomisation for training; [1, 1]: the workloads as written)",
        json_schema_extra={"accepted": RATE_SCALE_RANGE_ACCEPTED})
    reward: RewardConfig = Field(default_factory=RewardConfig)

    @field_validator("rate_scale_range", mode="before")
    @classmethod
    def _two_factors(cls, v):
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            raise ValueError(f"{v!r} is not accepted; accepted: {RATE_SCALE_RANGE_ACCEPTED}")
        return v

    @model_validator(mode="after")
    def _check(self):
        lo_hi = self.rate_scale_range
        if not MIN_RATE_SCALE_FACTOR <= lo_hi[0] <= lo_hi[1] <= MAX_RATE_SCALE_FACTOR:
            raise ValueError(f"rate_scale_range: {list(lo_hi)} is not accepted; accepted: {RATE_SCALE_RANGE_ACCEPTED}")
        for m in self.intervals_ms:
            if not 1 <= m <= 10_000:
                raise ValueError(f"intervals_ms: {m:g} is not accepted; accepted: {INTERVALS_MS_ACCEPTED}")
        if self.ring_sizes is not None and not self.ring_sizes:
            raise ValueError("ring_sizes: [] is empty; at least one size is needed (or leave ring_sizes out: every "
                             "size the host accepts)")
        if self.ring_sizes is not None and any(n <= 0 or n & (n - 1) for n in self.ring_sizes):
            raise ValueError(f"ring_sizes: {self.ring_sizes}: expected powers of two (ring entries; which ones a host "
                             "accepts: its profile's ring sizes, e.g. 256 to 65536 on arm64-4k)")
        for name, values in (("intervals_ms", self.intervals_ms), ("ring_sizes", self.ring_sizes or [])):
            for i, x in enumerate(values):
                if x in values[:i]:
                    raise ValueError(f"{name}: {x:g} is given twice (each choice once)")
        sets = load_workload_sets()
        if self.workload_set not in sets:
            raise ValueError(f"workload_set: {self.workload_set!r}; accepted: {', '.join(sorted(sets))}")
        return self


def load_workload_sets() -> dict[str, dict[str, list[str]]]:
    """Named workload sets with their train/test split (configs/workload-sets.yaml), the whole file
    validated as it is read: a mapping of set names, each a mapping with exactly the keys ``train``
    and ``test``, each a non-empty list of workload names (or YAML paths) that load, none given twice
    and none in both. An error names the file, the set, the split and the position, and what is
    accepted. The file's structure is read once per modification (memoised as the workloads are);
    every workload it names is loaded on each call, so an edited workload file is checked too."""
    path = CONFIG_DIR / "workload-sets.yaml"
    data = _cached_load(_read_workload_sets, "", path)
    for name, split in data.items():
        for part in ("train", "test"):
            for i, w in enumerate(split[part]):
                load_workload(w, where=f"{path.name}: set {name!r}, {part}[{i}]")
    return {name: {part: list(ws) for part, ws in split.items()} for name, split in data.items()}


def _read_workload_sets(path: Path) -> dict[str, dict[str, list[str]]]:
    """The structure of :func:`load_workload_sets`'s file, checked (not its workloads)."""
    data = _read_yaml(path)
    known = config_names("workloads")
    names = f"workload names ({', '.join(known)}) or YAML paths"
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path.name}: {data!r} is not accepted; accepted: a mapping of set names, each "
                          "{train: [...], test: [...]}")
    for name, split in data.items():
        if not isinstance(name, str):
            raise ConfigError(f"{path.name}: set name {name!r} is not accepted; accepted: a string")
        if not isinstance(split, dict) or set(split) != {"train", "test"}:
            raise ConfigError(f"{path.name}: set {name!r}: {split!r} is not accepted; accepted: a mapping with exactly "
                              "the keys train and test (lists of workload names)")
        for part in ("train", "test"):
            ws = split[part]
            if not isinstance(ws, list) or not ws:
                raise ConfigError(f"{path.name}: set {name!r}, {part}: {ws!r} is not accepted; accepted: a non-empty "
                                  f"list of {names}")
            for i, w in enumerate(ws):
                at = f"{path.name}: set {name!r}, {part}[{i}]"
                if not isinstance(w, str) or not w:
                    raise ConfigError(f"{at}: {w!r} is not accepted; accepted: {names}")
                if w in ws[:i]:
                    raise ConfigError(f"{at}: {w!r} is given twice (each workload once)")
        overlap = set(split["train"]) & set(split["test"])
        if overlap:
            raise ConfigError(f"{path.name}: set {name!r} has workloads in both train and test: {sorted(overlap)}; "
                              "accepted: each workload in one of them")
    return data
