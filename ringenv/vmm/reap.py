"""Harvesting a dirty ring from userspace (QEMU ``kvm_dirty_ring_reap_one``).

Per ring, userspace keeps its own fetch index. While the entry at fetch has flags == DIRTY
(a load-acquire on arm64), it records (slot, offset), marks the entry RESET (a store-release)
and moves on; it never skips an entry. Then one KVM_RESET_DIRTY_RINGS for all rings.
"""

from __future__ import annotations

import numba
import numpy as np

from ..kvm.uapi import KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET


class RingReader:
    """Userspace's view of one vCPU ring: the mmapped entries and the fetch index."""

    __slots__ = ("gfns", "fetch", "size", "_flags", "_slot", "_offset")

    def __init__(self, gfns: np.ndarray):
        self.gfns = gfns
        self._flags, self._slot, self._offset = gfns["flags"], gfns["slot"], gfns["offset"]
        self.size = len(gfns)
        self.fetch = 0

    def reap(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Harvest up to ``limit`` entries (all that are ready by default).
        Returns (slot, offset) arrays in ring order."""
        want = self.size if limit is None else min(limit, self.size)
        n = _ready(self._flags, self.fetch, want, True)
        start = self.fetch & (self.size - 1)
        self.fetch += n
        if start + n <= self.size:  # one contiguous run of the ring, or two around its end
            return self._slot[start: start + n].copy(), self._offset[start: start + n].copy()
        wrap = start + n - self.size
        return (np.concatenate([self._slot[start:], self._slot[:wrap]]),
                np.concatenate([self._offset[start:], self._offset[:wrap]]))

    def count_ready(self) -> int:
        """Entries ready to harvest (a peek, no side effect): what a fill watermark reads, in
        QEMU's reading order (the run of DIRTY entries from the fetch index)."""
        return _ready(self._flags, self.fetch, self.size, False)


@numba.njit(cache=True, nogil=True)
def _ready(flags, fetch, want, mark):  # pragma: no cover - compiled
    """kvm_dirty_ring_reap_one's loop: from the fetch index, while the entry's flags are exactly
    DIRTY (load-acquire), count it and, with ``mark``, set RESET (store-release); at most ``want``."""
    mask = flags.shape[0] - 1
    for i in range(want):
        p = (fetch + i) & mask
        if flags[p] != KVM_DIRTY_GFN_F_DIRTY:
            return i
        if mark:
            flags[p] |= KVM_DIRTY_GFN_F_RESET
    return want
