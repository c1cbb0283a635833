"""The VMM's own dirty-page bookkeeping, as numpy arrays (QEMU: the KVMSlot dirty_bmap and the
RAMBlock migration bitmap), and the destination's copy of every page.

Per guest base page (6 bytes in all; the kernel keeps its own ~5):

- ``slot`` (bool): harvested from the rings since the last sync (QEMU ``KVMSlot.dirty_bmap``
  filled by ``kvm_dirty_ring_mark_page``); ring collector only;
- ``mig`` (bool): still to send in this pass (QEMU ``RAMBlock.bmap``);
- ``dest`` (u32): the page version the destination (or the checkpoint image) holds, plus one
  (0: never sent, which also counts re-sent pages). Sending a page copies the source's version
  at send time: that is the page content. At the end the migration verifies
  ``dest == source + 1`` for every page (kvm-dirty-ring.md s10).

With the ring, a checkpoint run also keeps for its metrics (QEMU has no such count)
``unsaved``: the pages dirty in ``mig`` or in ``seen`` (a u64 bitmap, 1 bit per page so that it
stays in cache: the pages harvested into ``slot`` or in a ring entry the VMM has looked at,
:func:`ringenv.vmm.reap.look_rings`), each page once. Every change of those bitmaps keeps it up
to date, so it costs no scan of RAM: a look at each ring entry once, and at the pages each send
takes. ``seen`` is cleared at every merge, which follows a flush (no entry looked at is left in
a ring). With the bitmap, such a run keeps ``mig_blocks`` instead: the pages of ``mig`` in each
block of ``MIG_BLOCK`` pages, so that a look at the kernel's bitmap reads ``mig`` only in the
blocks it partly covers (:func:`ringenv.vmm.collectors.BitmapCollector.unsaved_pages`).

Pages are sent in chunks found with vectorized scans of ``mig``, never one by one in Python.

Zero pages (a VM with ``zero_fraction`` > 0): a page holds only zeros while it is one of the
pages that start zero (:func:`initially_zero`) and the guest has not written it (its version
is 0). Sending reads the page, as QEMU's save_zero_page does: :meth:`DirtyPages.copy` returns
how many of the pages sent were zero. With ``zero_fraction`` 0 nothing is checked.
"""

from __future__ import annotations

import numba
import numpy as np

from ..arrays import RECYCLER, popcount, trailing_zeros
from ..jit import njit

MIG_BLOCK_SHIFT = 12
MIG_BLOCK = 1 << MIG_BLOCK_SHIFT  # pages per block of ``DirtyPages.mig_blocks`` (64 words of a u64 bitmap)
ZERO_SHIFT = 24  # a zero fraction as a fixed-point number of 24 fractional bits (:func:`zero_q`)


def zero_q(fraction: float) -> int:
    """``fraction`` (0..1) in the fixed point :func:`initially_zero` takes (a fraction below
    2^-25 is 0). :func:`initially_zero` is exact for pages below 2^39 (2 PiB of 4 KiB pages)."""
    return int(round(fraction * (1 << ZERO_SHIFT)))


@njit(nogil=True)
def initially_zero(p, zq):  # pragma: no cover - compiled
    """Whether page ``p`` holds only zeros when the VM starts, for a zero fraction z =
    ``zq`` / 2^24: the pages where floor(p z) steps up, so that every run of pages [a, b) has
    floor(b z) - floor(a z) of them, spread as evenly as whole pages allow (z = 1/4: pages 3, 7,
    11, ...; z = 1: every page)."""
    return ((p + 1) * zq) >> ZERO_SHIFT > (p * zq) >> ZERO_SHIFT


class DirtyPages:
    def __init__(self, npages: int, with_slot: bool, track_unsaved: bool = False, zero_fraction: float = 0.0):
        self.npages = npages
        self.zero_q = zero_q(zero_fraction)  # 0: no page starts zero, none is checked
        self.zero_pages = 0  # pages sent that were zero
        self.mig = RECYCLER.zeros(npages, bool)
        self.slot = RECYCLER.zeros(npages, bool) if with_slot else None
        self.dest = RECYCLER.zeros(npages, np.uint32)  # source version + 1 at send time; 0: never sent
        # slot's pages and those of ring entries looked at, a bit each (module docstring)
        self.seen = RECYCLER.zeros((npages + 63) // 64, np.uint64) if with_slot and track_unsaved else None
        self.tracking = self.seen is not None  # ``unsaved`` is kept
        # with the bitmap: mig's pages per block of MIG_BLOCK (module docstring)
        self.mig_blocks = np.zeros(-(-npages // MIG_BLOCK), dtype=np.int64) \
            if track_unsaved and not with_slot else None
        self.mig_count = 0
        self.unsaved = 0  # pages in mig or seen (kept only when tracking)
        self.slot_marked = 0  # harvested entries marked in ``slot`` since the last merge
        self.cursor = 0  # where the migration thread's search continues (QEMU last_seen_block/last_page)
        self.pages_sent = 0
        self.pages_resent = 0
        self._sent_end = 0  # 1 + the highest page ever sent: the pages from here on never were

    @property
    def nbytes(self) -> int:
        """QEMU's bookkeeping memory: the bitmaps and the destination's copy (not ``seen``, the
        simulator's own)."""
        return sum(a.nbytes for a in (self.mig, self.slot, self.dest) if a is not None)

    # ------------------------------------------------------------------ filling the bitmaps
    def mark_harvested(self, offsets: np.ndarray) -> None:
        """Dirty pages harvested (the backup bitmap's): set their bits in the slot bitmap."""
        if len(offsets):
            self.slot[offsets] = True
            if self.tracking:
                self.unsaved += int(_see(np.ascontiguousarray(offsets, dtype=np.int64), self.seen, self.mig))
            self.slot_marked += len(offsets)

    def set_all(self) -> None:
        """Migration setup: every page is dirty (QEMU's bulk stage)."""
        self.mig[:] = True
        self.mig_count = self.npages
        self.unsaved = self.npages
        if self.mig_blocks is not None:
            self.mig_blocks[:] = MIG_BLOCK
            self.mig_blocks[-1] = self.npages - MIG_BLOCK * (len(self.mig_blocks) - 1)

    def merge_slot(self) -> int:
        """Sync (ring): the slot bitmap into the migration bitmap, then clear it. Returns the
        pages that became dirty (QEMU num_dirty_pages_period). Called right after every ring
        was harvested (a flush): ``seen`` then holds the slot's pages only and is cleared too
        (``unsaved`` stays: they are in mig now)."""
        if not self.slot_marked:  # (nor is any page seen: a merge follows a flush)
            return 0
        new = int(_merge(self.mig, self.slot, _words(self.mig), _words(self.slot)))
        if self.tracking:
            self.seen.fill(0)
        self.mig_count += new
        self.slot_marked = 0
        return new

    def merge_bits(self, bits: np.ndarray) -> int:
        """Sync (bitmap): a bool array of dirty pages into the migration bitmap."""
        np.logical_or(self.mig, bits, out=self.mig)
        if self.mig_blocks is not None:  # the per-block counts sum to the count
            _count_blocks(self.mig, _words(self.mig), self.mig_blocks)
            count = int(self.mig_blocks.sum())
        else:
            count = int(np.count_nonzero(self.mig))
        new = count - self.mig_count
        self.mig_count = count
        return new

    # ------------------------------------------------------------------ sending
    def take(self, maxn: int) -> np.ndarray:
        """Up to ``maxn`` dirty pages from the cursor on, wrapping around once, in the order
        the migration thread finds them; their bits are cleared."""
        if self.mig_count == 0 or maxn <= 0:
            return np.zeros(0, dtype=np.int64)
        run = self.take_run(maxn)
        if run is not None:
            return np.arange(run[0], run[0] + run[1], dtype=np.int64)
        n, mig = self.npages, self.mig
        want = min(maxn, self.mig_count)
        c = self.cursor
        pages = np.empty(want, dtype=np.int64)
        got, end = _take(mig, _words(mig), c, want, pages)
        if got == want:
            self.cursor = end if end < n else 0
        self.mig_count -= got
        if self.tracking:
            self.unsaved -= int(_unseen(pages[:got], self.seen))
        if self.mig_blocks is not None:
            _add_blocks(pages[:got], self.mig_blocks, -1)
        return pages[:got]

    def take_run(self, maxn: int) -> tuple[int, int] | None:
        """:meth:`take` when what it would take is a run of consecutive pages (the bulk stage:
        the next ``min(maxn, dirty pages)`` pages from the cursor, all dirty, not wrapping):
        takes them and returns (first page, count) without building their index array. Else
        None, and nothing is taken."""
        if self.mig_count == 0 or maxn <= 0:
            return None
        n, mig = self.npages, self.mig
        want = min(maxn, self.mig_count)
        c = self.cursor
        if c + want > n or not mig[c: c + want].all():
            return None
        mig[c: c + want] = False
        self.mig_count -= want
        if self.tracking:
            self.unsaved -= int(_unseen_run(self.seen, c, c + want))
        if self.mig_blocks is not None:
            _sub_run_blocks(c, c + want, self.mig_blocks)
        self.cursor = c + want if c + want < n else 0
        return c, want

    def untake(self, pages: np.ndarray) -> None:
        """Give back the tail of what :meth:`take` returned (its bits are set again and the
        search resumes at its first page)."""
        if len(pages) == 0:
            return
        self.mig[pages] = True
        self.mig_count += len(pages)
        if self.tracking:
            self.unsaved += int(_unseen(np.ascontiguousarray(pages, dtype=np.int64), self.seen))
        if self.mig_blocks is not None:
            _add_blocks(np.ascontiguousarray(pages, dtype=np.int64), self.mig_blocks, 1)
        self.cursor = int(pages[0])

    def copy(self, pages: np.ndarray, source_version: np.ndarray) -> int:
        """Send ``pages`` (as :meth:`take` returns them: ascending, wrapping at most once): the
        destination gets their content (version) as of now. Returns how many were zero pages
        (module docstring)."""
        if len(pages) == 0:
            return 0
        if _contiguous(pages):
            return self.copy_run(int(pages[0]), len(pages), source_version)
        zero = int(_zero_pages(pages, source_version, self.zero_q)) if self.zero_q else 0
        self.pages_resent += int(_copy_pages(pages, self.dest, source_version))
        self.pages_sent += len(pages)
        self.zero_pages += zero
        self._sent_end = max(self._sent_end, int(pages.max()) + 1)
        return zero

    def copy_run(self, first: int, count: int, source_version: np.ndarray) -> int:
        """:meth:`copy` of the ``count`` consecutive pages from ``first`` (what :meth:`take_run`
        takes). A run wholly past every page sent so far (the bulk stage's runs) re-sends
        none: its destination pages are not read."""
        end = first + count
        s = slice(first, end)
        zero = int(_zero_run(source_version, first, end, self.zero_q)) if self.zero_q else 0
        if first < self._sent_end:
            self.pages_resent += int(np.count_nonzero(self.dest[s]))
        np.add(source_version[s], 1, out=self.dest[s])
        self.pages_sent += count
        self.zero_pages += zero
        self._sent_end = max(self._sent_end, end)
        return zero

    def lost_writes(self, source_version: np.ndarray) -> int:
        """Pages whose destination copy differs from the source, or that were never sent (one
        compiled pass over both arrays, no temporaries)."""
        return int(_count_stale(self.dest, source_version[: self.npages]))


def _words(bits: np.ndarray) -> np.ndarray:
    """The whole u64 words of a bool bitmap (its first ``len // 8 * 8`` pages, 8 per word: a
    numpy bool is the byte 0 or 1, so byte j of a word, little-endian, is bit 8j)."""
    return bits[: len(bits) & ~7].view(np.uint64)


@njit(nogil=True)
def _merge(mig, slot, mig_words, slot_words):  # pragma: no cover - compiled
    """``mig |= slot``, ``slot = 0`` (``*_words``: their whole words, see :func:`_words`).
    Returns the pages newly set in ``mig``. The words go without a branch on their contents:
    the loop vectorises, several times faster than skipping zero words."""
    new = 0
    for i in range(slot_words.shape[0]):
        s = slot_words[i]
        m = mig_words[i]
        new += np.int64(popcount(s & ~m))
        mig_words[i] = m | s
        slot_words[i] = 0
    for p in range(8 * slot_words.shape[0], slot.shape[0]):  # the pages after the last word
        if slot[p]:
            if not mig[p]:
                mig[p] = True
                new += 1
            slot[p] = False
    return new


@njit(nogil=True)
def _count_blocks(mig, mig_words, blocks):  # pragma: no cover - compiled
    """blocks[b] = the pages of ``mig`` in block b (MIG_BLOCK pages), recounted (a word, 8 pages,
    at a time)."""
    blocks[:] = 0
    for i in range(mig_words.shape[0]):
        blocks[(8 * i) // MIG_BLOCK] += popcount(mig_words[i])
    for p in range(8 * mig_words.shape[0], mig.shape[0]):
        if mig[p]:
            blocks[p // MIG_BLOCK] += 1


@njit(nogil=True)
def _add_blocks(pages, blocks, d):  # pragma: no cover - compiled
    """Add ``d`` to the count of each page's block (pages mostly ascending: a block's run of
    pages is one update)."""
    if pages.shape[0] == 0:
        return
    cur = pages[0] >> MIG_BLOCK_SHIFT
    run = 0
    for i in range(pages.shape[0]):
        b = pages[i] >> MIG_BLOCK_SHIFT
        if b != cur:
            blocks[cur] += d * run
            cur, run = b, 0
        run += 1
    blocks[cur] += d * run


@njit(nogil=True)
def _sub_run_blocks(a, b, blocks):  # pragma: no cover - compiled
    """The pages a .. b-1 left mig: take them off their blocks' counts."""
    p = a
    while p < b:
        end = min(b, (p // MIG_BLOCK + 1) * MIG_BLOCK)
        blocks[p // MIG_BLOCK] -= end - p
        p = end


@numba.njit(inline="always")
def see(seen, p):  # pragma: no cover - compiled
    """Set page p's bit in the u64 bitmap ``seen``; returns whether it was clear."""
    w = seen[p >> 6]
    bit = np.uint64(1) << np.uint64(p & 63)
    if w & bit:
        return False
    seen[p >> 6] = w | bit
    return True


@njit(nogil=True)
def _see(offsets, seen, mig):  # pragma: no cover - compiled
    """:func:`see` each of ``offsets``; returns how many of those pages were in neither seen nor
    mig (each page once, repeats or not)."""
    fresh = 0
    for i in range(offsets.shape[0]):
        p = offsets[i]
        if see(seen, p) and not mig[p]:
            fresh += 1
    return fresh


@njit(nogil=True)
def _unseen(pages, seen):  # pragma: no cover - compiled
    """How many of ``pages`` are not in the u64 bitmap ``seen``."""
    n = 0
    for i in range(pages.shape[0]):
        p = pages[i]
        if not (seen[p >> 6] >> np.uint64(p & 63)) & np.uint64(1):
            n += 1
    return n


@njit(nogil=True)
def _unseen_run(seen, a, b):  # pragma: no cover - compiled
    """How many of the pages a .. b-1 are not in the u64 bitmap ``seen`` (a word at a time)."""
    n = 0
    p = a
    while p < b:
        i = p >> 6
        lo = p & 63
        hi = min(64, lo + (b - p))
        w = seen[i] >> np.uint64(lo)
        if hi - lo < 64:
            w &= (np.uint64(1) << np.uint64(hi - lo)) - np.uint64(1)
        n += (hi - lo) - np.int64(popcount(w))
        p += hi - lo
    return n


@njit(nogil=True)
def _take_run(mig, words, a, b, want, out, k):  # pragma: no cover - compiled
    """Take the set pages of ``mig[a:b]`` in order into ``out[k:]``, clearing them, until
    ``out`` holds ``want``. Returns (pages in ``out``, where the scan stopped: one past the last
    page taken when ``out`` is full). ``words``: ``mig``'s whole words (:func:`_words`): the
    aligned middle is read 8 pages at a time."""
    i = a
    body_end = min(b, 8 * words.shape[0]) & ~7
    while i < b and k < want:
        if i & 7 == 0 and i + 8 <= body_end:
            w = words[i >> 3]
            if w == 0:
                i += 8
                continue
            while w != 0 and k < want:
                out[k] = i + (np.int64(trailing_zeros(w)) >> 3)
                k += 1
                w &= w - np.uint64(1)  # the lowest set byte taken
            words[i >> 3] = w
            i = out[k - 1] + 1 if k == want else i + 8
            continue
        if mig[i]:
            mig[i] = False
            out[k] = i
            k += 1
        i += 1
    return k, i


@njit(nogil=True)
def _take(mig, words, cursor, want, out):  # pragma: no cover - compiled
    """Up to ``want`` set pages from ``cursor`` to the end, then from 0 up to the cursor (QEMU's
    find_next_bit over the migration bitmap), cleared and written to ``out`` in that order.
    Returns (pages taken, where the scan stopped: one past the last page taken)."""
    k, i = _take_run(mig, words, cursor, mig.shape[0], want, out, 0)
    if k < want:
        k, i = _take_run(mig, words, 0, cursor, want, out, k)
    return k, i


@njit(nogil=True)
def _copy_pages(pages, dest, version):  # pragma: no cover - compiled
    """dest[p] = version[p] + 1 (u32) for each page sent; returns how many had been sent before."""
    resent = 0
    for j in range(pages.shape[0]):
        p = pages[j]
        if dest[p] != 0:
            resent += 1
        dest[p] = np.uint32(version[p] + np.uint32(1))
    return resent


@njit(nogil=True)
def _zero_pages(pages, version, zq):  # pragma: no cover - compiled
    """How many of ``pages`` are zero pages: never written (version 0) and :func:`initially_zero`."""
    n = 0
    for j in range(pages.shape[0]):
        p = pages[j]
        if version[p] == 0 and initially_zero(p, zq):
            n += 1
    return n


@njit(nogil=True)
def _zero_run(version, a, b, zq):  # pragma: no cover - compiled
    """:func:`_zero_pages` of the pages [a, b)."""
    n = 0
    for p in range(a, b):
        if version[p] == 0 and initially_zero(p, zq):
            n += 1
    return n


@njit(nogil=True)
def _count_stale(dest, version):  # pragma: no cover - compiled
    """How many pages have dest != version + 1 (u32 arithmetic, as the arrays store it)."""
    stale = 0
    for i in range(dest.shape[0]):
        if dest[i] != np.uint32(version[i] + np.uint32(1)):
            stale += 1
    return stale


def _contiguous(pages: np.ndarray) -> bool:
    return len(pages) > 0 and int(pages[-1]) - int(pages[0]) + 1 == len(pages)
