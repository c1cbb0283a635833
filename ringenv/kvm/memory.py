"""Guest memory as KVM sees it: memslots and the stage-2 state of every base page.

Per base page, one state byte and one version word (5 bytes):

- ``WP``: stage-2 write-protected (dirty-logging armed): the next write faults. For a page still
  mapped by a block, every page of the block carries the block's permission.
- ``CLEAN``: not written since the page was last write-protected. Workload models sample the
  first write to a clean page (memoryless); trace replay ignores it. Verification does not
  rely on it.
- ``UNMAPPED``: no stage-2 mapping yet (a fresh VM, or memory the guest never touched): the
  first access is a translation fault that maps it (``mapped_fraction`` of a slot starts mapped).
- ``UNTOUCHED``: the host has never written the page (fresh anonymous memory: the shared zero
  page stands behind it). A read fault maps it read-only whatever the slot (hva_to_pfn finds
  no writable host page), so it logs nothing; the first write allocates it (with a huge page
  behind, all of the huge page). Set on the memory a new slot leaves untouched, unless the
  slot is ``populated`` (userspace wrote it: QEMU's -mem-prealloc, a loaded image).

Per block (2 MiB with 4K pages, 32 MiB with 16K, 512 MiB with 64K; guest-physical blocks: a
slot's partial first and last blocks are pages, :meth:`Memslot.place`), one byte: mapped by a block
(``BLOCK``, 1) or by a table of pages (0); splitting a block is one update, as it is one stage-2
entry. ``SPLIT_HUGE`` (2) is a table of pages over a huge page in a slot that is not logging
(arm64 eager split of a ring-only or read-only slot, or a slot whose logging was turned off):
the next fault there maps the huge page as a block again (user_mem_abort ->
transparent_hugepage_adjust), so the fault path treats it as a block and it becomes ``BLOCK``;
once the slot logs again it is a plain table (0). A block of memory the guest has not touched
yet (``UNMAPPED``) stands for the huge page behind it: the fault that maps it maps a block
unless logging forces pages.

``version`` counts the writes to the page that retired; the VMM copies it with the page, so a
migration verifies itself by comparing versions (docs/reference/kvm-dirty-ring.md s10).

The arm64 stage-2 rules are those of reference section 7: enabling logging write-protects the
slot; while logging, blocks are split into pages (lazily on the first write fault, or eagerly when
logging is enabled with KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE, or on x86 with the eager_page_split
module parameter); a permission fault relaxes one page. A split on a write fault leaves a table
mapping only the faulting page on arm64 (stage2_map_walk_leaf) and with the x86 shadow MMU
(drop_large_spte; measured, real-kvm-host.md): the block's other pages are ``UNMAPPED`` (and
``WP``) until each faults (fault.SPLIT_EMPTY); the x86 TDP MMU, and an eager split, leave a
table of write-protected pages. A workload window's split marks such a block ``EMPTY`` instead
of its 511 other pages (the write walk and the reset take an EMPTY block's pages as unmapped but
for those mapped since, ``TABLED``); the Vm writes the pages out before anything else reads the
state (Vm._write_out_empty). In a slot with dirty tracking
on, a page not mapped yet carries ``WP``: the fault that maps it writable logs it, as a
permission fault does. Turning logging off leaves pages write-protected until each faults once (section 12).
"""

from __future__ import annotations

import numpy as np

from ..arrays import prefetch
from ..jit import njit

PROTECT_AHEAD = 16  # write-protect calls to look ahead when prefetching their page's state

WP = np.uint8(1)
CLEAN = np.uint8(2)
UNMAPPED = np.uint8(4)
RO = np.uint8(8)  # x86 PML: mapped write-protected, not merely dirty-bit clear (fault.RO)
UNTOUCHED = np.uint8(16)  # never written on the host: a read maps the zero page (fault.UNTOUCHED)
TABLED = np.uint8(32)  # mapped in an EMPTY table (fault.TABLED)
WP_CLEAN = np.uint8(WP | CLEAN)  # protect_masked and fault.walk_writes use these values (1, 2, 3)

# block_map values (0: a table of pages); EMPTY: a table a split left mapping only the pages
# faulted since (the TABLED ones: the others UNMAPPED), not yet written out page by page
# (fault.EMPTY, Vm._write_out_empty): only the write walk and the reset's re-protect see it
BLOCK, SPLIT_HUGE, EMPTY = 1, 2, 3


class Memslot:
    """One KVM memslot (``struct kvm_userspace_memory_region``) and its pages' state."""

    def __init__(self, slot_id: int, as_id: int, base_gfn: int, npages: int, flags: int,
                 block_pages: int, block_fraction: float, seed: int = 0, mapped_fraction: float = 1.0,
                 populated: bool = False):
        self.id = slot_id
        self.as_id = as_id
        self.kvm_slot = (as_id << 16) | slot_id  # what kvm_dirty_gfn.slot carries
        self.npages = npages
        self.flags = flags
        self.block_pages = block_pages
        self.dirty_bitmap: np.ndarray | None = None  # the slot bitmap (bitmap mode, or the backup bitmap)
        # the userspace memory behind the slot is taken as aligned as the slot was when created
        # (the simulator has no userspace address): its huge pages fall where guest-physical
        # blocks did then
        self.hva_phase = base_gfn % block_pages if block_pages > 1 else 0
        self._init = (block_fraction, mapped_fraction, seed)
        self.populated = populated
        self.place(base_gfn)
        # views into the VM's page arrays, set when the VM lays its slots out (Vm._layout)
        self.start = 0
        self.state: np.ndarray | None = None
        self.version: np.ndarray | None = None
        self.blocks: np.ndarray | None = None  # per block: BLOCK, SPLIT_HUGE or 0 (module docstring)
        # a weak reference to what to call before the stage-2 state is read for counts (the Vm's
        # _write_out_empty: weak, so that a dropped Vm is freed at once and its arrays recycled)
        self.before_read = None

    def place(self, base_gfn: int) -> None:
        """Put the slot at guest frame ``base_gfn`` (created or moved): its blocks are the
        guest-physical blocks it covers whole, from slot page ``head`` on (``nblocks`` of
        them); the partial blocks at its ends are mapped by pages (arm64
        fault_supports_stage2_huge_mapping, x86's lpage_info of a slot's partial first and last
        large pages). A slot moved by other than a whole number of blocks has no block mapping
        (its ``nblocks`` entries stay tables): its userspace memory no longer lines up with
        guest-physical blocks."""
        bp = self.block_pages
        self.base_gfn = base_gfn
        self.lead = base_gfn % bp if bp > 1 else 0  # pages of its first guest-physical block before it
        self.head = (bp - self.lead) % bp if bp > 1 else 0
        self.nblocks = (self.npages - self.head) // bp if bp > 1 and self.npages > self.head else 0
        self.aligned = self.lead == self.hva_phase

    def initialize(self) -> None:
        """Fill a new slot's freshly laid-out (zeroed) arrays: which blocks are backed by huge
        pages, which memory is not mapped yet (and, unless the slot is populated, never written
        on the host: ``UNTOUCHED``)."""
        block_fraction, mapped_fraction, seed = self._init
        self.blocks[self._huge_pages()] = BLOCK
        if mapped_fraction < 1.0:  # untouched memory, chosen a guest-physical block at a time
            chunk = max(self.block_pages, 1)
            nchunks = -(-(self.lead + self.npages) // chunk)
            gone = ~_choose_blocks(nchunks, mapped_fraction, seed ^ (self.id * 0x85EBCA6B) ^ 0xA5)
            self.state[np.repeat(gone, chunk)[self.lead: self.lead + self.npages]] |= (
                UNMAPPED if self.populated else UNMAPPED | UNTOUCHED)

    def _huge_pages(self) -> np.ndarray:
        """Which blocks of the userspace memory behind the slot are huge pages (THP): a seeded,
        reproducible choice of ``block_fraction`` of them."""
        block_fraction, _, seed = self._init
        if not self.nblocks or block_fraction <= 0 or not self.aligned:
            return np.zeros(self.nblocks, dtype=bool)
        return _choose_blocks(self.nblocks, block_fraction, seed ^ (self.id * 0x9E3779B1))

    @property
    def nr_block_mapped(self) -> int:
        return int(np.count_nonzero(self.blocks == BLOCK))

    def leaf_mappings(self) -> tuple[int, int]:
        """The slot's stage-2 leaves now: (pages mapped by a page, blocks mapped by a block).
        A block standing for a huge page the guest has not touched (``UNMAPPED``) is no leaf
        yet; a table of pages counts the pages of it that are mapped. On x86 these are what the
        VM statistics pages_4k and pages_2m count for the slot (kvm_update_page_stats, at each
        leaf installed or zapped; the simulator has no 1 GiB leaf), the x86 shadow MMU's pte
        prefetch in a slot that is not dirty-logged included (up to 7 neighbours of a faulting
        4 KiB page, its aligned group of 8: :mod:`ringenv.kvm.fault`)."""
        write_out = self.before_read() if self.before_read is not None else None
        if write_out is not None:
            write_out()
        mapped = (self.state & UNMAPPED) == 0
        if not self.nblocks:
            return int(np.count_nonzero(mapped)), 0
        bp = self.block_pages
        inner = mapped[self.head: self.head + self.nblocks * bp].reshape(self.nblocks, bp)
        leaf = (self.blocks == BLOCK) & inner.any(axis=1)
        pages = int(np.count_nonzero(mapped)) - int(np.count_nonzero(inner[self.blocks == BLOCK]))
        return pages, int(np.count_nonzero(leaf))

    def split_all_blocks(self, keep_huge: bool = False) -> int:
        """Eager split (kvm_mmu_split_memory_region): every block mapping becomes a table of
        pages; memory not mapped yet has no mapping to split. ``keep_huge``: the slot is not
        logging, so the next fault in each of them maps the huge page as a block again
        (``SPLIT_HUGE``). Returns blocks split."""
        split = self.blocks == BLOCK
        split &= (self.state[self.head:: self.block_pages][: self.nblocks] & UNMAPPED) == 0
        self.blocks[split] = SPLIT_HUGE if keep_huge else 0
        return int(np.count_nonzero(split))

    def mark_collapsible(self) -> int:
        """Logging went off on arm64 (kvm_arch_commit_memory_region leaves stage 2 alone): a
        table of pages over a huge page becomes ``SPLIT_HUGE``, so the next permission fault
        there maps the huge page as a block again (user_mem_abort, no longer forced to pages,
        -> transparent_hugepage_adjust). Returns such blocks."""
        huge = self._huge_pages() & (self.blocks == 0)
        self.blocks[huge] = SPLIT_HUGE
        return int(np.count_nonzero(huge))

    def clear_small_page_protection(self) -> None:
        """x86 with PML, logging off: logging had only cleared the dirty bits of 4K mappings
        (kvm_mmu_slot_leaf_clear_dirty), not write-protected them; only huge mappings were
        (kvm_mmu_slot_remove_write_access at PG_LEVEL_2M). The pages mapped, not by a block,
        are writable: a write costs nothing (a page not mapped yet still faults)."""
        pages = (self.state & (UNMAPPED | RO)) == 0  # (a split huge page's 4K children stay write-protected)
        if self.nblocks:
            pages[self.head: self.head + self.nblocks * self.block_pages] &= np.repeat(self.blocks != BLOCK,
                                                                                      self.block_pages)
        self.state[pages] &= ~(WP | CLEAN)

    def zap_collapsible(self) -> int:
        """x86 shadow MMU, logging off (kvm_rmap_zap_collapsible_sptes): the 4K mappings of a
        huge page split into pages are dropped; the next access faults and maps the huge page
        (a block) again, the write fault making it writable. Returns blocks zapped."""
        blocks = np.flatnonzero(self._huge_pages() & (self.blocks != BLOCK))
        if len(blocks):
            pages = (self.head + blocks[:, None] * self.block_pages + np.arange(self.block_pages)).ravel()
            self.state[pages] = (self.state[pages] & UNTOUCHED) | UNMAPPED | WP_CLEAN
            self.blocks[blocks] = BLOCK
        return len(blocks)

    def recover_huge_pages(self) -> int:
        """x86 TDP MMU, logging off (kvm_tdp_mmu_recover_huge_pages, Linux 6.13+): a huge page
        split into pages is mapped by a huge spte again at once, built from the first present
        4K spte under it (make_huge_spte keeps its permissions): the whole block is writable or
        write-protected as that page was. A table with no page mapped under it is left as it
        is (``SPLIT_HUGE``: the next fault maps the huge page). Returns blocks recovered."""
        blocks = np.flatnonzero(self._huge_pages() & (self.blocks != BLOCK))
        if not len(blocks):
            return 0
        view = self.state[self.head: self.head + self.nblocks * self.block_pages].reshape(self.nblocks,
                                                                                           self.block_pages)
        st = view[blocks]
        mapped = (st & UNMAPPED) == 0
        present = mapped.any(axis=1)
        self.blocks[blocks[~present]] = SPLIT_HUGE
        blocks, st, mapped = blocks[present], st[present], mapped[present]
        wp = (st[np.arange(len(blocks)), mapped.argmax(axis=1)] & WP) != 0
        view[blocks] = np.where(wp[:, None], st | WP_CLEAN, st & ~(WP | CLEAN)) & ~(UNMAPPED | RO)
        self.blocks[blocks] = BLOCK
        return len(blocks)

    def unmap_all(self) -> None:
        """kvm_arch_flush_shadow_memslot (a memslot moved): nothing of the slot is mapped at
        stage 2 any more; the huge pages behind it are what the faults that map it again find."""
        self.state &= UNTOUCHED  # (the memory behind it is what it was)
        self.state |= UNMAPPED
        self.blocks[:] = 0
        self.blocks[self._huge_pages()] = BLOCK

    # -- dirty bitmap ------------------------------------------------------------------------
    def alloc_bitmap(self, initially_set: bool = False) -> None:
        words = (self.npages + 63) // 64
        self.dirty_bitmap = np.full(words, ~np.uint64(0) if initially_set else 0, dtype=np.uint64)
        if initially_set and self.npages % 64:
            self.dirty_bitmap[-1] = (np.uint64(1) << np.uint64(self.npages % 64)) - np.uint64(1)

    def set_dirty_bits(self, offsets: np.ndarray) -> None:
        """set_bit_le for each offset (mark_page_dirty into the slot bitmap)."""
        if len(offsets):
            _set_bits(self.dirty_bitmap, np.ascontiguousarray(offsets, dtype=np.int64))

    @property
    def logging(self) -> bool:
        return bool(self.flags & 1)


@njit(nogil=True)
def _set_bits(bitmap, offsets):  # pragma: no cover - compiled
    for i in range(offsets.shape[0]):
        o = offsets[i]
        bitmap[o >> 6] |= np.uint64(1) << np.uint64(o & 63)


def bitmap_offsets(bitmap: np.ndarray, npages: int) -> np.ndarray:
    """Offsets of the set bits of a little-endian u64 bitmap, ascending. Only the non-zero
    words are expanded: a sparse bitmap (the backup bitmap at a sync) costs a scan of its words."""
    words = np.flatnonzero(bitmap)
    if len(words) * 8 > len(bitmap):  # dense: expand everything
        return np.flatnonzero(np.unpackbits(bitmap.view(np.uint8), bitorder="little")[:npages])
    bits = np.flatnonzero(np.unpackbits(bitmap[words].view(np.uint8), bitorder="little"))
    off = words[bits >> 6] * 64 + (bits & 63)
    return off[off < npages]


def offsets_bitmap(offsets: np.ndarray, npages: int) -> np.ndarray:
    bits = np.zeros(((npages + 63) // 64) * 64, dtype=np.uint8)
    bits[offsets] = 1
    return np.packbits(bits, bitorder="little").view(np.uint64)


def _choose_blocks(nblocks: int, fraction: float, seed: int) -> np.ndarray:
    """Which blocks are backed by huge pages: a seeded, reproducible choice of round(f*n) blocks."""
    k = int(round(fraction * nblocks))
    if k >= nblocks:
        return np.ones(nblocks, dtype=bool)
    rng = np.random.default_rng(seed & 0xFFFFFFFF)
    out = np.zeros(nblocks, dtype=bool)
    out[rng.choice(nblocks, size=k, replace=False)] = True
    return out


@njit(nogil=True, inline="always")
def _slot_index(tab_kslot, kslot):  # pragma: no cover - compiled
    """The row of memslot ``kslot`` in the slot table, or -1 (no such memslot)."""
    for j in range(tab_kslot.shape[0]):
        if tab_kslot[j] == kslot:
            return j
    return -1


@njit(nogil=True)
def protect_masked(kslots, offsets, masks, tab_kslot, tab_start, tab_npages, tab_blockgran, tab_mode,
                   state, block_map, block_shift, span, split_span, huge_ends):  # pragma: no cover - compiled
    """kvm_arch_mmu_enable_log_dirty_pt_masked for each call (slot, offset, mask), in order.

    Write-protects the pages of the mask: exactly its set bits (x86), or with ``span`` every page
    from its lowest to its highest set bit, zero bits included (arm64). A call naming no memslot,
    or running past its end, is skipped as the kernel skips it. A page still mapped by a block
    protects the whole block, as the block is one stage-2 leaf: on arm64 in every slot
    (kvm_stage2_wp_range changes the leaf's permission), on x86 where blocks stay while logging.
    With ``split_span`` (manual protect with INITIALLY_SET, and arm64 an eager split chunk or
    x86 eager_page_split with the TDP MMU) the span's block mappings are split into pages
    (arm64 kvm_mmu_split_huge_pages after protecting, x86 kvm_mmu_try_split_huge_pages before:
    the same pages end up protected where it matters, a logging slot): to plain tables
    in a logging slot, to ``SPLIT_HUGE`` in one that is not (``tab_mode`` non-zero, see
    fault.walk_writes). With ``huge_ends`` (x86 with manual protect and INITIALLY_SET) the
    huge mapping of the first and of the last page of the mask, if one is left there after the
    split, is write-protected whole (kvm_mmu_slot_gfn_write_protect(..., PG_LEVEL_2M) for
    both ends: the x86 4K part, kvm_mmu_write_protect_pt_masked or
    kvm_mmu_clear_dirty_pt_masked, touches only 4K mappings, so a page under a huge mapping
    must fault through it to be logged at 4K). Every protected page is clean afterwards.
    Returns (stage-2 entries write-protected: one per page mapped by a page, one per block leaf
    per call (the range walk meets the leaf once, however many of the call's pages lie in it),
    one per huge mapping protected by ``huge_ends``; blocks split; calls applied: those the
    kernel makes, the skipped ones left out)."""
    npro = 0
    nsplit = 0
    applied = 0
    n = kslots.shape[0]
    for i in range(n):
        if i + PROTECT_AHEAD < n:  # a random page of a big guest is a cache miss: overlap them
            a = i + PROTECT_AHEAD
            j = _slot_index(tab_kslot, kslots[a])
            if j >= 0:
                g = tab_start[j] + offsets[a]
                prefetch(state, g)
                prefetch(block_map, g >> block_shift)
        k = _slot_index(tab_kslot, kslots[i])
        mask = masks[i]
        if k < 0 or mask == 0:
            continue
        lo = 0
        while not (mask >> np.uint64(lo)) & np.uint64(1):
            lo += 1
        hi = lo
        rest = mask >> np.uint64(lo + 1) if lo < 63 else np.uint64(0)  # a shift by 64 is undefined
        while rest:
            rest >>= np.uint64(1)
            hi += 1
        off = offsets[i]
        if off < 0 or off + hi >= tab_npages[k]:
            continue
        applied += 1
        base = tab_start[k] + off
        leaf = -1  # the block last protected whole
        for b in range(lo, hi + 1):
            if not span and not (mask >> np.uint64(b)) & np.uint64(1):
                continue
            g = base + b
            blk = g >> block_shift
            if block_map[blk] == BLOCK and (span or tab_blockgran[k]):
                if blk != leaf:  # one leaf: written once per call, whatever the call's bits in it
                    for p in range(blk << block_shift, (blk + 1) << block_shift):
                        state[p] |= 3
                    leaf = blk
                    npro += 1
            else:
                state[g] |= 3
                npro += 1
        if split_span:
            for blk in range((base + lo) >> block_shift, ((base + hi) >> block_shift) + 1):
                if block_map[blk] == BLOCK and not state[blk << block_shift] & UNMAPPED:  # a block mapping exists
                    block_map[blk] = SPLIT_HUGE if tab_mode[k] else 0
                    nsplit += 1
        if huge_ends:
            b_lo, b_hi = (base + lo) >> block_shift, (base + hi) >> block_shift
            for blk in (b_lo, b_hi):  # the same block twice when the range does not cross
                if block_map[blk] == BLOCK and not state[blk << block_shift] & UNMAPPED:  # a huge mapping exists
                    for p in range(blk << block_shift, (blk + 1) << block_shift):
                        state[p] |= 3
                    npro += 1
                if b_hi == b_lo:
                    break
    return npro, nsplit, applied
