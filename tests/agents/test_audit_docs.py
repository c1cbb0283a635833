"""Code that did not do what its documentation says (found by a documentation audit):

- README ("An episode that lost writes ... makes `evaluate` and `compare` exit 1") and
  ``agents.evaluate.lost_writes`` ("the commands then exit 1, as ``ringenv migrate`` does"):
  ``python -m agents.compare`` (the module entry point, whose flags are documented as the same as
  ``ringenv compare``'s) exits 0 after reporting LOST WRITES, because ``compare.main`` returns a
  dict and ``run_reporting`` maps any non-int to 0. ``ringenv compare`` and ``python -m
  agents.evaluate`` exit 1 on the same run.
- ``agents.heuristics.FillWatermark`` ("with ``"auto"`` the smallest ring whose threshold holds
  the sampled rate's entries"): ``choose_ring`` walks ``facts.ring_sizes`` in the env's order,
  which is the ``ring_sizes`` argument's order (``EnvConfig`` accepts any order, and
  ``EnvFacts.from_env`` does not sort, although its field comment says "smallest first"), so
  ``watermark:0.5:auto`` picks another ring when the same grid is given in another order.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from agents.common import EnvFacts
from agents.heuristics import FillWatermark

ROOT = Path(__file__).resolve().parent.parent


def test_python_m_agents_compare_exits_1_when_an_episode_lost_writes(tmp_path):
    # arm64 without WITH_BITMAP loses the vGIC tables KVM saves at the stop (kvm-dirty-ring.md s11)
    cmd = [sys.executable, "-m", "agents.compare", "--set", "vm.with_bitmap=false", "--policies", "qemu",
           "--seeds", "1", "--workloads", "idle", "--no-plots", "--no-progress", "--workers", "1",
           "--out", str(tmp_path / "cmp")]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert "LOST WRITES" in p.stderr, p.stderr[-2000:]
    assert p.returncode == 1, (p.returncode, p.stderr[-2000:])


def _facts(ring_sizes):
    return EnvFacts(ring_sizes=tuple(ring_sizes), intervals_ms=(10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
                    link_Bps=1.25e9, page_size=4096, vcpus=8)


def test_watermark_auto_picks_the_smallest_ring_whatever_the_grid_order():
    obs = np.zeros(17)
    obs[3] = 0.006  # sampled_rate of a light guest (web-static): ~340 entries per vCPU-second x skew
    ascending = FillWatermark(_facts([256, 4096, 65536]), 0.5, "auto").choose_ring(obs)
    descending = FillWatermark(_facts([65536, 4096, 256]), 0.5, "auto").choose_ring(obs)
    assert ascending == 4096  # 0.5 x (256 - 64) < ~343 <= 0.5 x (4096 - 64)
    assert descending == ascending
