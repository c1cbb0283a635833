"""QEMU's rules that the VMM follows beyond the main loop (docs/reference/migration.md s2,
kvm-dirty-ring.md s9), and metrics that must move as the simulated time passes: each test is a
case QEMU's code settles (migration_completion, kvm_dirty_ring_reaper_thread, run_on_cpu)."""

from __future__ import annotations

import numpy as np
import pytest

from ringenv.config import load_scenario
from ringenv.vmm import CheckpointRun, MigrationRun
from ringenv.vmm.session import DLSLEEP, SLEEP

from ._helpers import small

MS = 1_000_000
NS = 1_000_000_000


def _step(run, step_ns, each=None):
    """Advance ``run`` to its end in steps of ``step_ns``, calling ``each(run)`` after every step."""
    t = 0
    while not run.done:
        t += step_ns
        run.advance(t)
        if each is not None:
            each(run)
    return run.metrics()


def test_stop_and_copy_is_not_rate_limited_by_max_bandwidth():
    """migration_completion disables the rate limit before the final save: the last pass and the
    device state go at the link's rate, not at max-bandwidth's."""
    cfg = small("web", 512 << 20, link={"max_bandwidth_mibps": 32})
    assert cfg.link.rate_Bps < 0.5 * cfg.link.link_Bps
    m = MigrationRun(cfg).run()
    assert m.verified
    at_link = m.pass_bytes[-1] / cfg.link.link_Bps
    assert at_link <= m.downtime_s < at_link * 1.15 + 0.005, (m.downtime_s, at_link)


def test_progress_never_goes_down():
    """``progress`` is the share of RAM sent at least once: a slice in flight that re-sends pages
    must not take back pages that were sent before."""
    seen = []
    m = _step(MigrationRun(small("default")), 20 * MS, lambda r: seen.append(r.metrics().progress))
    assert m.verified and m.passes >= 2 and m.pages_resent > 0
    assert all(b >= a for a, b in zip(seen, seen[1:])), [(a, b) for a, b in zip(seen, seen[1:]) if b < a][:3]
    assert seen[-1] == 1.0


def test_throttle_sleeps_count_as_they_pass():
    """An interval's cost is the difference of two records: a dirty-limit sleep of seconds counts
    as it passes, so no step shows more throttled time than its vCPUs had (the host synchronised
    with the steps, as the environment runs it)."""
    cfg = small("analytics", vm={"vcpus": 2}, throttle="dirty-limit", link={"give_up_s": 40})
    prev, worst = [0.0, 0.0], []

    def check(r):
        m = r.metrics()
        dt = (m.time_s - prev[0]) * 2
        if m.vcpu_throttle_s - prev[1] > dt + 1e-9:
            worst.append((m.time_s, m.vcpu_throttle_s - prev[1], dt))
        prev[:] = [m.time_s, m.vcpu_throttle_s]

    m = _step(MigrationRun(cfg, host_sync_ms=100), 100 * MS, check)
    assert m.vcpu_throttle_s > 1.0 and not worst, worst[:3]


def test_the_reaper_sleeps_while_dirty_limit_is_in_service():
    """kvm_dirty_ring_reaper_thread keeps sleeping while dirtylimit_in_service(): the ring-full
    exits then do all the reaping, per vCPU."""
    cfg = small("analytics", vm={"vcpus": 2}, throttle="dirty-limit", link={"give_up_s": 40})
    state = {}

    def note(r):
        if "runs" not in state and r.throttle.in_service:
            state["runs"], state["exits"] = r.reaper_runs, r.metrics().full_exits

    run = MigrationRun(cfg)
    m = _step(run, 50 * MS, note)
    assert "runs" in state and m.full_exits > state["exits"]  # the exits went on reaping
    assert run.reaper_runs <= state["runs"] + 1  # (one may have been waiting for the lock)


@pytest.mark.parametrize("throttle, states", [("dirty-limit", (DLSLEEP,)), ("auto-converge", (SLEEP,))])
def test_a_sync_waits_for_every_vcpu_thread_to_come_back(throttle, states):
    """kvm_dirty_ring_flush kicks every vCPU with a synchronous run_on_cpu: a vCPU thread asleep
    in a throttle sleep does the work when it wakes, so the sync lasts at least until then."""
    cfg = small("analytics", vm={"vcpus": 2}, throttle=throttle, link={"give_up_s": 40})
    snaps, syncs = [], []

    def note(r):
        sleeping = [r.vproc[i].pending[0] for i in range(2) if r.vstate[i] in states and r.vproc[i].pending]
        snaps.append((r.loop.now, sleeping))
        if len(r.sync_ns) > len(syncs):
            syncs.append((r._last_sync_ns - r.sync_ns[-1], r._last_sync_ns))

    _step(MigrationRun(cfg), 1 * MS, note)
    checked = 0
    for start, end in syncs[1:]:  # (the set-up sync comes before any throttle)
        for t, wakes in snaps:
            if t <= start:
                for w in wakes:
                    if w > start:
                        checked += 1
                        assert w <= end, (start / NS, end / NS, w / NS)
    assert checked > 0


def test_a_checkpoint_run_that_takes_none_is_not_verified_nor_on_schedule():
    """The base image alone outlasts the horizon: no checkpoint was taken, so nothing was verified
    and the schedule was not kept."""
    cfg = small("checkpoint", 512 << 20, checkpoint={"horizon_s": 12, "period_s": 4, "storage_mbps": 5})
    m = CheckpointRun(cfg).run()
    assert m.checkpoints == 0 and m.verified is None and m.converged is False and m.lost_writes == 0


def test_a_period_longer_than_the_horizon_takes_one_checkpoint_once_the_base_image_is_written():
    """The first checkpoint is due as soon as the base image is written (a live-written base
    image is not consistent by itself), so a period beyond the horizon still takes that one, and
    none after it; the config is valid (it was once refused as taking none)."""
    cfg = small("checkpoint", 64 << 20, checkpoint={"horizon_s": 5, "period_s": 30, "storage_mbps": 100})
    run = CheckpointRun(cfg)
    starts = []
    take = run._checkpoint

    def spy(stop_the_world):
        starts.append((run.loop.now, run.pass_bytes[:]))
        return take(stop_the_world)

    run._checkpoint = spy
    m = run.run()
    assert m.checkpoints == 1 and m.converged is True and m.verified is True and m.checkpoint_overruns == 0
    (t0, passes), = starts
    base_s = (64 << 20) // 4096 * (4096 + 8) / 100e6  # every page and its header at 100 MB/s
    assert passes == [m.pass_bytes[0]] and abs(t0 / NS - base_s) < 0.01, (t0 / NS, base_s)
    assert m.total_s == 5.0


def test_a_checkpoint_past_the_horizon_is_no_overrun():
    """The checkpoint under way at the horizon is finished; the next one would be due after the
    horizon, so none is late."""
    cfg = small("checkpoint", 512 << 20, checkpoint={"horizon_s": 11.0, "period_s": 1.0, "storage_mbps": 50},
                rate_scale=8)
    m = CheckpointRun(cfg).run()
    assert m.checkpoints == 1 and m.total_s > 11.0
    assert m.checkpoint_overruns == 0 and m.converged is True and m.verified is True


def test_remaining_bytes_keep_the_pages_taken_for_a_clear():
    """Bitmap collector: the pages the migration thread took before a KVM_CLEAR_DIRTY_LOG are
    still to send while the CLEAR runs: sent + remaining moves only at syncs (GET_DIRTY_LOG)."""
    bad = []
    prev = {}

    def check(r):
        m = r.metrics()
        if prev and m.harvests == prev["h"] and m.phase == prev["phase"] and m.phase in ("bulk", "iterate"):
            a = prev["sent"] + prev["rem"] // r.page_size
            b = m.pages_sent + m.remaining_bytes // r.page_size
            if a != b:
                bad.append((m.time_s, b - a))
        prev.update(h=m.harvests, phase=m.phase, sent=m.pages_sent, rem=m.remaining_bytes)

    m = _step(MigrationRun(small("web", 2 << 30, collector="bitmap")), 1 * MS, check)
    assert m.verified and m.clear_dirty_log_calls > 0 and not bad, bad[:3]


def test_the_dirty_rate_window_is_at_least_a_second_at_any_interval():
    """calc-dirty-rate's estimate spans >= 1 s of harvests even with a 10 ms reaper (100 reaps a
    second)."""
    run = MigrationRun(small("default", interval_ms=10, ring_entries=1024))
    for t in (3000, 5000):
        run.advance(t * MS)
        oldest = run._samples[0][0]
        assert run.vm.now - oldest >= NS, (t, (run.vm.now - oldest) / NS)
        assert run.vm.now - run._samples[1][0] < NS  # and no older sample than that one is kept


def test_pages_resent_go_on_the_wire_with_the_pages_sent():
    """A send slice's pages leave pro rata over the slice, its re-sent pages with them: no step
    shows more pages re-sent than sent, neither count goes down, and re-sent <= sent always."""
    bad, prev = [], {}

    def check(r):
        m = r.metrics()
        if m.pages_resent > m.pages_sent:
            bad.append(("resent > sent", m.time_s, m.pages_resent, m.pages_sent))
        if prev:
            ds, dr = m.pages_sent - prev["sent"], m.pages_resent - prev["resent"]
            if dr > ds or dr < 0 or ds < 0:
                bad.append((m.time_s, m.phase, ds, dr))
        prev.update(sent=m.pages_sent, resent=m.pages_resent)

    m = _step(MigrationRun(small("default"), host_sync_ms=100), 100 * MS, check)
    assert m.verified and m.pages_resent > 0 and not bad, bad[:3]


@pytest.mark.parametrize("host", ["arm64-4k", "arm64-16k", "arm64-64k"])
def test_the_vgic_tables_take_the_same_bytes_on_every_granule(host):
    """The ITS tables and the LPI pending tables are (16 + 16 x vCPUs) 4 KiB pages' worth of
    guest RAM whatever the granule: the page count shrinks as the pages grow."""
    nv = 8
    run = MigrationRun(small("web", 1 << 30, host=host, collector="bitmap", vm={"vcpus": nv}))
    want = (16 + 16 * nv) * 4096
    assert len(run.vgic_gfns) == -(-want // run.page_size)
    assert want <= len(run.vgic_gfns) * run.page_size < want + run.page_size
    run.close()


def test_the_dirty_limit_measurement_waits_for_vcpus_asleep_in_the_throttle():
    """vcpu_calculate_dirtyrate ends with global_dirty_log_sync: kvm_dirty_ring_flush kicks every
    vCPU with a synchronous run_on_cpu, so a vCPU thread asleep in its dirty-limit sleep when the
    measurement period ends is back before the rings are flushed."""
    import sys

    cfg = small("analytics", vm={"vcpus": 2}, throttle="dirty-limit", link={"give_up_s": 40})
    run = MigrationRun(cfg)
    col, flush = run.collector, run.collector.flush
    flushes, snaps = [], []

    def traced_flush():
        caller = sys._getframe(1).f_code.co_name
        ns = flush()
        if caller == "_stat_thread":
            flushes.append((run.loop.now, ns))
        return ns

    col.flush = traced_flush

    def note(r):
        snaps.append((r.now_ns, [r.vproc[i].pending[0] for i in range(2)
                                   if r.vstate[i] == DLSLEEP and r.vproc[i].pending]))

    _step(run, 1 * MS, note)
    period = int(run.throttle.cfg.period_ms * MS)
    checked = 0
    for (f0, ns0), (f, _) in zip(flushes, flushes[1:]):
        end = f0 + ns0 + period  # the measurement period ends: the flush may start
        for t, wakes in snaps:
            if end - MS < t <= end:
                for w in wakes:
                    if w > end:
                        checked += 1
                        assert w <= f, (end / NS, f / NS, w / NS)
    assert checked > 0


def _unsaved_pages(r):
    """Brute force: the pages a checkpoint taken now would write: dirty in the migration bitmap,
    harvested into the slot bitmap, waiting in a ring, logged in a PML buffer (x86) or (bitmap
    collector) in the kernel's bitmap; each page once; plus the pages of the slice on the wire. Returns
    (that count, the pages whose saved copy is stale, the pages counted)."""
    from ringenv.kvm.memory import bitmap_offsets

    d = r.dirty
    pend = d.mig.copy()
    if d.slot is not None:
        pend |= d.slot
    base = next(s.base_gfn for s in r.vm.slots if s.id == 0 and s.as_id == 0)
    for v in r.vcpus:  # x86 PML: gfns logged in the vCPU's buffer, not yet in its ring or the bitmap
        if v.pml is not None:
            pend[v.pml[: v.pml_count] - base] = True
    if r.collector.kind == "ring":
        for rd in r.collector.readers:
            idx = (rd.fetch + np.arange(rd.count_ready())) & (rd.size - 1)
            e = rd.gfns[idx]
            pend[e["offset"][e["slot"] == 0].astype(np.int64)] = True
    else:
        slot = next(s for s in r.vm.slots if s.id == 0 and s.as_id == 0)
        pend[bitmap_offsets(slot.dirty_bitmap, r.npages)] = True
    stale = d.dest != (r.source_version() + np.uint32(1))
    return int(np.count_nonzero(pend)) + r._in_flight(r.now_ns)[0] + r._taken, stale, pend


def _overflowing():
    from ringenv.config import load_host_profile

    return {"host": load_host_profile("arm64-4k").model_copy(update={"split_blocks": False}),
            "workload": "oltp", "vm": {"block_fraction": 0.5, "vcpus": 4}}


@pytest.mark.parametrize("collector, overrides", [
    ("ring", {}), ("bitmap", {}),
    ("ring", {"checkpoint": {"stop_the_world": False}}), ("bitmap", {"checkpoint": {"stop_the_world": False}}),
    ("ring", {"host": "arm64-16k", "ring_entries": 1024}),
    ("ring", {"host": "x86-pml"}), ("bitmap", {"host": "x86-pml"}),
    ("ring", {"workload": "memcached", "ring_entries": 256, "interval_ms": 10}),
    ("ring", {"workload": "analytics", "throttle": "dirty-limit"}),
    ("ring", "overflow"),
], ids=["ring", "bitmap", "ring-live", "bitmap-live", "16k", "x86-pml", "x86-pml-bitmap", "small-ring",
        "dirty-limit", "overflow"])
def test_a_checkpoint_runs_remaining_bytes_are_every_page_not_yet_saved(collector, overrides):
    """Checkpointing: ``remaining_bytes`` is what the next checkpoint would write if taken now:
    the pages dirtied since the last one and not yet saved, wherever they wait (migration bitmap,
    slot bitmap, rings, the kernel's bitmap), each once. Every page whose image copy is stale is
    among them (not with an overflowed ring, which loses writes); between checkpoints it grows
    from about 0."""
    overflow = overrides == "overflow"
    overrides = _overflowing() if overflow else overrides
    ck = {"horizon_s": 8.0, "period_s": 2.0, **overrides.pop("checkpoint", {})}
    overrides = {"ring_entries": 4096, "interval_ms": 200, **overrides}
    cfg = small("checkpoint", 512 << 20, collector=collector, checkpoint=ck, **overrides)
    bad, waits = [], []

    def check(r):
        m = r.metrics()
        n, stale, pend = _unsaved_pages(r)
        if m.remaining_bytes != n * r.page_size:
            bad.append((m.time_s, m.phase, m.remaining_bytes // r.page_size, n))
        if m.phase == "wait":
            waits.append(m.remaining_bytes)
            lost = np.count_nonzero(stale & ~pend)
            if lost and not overflow:
                bad.append(("stale page not counted", m.time_s, lost))

    m = _step(CheckpointRun(cfg, host_sync_ms=50), 50 * MS, check)
    assert m.verified is not overflow and m.checkpoints >= 2 and not bad, bad[:3]
    assert (m.ring_overflows > 0) is overflow and (max(waits) > 0 or overflow)  # (wedged vCPUs write nothing)


@pytest.mark.parametrize("mibps", [0.01, 0.0001])
def test_a_max_bandwidth_below_a_page_per_window_still_sends_one_and_gives_up_on_time(mibps):
    """QEMU's rate limiter (migration_rate_exceeded; the budget, max-bandwidth / 10, reset every
    BUFFER_DELAY = 100 ms with no debt carried over) lets at least one page through per window:
    at 10 KiB/s or 100 B/s the bulk stage still sends 10 pages a second. The forced switchover
    comes at give_up_s (not after a slice of many seconds), then the stop-and-copy, verified."""
    run = MigrationRun(small("idle", 64 << 20, link={"max_bandwidth_mibps": mibps, "give_up_s": 3}))
    run.advance(1 * NS)
    a = run.metrics().pages_sent
    run.advance(2 * NS)
    assert run.metrics().pages_sent - a == 10
    m = run.run()
    assert not m.converged and m.verified
    assert 3.0 <= m.total_s - m.downtime_s <= 3.1


def test_dirty_limit_measures_and_compares_whole_mib_per_second():
    """system/dirtylimit.c works in integers: do_calculate_dirtyrate converts pages x 1000 down
    to whole MiB, then divides by the period in ms; dirtylimit_done compares those uint64 MiB/s
    with the quota. 6758 4 KiB pages in 1000 ms are 26.4 MiB/s: read as 26, |26 - 1| <= 25, so a
    1 MiB/s quota leaves the sleep alone (a float rate would add a 14.5 s sleep); 6912 pages
    (27 MiB/s) move it; 255 pages (< 1 MiB/s) read 0: within the band of a 1 MiB/s quota (the
    sleep stays), a zero that clears the sleep only for a quota above 25 MiB/s."""
    from ringenv.vmm.throttle import DirtyLimit

    run = MigrationRun(small("analytics", vm={"vcpus": 2}, throttle="dirty-limit"))
    dl = run.throttle
    assert isinstance(dl, DirtyLimit) and dl.quota == 1
    rates = dl.rates(np.array([6758, 6912, 255, 0]), 1000)
    assert rates.tolist() == [26, 27, 0, 0]
    assert dl.rates(np.array([6758]), 999).tolist() == [26]  # 26425 // 999
    dl._adjust(0, dl.quota, 26)
    assert dl.throttle_us[0] == 0 and dl.max_dirtyrate == 0
    dl._adjust(0, dl.quota, 27)  # 96% off the quota: the proportional step
    full_us = (run.cfg.ring_entries * run.page_size >> 20) * 1_000_000 // 27
    assert dl.throttle_us[0] == int(full_us * 96 / 4)
    dl._adjust(0, dl.quota, 0)
    assert dl.throttle_us[0] == int(full_us * 96 / 4)
    dl._adjust(0, 100, 0)
    assert dl.throttle_us[0] == 0
    run.close()


def _sync_starts(run):
    """Record (start s, passes completed) of every migration_bitmap_sync after the set-up's."""
    starts, orig = [], run.sync

    def recorded(last_stage=False):
        starts.append((run.loop.now / NS, run.passes))
        return (yield from orig(last_stage))

    run.sync = recorded
    return starts


@pytest.mark.parametrize("collector", ["ring", "bitmap"])
def test_auto_converge_syncs_every_5_s_mid_pass_as_qemu_9_2_does(collector):
    """cpu_throttle_dirty_sync_timer (QEMU >= 9.2), armed when the migration starts: every 5 s, a
    tick that finds the dirty sync count unchanged since the previous tick, past the first pass,
    syncs. Analytics (~13.5 s bulk pass): the ticks at 5 and 10 s see only the set-up sync,
    the one at 15 s the end of the bulk pass; the one at 20 s syncs mid-pass (between two
    slices: within one 50 ms slice of the tick) and re-arms 5 s after that sync. Without the
    timer (0, QEMU before 9.2) every sync ends a pass. Both verify: the mid-pass syncs lose no
    write (with the bitmap, their CLEARs come lazily before each chunk is sent again)."""
    runs = {}
    for timer_ms in (5000.0, 0.0):
        run = MigrationRun(small("analytics", vm={"vcpus": 2}, collector=collector, throttle="auto-converge",
                                 link={"give_up_s": 120}, auto_converge={"dirty_sync_timer_ms": timer_ms}))
        starts = _sync_starts(run)
        runs[timer_ms] = (run.run(), starts)
    m, starts = runs[5000.0]
    assert m.verified and m.converged
    mid = [k for k in range(1, len(starts)) if starts[k][1] == starts[k - 1][1]]
    assert mid, starts
    assert 13 < starts[0][0] < 14 and starts[0][1] == 0  # the end of the bulk pass
    assert 20.0 <= starts[1][0] < 20.06 and starts[1][1] == 1  # the 20 s tick, mid-pass
    assert all(b - a <= 10.1 for (a, _), (b, _) in zip(starts, starts[1:]))
    m0, starts0 = runs[0.0]
    assert m0.verified and m0.converged
    assert [p for _, p in starts0] == list(range(len(starts0)))  # one sync per pass
    assert starts0[1][0] - starts0[0][0] > 8


@pytest.mark.parametrize("seed", [1, 3])
def test_a_dirty_sync_tick_that_passed_during_a_slice_is_seen_before_the_pass_end_sync(seed):
    """QEMU's timer tick runs when it is due, in the main loop, during the migration thread's
    slice; the simulator looks at the ticks between two slices: before anything else, so that
    a pass-end sync right after a slice never finds a tick behind it unprocessed (it would count
    the pass-end sync as the tick's and re-arm the timer 5 s early). Analytics at 1 GiB, seeds
    1 and 3: a slice crosses the 40 s tick just before a pass ends."""
    run = MigrationRun(small("analytics", vm={"vcpus": 2}, throttle="auto-converge", link={"give_up_s": 120},
                             seed=seed))
    th, due, checked = run.throttle, {"last": False}, []
    orig_due, orig_sync = th.sync_due, run.sync

    def recorded_due():
        due["last"] = orig_due()
        return due["last"]

    def recorded_sync(last_stage=False):
        if not due["last"] and th.next_sync_tick is not None:
            checked.append(run.loop.now)
            assert run.loop.now < th.next_sync_tick, (run.loop.now / NS, th.next_sync_tick / NS)
        due["last"] = False
        return (yield from orig_sync(last_stage))

    th.sync_due, run.sync = recorded_due, recorded_sync
    assert run.run().verified
    assert len(checked) >= 5


@pytest.mark.parametrize("gib,gbps,maxbw", [(1, 10.0, "link"), (8, 100.0, "link"), (1, 100.0, 1024),
                                            (2, 10.0, "link"), (2, 10.0, 512)])  # (the last two: > 1 s)
def test_a_short_migration_switches_over_once_the_first_bandwidth_window_sets_the_threshold(gib, gbps, maxbw):
    """migration.md s2: the threshold (bandwidth x downtime-limit) is known once the first >= 100 ms
    window is measured, and pending is checked after every ~50 ms slice (every window when rate
    limited). With RAM that goes out in under a second, QEMU stops the VM with about a
    threshold's worth still to send: the simulator sent all of it live (one batch of slices planned
    before any threshold was measured), a downtime of ~1 ms where QEMU's is ~0.26 s.

    Zero-write guest: the stop-and-copy sends what was pending at the switchover, which must be
    below the threshold and at most one slice (one window's budget when rate limited) below it."""
    sc = load_scenario(dict(name="idle0", host="arm64-4k", seed=0, collector="ring",
                            vm=dict(memory=f"{gib}GiB", vcpus=2, block_fraction=0.0),
                            workload=dict(name="w", regions=[dict(fraction=1.0, rate_mbps=0.0)]),
                            link=dict(gbps=gbps, max_bandwidth_mibps=maxbw)))
    run = MigrationRun(sc)
    m = run.run()
    assert m.verified and m.converged
    live_rate = sc.link.rate_Bps if maxbw != "link" else sc.link.link_Bps
    step = live_rate * (0.1 if maxbw != "link" else 0.05)  # a slice's bytes (a window's when rate limited)
    vgic = len(run.vgic_gfns) * run.page_wire_bytes
    at_stop = m.pass_bytes[-1] - vgic  # what was pending when the VM stopped
    assert m.threshold_bytes - 1.05 * step <= at_stop < m.threshold_bytes, (at_stop, m.threshold_bytes, step)
    assert m.downtime_s >= 0.9 * at_stop / sc.link.link_Bps
