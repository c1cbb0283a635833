"""Small array helpers for the hot paths (no simulator semantics here).

numpy 2.x's ``np.unique`` takes a hash-based path that is far slower on these arrays than a
plain sort, and ``return_index`` forces a stable sort; these helpers use the fast plain sort."""

from __future__ import annotations

import numpy as np


def unique(a: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an integer array."""
    if len(a) <= 1:
        return np.array(a, copy=True)
    s = np.sort(a)
    return s[np.r_[True, s[1:] != s[:-1]]]


def unique_counts(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values and how often each occurs."""
    if len(a) == 0:
        return np.array(a, copy=True), np.zeros(0, dtype=np.int64)
    s = np.sort(a)
    lead = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    return s[lead], np.diff(np.r_[lead, len(s)])


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
