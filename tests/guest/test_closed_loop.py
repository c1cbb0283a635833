"""A workload's writes and the vCPU time the kernel takes from them (the closed loop).

A vCPU in a write-protect fault is not running guest code. A workload keeps each vCPU busy a
share ``cpu_busy`` of its time with its own work; the kernel's time first fills the rest, and
only past that does the workload slow down: with L ns in the kernel per ns of the workload's
progress at full speed, it progresses at speed 1 / (cpu_busy + L) when cpu_busy + L > 1, else
at full speed. The worked case here: one vCPU writing uniformly over a large cold region (the
pages are re-protected every 10 ms, so nearly every write faults), r writes per ns, c = 4000
ns per fault (arm64-4k), r c = 0.5:

- cpu_busy 1 (a CPU-bound job): speed 1 / 1.5, fault rate r / 1.5, kernel share 1/3;
- cpu_busy 0.2 (a server with idle time): 0.2 + 0.5 <= 1, full speed, kernel share 1/2, and the
  run is the one of cpu_busy 0 to the bit;
- r c = 2 with cpu_busy 0 (where the open-loop model charged 2 s of faults per second):
  speed 1/2, kernel share r c / 2 = 1: the vCPU is in the kernel all the time, no more.
"""

from __future__ import annotations

import pytest

from ringenv.config import ConfigError, load_workload
from ringenv.guest.workload import GUEST_WRITE, WorkloadProgram
from ringenv.kvm import Vm, uapi

NS = 1_000_000_000
C = 4000  # arm64-4k wp_fault_ns
MEM = 1 << 30


def _cold_run(rc: float, busy: float, seconds: float = 0.4, seed: int = 3, scan: bool = False):
    """One vCPU writing uniformly (or sweeping) over all of a 1 GiB slot at r = rc / C writes
    per ns, the slot's pages re-protected every 10 ms: (faults, kernel ns, vm)."""
    rate_mbps = rc / C * NS * GUEST_WRITE / 1e6
    region = {"fraction": 1.0, "rate_mbps": rate_mbps}
    if scan:
        region["pattern"] = "scan"
    wl = {"name": "cold", "cpu_busy": busy, "regions": [region]}
    vm = Vm("arm64-4k", seed=seed)
    vm.set_user_memory_region(0, uapi.KVM_MEM_LOG_DIRTY_PAGES, 0, MEM)
    v = vm.create_vcpu(0)
    vm.attach_guest(WorkloadProgram(wl, 1, seed=seed))
    assert v.run() is None
    t = 0
    while t < seconds * NS:
        t += NS // 100
        assert vm.run_until(t) == []
        vm.get_dirty_log(0)  # re-protects the pages written
        if t == NS // 10:
            vm.kernel_ns_at_100ms = v.stats.fault_ns
    return v.stats.faults, v.stats.fault_ns, vm


def test_a_cpu_bound_vcpu_slows_by_the_time_it_spends_in_faults():
    faults, kernel_ns, _ = _cold_run(0.5, 1.0)
    elapsed = 0.4 * NS
    # speed 1/1.5: faults at r/1.5, kernel share 1/3 (the first 10 ms also split the blocks)
    assert kernel_ns / elapsed == pytest.approx(1 / 3, rel=0.05)
    assert faults == pytest.approx(0.5 / C * elapsed / 1.5, rel=0.05)


def test_a_vcpu_with_idle_time_absorbs_the_faults_at_full_speed():
    faults, kernel_ns, vm = _cold_run(0.5, 0.2)
    assert kernel_ns / (0.4 * NS) == pytest.approx(0.5, rel=0.05)
    # no slow-down at all: the same run, write for write, as a workload with no work of its own
    faults0, kernel0, vm0 = _cold_run(0.5, 0.0)
    assert (faults, kernel_ns) == (faults0, kernel0)
    assert (vm.slots[0].dirty_bitmap == vm0.slots[0].dirty_bitmap).all()


def test_the_kernel_never_takes_more_than_all_of_a_vcpus_time():
    # the open-loop model charged 2 s of faults per second here
    faults, kernel_ns, vm = _cold_run(2.0, 0.0)
    # from 100 ms on, all of its time and no more
    assert (kernel_ns - vm.kernel_ns_at_100ms) / (0.3 * NS) == pytest.approx(1.0, abs=0.01)
    # before, the first window (10 ms, the first re-protection) ran at full speed, as nothing
    # had been learnt yet: at most that window's excess over the whole run
    assert kernel_ns <= 0.4 * NS + 0.01 * NS * 2.0 * 1.05


def test_a_sweep_slows_down_too():
    # a sequential sweep writes each page once per pass: every write faults, one per page
    faults, kernel_ns, _ = _cold_run(0.5, 1.0, scan=True)
    assert kernel_ns / (0.4 * NS) == pytest.approx(1 / 3, rel=0.05)
    assert faults == pytest.approx(0.5 / C * 0.4 * NS / 1.5, rel=0.05)


def test_the_shipped_workloads_say_how_busy_they_keep_their_vcpus():
    assert load_workload("analytics").cpu_busy == 1.0
    assert load_workload("idle").cpu_busy < 0.2
    assert load_workload("web").cpu_busy < load_workload("hpc-stencil").cpu_busy


@pytest.mark.parametrize("bad", [-0.1, 1.5, "lots"])
def test_a_bad_cpu_busy_names_the_field_and_the_range(bad):
    with pytest.raises(ConfigError, match="cpu_busy") as e:
        load_workload({"name": "x", "cpu_busy": bad, "regions": [{"fraction": 0.5, "rate_mbps": 10}]})
    assert ("number" if isinstance(bad, str) else "equal to") in str(e.value)
