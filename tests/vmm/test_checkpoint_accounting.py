"""Checkpointing's bookkeeping and the VMM's page records, worked by hand (a mutation run found
these unchecked): bytes per pass, overruns, the worst checkpoint so far, what a pause holds, the
units of the pause total, the schedule while the base image is written, the bitmap merge's new
pages, re-sends of pages first sent at version 0, the bookkeeping bytes and the record as data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ringenv.vmm import CheckpointRun, MigrationRun
from ringenv.vmm.dirty import DirtyPages
from ringenv.vmm.session import PAGE_HEADER_BYTES

from ._helpers import on_pause, small

MS = 1_000_000
NS = 1_000_000_000


@pytest.fixture(scope="module")
def two_checkpoints():
    cfg = small("checkpoint", checkpoint={"horizon_s": 12, "period_s": 4})
    r = CheckpointRun(cfg)
    return cfg, r, r.run()


def test_pass_bytes_are_the_base_image_then_one_entry_per_checkpoint(two_checkpoints):
    cfg, r, m = two_checkpoints
    npages = cfg.vm.memory // cfg.profile.page_size
    assert m.checkpoints >= 2
    assert m.pass_bytes[0] == npages * (cfg.profile.page_size + PAGE_HEADER_BYTES)  # all of RAM
    assert len(m.pass_bytes) == m.checkpoints + 1
    assert sum(m.pass_bytes) == m.bytes_sent


def test_a_pause_holds_the_device_state_write_and_the_total_is_in_seconds(two_checkpoints):
    cfg, r, m = two_checkpoints
    device_ns = cfg.link.device_state_bytes / (cfg.checkpoint.storage_mbps * 1e6) * NS
    assert min(r.pauses) > device_ns
    assert m.pause_total_s == pytest.approx(sum(r.pauses) / NS)
    assert m.downtime_s == max(r.pauses) / NS <= m.pause_total_s <= m.checkpoints * m.downtime_s <= m.total_s


def test_checkpoints_that_outlast_the_period_are_overruns():
    """Storage at 125 MB/s (the scenario's rate scaled down 16x): the 1 MiB device state alone
    takes 8.4 ms, more than a 5 ms period: every checkpoint but the last overruns."""
    cfg = small("checkpoint", memory=512 << 20, checkpoint={"horizon_s": 5, "period_s": 0.005})
    assert cfg.link.device_state_bytes / (cfg.checkpoint.storage_mbps * 1e6) > 0.005
    m = CheckpointRun(cfg).run()
    assert m.checkpoints >= 2 and m.checkpoint_overruns >= m.checkpoints - 1
    assert m.converged is False  # not on schedule


def _stretched(cfg, seconds: float):
    """A checkpoint run whose every checkpoint lasts ``seconds`` in all (the real one, then the VMM
    waits out the rest with the guest running), and the start of each checkpoint."""
    run = CheckpointRun(cfg)
    starts = []
    take = run._checkpoint

    def stretched(stop_the_world):
        t0 = run.loop.now
        starts.append(t0)
        yield from take(stop_the_world)
        assert run.loop.now < t0 + int(seconds * NS)
        yield t0 + int(seconds * NS) - run.loop.now

    run._checkpoint = stretched
    return run, starts


def _base_image_end() -> int:
    """When the base image of ``small("checkpoint")`` is written (the first checkpoint's start), ns."""
    run, starts = _stretched(small("checkpoint", checkpoint={"horizon_s": 60, "period_s": 60}), 1.0)
    run.run()
    return starts[0]


def test_due_times_a_checkpoint_outlasts_are_missed_slots_but_the_latest_is_taken_late():
    """Worked by hand: period 1 s, every checkpoint 3.5 s, the horizon 9.2 s after the base image
    (tb). Checkpoint 1 (tb to tb+3.5) outlasts the due times tb+1, +2, +3: the next starts at once
    for tb+3, so 2 are missed; checkpoint 2 (tb+3.5 to tb+7) likewise misses 2 of tb+4.5, +5.5,
    +6.5; checkpoint 3 (tb+7 to tb+10.5) outlasts tb+8 and tb+9, before the horizon, and ends past
    it, so no checkpoint takes either: 2 more. 3 checkpoints, 3 overruns, 6 missed."""
    tb = _base_image_end()
    cfg = small("checkpoint", checkpoint={"horizon_s": (tb + 9_200 * MS) / NS, "period_s": 1})
    run, starts = _stretched(cfg, 3.5)
    m = run.run()
    assert starts == [tb, tb + 3_500 * MS, tb + 7_000 * MS]
    assert (m.checkpoints, m.checkpoint_overruns, m.checkpoint_slots_missed) == (3, 3, 6)
    assert m.converged is False and m.verified is True


@pytest.mark.parametrize("seconds, checkpoints, overruns, missed", [(1.0, 4, 0, 0), (2.0, 2, 2, 2), (2.5, 2, 2, 2),
                                                                    (3.0, 2, 1, 2)])
def test_missed_slots_at_due_times_and_at_the_horizon(seconds, checkpoints, overruns, missed):
    """Worked by hand: period 1 s, the horizon 4 s after the base image (tb), every checkpoint
    ``seconds`` long. 1 s: each ends on the next due time, which it takes on time (tb, +1, +2, +3):
    no overrun. 2 s: the first misses tb+1 and takes tb+2 on time; the second outlasts tb+3 and
    ends on the horizon (tb+4, not due): 2 overruns, 2 missed. 2.5 s: the first misses tb+1 and
    takes tb+2 late (at tb+2.5); the second outlasts tb+3.5 and ends past the horizon: 2 overruns, 2
    missed. 3 s: the first misses tb+1 and tb+2 and takes tb+3 on time; the second's next due time,
    tb+4, is the horizon: 1 overrun, 2 missed."""
    tb = _base_image_end()
    cfg = small("checkpoint", checkpoint={"horizon_s": (tb + 4_000 * MS) / NS, "period_s": 1})
    run, starts = _stretched(cfg, seconds)
    m = run.run()
    assert starts == [tb + k * int(seconds * NS) for k in range(checkpoints)]
    assert (m.checkpoints, m.checkpoint_overruns, m.checkpoint_slots_missed) == (checkpoints, overruns, missed)


def test_lost_writes_and_verified_report_the_worst_checkpoint_so_far():
    cfg = small("checkpoint", checkpoint={"horizon_s": 20, "period_s": 4})
    r = CheckpointRun(cfg)
    losses = iter([3, 0, 2])
    r.verify = lambda: next(losses, 0)
    seen = []
    t = 0
    while not r.finished:
        t += 50 * MS
        r.advance(t)
        if r.checkpoint_lost and (not seen or seen[-1][0] != len(r.checkpoint_lost)):
            m = r.metrics()
            seen.append((len(r.checkpoint_lost), m.lost_writes, m.verified))
    assert [s[0] for s in seen] == list(range(1, len(seen) + 1)) and len(seen) >= 4
    assert all((lost, ok) == (3, False) for _, lost, ok in seen)
    m = r.metrics()
    assert (m.lost_writes, m.verified) == (3, False) and r.checkpoint_lost[:3] == [3, 0, 2]


def test_a_run_is_on_schedule_while_it_writes_the_base_image():
    r = CheckpointRun(small("checkpoint"))
    r.advance(1 * NS)
    m = r.metrics()
    assert r.phase == "base" and m.checkpoints == 0
    assert m.converged is True and m.verified is None  # nothing late, nothing verified yet


def test_merging_a_bitmap_counts_only_the_pages_new_to_the_migration_bitmap():
    d = DirtyPages(16, with_slot=False)
    bits = np.zeros(16, dtype=bool)
    bits[[1, 2]] = True
    assert d.merge_bits(bits) == 2
    bits[:] = False
    bits[[2, 3]] = True
    assert d.merge_bits(bits) == 1 and d.mig_count == 3


def test_a_page_first_sent_at_version_0_counts_as_re_sent():
    d = DirtyPages(8, with_slot=False)
    v = np.zeros(8, dtype=np.uint32)
    d.copy_run(0, 8, v)
    assert (d.pages_sent, d.pages_resent) == (8, 0)
    v[:] = 5
    d.copy_run(2, 3, v)
    assert (d.pages_sent, d.pages_resent) == (11, 3)


@pytest.mark.parametrize("collector, per_page", [("ring", 1 + 1 + 4), ("bitmap", 1 + 4)])
def test_the_vmm_s_bookkeeping_bytes_per_page(collector, per_page):
    """The migration bitmap (1 byte a page), the slot bitmap the ring's harvests go to (1 byte:
    ring only) and the destination's copy of each page's version (4 bytes)."""
    m = MigrationRun(small("web", memory=256 << 20, collector=collector)).run()
    assert m.vmm_bytes_per_page == per_page


def test_the_metrics_record_as_plain_data(two_checkpoints):
    _, _, m = two_checkpoints
    d = m.to_dict()
    assert type(d["pass_bytes"]) is list and type(d["ring_fill"]) is list
    assert json.loads(json.dumps(d)) == d


def test_a_pause_lasts_from_the_stop_to_the_resume():
    cfg = small("checkpoint", checkpoint={"horizon_s": 12, "period_s": 4})
    r = CheckpointRun(cfg)
    stops, resumes = [], []
    on_pause(r, lambda: stops.append(r.loop.now))
    resume = r.resume_vm

    def spy_resume():
        resumes.append(r.loop.now)
        resume()

    r.resume_vm = spy_resume
    r.run()
    assert r.pauses == [b - a for a, b in zip(stops, resumes)] and len(r.pauses) >= 2


def test_a_live_checkpoint_writes_the_whole_dirty_set_before_it_pauses():
    """20 MB/s of storage and 8 s between checkpoints: the live part writes for over a second
    (more than one of the VMM's sends) and must leave nothing dirty for the pause."""
    cfg = small("checkpoint", memory=256 << 20, rate_scale=0.5,
                checkpoint={"stop_the_world": False, "horizon_s": 40, "period_s": 8, "storage_mbps": 20})
    r = CheckpointRun(cfg)
    left = []
    on_pause(r, lambda: left.append(r.dirty.mig_count))
    m = r.run()
    assert m.verified and m.checkpoints >= 3
    assert min(m.pass_bytes[1:]) > 1.0 * cfg.checkpoint.storage_mbps * 1e6  # over a second's writing
    assert left == [0] * m.checkpoints


@pytest.mark.parametrize("stop_the_world", [True, False])
def test_dirty_limit_engages_in_checkpoint_runs_live_or_stop_the_world(stop_the_world):
    """A checkpoint's sync is a bitmap sync as any (QEMU's migration_bitmap_sync runs the
    throttle trigger on every sync at least 1 s after the last, the last stage's included):
    analytics dirties far more than a checkpoint writes, so the trigger fires at the second
    checkpoint's sync and dirty-limit's rate thread starts, whether the checkpoint is taken
    with the VM stopped (its only sync is a last-stage one) or live."""
    cfg = small("analytics", memory=256 << 20, vm={"vcpus": 2}, throttle="dirty-limit",
                checkpoint={"horizon_s": 12, "period_s": 2, "stop_the_world": stop_the_world,
                            "storage_mbps": 2000})
    r = CheckpointRun(cfg)
    engaged = []
    on_pause(r, lambda: engaged.append(r.throttle.in_service))
    m = r.run()
    assert m.checkpoints == 6 and m.checkpoint_overruns == 0 and m.verified
    assert engaged[0] is False and engaged[-1] is True and r.throttle.proc is not None
