"""The per-vCPU dirty ring, as Linux ``virt/kvm/dirty_ring.c`` keeps it.

The kernel side (push, soft-full, reset with re-protect coalescing) lives here; the userspace
side reads and marks the same numpy structured array (``DirtyRing.gfns``, dtype
:data:`~ringenv.kvm.uapi.kvm_dirty_gfn`), exactly as QEMU reads the ring it mmapped from the
vCPU fd. See shared/reference/kvm-dirty-ring.md sections 3, 5 and 6.
"""

from __future__ import annotations

import numba
import numpy as np

from .uapi import KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET, kvm_dirty_gfn

U32 = 0xFFFFFFFF


class DirtyRing:
    """One vCPU's ring: ``size`` entries, ``soft_limit = size - reserved``.

    ``dirty_index`` and ``reset_index`` are free-running u32 counters, as in the kernel;
    ``used = dirty_index - reset_index``.
    """

    __slots__ = ("gfns", "size", "soft_limit", "dirty_index", "reset_index", "lost", "pushes")

    def __init__(self, entries: int, reserved: int):
        assert entries & (entries - 1) == 0 and entries > reserved
        self.gfns = np.zeros(entries, dtype=kvm_dirty_gfn)
        self.size = entries
        self.soft_limit = entries - reserved
        self.dirty_index = 0
        self.reset_index = 0
        self.lost = 0  # pushes made while the ring was full: the kernel's WARN, an overwritten entry
        self.pushes = 0

    @property
    def used(self) -> int:
        return (self.dirty_index - self.reset_index) & U32

    def soft_full(self) -> bool:
        """kvm_dirty_ring_soft_full: used >= soft_limit."""
        return self.used >= self.soft_limit

    def full(self) -> bool:
        return self.used >= self.size

    def push(self, slot: int | np.ndarray, offsets: np.ndarray) -> bool:
        """kvm_dirty_ring_push, for a run of pushes in order: write each entry at
        ``dirty_index & (size-1)`` with flags = DIRTY, advance ``dirty_index``. A push into a full
        ring overwrites the entry there (the kernel only WARNs): counted in ``lost``.

        Returns True if the ring is soft-full afterwards (the SOFT_FULL request is raised)."""
        n = len(offsets)
        if n == 0:
            return False
        used0 = self.used
        room = max(0, self.size - used0)
        if n > room:
            self.lost += n - room
        pos = (self.dirty_index + np.arange(n, dtype=np.int64)) & (self.size - 1)
        slots = np.broadcast_to(np.asarray(slot, dtype=np.uint32), (n,))
        if n > self.size:  # later pushes overwrite earlier ones: keep only the last `size`
            pos, slots, offsets = pos[-self.size :], slots[-self.size :], offsets[-self.size :]
        g = self.gfns
        g["slot"][pos] = slots
        g["offset"][pos] = offsets
        g["flags"][pos] = KVM_DIRTY_GFN_F_DIRTY
        self.dirty_index = (self.dirty_index + n) & U32
        self.pushes += n
        return self.soft_full()

    def collect_harvested(self) -> tuple[np.ndarray, np.ndarray]:
        """The scan of kvm_dirty_ring_reset: from ``reset_index`` while the entry has RESET set,
        set its flags to 0 and advance ``reset_index``. Returns the (slot, offset) of the reset
        entries in ring order, for :func:`coalesce_reprotect`."""
        size, mask = self.size, self.size - 1
        used = self.used
        if used == 0:
            return _EMPTY_U32, _EMPTY_U64
        n = min(used, size)
        pos = (self.reset_index + np.arange(n, dtype=np.int64)) & mask
        harvested = (self.gfns["flags"][pos] & KVM_DIRTY_GFN_F_RESET) != 0
        stop = np.flatnonzero(~harvested)
        count = int(stop[0]) if len(stop) else n
        pos = pos[:count]
        slots = self.gfns["slot"][pos].copy()
        offsets = self.gfns["offset"][pos].copy()
        self.gfns["flags"][pos] = 0  # kvm_dirty_gfn_set_invalid
        self.reset_index = (self.reset_index + count) & U32
        return slots, offsets


_EMPTY_U32 = np.zeros(0, dtype=np.uint32)
_EMPTY_U64 = np.zeros(0, dtype=np.uint64)


@numba.njit(cache=True, nogil=True)
def _coalesce(slots, offsets, out_slot, out_offset, out_mask):  # pragma: no cover - compiled
    n = slots.shape[0]
    k = 0
    cur_slot = np.uint32(0)
    cur_offset = np.int64(0)
    mask = np.uint64(0)
    for i in range(n):
        s = slots[i]
        o = np.int64(offsets[i])
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
    out_slot = np.empty(n, dtype=np.uint32)
    out_offset = np.empty(n, dtype=np.int64)
    out_mask = np.empty(n, dtype=np.uint64)
    k = _coalesce(np.ascontiguousarray(slots, dtype=np.uint32), np.ascontiguousarray(offsets, dtype=np.uint64),
                  out_slot, out_offset, out_mask)
    return out_slot[:k], out_offset[:k], out_mask[:k]
