"""Periodic incremental checkpointing, steppable (the seed patch's other use of the ring).

Dirty logging is on for the whole run. The base image (all of RAM) is written live to storage at
``checkpoint.storage_mbps``; the first checkpoint is taken as soon as it is written (the base
image, written while the guest runs, is not consistent by itself), then one every
``checkpoint.period_s`` (from the previous one's start):

- stop-the-world (default): stop the VM (vCPUs kicked out and parked; arm64 saves the vGIC
  tables), final sync (with the backup bitmap on arm64), write every page dirtied since the last
  checkpoint and the device state, verify the image (its page versions equal the source's),
  resume. The pause is the checkpoint's downtime.
- live (``stop_the_world: false``): sync and write the dirty set while the guest runs, then the
  same pause for what was dirtied meanwhile.

A checkpoint that ends after the next one was due counts as an overrun (the next one starts at
once, for the latest due time it outlasted); the earlier due times it outlasted are missed slots
(``checkpoint_slots_missed``: checkpoints of the schedule never taken), as are those it outlasted
before the horizon when it ends past it. The run ends at ``checkpoint.horizon_s``; what is under
way then (the base image, a checkpoint) is finished first. A run that took no checkpoint verified
nothing (``verified`` None) and did not keep its schedule (``converged`` False). ``lost_writes`` and ``verified`` are
the worst checkpoint's so far from the first checkpoint on (a stepped run, or an episode
truncated before the horizon, reports a loss when it happens). Throttles: none, or dirty-limit
(a fixed per-vCPU quota; it engages by the migration's trigger rule: checked at a sync at least
1 s after the rate period began, the period's dirtied bytes above the threshold share of the
bytes written, in two periods in a row. The first period holds the base image's writes, so with
a 2 s period it engages from the third checkpoint's sync on; with periods under 1 s a rate period
spans several checkpoints and it may not engage at all: 256 MiB of memcached checkpointed every
0.5 s did not in 6 checkpoints); auto-converge, which would step up at every trigger, is refused.
``pass_bytes``: the base image, then one entry per checkpoint. ``remaining_bytes``: what the
next checkpoint would write if taken now (every page dirtied since the last one and not yet
saved, each once), not only the migration bitmap's pages: between checkpoints those wait in the
rings, the slot bitmap or the kernel's dirty bitmap.
"""

from __future__ import annotations

from ..config import check_run_kind
from .metrics import Metrics
from .session import NS, Session


class CheckpointRun(Session):
    """Checkpoints of a scenario for its horizon: ``advance(until_ns)`` / ``run()``, ``metrics()``."""

    kind = "checkpoint"
    tracks_unsaved = True
    trigger_on_last_stage = True  # a stop-the-world checkpoint's only sync is a last-stage one
    measures_paused = True  # the pause's writes measure the storage rate

    def __init__(self, scenario=None, *, seed=None, **overrides):
        self.pauses: list[int] = []
        self.checkpoint_lost: list[int] = []
        self.overruns = 0
        self.slots_missed = 0
        super().__init__(scenario, seed=seed, **overrides)
        self.rate_Bps = self.final_rate_Bps = self.cfg.checkpoint.storage_mbps * 1e6

    @staticmethod
    def _check_config(cfg) -> None:
        """Whatever the scenario's ``kind``: no auto-converge, no migrate_cancel when checkpointing."""
        check_run_kind(cfg, "checkpoint")

    def _main(self):
        ck = self.cfg.checkpoint
        loop, dirty = self.loop, self.dirty
        horizon = int(ck.horizon_s * NS)
        period = int(ck.period_s * NS)

        yield from self.setup_logging()

        self.phase = "base"  # the base image, written live
        while dirty.mig_count:
            yield from self.send_slice(self.rate_Bps)
        self.end_pass()  # pass_bytes[0]: the base image
        next_due = loop.now
        while True:
            if loop.now < next_due:
                self.phase = "wait"
                yield min(next_due, horizon) - loop.now
            if loop.now >= horizon:
                break
            t0 = loop.now
            yield from self._checkpoint(ck.stop_the_world)
            next_due = t0 + period
            if loop.now > next_due and next_due < horizon:  # (none is due after the horizon)
                self.overruns += 1
                # the due times t0 + k * period (k >= 1) this one outlasted, before the horizon; the
                # next one, started now, takes the latest of them unless the run is over
                outlasted = min((loop.now - t0) // period, (horizon - t0 - 1) // period)
                self.slots_missed += outlasted - (loop.now < horizon)
                next_due = loop.now
        self.lost_writes = max(self.checkpoint_lost, default=0)
        self.verified = all(x == 0 for x in self.checkpoint_lost) if self.checkpoint_lost else None
        self.finish()

    def _checkpoint(self, stop_the_world: bool):
        loop, dirty = self.loop, self.dirty
        # the bandwidth is measured while a checkpoint writes (as a migration's from its set-up),
        # not across the wait since the last one
        self.start_bandwidth_window()
        if not stop_the_world:
            self.phase = "live"
            yield from self.sync()
            while dirty.mig_count:
                yield from self.send_slice(self.rate_Bps)
        self.phase = "paused"
        t_pause = self.paused_at = loop.now
        yield from self.pause_vm()
        yield self.bql
        yield from self.final_copy()
        lost = self.verify()
        self.checkpoint_lost.append(lost)
        # reported at once (the worst checkpoint so far), not only when the run ends
        self.lost_writes = max(self.lost_writes, lost)
        self.verified = self.lost_writes == 0
        self.bql.release()
        self.resume_vm()
        self.paused_at = None
        self.pauses.append(loop.now - t_pause)
        self.end_pass()

    def _remaining_pages(self) -> int:
        """Every page dirtied since the last checkpoint and not yet saved: what the next one
        would write if taken now, wherever it waits (migration bitmap, slot bitmap, a ring, the
        kernel's dirty bitmap), each page once (see the collectors' ``unsaved_pages``)."""
        return self.collector.unsaved_pages()

    def metrics(self) -> Metrics:
        on_schedule = self.overruns == 0 and (bool(self.pauses) or not self.finished)
        d = self._base_metrics(max(self.pauses, default=0) / NS,
                               (self.end_ns if self.finished else self.loop.now) / NS, on_schedule)
        d["checkpoints"] = len(self.pauses)
        d["pause_total_s"] = sum(self.pauses) / NS
        d["checkpoint_overruns"] = self.overruns
        d["checkpoint_slots_missed"] = self.slots_missed
        return Metrics.from_fields(d)
