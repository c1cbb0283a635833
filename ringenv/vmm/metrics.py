"""The one documented record a VMM run reports (:meth:`Session.metrics`).

It is valid at any step of a run (the outcome fields are final once ``done`` is true). Times are
simulated seconds, sizes bytes. Counts are totals since the run started: an observation over a
control interval is the difference of two records.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields


@dataclass(frozen=True)
class Metrics:
    # --- what ran
    scenario: str  #: scenario name
    kind: str  #: "migration" or "checkpoint"
    collector: str  #: "ring" or "bitmap"
    #: setup, bulk, iterate, stop-copy or cancelling (migration); base, live, paused, wait (checkpoint); done
    phase: str
    done: bool  #: the run is over
    time_s: float  #: session time reached, s
    # --- outcome (final once done)
    #: migration: the VM's stop to the last byte of the stop-and-copy sent (final sync, remaining pages, device state),
    #: measured at the source as QEMU's query-migrate downtime is: the destination's load and start are not modelled
    #: (cancelled: 0, or the stop to the restart at the source when the cancel came as the VM stopped); checkpoint: the
    #: longest pause, s
    downtime_s: float
    #: migration: start to end incl. downtime; checkpoint: start to end (the horizon, or later when a checkpoint under
    #: way at the horizon is finished first), s
    total_s: float
    #: migration: switchover by the downtime rule (not forced at give_up_s); checkpoint: no overrun (and, at the end, a
    #: checkpoint taken)
    converged: bool
    #: migration: cancelled (QEMU's migrate_cancel: at give_up_s with link.give_up_action cancel, or an operator's at
    #: link.cancel_at_s / MigrationRun.cancel()), the VM running on at the source: no switchover, verified None;
    #: checkpoint: always False
    cancelled: bool
    #: dirty syncs (QEMU dirty-sync-count): migration: setup, each pass, auto-converge's periodic syncs, final;
    #: checkpoint: setup, then one per stop-the-world checkpoint, two per live one
    iterations: int
    #: migration: live passes over the dirty set, each ended by an exact sync (not auto-converge's periodic ones);
    #: checkpoint: the base image and each checkpoint
    passes: int
    #: bytes put on the link/storage (pages + an 8-byte header per 4 KiB target page, zero pages as 9 bytes per target
    #: page, + device state)
    bytes_sent: int
    pages_sent: int  #: pages sent, re-sends included
    pages_resent: int  #: pages sent that had been sent before
    #: pages sent as zero pages (a header and a byte per 4 KiB target page), in pages_sent too; host pages, where QEMU's
    #: zero-pages counts 4 KiB target pages
    zero_pages: int
    # --- vCPU cost
    full_exits: int  #: KVM_EXIT_DIRTY_RING_FULL exits (all vCPUs)
    #: vCPU time out of the guest for exits: round trips, reap/reset on the vCPU thread, wedged spinning, s
    vcpu_exit_s: float
    #: vCPU time waiting for the big QEMU lock: to reap after a ring-full exit, or to start and end an auto-converge
    #: sleep (queued work the vCPU thread runs holding the lock), s
    vcpu_stall_s: float
    #: vCPU time asleep in auto-converge / dirty-limit, s (up to a stop: the rest of a sleep a stop
    #: waits out is the stop's time, in its downtime or pause)
    vcpu_throttle_s: float
    vcpu_fault_s: float  #: vCPU time in write-protect faults and block splits (kernel), s
    # --- VMM cost
    vmm_cpu_s: float  #: VMM threads' collection work (reaper, syncs, GET/CLEAR, dirty-limit), s
    harvests: int  #: ring harvest passes (reaper runs, full-exit reaps, flushes) or GET_DIRTY_LOG syncs
    resets: int  #: KVM_RESET_DIRTY_RINGS calls
    entries_harvested: int  #: ring entries harvested
    tlb_flushes: int  #: VM-wide TLB flushes (kernel)
    get_dirty_log_calls: int  #: KVM_GET_DIRTY_LOG calls
    clear_dirty_log_calls: int  #: KVM_CLEAR_DIRTY_LOG calls
    ring_bytes: int  #: kernel memory of all rings, bytes
    ring_entries: int  #: entries per ring (0 with the bitmap)
    interval_ms: float  #: current reaper interval, ms (0 with the bitmap)
    # --- correctness
    #: pages whose destination copy differs from the source (checkpoint: worst checkpoint so far); after a ring overflow
    #: a lower bound (a page whose entry was overwritten stays writable, and the guest's later writes to a writable page
    #: are not modelled)
    lost_writes: int
    verified: bool | None  #: lost_writes == 0 once checked (None before; checkpoint runs check at every checkpoint)
    ring_overflows: int  #: entries the kernel overwrote in a full ring (its WARN)
    wedged_vcpus: int  #: vCPUs whose overflowed ring wedged (KVM_RUN keeps returning ring-full with nothing to harvest)
    # --- observation
    dirty_rate_Bps: float  #: estimated guest dirty rate, bytes/s
    ring_fill: tuple  #: per vCPU: entries waiting / soft limit
    #: migration: dirty bytes still to send in this pass (QEMU's pending estimate); checkpoint: dirty bytes not yet
    #: saved (what the next checkpoint would write now)
    remaining_bytes: int
    bandwidth_Bps: float  #: measured send bandwidth, bytes/s
    #: bandwidth x downtime-limit: the switchover threshold, bytes (migration only: a checkpoint run has no switchover
    #: and its value means nothing)
    threshold_bytes: int
    #: QEMU's expected-downtime: dirty bytes left by the last sync / bandwidth_Bps, s; the downtime limit until a sync
    #: has closed a >= 1 s rate period with dirty pages and a bandwidth window sent > 10 kB; not updated while the VM is
    #: stopped (migration only: a checkpoint run's pauses are pause_total_s and downtime_s)
    expected_downtime_s: float
    progress: float  #: share of guest RAM sent at least once
    throttle_pct: float  #: current auto-converge percentage (dirty-limit: mean sleep share)
    vcpu_stall_s_per_vcpu: tuple  #: vcpu_stall_s by vCPU
    #: bytes sent in each completed pass; migration: then the pass under way at the stop if it sent anything (a
    #: switchover forced at give_up_s, or at pending 0 without an exact sync), then the stop-and-copy; checkpoint: the
    #: base image, then each checkpoint
    pass_bytes: tuple
    sync_s: float  #: time spent in dirty syncs (flush or GET_DIRTY_LOG, merge), all syncs, s
    vmm_bytes_per_page: float  #: VMM bookkeeping memory per guest page, bytes
    # --- checkpointing
    checkpoints: int = 0  #: checkpoints completed
    pause_total_s: float = 0.0  #: sum of checkpoint pauses, s
    checkpoint_overruns: int = 0  #: checkpoints that ended after the next was due
    #: scheduled checkpoints never taken: due times a checkpoint outlasted, but for the latest, which
    #: the next checkpoint (started at once) takes late; all of them (before the horizon) when it ends
    #: past the horizon
    checkpoint_slots_missed: int = 0

    @classmethod
    def from_fields(cls, values: dict) -> Metrics:
        """``Metrics(**values)``, built without the dataclass's per-field frozen assignments (a
        run builds one record per step). ``values`` should hold the fields in declaration order;
        the ones with defaults may be left out at the end. In any other order (or with a field
        missing or unknown) the regular constructor is used, so the result is always the same."""
        rec = object.__new__(cls)
        state = rec.__dict__
        state.update(values)
        if len(state) < len(_FIELD_NAMES):
            for name, default in _DEFAULTS.items():
                state.setdefault(name, default)
        if tuple(state) != _FIELD_NAMES:
            return cls(**values)
        return rec

    def to_dict(self) -> dict:
        """The record as plain data (the tuple fields as lists), keys in field order; the fields
        are flat, so no deep copy."""
        d = dict(vars(self))
        for name in _TUPLE_FIELDS:
            v = d[name]
            if isinstance(v, tuple):
                d[name] = list(v)
        return d

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        """Field name -> its comment (units), read from this source file."""
        import inspect
        import re

        src = inspect.getsource(cls)
        out = {}
        for f in fields(cls):
            m = re.search(rf"^\s+{f.name}:[^\n]*#:\s*(.*)$", src, re.M)
            if m is None:  # a long comment: a block of ``#:`` lines directly above the field
                m = re.search(rf"((?:^[ \t]*#:.*\n)+)[ \t]+{f.name}:", src, re.M)
                out[f.name] = " ".join(re.sub(r"^\s*#:\s*", "", ln) for ln in m.group(1).splitlines()) if m else ""
                continue
            out[f.name] = m.group(1).strip()
        return out


_FIELD_NAMES = tuple(f.name for f in fields(Metrics))
_DEFAULTS = {f.name: f.default for f in fields(Metrics) if f.default is not MISSING}  # the checkpointing fields
_TUPLE_FIELDS = tuple(f.name for f in fields(Metrics) if f.type == "tuple")  # per-vCPU / per-pass values
