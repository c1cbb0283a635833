"""Replay a write trace on the real KVM and report rings, exits and resets as the simulator does.

Input trace (JSON-shaped dict)::

    {"slot_pages": int, "ring_entries": int, "reap_scope": "all" | "self",
     "with_bitmap": bool (optional), "unmapped_pages": int (optional), "populated": bool (optional),
     "vcpus": [{"writes": [page offsets in program order], "syncs": [write indices],
                "reads": [indices of the accesses that are loads] (optional)}]}

Userspace behaves as QEMU: at every KVM_EXIT_DIRTY_RING_FULL and after every sync write the
vCPU's thread harvests (all rings, or only its own with "self") and issues one
KVM_RESET_DIRTY_RINGS; after all vCPUs finished, one final harvest of all rings and reset.
Harvest and reset happen under one lock, so each reset must return what its harvest marked.
A write to one of the ``unmapped_pages`` past the data slot (no memslot there) is a
KVM_EXIT_MMIO at another address than the sync and done ones: an "mmio" exit, after which the
thread re-enters at once. Each vCPU's exits are reported in order ("exits").

What the kernel does is reported, not "fixed": the store whose fault filled the ring has not
retired at the full exit, so after the reset it runs again and, its page being re-protected,
pushes that page a second time.

The trace is checked by the simulator's ``ringenv.replay.validate_trace`` when it is importable,
so both commands refuse a malformed trace with the same ``ConfigError`` message (a
``ValueError``); what the host refuses (a ring size, ``with_bitmap`` where the host has no such
cap, more vCPUs than it takes, a slot it cannot back) is a ConfigError naming the field too, with
the errno KVM (or mmap) gave.
The guest performs a read (``reads``) as a load from the page; ``populated`` has userspace
write every data page before the vCPUs start (refused, naming ``trace.populated``, for a slot
larger than the host's available memory). A ring size the host refuses is a ConfigError on
``trace.ring_entries`` as in the simulator (one whose bytes exceed the cap's maximum is refused
before KVM_ENABLE_CAP, which would read it modulo 2^32, as KVM refuses a too-big size: E2BIG, or
EINVAL if it is no power of two). A replay is bounded by ``timeout``, the ``faults`` warm-up
included: vCPUs still in the guest then are kicked out of KVM_RUN and a TimeoutError is raised
(before the run starts if the warm-up took all of it). Building the guest (its page tables, a
populated slot) is userspace work before any vCPU runs and is not counted. A guest too large for
the architecture's fixed layout is a ConfigError naming what is too large: the slot range
(doubled by ``faults``) or the write tables.
"""

from __future__ import annotations

import errno
import threading
import time
from typing import Any

from ringenv.realkvm.arch import GuestTooLarge, WriteProgram, host_arch
from ringenv.realkvm.guest import DATA_SLOT, BitmapRefused, Guest, GuestError, VcpuRefused
from ringenv.realkvm.ioctl import (
    KVM_CAP_MAX_VCPUS, KVM_DIRTY_RING_RSVD_ENTRIES, PAGE_SIZE, KvmSystem, KvmUnavailable, RingSizeRefused,
    SlotMemoryRefused)

try:
    from ringenv.config import ConfigError
except ImportError:  # the simulator is not installed
    ConfigError = ValueError  # type: ignore[misc,assignment]

#: consecutive ring-full exits of one vCPU with nothing harvested before we call it wedged
WEDGED_AFTER = 1000


def _errno_name(code) -> str:
    from ringenv.realkvm.ioctl import errno_name
    return errno_name(code)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"trace: {msg}")


def _check_trace(trace: dict) -> None:
    """Raise ValueError naming the first field that breaks the trace contract: the simulator's
    check (same messages as ``ringenv replay``) when importable, else a local one."""
    try:
        from ringenv.replay import validate_trace
    except ImportError:
        _check_trace_local(trace)
        return
    validate_trace(trace)


def _check_trace_local(trace: dict) -> None:
    _need(isinstance(trace, dict), "expected a JSON object")
    _need(isinstance(trace.get("slot_pages"), int) and not isinstance(trace["slot_pages"], bool)
          and trace["slot_pages"] > 0, "slot_pages must be a positive int")
    _need(isinstance(trace.get("ring_entries"), int) and trace["ring_entries"] > 0,
          "ring_entries must be a positive int")
    _need(trace.get("reap_scope", "all") in ("all", "self"), "reap_scope must be 'all' or 'self'")
    _need(isinstance(trace.get("with_bitmap", False), bool), "with_bitmap must be true or false")
    _need(isinstance(trace.get("populated", False), bool), "populated must be true or false")
    up = trace.get("unmapped_pages", 0)
    _need(isinstance(up, int) and not isinstance(up, bool) and up >= 0, "unmapped_pages must be an int >= 0")
    _need(isinstance(trace.get("vcpus"), list) and trace["vcpus"], "vcpus must be a non-empty list")
    for i, v in enumerate(trace["vcpus"]):
        _need(isinstance(v, dict), f"vcpus[{i}] must be an object {{writes, syncs}}")
        writes = v.get("writes")
        _need(isinstance(writes, list) and all(isinstance(w, int) for w in writes),
              f"vcpus[{i}].writes must be a list of ints")
        _need(all(0 <= w < trace["slot_pages"] + up for w in writes),
              f"vcpus[{i}].writes: offsets must lie in [0, slot_pages + unmapped_pages)")
        for key in ("syncs", "reads"):
            at = v.get(key, [])
            _need(isinstance(at, list) and all(isinstance(s, int) and 0 <= s < len(writes) for s in at),
                  f"vcpus[{i}].{key} must be write indices")


class _Collector:
    """The VMM side: harvest + reset under one lock, and the report being built."""

    def __init__(self, guest: Guest, scope: str):
        self.guest, self.scope = guest, scope
        self.lock = threading.Lock()
        self.resets: list[int] = []
        self.vcpus = [{"full_exits": 0, "lost": 0, "resets": [], "batches": [], "exits": []}
                      for _ in guest.vcpus]

    def reap(self, trigger: str, issuer: int | None) -> int:
        """Harvest the rings this caller may reap, then one KVM_RESET_DIRTY_RINGS."""
        rings = [issuer] if self.scope == "self" and issuer is not None \
            else range(len(self.guest.vcpus))
        with self.lock:
            harvested = 0
            for i in rings:
                entries = self.guest.vcpus[i].harvest()
                if not entries:
                    continue
                if any(slot != DATA_SLOT for slot, _ in entries):
                    raise GuestError(f"ring {i}: entry outside the data slot: {entries}")
                self.vcpus[i]["batches"].append(
                    {"trigger": trigger, "offsets": [off for _, off in entries]})
                harvested += len(entries)
            count = self.guest.vm.reset_dirty_rings()
            if count != harvested:
                raise GuestError(f"KVM_RESET_DIRTY_RINGS returned {count}, harvested {harvested}")
            self.resets.append(count)
            if issuer is not None:
                self.vcpus[issuer]["resets"].append(count)
            return harvested

    def vcpu_thread(self, index: int, program: WriteProgram) -> None:
        """Run one vCPU to its done exit, reaping at each full and sync exit; an MMIO exit at
        an address no memslot maps is completed by running on."""
        syncs = iter(sorted(program.syncs))
        empty_full = 0
        while True:
            kind, done = self.guest.run(index)
            self.vcpus[index]["exits"].append(kind)
            if kind == "mmio":
                continue
            if kind == "full":
                self.vcpus[index]["full_exits"] += 1
                empty_full = 0 if self.reap("full", index) else empty_full + 1
                if empty_full >= WEDGED_AFTER:
                    raise GuestError(f"vCPU {index}: ring wedged (full exits, nothing to harvest)")
                continue
            expect_done = next(syncs, -2) + 1 if kind == "sync" else len(program.writes)
            if done != expect_done:
                raise GuestError(f"vCPU {index}: {kind} exit after {done} writes, "
                                 f"expected {expect_done}")
            if kind == "done":
                return
            self.reap("sync", index)


def kvm_replay_trace(trace: dict, ring_entries: int | None = None,
                     timeout: float = 120.0, *, faults: bool = False) -> dict[str, Any]:
    """Run ``trace`` on /dev/kvm, one thread per vCPU; return the simulator's JSON shape.

    With ``faults`` the report also has "faults", per vCPU and in all: the stage-2 faults (the
    vCPU statistic pf_fixed) the trace's accesses to the data slot took. The guest's code slot
    would fault too, on whichever vCPU got to a page first: so before the trace's vCPUs exist,
    warm-up vCPUs of the same VM run the same programs aimed ``slot_pages`` further, past the
    data slot (each access an MMIO exit, which KVM emulates and does not count), and map the
    code slot as the trace's vCPUs will touch it (``Guest(warm_up=...)``; the guest maps that
    wider range)."""
    _check_trace(trace)
    entries = ring_entries or trace["ring_entries"]
    arch = host_arch()
    programs = [WriteProgram(list(v["writes"]), frozenset(v.get("syncs", [])), frozenset(v.get("reads", [])))
                for v in trace["vcpus"]]
    shift = trace["slot_pages"] if faults else 0
    unmapped = trace.get("unmapped_pages", 0) + shift
    warm = [WriteProgram([w + shift for w in p.writes], p.syncs, p.reads) for p in programs] if faults else []
    coll, pf = _run(trace, programs, entries, unmapped, arch, ring_entries, timeout, warm)
    out = {
        "profile": arch.profile_name(),
        "ring_entries": entries,
        "soft_limit": entries - KVM_DIRTY_RING_RSVD_ENTRIES - arch.extra_reserved_entries,
        "resets": coll.resets,
        "vcpus": coll.vcpus,
    }
    if faults:
        if pf is None:
            raise KvmUnavailable(errno.ENOTSUP, "this host's vCPU statistics (KVM_GET_STATS_FD) have no pf_fixed: "
                                                "no fault count (drop --faults)")
        for v, n in zip(coll.vcpus, pf):
            v["faults"] = n
        out["faults"] = sum(pf)
    return out


def _available_bytes() -> int:
    """The host's MemAvailable (/proc/meminfo), bytes; a very large number where it is not known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _max_vcpus() -> int:
    """KVM_CHECK_EXTENSION(KVM_CAP_MAX_VCPUS) of this host."""
    with KvmSystem() as system:
        return system.check_extension(KVM_CAP_MAX_VCPUS)


def _pf_fixed(vcpu) -> int | None:
    """The vCPU's pf_fixed statistic, or None where the host has none (no KVM_GET_STATS_FD, not x86)."""
    try:
        return vcpu.stats().get("pf_fixed")
    except OSError:
        return None


def kvm_counts_faults() -> bool:
    """Whether this host's vCPUs count their stage-2 faults (the pf_fixed statistic)."""
    with KvmSystem() as system, system.create_vm() as vm:
        return _pf_fixed(vm.create_vcpu(0)) is not None


def _run(trace: dict, programs: list[WriteProgram], entries: int, unmapped: int, arch, ring_entries: int | None,
         timeout: float, warm_up: list[WriteProgram]) -> tuple[_Collector, list[int] | None]:
    """One run of ``programs`` on a new guest (after ``warm_up``, see ``Guest``): the
    collector's report and, with a warm-up, each vCPU's pf_fixed over the run (else None, or
    where the host has no such statistic). ``timeout`` bounds the warm-up and the run together
    (not the building of the guest before them)."""
    if trace.get("populated"):
        available = _available_bytes()
        if trace["slot_pages"] * PAGE_SIZE > available:
            raise ConfigError(f"trace.populated: true writes every page of the {trace['slot_pages']}-page slot "
                              f"({trace['slot_pages'] * PAGE_SIZE} bytes), more than the {available} bytes of "
                              "memory this host has available (MemAvailable); accepted: false, or a smaller "
                              "trace.slot_pages")
    try:
        guest = Guest(programs, trace["slot_pages"], ring_entries=entries,
                      with_bitmap=bool(trace.get("with_bitmap", False)), arch=arch,
                      unmapped_pages=unmapped, populated=bool(trace.get("populated", False)), warm_up=warm_up,
                      warm_up_timeout=timeout)
    except RingSizeRefused as exc:  # name the input, as the simulator does
        field = "ring_entries (--ring-entries)" if ring_entries else "trace.ring_entries"
        raise ConfigError(
            f"{field}: {entries} entries ({entries * 16} bytes) is refused by "
            f"KVM_ENABLE_CAP on this host ({arch.profile_name()}) with "
            f"{_errno_name(exc.errno)}; accepted: {', '.join(map(str, exc.accepted))}") from None
    except VcpuRefused as exc:
        doubled = (f"; --faults doubles them (a warm-up vCPU per program): {2 * len(programs)} in all"
                   if warm_up else "")
        raise ConfigError(f"trace.vcpus: {len(programs)} vCPUs is refused by KVM_CREATE_VCPU on this host "
                          f"({arch.profile_name()}) with {_errno_name(exc.errno)} ({exc.strerror}){doubled}; "
                          f"accepted: at most {_max_vcpus()} vCPUs in a VM (KVM_CAP_MAX_VCPUS)") from None
    except BitmapRefused:
        raise ConfigError(f"trace.with_bitmap: true is refused by KVM_ENABLE_CAP on this host "
                          f"({arch.profile_name()}) with EINVAL (no KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP: "
                          "KVM_CHECK_EXTENSION(225) == 0; x86 does not need it); accepted there: false") from None
    except SlotMemoryRefused as exc:
        raise ConfigError(f"trace.slot_pages: {trace['slot_pages']} pages cannot be backed on this host: {exc}; "
                          "accepted: a smaller slot") from None
    except GuestTooLarge as exc:  # name what is too large: the slot range (doubled by --faults), or the tables
        field = "trace.vcpus[].writes" if exc.part == "tables" else "trace.slot_pages + trace.unmapped_pages" + (
            " (doubled by --faults: the warm-up aims the programs slot_pages further, so the guest maps "
            "2 x slot_pages + unmapped_pages)" if warm_up else "")
        raise ConfigError(f"{field}: {exc}") from None
    # the run's own share of the timeout: what the warm-up left of it
    left = timeout - guest.warm_up_s
    deadline = time.monotonic() + left
    with guest:
        if left <= 0:  # decided here, not by a race between the deadline and a short run's threads
            raise TimeoutError(f"the faults warm-up took {guest.warm_up_s:.3g} s, all of the {timeout:g} s "
                               "timeout: nothing left for the run; stopped")
        before = [_pf_fixed(v) for v in guest.vcpus] if warm_up else [None]
        coll = _Collector(guest, trace.get("reap_scope", "all"))
        errors: list[BaseException] = []

        def body(i: int) -> None:
            try:
                coll.vcpu_thread(i, programs[i])
            except BaseException as exc:  # re-raised in the caller's thread
                errors.append(exc)

        threads = [threading.Thread(target=body, args=(i,), daemon=True,
                                    name=f"vcpu{i}") for i in range(len(programs))]
        try:
            for t in threads:
                t.start()
            # wait for all, but stop at a vCPU's failure (the others are kicked out below and
            # the failure is what is reported) or at the deadline
            while not errors and any(t.is_alive() for t in threads) and time.monotonic() < deadline:
                next(t for t in threads if t.is_alive()).join(min(0.05, max(0.0, deadline - time.monotonic())))
            stuck = [t.name for t in threads if t.is_alive()]
            if stuck and not errors:
                raise TimeoutError(f"{', '.join(stuck)} did not finish within "
                                   f"{timeout:g} s (guest never exited?); stopped")
        finally:  # timeout, error or KeyboardInterrupt: get every vCPU out of KVM_RUN first
            if any(t.is_alive() for t in threads):
                guest.kick_all()
                for t in threads:
                    if t.ident is not None:
                        t.join(5.0)
        if errors:
            raise errors[0]
        coll.reap("final", None)
        after = [_pf_fixed(v) for v in guest.vcpus] if warm_up else [None]
    if None in before or None in after:
        return coll, None
    return coll, [a - b for a, b in zip(after, before)]
