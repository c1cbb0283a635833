"""The VMM's bookkeeping, worked by hand from QEMU's rules: bytes on the wire, the reaper's
cadence and CPU time, a single-ring reap, the reset only after a harvest, the kick's wait, the
bandwidth window and the throttle's syncs (a mutation run found each of these unchecked)."""

from __future__ import annotations

import math

import pytest

from ringenv.config import load_scenario
from ringenv.vmm import MigrationRun
from ringenv.vmm.session import BW_WINDOW_NS, GUEST, OUT, PAGE_HEADER_BYTES
from ringenv.vmm.throttle import Trigger

from ._helpers import on_pause, small

MS = 1_000_000


def test_a_migration_sends_every_page_with_its_header_and_the_device_state():
    cfg = small("web", memory=512 << 20)
    m = MigrationRun(cfg).run()
    assert m.done and m.converged
    assert m.bytes_sent == m.pages_sent * (cfg.profile.page_size + PAGE_HEADER_BYTES) + cfg.link.device_state_bytes


def test_the_reaper_resets_only_after_harvesting_something():
    """QEMU's kvm_dirty_ring_reap_locked issues KVM_RESET_DIRTY_RINGS only when it harvested
    entries: an idle guest's reaper wakes every interval and often finds nothing."""
    r = MigrationRun(small("idle", memory=512 << 20, interval_ms=100))
    found = []
    orig = r.collector.reap

    def spy(only=None):
        n, work = orig(only)
        found.append(n)
        return n, work

    r.collector.reap = spy
    m = r.run()
    assert m.harvests == len(found) > 20 and found.count(0) > 5
    assert m.resets == sum(n > 0 for n in found)


def _two_vcpus(interval_ms=5000):
    cfg = load_scenario("web", vm={"memory": "1GiB", "vcpus": 2}, interval_ms=interval_ms)  # (live at 300 ms)
    r = MigrationRun(cfg, host_sync_ms=50)  # the host is seen at each 50 ms
    r.advance(300 * MS)
    assert r.vm.now == 300 * MS
    return r


def test_a_single_ring_reap_harvests_that_ring_only_and_takes_no_rate_sample():
    """A ring-full exit reaps the vCPU's own ring (kvm_dirty_ring_reap_one for that cpu):
    the other ring's entries wait, and QEMU's rate sample is taken on full reaps only."""
    r = _two_vcpus()
    c = r.collector
    ready = [rd.count_ready() for rd in c.readers]
    assert min(ready) > 0
    samples = len(r._samples)
    n, work = c.reap(only=0)
    assert n == ready[0] and [rd.count_ready() for rd in c.readers] == [0, ready[1]]
    assert work == r.costs.harvest_ring_ns + n * r.costs.harvest_entry_ns  # one ring visited
    assert len(r._samples) == samples
    c.reset(n)
    n1, _ = c.reap()
    assert n1 == ready[1] and len(r._samples) == samples + 1


def test_a_flush_charges_the_vmm_the_harvest_and_the_reset():
    r = _two_vcpus()
    c, costs = r.collector, r.costs
    n = sum(rd.count_ready() for rd in c.readers)
    assert n > 0
    before = r.vmm_cpu_ns
    c.flush()
    assert r.vmm_cpu_ns - before == 2 * costs.harvest_ring_ns + n * costs.harvest_entry_ns + r.vm.last_ioctl_ns
    assert r.vm.last_ioctl_ns > costs.reset_call_ns  # the reset of n entries


def _run_on_all(r) -> list:
    """Start the flush's kick (Session.run_on_all_vcpus) as a process of its own now; the list
    gets how long it took when it is over."""
    took = []

    def proc():
        took.append((yield from r.run_on_all_vcpus()))

    r.spawn(proc(), r.PRIO_MAIN, "kick")
    return took


def test_the_kick_of_all_runs_on_each_vcpu_in_turn_one_exit_round_trip_each():
    """kvm_cpu_synchronize_kick_all: run_on_cpu on each vCPU in turn, each waiting (without the
    big lock) for that vCPU to leave the guest and run the work before the next is kicked: the
    second vCPU stays in the guest during the first one's round trip."""
    r = _two_vcpus()
    assert list(r.vstate) == [GUEST, GUEST]
    t0, rt = r.loop.now, r.costs.exit_ns
    took = _run_on_all(r)
    r.advance(t0 + rt - 1)
    assert list(r.vstate) == [OUT, GUEST] and not took
    r.advance(t0 + rt)
    assert list(r.vstate) == [GUEST, OUT]  # vCPU 0 is back as vCPU 1 is kicked
    r.advance(t0 + 2 * rt)
    assert took == [2 * rt] and list(r.vstate) == [GUEST, GUEST]
    r._on_exit(r.vcpus[0].kick())  # vCPU 0 out of the guest (an exit of its own): not kicked again
    t1 = r.loop.now
    took = _run_on_all(r)
    r.advance(t1 + rt)
    assert took == [rt]


def test_a_kicked_vcpu_enters_the_guest_again_one_exit_round_trip_later():
    """A kick (SIG_IPI, nothing queued for the vCPU): the thread is out for exactly one exit
    round trip, counted as exit time, and KVM_RUN takes it back into the guest at that moment
    (the guest's writes in between are none of its own)."""
    r = _two_vcpus()
    t0, exit0 = r.loop.now, list(r.exit_ns)
    rt = r.costs.exit_ns
    _run_on_all(r)
    r.advance(t0 + rt - 1)
    assert r.vstate[0] == OUT
    r.advance(t0 + rt)
    assert r.vstate[0] == GUEST
    r.advance(t0 + 2 * rt)
    assert list(r.vstate) == [GUEST, GUEST]
    assert [a - b for a, b in zip(r.exit_ns, exit0)] == [rt, rt]


def test_the_reaper_sleeps_its_interval_after_its_work():
    """kvm_dirty_ring_reaper_thread: reap under the lock, then sleep the interval: two reaps are
    at least interval + the first one's harvest and reset apart (exactly that when nobody else
    holds the lock)."""
    cfg = load_scenario("web", vm={"memory": "512MiB", "vcpus": 2}, interval_ms=20, link={"gbps": 1})
    r = MigrationRun(cfg)
    c = r.collector
    reaps, in_flush = [], []
    orig, orig_reset, orig_flush = c.reap, c.reset, c.flush

    def spy(only=None):
        n, work = orig(only)
        if only is None and not in_flush:  # the reaper's, not a sync's or an exit's
            reaps.append([r.loop.now, work, n])
        return n, work

    def spy_reset(n):
        ns = orig_reset(n)
        if reaps and len(reaps[-1]) == 3 and not in_flush:
            reaps[-1].append(ns)
        return ns

    def spy_flush():
        in_flush.append(1)
        try:
            return orig_flush()
        finally:
            in_flush.pop()

    c.reap, c.reset, c.flush = spy, spy_reset, spy_flush
    r.advance(2000 * MS)
    reaper = [x for x in reaps if len(x) == 4]
    gaps = [b[0] - (a[0] + a[1] + a[3]) for a, b in zip(reaper, reaper[1:])]
    assert len(gaps) > 30 and all(g >= 20 * MS for g in gaps)
    assert sum(g == 20 * MS for g in gaps) > len(gaps) / 2
    assert any(a[1] + a[3] > 0 for a in reaper)


def test_the_bandwidth_is_measured_over_windows_of_at_least_100_ms():
    """migration_update_counters: once 100 ms have passed since the window began, bandwidth =
    bytes / time and the threshold = bandwidth x downtime-limit."""
    r = _two_vcpus()
    now = r.loop.now
    r._bw_t0, r._bw_b0 = now - BW_WINDOW_NS, r.bytes_sent - 1_000_000
    r.update_bandwidth()
    assert r.bandwidth_Bps == pytest.approx(10_000_000)  # 1 MB in exactly 100 ms
    assert r.threshold_bytes == int(10_000_000 * r.cfg.link.downtime_limit_ms / 1000)
    assert r._bw_t0 == now
    r._bw_t0 = now - BW_WINDOW_NS + 1  # 1 ns short of a window: nothing measured
    r.update_bandwidth()
    assert r.bandwidth_Bps == pytest.approx(10_000_000) and r._bw_t0 == now - BW_WINDOW_NS + 1


def test_the_throttle_sees_the_iterations_syncs_not_the_last_stage_s():
    """auto-converge looks at each iteration's sync (migration_bitmap_sync ->
    migration_trigger_throttle); the last one, with the VM stopped, is not one of them."""
    cfg = small("analytics", memory=512 << 20, throttle="auto-converge")
    r = MigrationRun(cfg)
    seen = []
    orig = r.throttle.on_sync

    def spy(session, new):
        seen.append(session.paused_at)
        return orig(session, new)

    r.throttle.on_sync = spy
    m = r.run()
    assert m.converged and m.throttle_pct > 0
    assert seen and all(p is None for p in seen)  # never with the VM stopped
    # dirty_sync_count (iterations) counts the set-up's sync and the last stage's too
    assert len(seen) == m.iterations - 2


def test_the_downtime_runs_from_the_stop_to_the_end_and_holds_the_last_sync_pages_and_device_state():
    """migration_completion: the downtime is the time from vm_stop to the end of the device
    state's send: at least the last-stage sync, the pages still dirty (each with its header) and
    the device state at the link's rate; the run's total is the time before the stop plus it."""
    cfg = small("oltp", memory=512 << 20)
    r = MigrationRun(cfg)
    stops = []
    on_pause(r, lambda: stops.append(r.loop.now))
    m = r.run()
    assert m.converged and len(stops) == 1
    assert r.downtime_ns == r.total_ns - stops[0]  # the run starts at 0
    sent_in_stop = m.pass_bytes[-1]  # the stop-and-copy's pages and device state
    assert sent_in_stop >= cfg.link.device_state_bytes
    floor = r.sync_ns[-1] + math.ceil(sent_in_stop * 1e9 / r.final_rate_Bps)
    assert floor <= r.downtime_ns < floor + 1_000_000  # + the park and the lock, well under 1 ms here


@pytest.mark.parametrize("host, pages", [("arm64-4k", 16 + 16 * 4), ("arm64-16k", (16 + 16 * 4) // 4)])
def test_the_vgic_tables_saved_at_the_stop_come_back_through_the_backup_bitmap(host, pages):
    """arm64: at vm stop KVM writes the vGIC/ITS tables ((16 + 16 x vCPUs) 4 KiB) into guest RAM
    with no vCPU running: those pages reach QEMU through the backup bitmap at the last sync."""
    cfg = load_scenario("web", host=host, vm={"memory": "512MiB", "vcpus": 4})
    r = MigrationRun(cfg)
    m = r.run()
    assert m.verified
    assert r.backup_bitmap_pages == r.vm.stats.backup_bitmap_pages == pages


# ---------------------------------------------------------------------------- the metrics record
def _record():
    r = MigrationRun(small("web", memory=256 << 20))
    r.advance(300 * MS)
    return r.metrics().to_dict()


def test_metrics_from_fields_equals_the_constructor_in_any_order():
    """Metrics.from_fields skips the frozen dataclass's per-field assignments when the values
    come in declaration order; in any other order, or with the defaulted fields left out, it
    gives what Metrics(**values) gives, and the record stays frozen."""
    import dataclasses

    from ringenv.vmm.metrics import Metrics

    d = _record()
    fast = Metrics.from_fields(dict(d))
    assert fast == Metrics(**d) and list(fast.to_dict()) == list(d)
    back = Metrics.from_fields(dict(reversed(list(d.items()))))
    assert back == fast and list(back.to_dict()) == list(d)  # fields in declaration order
    short = {k: v for k, v in d.items() if k not in ("checkpoints", "pause_total_s", "checkpoint_overruns",
                                                               "checkpoint_slots_missed")}
    assert Metrics.from_fields(short) == Metrics(**short)
    assert (Metrics.from_fields(short).checkpoints, Metrics.from_fields(short).pause_total_s) == (0, 0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.downtime_s = 1.0


@pytest.mark.parametrize("change", ["unknown", "missing"])
def test_metrics_from_fields_refuses_an_unknown_or_missing_field_by_name(change):
    """A key that is no field, or a field without a default left out: the constructor's
    TypeError, naming it (no half-built record)."""
    from ringenv.vmm.metrics import Metrics

    d = _record()
    if change == "unknown":
        d["ring_fil"] = d.pop("ring_fill")
        d["ring_fill"] = ()  # all fields present, one extra: still refused
        name = "ring_fil"
    else:
        del d["bandwidth_Bps"]
        name = "bandwidth_Bps"
    with pytest.raises(TypeError, match=name):
        Metrics.from_fields(d)


@pytest.mark.parametrize("extra,loop_syncs", [(0, False), (1, True)])
def test_the_switchover_needs_pending_strictly_below_the_threshold(extra, loop_syncs):
    """migration_iteration_run (QEMU 9.0 on): the exact sync when pending < threshold, the
    switchover when the new pending is 0 or < threshold. With the threshold held at exactly the
    pending bytes after every slice, neither ever fires: the pass drains the bitmap (nothing
    enters it without a sync) and the switchover comes at pending == 0, after the set-up's sync
    alone. One byte more and the sync fires at the first check after a slice."""
    cfg = small("web", memory=256 << 20)
    r = MigrationRun(cfg)
    ps = cfg.profile.page_size
    orig_update, orig_sync, syncs = r.update_bandwidth, r.sync, []

    def update():
        orig_update()
        r.threshold_bytes = r.dirty.mig_count * ps + extra

    def sync(last_stage=False):
        syncs.append((r.phase, last_stage))
        return (yield from orig_sync(last_stage))

    r.update_bandwidth, r.sync = update, sync
    m = r.run()
    assert m.done and m.converged and m.lost_writes == 0
    live = [s for s in syncs if s[0] in ("bulk", "iterate")]
    assert bool(live) == loop_syncs
    if not loop_syncs:
        assert m.iterations == 2 and m.passes == 0  # the set-up's sync and the final one


def test_after_the_exact_sync_pending_equal_to_the_threshold_keeps_sending():
    """The second comparison: the sync fires (threshold one byte above the estimate), and the
    exact pending it finds equals the threshold: no switchover (QEMU's `<`), another slice is
    sent. Held so at every check, the run can only stop once a sync finds nothing pending."""
    cfg = small("web", memory=256 << 20)
    r = MigrationRun(cfg)
    ps = cfg.profile.page_size
    orig_update, orig_sync, live, at_stop = r.update_bandwidth, r.sync, [], []

    def update():
        orig_update()
        r.threshold_bytes = r.dirty.mig_count * ps + 1

    def sync(last_stage=False):
        yield from orig_sync(last_stage)
        if r.phase in ("bulk", "iterate"):
            live.append(r.dirty.mig_count)
            r.threshold_bytes = r.dirty.mig_count * ps  # exactly the pending just found

    r.update_bandwidth, r.sync = update, sync
    on_pause(r, lambda: at_stop.append(r.dirty.mig_count))
    m = r.run()
    assert m.done and m.converged and m.lost_writes == 0
    assert any(n > 0 for n in live)  # some sync found pages equal to the threshold and went on
    assert at_stop == [0] and live[-1] == 0


def test_expected_downtime_is_the_limit_until_a_dirty_page_rate_is_measured():
    """migration_connect sets expected-downtime to the downtime limit; migration_update_counters
    replaces it only once dirty_pages_rate is non-zero (a sync closed a >= 1 s period that saw
    dirty pages) and the window sent more than 10 kB."""
    r = _two_vcpus()
    limit = r.cfg.link.downtime_limit_ms / 1000
    assert r.metrics().expected_downtime_s == limit
    now = r.loop.now
    r.throttle.trigger.dirty_pages_rate = 0
    r._dirty_bytes_last_sync = 5_000_000
    r._bw_t0, r._bw_b0 = now - BW_WINDOW_NS, r.bytes_sent - 1_000_000
    r.update_bandwidth()  # no dirty-page rate yet: the limit stays
    assert r.metrics().expected_downtime_s == limit
    r.throttle.trigger.dirty_pages_rate = 7
    r._bw_t0, r._bw_b0 = now - BW_WINDOW_NS, r.bytes_sent - 10_000
    r.update_bandwidth()  # 10 000 bytes in the window: not more than 10 kB, the limit stays
    assert r.metrics().expected_downtime_s == limit
    r._bw_t0, r._bw_b0 = now - BW_WINDOW_NS, r.bytes_sent - 1_000_000
    r.update_bandwidth()  # 5 MB dirty at the last sync over 10 MB/s
    assert r.metrics().expected_downtime_s == pytest.approx(0.5)
    r.paused_at = now  # stop-and-copy: QEMU updates no counter after the completion starts
    r._bw_t0, r._bw_b0 = now - BW_WINDOW_NS, r.bytes_sent - 100_000
    r.update_bandwidth()
    assert r.metrics().expected_downtime_s == pytest.approx(0.5)


def test_the_dirty_page_rate_comes_from_a_sync_closing_a_period():
    """migration_update_rates, at a sync more than 1 s after the period began: pages dirtied in
    the period x 1000 / the period in ms (integers); a sync inside the period changes nothing."""
    t = Trigger(50)
    t.begin(0, 0)
    t.on_sync(900 * MS, 300, 4096, 10**9)
    assert t.dirty_pages_rate == 0  # 0.9 s: no period closed yet
    t.on_sync(1500 * MS, 450, 4096, 10**9)
    assert t.dirty_pages_rate == 750 * 1000 // 1500
    t.on_sync(3500 * MS, 0, 4096, 2 * 10**9)
    assert t.dirty_pages_rate == 0  # a period without dirty pages


def test_expected_downtime_follows_each_sync_through_a_whole_migration():
    """Every sync records the dirty bytes it leaves (ram_bytes_remaining); every bandwidth
    window after a dirty-page rate is known sets expected-downtime to those over the
    bandwidth. Checked against the rule replayed from spies, at every 50 ms of a migration
    without a throttle (the period is kept all the same) and at its end."""
    cfg = load_scenario("default", vm={"memory": "2GiB", "vcpus": 2}, link={"gbps": 2})  # ~15 passes
    r = MigrationRun(cfg, host_sync_ms=50)
    limit = cfg.link.downtime_limit_ms / 1000
    state = {"last_sync": 0, "expected": limit}
    note_sync, update = r.note_sync, r.update_bandwidth

    def spy_sync(*a, **k):
        note_sync(*a, **k)
        state["last_sync"] = r.dirty.mig_count * r.page_size

    def spy_update():
        t0, b0 = r._bw_t0, r._bw_b0
        update()
        if r._bw_t0 != t0 and r.paused_at is None and r.throttle.trigger.dirty_pages_rate \
                and r.bytes_sent - b0 > 10_000:
            state["expected"] = state["last_sync"] / r.bandwidth_Bps

    r.note_sync, r.update_bandwidth = spy_sync, spy_update
    seen = set()
    while not r.finished:
        r.advance(r.loop.now + 50 * MS)
        got = r.metrics().expected_downtime_s
        assert got == pytest.approx(state["expected"])
        seen.add(got)
    assert r.passes >= 2 and len(seen) >= 3  # it moved during the run
    assert limit in seen and r.metrics().expected_downtime_s != limit
