"""The guest-access path of the simulated kernel, one event at a time (compiled).

For each access in time order: look up the page's stage-2 state. A write to a read-only memslot
is an MMIO exit (KVM_EXIT_MMIO: nothing mapped, logged or written; the store completes as MMIO).
A write to a write-protected (or not yet mapped) page is a fault that relaxes the permission (one
page, or a whole block where block mappings stay) and logs the page (one push; all pages of the
block when splitting is off); with x86 PML a write to a mapped page goes to the hardware buffer
instead (no fault), and a full buffer flushes into the ring, while a write to a page not mapped
yet, or under a huge mapping logging write-protected, is still a fault (an EPT violation) that
flushes the buffer and pushes the page itself. In a slot without KVM_MEM_LOG_DIRTY_PAGES the fault logs
nothing (mark_page_dirty_in_slot). A read only matters to a page not yet mapped. Fresh memory
(a host page never written: the zero page) is mapped read-only everywhere, nothing logged. A
written host page is mapped read-only in an arm64 logging slot (nothing logged); on x86 with
dirty tracking it is mapped writable and logged (``READLOG``: make_spte); in a slot that is
dirty-tracked but not logging (arm64, ring without a bitmap) it is mapped writable and, because
the mapping is writable, pushed like a write (reference s11); in a slot whose logging was
turned off it is mapped writable. After each push the ring may be soft-full: the vCPU then leaves the guest at once,
before its access retires. A retiring write bumps the page's version
and makes it not clean. Syncs and the end of a program stop the walk too; an access to a gfn no
memslot maps is never walked (the caller ends the batch before it: if the walk gets that far,
the access is an MMIO exit, as a write to a read-only memslot is). Every access to a page not
mapped yet is a fault (a VM exit, counted as KVM's vCPU statistic pf_fixed counts it: measured
equal on the real KVM, docs/reference/real-kvm-host.md), logged or not, read or write; on the
x86 shadow MMU, in a slot without dirty tracking, it also maps the other pages of its aligned
group of 8 whose host pages exist (pte prefetch), so that their first accesses do not fault.

This walk is inherently sequential (whether an event faults depends on every earlier one, and
the walk stops at the first exit), hence one compiled loop rather than array passes.
"""

from __future__ import annotations

import numba
import numpy as np

from ..arrays import prefetch
from ..jit import njit
from .ring import push_all, ring_used

AHEAD = 16  # events to look ahead when prefetching a page's state and version

# RO (x86 PML only): mapped write-protected (W=0), not merely with a clear dirty bit: a write is
# an EPT violation, not a PML-logged store (the pages of a huge mapping split at a write fault)
# TABLED: mapped in a split-empty table not yet written out (EMPTY below)
WP, CLEAN, UNMAPPED, RO, UNTOUCHED, TABLED = 1, 2, 4, 8, 16, 32
NOT_WP, NOT_CLEAN, NOT_UNMAPPED, NOT_RO = 0xFF ^ WP, 0xFF ^ CLEAN, 0xFF ^ UNMAPPED, 0xFF ^ RO  # u8 masks
NOT_UNTOUCHED = 0xFF ^ UNTOUCHED

CUT_NONE, CUT_FULL, CUT_SYNC, CUT_DONE, CUT_MMIO, CUT_TICK, CUT_FAULT, CUT_PML_FULL = 0, 1, 2, 3, 4, 5, 6, 7

# per memslot mode bits (``mode``; 0: a logging slot): dirty-tracked but not logging (arm64 ring
# without a bitmap), no dirty tracking (no KVM_MEM_LOG_DIRTY_PAGES), read-only, a read fault
# that maps a writable host page logs it (x86 with dirty tracking: make_spte), a fault that maps
# a page also maps the others of its aligned group of PREFETCH_PAGES whose host pages exist (the
# x86 shadow MMU's pte prefetch, only in a slot without dirty tracking)
NOLOG, UNTRACKED, READONLY, READLOG, PREFETCH = 1, 2, 4, 8, 16
PREFETCH_PAGES = 8  # PTE_PREFETCH_NUM
BLOCK = 1  # memory.BLOCK: block_map value of a block mapping
# memory.EMPTY: block_map value of a table a split left mapping only the pages faulted since (a
# workload window's split, ``defer_empty``): its pages are UNMAPPED unless TABLED, without the
# per-page marking a split-empty does otherwise (Vm._write_out_empty writes it out when needed)
EMPTY = 3
# per memslot ``split`` values (0: a write fault never splits): the split leaves a full table of
# pages (the x86 TDP MMU's tdp_mmu_split_huge_page), or a table holding only the faulting page
# (arm64's stage2_map_walk_leaf, the x86 shadow MMU's drop_large_spte: the block's other pages
# are unmapped until they fault)
SPLIT_FULL, SPLIT_EMPTY = 1, 2


@numba.njit(inline="always")
def _mark(state, g, blk, whole, block_pages, keep, add):  # pragma: no cover - compiled
    """``state = state & keep | add`` for page ``g``, or with ``whole`` every page of block ``blk``."""
    if whole:
        b0 = blk * block_pages
        for p in range(b0, b0 + block_pages):
            state[p] = state[p] & keep | add
    else:
        state[g] = state[g] & keep | add


@numba.njit(inline="always")
def _clear_wp(state, block_map, g, blk, inblock, block_pages):  # pragma: no cover - compiled
    """Make page ``g`` writable, or with ``inblock`` its whole block ``blk``, mapped as a block."""
    if inblock:
        block_map[blk] = BLOCK
    _mark(state, g, blk, inblock, block_pages, NOT_WP & NOT_RO, 0)


@njit(nogil=True)
def walk_writes(gpi, vc, code, reads, first_touch, slot_of, state, version, block_map,
                blockgran, pushall, split, mode, slot_lo, slot_hi, block_shift, defer_empty,
                used, limit, pml_count, pml_buf, rings,
                push_v, push_g, split_v, split_b, faults, exit_faults,
                t, tick, tick_state, flush_at, fault_cut):  # pragma: no cover - compiled
    """Apply events until the first exit. ``used``/``pml_count`` are updated in place;
    ``faults[v]`` counts vCPU v's faults and ``exit_faults[v]`` those of them that are a VM
    exit even with PML (charged as a write-protect fault, not as a logged write): in a slot
    without dirty tracking, and with PML the EPT violations of a logging slot (below).

    With PML and ``tick`` > 0, every vCPU takes a VM exit the kernel handles at each multiple
    of ``tick`` ns (a host timer tick), which flushes its PML buffer into its ring: the first
    event at or after the next tick (``tick_state[0]``; ``t`` the events' times), or the end of
    the window (``tick_state[3]``) if the walk gets there, first flushes every buffer, recording
    the push count at that point in ``flush_at`` (``tick_state[1]`` entries), and if a flush
    leaves a ring soft-full the walk stops there (cut CUT_TICK, the event not consumed, the
    tick's time in ``tick_state[2]``): those vCPUs exit.

    Per memslot: ``blockgran`` (block mappings stay: a fault maps or relaxes the whole block),
    ``pushall`` (such a fault logs every page of the block), ``split`` (a write fault splits a
    block: SPLIT_FULL into a table of write-protected pages, SPLIT_EMPTY into a table mapping
    only the faulting page, the others ``UNMAPPED`` and still write-protected, so that their
    first write faults and logs as before), ``mode`` (NOLOG, UNTRACKED, READONLY, READLOG,
    PREFETCH bits), ``slot_lo``/``slot_hi`` (its pages in the global page index). An access to a
    page not mapped yet is a translation fault (counted in ``faults`` and ``exit_faults``: a VM
    exit, KVM's pf_fixed) whatever maps it, logged or not, read or write. With ``defer_empty`` a
    SPLIT_EMPTY split marks the block EMPTY instead of marking its pages UNMAPPED (O(1) per
    split; the pages of an EMPTY block not TABLED count as UNMAPPED). With ``first_touch`` the
    writes are a workload model's candidate first writes: one to a page that is not clean
    (written since it was last protected, hence writable) is invisible and skipped. Returns
    (events consumed, cut kind, pushes, splits, clean pages written, access retired at the cut).

    With PML (``pml_buf`` > 0) a logged write goes into its vCPU's buffer (``pml_count``), and a
    full buffer waits (Intel SDM: the PML index has left 0..511, nothing exits yet): the next
    write to log raises the log-full VM exit before it is done, KVM flushes the buffer into the
    ring, and if that leaves the ring soft-full the walk stops there (cut CUT_PML_FULL, the
    write not consumed: it is proposed again after re-entry). PML logs only a write to a mapped,
    writable page whose dirty bit is clear; a write to a page not mapped yet, or under a huge
    mapping that logging write-protected (the fault splits it: the TDP MMU's tdp_mmu_split_huge_page
    fills the new table with write-protected 4K children, ``RO``, whose writes fault too), is
    an EPT violation: a VM exit,
    which flushes the vCPU's buffer into its ring first (vmx_handle_exit), and the fault installs
    a writable SPTE with the dirty bit set and pushes the page itself (make_spte ->
    mark_page_dirty_in_slot); the push is left in ``push_v`` as ``-1 - v`` (a direct push,
    :func:`ringenv.kvm.pml.log_all`), and a soft-full ring takes the vCPU out before the write
    retires, as without PML.

    With ``fault_cut`` the walk also stops right after an access that faulted (a write-protect
    fault, logged or not, with its split if any) and took no vCPU out of the guest (cut
    CUT_FAULT, the access consumed), and before the first event after a tick whose flush moved
    anything (cut CUT_TICK, no vCPU soft-full): a guest whose later accesses are timed by the
    kernel's service time (a trace) then proposes them again from its new clock."""
    n = gpi.shape[0]
    block_pages = 1 << block_shift
    npush = 0
    nsplit = 0
    ndirty = 0
    cut = CUT_NONE
    m = n
    any_mode = 0
    for k in range(mode.shape[0]):
        any_mode |= mode[k]
    readonly = any_mode & READONLY != 0
    untracked = any_mode & UNTRACKED != 0
    for i in range(n):
        if i + AHEAD < n and gpi[i + AHEAD] >= 0:  # random pages of a big guest: overlap the misses
            prefetch(state, gpi[i + AHEAD])
            prefetch(version, gpi[i + AHEAD])
        if tick > 0 and t[i] >= tick_state[0]:
            at, nflush = tick_state[0], tick_state[1]
            if _tick_flush(t[i], tick, tick_state, pml_count, used, limit, flush_at, npush):
                return i, CUT_TICK, npush, nsplit, ndirty, True
            if fault_cut and tick_state[1] > nflush:  # the flush's kernel time delays the vCPUs after it
                tick_state[2] = at
                return i, CUT_TICK, npush, nsplit, ndirty, True
        v = vc[i]
        g = gpi[i]
        c = code[i]
        if g < 0:
            if c != 0:
                cut = CUT_SYNC if c == 1 else CUT_DONE
                m = i + 1
                break
            continue
        s = state[g]
        blk = g >> block_shift
        bm = block_map[blk]
        if bm == EMPTY and not s & TABLED:  # not mapped since the block's split
            s |= UNMAPPED
        k = slot_of[i]
        full = late = False
        read = reads[i] != 0
        ept = pml_buf > 0 and not read and s & (UNMAPPED | RO) != 0  # (a split fault joins below)
        if readonly and not read and mode[k] & READONLY:
            # kvm_handle_guest_abort -> io_mem_abort: the store exits as MMIO and completes there
            return i + 1, CUT_MMIO, npush, nsplit, ndirty, True
        if first_touch and not s & CLEAN:
            if c != 0:
                cut = CUT_SYNC if c == 1 else CUT_DONE
                m = i + 1
                break
            continue
        inblock = bm != 0 and bm != EMPTY
        xlate = s & UNMAPPED != 0
        if xlate:  # a translation fault maps the page (or the whole block)
            huge = inblock  # a huge page behind it
            if inblock and (blockgran[k] or not split[k]):
                block_map[blk] = BLOCK
                b0 = blk * block_pages
                for p in range(b0, b0 + block_pages):
                    state[p] &= NOT_UNMAPPED
            else:
                if inblock:  # logging maps pages only (force_pte): the block becomes a table
                    block_map[blk] = 0
                    inblock = False
                state[g] &= NOT_UNMAPPED
                if bm == EMPTY:
                    state[g] |= TABLED
                if mode[k] & PREFETCH:  # direct_pte_prefetch / FNAME(pte_prefetch): writable, as the guest maps them
                    p0 = g - g % PREFETCH_PAGES
                    for p in range(max(p0, slot_lo[k]), min(p0 + PREFETCH_PAGES, slot_hi[k])):
                        if state[p] & (UNMAPPED | UNTOUCHED) == UNMAPPED:  # (only a host page that exists)
                            state[p] &= NOT_UNMAPPED & NOT_WP
            if not read:
                if s & UNTOUCHED:  # the host allocates the page for the write (a huge page: all of it)
                    _mark(state, g, blk, huge, block_pages, NOT_UNTOUCHED, 0)
            elif s & UNTOUCHED or not mode[k] & (NOLOG | READLOG):
                if mode[k] & (UNTRACKED | READONLY) == UNTRACKED:  # not logging
                    if s & UNTOUCHED:  # the zero page, mapped read-only: the first write faults
                        _mark(state, g, blk, inblock, block_pages, 0xFF, WP)
                    elif s & WP:  # (logging turned off) mapped writable, its write protection is gone
                        _clear_wp(state, block_map, g, blk, inblock, block_pages)
                s = 0  # mapped read-only (logging, or the zero page) or writable (untracked): nothing logged
            else:
                # a writable host page in a dirty-tracked slot: x86 maps it writable and logs it
                # (make_spte -> mark_page_dirty_in_slot), as does arm64 in a ring-only slot (not
                # logging, reference s11): the fault below, as a write fault's (with PML an EPT
                # violation: the fault pushes the page itself)
                ept = pml_buf > 0
        elif read:
            s = 0  # a read of a mapped page: nothing happens
        faulted = s & WP != 0
        if xlate and not faulted:  # a translation fault that the write-protect paths below do not count
            faulted = True
            faults[v] += 1
            exit_faults[v] += 1
            if rings and pml_buf > 0 and pml_count[v]:  # the exit flushes the PML buffer (vmx_handle_exit)
                used[v] += pml_count[v]
                pml_count[v] = 0
                push_v[npush] = -1 - v  # (a flush with no push of its own: pml.log_all)
                push_g[npush] = -1
                npush += 1
                if used[v] >= limit[v]:  # soft-full: out to userspace before the access re-executes
                    return i + 1, CUT_FULL, npush, nsplit, ndirty, False
        if s & WP and untracked and mode[k] & UNTRACKED:
            # no dirty tracking: the fault makes the page (or its block) writable, mark_page_dirty_in_slot logs nothing
            faults[v] += 1
            exit_faults[v] += 1
            _clear_wp(state, block_map, g, blk, inblock, block_pages)
        elif s & WP:
            if pml_buf > 0 and inblock and not blockgran[k] and split[k]:
                ept = True  # a huge mapping write-protected for logging: the write faults and splits it
            if ept:  # the EPT violation's exit flushes the buffer, then the fault pushes the page itself
                exit_faults[v] += 1
                if rings:
                    used[v] += pml_count[v]
                    pml_count[v] = 0
            elif rings and pml_buf > 0 and pml_count[v] >= pml_buf:
                # the buffer is full: the PML log-full VM exit comes first, before the write;
                # KVM flushes the buffer into the ring
                used[v] += pml_count[v]
                pml_count[v] = 0
                if used[v] >= limit[v]:  # soft-full: out to userspace, the write not done
                    return i, CUT_PML_FULL, npush, nsplit, ndirty, True
            faults[v] += 1
            if inblock and blockgran[k]:  # (a fault in a huge page split outside logging maps it again)
                _clear_wp(state, block_map, g, blk, True, block_pages)
                if pushall[k]:
                    b0 = blk * block_pages
                    for p in range(b0, b0 + block_pages):
                        push_v[npush] = -1 - v if ept else v
                        push_g[npush] = p
                        npush += 1
                    added = block_pages
                else:
                    push_v[npush] = -1 - v if ept else v
                    push_g[npush] = g
                    npush += 1
                    added = 1
            else:
                if inblock and split[k]:
                    block_map[blk] = 0
                    split_v[nsplit] = v
                    split_b[nsplit] = blk
                    nsplit += 1
                    if ept:  # the TDP MMU splits the huge SPTE into write-protected 4K children
                        b0 = blk * block_pages
                        for p in range(b0, b0 + block_pages):
                            state[p] |= RO
                    elif split[k] == SPLIT_EMPTY and defer_empty:  # arm64, the shadow MMU: the faulting page only
                        block_map[blk] = EMPTY
                        state[g] |= TABLED
                    elif split[k] == SPLIT_EMPTY:
                        b0 = blk * block_pages
                        for p in range(b0, b0 + block_pages):
                            state[p] |= UNMAPPED
                state[g] &= NOT_WP & NOT_UNMAPPED & NOT_RO
                push_v[npush] = -1 - v if ept else v
                push_g[npush] = g
                npush += 1
                added = 1
            if rings:
                if pml_buf > 0 and not ept:  # a full buffer waits for the next write to log (above)
                    pml_count[v] += added
                    while pml_count[v] > pml_buf:  # (a what-if block's pages overflowing the buffer)
                        pml_count[v] -= pml_buf
                        used[v] += pml_buf
                        if used[v] >= limit[v]:
                            late = True
                else:
                    used[v] += added
                    if used[v] >= limit[v]:
                        full = True
            if full:
                # the vCPU exits before the access retires; it re-executes after re-entry
                return i + 1, CUT_FULL, npush, nsplit, ndirty, False
        if not read:
            version[g] += 1
            if state[g] & UNTOUCHED:  # a write to the zero page mapped by a read: copied on write
                _mark(state, g, blk, block_map[blk] == BLOCK, block_pages, NOT_UNTOUCHED, 0)
            if state[g] & CLEAN:
                state[g] &= NOT_CLEAN
                ndirty += 1
        if late:  # the what-if block's log overflowed the buffer into a soft-full ring: it retired
            return i + 1, CUT_FULL, npush, nsplit, ndirty, True
        if c != 0:
            cut = CUT_SYNC if c == 1 else CUT_DONE
            m = i + 1
            break
        if faulted and fault_cut:
            cut = CUT_FAULT
            m = i + 1
            break
    if cut == CUT_NONE and tick > 0 and tick_state[0] <= tick_state[3] and _tick_flush(
            tick_state[3], tick, tick_state, pml_count, used, limit, flush_at, npush):
        return m, CUT_TICK, npush, nsplit, ndirty, True
    return m, cut, npush, nsplit, ndirty, True


@numba.njit(inline="always")
def _tick_flush(now, tick, tick_state, pml_count, used, limit, flush_at, npush):  # pragma: no cover - compiled
    """The tick ``tick_state[0]`` (<= ``now``) passed: every PML buffer into its ring (counted:
    ``used``), the push count recorded in ``flush_at``, the next tick after ``now`` set. Returns
    whether a ring was left soft-full (the tick's time then in ``tick_state[2]``)."""
    at = tick_state[0]
    tick_state[0] = (now // tick + 1) * tick
    flushed = False
    crossed = False
    for u in range(pml_count.shape[0]):
        if pml_count[u] > 0:
            flushed = True
            used[u] += pml_count[u]
            pml_count[u] = 0
            crossed = crossed or used[u] >= limit[u]
    if flushed:
        flush_at[tick_state[1]] = npush
        tick_state[1] += 1
    if crossed:
        tick_state[2] = at
    return crossed


# columns of the VM's per-vCPU counter array (Vm._vstat; VcpuStats reads its row)
FAULTS, PUSHES, SPLITS, FAULT_NS, PML_FLUSHES = range(5)


@njit(nogil=True)
def apply_batch(gpi, vc, code, reads, first_touch, slot_of, state, version, block_map,
                blockgran, pushall, split, mode, block_shift,
                ring_ctr, soft_limit, pml_count, pml_buf, rings,
                push_v, push_g, split_v, split_b,
                vstat, split_cost, fault_cost, wp_fault_cost, ring_addr, slot_start, slot_end, slot_kvm, soft_full,
                faults, t, tick, tick_state, flush_at, fault_cut, defer_empty=False):  # pragma: no cover - compiled
    """:func:`walk_writes` over a batch, then its bookkeeping in the same call: per vCPU (rows
    of ``vstat``, columns FAULTS, PUSHES, SPLITS, FAULT_NS) the faults and splits it took and
    their service time (``fault_cost`` per fault in a dirty-tracked slot: with x86 PML the
    logged write, which does not exit; ``wp_fault_cost`` per fault that is a VM exit even with
    PML: one in a slot without dirty tracking, an EPT violation in a logging slot (a page not
    mapped yet, a huge mapping split; kvm_tdp_page_fault, user_mem_abort); ``split_cost`` per
    split: break-before-make and a broadcast TLB invalidation; ``faults``, zeros on entry, gets
    the batch's faults per vCPU); with rings and no PML the pushes go into the rings
    (:func:`ringenv.kvm.ring.push_all`), and ``soft_full[v]`` is set for a vCPU whose ring the
    batch's pushes left soft-full (its KVM_REQ_DIRTY_RING_SOFT_FULL).
    Without rings, or with PML, the pushes are left in push_v/push_g for the caller; ``t``,
    ``tick``, ``tick_state``, ``flush_at``: PML's kernel-handled exits, ``fault_cut``: a cut
    after each fault (see :func:`walk_writes`).
    Returns (events consumed, cut kind, pushes, splits, clean pages written, access retired at
    the cut, vCPUs made soft-full)."""
    nv = vstat.shape[0]
    used = np.zeros(nv, dtype=np.int64)
    if rings:
        for v in range(nv):
            used[v] = ring_used(ring_ctr[v])
            if used[v] == 0xFFFFFFFF:  # a reset past dirty_index: the next push wraps the u32 used to 0
                used[v] = -1
        limit = soft_limit
    else:
        limit = np.full(nv, np.int64(1) << 62, dtype=np.int64)
    exiting = np.zeros(nv, dtype=np.int64)
    m, cut, npush, nsplit, ndirty, retired = walk_writes(
        gpi, vc, code, reads, first_touch, slot_of, state, version, block_map, blockgran, pushall, split, mode,
        slot_start, slot_end, block_shift, defer_empty, used, limit, pml_count, pml_buf, rings, push_v, push_g,
        split_v, split_b, faults, exiting, t, tick, tick_state, flush_at, fault_cut)
    for j in range(nsplit):
        vstat[split_v[j], SPLITS] += 1
        vstat[split_v[j], FAULT_NS] += split_cost
    for v in range(nv):
        vstat[v, FAULTS] += faults[v]
        vstat[v, FAULT_NS] += np.int64((faults[v] - exiting[v]) * fault_cost)
        if exiting[v]:
            vstat[v, FAULT_NS] += np.int64(exiting[v] * wp_fault_cost)
    nsoft = 0
    if npush and rings and pml_buf == 0:
        before = ring_ctr[:, 0].copy()
        push_all(push_v, push_g, npush, ring_addr, ring_ctr, slot_start, slot_kvm)
        for v in range(nv):
            pushed = ring_ctr[v, 0] - before[v]
            vstat[v, PUSHES] += pushed
            if pushed and ring_used(ring_ctr[v]) >= soft_limit[v]:
                soft_full[v] = True
                nsoft += 1
    return m, cut, npush, nsplit, ndirty, retired, nsoft


@njit(nogil=True)
def apply_window(order, t, vc, gfn, gfn_lo, gfn_hi, delta, zeros8, zeros64, state, version, block_map,
                 blockgran, pushall, split, mode, block_shift, ring_ctr, soft_limit, no_pml, rings,
                 push_v, push_g, split_v, split_b, vstat, split_cost, fault_cost, ring_addr, slot_start, slot_end,
                 slot_kvm, soft_full, faults):  # pragma: no cover - compiled
    """:func:`apply_batch` for a workload's window of candidate first writes (first touch, no
    reads, no exit codes) into a VM with one RAM slot and no PML (a fault costs ``fault_cost``
    whatever the slot's mode), in the same call as the gather and the address check: the
    events are ``t``/``vc``/``gfn`` taken in ``order`` (empty: as given); a gfn in the slot
    ``[gfn_lo, gfn_hi)`` is at global page index ``gfn + delta``.
    The walk covers the events before the first one, in order, outside the slot (no memslot
    maps it: an MMIO exit when the walk gets there, not before). ``zeros8``/``zeros64``: at
    least len(t) zeros (read only).
    Returns apply_batch's tuple, then the batch position (as given) of the last event consumed,
    and that of the first event, in order, outside the slot (-1: none; else the walk reached
    it if it stopped without a cut)."""
    n = t.shape[0]
    ordered = order.shape[0] == 0
    gpi = np.empty(n, dtype=np.int64)
    v32 = np.empty(n, dtype=np.int32)
    nb = n
    bad = -1
    for i in range(n):
        j = i if ordered else order[i]
        x = gfn[j]
        if x < gfn_lo or x >= gfn_hi:
            nb = i
            bad = j
            break
        gpi[i] = x + delta
        v32[i] = vc[j]
    m, cut, npush, nsplit, ndirty, retired, nsoft = apply_batch(
        gpi[:nb], v32[:nb], zeros8[:nb], zeros8[:nb], True, zeros64[:nb], state, version, block_map, blockgran,
        pushall, split, mode, block_shift, ring_ctr, soft_limit, no_pml, 0, rings, push_v, push_g, split_v, split_b,
        vstat, split_cost, fault_cost, fault_cost, ring_addr, slot_start, slot_end, slot_kvm, soft_full, faults,
        zeros64[:0], 0, np.zeros(4, dtype=np.int64), zeros64[:0], False, True)
    last = m - 1 if ordered or m == 0 else order[m - 1]
    return m, cut, npush, nsplit, ndirty, retired, nsoft, last, bad
