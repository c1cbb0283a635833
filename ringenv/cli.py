"""The ``ringenv`` command. Simulator subcommands live here; the agents' subcommands (run,
train, evaluate, compare) are added by ``agents.cli`` when that package is installed, so
nothing under ringenv/ imports agents/ at import time."""

from __future__ import annotations

import argparse
import json
import os
import select
import sys

from .config import HOST_PROFILES, ConfigError


def _cmd_replay(args) -> int:
    from .replay import load_trace, replay_trace

    out = replay_trace(load_trace(args.trace), profile=args.profile, ring_entries=args.ring_entries)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


def positive_float(s: str) -> float:
    """argparse type of a positive, finite number option."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"{s} is not a positive finite number")
    return v


def positive_int(s: str) -> int:
    """argparse type of a positive integer option (the subcommands' parsers share it)."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{v} is not positive")
    return v


DESCRIPTION = ("A Gymnasium environment around a simulated arm64 KVM host with per-vCPU dirty rings, live "
               "migration and checkpointing. One command for the simulator's subcommands ({sim}) and, when the "
               "agents package is installed, the agents' ({agents}). `ringenv COMMAND --help` describes each.")
AGENT_COMMANDS = ("run", "train", "evaluate", "compare")


def package_version() -> str:
    """The installed ringenv distribution's version (importlib.metadata), or "unknown" when it runs
    from a source tree that was never installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ringenv")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ringenv")
    ap.add_argument("--version", action="version", version=f"%(prog)s {package_version()}",
                    help="print the package version and exit")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("replay", help="replay a write trace on the simulated host, print the harvests as JSON",
                       description="Replay TRACE.json on the simulated host; print profile, resets and "
                                   "per-vCPU harvest batches as JSON (see ringenv/replay.py for the format).")
    p.add_argument("trace", metavar="TRACE.json", help="the trace file (-: standard input)")
    p.add_argument("--profile", default=None, help=f"host profile name or YAML file (default arm64-4k; "
                                                   f"names: {', '.join(HOST_PROFILES)})")
    p.add_argument("--ring-entries", type=positive_int, default=None, help="override the trace's ring size")
    p.set_defaults(func=_cmd_replay)
    for mod in ("ringenv.demo", "ringenv.realkvm.cli", "ringenv.vmm.cli", "agents.cli"):
        try:
            m = __import__(mod, fromlist=["add_parsers"])
        except ModuleNotFoundError as e:
            if e.name and (mod == e.name or mod.startswith(e.name + ".")):
                continue
            raise
        m.add_parsers(sub)
    names = list(sub.choices)
    agents = [n for n in AGENT_COMMANDS
              if n in names and sub.choices[n].get_default("func").__module__ != "ringenv.demo"]
    ap.description = DESCRIPTION.format(sim=", ".join(n for n in names if n not in agents),
                                        agents=", ".join(agents) or "not installed")
    return ap


#: the exit code of a command whose standard output's reader went away: 128 + SIGPIPE, what a
#: shell reports for a command the signal ended
SIGPIPE_EXIT = 141


def stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reader went away (`... | head`): polling its
    descriptor reports an error then (POLLERR). Tells a BrokenPipeError of standard output from
    one of another pipe (a subprocess's)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # (no standard output, or not a file descriptor)
        return False


def end_for_closed_stdout() -> int:
    """End quietly after standard output's reader went away: standard output goes to the null
    device (so that the interpreter's last flush finds no pipe either); returns
    :data:`SIGPIPE_EXIT`."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return SIGPIPE_EXIT


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if sys.stdout is None:  # started with standard output closed (`>&-`): each command prints its result there
        print(f"ringenv {args.command}: standard output is closed; run it with standard output open "
              "(>/dev/null to discard it)", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's 128 + SIGINT, as the agents' commands
        print(f"ringenv {args.command}: interrupted", file=sys.stderr)
        return 130
    except ConfigError as e:
        print(f"ringenv {args.command}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError as e:
        if stdout_reader_gone():  # `... | head`: stop quietly, as a pipeline expects
            return end_for_closed_stdout()
        print(f"ringenv {args.command}: {e}", file=sys.stderr)  # another pipe (e.g. a subprocess's)
        return 1
    except OSError as e:
        print(f"ringenv {args.command}: {e}", file=sys.stderr)
        return 1
