"""Pre-copy live migration as QEMU runs it (migration/migration.c, migration/ram.c), steppable.

Setup: dirty logging on (KVM_MEM_LOG_DIRTY_PAGES), every page dirty in the migration bitmap
(the bulk stage), one initial sync (with the ring, its flush kicks every vCPU as every sync's
does). Then QEMU's ``migration_iteration_run``, over and over:

1. pending = dirty pages left in the migration bitmap (the estimate);
2. if pending < threshold (= measured bandwidth x downtime-limit), sync exactly (kick, reap,
   reset; or GET_DIRTY_LOG) and take the new pending;
3. if pending is 0 or below the threshold: switch over; else send for one ~50 ms slice, from
   where the last slice stopped, wrapping around RAM: at the link's rate, or with a
   max-bandwidth below it through QEMU's rate limiter (a budget of max-bandwidth / 10 per 100 ms
   window sent at the link's rate, then a wait for the window's end: a sync or CLEAR that fits
   in that wait costs no sending time).

With ``switchover: pass-end`` step 2 happens only when a pass is complete (the bitmap is
empty): the textbook model of docs/reference/migration.md s1.

Bandwidth is measured over >= 100 ms windows (sync time included), the rate limiter's own
windows when it is in force. After ``link.give_up_s`` the switchover is forced (reported
``converged = False``), or with ``link.give_up_action: cancel`` the migration is cancelled
(:meth:`MigrationRun._cancel`, reported ``cancelled = True``).

An operator's migrate_cancel (``link.cancel_at_s``, or :meth:`MigrationRun.cancel` between two
``advance`` calls) is a QMP command: it waits for the big lock, then shuts the stream down
(migrate_fd_cancel). The migration thread, sending, fails at its next write: what was not on the
wire is lost, and it leaves its loop; waiting for a rate-limiter window to end, it leaves at the
window's end (nothing posts to that wait); after a sync (which held the lock but while its
ring flush waited for each vCPU's kick: a cancel can come then, the set-up's sync included)
it leaves at once.
The stop-and-copy holds the lock to its end: a cancel then finds the migration completed. A
cancel that gets the lock while vm_stop waits for the vCPUs (without the lock) makes the
completion fail after its last sync: the VM is started again at the source
(migration_iteration_finish), ``downtime_s`` the time it was stopped. The clean-up is the
give-up cancel's. dirty-limit is cancelled with the command (migration_cancel); auto-converge
when the thread leaves (migration_iteration_finish's cpu_throttle_stop).

Stop-and-copy: stop the VM (every vCPU kicked out and parked; on arm64 KVM saves the vGIC
tables into guest RAM, logged in the backup bitmap), final sync (with the backup bitmap read on
arm64), send what is left and the device state at the link's full rate (QEMU disables the
max-bandwidth limit for the completion). Downtime is from the stop to the end. Then the
destination's page versions are compared with the source's: ``lost_writes``.
"""

from __future__ import annotations

from ..config import to_ns
from .metrics import Metrics
from .session import BW_WINDOW_NS, NS, Session


class MigrationRun(Session):
    """One live migration of a scenario: ``advance(until_ns)`` / ``run()``, ``metrics()``."""

    kind = "migration"

    def __init__(self, scenario=None, *, seed=None, **overrides):
        self.downtime_ns = 0
        self.total_ns = 0
        self.converged = False
        self.forced = False
        self.cancelled = False
        self.cancel_ns: int | None = None  # when an operator's migrate_cancel took effect (shut the stream)
        self._cancel_proc = None
        super().__init__(scenario, seed=seed, **overrides)
        link = self.cfg.link
        # QEMU's rate limiter (migration_rate_exceeded, its budget reset every BUFFER_DELAY with
        # no debt carried over) lets at least one page through per window: a max-bandwidth
        # below a page per 100 ms still sends that much (the link permitting)
        floor_Bps = self.page_wire_bytes * NS / BW_WINDOW_NS
        # (max-bandwidth / 10 as whole bytes: 0, from a max-bandwidth below 10 B/s, is QEMU's
        # RATE_LIMIT_DISABLED, no limit at all)
        budget = int(link.rate_Bps * BW_WINDOW_NS / NS) if link.rate_Bps < link.link_Bps else 0
        if budget:  # the sends go in bursts at the link's rate (Session._rate_limited)
            self.window_budget = budget
            self.rate_Bps = min(link.link_Bps, max(link.rate_Bps, floor_Bps))  # (the average: sizes the slices)
        else:
            self.rate_Bps = link.link_Bps
        self.final_rate_Bps = link.link_Bps  # migration_completion: no rate limit

    def _main(self):
        link = self.cfg.link
        rule_qemu = self.cfg.switchover == "qemu"
        loop, dirty = self.loop, self.dirty
        t_start = loop.now
        give_up = t_start + int(link.give_up_s * NS)
        throttle = self.throttle
        throttle.start(t_start)
        if link.cancel_at_s is not None:
            self._request_cancel(t_start + to_ns(link.cancel_at_s, NS))

        yield from self.setup_logging()  # ram_save_setup
        self.phase = "bulk"

        ps = self.page_size
        while True:
            if self.stream_shut:  # migrate_cancel: the thread leaves its loop
                yield from self._cancel(t_start)
                return
            if loop.now >= give_up:
                if link.give_up_action == "cancel":
                    yield from self._cancel(t_start)
                    return
                self.forced = True
                break
            if throttle.sync_due():  # auto-converge's periodic dirty sync (QEMU >= 9.2), mid-pass: the
                yield from self.sync()  # ticks that passed during the last slice, before any sync of the loop's
                continue
            pending = dirty.mig_count * ps
            if (pending < self.threshold_bytes) if rule_qemu else (dirty.mig_count == 0):
                yield from self.sync()
                self.end_pass()
                self.phase = "iterate"
                pending = dirty.mig_count * ps
                if pending == 0 or pending < self.threshold_bytes:
                    break
            elif pending == 0:
                break
            tick = throttle.next_sync_tick
            yield from self.send_slice(self.rate_Bps, stop_below=self.threshold_bytes if rule_qemu else None,
                                       deadline=give_up if tick is None else min(give_up, tick))

        # migration_completion: stop and copy. A pass the loop left without an exact sync (forced
        # at give_up_s; pending 0 before a threshold was measured) gets its own pass_bytes entry
        if self._pass_sent:
            self.pass_bytes.append(self._pass_sent)
            self._pass_sent = 0
        self.phase = "stop-copy"
        t_stop = self.paused_at = loop.now
        yield from self.pause_vm()
        yield self.bql
        self.throttle.stop()
        yield from self.final_copy()
        self.bql.release()
        if self.stream_shut:  # cancelled as the VM stopped: the completion failed after its sync
            self.resume_vm()  # migration_iteration_finish: vm_start, at the source
            self.paused_at = None
            self.downtime_ns = loop.now - t_stop
            yield from self._cancel(t_start)
            return
        self.pass_bytes.append(self._pass_sent)
        self._pass_sent = 0
        self.downtime_ns = loop.now - t_stop
        self.total_ns = loop.now - t_start
        self.converged = not self.forced
        self.lost_writes = self.verify()
        self.verified = self.lost_writes == 0
        self.finish()

    def cancel(self) -> None:
        """An operator's migrate_cancel now (at ``now_s``, where the last :meth:`advance`
        stopped, or at the event under way when called from inside the run): served once it has
        the big lock (module docstring). No effect once the run is over or a cancel is under
        way; one that finds the migration completed changes nothing."""
        self._request_cancel(max(self.loop.now, self.now_ns))

    def _request_cancel(self, t: int) -> None:
        if not self.finished and self._cancel_proc is None:
            self._cancel_proc = self.spawn(self._migrate_cancel(), self.PRIO_MAIN, "migrate-cancel", t)

    def _migrate_cancel(self):
        """The QMP command, under the big lock (migration_cancel -> migrate_fd_cancel)."""
        yield self.bql
        if not self.finished and not self.stream_shut and self.phase != "cancelling":
            self.cancel_ns = self.loop.now
            self.throttle.on_cancel()
            self.shut_stream()
        self.bql.release()

    def _cancel(self, t_start: int):
        """The migration thread leaves its loop after a migrate_cancel (an operator's, or at
        ``link.give_up_s`` with ``give_up_action: cancel``: then between two slices, the
        shut-down stream failing its next write: nothing more is sent), and the clean-up
        (migrate_fd_cleanup) stops the throttle and, under the big lock, dirty logging
        (ram_save_cleanup -> memory_global_dirty_log_stop: KVM_SET_USER_MEMORY_REGION without
        KVM_MEM_LOG_DIRTY_PAGES, its cost the VMM's). The VM runs on at the source: downtime 0
        unless the cancel came as it stopped (set by the caller), nothing verified
        (``verified`` None: no destination will run), ``remaining_bytes`` what was left to
        send."""
        if self._pass_sent:  # the pass under way, as a forced switchover reports it
            self.pass_bytes.append(self._pass_sent)
            self._pass_sent = 0
        self.phase = "cancelling"
        self.throttle.on_cancel()  # (done if the cancel was an operator's)
        self.throttle.stop()
        yield self.bql
        ns = self.disable_logging()
        self.bql.release_at(self.loop.now + ns)
        yield ns
        self.cancelled = True
        self.total_ns = self.loop.now - t_start
        self.finish()

    def metrics(self) -> Metrics:
        total_ns = self.total_ns if self.finished else self.loop.now
        return Metrics.from_fields(self._base_metrics(self.downtime_ns / NS, total_ns / NS, bool(self.converged)))
