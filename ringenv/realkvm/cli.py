"""``ringenv`` subcommands that drive the real /dev/kvm: kvm-replay, validate, calibrate.

``add_parsers(subparsers)`` adds them; each handler takes the parsed args and returns the
exit code (0 ok, 1 a difference or failure, 2 the simulator is missing).
"""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_kvm_replay(args) -> int:
    from ringenv.realkvm.replay import kvm_replay_trace

    try:
        with (sys.stdin if args.trace == "-" else open(args.trace)) as f:
            out = kvm_replay_trace(json.load(f), ring_entries=args.ring_entries)
    except ValueError as exc:  # bad JSON or a trace that breaks the contract
        print(f"ringenv kvm-replay: {exc}", file=sys.stderr)
        return 2
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


def _cmd_validate(args) -> int:
    from ringenv.realkvm.validate import IDENTICAL, validate

    try:
        result = validate()
    except ImportError as exc:
        print(f"ringenv validate: the simulator is not available ({exc})", file=sys.stderr)
        return 2
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        width = max(map(len, result))
        for name, verdict in result.items():
            print(f"{name:<{width}}  {verdict}")
        same = sum(v == IDENTICAL for v in result.values())
        print(f"{same}/{len(result)} traces identical (real KVM vs simulator)")
    return 0 if all(v == IDENTICAL for v in result.values()) else 1


def _cmd_calibrate(args) -> int:
    from ringenv.realkvm.calibrate import calibrate

    sys.stdout.write(calibrate(args.out))
    return 0


def _ring_entries(text: str) -> int:
    value = int(text)
    if value <= 0 or value & (value - 1):
        raise argparse.ArgumentTypeError(f"{value} is not a positive power of two")
    return value


def add_parsers(subparsers) -> None:
    """Add kvm-replay, validate and calibrate to an argparse subparsers object."""
    p = subparsers.add_parser(
        "kvm-replay", help="replay a write trace on the real KVM (/dev/kvm), print JSON",
        description="Run TRACE.json ('-' for stdin) on the real KVM with a native guest, one "
                    "thread per vCPU; print the same JSON as `ringenv replay`.")
    p.add_argument("trace", metavar="TRACE.json")
    p.add_argument("--ring-entries", type=_ring_entries, default=None,
                   help="override the trace's ring size (entries)")
    p.set_defaults(func=_cmd_kvm_replay)

    p = subparsers.add_parser(
        "validate", help="run the built-in traces on the real KVM and the simulator, compare",
        description="For each built-in trace (ringenv/realkvm/traces.py) report 'identical' or "
                    "the first difference between the real KVM and the simulator.")
    p.add_argument("--json", action="store_true", help="print {trace: verdict} as JSON")
    p.set_defaults(func=_cmd_validate)

    p = subparsers.add_parser(
        "calibrate", help="measure this host's dirty-logging costs, print a host profile",
        description="Measure fault, exit, harvest, reset and dirty-log costs on /dev/kvm with "
                    "small guests; print a host-profile YAML (name x86-calibrated).")
    p.add_argument("--out", metavar="FILE", help="also write the profile to FILE")
    p.set_defaults(func=_cmd_calibrate)
