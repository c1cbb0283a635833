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
        if flags[self.fetch & mask] != KVM_DIRTY_GFN_F_DIRTY or want == 0:  # nothing to harvest
            return self.gfns["slot"][:0].copy(), self.gfns["offset"][:0].copy()
        # Fast path: the ready entries form a run from the fetch index (_ready_prefix), read as
        # at most two contiguous slices of the ring; checked, else the entry-by-entry scan below.
        n = self._ready_prefix(want)
        runs = self._runs(n)
        if self._all_dirty(n):
            if len(runs) == 1:
                r = runs[0]
                slots, offsets = self.gfns["slot"][r].copy(), self.gfns["offset"][r].copy()
            else:
                slots = np.concatenate([self.gfns["slot"][r] for r in runs])
                offsets = np.concatenate([self.gfns["offset"][r] for r in runs])
            for r in runs:
                flags[r] |= KVM_DIRTY_GFN_F_RESET
            self.fetch += n
            return slots, offsets
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
        """Entries ready to harvest, exactly as :meth:`pending` counts them (QEMU's reading
        order), found by :meth:`_ready_prefix` and checked; a ring whose entries break the
        protocol (a kernel overflow overwrote some) is scanned entry by entry instead."""
        n = self._ready_prefix(self.size)
        if self._all_dirty(n):
            return n
        return self.pending()

    def _ready_prefix(self, want: int) -> int:
        """Binary search for the length of the run of DIRTY entries from the fetch index, at most
        ``want``: in a ring that follows the protocol that run is followed by entries that are
        free (0) or harvested and not yet reset (DIRTY|RESET), so "the k-th entry is DIRTY" is
        monotone in k. O(log size); the caller checks the run."""
        flags = self.gfns["flags"]
        mask, f = self.size - 1, self.fetch
        lo, hi = 0, want + 1  # lo entries are taken as ready, hi are known not to be
        while hi - lo > 1:
            mid = (lo + hi) >> 1
            if flags[(f + mid - 1) & mask] == KVM_DIRTY_GFN_F_DIRTY:
                lo = mid
            else:
                hi = mid
        return lo

    def _runs(self, n: int) -> list[slice]:
        f = self.fetch & (self.size - 1)
        return [slice(f, f + n)] if f + n <= self.size else [slice(f, self.size), slice(0, f + n - self.size)]

    def _all_dirty(self, n: int) -> bool:
        flags = self.gfns["flags"]
        return all(bool((flags[r] == KVM_DIRTY_GFN_F_DIRTY).all()) for r in self._runs(n))
