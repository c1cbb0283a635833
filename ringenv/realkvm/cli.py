"""``ringenv`` subcommands that drive the real /dev/kvm: kvm-replay, validate, calibrate.

``add_parsers(subparsers)`` adds them; each handler takes the parsed args and returns the
exit code, printing any error as one line ``ringenv COMMAND: message`` on stderr (never a
traceback):

- 0 ok;
- 1 a difference (validate), or the run failed (unexpected guest exit, timeout, ioctl error;
  calibrate: --out not written at the end, the profile printed instead);
- 2 it cannot run: bad input (the same message as ``ringenv replay``; calibrate: an --out that
  cannot be written, before measuring), the simulator missing or every trace skipped
  (validate), or the host's KVM unusable: /dev/kvm missing or not permitted, API version,
  a capability or ring size the host lacks (``ioctl.KvmUnavailable``), unsupported arch;
- 130 interrupted (Ctrl-C); every VM, vCPU and mapping is released first.

``RINGENV_KVM_DEV`` selects another KVM device node (see ``ringenv.realkvm.ioctl``).
"""

from __future__ import annotations

import json
import sys

from ringenv.cli import positive_float, positive_int  # as ``ringenv replay``'s options


def _guarded(command: str):
    """Turn the handler's exceptions into one stderr line and the exit codes above."""
    def wrap(fn):
        def handler(args) -> int:
            from ringenv.realkvm.ioctl import KvmUnavailable

            def fail(code: int, msg: object) -> int:
                print(f"ringenv {command}: {msg}", file=sys.stderr)
                return code
            try:
                return fn(args)
            except (KvmUnavailable, NotImplementedError) as exc:
                return fail(2, exc)
            except ValueError as exc:  # bad JSON or a trace that breaks the contract
                return fail(2, exc)
            except KeyboardInterrupt:
                return fail(130, "interrupted")
            except BrokenPipeError:  # (ringenv's main tells a closed standard output from another pipe)
                raise
            except (OSError, RuntimeError) as exc:  # incl. TimeoutError, GuestError
                return fail(1, exc)
        handler.__name__ = fn.__name__
        return handler
    return wrap


@_guarded("kvm-replay")
def _cmd_kvm_replay(args) -> int:
    from ringenv.realkvm.replay import kvm_replay_trace
    from ringenv.replay import load_trace, timing_dependent, validate_trace

    trace = validate_trace(load_trace(args.trace))
    why = timing_dependent(trace)
    if why:
        print(f"ringenv kvm-replay: note: this trace's outcome depends on thread timing: {why}; another run "
              "may differ, and the simulator gives one of the possible outcomes", file=sys.stderr)
    out = kvm_replay_trace(trace, ring_entries=args.ring_entries, timeout=args.timeout, faults=args.faults)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


@_guarded("validate")
def _cmd_validate(args) -> int:
    from ringenv.realkvm.validate import IDENTICAL, SKIPPED, validate

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
        skipped = sum(v.startswith(SKIPPED) for v in result.values())
        print(f"{same}/{len(result) - skipped} traces identical (real KVM vs simulator)"
              + (f"; {skipped} skipped (this host refuses their ring size)" if skipped else ""))
    compared = [v for v in result.values() if not v.startswith(SKIPPED)]
    if not compared:  # nothing to compare is not a difference: the host cannot run the check
        print(f"ringenv validate: no trace could be compared: this host refuses the ring size of each of the "
              f"{len(result)} traces (skipped); run it on a host that takes them (x86 without PML)", file=sys.stderr)
        return 2
    return 0 if all(v == IDENTICAL for v in compared) else 1


@_guarded("calibrate")
def _cmd_calibrate(args) -> int:
    from ringenv.realkvm.calibrate import ProfileNotWritten, calibrate

    try:
        text = calibrate(args.out)
    except ProfileNotWritten as exc:  # measured, but --out failed at the end: keep the profile
        sys.stdout.write(exc.profile)
        raise
    sys.stdout.write(text)
    return 0


def add_parsers(subparsers) -> None:
    """Add kvm-replay, validate and calibrate to an argparse subparsers object."""
    p = subparsers.add_parser(
        "kvm-replay", help="replay a write trace on the real KVM (/dev/kvm), print JSON",
        description="Run TRACE.json ('-' for stdin) on the real KVM with a native guest, one "
                    "thread per vCPU; print the same JSON as `ringenv replay`.")
    p.add_argument("trace", metavar="TRACE.json", help="the trace file (-: standard input)")
    p.add_argument("--ring-entries", type=positive_int, default=None,
                   help="override the trace's ring size (entries)")
    p.add_argument("--timeout", type=positive_float, default=120.0, metavar="SECONDS",
                   help="stop the guest and fail (exit 1) if the replay takes longer (default 120)")
    p.add_argument("--faults", action="store_true",
                   help="also report \"faults\", per vCPU and in all: the stage-2 faults (pf_fixed) of the accesses "
                        "to the data slot (warm-up vCPUs first map the guest's code slot)")
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
