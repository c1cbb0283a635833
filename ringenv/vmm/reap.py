"""Harvesting a dirty ring from userspace (QEMU ``kvm_dirty_ring_reap_one``).

Per ring, userspace keeps its own fetch index. While the entry at fetch has flags == DIRTY
(a load-acquire on arm64), it records (slot, offset), marks the entry RESET (a store-release)
and moves on; it never skips an entry. Then one KVM_RESET_DIRTY_RINGS for all rings.
"""

from __future__ import annotations

import numba
import numpy as np

from ..arrays import words_at
from ..jit import njit
from ..kvm.uapi import KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET
from .dirty import see


class RingReader:
    """Userspace's view of one vCPU ring: the mmapped entries and the fetch index. The fetch
    index lives in ``fetch_cell`` (a one-item int64 array) if given, e.g. a slot of an array
    holding every ring's index for :func:`reap_rings`."""

    __slots__ = ("gfns", "size", "_words", "_slot", "_offset", "_fetch")

    def __init__(self, gfns: np.ndarray, fetch_cell: np.ndarray | None = None):
        if not isinstance(gfns, np.ndarray):  # e.g. the unbacked mapping of a vCPU without a ring
            gfns[0]  # touching it is what userspace would do: SIGBUS (uapi.SigBus)
            raise TypeError(f"RingReader: expected the ring's entries (Vcpu.mmap_ring), got {type(gfns).__name__}")
        if not gfns.flags.writeable:
            raise ValueError("RingReader: the ring is mapped read-only (PROT_READ); harvesting writes RESET into "
                             "each entry's flags: map it PROT_READ | PROT_WRITE")
        self.gfns = gfns
        self._words = gfns.view(np.uint64)  # entry e: words 2e (flags | slot << 32) and 2e + 1 (offset)
        self._slot, self._offset = gfns["slot"], gfns["offset"]
        self.size = len(gfns)
        self._fetch = np.zeros(1, dtype=np.int64) if fetch_cell is None else fetch_cell

    @property
    def fetch(self) -> int:
        """Userspace's free-running harvest index (QEMU ``fetch_index``)."""
        return int(self._fetch[0])

    @fetch.setter
    def fetch(self, value: int) -> None:
        self._fetch[0] = value

    def reap(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Harvest up to ``limit`` entries (all that are ready by default).
        Returns (slot, offset) arrays in ring order."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0):
            raise ValueError(f"RingReader.reap: limit {limit!r}; accepted: None (all ready) or an int >= 0")
        want = self.size if limit is None else min(int(limit), self.size)
        n = _ready(self._words, self.fetch, want, True)
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
        return _ready(self._words, self.fetch, self.size, False)


@numba.njit(inline="always")
def _ready_run(words, fetch, want, mark):  # pragma: no cover - compiled
    """kvm_dirty_ring_reap_one's loop on a ring seen as u64 words: from the fetch index, while
    the entry's flags are exactly DIRTY (load-acquire), count it and, with ``mark``, set RESET
    (store-release); at most ``want``."""
    size = words.shape[0] >> 1
    for i in range(want):
        e = 2 * ((fetch + i) & (size - 1))
        if (words[e] & np.uint64(0xFFFFFFFF)) != KVM_DIRTY_GFN_F_DIRTY:
            return i
        if mark:
            words[e] |= np.uint64(KVM_DIRTY_GFN_F_RESET)
    return want


@njit(nogil=True)
def _ready(words, fetch, want, mark):  # pragma: no cover - compiled
    return _ready_run(words, fetch, want, mark)


def ring_addresses(readers: list[RingReader]) -> np.ndarray:
    """Where each ring is mapped (address, entries): what :func:`reap_rings` walks."""
    return np.array([(r.gfns.ctypes.data, r.size) for r in readers], dtype=np.int64).reshape(-1, 2)


@njit(nogil=True)
def reap_rings(ring_addr, fetch, counts, reap, slot_id, bitmap):  # pragma: no cover - compiled
    """Every ring at once, as QEMU's reaper visits them (kvm_dirty_ring_reap_locked): per ring,
    the run of ready entries from its fetch index (:func:`_ready_run`, counts[v]); with ``reap``,
    each is marked RESET, its offset set in ``bitmap`` if its slot is ``slot_id``
    (kvm_dirty_ring_mark_page), and fetch advanced. Returns how many were set in ``bitmap``."""
    marked = 0
    for v in range(ring_addr.shape[0]):
        size = ring_addr[v, 1]
        words = words_at(ring_addr[v, 0], 2 * size)
        f = fetch[v]
        n = _ready_run(words, f, size, reap)
        counts[v] = n
        if reap:
            for i in range(n):
                e = 2 * ((f + i) & (size - 1))
                if (words[e] >> np.uint64(32)) == slot_id:
                    bitmap[words[e + 1]] = True
                    marked += 1
            fetch[v] = f + n
    return marked


@njit(nogil=True)
def look_rings(ring_addr, fetch, peek, counts, slot_id, seen, mig, mig_empty):  # pragma: no cover - compiled
    """The entries ready in each ring (``counts``, as :func:`reap_rings` counts them without
    reaping: nothing in the rings changes), and the simulator's count of pages not yet saved:
    each entry not looked at before (from ``peek[v]`` on: the entries from the fetch index up to
    there stay DIRTY until harvested, so their pages are not read again) puts its page in ``seen``;
    returns how many of those pages were in neither seen nor ``mig`` before (``mig_empty``: mig
    holds no page, it is not read)."""
    fresh = 0
    for v in range(ring_addr.shape[0]):
        size = ring_addr[v, 1]
        words = words_at(ring_addr[v, 0], 2 * size)
        f = fetch[v]
        n = _ready_run(words, f, size, False)
        for k in range(max(peek[v] - f, 0), n):
            e = 2 * ((f + k) & (size - 1))
            if (words[e] >> np.uint64(32)) == slot_id:
                p = words[e + 1]
                if see(seen, p) and (mig_empty or not mig[p]):
                    fresh += 1
        counts[v] = n
        peek[v] = f + n
    return fresh
