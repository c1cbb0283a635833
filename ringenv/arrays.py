"""Small array helpers for the hot paths (no simulator semantics here).

numpy 2.x's ``np.unique`` takes a hash-based path that is far slower on these arrays than a
plain sort, and ``return_index`` forces a stable sort; these helpers use the fast plain sort."""

from __future__ import annotations

import sys

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from .jit import njit


class Recycler:
    """Zeroed arrays of guest-RAM size, recycled once nobody holds them.

    A fresh array of many MB costs the kernel a page fault and a zeroed page per 4 KiB at its
    first touch, several times what clearing a warm array costs; a simulator that builds a VM
    per episode pays that at every episode. ``zeros`` hands out an array it made earlier when
    no other reference to it is left (not even a view: a view holds its base), cleared; else
    a new one, kept for later. At most ``max_bytes`` are kept: arrays nobody holds are
    dropped first, oldest first."""

    def __init__(self, min_bytes: int = 1 << 20, max_bytes: int = 256 << 20):
        self.min_bytes, self.max_bytes = min_bytes, max_bytes
        self._kept: list[np.ndarray] = []

    def zeros(self, n: int, dtype) -> np.ndarray:
        return self._get(n, dtype, True)

    def empty(self, n: int, dtype) -> np.ndarray:
        """As :meth:`zeros`, but an array handed out again is not cleared: it holds whatever
        its last user left (for scratch that nothing reads before writing, or never reads)."""
        return self._get(n, dtype, False)

    def _get(self, n: int, dtype, clear: bool) -> np.ndarray:
        dtype = np.dtype(dtype)
        if n * dtype.itemsize < self.min_bytes:
            return np.zeros(n, dtype=dtype)
        kept = self._kept
        for i in range(len(kept)):
            if kept[i].shape[0] == n and kept[i].dtype == dtype and _unheld(kept[i]):
                a = kept.pop(i)
                kept.append(a)  # most recently used last
                if clear:
                    a.fill(0)
                return a
        a = np.zeros(n, dtype=dtype)
        kept.append(a)
        self._trim()
        return a

    def _trim(self) -> None:
        total = self.kept_bytes
        i = 0
        while total > self.max_bytes and i < len(self._kept):
            if _unheld(self._kept[i]):
                total -= self._kept.pop(i).nbytes
            else:
                i += 1
        while total > self.max_bytes and self._kept:  # all in use: stop keeping the oldest
            total -= self._kept.pop(0).nbytes

    def clear(self) -> None:
        """Keep no array any longer (those in use stay their users'; the next ``zeros`` makes
        new ones): for a measurement of what a run allocates."""
        self._kept.clear()

    @property
    def kept_bytes(self) -> int:
        return sum(a.nbytes for a in self._kept)


def _unheld(a: np.ndarray) -> bool:
    """Nobody but the recycler's list holds ``a``: 3 references, the list's, this function's
    parameter and getrefcount's argument (tests/test_arrays.py checks the count)."""
    return sys.getrefcount(a) <= 3


#: the process's recycler for per-page arrays (kvm.Vm page state, the VMM's bitmaps)
RECYCLER = Recycler()


def unique(a: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an integer array."""
    if len(a) <= 1:
        return np.array(a, copy=True)
    s = np.sort(a)
    return s[np.r_[True, s[1:] != s[:-1]]]


def first_occurrence(keys: np.ndarray) -> np.ndarray:
    """Boolean mask of the first occurrence of each key, in array order (a plain sort of the
    unique composite key (key, position))."""
    n = len(keys)
    out = np.zeros(n, dtype=bool)
    if n == 0:
        return out
    k = keys.astype(np.int64) - int(keys.min())
    order = np.argsort(k * n + np.arange(n, dtype=np.int64))
    ks = k[order]
    out[order[np.r_[True, ks[1:] != ks[:-1]]]] = True
    return out


def groups(g: np.ndarray):
    """Yield (value, indexes in array order) for each distinct value of a small-integer array."""
    if len(g) == 0:
        return
    lo = int(g.min())
    if lo == int(g.max()):
        yield lo, np.arange(len(g))
        return
    order = np.argsort(g.astype(np.int16), kind="stable")  # a radix sort: linear
    gs = g[order]
    cuts = np.flatnonzero(gs[1:] != gs[:-1]) + 1
    for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(gs)]):
        yield int(gs[a]), order[a:b]


@njit(nogil=True)
def shift_checked(a, lo, hi, delta, out):  # pragma: no cover - compiled
    """``out = a + delta`` in one pass, checking ``lo <= a < hi``: returns the index of the
    first value outside, or -1 (``out`` is then complete)."""
    for i in range(a.shape[0]):
        x = a[i]
        if x < lo or x >= hi:
            return i
        out[i] = x + delta
    return -1


def prefetch(arr, index) -> None:
    """``prefetch(arr, i)``: a hint to load ``arr[i]``'s cache line for writing. In compiled code
    it is LLVM's llvm.prefetch (never faults, changes nothing); in plain Python it does nothing.
    The sequential kernels know their next pages' indexes in advance, and a random page of a
    16 GiB guest is a cache miss: prefetching a few events ahead overlaps those misses."""


@intrinsic
def _prefetch(typingctx, arr, index):
    if not isinstance(arr, types.Array) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        i8p = ir.IntType(8).as_pointer()
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), i8p)
        i32 = ir.IntType(32)
        mod = builder.module
        fn = mod.globals.get("llvm.prefetch.p0i8") or ir.Function(
            mod, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), name="llvm.prefetch.p0i8")
        # rw = 1 (write), locality = 3 (keep in all levels), cache type = 1 (data)
        builder.call(fn, [ptr, ir.Constant(i32, 1), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(arr, index), codegen


@overload(prefetch)
def _prefetch_compiled(arr, index):
    return lambda arr, index: _prefetch(arr, index)


@intrinsic
def trailing_zeros(typingctx, x):
    """Inside compiled code: the number of trailing zero bits of a nonzero integer (LLVM's
    llvm.cttz)."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))

    return x(x), codegen


@intrinsic
def popcount(typingctx, x):
    """Inside compiled code: the number of set bits of an integer (LLVM's llvm.ctpop)."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return x(x), codegen


@intrinsic
def _voidptr(typingctx, addr):
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())

    return types.voidptr(types.int64), codegen


@numba.njit(inline="always")
def words_at(addr, n):  # pragma: no cover - compiled only
    """Inside compiled code: the ``n`` u64 words at address ``addr`` as an array (a view of
    memory some live numpy array owns; see ``ndarray.ctypes.data``). Lets one kernel write into
    several separately allocated arrays, e.g. every vCPU's ring, without a list of arrays."""
    return numba.carray(_voidptr(addr), (n,), np.uint64)


if numba.config.DISABLE_JIT:  # NUMBA_DISABLE_JIT=1 (debugging the kernels as Python): the same in Python
    import ctypes
    import warnings

    # the kernels' 64-bit hashes wrap on purpose (numpy scalars warn where compiled code does not)
    warnings.filterwarnings("ignore", r"overflow encountered in scalar (multiply|add)", RuntimeWarning,
                            r"ringenv\.")

    def trailing_zeros(x):  # noqa: F811
        x = int(x)
        return (x & -x).bit_length() - 1

    def popcount(x):  # noqa: F811
        return bin(int(x) & 0xFFFFFFFFFFFFFFFF).count("1")

    def words_at(addr, n):  # noqa: F811
        return np.ctypeslib.as_array((ctypes.c_uint64 * int(n)).from_address(int(addr)))
