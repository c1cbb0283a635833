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


def _cold_run(rc: float, busy: float, seconds: float = 0.4, seed: int = 3, scan: bool = False, weights=None,
              phases=None, watch=None):
    """vCPUs writing uniformly (or sweeping) over all of a 1 GiB slot at r = rc / C writes per
    ns in all (split by ``weights``: one vCPU per weight), the slot's pages re-protected every
    10 ms: (faults, kernel ns, vm) of vCPU 0; ``watch(vm, program)`` is called every 10 ms."""
    rate_mbps = rc / C * NS * GUEST_WRITE / 1e6
    region = {"fraction": 1.0, "rate_mbps": rate_mbps}
    if scan:
        region["pattern"] = "scan"
    if weights:
        region["vcpu_weights"] = weights
    wl = {"name": "cold", "cpu_busy": busy, "regions": [region], "phases": phases}
    nv = len(weights or [1])
    vm = Vm("arm64-4k", seed=seed)
    vm.set_user_memory_region(0, uapi.KVM_MEM_LOG_DIRTY_PAGES, 0, MEM)
    vcpus = [vm.create_vcpu(i) for i in range(nv)]
    prog = WorkloadProgram(wl, nv, seed=seed)
    vm.attach_guest(prog)
    assert all(v.run() is None for v in vcpus)
    t = 0
    while t < seconds * NS:
        t += NS // 100
        assert vm.run_until(t) == []
        vm.get_dirty_log(0)  # re-protects the pages written
        if t == NS // 10:
            vm.kernel_ns_at_100ms = vcpus[0].stats.fault_ns
        if watch is not None:
            watch(vm, prog)
    return vcpus[0].stats.faults, vcpus[0].stats.fault_ns, vm


def test_a_cpu_bound_vcpu_slows_by_the_time_it_spends_in_faults():
    faults, kernel_ns, _ = _cold_run(0.5, 1.0)
    elapsed = 0.4 * NS
    # speed 1/1.5: faults at r/1.5, kernel share 1/3 (the first 10 ms also split the blocks)
    assert kernel_ns / elapsed == pytest.approx(1 / 3, rel=0.05)
    assert faults == pytest.approx(0.5 / C * elapsed / 1.5, rel=0.05)


def test_a_vcpu_with_idle_time_absorbs_the_faults_at_full_speed():
    speeds = set()
    faults, kernel_ns, vm = _cold_run(0.5, 0.2, watch=lambda vm, prog: speeds.update(prog.speed.tolist()))
    assert kernel_ns / (0.4 * NS) == pytest.approx(0.5, rel=0.05)
    assert speeds == {1.0}  # never slowed down
    # the same run, write for write, as a workload with no work of its own (0.5 <= 1 either way)
    faults0, kernel0, vm0 = _cold_run(0.5, 0.0)
    assert (faults, kernel_ns) == (faults0, kernel0)
    assert (vm.slots[0].dirty_bitmap == vm0.slots[0].dirty_bitmap).all()


def test_each_vcpu_slows_by_its_own_faults_and_the_writer_shares_follow():
    # weights 6:1 of r c = 1.4: vCPU 0 r c = 1.2, vCPU 1 r c = 0.2; cpu_busy 1: speeds
    # 1 / 2.2 and 1 / 1.2, kernel shares 1.2 / 2.2 and 0.2 / 1.2
    seen = []
    _cold_run(1.4, 1.0, weights=[6, 1], watch=lambda vm, prog: seen.append(
        (prog.speed.copy(), vm.vcpu_kernel_ns().copy())))
    speed, k_end = seen[-1]
    assert speed.tolist() == pytest.approx([1 / 2.2, 1 / 1.2], rel=0.02)
    share = (k_end - seen[9][1]) / (0.3 * NS)  # from 100 ms on
    assert share.tolist() == pytest.approx([1.2 / 2.2, 0.2 / 1.2], rel=0.03)


def test_a_first_short_window_does_not_set_the_speed_of_the_windows_after_it():
    """A fault in the first microseconds is one fault within the closed loop's ms of memory,
    not a load: with nothing to end the next window for 0.2 s (no ring, no re-protect, as with
    the bitmap between two syncs), it runs at full speed (r c = 0.2: no slow-down is due). A
    speed taken from the first 2 us alone (4000 ns of fault in 2000 ns) halved it."""
    rc = 0.2
    wl = {"name": "scan", "cpu_busy": 0.0,
          "regions": [{"fraction": 1.0, "rate_mbps": rc / C * NS * GUEST_WRITE / 1e6, "pattern": "scan"}]}
    vm = Vm("arm64-4k", seed=0)
    vm.set_user_memory_region(0, uapi.KVM_MEM_LOG_DIRTY_PAGES, 0, MEM)
    vcpu = vm.create_vcpu(0)
    prog = WorkloadProgram(wl, 1, seed=0)
    vm.attach_guest(prog)
    assert vcpu.run() is None
    assert vm.run_until(2000) == [] and vcpu.stats.faults == 1  # (the sweep's first page, at t = 0)
    assert vm.run_until(NS // 5) == []
    assert prog.speed.tolist() == [1.0]
    assert vcpu.stats.faults == pytest.approx(rc / C * NS / 5, rel=0.01)


def test_a_burst_slows_the_workload_from_its_first_window_and_calm_restores_full_speed():
    # cpu_busy 0.2, r c = 0.5 calm (load 0.7: full speed) and x4 in bursts (load 2.2: speed
    # 1/2.2, kernel share 2 / 2.2): the kernel time per write is measured in calm phases and
    # scaled by the burst's rate at its start, so no 10 ms interval passes the vCPU's time
    phases = {"calm_multiplier": 1.0, "burst_multiplier": 4.0, "mean_calm_s": 0.05, "mean_burst_s": 0.05}
    seen = []
    _cold_run(0.5, 0.2, seconds=1.0, phases=phases, watch=lambda vm, prog: seen.append(
        (int(vm.vcpu_kernel_ns()[0]), prog.speed[0], prog.multiplier(vm.now)[0])))
    k = [x[0] for x in seen]
    shares = [(b - a) / (NS // 100) for a, b in zip(k, k[1:])]
    assert max(shares) < 1.0
    assert max(shares) > 0.85  # the bursts did come, and near 2 / 2.2
    assert {x[1] for x in seen if x[2] == 1.0} == {1.0}  # exactly full speed whenever calm
    assert min(x[1] for x in seen) == pytest.approx(1 / 2.2, rel=0.05)


def test_a_silent_calm_phase_keeps_what_the_last_burst_measured():
    """calm_multiplier 0 (no writes between bursts): long calm phases (~1 s, past the ~0.75 s
    after which a time-decayed estimate underflowed to nothing) must not wipe the kernel time
    per write measured in the bursts, so every burst after the first runs at the slowed speed
    from its first window: cpu_busy 0.2, r c = 0.6 x 4 in bursts (load 2.6: speed 1/2.6), no 10 ms
    interval of a later burst passes the vCPU's time."""
    phases = {"calm_multiplier": 0.0, "burst_multiplier": 4.0, "mean_calm_s": 1.0, "mean_burst_s": 0.1}
    seen = []
    _cold_run(0.6, 0.2, seconds=6.0, seed=5, phases=phases, watch=lambda vm, prog: seen.append(
        (int(vm.vcpu_kernel_ns()[0]), prog.multiplier(vm.now)[0])))
    k = [x[0] for x in seen]
    shares = [(b - a) / (NS // 100) for a, b in zip(k, k[1:])]
    burst_starts = [i for i in range(1, len(seen) - 1) if seen[i][1] > 0 and seen[i - 1][1] == 0]
    assert len(burst_starts) >= 3, burst_starts
    later = [shares[i] for i in burst_starts[1:]]
    assert max(later) < 1.0, later


def test_the_kernel_never_takes_more_than_all_of_a_vcpus_time():
    # the open-loop model charged 2 s of faults per second here
    faults, kernel_ns, vm = _cold_run(2.0, 0.0)
    # from 100 ms on, all of its time and no more
    assert (kernel_ns - vm.kernel_ns_at_100ms) / (0.3 * NS) == pytest.approx(1.0, abs=0.01)
    # before, the first window (10 ms, to the first re-protection) ran at full speed, as
    # nothing had been measured yet: 20 ms of faults in 10 ms, the run's only excess
    assert kernel_ns <= 0.4 * NS + 0.0105 * NS


def test_a_sweep_slows_down_too():
    # a sequential sweep writes each page once per pass: every write faults, one per page
    faults, kernel_ns, _ = _cold_run(0.5, 1.0, scan=True)
    assert kernel_ns / (0.4 * NS) == pytest.approx(1 / 3, rel=0.05)
    assert faults == pytest.approx(0.5 / C * 0.4 * NS / 1.5, rel=0.05)


def test_a_program_attached_to_a_vm_with_kernel_time_does_not_count_it():
    # the VM ran another program first: 0.1 s of a cold writer at r c = 2 (cpu_busy 0)
    vm = _cold_run(2.0, 0.0, seconds=0.1)[2]
    assert vm.vcpu_kernel_ns()[0] > 0.09 * NS
    prog = WorkloadProgram({"name": "light", "cpu_busy": 0.5, "regions": [{"fraction": 0.1, "rate_mbps": 1}]}, 1)
    vm.attach_guest(prog)
    assert vm.run_until(vm.now + NS // 1000) == []  # its first windows: nothing of its own yet
    assert prog.speed[0] == 1.0


@pytest.mark.parametrize("bad", [-0.1, 1.5, "lots"])
def test_a_bad_cpu_busy_names_the_field_and_the_range(bad):
    with pytest.raises(ConfigError, match="cpu_busy") as e:
        load_workload({"name": "x", "cpu_busy": bad, "regions": [{"fraction": 0.5, "rate_mbps": 10}]})
    assert ("number" if isinstance(bad, str) else "equal to") in str(e.value)
