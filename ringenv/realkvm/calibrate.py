"""Measure this host's dirty-logging costs with small guests; emit a host-profile YAML.

The ring costs (harvest, KVM_RESET_DIRTY_RINGS) are medians over repeated passes, their
per-entry parts the slope of a line fitted over several sizes. The write costs come from one
pass over one slot each (a first write to a clean page, a write to a dirty page: per page of
that pass, the MMIO round trip subtracted, which is a median of probes), and
``protect_page_ns`` is the logging ioctl's time divided by the slot's pages, its fixed cost
included: these move by 2-3x from run to run and slot size to slot size. Absolute numbers on a
nested host (as the project's machines are) are inflated by nesting: compare ratios, not
absolutes, with bare metal.
"""

from __future__ import annotations

import datetime
import os
import statistics
import tempfile
import threading
import time
from typing import Callable

import numpy as np

from ringenv.config import write_atomically
from ringenv.realkvm.arch import WriteProgram, host_arch
from ringenv.realkvm.guest import DATA_SLOT, Guest
from ringenv.realkvm.ioctl import (
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_MEM_LOG_DIRTY_PAGES, dirty_pages)

RING = 65536           # entries: no full exits while measuring
REPEATS = 7
RESET_SIZES = (1, 16, 64, 256, 1024, 4096)
BITMAP_SIZES = (4096, 16384, 65536)
FALLBACK_KEYS = ("wp_fault_ns", "dirty_write_ns", "exit_ns", "reset_call_ns", "reset_entry_ns",
                 "reprotect_call_ns", "harvest_entry_ns", "get_dirty_log_page_ns")


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    t = time.perf_counter_ns()
    result = fn()
    return time.perf_counter_ns() - t, result


#: a bound for a guest that never exits, not for a slow host: one run of the calibration guest
#: takes milliseconds natively, but ~2.5 s (a 65536-page pass) on a nested host, and several
#: times that on a loaded one (10 s was exceeded there: calibrate then failed)
RUN_TIMEOUT_S = 120.0


def _run_to(guest: Guest, kind: str, timeout: float = RUN_TIMEOUT_S) -> float:
    """Run vCPU 0 to its next event, which must be ``kind``; return the wall time in ns. A run
    that has not come back after ``timeout`` s is kicked out of KVM_RUN (VcpuKicked, a
    TimeoutError): a guest that never exits cannot hang the calibration."""
    timer = threading.Timer(timeout, guest.kick_all)
    timer.daemon = True
    timer.start()
    try:
        ns, (got, _) = _timed(lambda: guest.run(0))
    finally:
        timer.cancel()
    if got != kind:
        raise RuntimeError(f"calibration guest: expected a {kind} exit, got {got}")
    return ns


def _fit(xs, ys) -> tuple[float, float]:
    """Line y = a + b x, least squares on relative errors (sizes span decades); (a, b)."""
    ys = np.asarray(ys, float)
    b, a = np.polyfit(np.asarray(xs, float), ys, 1, w=1 / np.maximum(ys, 1.0))
    return float(a), float(b)


def measure_writes(pages: int = 8192, probes: int = 200) -> dict[str, float]:
    """First write to a clean page (fault + push), write to a dirty page, MMIO exit round trip,
    and write-protecting a populated slot when logging is turned on (per page)."""
    warm = list(range(pages))
    prog = WriteProgram(warm * 3 + [0] * probes,
                        frozenset([pages - 1, 2 * pages - 1, 3 * pages - 1]
                                  + list(range(3 * pages, 3 * pages + probes))))
    with Guest([prog], pages, ring_entries=RING, log_dirty=False) as g:
        _run_to(g, "sync")                           # pass 0: map every page, not logging
        protect, _ = _timed(lambda: g.vm.set_memory_flags(DATA_SLOT, KVM_MEM_LOG_DIRTY_PAGES))
        first = _run_to(g, "sync")                   # pass 1: every write faults and pushes
        again = _run_to(g, "sync")                   # pass 2: every page already writable
        exits = [_run_to(g, "sync") for _ in range(probes)]  # one dirty write + one exit each
        if len(g.vcpus[0].harvest()) != pages:
            raise RuntimeError("calibration guest: expected one ring entry per page")
    exit_ns = statistics.median(exits)
    dirty = max(0.0, (again - exit_ns) / pages)
    return {"wp_fault_ns": max(1.0, (first - exit_ns) / pages), "dirty_write_ns": dirty,
            "exit_ns": max(1.0, exit_ns - dirty), "protect_page_ns": protect / pages}


def _reset_run(pattern: list[int], slot_pages: int) -> list[tuple[int, float, float]]:
    """(entries, harvest ns, reset ns) for REPEATS passes over ``pattern``."""
    n = len(pattern)
    prog = WriteProgram(pattern * (REPEATS + 1),
                        frozenset(range(n - 1, n * (REPEATS + 1), n)))
    rows = []
    with Guest([prog], slot_pages, ring_entries=RING) as g:
        vcpu = g.vcpus[0]
        for rep in range(REPEATS + 1):
            _run_to(g, "sync")
            harvest, entries = _timed(vcpu.harvest)
            reset, count = _timed(g.vm.reset_dirty_rings)
            if count != len(entries) or count != n:
                raise RuntimeError(f"calibration: reset {count}, harvested {len(entries)}, "
                                   f"written {n}")
            if rep:  # pass 0 also populates host memory: skip it
                rows.append((n, harvest, reset))
    return rows


def measure_reset() -> dict[str, float]:
    """KVM_RESET_DIRTY_RINGS per call and per entry, contiguous and scattered (stride 64:
    one re-protect call per entry); userspace harvest per entry."""
    slopes, out, harvest_rows = {}, {}, []
    for kind, stride in (("contiguous", 1), ("scattered", 64)):
        rows = []
        for size in RESET_SIZES:
            rows += _reset_run([i * stride for i in range(size)], size * stride)
        harvest_rows += rows
        med = {s: statistics.median(r for n, _, r in rows if n == s) for s in RESET_SIZES}
        out[f"reset_{kind}_call_ns"], slopes[kind] = _fit(list(med), list(med.values()))
        out[f"reset_{kind}_entry_ns"] = slopes[kind]
    reprotect = max(0.0, (slopes["scattered"] - slopes["contiguous"]) * 64 / 63)
    ring_ns, entry_ns = _fit([n for n, _, _ in harvest_rows], [h for _, h, _ in harvest_rows])
    out.update(reset_call_ns=max(0.0, out["reset_contiguous_call_ns"]),
               reset_entry_ns=max(0.0, slopes["contiguous"] - reprotect / 64),
               reprotect_call_ns=reprotect, harvest_entry_ns=max(0.0, entry_ns),
               harvest_ring_ns=max(0.0, ring_ns))
    return out


def measure_bitmap() -> dict[str, float]:
    """KVM_GET_DIRTY_LOG (no ring) per page of the slot and per dirty page; userspace scan of
    the bitmap per page; KVM_CLEAR_DIRTY_LOG (manual protect) per page."""
    clean, dirty, scan, clear = [], [], [], []
    for pages in BITMAP_SIZES:
        prog = WriteProgram(list(range(pages)) * 2, frozenset([pages - 1, 2 * pages - 1]))
        with Guest([prog], pages) as g:
            _run_to(g, "sync")
            g.vm.get_dirty_log(DATA_SLOT)            # pass 0 populated memory: start clean
            _run_to(g, "sync")
            t_dirty, words = _timed(lambda: g.vm.get_dirty_log(DATA_SLOT))
            t_clean, _ = _timed(lambda: g.vm.get_dirty_log(DATA_SLOT))
            t_scan, found = _timed(lambda: dirty_pages(words))
            if len(found) != pages:
                raise RuntimeError("calibration: GET_DIRTY_LOG missed pages")
            clean.append(t_clean)
            dirty.append((t_dirty - t_clean) / pages)
            scan.append(t_scan / pages)
        with Guest([prog], pages, caps=[(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 1)]) as g:
            _run_to(g, "sync")
            words = g.vm.get_dirty_log(DATA_SLOT)
            t_clear, _ = _timed(lambda: g.vm.clear_dirty_log(DATA_SLOT, 0, pages, words))
            clear.append(t_clear / pages)
    _, per_page = _fit(BITMAP_SIZES, clean)
    return {"get_dirty_log_page_ns": max(0.0, per_page),
            "get_dirty_log_dirty_ns": max(0.0, statistics.median(dirty)),
            "bitmap_scan_page_ns": statistics.median(scan),
            "clear_dirty_log_page_ns": statistics.median(clear)}


def measure() -> dict[str, float]:
    """All measurements, in (float) nanoseconds."""
    return {**measure_writes(), **measure_reset(), **measure_bitmap()}


# --- the host profile ---
NOTE = ("# Measured on this host by `ringenv calibrate` with small native guests.\n"
        "# Nested hosts (as this project's machines) inflate absolute numbers: compare ratios.\n")
MEASURED = {"wp_fault_ns": "first write to a clean page: fault + push",
            "exit_ns": "MMIO exit to userspace and back",
            "harvest_entry_ns": "this package's Python loop; QEMU's C loop is far cheaper",
            "harvest_ring_ns": "this package's Python loop",
            "reset_call_ns": "intercept over 1..4096 entries",
            "reprotect_call_ns": "stride-64 minus contiguous per-entry reset cost, x 64/63"}
FOLDED = {"reprotect_page_ns": "folded into reset_entry_ns (not separable from userspace)",
          "tlbi_base_ns": "folded into reset_call_ns (one flush per reset, 1 vCPU)"}


def _rounded(value: float, integer: bool) -> int | float:
    return int(round(value)) if integer or value >= 10 else round(value, 2)


def _least(field) -> float:
    """The least value a measured cost is written as: 1 ns for a cost the schema requires to be
    positive (``gt``), else 0: a noisy measurement below it (a slope, a difference of medians)
    must not make the measured profile invalid."""
    return 1.0 if any(getattr(m, "gt", None) is not None for m in field.metadata) else 0.0


def profile_yaml(measured: dict[str, float]) -> str:
    """A host profile in the schema of ``ringenv.config.HostProfile`` (name x86-calibrated),
    the base profile's fields kept and its costs replaced where measured (a negative
    measurement as 0, or 1 ns where the cost must be positive); or, without ``ringenv.config``,
    just a ``costs:`` mapping of the measured keys."""
    import yaml

    arch = host_arch()
    today = datetime.date.today().isoformat()
    try:
        from ringenv.config import HostCosts, HostProfile, load_host_profile
    except ImportError:
        costs = {k: int(round(max(0.0, measured[k]))) for k in FALLBACK_KEYS}
        return NOTE + yaml.safe_dump({"name": f"{arch.name.split('_')[0]}-calibrated",
                                      "measured": today, "costs": costs}, sort_keys=False)
    base = load_host_profile(arch.profile_name())
    data = base.model_dump(exclude={"costs"})
    data.update(name=f"{base.arch}-calibrated", measured=today,
                description=f"{base.description} (calibrated on this host)")
    costs, comments = base.costs.model_dump(), {}
    for key, field in HostCosts.model_fields.items():
        if key in measured:
            costs[key] = _rounded(max(_least(field), measured[key]), field.annotation is int)
            comments[key] = "measured" + (f": {MEASURED[key]}" if key in MEASURED else "")
        elif key in FOLDED:
            costs[key], comments[key] = 0, FOLDED[key]
        else:
            comments[key] = f"not measured: from {base.name}.yaml"
    HostProfile.parse({**data, "costs": costs})  # refuse to emit an invalid profile
    lines = [NOTE + f"# Base profile: {base.name}.yaml.\n",
             yaml.safe_dump(data, sort_keys=False), "costs:\n"]
    width = max(len(k) for k in costs) + 2
    lines += [f"  {k + ':':<{width}} {v!s:<10} # {comments[k]}\n" for k, v in costs.items()]
    return "".join(lines)


class ProfileNotWritten(OSError):
    """The profile was measured but ``--out`` could not be written at the end; ``profile`` is
    the YAML text (the command prints it to standard output instead)."""

    def __init__(self, code: int | None, message: str, profile: str):
        super().__init__(message)
        self.errno, self.profile = code, profile


EXPECTED = "expected a file to write in an existing, writable directory"


def _target(out: str) -> str:
    """The file ``--out`` names, symbolic links followed (the link is kept, its target written)."""
    return os.path.realpath(out)


def check_out(out: str) -> None:
    """Refuse an ``--out`` that cannot be written, before anything is measured (a ValueError
    naming --out): empty, a directory (or a path ending in a separator), a missing directory,
    something other than a regular file, a file it may not write, or a directory it may not
    create the temporary file of :func:`ringenv.config.write_atomically` in (made and removed; an existing
    file is left untouched)."""
    if not out:
        raise ValueError(f"--out {out!r}: empty; {EXPECTED}")
    target = _target(out)
    parent = os.path.dirname(target)
    if out.endswith(tuple(filter(None, (os.sep, os.altsep)))):
        raise ValueError(f"--out {out!r}: ends in {out[-1]!r}, so names a directory; {EXPECTED}")
    if os.path.isdir(target):
        raise ValueError(f"--out {out!r}: a directory; {EXPECTED}")
    if not os.path.isdir(parent):
        raise ValueError(f"--out {out!r}: no directory {parent!r}; {EXPECTED}")
    if os.path.exists(target) and not os.path.isfile(target):
        raise ValueError(f"--out {out!r}: not a regular file; {EXPECTED}")
    try:
        if os.path.exists(target):
            open(target, "a").close()  # (opened, nothing written: an existing profile stays as it is)
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as exc:
        raise ValueError(f"--out {out!r}: cannot be written ({exc.strerror}); {EXPECTED}") from None


def calibrate(out: str | None = None) -> str:
    """Measure and return the profile YAML; also write it to ``out`` if given (checked before
    measuring: :func:`check_out`; written by :func:`ringenv.config.write_atomically`). If writing ``out`` still
    fails at the end, a ProfileNotWritten naming --out and carrying the profile."""
    if out is not None:
        check_out(out)
    text = profile_yaml(measure())
    if out is not None:
        try:
            write_atomically(out, text)
        except OSError as exc:
            raise ProfileNotWritten(exc.errno, f"--out {out!r}: the measured profile could not be written "
                                               f"({exc.strerror}); it is on standard output", text) from None
    return text
