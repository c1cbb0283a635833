"""The per-vCPU dirty ring, as Linux ``virt/kvm/dirty_ring.c`` keeps it.

The kernel side (push, soft-full, reset with re-protect coalescing) lives here; the userspace
side reads and marks the same numpy structured array (``DirtyRing.gfns``, dtype
:data:`~ringenv.kvm.uapi.kvm_dirty_gfn`), exactly as QEMU reads the ring it mmapped from the
vCPU fd. See shared/reference/kvm-dirty-ring.md sections 3, 5 and 6.
"""

from __future__ import annotations

import numba
import numpy as np

from ..arrays import words_at
from .uapi import KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET, kvm_dirty_gfn

U32 = 0xFFFFFFFF
# the compiled push writes an entry as two u64 words (flags | slot << 32, offset): the layout of
# struct kvm_dirty_gfn on a little-endian host, as the dtype is
assert kvm_dirty_gfn.itemsize == 16 and np.little_endian


class DirtyRing:
    """One vCPU's ring: ``size`` entries, ``soft_limit = size - reserved``.

    ``dirty_index`` and ``reset_index`` are free-running u32 counters, as in the kernel;
    ``used = dirty_index - reset_index``. The counters live in a row of int64 (dirty_index,
    reset_index, lost, pushes; the indexes kept modulo 2^32 when read) that the compiled push
    updates in place: the VM keeps all its rings' rows in one array (:meth:`attach_counters`).
    """

    __slots__ = ("gfns", "size", "soft_limit", "_ctr", "_flags", "_slot", "_offset")

    def __init__(self, entries: int, reserved: int):
        assert entries & (entries - 1) == 0 and entries > reserved
        self.gfns = np.zeros(entries, dtype=kvm_dirty_gfn)
        self._flags, self._slot, self._offset = self.gfns["flags"], self.gfns["slot"], self.gfns["offset"]
        self.size = entries
        self.soft_limit = entries - reserved
        self._ctr = np.zeros(4, dtype=np.int64)

    def attach_counters(self, row: np.ndarray) -> None:
        """Keep the counters in ``row`` (a row of the VM's array), carrying their values over."""
        row[:] = self._ctr
        self._ctr = row

    dirty_index = property(lambda self: int(self._ctr[0]) & U32)
    reset_index = property(lambda self: int(self._ctr[1]) & U32)
    lost = property(lambda self: int(self._ctr[2]), doc="pushes made while the ring was full: the kernel's WARN, "
                                                       "an overwritten entry")
    pushes = property(lambda self: int(self._ctr[3]))

    @property
    def used(self) -> int:
        return int(self._ctr[0] - self._ctr[1]) & U32

    def soft_full(self) -> bool:
        """kvm_dirty_ring_soft_full: used >= soft_limit."""
        return self.used >= self.soft_limit

    def full(self) -> bool:
        return self.used >= self.size

    def push(self, slot: int | np.ndarray, offsets: np.ndarray) -> bool:
        """kvm_dirty_ring_push for a run of pushes in order (:func:`ring_push` each).

        Returns True if the ring is soft-full afterwards (the SOFT_FULL request is raised)."""
        n = len(offsets)
        if n == 0:
            return False
        _push_run(self.gfns.view(np.uint64), self._ctr, np.broadcast_to(np.asarray(slot, dtype=np.uint32), (n,)),
                  np.ascontiguousarray(offsets, dtype=np.uint64))
        return self.soft_full()

    def reset_harvested(self) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """kvm_dirty_ring_reset: from ``reset_index``, while the entry has RESET set, set its
        flags to 0 (kvm_dirty_gfn_set_invalid), advance ``reset_index`` and feed the entry to the
        re-protect coalescing (:func:`coalesce_reprotect`). Returns (entries reset, and the
        re-protect calls as arrays slot, offset, mask)."""
        count = _harvested(self._flags, self.reset_index, min(self.used, self.size))
        if count == 0:
            return 0, _EMPTY_U32, _EMPTY_I64, _EMPTY_U64
        calls = _coalesced(self._slot, self._offset, self.reset_index & (self.size - 1), count)
        self._ctr[1] += count
        return (count, *calls)


_EMPTY_U32 = np.zeros(0, dtype=np.uint32)
_EMPTY_I64 = np.zeros(0, dtype=np.int64)
_EMPTY_U64 = np.zeros(0, dtype=np.uint64)


@numba.njit(inline="always")
def ring_push(words, ctr, kslot, offset):  # pragma: no cover - compiled
    """kvm_dirty_ring_push. ``words``: the ring as u64 words (entry e is words 2e = flags |
    slot << 32 and 2e+1 = offset: struct kvm_dirty_gfn, little-endian); ``ctr``: the ring's
    (dirty_index, reset_index, lost, pushes). Writes the entry at dirty_index & (size - 1) with
    flags DIRTY and advances dirty_index. A push into a full ring overwrites the entry there (the
    kernel only WARNs): counted in lost."""
    size = words.shape[0] >> 1
    if ((ctr[0] - ctr[1]) & U32) >= size:
        ctr[2] += 1
    e = 2 * (ctr[0] & (size - 1))
    words[e] = np.uint64(KVM_DIRTY_GFN_F_DIRTY) | (np.uint64(kslot) << np.uint64(32))
    words[e + 1] = np.uint64(offset)
    ctr[0] += 1
    ctr[3] += 1


@numba.njit(cache=True, nogil=True)
def _push_run(words, ctr, slots, offsets):  # pragma: no cover - compiled
    for i in range(offsets.shape[0]):
        ring_push(words, ctr, slots[i], offsets[i])


@numba.njit(cache=True, nogil=True)
def push_all(push_v, push_g, npush, ring_addr, ring_ctr, slot_start, slot_kvm):  # pragma: no cover - compiled
    """The pushes of a batch (vCPU, global page index), in order, each into its vCPU's ring:
    ring_addr[v] = (address of the ring's entries, entries), ring_ctr[v] its counters
    (:func:`ring_push`); slot_start/slot_kvm: where each memslot starts in the global page index
    (ascending) and its kvm_dirty_gfn slot id. Rings are visited one at a time (a counting sort
    of the pushes by vCPU keeps each ring's entries in order)."""
    nv = ring_addr.shape[0]
    start = np.zeros(nv + 1, dtype=np.int64)
    for i in range(npush):
        start[push_v[i] + 1] += 1
    for v in range(nv):
        start[v + 1] += start[v]
    order = np.empty(npush, dtype=np.int64)
    fill = start[:nv].copy()
    for i in range(npush):
        order[fill[push_v[i]]] = i
        fill[push_v[i]] += 1
    nslots = slot_start.shape[0]
    for v in range(nv):
        if start[v + 1] == start[v]:
            continue
        words = words_at(ring_addr[v, 0], 2 * ring_addr[v, 1])
        ctr = ring_ctr[v]
        for j in range(start[v], start[v + 1]):
            g = push_g[order[j]]
            k = nslots - 1
            while k > 0 and slot_start[k] > g:
                k -= 1
            ring_push(words, ctr, slot_kvm[k], g - slot_start[k])


@numba.njit(cache=True, nogil=True)
def _harvested(flags, reset_index, used):  # pragma: no cover - compiled
    """The scan of kvm_dirty_ring_reset: count the entries from reset_index that carry RESET,
    clearing their flags; stop at the first that does not."""
    mask = flags.shape[0] - 1
    for i in range(used):
        p = (reset_index + i) & mask
        if not flags[p] & KVM_DIRTY_GFN_F_RESET:
            return i
        flags[p] = 0
    return used


@numba.njit(cache=True, nogil=True)
def _coalesce(slots, offsets, start, n, out_slot, out_offset, out_mask):  # pragma: no cover - compiled
    """Coalesce entries start, start+1, ... (n of them, wrapping around the array's end)."""
    size = slots.shape[0]
    k = 0
    cur_slot = np.uint32(0)
    cur_offset = np.int64(0)
    mask = np.uint64(0)
    for i in range(n):
        j = start + i
        if j >= size:
            j -= size
        s = slots[j]
        o = np.int64(offsets[j])
        if i > 0 and s == cur_slot:
            delta = o - cur_offset
            if delta >= 0 and delta < 64:
                mask |= np.uint64(1) << np.uint64(delta)
                continue
            if delta > -64 and delta < 0:
                sh = np.uint64(-delta)
                if ((mask << sh) >> sh) == mask:
                    cur_offset = o
                    mask = (mask << sh) | np.uint64(1)
                    continue
        if i > 0:
            out_slot[k] = cur_slot
            out_offset[k] = cur_offset
            out_mask[k] = mask
            k += 1
        cur_slot = s
        cur_offset = o
        mask = np.uint64(1)
    if n > 0:
        out_slot[k] = cur_slot
        out_offset[k] = cur_offset
        out_mask[k] = mask
        k += 1
    return k


def _coalesced(slots, offsets, start: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    out_slot = np.empty(n, dtype=np.uint32)
    out_offset = np.empty(n, dtype=np.int64)
    out_mask = np.empty(n, dtype=np.uint64)
    k = _coalesce(slots, offsets, start, n, out_slot, out_offset, out_mask)
    return out_slot[:k], out_offset[:k], out_mask[:k]


def coalesce_reprotect(slots: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The re-protect coalescing of kvm_dirty_ring_reset (reference s6), over entries in ring order.

    Keeps (cur_slot, cur_offset, mask): an entry of the same slot with 0 <= delta < 64 sets bit
    delta; with -64 < delta < 0, if shifting the mask left by -delta loses no bit, the mask moves
    down to the new offset; anything else flushes the mask as one re-protect call. Returns the
    calls as arrays (slot, offset, mask), one row per
    ``kvm_arch_mmu_enable_log_dirty_pt_masked(slot, offset, mask)``.

    Inherently sequential (each decision depends on the mask so far), hence a compiled loop.
    """
    return _coalesced(np.ascontiguousarray(slots, dtype=np.uint32), np.ascontiguousarray(offsets, dtype=np.uint64),
                      0, len(slots))
