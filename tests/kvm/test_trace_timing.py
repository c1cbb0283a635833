"""A trace's timing: each vCPU's next write comes after the kernel time its fault took.

The real vCPU is stopped in the kernel for the whole write-protect fault (arm64 ~4 us, x86
~2.3 us; real-kvm-host.md: a first write to a clean page ~21 us nested, a write to a dirty page
~42 ns), so a vCPU that faults on every write falls behind one that rewrites dirty pages, and
which vCPU first writes a shared page (hence whose ring gets it: kvm-dirty-ring.md s3) follows
from that. The result must not depend on how many writes the trace proposes per batch.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import ringenv.replay as replay
from ringenv.config import load_host_profile
from ringenv.guest.trace import TraceProgram
from ringenv.kvm import Vm
from ringenv.kvm import uapi as U
from ringenv.realkvm.traces import builtin_traces

PROFILES = ["arm64-4k", "arm64-16k", "x86-nopml", "x86-pml"]


def _offsets(report):
    return [[off for b in v["batches"] for off in b["offsets"]] for v in report["vcpus"]]


def test_a_vcpu_that_faults_on_every_write_falls_behind_and_the_other_vcpu_logs_the_shared_page():
    """arm64-4k (fault 4000 ns, write 5 ns). vCPU0 first-writes pages 0..9: page k at
    k x 4005 ns, so page 5 at 20025. vCPU1 first-writes page 500 at 0 (fault: its next write at
    4005), rewrites it 100 times (dirty: 5 ns each, the last at 4500) and writes page 5 at 4505:
    before vCPU0, so page 5 is in vCPU1's ring and vCPU0's write to it no longer faults."""
    trace = {"slot_pages": 1024, "ring_entries": 256, "reap_scope": "all",
             "vcpus": [{"writes": list(range(10)), "syncs": []},
                       {"writes": [500] * 101 + [5], "syncs": []}]}
    out = replay.replay_trace(trace, profile="arm64-4k")
    assert _offsets(out) == [[0, 1, 2, 3, 4, 6, 7, 8, 9], [500, 5]]


def _random_traces(n, rng):
    traces = []
    for _ in range(n):
        nv = int(rng.integers(2, 5))
        pages = int(rng.choice([64, 512, 2048]))
        vcpus = []
        for _ in range(nv):
            k = int(rng.integers(1, 600))
            hot = rng.integers(0, pages, size=int(rng.integers(1, 8)))
            w = np.where(rng.random(k) < 0.5, rng.choice(hot, size=k), rng.integers(0, pages, size=k))
            syncs = sorted(set(rng.integers(0, k, size=int(rng.integers(0, 4))).tolist()))
            vcpus.append({"writes": w.tolist(), "syncs": syncs})
        traces.append({"slot_pages": pages, "ring_entries": int(rng.choice([256, 1024])),
                       "reap_scope": str(rng.choice(["all", "self"])), "vcpus": vcpus})
    return traces


@pytest.mark.parametrize("profile", PROFILES)
def test_a_replay_does_not_depend_on_how_many_writes_a_batch_proposes(profile, monkeypatch):
    """The built-in traces and random multi-vCPU traces with shared hot pages and sync points:
    identical reports (every ring's entries, exits, resets) with 1, 3 or 512 writes per vCPU
    and batch."""
    traces = [t for t in builtin_traces().values() if sum(len(v["writes"]) for v in t["vcpus"]) <= 4096]
    traces += _random_traces(8, np.random.default_rng(7))
    smallest = min(load_host_profile(profile).ring_sizes)
    reports = {}
    for max_batch in (512, 3, 1):
        monkeypatch.setattr(replay, "TraceProgram", functools.partial(TraceProgram, max_batch=max_batch))
        reports[max_batch] = [replay.replay_trace(t, profile=profile, ring_entries=max(t["ring_entries"], smallest))
                              for t in traces]
    assert reports[3] == reports[512]
    assert reports[1] == reports[512]


def _one_vcpu(profile, writes, *, fault_ns=None, block_fraction=0.0, entries=4096):
    vm = Vm(profile)
    ps = vm.page_size
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, entries * 16)
    if vm.profile.with_bitmap_supported:  # arm64 logs a slot with the ring only so (QEMU enables it)
        vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
    vm.set_user_memory_region(0, U.KVM_MEM_LOG_DIRTY_PAGES, 0, (vm.block_pages * 4) * ps,
                              block_fraction=block_fraction)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([writes], [[]], write_ns=5, fault_ns=fault_ns))
    return vm, v


@pytest.mark.parametrize("profile", ["arm64-4k", "arm64-16k", "x86-nopml"])
@pytest.mark.parametrize("block_fraction", [0.0, 1.0])
def test_a_vcpu_s_last_exit_comes_after_its_writes_and_the_kernel_time_the_host_charged_it(profile, block_fraction):
    """One vCPU, first writes to scattered pages (with huge pages: block splits and their TLB
    invalidations too) and rewrites: its "done" exit is at n x write_ns plus the kernel time
    the host charged it (faults, splits), not a fixed cost per fault."""
    vm0 = Vm(profile)
    bp = vm0.block_pages
    writes = [3, 3, bp + 7, 9, 2 * bp + 1, 3, bp + 7, 3 * bp + 2, 4]
    vm, v = _one_vcpu(profile, writes, block_fraction=block_fraction)
    assert v.run() is None
    e = vm.run_until(1 << 40)
    assert [x.kind for x in e] == ["done"]
    kernel = int(vm.vcpu_kernel_ns()[0])
    faults = len(set(writes))
    assert v.stats.faults == faults
    if block_fraction and vm.profile.split_blocks:
        assert vm.stats.splits > 0 and kernel > faults * vm.profile.costs.wp_fault_ns  # splits cost on top
    assert vm.now == len(writes) * 5 + kernel


def test_a_pml_logged_write_costs_the_vcpu_next_to_nothing():
    """x86 PML: a write to a clean page is logged by the CPU, no exit (migration.md s4): 100
    first writes take 100 x (5 + 5) ns (the store and the logging the host charges), not
    100 x the 2300 ns of a write-protect fault."""
    vm, v = _one_vcpu("x86-pml", list(range(100)))
    assert v.run() is None
    assert [x.kind for x in vm.run_until(1 << 40)] == ["done"]
    assert vm.now == 100 * (5 + vm.profile.costs.dirty_write_ns)


def test_a_fixed_fault_time_still_times_the_trace_by_faults():
    """``fault_ns`` given: every fault costs that, whatever the host charges (0: none)."""
    for fault_ns, expected in ((1000, 6 * 5 + 4 * 1000), (0, 6 * 5)):
        vm, v = _one_vcpu("arm64-4k", [1, 1, 2, 3, 3, 4], fault_ns=fault_ns)
        assert v.run() is None
        assert [x.kind for x in vm.run_until(1 << 40)] == ["done"]
        assert vm.now == expected, fault_ns


def test_the_store_re_executed_after_a_full_exit_delays_the_vcpu_by_its_kernel_time():
    """A write that faults and leaves the ring soft-full exits (KVM_EXIT_DIRTY_RING_FULL) before
    it retires; the harvest and reset re-protect its page, so at re-entry the store faults
    again (kvm-dirty-ring.md s3) and the vCPU's next writes come after that fault too."""
    vm, v = _one_vcpu("arm64-4k", list(range(300)), entries=256)
    assert v.run() is None
    e = vm.run_until(1 << 40)
    assert [x.kind for x in e] == ["full"]
    t_full = vm.now
    assert t_full == 191 * (5 + 4000)  # the 192nd first write (soft limit 256 - 64) at 191 x 4005
    from ringenv.vmm.reap import RingReader
    RingReader(v.ring_gfns).reap()
    vm.reset_dirty_rings()
    vm.now += 10_000  # userspace took 10 us
    kernel_before = int(vm.vcpu_kernel_ns()[0])
    assert v.run() is None  # the store re-executes: a fault on page 191 again
    assert [x.kind for x in vm.run_until(1 << 40)] == ["done"]
    assert v.stats.faults == 301
    assert int(vm.vcpu_kernel_ns()[0]) - kernel_before == 109 * 4000
    assert vm.now == t_full + 10_000 + 4000 + (300 - 192) * (5 + 4000)


def _pml_pair(max_batch):
    """x86-pml, 1024-entry rings, stores every 1000 ns: vCPU0 logs 10 pages, vCPU1 150, both
    then rewrite a dirty page across the 1 ms tick and write page 500. Returns (vm, vcpus)."""
    vm = Vm("x86-pml")
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 1024 * 16)
    vm.set_user_memory_region(0, U.KVM_MEM_LOG_DIRTY_PAGES, 0, 4096 * vm.page_size)
    vcpus = [vm.create_vcpu(i) for i in range(2)]
    writes = [list(range(10)) + [0] * 991 + [500], list(range(1000, 1150)) + [1000] * 850 + [500]]
    vm.attach_guest(TraceProgram(writes, [[], []], write_ns=1000, max_batch=max_batch))
    return vm, vcpus


@pytest.mark.parametrize("max_batch", [512, 3, 1])
def test_the_pml_flush_at_a_tick_delays_each_vcpu_by_what_it_flushed(max_batch):
    """The 1 ms tick flushes vCPU0's 10 logged GPAs (50 ns) and vCPU1's 150 (750 ns) into their
    rings. A logged store costs 5 ns more. vCPU0 writes page 500 at 10 x 1005 + 991 x 1000 + 50
    = 1,001,100 ns, vCPU1 at 150 x 1005 + 850 x 1000 + 750 = 1,001,500: vCPU0 logs it, and
    vCPU1's store finds it dirty. Without the tick's delay vCPU1 (1,000,750) would be first."""
    vm, vcpus = _pml_pair(max_batch)
    for v in vcpus:
        assert v.run() is None
    done = {}
    while len(done) < 2:
        for e in vm.run_until(1 << 40):
            assert e.kind == "done"
            done[e.vcpu] = vm.now
    assert done == {0: 1_001_100 + 1005, 1: 1_001_500 + 1000}
    assert vm.vcpu_kernel_ns().tolist() == [11 * 5 + 10 * 5 + 5, 150 * 5 + 150 * 5]
    from ringenv.vmm.reap import RingReader
    offsets = [RingReader(v.ring_gfns).reap()[1].tolist() for v in vcpus]
    assert 500 in offsets[0] and 500 not in offsets[1]
