"""The per-vCPU dirty ring, as Linux ``virt/kvm/dirty_ring.c`` keeps it.

The kernel side (push, soft-full, reset with re-protect coalescing) lives here; the userspace
side reads and marks the same numpy structured array (``DirtyRing.gfns``, dtype
:data:`~ringenv.kvm.uapi.kvm_dirty_gfn`), exactly as QEMU reads the ring it mmapped from the
vCPU fd. See docs/reference/kvm-dirty-ring.md sections 3, 5 and 6.
"""

from __future__ import annotations

import numba
import numpy as np

from ..arrays import words_at
from ..jit import njit
from .memory import protect_masked
from .uapi import KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET, kvm_dirty_gfn

U32 = 0xFFFFFFFF
# the compiled push writes an entry as two u64 words (flags | slot << 32, offset): the layout of
# struct kvm_dirty_gfn on a little-endian host, as the dtype is
assert kvm_dirty_gfn.itemsize == 16 and np.little_endian


class DirtyRing:
    """One vCPU's ring: ``size`` entries, ``soft_limit = size - reserved``.

    KVM accepts a ring of exactly ``reserved`` entries (soft limit 0): its first push makes it
    soft-full and, used >= 0 holding even when it is empty, the vCPU never re-enters the guest.

    ``dirty_index`` and ``reset_index`` are free-running u32 counters, as in the kernel;
    ``used = dirty_index - reset_index``. The counters live in a row of int64 (dirty_index,
    reset_index, lost, pushes; the indexes kept modulo 2^32 when read) that the compiled push
    updates in place: the VM keeps all its rings' rows in one array (:meth:`attach_counters`).
    """

    __slots__ = ("gfns", "size", "soft_limit", "_ctr")

    def __init__(self, entries: int, reserved: int):
        assert entries & (entries - 1) == 0 and entries >= reserved
        self.gfns = np.zeros(entries, dtype=kvm_dirty_gfn)
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


@numba.njit(inline="always")
def ring_used(ctr):  # pragma: no cover - compiled
    """Entries in a ring from its counters row: dirty_index - reset_index, modulo 2^32."""
    return (ctr[0] - ctr[1]) & U32


@njit(nogil=True)
def ring_room(ring_ctr, soft_limit):  # pragma: no cover - compiled
    """Per vCPU, the pushes left before its ring is soft-full (soft limit - entries used)."""
    room = np.empty(ring_ctr.shape[0], dtype=np.int64)
    for v in range(ring_ctr.shape[0]):
        room[v] = soft_limit[v] - ring_used(ring_ctr[v])
    return room


@numba.njit(inline="always")
def ring_push(words, ctr, kslot, offset):  # pragma: no cover - compiled
    """kvm_dirty_ring_push. ``words``: the ring as u64 words (entry e is words 2e = flags |
    slot << 32 and 2e+1 = offset: struct kvm_dirty_gfn, little-endian); ``ctr``: the ring's
    (dirty_index, reset_index, lost, pushes). Writes the entry at dirty_index & (size - 1) with
    flags DIRTY and advances dirty_index. A push into a full ring overwrites the entry there (the
    kernel only WARNs): counted in lost."""
    size = words.shape[0] >> 1
    if ring_used(ctr) >= size:
        ctr[2] += 1
    e = 2 * (ctr[0] & (size - 1))
    words[e] = np.uint64(KVM_DIRTY_GFN_F_DIRTY) | (np.uint64(kslot) << np.uint64(32))
    words[e + 1] = np.uint64(offset)
    ctr[0] += 1
    ctr[3] += 1


@njit(nogil=True)
def _push_run(words, ctr, slots, offsets):  # pragma: no cover - compiled
    for i in range(offsets.shape[0]):
        ring_push(words, ctr, slots[i], offsets[i])


@njit(nogil=True)
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


@njit(nogil=True)
def _coalesce(slots, offsets, out_slot, out_offset, out_mask):  # pragma: no cover - compiled
    """The re-protect coalescing over entries in ring order (see :func:`coalesce_reprotect`);
    the calls go to the out arrays. Returns how many."""
    k = 0
    cur_slot, cur_offset, mask = np.uint32(0), np.int64(0), np.uint64(0)  # mask 0: no call pending
    for i in range(slots.shape[0]):
        s, o = slots[i], np.int64(offsets[i])
        if mask and s == cur_slot:
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
        if mask:
            out_slot[k], out_offset[k], out_mask[k] = cur_slot, cur_offset, mask
            k += 1
        cur_slot, cur_offset, mask = s, o, np.uint64(1)
    if mask:
        out_slot[k], out_offset[k], out_mask[k] = cur_slot, cur_offset, mask
        k += 1
    return k


@njit(nogil=True)
def reset_rings(ring_addr, ring_ctr, tab_kslot, tab_start, tab_npages, tab_blockgran, tab_mode, state, block_map,
                block_shift, span, split_span, huge_ends):  # pragma: no cover - compiled
    """kvm_dirty_ring_reset for every vCPU's ring (ring_addr/ring_ctr as :func:`push_all`):
    from reset_index, while the entry has RESET set, set its flags to 0
    (kvm_dirty_gfn_set_invalid) and advance reset_index; the entries reset are coalesced into
    re-protect calls (:func:`_coalesce`), applied in order (:func:`memory.protect_masked`).
    As in the kernel the RESET flag alone decides, not dirty_index: entries userspace marked
    past dirty_index (never pushed) are reset too, reset_index passes dirty_index and the u32
    used wraps. An entry reset is 0, so one call resets each entry at most once.
    Returns (entries reset, re-protect calls made (a call the kernel skips, naming no memslot or
    running past its end, is not one), pages protected, blocks split)."""
    entries = calls = pages = splits = 0
    m = 0  # buffer size: the most entries any ring can reset now
    for v in range(ring_addr.shape[0]):
        m = max(m, _reset_bound(ring_addr[v], ring_ctr[v]))
    slots, offsets = np.empty(m, dtype=np.uint32), np.empty(m, dtype=np.uint64)
    out_slot, out_offset, out_mask = (np.empty(m, dtype=np.uint32), np.empty(m, dtype=np.int64),
                                      np.empty(m, dtype=np.uint64))
    for v in range(ring_addr.shape[0]):
        size = ring_addr[v, 1]
        words = words_at(ring_addr[v, 0], 2 * size)
        ri = ring_ctr[v, 1]
        n = 0
        while n < size:
            e = 2 * ((ri + n) & (size - 1))
            w = words[e]
            if not w & np.uint64(KVM_DIRTY_GFN_F_RESET):
                break
            words[e] = w & np.uint64(0xFFFFFFFF00000000)  # flags = 0, the slot stays
            slots[n], offsets[n] = w >> np.uint64(32), words[e + 1]
            n += 1
        k = _coalesce(slots[:n], offsets[:n], out_slot, out_offset, out_mask)
        npro, nsplit, applied = protect_masked(out_slot[:k], out_offset[:k], out_mask[:k], tab_kslot, tab_start,
                                               tab_npages, tab_blockgran, tab_mode, state, block_map, block_shift,
                                               span, split_span, huge_ends)
        ring_ctr[v, 1] = ri + n
        entries += n
        calls += applied
        pages += npro
        splits += nsplit
    return entries, calls, pages, splits


@numba.njit(inline="always")
def _reset_bound(addr, ctr):  # pragma: no cover - compiled
    """The most entries a reset of this ring can take: its used entries, or the whole ring if
    userspace marked the entry at dirty_index RESET too (then the reset runs past it)."""
    size = addr[1]
    used = min(ring_used(ctr), size)
    if used < size and words_at(addr[0], 2 * size)[2 * ((ctr[1] + used) & (size - 1))] & np.uint64(
            KVM_DIRTY_GFN_F_RESET):
        return size
    return used


def coalesce_reprotect(slots: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The re-protect coalescing of kvm_dirty_ring_reset (reference s6), over entries in ring order.

    Keeps (cur_slot, cur_offset, mask): an entry of the same slot with 0 <= delta < 64 sets bit
    delta; with -64 < delta < 0, if shifting the mask left by -delta loses no bit, the mask moves
    down to the new offset; anything else flushes the mask as one re-protect call. Returns the
    calls as arrays (slot, offset, mask), one row per
    ``kvm_arch_mmu_enable_log_dirty_pt_masked(slot, offset, mask)``.

    Inherently sequential (each decision depends on the mask so far), hence a compiled loop.
    """
    n = len(slots)
    out_slot, out_offset, out_mask = (np.empty(n, dtype=np.uint32), np.empty(n, dtype=np.int64),
                                      np.empty(n, dtype=np.uint64))
    k = _coalesce(np.ascontiguousarray(slots, dtype=np.uint32), np.ascontiguousarray(offsets, dtype=np.uint64),
                  out_slot, out_offset, out_mask)
    return out_slot[:k], out_offset[:k], out_mask[:k]
