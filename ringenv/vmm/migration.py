"""Pre-copy live migration as QEMU runs it (migration/migration.c, migration/ram.c), steppable.

Setup: dirty logging on (KVM_MEM_LOG_DIRTY_PAGES), every page dirty in the migration bitmap
(the bulk stage), one initial sync. Then QEMU's ``migration_iteration_run``, over and over:

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

Stop-and-copy: stop the VM (every vCPU kicked out and parked; on arm64 KVM saves the vGIC
tables into guest RAM, logged in the backup bitmap), final sync (with the backup bitmap read on
arm64), send what is left and the device state at the link's full rate (QEMU disables the
max-bandwidth limit for the completion). Downtime is from the stop to the end. Then the
destination's page versions are compared with the source's: ``lost_writes``.
"""

from __future__ import annotations

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

        yield from self.setup_logging()  # ram_save_setup
        self.phase = "bulk"

        ps = self.page_size
        while True:
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
            yield from self.send_slice(self.rate_Bps, stop_below=self.threshold_bytes if rule_qemu else 0,
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
        self.pass_bytes.append(self._pass_sent)
        self._pass_sent = 0
        self.downtime_ns = loop.now - t_stop
        self.total_ns = loop.now - t_start
        self.converged = not self.forced
        self.lost_writes = self.verify()
        self.verified = self.lost_writes == 0
        self.finish()

    def _cancel(self, t_start: int):
        """migrate_cancel, at ``link.give_up_s`` (``give_up_action: cancel``): the migration
        thread leaves its loop between two slices (the shut-down stream fails its next write:
        nothing more is sent), and the clean-up (migrate_fd_cleanup) stops the throttle and,
        under the big lock, dirty logging (ram_save_cleanup -> memory_global_dirty_log_stop:
        KVM_SET_USER_MEMORY_REGION without KVM_MEM_LOG_DIRTY_PAGES, its cost the VMM's). The VM
        never stopped and runs on at the source: downtime 0, nothing verified (``verified``
        None: no destination will run), ``remaining_bytes`` what was left to send."""
        if self._pass_sent:  # the pass under way, as a forced switchover reports it
            self.pass_bytes.append(self._pass_sent)
            self._pass_sent = 0
        self.phase = "cancelling"
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
