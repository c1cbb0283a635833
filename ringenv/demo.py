"""``ringenv demo``: a short look at the simulated host (also ``ringenv run`` until the agents'
comparison is installed). An 8-vCPU, 16 GiB arm64 guest running the OLTP workload for 5 simulated
seconds with a 4096-entry ring: QEMU's 1 s reaper plus reaping at every ring-full exit."""

from __future__ import annotations

import time

import numba.core.event

from .cli import positive_float

#: the longest demo, simulated s (~13 s of wall time: the demo runs at ~280x real time)
MAX_DEMO_S = 3600.0


def _demo_seconds(s: str) -> float:
    """argparse type of --seconds: a positive number up to MAX_DEMO_S (a demo, not a run:
    1e12 would never end)."""
    v = positive_float(s)
    if v > MAX_DEMO_S:
        import argparse

        raise argparse.ArgumentTypeError(f"{s} is more than {MAX_DEMO_S:g} simulated seconds; accepted: more "
                                         f"than 0, up to {MAX_DEMO_S:g} (a longer run: ringenv migrate)")
    return v
from .config import ConfigError, load_host_profile
from .guest.workload import WorkloadProgram
from .kvm import Vm, uapi
from .vmm.reap import RingReader

SECOND = 1_000_000_000
DEMO_PROFILE = "arm64-4k"


def host_demo(workload: str = "oltp", entries: int = 4096, seconds: float = 5.0, nr_vcpus: int = 8,
              mem_gib: int = 16, profile: str = "arm64-4k", seed: int = 0) -> dict:
    """Run the demo. Its ``wall_s`` and ``speed_x`` are the simulation's: the time numba spends
    compiling kernels meanwhile (the first run after an install or an upgrade: ~15 s) is left
    out and reported as ``compile_s``."""
    vm = Vm(profile, seed=seed)
    vm.enable_cap(uapi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, entries * 16)
    if vm.profile.with_bitmap_supported:
        vm.enable_cap(uapi.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
    vm.set_user_memory_region(0, 0, 0, mem_gib << 30, block_fraction=0.5)
    vcpus = [vm.create_vcpu(i) for i in range(nr_vcpus)]
    vm.attach_guest(WorkloadProgram(workload, nr_vcpus, seed=seed))
    vm.set_user_memory_region(0, uapi.KVM_MEM_LOG_DIRTY_PAGES, 0, mem_gib << 30)
    readers = [RingReader(v.ring_gfns) for v in vcpus]
    for v in vcpus:
        v.run()
    harvested = 0

    def reap():
        nonlocal harvested
        harvested += sum(len(r.reap()[1]) for r in readers)
        vm.reset_dirty_rings()

    compiling = []
    with numba.core.event.install_timer("numba:compile", compiling.append):
        t0 = time.perf_counter()
        end, tick = int(seconds * SECOND), SECOND
        while vm.now < end:
            exits = vm.run_until(min(end, tick))
            for e in exits:
                reap()
                vcpus[e.vcpu].run()
            if not exits and vm.now >= tick:
                reap()
                tick += SECOND
        reap()
        elapsed = time.perf_counter() - t0
    compile_s = sum(compiling)
    wall = max(elapsed - compile_s, 1e-9)  # wall_s to 3 significant digits: a short demo's ~1 ms is not 0
    return {"profile": vm.profile.name, "workload": workload, "ring_entries": entries, "simulated_s": seconds,
            "wall_s": float(f"{wall:.3g}"), "speed_x": round(seconds / wall, 1), "compile_s": round(compile_s, 3),
            "harvested": harvested,
            "full_exits": sum(v.stats.full_exits for v in vcpus), "resets": vm.stats.resets,
            "reprotect_calls": vm.stats.reprotect_calls, "splits": vm.stats.splits,
            "tlb_flushes": vm.stats.tlb_flushes, "lost_entries": sum(v.ring.lost for v in vcpus)}


DESCRIPTION = ("A short look at the simulated host: an 8-vCPU, 16 GiB arm64 guest (host profile arm64-4k) running "
               "a workload (OLTP by default) for a few simulated seconds with a dirty ring per vCPU, harvested as "
               "QEMU does: its 1 s reaper plus a reap at every ring-full exit. Prints the harvest, exit, reset and "
               "TLB-flush counts and the simulation speed.")


def _cmd(args) -> int:
    accepted = load_host_profile(DEMO_PROFILE).ring_sizes
    if args.ring_entries not in accepted:
        raise ConfigError(f"--ring-entries {args.ring_entries} is not accepted by host {DEMO_PROFILE}; accepted: "
                          f"{', '.join(map(str, accepted))}")
    out = host_demo(args.workload, args.ring_entries, args.seconds, profile=DEMO_PROFILE)
    w = max(map(len, out))
    for k, v in out.items():
        print(f"{k:{w}}  {v}")
    return 0


def add_parsers(sub) -> None:
    names = ["demo"]
    try:
        import agents.cli  # noqa: F401  (the agents' package provides the real `run`)
    except ModuleNotFoundError:
        names.append("run")
    for name in names:
        p = sub.add_parser(name, help="a short simulated-host demo (OLTP guest, ring, reaper)",
                           description=DESCRIPTION)
        p.add_argument("--workload", default="oltp", help="workload name (configs/workloads; default oltp)")
        p.add_argument("--ring-entries", type=int, default=4096, metavar="N",
                       help=f"ring entries per vCPU, a size host {DEMO_PROFILE} accepts: "
                            f"{', '.join(map(str, load_host_profile(DEMO_PROFILE).ring_sizes))} (default 4096)")
        p.add_argument("--seconds", type=_demo_seconds, default=5.0,
                       help=f"simulated seconds, at most {MAX_DEMO_S:g} (default 5)")
        p.set_defaults(func=_cmd)
