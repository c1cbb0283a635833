"""Compare policies on the test workloads: the table (Markdown on screen, CSV on disk) and the
plots (PNG): downtime versus exit overhead per policy (Pareto view), and ring fill and harvests
over time for one episode of the baseline and of the best policy.

``ringenv run`` is this program with its defaults: the heuristics on the default scenario's
test workloads. Add trained models by their run directory or .zip:

    python -m ringenv compare --policies qemu watermark runs/train/ppo-s0
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from .common import EnvFacts, check_env_id, check_out_dir, module_main, parse_overrides
from ringenv.config import load_workload, write_atomically

from .evaluate import (NO_POLICIES, EvalSettings, actions_label, check_baseline, check_same_task, check_spec, evaluate,
                       find_model, load_policy, markdown_per_workload, markdown_table, per_workload, policy_env,
                       run_episode, scenario_label, summarize, unsound, workloads_label, write_csv, write_results)
from .heuristics import DEFAULT_SET, is_heuristic


@dataclass
class Args(EvalSettings):
    """Compare policies on the test workloads: table, CSV and plots."""

    policies: list[str] = field(default_factory=lambda: list(DEFAULT_SET), metadata={"metavar": "SPEC"})
    """heuristic specs and/or trained models (run directory or .zip); see `ringenv evaluate --help`"""
    models: list[str] = field(default_factory=list, metadata={"metavar": "RUN"})
    """trained models to add to --policies (run directories or .zip files)"""
    seeds: int = 3
    """episodes per workload and policy"""
    out: str = "runs/compare"
    """directory for the CSV files, table.md and the PNG plots"""
    timeline_workload: str = ""
    """workload of the timeline plot (default: oltp-heavy if evaluated, else the first)"""
    plots: bool = True
    """write the PNG plots"""


def main(args: Args) -> dict:
    t0 = time.perf_counter()
    overrides = parse_overrides(args.set)
    check_out_dir(args.out)
    policies = list(dict.fromkeys(list(args.policies) + list(args.models)))
    if not policies:  # (--policies given without a value, and no --models)
        raise ValueError(NO_POLICIES)
    for m in args.models:  # named by their own flag (evaluate names --policies)
        if is_heuristic(m):
            continue
        try:
            find_model(m)
        except FileNotFoundError as e:
            raise ValueError(f"--models {m!r}: not a trained model ({e}); expected a run directory or a .zip that "
                             "ringenv train (or stable-baselines3) saved") from None
        try:
            check_spec(m, None)
        except ValueError as e:
            raise ValueError("--models" + str(e)[len("--policies"):] if str(e).startswith("--policies") else e) \
                from None
        check_env_id(args.env_id)
        check_same_task(m, args.env_id, "--models")
    check_baseline(args.baseline, policies)
    if args.plots and args.timeline_workload:
        load_workload(args.timeline_workload, where="--timeline-workload")  # now, not after every episode
    records = evaluate(policies, args.env_id, args.scenario, args.split, args.workloads, args.seeds, args.seed0,
                       overrides, args.workers, args.progress, desc="compare", stochastic=args.stochastic)
    rows = summarize(records, args.baseline)
    pngs = ("pareto.png", "timeline.png") if args.plots and rows else ()
    out = write_results(args.out, records, rows, {"args": dataclasses.asdict(args)},
                        also=("per_workload.csv", "table.md") + pngs)
    write_csv(out / "per_workload.csv", per_workload(records))
    wls = list(dict.fromkeys(r["workload"] for r in records))
    label = workloads_label(args.split, args.workloads)
    header = (f"Scenario {scenario_label(args.scenario, args.set)}, {label} ({', '.join(wls)}), {args.seeds} "
              "seeds each "
              f"(seeds {args.seed0}..{args.seed0 + args.seeds - 1}): mean ± 95% interval per episode (a t-interval "
              "over all the policy's episodes as one sample; summary.csv's *_ci_within hold the workloads fixed); "
              f"reward higher is better; Δ is paired (same workload and seed){actions_label(args.stochastic)}.")
    table = markdown_table(rows, args.baseline)
    per_wl = markdown_per_workload(records)
    write_atomically(out / "table.md", f"{header}\n\n{table}\n\nMean reward per workload:\n\n{per_wl}\n")
    print(f"\n{header}\n\n{table}\n\nMean reward per workload:\n\n{per_wl}\n")
    written = [out / "episodes.csv", out / "summary.csv", out / "per_workload.csv", out / "table.md", out / "meta.json"]
    if pngs:
        from . import plots

        written.append(plots.pareto(rows, out / "pareto.png",
                                    f"{args.scenario}, {label}, {args.seeds} seeds: downtime vs exit overhead"))
        wl = args.timeline_workload or ("oltp-heavy" if "oltp-heavy" in wls else wls[0])
        best = max(rows, key=lambda r: r["reward"])["spec"]
        evaluated = {r["spec"] for r in rows}  # (a policy its environment cannot run was left out)
        chosen = list(dict.fromkeys([s for s in (args.baseline, best) if s in evaluated]))
        eps = []
        for spec in chosen:
            env = policy_env(spec, args.env_id, args.scenario, args.split, args.workloads, overrides)
            policy = load_policy(spec, EnvFacts.from_env(env), args.stochastic)
            eps.append(run_episode(env, policy, args.seed0, wl, trace=True))
            env.close()
        written.append(plots.timeline(eps, out / "timeline.png", f"one episode ({wl}, seed {args.seed0})"))
    print("wrote " + ", ".join(str(p) for p in written) + f" ({time.perf_counter() - t0:.0f} s)")
    return {"records": records, "rows": rows, "out": out}


def run(args: Args) -> int:
    """:func:`main` as a command: exit code 1 if an episode lost writes (as ``evaluate``)."""
    return 1 if unsound(main(args)["records"]) else 0


if __name__ == "__main__":
    module_main(run, Args, "agents.compare")
