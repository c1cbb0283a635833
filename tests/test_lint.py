"""Static checks of the whole checkout: ruff with the rules of ``[tool.ruff.lint]`` in
pyproject.toml (pyflakes' undefined names and unused imports or variables, syntax errors, lines
over 120 columns, ``pytest.raises(Exception)``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    p = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-1000:]
