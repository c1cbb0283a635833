"""``ringenv replay``: run a write trace on the simulated host and report every harvest.

The contract (shared with ``ringenv kvm-replay``, which runs the same trace on the real KVM):

input ``{"slot_pages": int, "ring_entries": int, "reap_scope": "all"|"self",
"with_bitmap": bool (optional), "unmapped_pages": int (optional, default 0),
"populated": bool (optional, default false),
"vcpus": [{"writes": [page offsets], "syncs": [write indices] (optional),
"reads": [indices of accesses in "writes" that are reads] (optional)}]}``

Offsets count pages of the host profile's page size (so one trace spans 16 times the memory on
arm64-64k that it spans on arm64-4k); ``slot_pages + unmapped_pages`` must fit the profile's
guest-physical range. Each vCPU's list is its program order; the order across vCPUs follows
from simulated time (below), not from the file. The file is read whole (JSON has no streaming
form): about 90 bytes of memory per write at the peak (2 million writes: 340 MB against 160 MB
for a one-write trace). A key given twice in one object is an error.

The guest is fresh: its data pages are not mapped at stage 2 until first touched, and the
memory behind them is fresh too (the host's zero page: a read fault maps it read-only and logs
nothing) unless ``populated``: userspace wrote every page before the run (as QEMU's
-mem-prealloc does), so a read fault maps a writable page, which x86 logs (make_spte) and
arm64 logs in a ring-only slot (without WITH_BITMAP: not logging, reference s11). The slot
holds offsets ``0 .. slot_pages - 1``; the ``unmapped_pages`` offsets after it are guest-physical
memory no memslot maps: an access there exits to userspace as KVM_EXIT_MMIO (an "mmio" exit:
the store completes as MMIO, nothing is written or logged) and userspace re-enters at once.

Userspace harvests and resets at every KVM_EXIT_DIRTY_RING_FULL and after each sync index (the
guest exits to userspace after that write), both times all rings, or only that vCPU's ring with
"self"; and once, all rings, at the end. Output::

    {"profile": str, "ring_entries": int, "soft_limit": int,
     "resets": [every KVM_RESET_DIRTY_RINGS return value, in call order],
     "vcpus": [{"full_exits": int, "lost": int, "resets": [returns of the resets this vCPU issued],
                "batches": [{"trigger": "full"|"sync"|"final", "offsets": [harvest order]}],
                "exits": ["full"|"sync"|"mmio"|"done", in order],
                "faults": int}],
     "faults": int}

``resets`` in call order is the simulator's one order; on the real KVM the vCPU threads'
resets interleave as they run, so with several vCPUs only each vCPU's own ``resets`` and the
final reset are stable from run to run (``ringenv validate`` compares those).

``faults``: the vCPU's stage-2 faults (``Vcpu.stats.faults``, as KVM's vCPU statistic pf_fixed
counts them), and their sum over the vCPUs; ``kvm-replay`` reports them only with ``--faults``.

A batch is recorded each time a ring is harvested and holds at least one entry. Userspace work
takes no simulated time here: the order of events is what is checked, not their duration. The
vCPUs' writes interleave by guest time: a store takes the profile's ``dirty_write_ns``, and a
vCPU's next write comes after the kernel time its fault took (write-protect fault, split, PML
logging: the profile's costs), so which vCPU first writes a shared page, and whose ring logs it,
follows from that (:class:`ringenv.guest.trace.TraceProgram`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .config import ConfigError, load_host_profile
from .guest.trace import TraceProgram
from .kvm import uapi
from .kvm.uapi import KvmError
from .kvm.vm import Vm
from .vmm.reap import RingReader

#: the most pages a trace can address on any host (52 guest-physical bits of 4 KiB pages); the
#: profile's own range is checked when the trace runs
MAX_TRACE_PAGES = 1 << 40

TRACE_KEYS = {"slot_pages", "ring_entries", "reap_scope", "with_bitmap", "unmapped_pages", "populated", "vcpus"}


def validate_trace(trace: Any) -> dict:
    """Check a trace against the contract; raise ConfigError naming the bad field."""
    if not isinstance(trace, dict):
        raise ConfigError(f"trace: expected a JSON object, got {type(trace).__name__}")
    unknown = set(trace) - TRACE_KEYS
    if unknown:
        raise ConfigError(f"trace: unknown key(s) {sorted(unknown)}; accepted: {sorted(TRACE_KEYS)}")
    for key in ("slot_pages", "ring_entries", "reap_scope", "vcpus"):
        if key not in trace:
            raise ConfigError(f"trace.{key}: missing (required)")
    sp = trace["slot_pages"]
    if not isinstance(sp, int) or isinstance(sp, bool) or not 0 < sp <= MAX_TRACE_PAGES:
        raise ConfigError(f"trace.slot_pages: {sp!r} is not accepted; expected an integer in 1..2^40 (the "
                          "host profile's guest-physical range bounds it further)")
    re_ = trace["ring_entries"]
    if not isinstance(re_, int) or isinstance(re_, bool) or re_ <= 0:
        raise ConfigError(f"trace.ring_entries: {re_!r} is not a positive integer")
    if trace["reap_scope"] not in ("all", "self"):
        raise ConfigError(f"trace.reap_scope: {trace['reap_scope']!r}; accepted: 'all', 'self'")
    for key in ("with_bitmap", "populated"):
        if key in trace and not isinstance(trace[key], bool):
            raise ConfigError(f"trace.{key}: {trace[key]!r}; accepted: true, false")
    up = trace.get("unmapped_pages", 0)
    if not isinstance(up, int) or isinstance(up, bool) or not 0 <= up <= MAX_TRACE_PAGES - sp:
        raise ConfigError(f"trace.unmapped_pages: {up!r} is not accepted; expected an integer in "
                          f"0..{MAX_TRACE_PAGES - sp} (pages past the slot that no memslot maps; slot_pages + "
                          "unmapped_pages at most 2^40, the host profile's guest-physical range bounds it further)")
    end = sp + up
    vcpus = trace["vcpus"]
    if not isinstance(vcpus, list) or not vcpus:
        raise ConfigError("trace.vcpus: expected a non-empty list of {writes, syncs}")
    for i, v in enumerate(vcpus):
        if not isinstance(v, dict) or set(v) - {"writes", "syncs", "reads"} or "writes" not in v:
            raise ConfigError(f"trace.vcpus[{i}]: expected {{'writes': [...], 'syncs': [...], 'reads': [...]}} "
                              f"(reads optional), got {v!r:.80}")
        w = v["writes"]
        if not isinstance(w, list):
            raise ConfigError(f"trace.vcpus[{i}].writes: {w!r:.80}; expected a list of integer page offsets")
        for k, x in enumerate(w):
            if not isinstance(x, int) or isinstance(x, bool):
                raise ConfigError(f"trace.vcpus[{i}].writes[{k}]: {x!r:.80} is not an integer page offset")
        bad = [x for x in w if not 0 <= x < end]
        if bad:
            where = (f"the slot (0..{sp - 1})" if not up
                     else f"the slot and the {up} unmapped pages after it (0..{end - 1})")
            k = next(k for k, x in enumerate(w) if not 0 <= x < end)
            raise ConfigError(f"trace.vcpus[{i}].writes[{k}]: offset {bad[0]} outside {where}")
        for key in ("syncs", "reads"):
            s = v.get(key, [])
            if not isinstance(s, list):
                raise ConfigError(f"trace.vcpus[{i}].{key}: {s!r:.80}; expected a list of indices into writes"
                                  + (f", 0..{len(w) - 1}" if w else " (empty: there are no writes)"))
            bad = [x for x in s if not (isinstance(x, int) and not isinstance(x, bool) and 0 <= x < len(w))]
            if bad:
                raise ConfigError(f"trace.vcpus[{i}].{key}: {bad[0]!r} is not an index into writes; accepted: "
                                  f"0..{len(w) - 1}" if w else f"trace.vcpus[{i}].{key}: {bad[0]!r}: there are no "
                                  "writes to index")
    return trace


def timing_dependent(trace: dict) -> str | None:
    """Why a trace's outcome on the real KVM (x86 here) depends on how its vCPU threads happen
    to interleave (None: it does not): several vCPUs and either shared logged pages (which vCPU
    first touches one, hence whose ring logs it; two faulting at once may both log it) or
    ``reap_scope`` "all" (which entries a harvest finds in the other rings). A logged page is
    one written within the slot (not MMIO), or read there when the memory is ``populated`` (the
    read maps a writable page, which x86 logs). The simulator gives one outcome; the real KVM
    one of several."""
    vcpus = trace["vcpus"]
    if len(vcpus) < 2:
        return None
    if trace["reap_scope"] == "all":
        return "several vCPUs with reap_scope 'all' (a harvest takes the other rings' entries as they are then)"
    populated = bool(trace.get("populated"))
    seen: set[int] = set()
    for v in vcpus:
        reads = set() if populated else set(v.get("reads", []))
        pages = {g for i, g in enumerate(v["writes"]) if i not in reads and g < trace["slot_pages"]}
        if pages & seen:
            how = "writing or, with populated memory, reading" if populated else "writing"
            return (f"several vCPUs {how} shared pages (whose ring logs one depends on which thread gets there first; "
                    "two at once may both log it)")
        seen |= pages
    return None


def replay_trace(trace: dict, profile: str | None = None, ring_entries: int | None = None) -> dict:
    """Run ``trace`` on a simulated host (default profile arm64-4k) and return the report.

    A ring size KVM refuses is a ConfigError naming ``trace.ring_entries`` (or the
    ``ring_entries`` override) with KVM's errno and the accepted sizes; so is one whose bytes do
    not fit KVM_ENABLE_CAP's 32-bit size (E2BIG, or EINVAL if no power of two, as ``kvm-replay``
    answers it), which the
    kernel would read modulo 2^32 as another, smaller ring."""
    validate_trace(trace)
    prof = load_host_profile(profile)
    entries = int(ring_entries or trace["ring_entries"])
    scope_all = trace["reap_scope"] == "all"
    nv = len(trace["vcpus"])

    limit = prof.gpa_pages
    end = trace["slot_pages"] + trace.get("unmapped_pages", 0)
    if trace.get("unmapped_pages") and end > limit:  # (a slot past it is KVM's error, below)
        raise ConfigError(f"trace.unmapped_pages: {trace['unmapped_pages']}: the slot and the unmapped pages "
                          f"end at page {end}, past the {prof.phys_addr_bits}-bit guest-physical range of {prof.name} "
                          f"({limit} pages of {prof.page_size} bytes; no MMIO exit there); accepted: "
                          f"0..{max(0, limit - trace['slot_pages'])}")
    vm = Vm(prof)
    field = "ring_entries (--ring-entries)" if ring_entries else "trace.ring_entries"
    if entries * 16 > 0xFFFFFFFF:  # KVM_ENABLE_CAP reads the size as a u32: it would wrap, not be refused
        code = "E2BIG" if entries & (entries - 1) == 0 else "EINVAL"  # (KVM's power-of-two check comes first)
        raise ConfigError(f"{field}: {entries} entries ({entries * 16} bytes) is refused on {prof.name} with {code} "
                          f"(above {uapi.KVM_DIRTY_RING_MAX_ENTRIES} x 16 bytes; it does not fit KVM_ENABLE_CAP's "
                          f"32-bit size, which would read {entries * 16 & 0xFFFFFFFF} bytes); accepted: "
                          f"{', '.join(map(str, prof.ring_sizes))}")
    try:
        vm.enable_cap(uapi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, entries * 16)
    except KvmError as e:  # name the input that caused it, keep KVM's errno and rule
        raise ConfigError(f"{field}: {entries} entries ({entries * 16} bytes) is refused by "
                          f"KVM_ENABLE_CAP on {prof.name} with {e.errno_name} ({e.rule}); accepted: "
                          f"{', '.join(map(str, prof.ring_sizes))}") from None
    if trace.get("with_bitmap", prof.with_bitmap_supported):
        try:
            vm.enable_cap(uapi.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
        except KvmError as e:
            raise ConfigError(f"trace.with_bitmap: true is refused by KVM_ENABLE_CAP on {prof.name} with "
                              f"{e.errno_name} ({e.rule}); accepted there: false") from None
    try:
        vm.set_user_memory_region(0, uapi.KVM_MEM_LOG_DIRTY_PAGES, 0, trace["slot_pages"] * prof.page_size,
                                  mapped_fraction=0.0, populated=bool(trace.get("populated", False)))
    except KvmError as e:
        raise ConfigError(f"trace.slot_pages: {trace['slot_pages']} pages is refused by KVM_SET_USER_MEMORY_REGION on "
                          f"{prof.name} with {e.errno_name} ({e.rule})") from None
    try:
        vcpus = [vm.create_vcpu(i) for i in range(nv)]
    except KvmError as e:
        raise ConfigError(f"trace.vcpus: {nv} vCPUs is refused by KVM_CREATE_VCPU on {prof.name} with "
                          f"{e.errno_name} ({e.rule})") from None
    readers = [RingReader(v.ring_gfns) for v in vcpus]
    vm.attach_guest(TraceProgram([v["writes"] for v in trace["vcpus"]], [v.get("syncs", []) for v in trace["vcpus"]],
                                 reads=[v.get("reads", []) for v in trace["vcpus"]],
                                 write_ns=prof.costs.dirty_write_ns))

    resets: list[int] = []
    out = [{"full_exits": 0, "lost": 0, "resets": [], "batches": [], "exits": []} for _ in range(nv)]

    def harvest_and_reset(which, trigger, issuer):
        for i in which:
            _, offsets = readers[i].reap()
            if len(offsets):
                out[i]["batches"].append({"trigger": trigger, "offsets": offsets.astype(int).tolist()})
        r = vm.reset_dirty_rings()
        resets.append(r)
        if issuer is not None:
            out[issuer]["resets"].append(r)

    pending = [v.run() for v in vcpus]
    done = [False] * nv
    while not all(done):
        exits = [e for e in pending if e is not None]
        pending = []
        if not exits:
            exits = vm.run_until(vm.now + (1 << 62))
            if not exits:  # every vCPU is out and none can run: cannot happen with a well-formed trace
                raise RuntimeError(f"replay stalled: vCPUs {[i for i in range(nv) if not done[i]]} neither "
                                   "exited nor finished")
        for e in exits:
            out[e.vcpu]["exits"].append(e.kind)
            if e.kind == "done":
                done[e.vcpu] = True
                continue
            if e.kind == "full":
                out[e.vcpu]["full_exits"] += 1
            if e.kind in ("full", "sync"):  # an "mmio" exit (no memslot there) is completed by re-entering
                harvest_and_reset(range(nv) if scope_all else [e.vcpu], e.kind, e.vcpu)
            pending.append(vcpus[e.vcpu].run())
    harvest_and_reset(range(nv), "final", None)
    for i, v in enumerate(vcpus):
        out[i]["lost"] = v.ring.lost
        out[i]["faults"] = v.stats.faults
    return {"profile": prof.name, "ring_entries": entries, "soft_limit": vcpus[0].ring.soft_limit,
            "resets": resets, "vcpus": out, "faults": sum(v.stats.faults for v in vcpus)}


def load_trace(path: str | Path) -> dict:
    """The JSON trace at ``path`` ('-': standard input; any readable path, a pipe such as
    ``<(zcat t.json.gz)`` too); a ConfigError for a missing file, a directory, a closed stdin,
    text that is not UTF-8 (a byte-order mark is skipped), bad JSON or a key given twice in an
    object."""
    if str(path) == "-":
        if sys.stdin is None or sys.stdin.closed:
            raise ConfigError("TRACE -: standard input is closed; expected a JSON trace on it")
        raw = getattr(sys.stdin, "buffer", None)  # (a replaced sys.stdin may be text only)
        data, name = raw.read() if raw is not None else sys.stdin.read().encode(), "<stdin>"
    else:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"TRACE: {str(p)!r} is a directory; expected a JSON trace file")
        if not p.exists():
            raise ConfigError(f"TRACE: no such file {str(p)!r}")
        try:
            data, name = p.read_bytes(), p.name
        except OSError as e:
            raise ConfigError(f"TRACE: {str(p)!r} cannot be read ({e.strerror}); expected a readable JSON "
                              "trace file") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"TRACE {name}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                          "accepted: a UTF-8 JSON file") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise ConfigError(f"TRACE {name}: not valid JSON: {e}") from None
    except RecursionError:
        raise ConfigError(f"TRACE {name}: JSON nested too deeply to read; a trace nests 4 levels") from None
    except _DuplicateKey as e:
        raise ConfigError(f"TRACE {name}: {e}") from None
    except ValueError:  # an integer of more digits than Python converts (4300)
        raise ConfigError(f"TRACE {name}: holds an integer of more than 4300 digits; no field takes one that "
                          "large (offsets and sizes: at most 2^40 pages)") from None


class _DuplicateKey(ValueError):
    """A key given twice in one JSON object of a trace."""


def _unique_keys(pairs: list) -> dict:
    """A JSON object's dict; a key given twice is a _DuplicateKey (json would keep the last)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _DuplicateKey(f"key {dup!r} is given twice in one object; each key once")
    return out
