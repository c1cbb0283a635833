"""`make bench`: every benchmark of the project, printed as one table of figures and targets.

    python -m benchmarks                 # all of them (what `make bench` runs)
    python -m benchmarks host env_speed  # only these modules, in the order given
"""

from __future__ import annotations

import argparse
import importlib
import sys

MODULES = ["benchmarks.host", "benchmarks.vmm_speed", "benchmarks.env_speed", "benchmarks.env_floor",
           "benchmarks.memory"]
NAMES = [m.split(".", 1)[1] for m in MODULES]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run the project's benchmarks and print one table of figures against their targets "
                    "(speeds as ratios measured in the same run). A full run takes a few minutes.")
    p.add_argument("only", nargs="*", metavar="NAME",
                   help=f"run only these benchmark modules, in this order (default: all). Accepted: {', '.join(NAMES)}")
    args = p.parse_args(argv)
    bad = [n for n in args.only if n not in NAMES]
    if bad:
        p.error(f"unknown benchmark {bad[0]!r}; accepted: {', '.join(NAMES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = []
    for name in [f"benchmarks.{n}" for n in args.only] or MODULES:
        mod = importlib.import_module(name)  # a module missing is an error, not rows left out
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows += mod.main()
    w = max(len(r[0]) for r in rows)
    print(f"| {'figure':{w}} | measured | target |")
    print(f"|{'-' * (w + 2)}|----------|--------|")
    for name, value, target in rows:
        print(f"| {name:{w}} | {value} | {target} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
