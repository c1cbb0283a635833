"""Dirty-page collectors: how the VMM learns which pages the guest wrote (QEMU accel/kvm).

:class:`RingCollector` -- the KVM dirty ring (QEMU ``-accel kvm,dirty-ring-size=N``):

- ``reap(only)`` harvests every ring (or one vCPU's, under dirty-limit) through the rings'
  userspace view (:class:`~ringenv.vmm.reap.RingReader`, QEMU ``kvm_dirty_ring_reap_one``) into
  the slot bitmap; ``reset(n)`` then issues one KVM_RESET_DIRTY_RINGS if anything was harvested
  and checks that KVM reset exactly what was harvested (QEMU asserts the same). The caller holds
  the big lock across both, as QEMU does (``kvm_dirty_ring_reap`` under the BQL).
- ``flush()`` is ``kvm_dirty_ring_flush`` after its kick (a synchronous run_on_cpu on every vCPU
  in turn, a process step of the session without the big lock:
  :meth:`~ringenv.vmm.session.Session.run_on_all_vcpus`): reap and reset. ``sync(last_stage)`` is
  the migration sync: flush, on the last stage also
  read the backup bitmap with KVM_GET_DIRTY_LOG (arm64 WITH_BITMAP, after the vGIC tables were
  saved), then move the slot bitmap into the migration bitmap.

:class:`BitmapCollector` -- the classic dirty log with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 and
INITIALLY_SET (QEMU's default without a ring): ``sync`` is one KVM_GET_DIRTY_LOG of the whole
slot plus QEMU's scan of the bitmap, so its cost grows with memory size; before the migration
thread sends the first page of a 1 GiB chunk after a sync, ``before_send`` issues
KVM_CLEAR_DIRTY_LOG for that chunk with the bits the last GET returned (QEMU's clear_bmap).

Costs come from the host profile (userspace work) and ``Vm.last_ioctl_ns`` (kernel work); the
generator methods yield the simulated time they take, the plain ones return it.

The userspace merge of a sync is charged unevenly, a modelling choice: the bitmap collector pays
the profile's ``bitmap_scan_page_ns`` per page of RAM (so does the ring's read of the backup
bitmap on the last stage), the ring collector's merge of its slot bitmap only per 64-page word.
QEMU walks both bitmaps a word at a time (kvm_slot_sync_dirty_pages ->
cpu_physical_memory_set_dirty_lebitmap, then the migration bitmap sync), so this makes a
big-memory bitmap sync costlier than QEMU's scan alone would be; the profile's value is a
per-page measurement of such a scan (``ringenv calibrate``).
"""

from __future__ import annotations

import numba
import numpy as np

from ..arrays import popcount, trailing_zeros
from ..jit import njit
from ..kvm.memory import bitmap_offsets
from .dirty import MIG_BLOCK, _see, _words
from .reap import RingReader, look_rings, reap_rings, ring_addresses

_NO_BITMAP = np.zeros(0, dtype=bool)
_NO_WORDS = np.zeros(0, dtype=np.uint64)
CLEAR_CHUNK_BYTES = 1 << 30  # QEMU clear_bitmap_shift default: 1 GiB chunks


class RingCollector:
    kind = "ring"
    #: whether limit_slice and before_send look at a slice's pages; the ring's do not, so the
    #: migration thread sends a run of consecutive pages without listing them (DirtyPages.take_run)
    reads_slices = False

    def __init__(self, session):
        self.s = session
        nv = len(session.vcpus)
        self._fetch = np.zeros(nv, dtype=np.int64)  # every ring's fetch index (the readers' cells)
        self._peek = np.zeros(nv, dtype=np.int64)  # entries before it were looked at (look_rings)
        self._overflows = 0  # ring overflows when the count of pages not yet saved was last rebuilt
        self._pml = session.profile.pml
        self.readers = [RingReader(v.ring_gfns, self._fetch[i:i + 1]) for i, v in enumerate(session.vcpus)]
        self._addr = ring_addresses(self.readers)
        self.entries = np.zeros(nv, dtype=np.int64)  # per-vCPU entries harvested (QEMU cpu->dirty_pages)
        self.soft_limit = session.vcpus[0].ring.soft_limit if nv else 1  # read once, as KVM documents it
        self.last_new = 0
        costs = session.costs
        self._entry_ns = costs.harvest_entry_ns
        self._ring_ns = costs.harvest_ring_ns

    # ---------------------------------------------------------------- harvest + reset
    def reap(self, only: int | None = None) -> tuple[int, int]:
        """Harvest all rings (or ring ``only``) now. Returns (entries, userspace ns)."""
        s = self.s
        sel = slice(None) if only is None else slice(only, only + 1)
        fetch = self._fetch[sel]  # a view: the fetch indexes move on in place
        counts = np.zeros(len(fetch), dtype=np.int64)
        d = s.dirty
        if d.tracking:  # the count of pages not yet saved: the entries not looked at go into seen first
            d.unsaved += look_rings(self._addr[sel], fetch, self._peek[sel], counts, 0, d.seen, d.mig,
                                    d.mig_count == 0)
        # only RAM (slot 0) is logged
        d.slot_marked += reap_rings(self._addr[sel], fetch, counts, True, 0, d.slot)
        if d.tracking:
            self._peek[sel] = fetch
        self.entries[sel] += counts
        total = sum(counts.tolist())
        s.harvests += 1
        s.entries_harvested += total
        if only is None:
            s.note_full_reap()
        return total, len(counts) * self._ring_ns + total * self._entry_ns

    def reset(self, n: int) -> int:
        """KVM_RESET_DIRTY_RINGS if anything was harvested. Returns the kernel ns."""
        if not n:
            return 0
        vm = self.s.vm
        got = vm.reset_dirty_rings()
        if got != n:  # QEMU: assert(ret == total)
            raise AssertionError(f"KVM_RESET_DIRTY_RINGS reset {got} entries, {n} were harvested")
        return vm.last_ioctl_ns

    def flush(self) -> int:
        """kvm_dirty_ring_flush's reap and reset (the caller holds the BQL, and ran its kick of
        every vCPU first: :meth:`Session.run_on_all_vcpus`). Returns the time it takes, ns (the
        caller holds the lock that long)."""
        n, work = self.reap()
        ns = self.reset(n)
        self.s.vmm_cpu_ns += work + ns
        return work + ns

    def sync(self, last_stage: bool = False) -> int:
        """migration_bitmap_sync in ring mode (caller holds the BQL). Returns ns."""
        s = self.s
        total = self.flush()
        if last_stage and s.with_bitmap:
            # arm64: the backup bitmap, after the vGIC/ITS tables were saved at vm stop
            bm = s.vm.get_dirty_log(0)
            ns = s.vm.last_ioctl_ns + int(s.npages * s.costs.bitmap_scan_page_ns)
            off = bitmap_offsets(bm, s.npages)
            s.dirty.mark_harvested(off)
            s.backup_bitmap_pages += len(off)
            s.vmm_cpu_ns += ns
            total += ns
        self.last_new = s.dirty.merge_slot()
        # QEMU walks the slot bitmap word by word: cheap, but it grows with memory (charged per
        # 64-page word here; the bitmap collector's sync per page: see the module docstring)
        ns = int((s.npages // 64) * s.costs.bitmap_scan_page_ns)
        s.vmm_cpu_ns += ns
        return total + ns

    def before_send(self, pages: np.ndarray) -> int:
        return 0

    def limit_slice(self, pages: np.ndarray) -> np.ndarray:
        return pages

    # ---------------------------------------------------------------- observation
    def ready(self) -> np.ndarray:
        """Entries waiting in each ring (the userspace view: DIRTY entries from fetch on)."""
        counts = np.zeros(len(self.readers), dtype=np.int64)
        reap_rings(self._addr, self._fetch, counts, False, 0, _NO_BITMAP)
        return counts

    def look(self, overflows: int = 0) -> np.ndarray:
        """:meth:`ready`; when the run keeps the count of pages not yet saved
        (``DirtyPages.unsaved``), bringing it up to date with the entries pushed since the last
        look (read once each). ``overflows``: the rings' overflows so far (``Vm.vcpu_totals``):
        an overflowing push may overwrite an entry already looked at, so when they went up the
        count is rebuilt from the bitmaps (a scan of RAM, only then)."""
        d = self.s.dirty
        if not d.tracking:
            return self.ready()
        if overflows != self._overflows:
            self._overflows = overflows
            d.seen[:] = 0
            d.seen.view(np.uint8)[: (d.npages + 7) // 8] = np.packbits(d.slot, bitorder="little")
            self._peek[:] = self._fetch
            d.unsaved = int(np.count_nonzero(d.mig | d.slot))
        counts = np.zeros(len(self.readers), dtype=np.int64)
        d.unsaved += look_rings(self._addr, self._fetch, self._peek, counts, 0, d.seen, d.mig, d.mig_count == 0)
        if self._pml:  # logged in a PML buffer, on its way to the ring
            pml = self.s.pml_logged()
            if len(pml):
                d.unsaved += int(_see(pml, d.seen, d.mig))
        return counts

    def unsaved_pages(self) -> int:
        """The pages a checkpoint taken now would save (after :meth:`look`; kept only when the
        session asked its DirtyPages to): dirty in the migration bitmap, harvested into the slot
        bitmap, waiting in a ring or (x86) logged in a PML buffer, each once."""
        return self.s.dirty.unsaved

    def seen_total(self) -> int:
        return int(self.entries.sum()) + int(self.ready().sum())


class BitmapCollector:
    kind = "bitmap"
    reads_slices = True  # (see RingCollector)

    def __init__(self, session):
        self.s = session
        ps = session.page_size
        self.chunk_pages = max(64, CLEAR_CHUNK_BYTES // ps)
        self.nchunks = (session.npages + self.chunk_pages - 1) // self.chunk_pages
        self.slot_bmp: np.ndarray | None = None  # the last GET's bits (QEMU KVMSlot.dirty_bmap)
        self.clear_pending = np.zeros(self.nchunks, dtype=bool)  # QEMU RAMBlock.clear_bmap
        self.last_new = 0
        self.entries = np.zeros(len(session.vcpus), dtype=np.int64)
        self._slot = None  # the kernel's memslot of RAM (for unsaved_pages)
        self._mig_words = None  # the migration bitmap's u64 words (for unsaved_pages)

    def reap(self, only=None):
        return 0, 0

    def reset(self, n):
        return 0

    def flush(self) -> int:
        return 0

    def sync(self, last_stage: bool = False) -> int:
        """migration_bitmap_sync with the dirty log: KVM_GET_DIRTY_LOG, QEMU's bitmap scan
        (``bitmap_scan_page_ns`` per page of RAM, where the ring's merge pays it per 64-page
        word: see the module docstring). Returns ns."""
        s = self.s
        vm = s.vm
        bm = vm.get_dirty_log(0)
        ns = vm.last_ioctl_ns + int(s.npages * s.costs.bitmap_scan_page_ns)
        bits = np.unpackbits(bm.view(np.uint8), bitorder="little", count=s.npages).view(bool)
        self.last_new = s.dirty.merge_bits(bits)
        del bits
        self.slot_bmp = bm
        self.clear_pending[:] = True
        s.harvests += 1
        s.vmm_cpu_ns += ns
        return ns

    def limit_slice(self, pages: np.ndarray) -> np.ndarray:
        """Cut a slice before the second 1 GiB chunk that still needs its CLEAR (the pages
        after the cut go back to the migration bitmap)."""
        if len(pages) == 0 or self.slot_bmp is None:
            return pages
        cp = self.chunk_pages
        ch = pages // cp
        if ch[0] == ch[-1] and int(pages[-1]) >= int(pages[0]):
            return pages
        starts = np.flatnonzero(ch[1:] != ch[:-1]) + 1  # first page of each later chunk run
        need = starts[self.clear_pending[ch[starts]]]
        if len(need) == 0:
            return pages
        cut = int(need[0])
        self.s.dirty.untake(pages[cut:])
        return pages[:cut]

    def before_send(self, pages: np.ndarray) -> int:
        """KVM_CLEAR_DIRTY_LOG for each 1 GiB chunk about to be sent from for the first time
        since the last sync. Returns the kernel ns (the migration thread waits for it)."""
        if len(pages) == 0 or self.slot_bmp is None:
            return 0
        cp = self.chunk_pages
        lo, hi = int(pages.min()) // cp, int(pages.max()) // cp
        if lo == hi:
            chunks = [lo] if self.clear_pending[lo] else []
        else:
            c = np.unique(pages // cp)
            chunks = c[self.clear_pending[c]].tolist()
        if not chunks:
            return 0
        s, vm = self.s, self.s.vm
        ns = 0
        for c in chunks:
            first = c * cp
            num = min(cp, s.npages - first)
            w0, w1 = first // 64, (first + num + 63) // 64
            words = self.slot_bmp[w0:w1]
            vm.clear_dirty_log(0, first, num, words)
            ns += vm.last_ioctl_ns
            self.slot_bmp[w0:w1] = 0
            self.clear_pending[c] = False
            s.clears += 1
        s.vmm_cpu_ns += ns
        return ns

    def ready(self) -> np.ndarray:
        return np.zeros(len(self.s.vcpus), dtype=np.int64)

    def look(self, overflows: int = 0) -> np.ndarray:
        return self.ready()

    def unsaved_pages(self) -> int:
        """The pages a checkpoint taken now would save: dirty in the migration bitmap, or logged
        in the kernel's dirty bitmap since (a page once). The kernel's bitmap is read as it is,
        without an ioctl (a measurement: QEMU would need a KVM_GET_DIRTY_LOG); a chunk still
        waiting for its KVM_CLEAR_DIRTY_LOG still holds the bits of the last GET, which are in
        the migration bitmap already. On x86 with PML, also the pages logged in the vCPUs' PML
        buffers. Cost: a popcount of the kernel's bitmap, plus a look at the migration bitmap in
        the blocks it partly covers (kept only when the session asked its DirtyPages to:
        ``mig_blocks``)."""
        d = self.s.dirty
        kernel = self._kernel_bitmap()
        if kernel is None or d.mig_blocks is None:
            return d.mig_count
        if d.mig_count == 0:
            n = int(_popcount_all(kernel))
        else:
            got = self.slot_bmp if self.slot_bmp is not None else _NO_WORDS
            if self._mig_words is None:
                self._mig_words = _words(d.mig)
            n = d.mig_count + int(_kernel_only(kernel, got, self.clear_pending, self.chunk_pages // 64, d.mig,
                                               self._mig_words, d.mig_blocks))
        if self.s.profile.pml:  # logged in a PML buffer, on its way to the bitmap
            pml = np.unique(self.s.pml_logged())
            if len(pml):
                in_kernel = (kernel[pml >> 6] >> (pml & 63).astype(np.uint64)) & np.uint64(1)
                n += int(np.count_nonzero((in_kernel == 0) & ~d.mig[pml]))
        return n

    def _kernel_bitmap(self) -> np.ndarray | None:
        """The RAM slot's dirty bitmap in the kernel (None before logging is on)."""
        if self._slot is None:
            self._slot = self.s.vm.memslot(0)
        return None if self._slot is None else self._slot.dirty_bitmap

    def seen_total(self) -> int:
        return 0


@numba.njit(inline="always")
def _popcount_range(words, a, b):  # pragma: no cover - compiled
    """Set bits of words[a:b]: a plain reduction over a slice (indexes from 0 to its length,
    which need no wraparound check, so that the loop vectorises)."""
    sub = words[a:b]
    n = 0
    for i in range(sub.shape[0]):
        n += popcount(sub[i])
    return n


@njit(nogil=True)
def _popcount_all(words):  # pragma: no cover - compiled
    """Set bits of a u64 bitmap."""
    return _popcount_range(words, 0, words.shape[0])


@njit(nogil=True)
def _kernel_only(kernel, got, pending, chunk_words, mig, mig_words, blocks):  # pragma: no cover - compiled
    """Pages set in the kernel's bitmap ``kernel`` (u64 words) and not in ``mig`` (bool per page;
    ``mig_words``: its whole u64 words, 8 pages each; ``blocks``: its pages per MIG_BLOCK), a
    block at a time: a block all in mig adds nothing (unread), a block with none of mig the
    popcount of its words; in the others, within a chunk still ``pending`` its
    KVM_CLEAR_DIRTY_LOG the bits of the last GET (``got``) are in mig already, and the rest is
    compared with the block's mig bytes, 8 at a time."""
    n = 0
    npages = mig.shape[0]
    bw = MIG_BLOCK // 64  # words of ``kernel`` per block
    nw = kernel.shape[0]
    for b in range(blocks.shape[0]):
        c = blocks[b]
        w0, w1 = b * bw, min(nw, (b + 1) * bw)
        if c == 0:
            n += _popcount_range(kernel, w0, w1)
            continue
        if c == min(MIG_BLOCK, npages - b * MIG_BLOCK):
            continue
        for i in range(w0, w1):
            w = kernel[i]
            if w == 0:
                continue
            if got.shape[0] and pending[i // chunk_words]:
                w &= ~got[i]
                if w == 0:
                    continue
            base = 64 * i
            if base + 64 <= 8 * mig_words.shape[0]:
                m = np.uint64(0)  # the 64 pages' bytes (0 or 1) gathered into bits
                for j in range(8):
                    m |= ((mig_words[8 * i + j] * np.uint64(0x0102040810204080)) >> np.uint64(56)) << np.uint64(8 * j)
                n += np.int64(popcount(w & ~m))
            else:
                while w != 0:
                    p = base + np.int64(trailing_zeros(w))
                    w &= w - np.uint64(1)
                    if p < npages and not mig[p]:
                        n += 1
    return n
