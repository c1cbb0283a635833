"""Workload model parts worked by hand: Zipf masses, the scattered layout's bijection, the
calm/burst Markov process, scans on large pages, the closed loop's floor and out-of-guest kernel
time, and the rate scale in the pre-migration sample (a mutation run found these unchecked)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ringenv.config import load_scenario, load_workload
from ringenv.guest.workload import MIN_SPEED, WorkloadProgram, _buckets, _closed_loop, _Region, _set_speed, _zipf_mass
from ringenv.kvm import Vm, uapi

from .test_workload import run_bitmap

SECOND = 1_000_000_000


@pytest.mark.parametrize("s, top", [
    (2.0, 1 / (math.pi**2 / 6)),  # 1 / zeta(2) (the tail past 10^6 ranks: 1e-6 of the mass)
    (1.0, 1 / (math.log(1e6) + 0.5772156649 + 1 / 2e6)),  # 1 / H(10^6)
])
def test_the_most_popular_page_gets_its_zipf_share(s, top):
    lo, hi, frac = _buckets(10**6, "zipf", s)[0]
    assert (lo, hi) == (0, 1)
    assert frac == pytest.approx(top, rel=2e-3)
    assert sum(b[2] for b in _buckets(10**6, "zipf", s)) == pytest.approx(1.0)


@pytest.mark.parametrize("a, b, s", [(64, 200, 1.0), (64, 200, 2.0), (1000, 50000, 0.8), (3, 40, 1.2)])
def test_zipf_mass_is_the_sum_over_its_ranks(a, b, s):
    exact = float(np.sum(np.arange(a + 1, b + 1, dtype=float) ** -s))
    assert _zipf_mass(a, b, s) == pytest.approx(exact, rel=1e-3)


def test_a_scattered_region_places_neighbouring_ranks_far_apart():
    n = 1000
    r = _Region(0, n, True, np.random.default_rng(0))
    pages = r.gpi(np.arange(n))
    assert sorted(pages.tolist()) == list(range(n))  # a bijection onto the region
    assert np.mean(np.abs(np.diff(pages)) == 1) < 0.01
    assert _Region(0, n, False, np.random.default_rng(0)).gpi(np.arange(n)).tolist() == list(range(n))


def _attached(workload, seed, nv=1):
    vm = Vm("arm64-4k", seed=seed)
    vm.set_user_memory_region(0, uapi.KVM_MEM_LOG_DIRTY_PAGES, 0, 1 << 28)
    for i in range(nv):
        vm.create_vcpu(i)
    wl = WorkloadProgram(workload, nv, seed=seed)
    vm.attach_guest(wl)
    return wl


def test_phases_start_calm_in_proportion_and_last_their_means():
    """bursty: calm 3 s on average, bursts 1 s: an episode starts calm with probability
    3 / (3 + 1), and over a long timeline the phases last their means."""
    ph = load_workload("bursty").phases
    assert (ph.mean_calm_s, ph.mean_burst_s) == (3, 1)
    starts = [_attached("bursty", seed)._phase_m[0] == ph.calm_multiplier for seed in range(400)]
    assert np.mean(starts) == pytest.approx(0.75, abs=3 * math.sqrt(0.75 * 0.25 / 400))
    wl = _attached("bursty", 1)
    wl._phases_until(4000 * SECOND)
    t, m = np.diff(np.array(wl._phase_t)) / SECOND, np.array(wl._phase_m[:-1])
    calm, burst = t[m == ph.calm_multiplier], t[m == ph.burst_multiplier]
    assert len(calm) > 500 and len(burst) > 500
    assert calm.mean() == pytest.approx(3.0, rel=0.1) and burst.mean() == pytest.approx(1.0, rel=0.1)
    assert burst.sum() / t.sum() == pytest.approx(0.25, abs=0.03)


def test_a_scan_on_16k_pages_dirties_one_page_per_four_writes():
    wl = {"name": "scan", "regions": [{"fraction": 0.5, "rate_mbps": 100, "pattern": "scan"}]}
    vm, _, _, dirty = run_bitmap(wl, 1.0, nv=1, profile="arm64-16k")
    assert abs(len(dirty) - 100e6 / 16384) <= 1.5
    assert np.array_equal(dirty, np.arange(len(dirty)))


def test_the_closed_loop_never_slows_a_vcpu_below_min_speed():
    speed = np.ones(1)
    assert _set_speed(speed, 0, 0.0, np.array([5e6]), np.array([1.0]), 1.0)  # load 5e6
    assert speed[0] == MIN_SPEED
    speed = np.ones(1)
    assert _set_speed(speed, 0, 0.5, np.array([3.0]), np.array([2.0]), 1.0)  # load 2: half speed
    assert speed[0] == 0.5


def test_kernel_time_out_of_the_guest_counts_without_decay():
    """A PML flush at a vCPU's exit: its kernel ns count for the vCPU though it did not run."""
    acc_k, acc_p, speed = np.zeros(1), np.array([7.0]), np.ones(1)
    _closed_loop(np.array([1000], dtype=np.int64), np.zeros(1, dtype=np.int64), np.array([False]), 0, 0.0, speed,
                 acc_k, acc_p, 1.0)
    assert acc_k.tolist() == [1000.0] and acc_p.tolist() == [7.0]


def test_the_pre_migration_sample_applies_the_rate_scale():
    from ringenv.vmm.dirtyrate import sample_dirty_rate

    wl = {"name": "scan", "regions": [{"fraction": 0.5, "rate_mbps": 40, "pattern": "scan", "share": "private"}]}
    cfg = load_scenario("default", vm={"memory": "1GiB", "vcpus": 1}, rate_scale=0.5)
    rate, _ = sample_dirty_rate(cfg, workload=wl, seed=0, seconds=1.0, windows=1)
    assert rate == pytest.approx(20e6, abs=4096)


def test_first_writes_of_a_hot_class_come_early_in_the_window():
    """262 pages sharing 4000 MB/s (lambda = 3.727e-6 per ns per page): over 1 ms a page is first
    written with probability 1 - exp(-lambda dt) = 0.976, at a time following the exponential
    truncated to the window: mean 1/lambda - dt exp(-lambda dt) / (1 - exp(-lambda dt)) = 243.6 us
    (uniform times would give 500 us)."""
    from ringenv.guest.workload import GUEST_WRITE

    wl = {"name": "hot", "regions": [{"fraction": 0.001, "rate_mbps": 4000}]}
    n = int((1 << 30) * 0.001) // 4096
    lam, dt = 4000e6 / GUEST_WRITE / SECOND / n, 1_000_000
    times, firsts = [], []
    for seed in range(20):
        vm = Vm("arm64-4k", seed=seed)
        vm.set_user_memory_region(0, uapi.KVM_MEM_LOG_DIRTY_PAGES, 0, 1 << 30)
        vm.create_vcpu(0)
        w = WorkloadProgram(wl, 1, seed=seed)
        vm.attach_guest(w)
        b = w.next_writes(0, dt, np.array([True]))
        assert len(np.unique(b.gfn)) == len(b.gfn)  # first writes: each page once
        times.append(np.asarray(b.t))
        firsts.append(len(b.gfn))
    t = np.concatenate(times)
    p = 1 - math.exp(-lam * dt)
    assert np.mean(firsts) == pytest.approx(n * p, abs=3 * math.sqrt(n * p * (1 - p) / 20))
    assert t.mean() == pytest.approx(1 / lam - dt * math.exp(-lam * dt) / p, rel=0.04)
