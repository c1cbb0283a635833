"""The project as a user installs it without a checkout: a wheel (`pip install .`, or from git)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_wheel_carries_every_module_and_config_and_makes_the_environments(tmp_path):
    """The wheel holds every module of ringenv/ and agents/ and every YAML of configs/ (as
    ringenv/configs), and an interpreter that sees only the installed package makes both
    environments and reads the training hyperparameters."""
    wheels, target, src = tmp_path / "wheels", tmp_path / "site", tmp_path / "src"
    # built from a copy: building in the checkout would leave build/ and *.egg-info there
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", "runs"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-build-isolation", "--no-deps",
                    "-w", str(wheels), str(src)], check=True, cwd=tmp_path, capture_output=True)
    wheel = next(wheels.glob("ringenv-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, cwd=tmp_path, capture_output=True)
    modules = {p.relative_to(ROOT) for d in ("ringenv", "agents") for p in (ROOT / d).rglob("*.py")}
    assert modules and not {m for m in modules if not (target / m).is_file()}
    configs = {p.relative_to(ROOT / "configs") for p in (ROOT / "configs").rglob("*.yaml")}
    assert configs and not {c for c in configs if not (target / "ringenv" / "configs" / c).is_file()}
    code = ("import ringenv, gymnasium as gym\n"
            "from ringenv.config import CONFIG_DIR\n"
            "from agents.common import load_hyperparams, MIGRATION\n"
            "assert ringenv.__file__.startswith(%r), ringenv.__file__\n"
            "assert str(CONFIG_DIR).startswith(%r), CONFIG_DIR\n"
            "for eid in ('ringenv/Migration-v0', 'ringenv/Checkpoint-v0'):\n"
            "    gym.make(eid).reset(seed=0)\n"
            "assert load_hyperparams('ppo', MIGRATION)\n" % (str(target), str(target)))
    # -S: no site-packages .pth (the checkout's editable finder); the dependencies come by PYTHONPATH
    env = {"PYTHONPATH": f"{target}:{sysconfig.get_paths()['purelib']}", "PATH": "/usr/bin:/bin",
           "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    p = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-1500:]
