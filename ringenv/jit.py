"""numba's ``njit`` for ringenv's compiled kernels, with an on-disk cache kept in step with them.

numba keys a cached kernel by the content of the file that defines it, not by the kernels it
calls from other files: ``kvm.ring.reset_rings`` calls ``kvm.memory.protect_masked``, and after a
change to ``memory.py`` alone (a ``git pull``, an upgrade into a directory that kept the old
cache files) numba would load ``reset_rings`` with the old ``protect_masked`` compiled into it
and give wrong results without a word. :func:`njit` therefore caches every kernel in a
directory named by a digest of all of ringenv's kernel sources (:func:`sources_digest`): any
change to any of them compiles them all afresh (~15 s, once), the cache of an unchanged tree is
used as before.

Where: under ``NUMBA_CACHE_DIR`` when it is set (numba's own setting: then
``$NUMBA_CACHE_DIR/ringenv-<digest>``, nothing removed there), else in the package's
``__pycache__/numba/`` (or, if the package directory is read-only, in the user's cache
directory, ``$XDG_CACHE_HOME/ringenv`` or ``~/.cache/ringenv``), where the directories of older
digests are removed when a new one is made, unless written to in the last hour (:data:`KEEP_S`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

import numba
import numba.core.event

PACKAGE = Path(__file__).resolve().parent
PREFIX = "ringenv-"
#: an older digest's directory written to in this many seconds is kept: a process still running
#: those sources may yet save a kernel there (numba does not recreate a removed directory)
KEEP_S = 3600.0


def _kernel_texts(root: Path) -> list[tuple[Path, bytes]]:
    """(path, content) of the package's Python files that define numba kernels (any mention of
    ``njit``), sorted by path; each file read once."""
    texts = ((p, p.read_bytes()) for p in sorted(root.rglob("*.py")) if "__pycache__" not in p.parts)
    return [(p, text) for p, text in texts if b"njit" in text]


def kernel_sources(root: Path = PACKAGE) -> list[Path]:
    """The package's Python files that define numba kernels (any mention of ``njit``), sorted."""
    return [p for p, _ in _kernel_texts(root)]


def sources_digest(root: Path = PACKAGE) -> str:
    """16 hex digits of a SHA-256 over the kernel sources' paths (relative to ``root``) and
    contents: it changes with any change to any kernel, or a kernel file added or removed."""
    h = hashlib.sha256()
    for path, text in _kernel_texts(root):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(text + b"\0")
    return h.hexdigest()[:16]


def _own_root() -> Path:
    """The package's ``__pycache__/numba`` if it can be written, else the user's cache directory."""
    for root in (PACKAGE / "__pycache__" / "numba",
                 Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ringenv"):
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(root, os.W_OK):
            return root
    raise OSError("ringenv: no writable directory for numba's cache (set NUMBA_CACHE_DIR)")


@functools.cache
def cache_dir() -> Path:
    """The directory this tree's kernels are cached in (see the module's docstring)."""
    digest = sources_digest()
    if numba.config.CACHE_DIR:
        here = Path(numba.config.CACHE_DIR) / f"{PREFIX}{digest}"
    else:
        here = _digest_dir(digest)
    return here


class _CompileNotice(numba.core.event.Listener):
    """Says once per process, on standard error, that ringenv's kernels are being compiled: at
    the first compilation of one of them (numba's "numba:compile" event: a kernel not in the
    cache, as after an install or an upgrade), not when they load from the cache."""

    said = False

    def on_start(self, event):
        if _CompileNotice.said:
            return
        dispatcher = (event.data or {}).get("dispatcher")
        module = getattr(getattr(dispatcher, "py_func", None), "__module__", "") or ""
        if module.split(".")[0] == PACKAGE.name and sys.stderr is not None:
            _CompileNotice.said = True
            sys.stderr.write("ringenv: compiling numba kernels not in the cache yet (after an install or upgrade "
                             "~15 s in all, a few s for a profile or workload first used later; cached afterwards)\n")
            sys.stderr.flush()

    def on_end(self, event):
        pass


numba.core.event.register("numba:compile", _CompileNotice())


def _digest_dir(digest: str) -> Path:
    """The cache directory of ``digest`` under :func:`_own_root`, made if new (then the older
    digests' idle directories and numba's in-tree files of older versions are removed)."""
    root = _own_root()
    here = root / f"{PREFIX}{digest}"
    if not here.exists():
        here.mkdir(exist_ok=True)
        for old in root.glob(f"{PREFIX}*"):
            if old.name != here.name and _idle_s(old) > KEEP_S:
                shutil.rmtree(old, ignore_errors=True)
        for stale in PACKAGE.rglob("__pycache__/*.nb[ic]"):  # numba's in-tree files of older versions
            stale.unlink(missing_ok=True)
    return here


def _idle_s(directory: Path) -> float:
    """Seconds since anything in ``directory`` was last written."""
    times = [p.stat().st_mtime for p in directory.rglob("*")] or [directory.stat().st_mtime]
    return time.time() - max(times)


def njit(**options):
    """``numba.njit(cache=True, **options)``, cached in :func:`cache_dir`: numba reads its cache
    setting when a kernel is decorated, so it is switched to that directory for the decoration
    only and other packages' kernels cache where they did."""
    def decorate(fn):
        saved = numba.config.CACHE_DIR
        numba.config.CACHE_DIR = str(cache_dir())
        try:
            return numba.njit(cache=True, **options)(fn)
        finally:
            numba.config.CACHE_DIR = saved
    return decorate
