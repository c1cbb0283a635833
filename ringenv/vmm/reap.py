"""Harvesting a dirty ring from userspace (QEMU ``kvm_dirty_ring_reap_one``).

Per ring, userspace keeps its own fetch index. While the entry at fetch has flags == DIRTY
(a load-acquire on arm64), it records (slot, offset), marks the entry RESET (a store-release)
and moves on; it never skips an entry. Then one KVM_RESET_DIRTY_RINGS for all rings.
"""

from __future__ import annotations

import numpy as np

from ..kvm.uapi import KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET


class RingReader:
    """Userspace's view of one vCPU ring: the mmapped entries and the fetch index."""

    __slots__ = ("gfns", "fetch", "size")

    def __init__(self, gfns: np.ndarray):
        self.gfns = gfns
        self.size = len(gfns)
        self.fetch = 0

    def reap(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Harvest up to ``limit`` entries (all that are ready by default).
        Returns (slot, offset) arrays in ring order."""
        size, mask = self.size, self.size - 1
        want = size if limit is None else min(limit, size)
        flags = self.gfns["flags"]
        n, chunk = 0, 64
        while n < want:  # scan in growing chunks: cost follows the entries found, not the ring size
            k = min(chunk, want - n)
            pos = (self.fetch + n + np.arange(k, dtype=np.int64)) & mask
            ready = flags[pos] == KVM_DIRTY_GFN_F_DIRTY
            stop = np.flatnonzero(~ready)
            if len(stop):
                n += int(stop[0])
                break
            n += k
            chunk *= 4
        pos = (self.fetch + np.arange(n, dtype=np.int64)) & mask
        slots = self.gfns["slot"][pos].copy()
        offsets = self.gfns["offset"][pos].copy()
        flags[pos] |= KVM_DIRTY_GFN_F_RESET
        self.fetch += n
        return slots, offsets

    def pending(self) -> int:
        """Entries ready to harvest (a peek, no side effect): what a fill watermark reads."""
        mask = self.size - 1
        pos = (self.fetch + np.arange(self.size, dtype=np.int64)) & mask
        ready = self.gfns["flags"][pos] == KVM_DIRTY_GFN_F_DIRTY
        stop = np.flatnonzero(~ready)
        return int(stop[0]) if len(stop) else self.size

    def count_ready(self) -> int:
        """Entries ready to harvest, like :meth:`pending`, in O(log size): from the fetch index
        the ring holds a run of DIRTY entries, then entries that are free (0) or harvested and
        not yet reset (DIRTY|RESET), so "the k-th entry is DIRTY" is monotone in k."""
        flags = self.gfns["flags"]
        mask, f = self.size - 1, self.fetch
        lo, hi = 0, self.size + 1  # lo entries are known ready, hi are known not to be
        while hi - lo > 1:
            mid = (lo + hi) >> 1
            if flags[(f + mid - 1) & mask] == KVM_DIRTY_GFN_F_DIRTY:
                lo = mid
            else:
                hi = mid
        return lo
