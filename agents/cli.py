"""The agents' subcommands of ``ringenv``: run, train, evaluate, compare.

``ringenv/cli.py`` imports this module if it is installed and calls :func:`add_parsers`. Every
flag comes from the dataclass of arguments of its program (the docstring under each field is the
flag's help), so ``ringenv train --help`` and ``python -m agents.train --help`` say the same.
"""

from __future__ import annotations

import argparse
import re

from . import compare, evaluate, train
from .common import add_dataclass_arguments, dataclass_from_namespace, run_reporting


def _clean_errors(fn):
    """A bad flag value (unknown policy, missing model, malformed KEY=VALUE) ends the command with
    its message and exit code 2, not a traceback; Ctrl-C with exit code 130 (:func:`run_reporting`)."""

    def run(args) -> int:
        return run_reporting(lambda: fn(args), f"ringenv {args.command}")

    return run


@_clean_errors
def _cmd_compare(args) -> int:
    return compare.run(dataclass_from_namespace(compare.Args, args))


@_clean_errors
def _cmd_evaluate(args) -> int:
    return evaluate.main(dataclass_from_namespace(evaluate.Args, args))


@_clean_errors
def _cmd_train(args) -> int:
    train.main(dataclass_from_namespace(train.Args, args))
    return 0


def _summary(doc: str) -> str:
    """The first paragraph of a module docstring as plain help text: ``x`` and :role:`x` become x."""
    text = " ".join(doc.split("\n\n")[0].split())
    return re.sub(r"(?::\w+:)?`+([^`]+)`+", r"\1", text)


def add_parsers(sub) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter.__base__  # plain help text (defaults are in each help)
    p = sub.add_parser(
        "run", help="the main job: compare the heuristic collectors on the default scenario's test workloads",
        description="Compare the heuristic dirty-ring collectors (QEMU's default, fixed grid members, fill "
                    "watermark, rate-proportional, bitmap, random) on the default scenario's test workloads "
                    "with several seeds; print the table, write CSV and the plots (Pareto view, episode "
                    "timeline) under --out. Same as `ringenv compare` with its defaults.", formatter_class=fmt)
    add_dataclass_arguments(p, compare.Args, skip=("models",))
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("train", help="train a policy with stable-baselines3 (PPO, A2C, DQN)",
                       description=_summary(train.__doc__) + " Hyperparameters: configs/train/ALGO.yaml; "
                       "models, VecNormalize statistics, TensorBoard logs under --out/NAME.", formatter_class=fmt)
    add_dataclass_arguments(p, train.Args)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="evaluate policies or trained models on the test workloads, several seeds",
                       description=_summary(evaluate.__doc__) + " Writes episodes.csv, summary.csv and "
                       "meta.json (the settings) under --out and prints the Markdown table.", formatter_class=fmt)
    add_dataclass_arguments(p, evaluate.Args)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("compare", help="compare policies: Markdown table, CSV, Pareto and timeline plots",
                       description=_summary(compare.__doc__), formatter_class=fmt)
    add_dataclass_arguments(p, compare.Args)
    p.set_defaults(func=_cmd_compare)
