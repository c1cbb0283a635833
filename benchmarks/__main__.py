"""`make bench`: every benchmark of the project, printed as one table of figures and targets."""

from __future__ import annotations

import importlib
import sys

MODULES = ["benchmarks.host", "benchmarks.vmm_speed", "benchmarks.env_speed", "benchmarks.env_floor",
           "benchmarks.memory"]


def main() -> int:
    rows = []
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
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
