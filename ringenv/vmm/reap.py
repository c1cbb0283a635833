"""Harvesting a dirty ring from userspace (QEMU ``kvm_dirty_ring_reap_one``).

Per ring, userspace keeps its own fetch index. While the entry at fetch has flags == DIRTY
(a load-acquire on arm64), it records (slot, offset), marks the entry RESET (a store-release)
and moves on; it never skips an entry. Then one KVM_RESET_DIRTY_RINGS for all rings.
"""

from __future__ import annotations

import numba
import numpy as np

from ..arrays import words_at
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


def ring_addresses(readers: list[RingReader]) -> np.ndarray:
    """Where each ring is mapped (address, entries): what :func:`reap_rings` walks."""
    return np.array([(r.gfns.ctypes.data, r.size) for r in readers], dtype=np.int64).reshape(-1, 2)


@numba.njit(cache=True, nogil=True)
def reap_rings(ring_addr, fetch, counts, reap, slot_id, bitmap):  # pragma: no cover - compiled
    """Every ring at once, as QEMU's reaper visits them (kvm_dirty_ring_reap_locked): per ring,
    from its fetch index, the run of entries whose flags are exactly DIRTY (counts[v]); with
    ``reap``, each is marked RESET, its offset set in ``bitmap`` if its slot is ``slot_id``
    (kvm_dirty_ring_mark_page), and fetch advanced. Returns how many were set in ``bitmap``."""
    marked = 0
    for v in range(ring_addr.shape[0]):
        size = ring_addr[v, 1]
        words = words_at(ring_addr[v, 0], 2 * size)
        f = fetch[v]
        n = 0
        while n < size:
            e = 2 * ((f + n) & (size - 1))
            w = words[e]
            if (w & np.uint64(0xFFFFFFFF)) != KVM_DIRTY_GFN_F_DIRTY:
                break
            if reap:
                words[e] = w | np.uint64(KVM_DIRTY_GFN_F_RESET)
                if (w >> np.uint64(32)) == slot_id:
                    bitmap[words[e + 1]] = True
                    marked += 1
            n += 1
        counts[v] = n
        if reap:
            fetch[v] = f + n
    return marked
