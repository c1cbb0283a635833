"""QEMU's calc-dirty-rate in dirty-bitmap mode (``calc-dirty-rate calc-time mode=dirty-bitmap``),
read in windows.

Before migration starts, log dirty pages of the whole VM for ``seconds`` with
KVM_GET_DIRTY_LOG and report dirtied bytes per second. This runs on its own VM (no ring: the
ring size is not chosen yet, and KVM fixes it once vCPUs exist), with the same host, memory,
vCPUs, workload and seed as the run that follows. The sample covers the ``seconds`` BEFORE that
run, the first ``seconds`` of the workload's timeline: the run is then started with
``workload_start_s=seconds`` (:class:`~ringenv.vmm.session.Session`), so that it goes on from
where the sample left the workload (its phase, its sweeps) with writes of its own: the sample
tells what the workload was doing, not what the run's first second will draw.
"""

from __future__ import annotations

import numpy as np

from ..config import ScenarioConfig, load_scenario
from ..guest.workload import WorkloadProgram
from ..kvm import Vm, uapi

SECOND = 1_000_000_000


def sample_dirty_rate(scenario: ScenarioConfig | str | dict, *, workload=None, seed: int = 0,
                      seconds: float = 1.0, windows: int = 1) -> tuple[float, float]:
    """(dirty rate, re-dirty rate) in bytes/s over ``seconds`` of simulated time.

    The bitmap is read ``windows`` times over the sample (KVM_GET_DIRTY_LOG without manual
    protect, which clears it and re-protects the pages). The dirty rate is the distinct pages
    dirtied over the whole sample, what calc-dirty-rate reports; the re-dirty rate counts the
    dirty events of a window whose page was already dirtied in an earlier window (0 with one
    window). Re-dirtied pages are the write-protect faults a collector pays again after every
    harvest: a hot set has many, a sequential sweep or a uniform spread over a large region
    almost none."""
    cfg = scenario if isinstance(scenario, ScenarioConfig) else load_scenario(scenario)
    vm = Vm(cfg.profile, seed=seed, page_versions=False)  # nothing here compares page contents
    vm.set_user_memory_region(0, 0, 0, cfg.vm.memory, block_fraction=cfg.vm.block_fraction)
    vcpus = [vm.create_vcpu(i) for i in range(cfg.vm.vcpus)]
    vm.attach_guest(WorkloadProgram(workload if workload is not None else cfg.workload, cfg.vm.vcpus,
                                    seed=seed, rate_scale=cfg.rate_scale))
    vm.set_user_memory_region(0, uapi.KVM_MEM_LOG_DIRTY_PAGES, 0, cfg.vm.memory)
    for v in vcpus:
        v.run()
    events, union = 0, None
    for k in range(1, windows + 1):
        vm.run_until(int(seconds * SECOND * k / windows))
        bm = vm.get_dirty_log(0)
        events += _popcount(bm)
        union = bm.copy() if union is None else np.bitwise_or(union, bm, out=union)
    distinct = _popcount(union)
    page_size = vm.page_size
    vm.close()  # free its memory now, not at the next cyclic collection
    return distinct * page_size / seconds, (events - distinct) * page_size / seconds


def _popcount(bitmap: np.ndarray) -> int:
    """Set bits of a u64 bitmap."""
    return int(np.bitwise_count(bitmap).sum(dtype=np.int64))
