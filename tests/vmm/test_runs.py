"""End-to-end VMM runs: every scenario verifies (small variants), stepping is exact, runs are
seeded, losses are reported, the documented metrics are there, memory stays in budget."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ringenv.config import ConfigError, load_host_profile, load_scenario, scenario_names
from ringenv.vmm import CheckpointRun, Metrics, MigrationRun, make_run
from ringenv.vmm.reap import RingReader

from ._helpers import small

MS = 1_000_000
S = 1_000_000_000
ISSUE_FIELDS = ["downtime_s", "total_s", "converged", "iterations", "bytes_sent", "pages_sent", "pages_resent",
                "full_exits", "vcpu_exit_s", "vcpu_stall_s", "vmm_cpu_s", "harvests", "resets",
                "entries_harvested", "tlb_flushes", "ring_bytes", "lost_writes", "verified"]


@pytest.mark.parametrize("collector", ["ring", "bitmap"])
@pytest.mark.parametrize("name", scenario_names())
def test_every_scenario_verifies_small(name, collector):
    """Correct configurations never lose a write: the destination (or checkpoint image) holds
    every page's current version at the end."""
    cfg = small(name, memory=(512 << 20), collector=collector, link={"give_up_s": 60})
    m = make_run(cfg).run()
    assert m.done and m.verified is True and m.lost_writes == 0, m
    assert m.ring_overflows == 0 and m.wedged_vcpus == 0
    assert m.pages_sent >= cfg.vm.memory // cfg.profile.page_size
    if cfg.kind == "checkpoint":
        assert m.checkpoints >= 2
    elif name != "analytics":
        assert m.converged


@pytest.mark.parametrize("stw", [True, False])
@pytest.mark.parametrize("collector", ["ring", "bitmap"])
def test_checkpoints_verify_and_pause(collector, stw):
    cfg = small("checkpoint", collector=collector, checkpoint={"stop_the_world": stw, "horizon_s": 20, "period_s": 4})
    r = CheckpointRun(cfg)
    m = r.run()
    # the base image is written live first (1 GiB at 250 MB/s), then one checkpoint every 4 s
    base_s = cfg.vm.memory / (cfg.checkpoint.storage_mbps * 1e6)
    assert m.verified and m.checkpoints == int((20 - base_s) // 4) + 1 and m.checkpoint_overruns == 0
    assert 0 < m.downtime_s <= m.pause_total_s and m.total_s == 20
    assert len(r.checkpoint_lost) == m.checkpoints and not any(r.checkpoint_lost)


def test_live_checkpoints_pause_less_than_stop_the_world():
    a = CheckpointRun(small("checkpoint", checkpoint={"stop_the_world": True})).run()
    b = CheckpointRun(small("checkpoint", checkpoint={"stop_the_world": False})).run()
    assert b.downtime_s < a.downtime_s and b.verified and a.verified


def _steps(run, step_ns, until=None):
    t = 0
    while not run.done and (until is None or t < until):
        t += step_ns
        run.advance(t if until is None else min(t, until))
        run.metrics()  # reading metrics must not change anything
    return run


@pytest.mark.parametrize("Run, name", [(MigrationRun, "default"), (CheckpointRun, "checkpoint")])
def test_small_steps_are_bit_identical_to_one_big_advance(Run, name):
    cfg = small(name, ring_entries=512, interval_ms=300)
    big = Run(cfg).run().to_dict()
    stepped = _steps(Run(cfg), 37 * MS + 123).metrics().to_dict()
    assert stepped == big


def test_harvest_interval_changes_between_steps_are_deterministic():
    cfg = small("default", ring_entries=256)

    def episode(step):
        r = MigrationRun(cfg)
        _steps(r, step, until=1 * S)
        r.set_harvest_interval(20 * MS)
        _steps(r, step, until=2 * S)
        r.set_harvest_interval(2000 * MS)
        r.advance(10**12)
        return r.metrics().to_dict()

    a, b = episode(100 * MS), episode(7 * MS)
    assert a == b
    base = MigrationRun(cfg).run().to_dict()
    assert base["harvests"] != a["harvests"]  # the cadence took effect
    assert a["interval_ms"] == 2000


def test_host_sync_grid_makes_steps_exact_and_stays_step_size_independent():
    cfg = small("default", ring_entries=512)
    lagging = MigrationRun(cfg)
    lagging.advance(700 * MS)
    assert lagging.vm.now < 700 * MS  # the host stops at the last VMM event
    grid = MigrationRun(cfg, host_sync_ms=100)
    grid.advance(700 * MS)
    assert grid.vm.now == 700 * MS
    a = MigrationRun(cfg, host_sync_ms=100).run().to_dict()
    b = _steps(MigrationRun(cfg, host_sync_ms=100), 100 * MS).metrics().to_dict()
    c = _steps(MigrationRun(cfg, host_sync_ms=100), 23 * MS).metrics().to_dict()
    assert a == b == c and a["verified"]


def test_seeds_matter_and_repeat():
    cfg = small("oltp")
    a, b = MigrationRun(cfg, seed=1).run(), MigrationRun(cfg, seed=1).run()
    c = MigrationRun(cfg, seed=2).run()
    assert a == b and a != c


def test_metrics_record_has_the_documented_fields_and_serialises():
    m = MigrationRun(small("web")).run()
    assert isinstance(m, Metrics)
    d = m.to_dict()
    for f in ISSUE_FIELDS + ["dirty_rate_Bps", "ring_fill", "remaining_bytes", "bandwidth_Bps", "progress"]:
        assert f in d
    json.dumps(d)
    docs = Metrics.field_docs()
    assert all(docs[f] for f in ISSUE_FIELDS), {f: docs[f] for f in ISSUE_FIELDS if not docs[f]}
    assert m.ring_bytes == 4096 * 16 * 4 and len(m.ring_fill) == 4
    assert m.progress == pytest.approx(1.0) and m.remaining_bytes == 0


def test_observations_during_a_run():
    r = MigrationRun(small("default"))
    r.advance(500 * MS)
    m = r.metrics()
    assert not m.done and m.phase == "bulk" and 0 < m.progress < 1 and m.remaining_bytes > 0
    assert m.time_s == 0.5 and m.downtime_s == 0 and m.verified is None
    r.advance(3 * S)
    m = r.metrics()
    assert m.dirty_rate_Bps > 0 and m.bandwidth_Bps > 0 and m.threshold_bytes > 0
    assert all(0 <= f <= 1 for f in m.ring_fill)


def _array_bytes(*objs) -> int:
    """Bytes of the distinct numpy buffers held as attributes of ``objs`` (views counted once)."""
    seen, total = set(), 0
    for o in objs:
        for v in vars(o).values():
            if isinstance(v, np.ndarray):
                base = v if v.base is None else v.base
                if isinstance(base, np.ndarray) and id(base) not in seen:
                    seen.add(id(base))
                    total += base.nbytes
    return total


@pytest.mark.parametrize("collector", ["ring", "bitmap"])
def test_memory_budget_per_page(collector):
    """<= 16 bytes per simulated page in all (docs/DESIGN.md): the VMM keeps at most ~8."""
    r = MigrationRun(small("default", collector=collector))
    r.advance(2 * S)  # bitmaps allocated and in use
    vm = r.vm
    kernel = _array_bytes(vm, r.guest, *vm.slots)
    vmm = _array_bytes(r.dirty, r.collector)
    assert vmm / r.npages <= 8, vmm / r.npages
    assert (kernel + vmm) / r.npages <= 16, (kernel / r.npages, vmm / r.npages)


def test_ring_overflow_with_splitting_off_loses_writes():
    """kvm-dirty-ring.md s7: without block splitting one write to a 2 MiB block pushes 512
    entries, the ring overflows between two entry checks and dirty pages are lost."""
    prof = load_host_profile("arm64-4k").model_copy(update={"split_blocks": False})
    m = MigrationRun(small("oltp", host=prof, vm={"block_fraction": 0.5, "vcpus": 4})).run()
    assert m.ring_overflows > 0 and m.lost_writes > 0 and m.verified is False


def test_arm64_without_with_bitmap_loses_writes():
    """kvm-dirty-ring.md s11: without WITH_BITMAP a ring-only arm64 slot is not logging (blocks
    stay, one entry per block) and the vGIC tables saved at stop are logged nowhere."""
    m = MigrationRun(small("web", vm={"with_bitmap": False})).run()
    assert m.lost_writes > 0 and m.verified is False
    ok = MigrationRun(small("web")).run()
    assert ok.verified and ok.lost_writes == 0


def test_full_exits_wait_for_the_big_lock_and_the_wait_is_a_stall():
    """A ring-full exit is handled on the vCPU thread under the big QEMU lock: while another
    thread holds it the vCPU stays out of the guest (a stall, accounted per vCPU)."""
    cfg = load_scenario("ring-vs-bitmap", host="arm64-4k", vm={"memory": "2GiB"}, link={"gbps": 1},
                        ring_entries=256, interval_ms=1000)
    r = MigrationRun(cfg, host_sync_ms=100)
    r.advance(500 * MS)
    m0 = r.metrics()
    assert r.vm.now == 500 * MS  # on the host-sync grid
    assert m0.full_exits > 20 and m0.vcpu_stall_s == 0  # exits, but nobody else wanted the lock

    def hog():  # another thread holds the BQL for 50 ms (e.g. a slow device model)
        yield r.bql
        yield 50 * MS
        r.bql.release()

    r.spawn(hog(), r.PRIO_MAIN, "hog")
    r.advance(700 * MS)
    m = r.metrics()
    assert m.vcpu_stall_s > 8 * 0.02  # every vCPU filled its ring and waited most of the 50 ms
    assert max(m.vcpu_stall_s_per_vcpu) <= 0.05 + 1e-9
    assert sum(m.vcpu_stall_s_per_vcpu) == pytest.approx(m.vcpu_stall_s)
    assert m.vcpu_exit_s > m0.vcpu_exit_s and m.resets <= m.harvests


def _run(coll: str, gib: int, rate_scale: float = 1.0):
    cfg = load_scenario("web", vm={"memory": f"{gib}GiB"}, collector=coll, link={"gbps": 10 * gib},
                        rate_scale=rate_scale)
    r = MigrationRun(cfg)
    return r, r.run()


def test_bitmap_sync_cost_grows_with_memory_ring_cost_with_dirty_pages():
    """kvm-dirty-ring.md s8: the bitmap's cost grows with memory size, the ring's with dirty pages."""
    def syncs(r):  # mean dirty sync before the last stage (arm64's last one reads the backup bitmap)
        return float(np.mean(r.sync_ns[:-1]))

    (b1, _), (b4, _) = _run("bitmap", 1), _run("bitmap", 4)
    (r1, m1), (r4, _) = _run("ring", 1), _run("ring", 4)
    assert syncs(b4) > 3.5 * syncs(b1)
    assert syncs(r4) < syncs(b4) / 10 and syncs(r1) < syncs(b1) / 3
    # the ring's collection work (reaper, syncs, ring-full exits) follows the dirty pages
    _, m20 = _run("ring", 1, rate_scale=20)
    work = [m.vmm_cpu_s + m.vcpu_exit_s for m in (m1, m20)]
    assert m20.entries_harvested > 10 * m1.entries_harvested and work[1] > 3 * work[0]


def test_give_up_forces_the_switchover_and_reports_not_converged():
    m = MigrationRun(small("analytics", vm={"vcpus": 2}, link={"give_up_s": 20})).run()
    assert not m.converged and m.total_s >= 20 and m.verified


def test_ring_reader_matches_qemus_entry_by_entry_loop():
    from ringenv.kvm.uapi import KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET, kvm_dirty_gfn

    rng = np.random.default_rng(0)
    for _ in range(200):
        size = 64
        g = np.zeros(size, dtype=kvm_dirty_gfn)
        fetch = int(rng.integers(0, 4 * size))
        n = int(rng.integers(0, size + 1))
        pos = (fetch + np.arange(n)) & (size - 1)
        g["flags"][pos] = KVM_DIRTY_GFN_F_DIRTY
        g["offset"] = rng.integers(0, 1 << 20, size)
        if rng.random() < 0.3:  # a broken ring (overflow): a hole somewhere
            g["flags"][int(rng.integers(size))] = rng.choice([0, KVM_DIRTY_GFN_F_DIRTY | KVM_DIRTY_GFN_F_RESET])
        g2 = g.copy()
        a = RingReader(g)
        a.fetch = fetch
        ready = 0
        while ready < size and g["flags"][(fetch + ready) & (size - 1)] == KVM_DIRTY_GFN_F_DIRTY:
            ready += 1
        assert a.count_ready() == ready and (g["flags"] == g2["flags"]).all()  # a peek
        limit = None if rng.random() < 0.5 else int(rng.integers(0, size))
        sa, oa = a.reap(limit)
        # reference: QEMU's loop, one entry at a time
        want = size if limit is None else min(limit, size)
        k = 0
        while k < want and g2["flags"][(fetch + k) & (size - 1)] == KVM_DIRTY_GFN_F_DIRTY:
            g2["flags"][(fetch + k) & (size - 1)] |= KVM_DIRTY_GFN_F_RESET
            k += 1
        assert len(oa) == k and a.fetch == fetch + k
        assert (oa == g2["offset"][(fetch + np.arange(k)) & (size - 1)]).all()
        assert (g["flags"] == g2["flags"]).all()


def test_reaping_every_ring_at_once_matches_each_reader():
    """The collector's one-pass reaper (reap_rings) takes, marks and counts what RingReader.reap
    takes from each ring, and sets only slot-0 offsets in the bitmap."""
    from ringenv.kvm.uapi import KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET, kvm_dirty_gfn
    from ringenv.vmm.reap import reap_rings, ring_addresses

    rng = np.random.default_rng(1)
    for _ in range(50):
        rings, fetch0 = [], []
        for _ in range(int(rng.integers(1, 5))):
            size = 1 << int(rng.integers(4, 8))
            g = np.zeros(size, dtype=kvm_dirty_gfn)
            f, n = int(rng.integers(0, 4 * size)), int(rng.integers(0, size + 1))
            pos = (f + np.arange(n)) & (size - 1)
            g["flags"][pos] = KVM_DIRTY_GFN_F_DIRTY
            g["slot"][pos] = rng.choice([0, 0, 0, 1], n)
            g["offset"] = rng.integers(0, 500, size)
            if rng.random() < 0.3:
                g["flags"][int(rng.integers(size))] = KVM_DIRTY_GFN_F_DIRTY | KVM_DIRTY_GFN_F_RESET
            rings.append(g)
            fetch0.append(f)
        copies = [g.copy() for g in rings]
        readers = [RingReader(g) for g in copies]
        expect_bm, counts_ref = np.zeros(500, dtype=bool), []
        for r, f in zip(readers, fetch0):
            r.fetch = f
            slots, offs = r.reap()
            expect_bm[offs[slots == 0]] = True
            counts_ref.append(len(offs))
        fetch = np.array(fetch0, dtype=np.int64)
        counts, bm = np.zeros(len(rings), dtype=np.int64), np.zeros(500, dtype=bool)
        marked = reap_rings(ring_addresses([RingReader(g) for g in rings]), fetch, counts, True, 0, bm)
        assert counts.tolist() == counts_ref and (fetch == np.array(fetch0) + counts).all()
        assert (bm == expect_bm).all() and marked >= bm.sum()
        assert all((a["flags"] == b["flags"]).all() for a, b in zip(rings, copies))


def test_total_s_of_a_checkpoint_run_is_its_end_as_documented():
    """A checkpoint under way at the horizon is finished: ``total_s`` is then past the horizon,
    and its documentation says so (it is not "the horizon")."""
    cfg = small("checkpoint", 512 << 20, checkpoint={"horizon_s": 11.0, "period_s": 1.0, "storage_mbps": 50},
                rate_scale=8)
    m = CheckpointRun(cfg).run()
    assert m.total_s > cfg.checkpoint.horizon_s == 11.0
    doc = Metrics.field_docs()["total_s"]
    assert "checkpoint: the horizon, s" not in doc and "finished" in doc, doc


@pytest.mark.parametrize("with_slot", [True, False])
def test_dirty_pages_keep_their_counts_for_the_checkpoint_remaining_bytes_exact(with_slot):
    """What a checkpoint run's ``remaining_bytes`` reads, kept incrementally, equals a recount
    after any sequence of the bookkeeping's operations: with the ring the pages in mig or seen
    (seen holding every page of the slot bitmap), with the bitmap mig's pages per block."""
    from ringenv.vmm.dirty import MIG_BLOCK, DirtyPages

    rng = np.random.default_rng(3)
    n = 3 * MIG_BLOCK + 77
    d = DirtyPages(n, with_slot=with_slot, track_unsaved=True)
    d.set_all()
    for _ in range(300):
        op = int(rng.integers(5))
        if op == 0:
            d.take(int(rng.integers(1, 5000)))
        elif op == 1 and with_slot:  # a few pages
            d.mark_harvested(rng.integers(0, n, 50))
        elif op == 1:
            bits = np.zeros(n, dtype=bool)
            bits[rng.integers(0, n, 50)] = True
            d.merge_bits(bits)
        elif op == 2:
            pages = d.take(200)
            d.untake(pages[100:])
        elif op == 3 and with_slot:
            d.mark_harvested(rng.integers(0, n, 300))
        elif op == 3:
            d.merge_bits(rng.random(n) < 0.02)
        elif op == 4 and with_slot:
            d.merge_slot()  # (no ring entry was looked at here: seen holds the slot's pages only)
        if with_slot:
            seen = np.unpackbits(d.seen.view(np.uint8), bitorder="little")[:n].astype(bool)
            assert d.unsaved == np.count_nonzero(d.mig | seen) and not np.any(d.slot & ~seen)
        else:
            assert d.mig_blocks.tolist() == [int(d.mig[b: b + MIG_BLOCK].sum()) for b in range(0, n, MIG_BLOCK)]


@pytest.mark.parametrize("with_bitmap, lost", [(True, False), (False, True)])
def test_a_checkpoint_run_reports_each_checkpoint_s_verification_when_it_happens(with_bitmap, lost):
    """A checkpoint verifies its image at its pause: from the first checkpoint on, the metrics of
    a run stepped (or an env episode truncated) before the horizon say so (the worst checkpoint
    so far), not only at the end. arm64 without WITH_BITMAP really loses writes."""
    run = CheckpointRun(small("checkpoint", vm={"with_bitmap": with_bitmap}))
    t = 0
    while not run.pauses:
        assert run.metrics().verified is None
        t += 100 * MS
        run.advance(t)
    m = run.metrics()
    assert not run.done and m.checkpoints == 1
    assert m.verified is (not lost) and (m.lost_writes > 0) is lost
    assert m.lost_writes == run.checkpoint_lost[0]
    run.close()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0, 0.5, -1.0, True, "5", 1e15 + 1, 2**70])
def test_a_bad_harvest_interval_is_a_config_error_naming_it(bad):
    """NaN used to fail with numpy's 'cannot convert float NaN to integer'; 1e30 or 2**70 ns was
    taken (a reaper asleep for 3e13 years), where the scenario's interval_ms stops at 1e6 s."""
    r = MigrationRun(small("idle"))
    before = r.harvest_interval_ns
    with pytest.raises(ConfigError, match=r"harvest interval: .* accepted: a positive, finite number of ns from 1 "
                                          r"to 1e15 \(1e6 s"):
        r.set_harvest_interval(bad)
    assert r.harvest_interval_ns == before


def test_the_harvest_interval_bounds_are_accepted():
    r = MigrationRun(small("idle"))
    for ns, kept in ((1, 1), (1.9, 1), (10**15, 10**15), (1e15, 10**15)):
        r.set_harvest_interval(ns)
        assert r.harvest_interval_ns == kept


def test_the_bitmap_dirty_rate_is_qemus_rate_period_not_the_last_two_syncs():
    """migration_bitmap_sync updates dirty-pages-rate (migration_update_rates) only when more
    than 1000 ms passed since the rate period began; a sync sooner adds its pages to the period.
    The stop-and-copy's sync comes a few ms after the last one and used to report its few new
    pages (mostly the vGIC tables written at the stop) over those ms: 1491 MB/s for a guest
    dirtying ~15 MB/s."""
    from ringenv.config import scale_scenario

    r = MigrationRun(scale_scenario("default", "1GiB"), collector="bitmap", seed=0)
    records = []
    while not r.done:
        r.advance(r.now_ns + 100 * MS)
        m = r.metrics()
        records.append((m.phase, m.time_s, m.dirty_rate_Bps, r.throttle.trigger.period_start))
    first_close = next(i for i, x in enumerate(records) if x[2] > 0)
    assert records[first_close][1] > 1.0  # 0 until a sync closes a period of more than 1 s
    before_stop = [x for x in records if x[0] != "stop-copy"][-1]
    assert records[-1][2] == before_stop[2] and 5e6 < records[-1][2] < 30e6  # the guest dirties ~15 MB/s
    # the rate is the last closed period's pages over its length (QEMU's integer ms arithmetic)
    assert records[-1][2] == r.throttle.trigger.dirty_pages_rate * r.page_size


def test_the_bitmap_collector_leaves_ring_entries_and_interval_ms_unused():
    """ScenarioConfig: with collector bitmap no ring is enabled (KVM_CAP_DIRTY_LOG_RING is never
    called), so ring_entries is not checked against the host's ring sizes, and the metrics
    report 0 entries, 0 ring bytes and interval 0 whatever the scenario set."""
    cfg = load_scenario("default", collector="bitmap", ring_entries=1000, interval_ms=5,
                        vm={"memory": "64MiB"}, link={"give_up_s": 0.2})
    run = MigrationRun(cfg, seed=1)
    run.advance(run.now_ns + 50_000_000)
    m = run.metrics()
    assert (run.vm.ring_entries, m.ring_entries, m.ring_bytes, m.interval_ms) == (0, 0, 0, 0.0)
    assert m.get_dirty_log_calls > 0 and run.vm.vcpus[0].ring is None
    with pytest.raises(ConfigError, match="ring_entries: 1000 is not accepted by host"):
        load_scenario("default", collector="ring", ring_entries=1000)
