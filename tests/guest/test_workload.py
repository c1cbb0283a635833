"""Workload models against closed forms (docs/reference/migration.md s1, s5).

A page of rate r protected at t0 is first written within T with probability 1 - exp(-r T);
a class of N pages sharing a total rate R dirties U(T) = N (1 - exp(-R T / N)) distinct pages.
The VMs here use the dirty bitmap (no ring, no exits), so time runs straight through T.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ringenv.config import ConfigError, load_workload
from ringenv.guest.workload import GUEST_WRITE, WorkloadProgram
from ringenv.kvm import Vm, uapi
from ringenv.kvm.memory import bitmap_offsets

SECOND = 1_000_000_000


def run_bitmap(workload, seconds, *, mem=1 << 30, nv=4, seed=1, profile="arm64-4k"):
    vm = Vm(profile, seed=seed)
    vm.set_user_memory_region(0, uapi.KVM_MEM_LOG_DIRTY_PAGES, 0, mem)
    vcpus = [vm.create_vcpu(i) for i in range(nv)]
    wl = WorkloadProgram(workload, nv, seed=seed)
    vm.attach_guest(wl)
    for v in vcpus:
        assert v.run() is None
    assert vm.run_until(int(seconds * SECOND)) == []
    dirty = bitmap_offsets(vm.get_dirty_log(0), vm.slots[0].npages)
    return vm, vcpus, wl, dirty


def run_ring(workload, nv, seed, seconds, *, entries=65536, with_bitmap=False):
    """A 1 GiB VM with dirty rings running ``workload`` on ``nv`` vCPUs for ``seconds``: (vm, vcpus)."""
    vm = Vm("arm64-4k")
    vm.enable_cap(uapi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, entries * 16)
    if with_bitmap:
        vm.enable_cap(uapi.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
    vm.set_user_memory_region(0, uapi.KVM_MEM_LOG_DIRTY_PAGES, 0, 1 << 30)
    vcpus = [vm.create_vcpu(i) for i in range(nv)]
    vm.attach_guest(WorkloadProgram(workload, nv, seed=seed))
    for v in vcpus:
        v.run()
    assert vm.run_until(int(seconds * SECOND)) == []
    return vm, vcpus


def U(n_pages, pages_per_s, t):
    return n_pages * (1 - math.exp(-pages_per_s * t / n_pages))


@pytest.mark.parametrize("rate_mbps,seconds", [(50, 1.0), (400, 2.0), (2000, 1.0)])
def test_uniform_region_dirties_the_unique_page_count(rate_mbps, seconds):
    wl = {"name": "u", "regions": [{"fraction": 0.5, "rate_mbps": rate_mbps}]}
    vm, _, _, dirty = run_bitmap(wl, seconds)
    n = vm.slots[0].npages // 2
    expect = U(n, rate_mbps * 1e6 / GUEST_WRITE, seconds)
    assert abs(len(dirty) - expect) < 4 * math.sqrt(expect) + 0.01 * expect
    assert dirty.max() < n  # only the region's pages


def test_scattered_layout_spreads_the_region_over_its_range():
    wl = {"name": "s", "regions": [{"fraction": 0.25, "rate_mbps": 200, "layout": "scattered"}]}
    vm, _, _, dirty = run_bitmap(wl, 1.0)
    n = vm.slots[0].npages // 4
    assert dirty.max() < n
    # contiguous first-write order is gone: the pages are spread evenly over the quarter
    hist = np.bincount(dirty * 8 // n, minlength=8)
    assert hist.min() > 0.8 * hist.mean()


def test_zipf_head_pages_are_dirtied_first_and_the_total_matches_the_buckets():
    wl = load_workload("memcached")
    vm, _, prog, dirty = run_bitmap(wl, 0.5, mem=2 << 30)
    # expected distinct pages: sum over the classes of N_c (1 - exp(-r_c T))
    expect = float(np.sum(prog.c_n * -np.expm1(-prog.c_rate * 0.5 * SECOND)))
    assert len(prog.s_vcpu) == 0  # memcached has no sweeps: the classes alone give the total
    assert abs(len(dirty) - expect) < 5 * math.sqrt(expect) + 0.02 * expect
    head = prog.regions[0].gpi(np.arange(16))
    assert np.isin(head, dirty).all()  # rank 1..16 of a Zipf(1) at 500 MB/s: all written


def test_scan_is_deterministic_and_sweeps_at_its_rate():
    wl = {"name": "scan", "regions": [{"fraction": 0.5, "rate_mbps": 100, "pattern": "scan"}]}
    vm, _, _, dirty = run_bitmap(wl, 1.0, nv=1)
    pages = 100e6 / GUEST_WRITE  # 4 KiB host pages: one page per guest write burst
    assert abs(len(dirty) - pages) <= 1
    assert np.array_equal(dirty, np.arange(len(dirty)))


@pytest.mark.parametrize("step_us", [2000, 400, 100])
def test_a_scan_sweeps_at_its_rate_whatever_windows_the_host_runs(step_us):
    """A window in which a slow scan writes no page still moves its pointer: stepping the host
    finer than one page's sweep time must not stop the scan (it is deterministic: same pages)."""
    wl = {"name": "scan", "regions": [{"fraction": 0.5, "rate_mbps": 8, "pattern": "scan"}]}
    vm = Vm("arm64-4k", seed=1)
    vm.set_user_memory_region(0, uapi.KVM_MEM_LOG_DIRTY_PAGES, 0, 1 << 30)
    v = vm.create_vcpu(0)
    vm.attach_guest(WorkloadProgram(wl, 1, seed=1))
    assert v.run() is None
    t = 0
    while t < SECOND // 4:
        t += step_us * 1000
        assert vm.run_until(t) == []
    dirty = bitmap_offsets(vm.get_dirty_log(0), vm.slots[0].npages)
    pages = 8e6 / GUEST_WRITE / 4
    assert abs(len(dirty) - pages) <= 1 and np.array_equal(dirty, np.arange(len(dirty)))


def test_next_writes_stops_where_the_phase_ends():
    """One rate multiplier per batch: asked for 20 s of a phased workload, the batch covers up
    to the phase's end, at that phase's rate."""
    vm = Vm("arm64-4k", seed=3)
    vm.set_user_memory_region(0, uapi.KVM_MEM_LOG_DIRTY_PAGES, 0, 1 << 30)
    for i in range(2):
        vm.create_vcpu(i)
    wl = {"name": "b", "regions": [{"fraction": 1.0, "rate_mbps": 40}],
          "phases": {"calm_multiplier": 0.1, "burst_multiplier": 4.0, "mean_calm_s": 2.0, "mean_burst_s": 2.0}}
    ratios = []
    for seed in range(12):
        prog = WorkloadProgram(wl, 2, seed=seed)
        prog.attach(vm)
        mult, phase_end = prog.multiplier(0)
        b = prog.next_writes(0, 20 * SECOND, np.ones(2, dtype=bool))
        end = min(20 * SECOND, phase_end)
        assert b.complete_until == end and (len(b) == 0 or b.t.max() < end)
        ratios.append(len(b) / (40e6 * mult / GUEST_WRITE * end / SECOND))
    assert 0.9 < float(np.mean(ratios)) < 1.1, ratios


#: docs/reference/migration.md s5: distinct dirty MB/s (10^6 B/s) over 1 s windows, in every phase
CALIBRATION = {"idle": (0, 1), "web": (5, 50), "kernel-build": (20, 100), "oltp": (50, 300),
               "memcached": (100, 1000), "redis": (100, 1000), "analytics": (1000, math.inf)}


@pytest.mark.parametrize("name", sorted(CALIBRATION))
def test_workloads_dirty_at_the_published_rates(name):
    """On the default scenario's VM (16 GiB, 8 vCPUs): the distinct pages a second dirties,
    sum over the classes of N_c (1 - exp(-r_c * 1 s)) plus the scans' pages, in each phase."""
    vm = Vm("arm64-4k", seed=1, page_versions=False)
    vm.set_user_memory_region(0, uapi.KVM_MEM_LOG_DIRTY_PAGES, 0, 16 << 30)
    for i in range(8):
        vm.create_vcpu(i)
    cfg = load_workload(name)
    prog = WorkloadProgram(cfg, 8, seed=1)
    prog.attach(vm)
    lo, hi = CALIBRATION[name]
    for m in [1.0] if cfg.phases is None else [cfg.phases.calm_multiplier, cfg.phases.burst_multiplier]:
        pages = float(np.sum(prog.c_n * -np.expm1(-prog.c_rate * m * prog.c_w.sum(1) * SECOND)))
        pages += float(np.sum(np.minimum(prog.s_rate * m * SECOND, prog.s_n)))
        assert lo <= pages * vm.profile.page_size / 1e6 <= hi, (m, pages * vm.profile.page_size / 1e6)


def test_phases_modulate_the_mean_rate():
    base = {"name": "p", "regions": [{"fraction": 1.0, "rate_mbps": 20}]}
    phased = dict(base, phases={"calm_multiplier": 1.0, "burst_multiplier": 5.0, "mean_calm_s": 1.0,
                                "mean_burst_s": 1.0})
    _, _, _, d0 = run_bitmap(base, 8.0, mem=4 << 30)
    _, _, _, d1 = run_bitmap(phased, 8.0, mem=4 << 30, seed=5)
    # half the time at 5x on average: about 3x the pages (wide bounds: a few phase switches)
    assert 1.6 < len(d1) / len(d0) < 4.4


def test_vcpu_weights_split_the_writes():
    wl = {"name": "w", "regions": [{"fraction": 1.0, "rate_mbps": 300, "vcpu_weights": [3, 1]}]}
    vm, vcpus = run_ring(wl, 2, 2, 0.1, with_bitmap=True)
    a, b = vcpus[0].stats.pushes, vcpus[1].stats.pushes
    assert abs(a / (a + b) - 0.75) < 0.02


@pytest.mark.parametrize("weights, writer", [(None, 0), ([1, 1], 0), ([1, 3], 1)])
def test_a_shared_scan_is_one_writer_the_vcpu_of_the_largest_weight(weights, writer):
    wl = {"name": "s", "regions": [{"fraction": 0.5, "rate_mbps": 40, "pattern": "scan", "vcpu_weights": weights}]}
    _, vcpus = run_ring(wl, 2, 2, 0.1)
    pushes = [v.stats.pushes for v in vcpus]
    assert pushes[writer] == round(40e6 / GUEST_WRITE / 10) and pushes[1 - writer] == 0


def test_private_regions_are_written_only_by_their_vcpu():
    wl = {"name": "p", "regions": [{"fraction": 1.0, "rate_mbps": 200, "share": "private"}]}
    vm, vcpus = run_ring(wl, 4, 3, 0.1)
    n = vm.slots[0].npages
    for i, v in enumerate(vcpus):
        offs = v.ring_gfns["offset"][: v.ring.used].astype(np.int64)
        assert len(offs) > 0 and offs.min() >= i * n // 4 and offs.max() < (i + 1) * n // 4


def test_same_seed_same_ring_contents_other_seed_different():
    def ring(seed):
        vm, vcpus = run_ring("oltp", 2, seed, 0.05, entries=4096)
        return [v.ring_gfns.copy() for v in vcpus], vm.now
    a, b, c = ring(7), ring(7), ring(8)
    assert all(np.array_equal(x, y) for x, y in zip(a[0], b[0])) and a[1] == b[1]
    assert not all(np.array_equal(x, y) for x, y in zip(a[0], c[0]))


def test_work_follows_dirty_events_not_memory_size():
    """The workload keeps no per-page state: 16x the memory at the same dirty rate samples the
    same number of events (within noise)."""
    wl = {"name": "u", "regions": [{"fraction": 1.0, "rate_mbps": 100}]}
    _, _, _, small = run_bitmap(wl, 0.5, mem=1 << 30)
    _, _, _, big = run_bitmap(wl, 0.5, mem=16 << 30)
    assert abs(len(big) - len(small)) < 0.05 * len(small)


def test_bad_workload_fields_name_the_field():
    with pytest.raises(ConfigError, match=r"regions\.0\.pattern"):
        load_workload({"name": "x", "regions": [{"fraction": 0.5, "rate_mbps": 1, "pattern": "zigzag"}]})
    with pytest.raises(ConfigError, match="fractions add up"):
        load_workload({"name": "x", "regions": [{"fraction": 0.7, "rate_mbps": 1}, {"fraction": 0.7, "rate_mbps": 1}]})
    with pytest.raises(ConfigError, match="unknown key"):
        load_workload({"name": "x", "regionz": []})
    with pytest.raises(ConfigError, match="unknown workload 'nope'"):
        load_workload("nope")


def test_every_shipped_workload_runs():
    from ringenv.config import CONFIG_DIR

    for p in sorted((CONFIG_DIR / "workloads").glob("*.yaml")):
        _, _, _, dirty = run_bitmap(p.stem, 0.2, mem=256 << 20, nv=2)
        assert len(dirty) > 0, p.stem


def test_batch_is_time_ordered_and_hot_pages_distinct_even_past_the_bulk_draws():
    """One window of a hot class more than half written (the left-out pages are marked) and of
    a uniform class (raw writes alone come time-ordered without a sort); the distinct-page draws
    that run past the bulk-drawn numbers continue on the fallback stream."""
    from ringenv.guest.workload import _uniform

    buf, st = np.array([0.25, 0.5, 0.75]), np.zeros(2, dtype=np.uint64)
    got = [_uniform(buf, st) for _ in range(2000)]
    assert got[:3] == [0.25, 0.5, 0.75] and all(0.0 <= u < 1.0 for u in got)
    assert abs(np.mean(got[3:]) - 0.5) < 0.03 and len(set(got[3:])) == len(got) - 3
    st2 = np.zeros(2, dtype=np.uint64)
    assert [_uniform(buf, st2) for _ in range(2000)] == got  # deterministic

    vm = Vm("arm64-4k", seed=3)
    vm.set_user_memory_region(0, uapi.KVM_MEM_LOG_DIRTY_PAGES, 0, 1 << 30)
    for i in range(4):
        vm.create_vcpu(i)
    for wl in ({"name": "hot", "regions": [{"fraction": 0.001, "rate_mbps": 4000}]},
               {"name": "uniform", "regions": [{"fraction": 1.0, "rate_mbps": 400}]}):
        prog = WorkloadProgram(wl, 4, seed=5)
        prog.attach(vm)
        b = prog.next_writes(0, SECOND // 4, np.ones(4, dtype=bool))
        key = b.t * 1024 + b.vcpu
        assert len(b) > 100 and (key[1:] >= key[:-1]).all()
        w = prog.window(0, SECOND // 4, np.ones(4, dtype=bool), np.full(4, 1 << 40, dtype=np.int64))
        assert w.order is not None and len(w) > 100  # the host gathers the events in order
        wo = w.ordered()
        assert (np.sort(wo.gfn) == np.sort(w.gfn)).all() and (np.diff(wo.t * 1024 + wo.vcpu) >= 0).all()
        if wl["name"] == "hot":
            assert len(np.unique(b.gfn)) == len(b) > 0.5 * int(0.001 * (1 << 30) / 4096)


@pytest.mark.parametrize("dt", [50_000_000, 1 << 50])
def test_the_order_key_gives_time_vcpu_then_batch_position_with_any_sort(dt):
    """A window's batch is ordered by (time, vCPU), ties in the order they were drawn. The key
    makes that the only order when it fits in 63 bits (a 50 ms window); for a window too long
    for that (2^50 ns) it is (time, vCPU) alone, for a stable sort."""
    from ringenv.guest.workload import _order_key, batch_order

    rng = np.random.default_rng(7)
    now = 123_456_789
    n = 5000
    t = now + rng.integers(0, min(dt, 40), n)  # few distinct times: many ties
    vc = rng.integers(0, 3, n).astype(np.int32)
    key, mask = _order_key(t, vc, now, dt)
    assert bool(mask) == (dt < 1 << 40)
    expect = np.lexsort((np.arange(n), vc, t))  # time, then vCPU, then position
    if mask:  # the position is in the key: any sort algorithm gives the one order
        assert (np.argsort(key, kind="quicksort") == expect).all()
    assert (batch_order(key, int(mask)) == expect).all()


def test_the_windows_exponential_numbers_follow_exp_1():
    """The ziggurat sampler behind the raw writes' sorted times: Kolmogorov-Smirnov distance to
    Exp(1) under the 1% critical value, right moments, and the tail beyond the last layer."""
    import numba

    from ringenv.guest.workload import _ZIG_R, _exponential

    @numba.njit
    def draw(n, seed):
        st = np.zeros(2, dtype=np.uint64)
        st[1] = np.uint64(seed)
        out = np.empty(n)
        for i in range(n):
            out[i] = _exponential(st)
        return out

    n = 400_000
    x = np.sort(draw(n, 2024))
    d = np.max(np.abs(np.arange(1, n + 1) / n - (1 - np.exp(-x))))
    assert d < 1.63 / np.sqrt(n)
    assert abs(x.mean() - 1) < 0.01 and abs(x.var() - 1) < 0.02
    tail = np.count_nonzero(x > _ZIG_R)  # expected n e^-r ~ 182: the tail path is taken
    assert abs(tail - n * np.exp(-_ZIG_R)) < 5 * np.sqrt(n * np.exp(-_ZIG_R))


def test_a_window_ends_a_little_past_where_the_fullest_ring_fills():
    """``window`` picks its end as ``horizon`` says: ~5% past the time the vCPU with the least
    room fills it at its expected rate; with room to spare, after MAX_EVENTS expected writes;
    never past ``until``."""
    from ringenv.guest.workload import MAX_EVENTS

    vm = Vm("arm64-4k", seed=3)
    vm.set_user_memory_region(0, uapi.KVM_MEM_LOG_DIRTY_PAGES, 0, 1 << 30)
    for i in range(2):
        vm.create_vcpu(i)
    prog = WorkloadProgram({"name": "uniform", "regions": [{"fraction": 1.0, "rate_mbps": 400}]}, 2, seed=5)
    prog.attach(vm)
    running = np.ones(2, dtype=bool)
    until = SECOND
    room = np.array([1000, 100_000], dtype=np.int64)
    end = prog.horizon(0, until, running, room)
    per_vcpu_ns = 400e6 / 4096 / 2 / SECOND  # first writes to clean pages per ns (efficiency 1)
    assert end == pytest.approx(1000 / per_vcpu_ns * 1.05, rel=0.01) and end < until
    b = prog.window(0, until, running, room)
    assert b.complete_until == end and (b.t < end).all()
    assert 0.8 * 1050 < np.count_nonzero(b.vcpu == 0) < 1.2 * 1050  # a few more than its room
    spare = np.full(2, 10**9, dtype=np.int64)
    assert prog.horizon(0, until, running, spare) == pytest.approx(MAX_EVENTS / (2 * per_vcpu_ns), rel=0.01)
    assert prog.horizon(0, SECOND // 100, running, spare) == SECOND // 100


def _circular_gap(a, b, n):
    d = np.abs(np.asarray(a) - np.asarray(b)) % n
    return np.minimum(d, n - d)


def test_a_program_started_later_continues_the_timeline_with_draws_of_its_own():
    """calc-dirty-rate samples the S seconds before a migration: a program started at S on the
    same timeline (same seed) lays the regions out the same way, is in the phase of t + S, finds
    its sweeps where S seconds of running left them, and draws writes of its own."""
    wl = {"name": "ps", "regions": [{"fraction": 0.3, "rate_mbps": 40, "layout": "scattered"},
                                    {"fraction": 0.3, "rate_mbps": 30, "pattern": "scan"}],
          "phases": {"calm_multiplier": 0.5, "burst_multiplier": 3.0, "mean_calm_s": 0.7, "mean_burst_s": 0.4}}
    start = 3 * SECOND // 2
    _, _, before, _ = run_bitmap(wl, 1.5, nv=2, seed=5)  # the timeline from 0, run up to start
    vm = Vm("arm64-4k", seed=5)
    vm.set_user_memory_region(0, uapi.KVM_MEM_LOG_DIRTY_PAGES, 0, 1 << 30)
    later = WorkloadProgram(wl, 2, seed=5, start_ns=start)
    later.attach(vm)
    assert [(r.start, r.n, r.perm_b) for r in later.regions] == [(r.start, r.n, r.perm_b) for r in before.regions]
    for t in range(0, 8 * SECOND, SECOND // 8):
        mult, end = before.multiplier(t + start)
        assert later.multiplier(t) == (mult, end - start), t
    assert np.all(_circular_gap(later.s_pos, before.s_pos, later.s_n) < 1e-3), (later.s_pos, before.s_pos)

    steady = {"name": "u", "regions": [{"fraction": 0.5, "rate_mbps": 400}]}

    def first_writes(start_ns):
        p = WorkloadProgram(steady, 2, seed=5, start_ns=start_ns)
        p.attach(vm)
        return p.next_writes(0, 10 * 1_000_000, np.ones(2, dtype=bool)).gfn

    assert np.array_equal(first_writes(start), first_writes(start))  # seeded
    assert not np.array_equal(first_writes(start), first_writes(0))  # not the sample's draws


@pytest.mark.parametrize("bad", [-1, 1.5, True, float("nan"), "1"])
def test_a_bad_start_time_names_the_argument(bad):
    with pytest.raises(ConfigError, match=r"^start_ns: .* accepted: an integer number of ns >= 0"):
        WorkloadProgram("web", 2, seed=0, start_ns=bad)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "2", True])
def test_a_bad_rate_scale_names_the_argument(bad):
    with pytest.raises(ConfigError, match=r"^rate_scale: .* accepted: a finite number > 0"):
        WorkloadProgram("web", 2, seed=0, rate_scale=bad)


def test_zipf_s_on_a_region_that_is_not_zipf_is_an_error():
    with pytest.raises(ConfigError, match=r"zipf_s: 2 is given for pattern 'uniform'; it applies to pattern 'zipf'"):
        load_workload({"name": "x", "regions": [{"fraction": 0.5, "rate_mbps": 10, "zipf_s": 2}]})
    load_workload({"name": "x", "regions": [{"fraction": 0.5, "rate_mbps": 10, "pattern": "zipf", "zipf_s": 2}]})
