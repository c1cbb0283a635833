"""A steppable VMM run: the simulated host plus QEMU's threads, as discrete events.

:class:`Session` builds the VM the way QEMU does (dirty ring with WITH_BITMAP on arm64, or the
dirty bitmap with manual protect), creates the vCPUs and the guest, and runs these threads on one
event loop (:mod:`ringenv.vmm.sim`), in integer nanoseconds of simulated time:

- one thread per vCPU: in the guest, or out after an exit. A KVM_EXIT_DIRTY_RING_FULL is handled
  as QEMU's ``kvm_cpu_exec`` does: take the big QEMU lock (waiting for it is a *stall*), reap
  all rings (only its own under dirty-limit), reset, release the lock, sleep if dirty-limit says
  so, re-enter. Every exit costs the profile's ``exit_ns`` round trip. A kick
  (``Vcpu.kick``, QEMU's SIG_IPI) takes the vCPU out for one round trip; queued throttle work
  then sleeps; while the VM is stopped the thread parks.
- the ring reaper (``kvm_dirty_ring_reaper_thread``): sleep ``interval``, take the lock, reap all
  rings, reset, release; while dirty-limit is in service it only sleeps (the ring-full exits
  reap, per vCPU). The interval can be changed between steps
  (:meth:`Session.set_harvest_interval`); QEMU's is a fixed 1 s.
- the main thread of the run (migration or checkpointing, in the subclasses), and the throttles'.
- the dirty-rate estimate (QEMU calc-dirty-rate, dirty-ring mode): ring entries over the last
  >= 1 s, computed when asked from a sample (time, entries harvested) taken at every reap of
  all rings; the samples older than the newest one at least 1 s old are dropped.

Stepping: :meth:`Session.advance` processes every event up to ``until_ns`` and lets the host run
only up to the last of them; the host is never asked to stop at an arbitrary step boundary, so
advancing in small steps gives bit-identical results to one big step. The host (its counters,
the rings' fill) can therefore lag a step's end by up to the gap between two VMM events (up to
~1 s). ``host_sync_ms`` adds a fixed grid of no-op events: steps that end on the grid (an
environment's control interval) then see the host exactly at their end, at the cost of one more
host window per grid period; results then depend on the grid, never on the step sizes.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import deque
from functools import cached_property
from operator import itemgetter

import numpy as np

from ..config import MAX_SIM_S, ScenarioConfig, checked_number, load_scenario, num_text, to_ns
from ..guest.workload import WorkloadProgram
from ..kvm import uapi as U
from ..kvm.vm import Vm
from .collectors import BitmapCollector, RingCollector
from .dirty import DirtyPages
from .metrics import Metrics
from .sim import FOREVER, EventLoop, Lock, Process, Signal
from .throttle import TARGET_PAGE_SIZE, make_throttle

MS = 1_000_000
NS = 1_000_000_000
PAGE_HEADER_BYTES = 8  # per target page on the migration stream (QEMU: be64 offset | flags)
SLICE_NS = 50 * MS  # QEMU ram_save_iterate returns every ~50 ms
MAX_SLICE_NS = 1000 * MS  # consecutive slices simulated as one send (see Session.send_slice)
BW_WINDOW_NS = 100 * MS  # QEMU BUFFER_DELAY: bandwidth measured over >= 100 ms
RATE_WINDOW_NS = 1000 * MS

_NO_PAGES = np.zeros(0, dtype=np.int64)
_sample_time = itemgetter(0)  # of a dirty-rate sample (time, entries harvested so far)

# vCPU thread states
GUEST, OUT, SLEEP, DLSLEEP, PARKED, DONE, WEDGED = range(7)


def _host_sync_ns(host_sync_ms) -> int:
    """``host_sync_ms`` checked and in ns (0: no grid): None, or a real number of ms, finite and
    at least 1 ns once rounded to ns, at most MAX_SIM_S in ms (1e9 ms, as an env's control interval)
    (a bool is no number of ms; infinity is no grid)."""
    if host_sync_ms is None:
        return 0
    checked_number(host_sync_ms, "host_sync_ms",
                   f"a number of ms from 1e-6 (1 ns) to {num_text(MAX_SIM_S * 1e3)}, or None",
                   lambda ms: math.isfinite(float(ms) * MS) and round(float(ms) * MS) >= 1 and ms <= MAX_SIM_S * 1e3)
    return to_ns(host_sync_ms, MS)


def _workload_start_ns(workload_start_s) -> int:
    """``workload_start_s`` checked and in ns: a real number of seconds from 0 to MAX_SIM_S (1e6 s,
    the longest simulated time any setting gives, as an env's dirty-rate sample ``sample_s``)."""
    checked_number(workload_start_s, "workload_start_s", f"a number of seconds from 0 to {num_text(MAX_SIM_S)} "
                   "(the longest simulated time a setting may give)", lambda s: 0 <= s <= MAX_SIM_S)
    return to_ns(workload_start_s, NS)


#: the longest harvest interval :meth:`Session.set_harvest_interval` takes, ns, and what it accepts (built
#: once: the env sets the interval every step)
_MAX_INTERVAL_NS = int(MAX_SIM_S * NS)
_INTERVAL_ACCEPTED = (f"a positive, finite number of ns from 1 to {num_text(MAX_SIM_S * NS)} ({num_text(MAX_SIM_S)} s, "
                      "the longest simulated time a setting may give, as the scenario's interval_ms); a fraction of a "
                      "ns is dropped")

#: what :meth:`Session.advance` accepts, as its error says it
_ADVANCE_ACCEPTED = (f"a number of simulated ns from 0 to {FOREVER} (2**62, sim.FOREVER: until the run is over); "
                     "a fraction of a ns is dropped")


class _ClosedRun:
    """What a :class:`Session` becomes when closed: every use but ``close`` raises RuntimeError."""

    def close(self) -> None:
        pass

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError(f"{self.__dict__.get('_kind', 'run')}.{name}: the run is closed (Session.close freed its "
                           "VM and bookkeeping); metrics taken before stay valid")


class Session:
    """Base of :class:`~ringenv.vmm.migration.MigrationRun` and
    :class:`~ringenv.vmm.checkpoint.CheckpointRun`: one scenario, one seed, one VM.

    ``host_sync_ms``: the grid of host synchronisations (module docstring), None for none.
    ``workload_start_s``: where on the workload's timeline the run starts (the guest has been
    running that long: its phases and sweeps go on from there, with draws of its own; see
    :class:`~ringenv.guest.workload.WorkloadProgram`): the environment starts a run where its
    dirty-rate sample (:func:`~ringenv.vmm.dirtyrate.sample_dirty_rate`) ended; 0 to 1e6 s
    (:data:`~ringenv.config.MAX_SIM_S`)."""

    PRIO_VCPU = 1
    PRIO_MAIN = 2
    PRIO_REAPER = 3
    PRIO_THROTTLE = 4
    PRIO_TICK = 9

    kind = "session"
    #: whether the run keeps the count of pages not yet saved, wherever they wait (its
    #: ``remaining_bytes``, see :meth:`_remaining_pages`): a checkpoint run does
    tracks_unsaved = False
    #: whether a last-stage sync (the VM stopped) is fed to the throttle's trigger rule: QEMU's
    #: migration_bitmap_sync runs the trigger on every sync; a migration stops its throttle before
    #: its last stage, a checkpoint run resumes the guest after each
    trigger_on_last_stage = False
    #: whether the bandwidth is measured while the VM is stopped: a checkpoint's pause writes
    #: are its storage rate; a migration measures nothing after its switchover
    measures_paused = False
    #: QEMU's rate limiter: bytes a 100 ms window may send before the migration thread waits
    #: for its end (max-bandwidth / 10, :meth:`_rate_limited`); 0: none
    window_budget = 0

    def __init__(self, scenario: ScenarioConfig | str | dict | None = None, *, seed: int | None = None,
                 host_sync_ms: float | None = None, workload_start_s: float = 0.0, **overrides):
        self.host_sync_ns = _host_sync_ns(host_sync_ms)
        self.workload_start_ns = _workload_start_ns(workload_start_s)
        if seed is not None:
            overrides["seed"] = seed
        cfg = load_scenario(scenario, **overrides) if (overrides or not isinstance(scenario, ScenarioConfig)) \
            else scenario
        self._check_config(cfg)
        self.cfg = cfg
        self.profile = cfg.profile
        self.costs = self.profile.costs
        self.page_size = self.profile.page_size
        # on the migration stream a host page is its 4 KiB target pages, each with its header
        # (QEMU's TARGET_PAGE_SIZE: ram_save_target_page -> save_page_header)
        targets = max(1, self.page_size // TARGET_PAGE_SIZE)
        self.page_wire_bytes = self.page_size + PAGE_HEADER_BYTES * targets
        # a zero page: each target page as its header and one byte (save_zero_page), after the
        # migration thread read it all (buffer_is_zero): that time instead of its wire time
        self.zero_wire_bytes = (PAGE_HEADER_BYTES + 1) * targets
        self.zero_check_ns = self.costs.zero_page_check_ns * targets
        self.memory = cfg.vm.memory
        self.npages = self.memory // self.page_size
        self.loop = EventLoop()
        self.bql = Lock("BQL")
        self.now_ns = 0  # the session clock: how far advance() has been asked to go
        self.finished = False
        self.end_ns = 0
        self.phase = "setup"

        # accounting
        nv = cfg.vm.vcpus
        self.exit_ns = np.zeros(nv, dtype=np.int64)  # exit round trips
        self.work_ns = np.zeros(nv, dtype=np.int64)  # reap/reset done on the vCPU thread
        self.stall_ns = np.zeros(nv, dtype=np.int64)  # waiting for the big lock
        self.throttle_ns = np.zeros(nv, dtype=np.int64)  # throttle sleeps
        self.vmm_cpu_ns = 0
        self.harvests = 0
        self.entries_harvested = 0
        self.clears = 0
        self.backup_bitmap_pages = 0
        self.reaper_runs = 0
        self.bytes_sent = 0
        self.iterations = 0
        self.sync_ns: list[int] = []  # duration of every dirty sync (set-up, passes, final)
        self.passes = 0
        self.pass_bytes: list[int] = []
        self._pass_sent = 0
        self.lost_writes = 0
        self.verified: bool | None = None
        self.paused_at: int | None = None  # when the VM was stopped, while it is (stop-copy, a checkpoint)
        self.bandwidth_Bps = 0.0
        self.threshold_bytes = 0
        self.expected_downtime_s = cfg.link.downtime_limit_ms / 1000.0  # migration_connect
        self._dirty_bytes_last_sync = 0  # ram_bytes_remaining() at the last sync
        self._bw_t0 = 0
        self._bw_b0 = 0
        self._closing = None  # what a rate-limited send leaves to update_bandwidth
        self._slice = None
        self._taken = 0  # pages taken for a slice whose KVM_CLEAR_DIRTY_LOG runs: still to send
        self.stream_shut = False  # the migration stream was shut down (migrate_cancel): every send fails
        self._lost = 0  # pages taken for sending that the shut-down stream never carried
        self._last_sync_ns = 0  # when the last sync ended

        self._build_vm()
        self.dirty = DirtyPages(self.npages, with_slot=cfg.collector == "ring", track_unsaved=self.tracks_unsaved,
                                zero_fraction=cfg.vm.zero_fraction)
        self.collector = RingCollector(self) if cfg.collector == "ring" else BitmapCollector(self)
        self.throttle = make_throttle(self)

        # vCPU threads
        self.vstate = [OUT] * nv
        self.vproc: list[Process | None] = [None] * nv
        # auto-converge's queued sleep per vCPU (ns, 0: none), kept until it is over: QEMU's
        # throttle_thread_scheduled, and the work a run_on_cpu queued after it waits behind
        self.throttle_work = np.zeros(nv, dtype=np.int64)
        self._sleep_over = [Signal() for _ in range(nv)]
        # the throttle sleep a vCPU thread is in (start, length: 0 none), counted as it passes
        self._throttle_from = np.zeros(nv, dtype=np.int64)
        self._throttle_len = np.zeros(nv, dtype=np.int64)
        self._throttling = 0  # how many of them sleep now
        self.wedged_at = np.full(nv, -1, dtype=np.int64)  # when a vCPU's ring wedged (-1: never)
        self.paused = False
        self._parked = 0
        self._all_parked = Signal()
        self._resume = Signal()

        # dirty-rate estimate: (time, entries harvested so far) at every reap of all rings
        self._samples: deque = deque([(0, 0)])

        self.interval_ns = to_ns(cfg.interval_ms, MS)
        for i in range(nv):
            self._enter(i)
        self.reaper = None
        if cfg.collector == "ring":
            self._reaper_last = 0
            self.reaper = self.spawn(self._reaper(), self.PRIO_REAPER, "reaper")
        self.main = self.spawn(self._main(), self.PRIO_MAIN, self.kind)
        if self.host_sync_ns:
            self.spawn(self._host_sync(), self.PRIO_TICK, "host-sync")

    # ================================================================== the VM, as QEMU sets it up
    def _build_vm(self) -> None:
        cfg, p = self.cfg, self.profile
        vm = Vm(p, seed=cfg.seed)
        self.with_bitmap = False
        if cfg.collector == "ring":
            cap = U.KVM_CAP_DIRTY_LOG_RING if vm.check_extension(U.KVM_CAP_DIRTY_LOG_RING) \
                else U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL
            vm.enable_cap(cap, cfg.ring_entries * 16)
            wb = cfg.vm.with_bitmap
            if wb is None:
                wb = bool(vm.check_extension(U.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP))
            if wb:
                vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
            self.with_bitmap = wb
        else:
            caps = vm.check_extension(U.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
            want = U.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | U.KVM_DIRTY_LOG_INITIALLY_SET
            vm.enable_cap(U.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, caps & want)
        if cfg.vm.eager_split_chunk:
            vm.enable_cap(U.KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE, cfg.vm.eager_split_chunk)
        vm.set_user_memory_region(0, 0, 0, self.memory, block_fraction=cfg.vm.block_fraction)
        self.vcpus = [vm.create_vcpu(i) for i in range(cfg.vm.vcpus)]
        self.guest = WorkloadProgram(cfg.workload_config, cfg.vm.vcpus, seed=cfg.seed, rate_scale=cfg.rate_scale,
                                     start_ns=self.workload_start_ns)
        vm.attach_guest(self.guest)
        self.vm = vm
        # arm64: the vGIC ITS tables and the LPI pending tables (64 KiB per redistributor) live in
        # guest RAM; KVM writes them with no running vCPU when the VM stops (QEMU's vm state
        # change handlers), so they are logged in the backup bitmap only. Their size is in bytes,
        # (16 + 16 x vCPUs) 4 KiB: the same bytes, so fewer pages, on a 16K or 64K granule.
        if p.arch == "arm64":
            n = min(self.npages // 4, -(-(16 + 16 * cfg.vm.vcpus) * 4096 // self.page_size))
            self.vgic_gfns = np.arange(self.npages - n, self.npages, dtype=np.int64)
        else:
            self.vgic_gfns = np.zeros(0, dtype=np.int64)

    def enable_logging(self) -> int:
        """memory_global_dirty_log_start: KVM_MEM_LOG_DIRTY_PAGES on the RAM slot. Returns ns."""
        return self._set_ram_flags(U.KVM_MEM_LOG_DIRTY_PAGES)

    def disable_logging(self) -> int:
        """memory_global_dirty_log_stop: the RAM slot without KVM_MEM_LOG_DIRTY_PAGES (the rings
        stay: a ring cannot be disabled). Returns ns."""
        return self._set_ram_flags(0)

    def _set_ram_flags(self, flags: int) -> int:
        """KVM_SET_USER_MEMORY_REGION on the RAM slot with ``flags``, its cost the VMM's. Returns ns."""
        self.vm.set_user_memory_region(0, flags, 0, self.memory, block_fraction=self.cfg.vm.block_fraction)
        ns = self.vm.last_ioctl_ns
        self.vmm_cpu_ns += ns
        return ns

    def save_vgic_tables(self) -> None:
        """At vm stop on arm64 KVM saves the vGIC/ITS tables into guest RAM (no vCPU runs)."""
        if len(self.vgic_gfns):
            self.vm.write_without_vcpu(self.vgic_gfns)

    # ================================================================== processes
    @staticmethod
    def _check_config(cfg: ScenarioConfig) -> None:
        """What this kind of run refuses in a valid scenario (ConfigError), before anything is built."""

    def spawn(self, gen, prio: int, name: str = "", t: int | None = None) -> Process:
        return Process(self.loop, gen, prio, name).start(t)

    # ------------------------------------------------------------------ vCPU threads
    def _on_exit(self, e) -> None:
        i = e.vcpu
        self.vstate[i] = OUT
        self.vproc[i] = self.spawn(self._vcpu_out(i, e), self.PRIO_VCPU, f"vcpu{i}")

    def _enter(self, i: int) -> None:
        """KVM_RUN from the vCPU thread; an immediate exit is handled like any other."""
        e = self.vcpus[i].run()
        if e is None:
            self.vstate[i] = GUEST
            self.vproc[i] = None
        else:
            self._on_exit(e)

    def _vcpu_out(self, i: int, e):
        """The vCPU thread between two guest entries (QEMU kvm_cpu_exec + qemu_wait_io_event).
        Work under the lock happens when the lock is taken; the thread is then out for the
        work, any throttle sleep and the exit round trip, in one step."""
        loop, costs = self.loop, self.costs
        while True:
            delay, dl = 0, False
            if e is not None:
                if e.kind == "done":
                    self.vstate[i] = DONE
                    self._note_parked()
                    return
                if e.kind == "full":
                    yield from self._bql_for_vcpu(i)
                    n, work = self.collector.reap(i if self.throttle.in_service else None)
                    ns = self.collector.reset(n)
                    self.bql.release_at(loop.now + work + ns)
                    self.work_ns[i] += work + ns
                    delay = work + ns
                    sl = self.throttle.after_full_exit(i)
                    if sl > 0:
                        delay += sl
                        dl = True
                delay += costs.exit_ns
                self.exit_ns[i] += costs.exit_ns
                e = None
            if delay:
                self.vstate[i] = DLSLEEP if dl else OUT
                if dl:  # dirty-limit's sleep ends the wait, after the exit's work
                    self._throttle_sleep(i, loop.now + delay - sl, sl)
                yield delay
                if dl:
                    self._throttle_woke(i)
                self.vstate[i] = OUT
            while True:
                if self.paused:
                    self.vstate[i] = PARKED
                    self._note_parked()
                    yield self._resume
                    self.vstate[i] = OUT
                elif self.throttle_work[i] > 0:
                    yield from self._auto_converge_sleep(i, int(self.throttle_work[i]))
                else:
                    break
            e = self.vcpus[i].run()
            if e is None:
                self.vstate[i] = GUEST
                self.vproc[i] = None
                return
            if e.kind == "full" and self._wedged(i):
                return

    def _bql_for_vcpu(self, i: int):
        """vCPU ``i``'s thread takes the big lock; the wait counts as its stall time. A process step."""
        t0 = self.loop.now
        yield self.bql
        self.stall_ns[i] += self.loop.now - t0

    def _auto_converge_sleep(self, i: int, sleep_ns: int):
        """cpu_throttle_thread on vCPU ``i``'s thread: queued work, which the thread runs from
        process_queued_cpu_work with the big lock held (kvm_cpu_exec takes it when KVM_RUN
        returns), so the sleep starts once the thread has the lock; the timed wait releases it,
        and the thread takes it again when it wakes (then drops it for KVM_RUN). A VM stopped
        meanwhile has the thread stopped first (qemu_wait_io_event_common), so the pause does
        not wait for the sleep: it is skipped. Lock waits count as stall time. The sleep stays
        queued (``throttle_work``) until it is over: no second one is queued meanwhile, and a
        run_on_cpu queued after it waits for it (:meth:`run_on_all_vcpus`). A process step."""
        yield from self._bql_for_vcpu(i)
        self.bql.release()
        if not self.paused:
            self.vstate[i] = SLEEP
            self._throttle_sleep(i, self.loop.now, sleep_ns)
            yield sleep_ns
            self._throttle_woke(i)
            self.vstate[i] = OUT
            yield from self._bql_for_vcpu(i)
            self.bql.release()
        self.throttle_work[i] = 0
        self._sleep_over[i].fire()

    def _throttle_sleep(self, i: int, start: int, length: int) -> None:
        """vCPU ``i``'s thread sleeps for the throttle from ``start`` for ``length`` ns (it may
        be woken earlier): counted in ``throttle_ns`` as the time passes (:meth:`_throttled_ns`)."""
        self._throttle_from[i] = start
        self._throttle_len[i] = length
        if length:
            self._throttling += 1

    def _throttle_woke(self, i: int) -> None:
        """The sleep is over (or cut short): what of it passed joins ``throttle_ns``."""
        if self._throttle_len[i]:
            self.throttle_ns[i] += self._throttle_passed(i, self.loop.now)
            self._throttle_len[i] = 0
            self._throttling -= 1

    def _cut_throttle_sleeps(self, t: int) -> None:
        """The throttle sleeps under way count only up to ``t`` (what is left of them is not
        throttle time: :meth:`pause_vm`)."""
        if self._throttling:
            for i in np.flatnonzero(self._throttle_len).tolist():
                passed = self._throttle_passed(i, t)
                if passed:
                    self._throttle_len[i] = passed
                else:  # (not begun: it does not count at all)
                    self._throttle_len[i] = 0
                    self._throttling -= 1

    def _throttle_passed(self, i: int, now: int) -> int:
        return min(max(now - int(self._throttle_from[i]), 0), int(self._throttle_len[i]))

    def _throttled_ns(self, now: int) -> int:
        """Throttle sleep of all vCPUs up to ``now``: the sleeps over, and what passed of those
        under way."""
        total = sum(self.throttle_ns.tolist())
        if self._throttling:
            for i in np.flatnonzero(self._throttle_len).tolist():
                total += self._throttle_passed(i, now)
        return total

    def run_on_all_vcpus(self):
        """kvm_cpu_synchronize_kick_all (kvm_dirty_ring_flush's kick): a synchronous run_on_cpu
        on each vCPU in turn, the caller waiting for each without the big lock (qemu_cond_wait
        releases it) before it moves on to the next. A vCPU thread asleep in a throttle sleep
        runs the work when it wakes (g_usleep is not cut short); one in the guest is kicked out
        (SIG_IPI) and runs it at once: one exit round trip; any other runs it on its way back
        to KVM_RUN. Meanwhile the vCPUs not reached yet run on: one may fill its ring, reap and
        fall asleep, and is then waited for too. A process step; returns how long it took, ns."""
        t0 = self.loop.now
        for i, v in enumerate(self.vcpus):
            st, proc = self.vstate[i], self.vproc[i]
            # an auto-converge sleep queued ahead, under way or not begun
            if self.throttle_work[i] > 0 and st in (OUT, SLEEP):
                yield self._sleep_over[i]
            elif st in (SLEEP, DLSLEEP) and proc is not None and proc.pending is not None:
                if proc.pending[0] > self.loop.now:
                    yield proc.pending[0] - self.loop.now
            elif st == GUEST:
                e = v.kick()
                if e is not None:
                    self._on_exit(e)
                    yield self.costs.exit_ns
        return self.loop.now - t0

    def _wedged(self, i: int) -> bool:
        """KVM_RUN returned DIRTY_RING_FULL at once although everything harvested was reset and
        the vCPU's ring holds nothing to harvest: the ring overflowed (the kernel overwrote
        entries, so ``used`` never drops below the soft limit again) and is wedged. QEMU's vCPU
        thread would spin in KVM_RUN forever; the thread is parked as spinning instead of
        simulating every spin (its time counts as exit time to the end of the run)."""
        if self.cfg.collector != "ring" or self.collector.readers[i].count_ready():
            return False
        self.vstate[i] = WEDGED
        self.wedged_at[i] = self.loop.now
        self._note_parked()
        return True

    def queue_throttle_work(self, sleep_ns: int) -> None:
        """cpu_throttle_timer_tick: queue the sleep on every vCPU not already holding one."""
        for i in range(len(self.vcpus)):
            if self.throttle_work[i] == 0 and self.vstate[i] != SLEEP:
                self.throttle_work[i] = sleep_ns
                self._sleep_over[i].reset()
                if self.vstate[i] == GUEST:
                    e = self.vcpus[i].kick()
                    if e is not None:
                        self._on_exit(e)

    # ------------------------------------------------------------------ stopping the VM
    def _note_parked(self) -> None:
        self._parked += 1
        if self.paused and self._parked >= len(self.vcpus):
            self._all_parked.fire()

    def pause_vm(self):
        """vm_stop / pause_all_vcpus: every vCPU leaves the guest and parks. The caller must not
        hold the big lock (QEMU waits on a condition that releases it). A dirty-limit sleep under
        way is waited out (g_usleep is not cut short), but from now on it is the stop's time, the
        downtime or pause the run measures from here, not the vCPU's throttle time: it stops
        counting as such (the whole VM is stopped; counted as both, the env's reward charged
        those seconds twice)."""
        self.paused = True
        self._cut_throttle_sleeps(self.loop.now)
        self._resume.reset()
        self._all_parked.reset()
        self._parked = sum(1 for s in self.vstate if s in (DONE, WEDGED))
        for i, v in enumerate(self.vcpus):
            st = self.vstate[i]
            if st == GUEST:
                e = v.kick()
                if e is not None:
                    self._on_exit(e)
            elif st == SLEEP and self.vproc[i] is not None:
                self.vproc[i].interrupt()  # the throttle sleep notices cpu->stop
        if self._parked < len(self.vcpus):
            yield self._all_parked

    def resume_vm(self) -> None:
        """vm_start: the parked vCPU threads enter the guest again."""
        self.paused = False
        self._parked = 0
        self._resume.fire()

    # ------------------------------------------------------------------ the reaper
    def _reaper(self):
        """kvm_dirty_ring_reaper_thread: sleep, then reap all rings under the big lock."""
        loop = self.loop
        yield self.interval_ns
        while not self.finished:
            if self.throttle.in_service:  # dirty-limit: keep sleeping, the exits reap
                self._reaper_last = loop.now
                yield self.interval_ns
                continue
            yield self.bql
            n, work = self.collector.reap()
            ns = self.collector.reset(n)
            end = loop.now + work + ns
            self.bql.release_at(end)
            self.vmm_cpu_ns += work + ns
            self.reaper_runs += 1
            self._reaper_last = end
            yield end - loop.now + self.interval_ns

    def set_harvest_interval(self, ns: int) -> None:
        """Change the reaper's sleep (takes effect on the current sleep: it then ends
        ``ns`` after the reaper's last harvest, or now if that is already past). ``ns``: 1 to 1e15
        (1e6 s, the bound of the scenario's ``interval_ms``); a fraction of a ns is dropped."""
        checked_number(ns, "harvest interval", _INTERVAL_ACCEPTED, lambda x: 1 <= x <= _MAX_INTERVAL_NS)
        ns = int(ns)
        self.interval_ns = ns
        if self.reaper is not None and self.reaper.sleeping:
            self.reaper.wake_at(self._reaper_last + ns)

    @property
    def harvest_interval_ns(self) -> int:
        return self.interval_ns

    def _host_sync(self):
        """A no-op event every ``host_sync_ns``: the host is then run exactly to every multiple of
        it, so a step that ends on the grid observes the host at that very time."""
        while not self.finished:
            yield self.host_sync_ns

    # ------------------------------------------------------------------ dirty-rate estimate
    def note_full_reap(self) -> None:
        """Every ring was just harvested: a sample for the dirty-rate estimate."""
        t = self.loop.now
        samples = self._samples
        if t > samples[-1][0]:
            samples.append((t, self.entries_harvested))
            while len(samples) > 2 and samples[1][0] <= t - RATE_WINDOW_NS:
                samples.popleft()  # the newest sample at least 1 s old stays first

    @property
    def dirty_rate_Bps(self) -> float:
        return self._dirty_rate()

    def _dirty_rate(self, ready: np.ndarray | None = None) -> float:
        """Estimated guest dirty rate, bytes/s, as QEMU's calc-dirty-rate in dirty-ring mode
        counts it: ring entries per second, here from the newest full harvest at least 1 s
        old up to now (entries harvested since, plus those waiting in the rings now). With the
        bitmap: QEMU's dirty-pages-rate (migration_update_rates), the new dirty pages over the
        last closed rate period, which a sync more than 1 s after the period began closes (0
        until one has; a sync sooner adds its pages to the period under way and changes nothing:
        :class:`throttle.Trigger`; a migration's stop-and-copy sync, a few ms after the last one,
        is not counted: :meth:`note_sync`).
        ``ready``: the rings' waiting entries if the caller has them (:meth:`RingCollector.ready`)."""
        if self.cfg.collector != "ring":
            return float(self.throttle.trigger.dirty_pages_rate * self.page_size)
        now = self.vm.now
        samples = self._samples  # in time order: the newest sample at least 1 s old by bisection
        i = bisect_right(samples, now - RATE_WINDOW_NS, key=_sample_time)
        ref = samples[i - 1] if i else samples[0]
        if now <= ref[0]:
            return 0.0
        seen = self.entries_harvested + sum((self.collector.ready() if ready is None else ready).tolist())
        return (seen - ref[1]) * self.page_size * NS / (now - ref[0])

    # ================================================================== shared migration pieces
    def send_rate_Bps(self) -> float:
        raise NotImplementedError

    def sync(self, last_stage: bool = False):
        """migration_bitmap_sync under the big lock: collect, merge, account, throttle rule.
        With the ring, the flush first runs a synchronous run_on_cpu on every vCPU in turn
        (kvm_dirty_ring_flush -> kvm_cpu_synchronize_kick_all: :meth:`run_on_all_vcpus`,
        without the big lock); that wait is part of the sync. (The set-up's first sync is the
        same, :meth:`setup_logging`.)"""
        yield from self._sync(last_stage, setup=False)

    def _sync(self, last_stage: bool, *, setup: bool):
        wait = (yield from self.run_on_all_vcpus()) if self.collector.kind == "ring" else 0
        yield self.bql
        ns = self.collector.sync(last_stage)
        self.bql.release_at(self.loop.now + ns)
        yield ns
        self.note_sync(last_stage, wait + ns, setup=setup)

    def note_sync(self, last_stage: bool, ns: int, *, setup: bool = False) -> None:
        """Bookkeeping after a sync that took ``ns``: counts, the dirty rate it saw, the
        throttles' trigger rule (the set-up's sync only starts its first period; a migration's
        last stage is not fed to it: :attr:`trigger_on_last_stage`)."""
        new = self.collector.last_new
        now = self.loop.now
        self.iterations += 1
        self.sync_ns.append(ns)
        self._dirty_bytes_last_sync = self.dirty.mig_count * self.page_size
        self._last_sync_ns = now
        if setup:
            self.throttle.on_setup_sync(now - ns, new)
        elif not last_stage or self.trigger_on_last_stage:
            self.throttle.on_sync(self, new)

    def end_pass(self) -> None:
        self.passes += 1
        self.pass_bytes.append(self._pass_sent)
        self._pass_sent = 0

    def send_slice(self, rate_Bps: float, *, max_pages: int | None = None, stop_below: int | None = None,
                   deadline: int | None = None):
        """ram_save_iterate, k times in a row: send dirty pages for k ~50 ms slices at ``rate_Bps``.

        QEMU checks the pending estimate between two 50 ms slices (with the rate limiter in
        force, between two of its 100 ms windows: a slice is then a window's budget, and the
        first what is left of the window under way); k is the number of slices before the first
        check that would act: the estimate falling below ``stop_below`` bytes
        (the switchover threshold; before any bandwidth was measured, 0: the first window's
        measurement, which sets it, if the batch could take pending below the highest threshold
        possible), or ``deadline`` (give-up, or auto-converge's dirty-sync
        tick) passing; at most ``MAX_SLICE_NS`` worth (``stop_below`` None: no switchover
        check). Sending k slices at once is exact for the pages sent (see
        :meth:`DirtyPages.take`) and keeps the host's sampling windows long. With the bitmap
        collector a slice never runs into a second 1 GiB chunk that still needs its CLEAR, so
        every CLEAR happens just before its chunk is sent, as in QEMU.

        Zero pages (``vm.zero_fraction``) go on the stream as ``zero_wire_bytes`` each and cost
        the thread ``zero_check_ns`` each to find. The send's bytes leave at the pace of the
        slower of the two: the wire (or the rate limiter's windows), or the thread checking its
        zero pages, the socket draining while the thread reads the next pages (which holds
        for zero pages spread among pages with data, as :func:`ringenv.vmm.dirty.initially_zero`
        spreads them). A slice holds the pages of ~50 ms (or of a window) at the slower of a
        full page's wire time and a zero page's check, so that it never runs past its time
        whatever its pages hold; one with fewer zero pages ends sooner, and the next follows
        (QEMU would fill its 50 ms with more pages)."""
        bpp = self.page_wire_bytes
        limited = self.window_budget and self.paused_at is None  # QEMU's rate limiter (max-bandwidth)
        checks = self.dirty.zero_q and self.zero_check_ns > 0  # zero pages possible, and they take time
        if limited:  # whole windows: QEMU checks between two, once the budget is spent and the window over
            n50, slice_ns = self.window_budget // bpp + 1, BW_WINDOW_NS
            if checks:
                n50 = min(n50, max(1, int(BW_WINDOW_NS / self.zero_check_ns)))
        else:
            n50 = max(1, int(rate_Bps * SLICE_NS / NS / bpp))
            if checks:
                n50 = min(n50, max(1, int(SLICE_NS / self.zero_check_ns)))
            slice_ns = max(SLICE_NS, int(math.ceil(n50 * bpp * NS / rate_Bps)))  # (a page can take longer)
        if max_pages is None:
            k = max(1, MAX_SLICE_NS // slice_ns)
            mig = self.dirty.mig_count
            if stop_below:
                k = min(k, max(1, (mig - stop_below // self.page_size) // n50 + 1))
            elif stop_below is not None and not self.bandwidth_Bps and mig - k * n50 < self._highest_threshold_pages():
                # no threshold yet, and the batch could take pending below any it can be: up to the first window's
                # measurement, which sets it (a batch ending above it would pass no check that acts either way)
                k = min(k, max(1, -(-(BW_WINDOW_NS - (self.loop.now - self._bw_t0)) // slice_ns)))
            if deadline is not None:
                k = min(k, max(1, -(-(deadline - self.loop.now) // slice_ns)))
            max_pages = k * n50
            if limited:  # what is left of the window under way
                max_pages = max(max_pages - n50 + self._window_pages_left(self.bytes_sent - self._bw_b0, bpp), 1)
        run = None if self.collector.reads_slices else self.dirty.take_run(max_pages)
        resent = self.dirty.pages_resent
        if run is not None:  # consecutive pages (the bulk stage): no index array
            zero = self.dirty.copy_run(*run, self.source_version())
            npages = run[1]
        else:
            pages = self.dirty.take(max_pages)
            if len(pages) == 0:
                return
            pages = self.collector.limit_slice(pages)
            ns = self.collector.before_send(pages)
            if ns:  # the CLEAR runs first: the pages taken are still to send meanwhile
                self._taken = len(pages)
                yield ns
                self._taken = 0
                if self.stream_shut:  # shut down meanwhile: the first write fails
                    self._lost += len(pages)
                    return
            zero = self.dirty.copy(pages, self.source_version())
            npages = len(pages)
        resent = self.dirty.pages_resent - resent  # sent before (the rest: for the first time)
        nbytes = npages * bpp - zero * (bpp - self.zero_wire_bytes)
        check_ns = zero * self.zero_check_ns  # the thread's time finding the zero pages
        bursts = None
        if limited:  # the bytes leave at the link's rate, or at the checks' pace if slower
            link = self.cfg.link.link_Bps
            dt, bursts, self._closing = self._rate_limited(
                nbytes, bpp, link if check_ns * link <= nbytes * NS else nbytes * NS / check_ns)
        else:
            dt = max(int(math.ceil(nbytes * NS / rate_Bps)), int(math.ceil(check_ns)))
        self.bytes_sent += nbytes
        self._pass_sent += nbytes
        self._slice = (self.loop.now, dt, npages - resent, resent, nbytes, bursts, zero)
        end = self.loop.now + dt
        yield dt
        if self.stream_shut and self.loop.now < end:
            self._lose_in_flight()
            return
        self._slice = None
        self.update_bandwidth()

    def _highest_threshold_pages(self) -> int:
        """Pages above any switchover threshold a measurement can set: a window's bandwidth is at
        most the link's rate (a rate-limited one's bursts go at it), so 1.5 x link rate x
        downtime-limit is beyond it."""
        link = self.cfg.link
        return int(1.5 * link.link_Bps * link.downtime_limit_ms / 1000.0) // self.page_size + 1

    def shut_stream(self) -> None:
        """The stream is shut down now (migrate_fd_cancel -> qemu_file_shutdown): a send under
        way fails at its next write, so the migration thread, if sending, wakes when it notices
        (:meth:`_send_fails_at`); what was not on the wire by then never is (:meth:`send_slice`)."""
        self.stream_shut = True
        if self._slice is not None and self.main.sleeping:
            self.main.wake_at(self._send_fails_at(self.loop.now))

    def _send_fails_at(self, now: int) -> int:
        """When the migration thread sending :attr:`_slice` notices a stream shut down at
        ``now``: at once while its bytes go out; waiting for a rate-limiter window to end, at
        the window's end (migrate_fd_cancel posts nothing to that wait), before the next burst."""
        t0, dt, _, _, _, bursts, _ = self._slice
        for a, b, _ in bursts or ():
            if now < a:
                return a
            if now < b:
                return now
        return t0 + dt if bursts else now

    def _lose_in_flight(self) -> None:
        """The send under way stopped now by a shut-down stream: its bytes and pages not yet on
        the wire (:meth:`_in_flight`) were never sent."""
        pages, nbytes, _, resent, zero = self._in_flight(self.loop.now)
        self._slice = None
        self.bytes_sent -= nbytes
        self._pass_sent -= nbytes
        d = self.dirty
        d.pages_sent -= pages
        d.pages_resent -= resent
        d.zero_pages -= zero
        self._lost += pages

    def _window_pages_left(self, used: int, bpp: int) -> int:
        """Pages of ``bpp`` bytes a rate-limiter window that has sent ``used`` bytes still lets go:
        while no more than its budget went out (migration_rate_exceeded), the page that passes
        it included."""
        return (self.window_budget - used) // bpp + 1 if used <= self.window_budget else 0

    def _rate_limited(self, nbytes: int, bpp: int, pace_Bps: float) -> tuple[int, tuple]:
        """QEMU's rate limiter over a send of ``nbytes`` (whole wire pages of ``bpp`` bytes) that
        begins now, its bytes leaving at ``pace_Bps`` (the link's rate, or the pace of the
        thread's zero-page checks when slower: :meth:`send_slice`):
        migration_rate_exceeded lets pages go at that pace while the window
        (BUFFER_DELAY, 100 ms) has sent no more than its budget, ``window_budget`` (max-bandwidth
        / XFER_LIMIT_RATIO; the page that passes it included); then migration_rate_limit waits
        for the window's end, where migration_update_counters measures it and the next window
        begins with a new budget (no debt carried over); a window that ran past its 100 ms
        (a long sync in it) is measured as soon as the thread gets there. The migration thread's
        other work (a sync, a CLEAR) thus costs no sending time while it fits in a window's
        idle time. Returns (ns until the thread acts again, its wait for the window's end
        included; the bursts on the wire, (start, end, bytes) each, for :meth:`_in_flight`;
        what :meth:`update_bandwidth` applies when the send is over: the last window closed, as
        (start, bytes, end) or None, and the window under way, as (start, bytes))."""
        budget = self.window_budget
        now = t = self.loop.now
        t0, used = self._bw_t0, self.bytes_sent - self._bw_b0
        closed = None
        bursts = []
        left = nbytes
        while True:
            if used > budget:  # exceeded: the thread waits for the window's end
                end = max(t, t0 + BW_WINDOW_NS)
                closed, t0, used, t = (t0, used, end), end, 0, end
            if not left:
                break
            n = min(left, self._window_pages_left(used, bpp) * bpp)
            t1 = t + int(math.ceil(n * NS / pace_Bps))
            bursts.append((t, t1, n))
            t = t1
            used += n
            left -= n
        if closed is None or closed[2] < t:
            if t - t0 >= BW_WINDOW_NS:  # a window past its time, not exceeded: measured when the thread gets there
                closed, t0, used = (t0, used, t), t, 0
        return t - now, bursts, (closed, (t0, used))

    def _in_flight(self, now: int) -> tuple[int, int, int, int, int]:
        """(pages, bytes, pages sent for the first time, pages re-sent, zero pages) of the
        slice being sent that are not on the wire by ``now``. The slice's first-time and re-sent
        pages leave pro rata, each rounded on its own, and its pages are their sum: the pages
        sent, the pages re-sent and the share of RAM sent at least once each only go up, and no
        step shows more pages re-sent than sent. Its zero pages leave pro rata too."""
        if self._slice is None:
            return 0, 0, 0, 0, 0
        t0, dt, new, resent, nbytes, bursts, zero = self._slice
        if not dt:
            return 0, 0, 0, 0, 0
        if bursts:  # a rate-limited send: its bursts at the link's rate, each on the wire pro rata
            gone = 0
            for a, b, n in bursts:
                if now >= b:
                    gone += n
                elif now > a:
                    gone += n * (now - a) // (b - a)
            bytes_left = nbytes - gone
            left = bytes_left / nbytes
        else:
            done = (now - t0) / dt  # share on the wire, clamped to [0, 1]
            done = (done if done < 1.0 else 1.0) if done > 0.0 else 0.0
            left = 1.0 - done
            bytes_left = int(nbytes * left)
        new_left, resent_left = int(new * left), int(resent * left)
        return new_left + resent_left, bytes_left, new_left, resent_left, int(zero * left)

    def send_bytes(self, nbytes: int, rate_Bps: float):
        """Send ``nbytes`` that are not pages (the device state): on the wire pro rata as a
        slice's bytes are (:meth:`_in_flight`)."""
        if nbytes > 0:
            self.bytes_sent += nbytes
            self._pass_sent += nbytes
            dt = int(math.ceil(nbytes * NS / rate_Bps))
            self._slice = (self.loop.now, dt, 0, 0, nbytes, None, 0)
            yield dt
            self._slice = None

    def update_bandwidth(self) -> None:
        """migration_update_counters: bandwidth over >= 100 ms windows; the switchover threshold
        is bandwidth x downtime-limit. QEMU's expected-downtime, the dirty bytes the last sync
        left over the bandwidth, once a dirty-page rate is known (:class:`Trigger`) and the
        window sent more than 10 kB. A migration measures nothing once its VM is stopped (QEMU
        updates no counter once the completion has begun: migration_update_counters runs from
        the migration thread's loop, which the switchover leaves); a checkpoint goes on
        measuring its writes while paused (:attr:`measures_paused`)."""
        now = self.loop.now
        closing, self._closing = self._closing, None
        if self.paused_at is not None and not self.measures_paused:
            return
        if closing is not None:  # a rate-limited send's windows (:meth:`_rate_limited`)
            closed, (t0, used) = closing
            if closed is not None:
                self._measure(closed[1], closed[2] - closed[0])
            self._bw_t0, self._bw_b0 = t0, self.bytes_sent - used
        elif now - self._bw_t0 >= BW_WINDOW_NS:
            self._measure(self.bytes_sent - self._bw_b0, now - self._bw_t0)
            self._bw_t0, self._bw_b0 = now, self.bytes_sent

    def _measure(self, sent: int, ns: int) -> None:
        """migration_update_counters over a window of ``ns`` that sent ``sent`` bytes."""
        self.bandwidth_Bps = sent * NS / ns
        self.threshold_bytes = int(self.bandwidth_Bps * self.cfg.link.downtime_limit_ms / 1000.0)
        if sent > 10_000 and self.throttle.trigger.dirty_pages_rate and self.paused_at is None:  # (checkpoints)
            self.expected_downtime_s = self._dirty_bytes_last_sync / self.bandwidth_Bps

    def start_bandwidth_window(self) -> None:
        self._bw_t0, self._bw_b0 = self.loop.now, self.bytes_sent

    def verify(self) -> int:
        """Compare the destination's page versions with the source's (reading the source's
        versions here models the copy of page contents)."""
        return self.dirty.lost_writes(self.source_version())

    def source_version(self) -> np.ndarray:
        """The source's page versions of guest RAM, its memslot's (the kernel's arrays hold
        every slot, padded to whole stage-2 blocks). Reading them models reading page
        contents: only sending and verification do."""
        return self.vm.slot_versions(0)

    def _main(self):
        raise NotImplementedError
        yield

    def finish(self) -> None:
        self.finished = True
        self.end_ns = self.loop.now
        self.phase = "done"
        self.paused_at = None
        self.throttle.stop()

    def pause_so_far_s(self) -> float:
        """How long the VM has been stopped, if it is now (a migration's stop-and-copy, a
        checkpoint's pause), s; 0 while it runs."""
        return 0.0 if self.paused_at is None else (self.loop.now - self.paused_at) / NS

    # ================================================================== stepping
    def setup_logging(self):
        """ram_save_setup's dirty-logging part (ram_init_bitmaps): under the big lock, enable
        logging and mark every page dirty; the first sync (not a throttle period), with the ring
        as :meth:`sync` (its flush kicks every vCPU, the lock let go while it waits for each),
        with the bitmap still holding the lock; then open the bandwidth window (QEMU's migration
        thread opens it before the set-up: a departure, in the README, that changes only the
        first measurement)."""
        yield self.bql
        ns = self.enable_logging()
        self.dirty.set_all()
        if self.collector.kind == "ring":  # the flush's run_on_cpu waits let the lock go (qemu_cond_wait)
            self.bql.release_at(self.loop.now + ns)
            yield ns
            yield from self._sync(False, setup=True)
        else:  # held to the end of the sync
            sync = self.collector.sync()
            self.bql.release_at(self.loop.now + ns + sync)
            yield ns + sync
            self.note_sync(False, sync, setup=True)
        self.start_bandwidth_window()

    def final_copy(self):
        """The stop-and-copy stage, a process step under the big lock with the vCPUs paused:
        the vGIC/ITS table saves, the last-stage sync, every page still dirty and the device state,
        sent at the run's ``final_rate_Bps`` (the link's full rate: QEMU lifts max-bandwidth for
        the completion; or the checkpoint storage's). With the stream shut down (a migrate_cancel
        as the VM stopped) nothing after the sync: every write fails at once."""
        self.save_vgic_tables()
        sync = self.collector.sync(last_stage=True)
        yield sync
        self.note_sync(True, sync)
        if self.stream_shut:  # (a migrate_cancel as the VM stopped: every write fails at once)
            return
        while self.dirty.mig_count:
            yield from self.send_slice(self.final_rate_Bps, max_pages=1 << 20)
        yield from self.send_bytes(self.cfg.link.device_state_bytes, self.final_rate_Bps)

    def close(self) -> None:
        """Release the run now: its VM (the VM fd is closed), page bookkeeping, collector, VMM
        processes and event loop. They refer to each other and back to the run (a process's
        generator holds the run, the run its collector and processes, the collector the run), and
        a run allocates too few Python objects for the cyclic collector to come by often: without
        this, finished runs pile up until it does. Metrics taken before stay valid; any later use of
        the run raises RuntimeError. Closing twice is allowed."""
        self.vm.close()
        self.loop.close()
        kind = type(self).__name__
        self.__dict__.clear()
        self.__class__ = _ClosedRun
        self._kind = kind

    def advance(self, until_ns: int) -> None:
        """Run host and VMM up to simulated time ``until_ns`` (or until the run is over): a number of ns from 0 to
        FOREVER (a fraction of a ns is dropped); anything else (a string, NaN, infinity, a bool) is a ConfigError
        naming the argument and what is accepted."""
        checked_number(until_ns, "until_ns", _ADVANCE_ACCEPTED, lambda ns: 0 <= ns <= FOREVER)
        until = int(until_ns)
        loop, vm = self.loop, self.vm
        heap = loop.heap
        while not self.finished:
            t = heap[0][0] if heap else FOREVER
            if t > until:
                break
            if t > vm.now:
                exits = vm.run_until(t)
                if exits:
                    loop.now = vm.now
                    for e in exits:
                        self._on_exit(e)
                    continue
            loop.fire_next()
        if self.finished:
            self.now_ns = self.end_ns
        else:
            self.now_ns = max(self.now_ns, until)

    def run(self, max_ns: int = FOREVER) -> Metrics:
        """Advance until the run is over; returns its metrics."""
        self.advance(max_ns)
        return self.metrics()

    @property
    def done(self) -> bool:
        return self.finished

    @property
    def now_s(self) -> float:
        return self.now_ns / NS

    # ================================================================== metrics
    @cached_property
    def _run_constants(self) -> tuple[str, str, bool, int, int, float, float]:
        """What the metrics report that cannot change during the run, read once: scenario name,
        collector, ring or not, entries per ring (0 with the bitmap), kernel memory of all rings
        (fixed when the vCPUs are created), VMM bookkeeping bytes per page (its arrays are
        allocated with the session), ring soft limit (as a float)."""
        cfg = self.cfg
        ring = cfg.collector == "ring"
        soft_limit = float(self.collector.soft_limit) if ring else 1.0
        return (cfg.name, cfg.collector, ring, cfg.ring_entries if ring else 0, self.vm.ring_bytes,
                self.dirty.nbytes / self.npages, soft_limit)

    #: a migration cancelled (:meth:`MigrationRun._cancel`)
    cancelled = False

    def _base_metrics(self, downtime_s: float, total_s: float, converged: bool) -> dict:
        """Every :class:`Metrics` field but the checkpointing ones, in declaration order (what
        :meth:`Metrics.from_fields` takes); the run's outcome fields come from the subclass.
        Per-vCPU totals are summed as Python ints (exact, as the numpy sums were)."""
        vm, dirty, vcpus = self.vm, self.dirty, self.vcpus
        name, collector, ring, ring_entries, ring_bytes, bytes_per_page, soft_limit = self._run_constants
        full_exits, fault_ns, overflows = vm.vcpu_totals()
        vm_st = vm.stats
        ready = self.collector.look(overflows)
        fill = (ready / soft_limit).tolist() if ring else [0.0] * len(vcpus)
        fl_pages, fl_bytes, fl_new, fl_resent, fl_zero = self._in_flight(self.now_ns)
        wedged = [t for t in self.wedged_at.tolist() if t >= 0]
        spin = self._spin_ns(wedged) if wedged else 0
        return {
            "scenario": name, "kind": self.kind, "collector": collector, "phase": self.phase,
            "done": self.finished, "time_s": self.now_ns / NS,
            "downtime_s": downtime_s, "total_s": total_s, "converged": converged, "cancelled": self.cancelled,
            "iterations": self.iterations, "passes": self.passes,
            "bytes_sent": self.bytes_sent - fl_bytes, "pages_sent": dirty.pages_sent - fl_pages,
            "pages_resent": dirty.pages_resent - fl_resent, "zero_pages": dirty.zero_pages - fl_zero,
            "full_exits": full_exits,
            "vcpu_exit_s": float(sum(self.exit_ns.tolist()) + sum(self.work_ns.tolist()) + spin) / NS,
            "vcpu_stall_s": float(sum(self.stall_ns.tolist())) / NS,
            "vcpu_throttle_s": float(self._throttled_ns(self.now_ns)) / NS,
            "vcpu_fault_s": fault_ns / NS,
            "vmm_cpu_s": self.vmm_cpu_ns / NS,
            "harvests": self.harvests, "resets": vm_st.resets, "entries_harvested": self.entries_harvested,
            "tlb_flushes": vm_st.tlb_flushes, "get_dirty_log_calls": vm_st.get_dirty_log_calls,
            "clear_dirty_log_calls": vm_st.clear_dirty_log_calls,
            "ring_bytes": ring_bytes, "ring_entries": ring_entries,
            "interval_ms": self.interval_ns / MS if ring else 0.0,
            "lost_writes": self.lost_writes, "verified": self.verified,
            "ring_overflows": overflows,
            "wedged_vcpus": len(wedged),
            "dirty_rate_Bps": self._dirty_rate(ready),
            "ring_fill": tuple(fill),
            "remaining_bytes": (self._remaining_pages() + fl_pages + self._taken + self._lost) * self.page_size,
            "bandwidth_Bps": self.bandwidth_Bps, "threshold_bytes": self.threshold_bytes,
            "expected_downtime_s": self.expected_downtime_s,
            "progress": (dirty.pages_sent - dirty.pages_resent - fl_new) / self.npages,
            "throttle_pct": float(self.throttle.pct),
            "vcpu_stall_s_per_vcpu": tuple((self.stall_ns / NS).tolist()),
            "pass_bytes": tuple(self.pass_bytes),
            "sync_s": sum(self.sync_ns) / NS,
            "vmm_bytes_per_page": bytes_per_page,
        }

    def pml_logged(self) -> np.ndarray:
        """x86 PML: the RAM pages (slot offsets) logged in the vCPUs' PML buffers and not yet
        flushed into a ring or the dirty bitmap (at the vCPU's next exit or timer tick). Read
        from the kernel's vCPUs (the buffers hold gfns, as the CPU logs GPAs), a measurement
        for :meth:`_remaining_pages` (QEMU cannot see them)."""
        bufs = [v.pml[: v.pml_count] for v in self.vcpus if v.pml is not None and v.pml_count]
        if not bufs:
            return _NO_PAGES
        base = self.vm.memslot(0).base_gfn
        off = np.concatenate(bufs) - base
        return off[(off >= 0) & (off < self.npages)]

    def _remaining_pages(self) -> int:
        """What ``remaining_bytes`` counts besides the slice on the wire and the pages taken for a
        CLEAR: here QEMU's pending estimate, the migration bitmap's dirty pages
        (ram_bytes_remaining); a checkpoint run counts every page not yet saved."""
        return self.dirty.mig_count

    def _spin_ns(self, wedged: list[int] | None = None) -> int:
        """vCPU time spinning on wedged rings, ns: from each wedge to the end of the run (or
        now). ``wedged``: the wedge times (``wedged_at`` >= 0) if the caller has them."""
        if wedged is None:
            wedged = [t for t in self.wedged_at.tolist() if t >= 0]
        end = self.end_ns if self.finished else self.loop.now
        return sum([end - t for t in wedged])

    def metrics(self) -> Metrics:
        raise NotImplementedError
