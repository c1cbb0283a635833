"""QEMU's calc-dirty-rate in dirty-bitmap mode (``calc-dirty-rate calc-time mode=dirty-bitmap``).

Before migration starts, log dirty pages of the whole VM for ``seconds`` with
KVM_GET_DIRTY_LOG and report dirtied bytes per second. This runs on its own VM (no ring: the
ring size is not chosen yet, and KVM fixes it once vCPUs exist), with the same host, memory,
vCPUs, workload and seed as the run that follows.
"""

from __future__ import annotations

from ..config import ScenarioConfig, load_scenario
from ..guest.workload import WorkloadProgram
from ..kvm import Vm, uapi
from ..kvm.memory import bitmap_offsets

SECOND = 1_000_000_000


def calc_dirty_rate(scenario: ScenarioConfig | str | dict, *, workload=None, seed: int = 0,
                    seconds: float = 1.0) -> float:
    """Dirtied bytes per second over ``seconds`` of simulated time (page granularity)."""
    cfg = scenario if isinstance(scenario, ScenarioConfig) else load_scenario(scenario)
    vm = Vm(cfg.profile, seed=seed)
    vm.set_user_memory_region(0, 0, 0, cfg.vm.memory, block_fraction=cfg.vm.block_fraction)
    vcpus = [vm.create_vcpu(i) for i in range(cfg.vm.vcpus)]
    vm.attach_guest(WorkloadProgram(workload if workload is not None else cfg.workload, cfg.vm.vcpus,
                                    seed=seed, rate_scale=cfg.rate_scale))
    vm.set_user_memory_region(0, uapi.KVM_MEM_LOG_DIRTY_PAGES, 0, cfg.vm.memory)
    for v in vcpus:
        v.run()
    vm.run_until(int(seconds * SECOND))
    dirty = len(bitmap_offsets(vm.get_dirty_log(0), vm.slots[0].npages))
    page_size = vm.page_size
    vm.close()  # free its memory now, not at the next cyclic collection
    return dirty * page_size / seconds
