"""numba's on-disk cache of ringenv's kernels follows every kernel source (ringenv/jit.py).

numba keys a cached kernel by its own file's content only: ``kvm.ring.reset_rings`` (ring.py)
calls ``kvm.memory.protect_masked`` (memory.py), so a change to memory.py alone would leave
reset_rings' cached machine code, with the old protect_masked in it, in use. These tests run a
copy of the package in fresh interpreters, change memory.py only, and look at the result.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ringenv
from ringenv import jit

TESTS = Path(__file__).resolve().parent

#: the split_blocks=false what-if: one write to a 2 MiB block, 512 entries, one reset of 8 calls,
#: each writing the block leaf once (tests/kvm/test_stage2.py)
SCRIPT = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import ringenv, ringenv.jit
from kvm._helpers import Host, profile_without_split
h = Host([[10]], profile=profile_without_split(), block_fraction=1.0, entries=1024)
assert h.enter_and_run().kind == "done" and len(h.harvest()) == 512
h.reset()
print(ringenv.__file__, ringenv.jit.cache_dir(), h.vm.stats.pages_reprotected)
"""


COMPILING = "ringenv: compiling numba kernels not in the cache yet"


def run_copy(pkg_parent: Path, cold: bool | None = None, **env) -> tuple[str, Path, int]:
    """Run SCRIPT on the package copy; ``cold``: whether it must say it compiles the kernels
    (the cache holds none for these sources) or must not (None: either)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "PYTHONPATH")}
    environ.update(PYTHONPATH=str(pkg_parent), **env)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=environ, capture_output=True, text=True,
                         cwd=pkg_parent, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    if cold is not None:
        assert (out.stderr.count(COMPILING) == 1) if cold else (COMPILING not in out.stderr), out.stderr[-2000:]
    where, cache, pages = out.stdout.split()[-3:]
    return where, Path(cache), int(pages)


def copy_package(dest: Path) -> Path:
    """The package and, beside it as in the checkout, its configs."""
    src = Path(ringenv.__file__).parent
    shutil.copytree(src, dest / "ringenv", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(src.parent / "configs", dest / "configs")
    return dest / "ringenv"


def age(directory: Path, seconds: float) -> None:
    """Date everything in ``directory`` back by ``seconds``."""
    for p in [directory, *directory.rglob("*")]:
        st = p.stat()
        os.utime(p, (st.st_atime - seconds, st.st_mtime - seconds))


def change_leaf_charge(pkg: Path, per_leaf: int) -> None:
    """memory.py only: a block leaf counts ``per_leaf`` entries instead of 1."""
    path = pkg / "kvm" / "memory.py"
    text, n = re.subn(r"(leaf = blk\n\s+npro \+= )\d+\b", rf"\g<1>{per_leaf}", path.read_text())
    assert n == 1, "protect_masked's leaf count not found: update this test with memory.py"
    path.write_text(text)


@pytest.mark.slow
# cold compiles in fresh interpreters (~15 s each; 229 s for the first test seen on a loaded 2-core
# machine, near the suite's 300 s): each interpreter is bounded by its own 300 s timeout
@pytest.mark.timeout(1200)
def test_a_change_to_a_called_kernel_reaches_its_cached_caller(tmp_path):
    pkg = copy_package(tmp_path)
    where, cache, pages = run_copy(tmp_path, cold=True)
    assert Path(where).parent == pkg  # the copy ran, not the checkout
    assert pages == 8
    assert cache.parent == pkg / "__pycache__" / "numba" and any(cache.rglob("ring.reset_rings-*.nbi"))

    where, again, pages = run_copy(tmp_path, cold=False, NUMBA_DEBUG_CACHE="1")
    assert (again, pages) == (cache, 8)  # same sources: the same directory, loaded from it

    change_leaf_charge(pkg, 1000)  # ring.py, which holds reset_rings, is untouched
    _, fresh, pages = run_copy(tmp_path, cold=True)
    assert pages == 8000
    assert fresh != cache and cache.exists()  # written to a moment ago: a process may still use it

    age(cache, 2 * jit.KEEP_S)
    change_leaf_charge(pkg, 3)
    _, third, pages = run_copy(tmp_path)
    assert pages == 24 and third not in (cache, fresh)
    assert not cache.exists() and fresh.exists()  # idle for two hours: removed; the recent one kept


@pytest.mark.slow
# cold compiles in fresh interpreters (~15 s each; 229 s for the first test seen on a loaded 2-core
# machine, near the suite's 300 s): each interpreter is bounded by its own 300 s timeout
@pytest.mark.timeout(1200)
def test_numba_cache_dir_is_respected_and_keyed_by_the_sources(tmp_path):
    pkg = copy_package(tmp_path / "src")
    user = tmp_path / "numba-cache"
    _, cache, pages = run_copy(tmp_path / "src", cold=True, NUMBA_CACHE_DIR=str(user))
    assert pages == 8 and cache == user / f"ringenv-{jit.sources_digest(pkg)}"
    assert any(cache.rglob("memory.protect_masked-*.nbi"))
    assert not (pkg / "__pycache__" / "numba").exists()
    change_leaf_charge(pkg, 7)
    _, fresh, pages = run_copy(tmp_path / "src", NUMBA_CACHE_DIR=str(user))
    assert pages == 56 and fresh.parent == user and fresh != cache
    assert cache.exists()  # a directory the user chose: nothing removed there


def test_the_digest_covers_every_kernel_file_and_only_those(tmp_path):
    pkg = copy_package(tmp_path)
    names = {p.relative_to(pkg).as_posix() for p in jit.kernel_sources(pkg)}
    assert {"kvm/memory.py", "kvm/ring.py", "kvm/fault.py", "guest/workload.py", "vmm/dirty.py",
            "vmm/reap.py", "arrays.py"} <= names
    assert "env.py" not in names and "config.py" not in names
    d0 = jit.sources_digest(pkg)
    (pkg / "env.py").write_text((pkg / "env.py").read_text() + "\n# a change outside the kernels\n")
    assert jit.sources_digest(pkg) == d0
    (pkg / "kvm" / "ring.py").write_text((pkg / "kvm" / "ring.py").read_text() + "\n")
    assert jit.sources_digest(pkg) != d0


#: a few steps of each collector on a small guest: obs, reward and the counters the kernels move
EPISODES = """
import hashlib, numpy as np, gymnasium as gym, ringenv, numba
out = [bool(numba.config.DISABLE_JIT)]
for kw in ({}, {"collector": "bitmap"}, {"host": "x86-pml"}):
    env = gym.make("ringenv/Migration-v0", workloads=["oltp"], vm={"memory": "64MiB", "vcpus": 2}, sample_s=0.1, **kw)
    env.reset(seed=0)
    for _ in range(3):
        obs, r, te, tr, info = env.step(np.array([4, 2]))
        out.append((obs.tobytes(), r, info["full_exits"], info["pages_sent"], info["harvests"], info["tlb_flushes"]))
        if te or tr:
            break
print(out[0], len(out), hashlib.sha256(repr(out[1:]).encode()).hexdigest())
"""


def test_the_kernels_run_as_plain_python_with_numba_disable_jit():
    """NUMBA_DISABLE_JIT=1 (to step through a kernel in a debugger, or measure its coverage)
    runs every kernel as Python, the compiled-only helpers of ringenv/arrays.py (bit counts,
    a view of a ring's memory) included, with the same results as the compiled kernels."""
    def run(**env):
        environ = {k: v for k, v in os.environ.items() if k != "NUMBA_DISABLE_JIT"}
        p = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", EPISODES], capture_output=True,
                           text=True, env={**environ, **env}, timeout=240)
        assert p.returncode == 0, p.stderr[-2000:]
        return p.stdout.split()

    compiled, plain = run(), run(NUMBA_DISABLE_JIT="1")
    assert compiled[0] == "False" and plain[0] == "True"
    assert int(compiled[1]) >= 4 and compiled[1:] == plain[1:]
