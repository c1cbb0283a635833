"""``ringenv migrate`` and ``ringenv checkpoint``: run one scenario and print its metrics.

``add_parsers(subparsers)`` adds both (ringenv/cli.py loads it). Exit codes: 0 done and
verified (or a checkpoint run that took no checkpoint before its horizon: nothing to verify,
said on stderr); 1 the run lost writes, or the kernel overwrote entries of a full ring (its WARN;
vCPUs may then wedge, the guest hung): each printed loudly on stderr, a bug or a configuration
that really loses data (a stage-2 block written with splitting off); 2 a bad flag or
configuration value (the message names the flag and what is accepted).
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from ..config import ConfigError

#: scenario field -> command-line flag, to name the flag in validation errors
FLAGS = {
    "collector": "--collector", "ring_entries": "--ring-entries", "interval_ms": "--interval-ms",
    "throttle": "--throttle", "seed": "--seed", "checkpoint.period_s": "--period-s",
    "checkpoint.storage_mbps": "--storage-mbps", "checkpoint.horizon_s": "--horizon-s",
    "vm.zero_fraction": "--zero-fraction", "link.give_up_s": "--give-up-s",
    "link.give_up_action": "--give-up-action", "link.cancel_at_s": "--cancel-at", "scenario": "--scenario",
}

SUMMARY = {
    "migration": ["downtime_s", "total_s", "converged", "cancelled", "iterations", "passes", "bytes_sent", "pages_sent",
                  "pages_resent", "zero_pages", "full_exits", "vcpu_exit_s", "vcpu_stall_s", "vcpu_throttle_s",
                  "vcpu_fault_s", "vmm_cpu_s", "harvests", "resets", "entries_harvested", "tlb_flushes",
                  "get_dirty_log_calls", "clear_dirty_log_calls", "ring_bytes", "ring_overflows",
                  "wedged_vcpus", "lost_writes",
                  "verified"],
    "checkpoint": ["checkpoints", "downtime_s", "pause_total_s", "checkpoint_overruns",
                   "checkpoint_slots_missed", "total_s", "converged",
                   "iterations", "bytes_sent", "pages_sent", "pages_resent", "zero_pages", "full_exits",
                   "vcpu_exit_s", "vcpu_stall_s", "vcpu_throttle_s", "vcpu_fault_s", "vmm_cpu_s", "harvests",
                   "resets", "entries_harvested", "tlb_flushes", "get_dirty_log_calls", "clear_dirty_log_calls",
                   "ring_bytes", "ring_overflows", "wedged_vcpus", "lost_writes", "verified"],
}


def _name_flags(msg: str, given: dict) -> str:
    """The config error with the flag named after each field that came from a flag (``given``:
    the overrides the flags made; the scenario name always does), not after one from the file;
    its header names the options given, not the loader's "keyword overrides"."""
    flat = {"scenario"} | {k for k, v in given.items() if not isinstance(v, dict)} | {
        f"{k}.{j}" for k, v in given.items() if isinstance(v, dict) for j in v}
    for field, flag in FLAGS.items():
        if field in flat:
            msg = re.sub(rf"(^|\n  ){re.escape(field)}:", rf"\g<1>{field} ({flag}):", msg)
    options = [flag for field, flag in FLAGS.items() if field in flat and field != "scenario"]
    stw = given.get("checkpoint", {}).get("stop_the_world")
    options += [] if stw is None else ["--no-live" if stw else "--live"]
    said = f" with the options {' '.join(options)}" if options else ""
    return re.sub(r" with the keyword overrides \([^)]*\)", lambda _: said, msg, count=1)


def _overrides(args, kind: str) -> dict:
    ov = {}
    for field in ("collector", "ring_entries", "interval_ms", "throttle", "seed"):
        v = getattr(args, field)
        if v is not None:
            ov[field] = v
    if args.zero_fraction is not None:
        ov["vm"] = {"zero_fraction": args.zero_fraction}
    if kind == "migration":
        link = {k: getattr(args, k) for k in ("give_up_s", "give_up_action", "cancel_at_s")
                if getattr(args, k) is not None}
        if link:
            ov["link"] = link
    if kind == "checkpoint":
        ck = {k: getattr(args, k) for k in ("period_s", "storage_mbps", "horizon_s") if getattr(args, k) is not None}
        if args.live is not None:
            ck["stop_the_world"] = not args.live
        if ck:
            ov["checkpoint"] = ck
    return ov


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10000:
        return f"{value:,}"
    return str(value)


def _run(args, kind: str) -> int:
    from ..config import load_scenario
    from .metrics import Metrics

    given = _overrides(args, kind)
    try:
        cfg = load_scenario(args.scenario, run_kind=kind, **given)  # (the command decides the kind)
    except ConfigError as e:
        raise ConfigError(_name_flags(str(e), given)) from None
    unused = [FLAGS[k] for k in ("ring_entries", "interval_ms") if k in given]
    if cfg.collector == "bitmap" and unused:
        raise ConfigError(f"{' and '.join(unused)}: not used by the dirty-bitmap collector (it has no ring and no "
                          f"reaper thread); accepted: leave {'it' if len(unused) == 1 else 'them'} out, "
                          "or --collector ring")
    if kind == "migration":
        from .migration import MigrationRun as Run
    else:
        from .checkpoint import CheckpointRun as Run
    run = Run(cfg)
    m = run.run()
    if args.json:
        json.dump(m.to_dict(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        ring = (f"ring {cfg.ring_entries} entries, reaper {cfg.interval_ms:g} ms" if cfg.collector == "ring"
                else "dirty bitmap")
        print(f"{kind} of scenario {cfg.name}: {cfg.profile.name}, {cfg.vm.memory / 2**20:g} MiB, "
              f"{cfg.vm.vcpus} vCPUs, "
              f"workload {cfg.workload_config.name}; {ring}; throttle {cfg.throttle}; seed {cfg.seed}")
        docs = Metrics.field_docs()
        d = m.to_dict()
        width = max(map(len, SUMMARY[kind]))
        for k in SUMMARY[kind]:
            print(f"  {k:<{width}}  {_format(d[k]):>16}  {docs.get(k, '')}")
    failed = False
    if m.lost_writes:
        print(f"ringenv {args.command}: LOST WRITES: {m.lost_writes} pages of the "
              f"{'destination' if kind == 'migration' else 'checkpoint image'} differ from the source",
              file=sys.stderr)
        failed = True
    if m.ring_overflows:
        wedged = (f"; {m.wedged_vcpus} of {cfg.vm.vcpus} vCPUs wedged (KVM_RUN keeps returning ring-full with "
                  "nothing to harvest: the guest hangs)" if m.wedged_vcpus else "")
        print(f"ringenv {args.command}: RING OVERFLOW: the kernel overwrote {m.ring_overflows} entries of full "
              "rings (its WARN: one write dirtied more pages than the reserved entries hold, as a stage-2 block "
              f"written with splitting off does){wedged}; lost_writes is then a lower bound (a page whose entry "
              "was overwritten stays writable, and later writes to it are not modelled)", file=sys.stderr)
        failed = True
    if failed:
        return 1
    if m.cancelled:
        when = (f"at give-up ({cfg.link.give_up_s:g} s)" if run.cancel_ns is None
                else f"(migrate_cancel at {cfg.link.cancel_at_s:g} s)")
        vm = f"the VM, stopped {m.downtime_s:.6g} s for the switchover," if m.downtime_s else "the VM"
        print(f"ringenv {args.command}: cancelled {when}: {vm} runs on at the source, nothing verified",
              file=sys.stderr)
    elif m.verified is None:
        why = ("no checkpoint was taken before the horizon (the base image took longer)" if kind == "checkpoint"
               else f"the migration did not complete ({m.phase} at {m.time_s:g} s)")
        print(f"ringenv {args.command}: nothing verified: {why}", file=sys.stderr)
    return 0


def _cmd_migrate(args) -> int:
    return _run(args, "migration")


def _cmd_checkpoint(args) -> int:
    return _run(args, "checkpoint")


#: what an option left out takes (the help of the options a scenario sets)
SCENARIO_DEFAULT = "default: the scenario's"


def _common(p: argparse.ArgumentParser, throttles=("none", "auto-converge", "dirty-limit")) -> None:
    from ..config import scenario_names

    p.add_argument("--scenario", default="default", metavar="NAME|FILE",
                   help=f"a scenario in configs/scenarios ({', '.join(scenario_names())}) or a YAML file "
                        "(default: default)")
    p.add_argument("--collector", choices=["ring", "bitmap"], default=None,
                   help="dirty-page collector: the KVM dirty ring or the dirty bitmap (GET/CLEAR_DIRTY_LOG); "
                        f"{SCENARIO_DEFAULT}")
    p.add_argument("--ring-entries", type=int, default=None, metavar="N",
                   help=f"ring entries per vCPU (a power of two the host accepts); {SCENARIO_DEFAULT}")
    p.add_argument("--interval-ms", type=float, default=None, metavar="T",
                   help=f"reaper interval in ms (QEMU: 1000); {SCENARIO_DEFAULT}")
    p.add_argument("--throttle", choices=list(throttles), default=None,
                   help=f"guest throttle (dirty-limit needs the ring); {SCENARIO_DEFAULT}")
    p.add_argument("--seed", type=int, default=None, metavar="S",
                   help=f"seed of the VM and workload; {SCENARIO_DEFAULT}")
    p.add_argument("--zero-fraction", type=float, default=None, metavar="F",
                   help="share of guest RAM that is zero when the VM starts (0..1: sent as QEMU sends zero "
                        f"pages, a header each); {SCENARIO_DEFAULT}")
    p.add_argument("--json", action="store_true", help="print every metric as JSON")


def add_parsers(sub) -> None:
    p = sub.add_parser("migrate", help="run one live migration of a scenario and print its metrics",
                       description="Run one pre-copy live migration of a scenario on the simulated host, "
                                   "QEMU-style (ringenv/vmm), and print the metrics; exit 1 if writes were lost "
                                   "or a ring overflowed.")
    _common(p)
    p.add_argument("--give-up-s", type=float, default=None, metavar="S",
                   help=f"simulated seconds after which the VMM gives up on converging; {SCENARIO_DEFAULT}")
    p.add_argument("--give-up-action", choices=["switchover", "cancel"], default=None,
                   help="at give-up: force the switchover, or cancel the migration (QEMU's migrate_cancel, nova's "
                        f"abort); {SCENARIO_DEFAULT}")
    p.add_argument("--cancel-at", dest="cancel_at_s", type=float, default=None, metavar="S",
                   help="an operator's migrate_cancel this many simulated seconds into the migration (served once "
                        f"it has the big lock; none once the migration completed); {SCENARIO_DEFAULT}")
    p.set_defaults(func=_cmd_migrate)
    p = sub.add_parser("checkpoint", help="run periodic checkpointing of a scenario and print its metrics",
                       description="Checkpoint a scenario periodically on the simulated host (ringenv/vmm) and "
                                   "print the metrics; exit 1 if a checkpoint image lost writes or a ring overflowed.")
    _common(p, throttles=("none", "dirty-limit"))  # (auto-converge is a migration's)
    p.add_argument("--period-s", type=float, default=None, help=f"seconds between checkpoints; {SCENARIO_DEFAULT}")
    p.add_argument("--storage-mbps", type=float, default=None, help=f"storage bandwidth, MB/s; {SCENARIO_DEFAULT}")
    p.add_argument("--horizon-s", type=float, default=None, help=f"simulated seconds to run; {SCENARIO_DEFAULT}")
    p.add_argument("--live", action=argparse.BooleanOptionalAction, default=None,
                   help="write the dirty set live and pause only for the rest (--no-live: stop the world "
                        f"for the whole write); {SCENARIO_DEFAULT}")
    p.set_defaults(func=_cmd_checkpoint)
