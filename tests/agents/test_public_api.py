"""agents/ uses ringenv only through its public API (DESIGN.md): the names ``ringenv.PUBLIC``
lists and the env attributes its class docstring documents. Read from the agents' source, so a
new import of an internal name fails here."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

import ringenv
from ringenv.env import MigrationEnv

AGENTS = Path(__file__).resolve().parents[2] / "agents"


def _uses(tree: ast.AST) -> tuple[set[tuple[str, str]], set[str], set[str]]:
    """(module, name) imported from ringenv submodules, ringenv modules imported whole, and the
    attributes read through ``.unwrapped``."""
    names, modules, attrs = set(), set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("ringenv"):
            for alias in node.names:
                names.add((node.module, alias.name))
        elif isinstance(node, ast.Import):
            modules.update(a.name for a in node.names if a.name.startswith("ringenv"))
        elif isinstance(node, ast.Attribute):
            inner = node.value
            if isinstance(inner, ast.Attribute) and inner.attr == "unwrapped":
                attrs.add(node.attr)
            if (isinstance(inner, ast.Attribute) and isinstance(inner.value, ast.Name)
                    and inner.value.id == "ringenv"):
                names.add((f"ringenv.{inner.attr}", node.attr))
    return names, modules, attrs


def _all_uses():
    names, modules, attrs = set(), set(), set()
    for path in sorted(AGENTS.glob("*.py")):
        n, m, a = _uses(ast.parse(path.read_text(encoding="utf-8")))
        names |= n
        modules |= m
        attrs |= a
    return names, modules, attrs


def test_the_scan_sees_each_kind_of_use():
    """The scan itself: an internal import, a dotted use and an unwrapped attribute are found."""
    tree = ast.parse("from ringenv.kvm.vm import Vm\nimport ringenv.vmm\nx = ringenv.env.THING\n"
                     "y = env.unwrapped._run\n")
    assert _uses(tree) == ({("ringenv.kvm.vm", "Vm"), ("ringenv.env", "THING")}, {"ringenv.vmm"}, {"_run"})


def test_every_public_name_exists():
    for module, public in ringenv.PUBLIC.items():
        mod = importlib.import_module(f"ringenv.{module}")
        assert [n for n in public if not hasattr(mod, n)] == [], module


def test_agents_import_only_public_names():
    names, modules, _ = _all_uses()
    assert names, "the scan found no ringenv import in agents/"
    private = sorted(f"{m}.{n}" for m, n in names
                     if m.count(".") != 1 or n not in ringenv.PUBLIC.get(m.split(".")[1], ()))
    assert private == [], f"agents/ uses names not in ringenv.PUBLIC: {private}"
    assert modules <= {"ringenv"}, modules


@pytest.mark.parametrize("env_cls", [MigrationEnv])
def test_agents_read_only_documented_env_attributes(env_cls):
    _, _, attrs = _all_uses()
    assert attrs, "the scan found no env.unwrapped attribute in agents/"
    documented = env_cls.__doc__.split("## Attributes", 1)[1].split("\n    ## ", 1)[0]
    missing = sorted(a for a in attrs if not re.search(rf"`{re.escape(a)}[`(]", documented))
    assert missing == [], f"agents/ reads env.unwrapped attributes the docstring does not document: {missing}"
