"""x86 Page Modification Logging: each vCPU's hardware buffer of logged GPAs (compiled).

With PML the CPU logs the GPA of a write that sets a dirty bit into a 512-entry buffer instead of
faulting; KVM copies the buffer into the dirty ring (vmx_flush_pml_buffer, each GPA through
kvm_vcpu_mark_page_dirty) at every VM exit: the log-full exit (the CPU raises it at a write to
log when the buffer is already full, before that write), an exit to userspace, and the exits the
kernel handles itself (timer ticks, IPIs). The buffers live
in the VM (``pml[v]``: vCPU v's logged gfns, ``pml_n[v]`` how many), the rings in their
counters and entries as :func:`ringenv.kvm.ring.push_all` reaches them. See
docs/reference/kvm-dirty-ring.md s7.
"""

from __future__ import annotations

import numba
import numpy as np

from ..arrays import words_at
from ..jit import njit
from .fault import FAULT_NS, PML_FLUSHES, PUSHES, UNTRACKED
from .ring import ring_push, ring_used


@numba.njit(inline="always")
def _tracking_slot(g, base, end, mode):  # pragma: no cover - compiled
    """The memslot (index into ``base``/``end``/``mode``) that maps gfn ``g`` and tracks dirty
    pages, or -1: none maps it, or it has no dirty tracking (mark_page_dirty_in_slot)."""
    k = base.shape[0] - 1
    while k >= 0 and base[k] > g:
        k -= 1
    if k < 0 or g >= end[k] or mode[k] & UNTRACKED:
        return -1
    return k


@njit(nogil=True)
def flush_one(v, pml, pml_n, base, end, kslot, mode, ring_addr, ring_ctr, soft_limit, vstat, entry_ns,
              soft_full):  # pragma: no cover - compiled
    """vmx_flush_pml_buffer for vCPU v: each logged gfn looked up in the memslots of address
    space 0 as they are now (``base``/``end``: their gfn ranges, ascending; ``kslot`` their
    kvm_dirty_gfn slot ids; ``mode`` their mode bits): a slot created, deleted or moved since
    the CPU logged it changes which slot and offset it is; a gfn no slot maps pushes nothing,
    nor does one in a slot without dirty tracking (mark_page_dirty_in_slot). The flush costs
    ``entry_ns`` per logged gfn (in ``vstat``, with the pushes and the flush); a push that
    leaves the ring soft-full sets ``soft_full[v]`` (the KVM_REQ_DIRTY_RING_SOFT_FULL)."""
    n = pml_n[v]
    words = words_at(ring_addr[v, 0], 2 * ring_addr[v, 1])
    ctr = ring_ctr[v]
    pushed = 0
    for j in range(n):
        g = pml[v, j]
        k = _tracking_slot(g, base, end, mode)
        if k < 0:
            continue
        ring_push(words, ctr, kslot[k], g - base[k])
        pushed += 1
    pml_n[v] = 0
    vstat[v, PUSHES] += pushed
    vstat[v, PML_FLUSHES] += 1
    vstat[v, FAULT_NS] += np.int64(n * entry_ns)
    if pushed and ring_used(ctr) >= soft_limit[v]:
        soft_full[v] = True


@njit(nogil=True)
def push_one(v, g, base, end, kslot, mode, ring_addr, ring_ctr, soft_limit, vstat,
             soft_full):  # pragma: no cover - compiled
    """mark_page_dirty_in_slot for gfn ``g`` from vCPU v's fault (an EPT violation's SPTE made
    writable and dirty): pushed into v's ring, looked up in the memslots as :func:`flush_one`
    looks up a logged gfn; a push that leaves the ring soft-full sets ``soft_full[v]``."""
    k = _tracking_slot(g, base, end, mode)
    if k < 0:
        return
    ctr = ring_ctr[v]
    ring_push(words_at(ring_addr[v, 0], 2 * ring_addr[v, 1]), ctr, kslot[k], g - base[k])
    vstat[v, PUSHES] += 1
    if ring_used(ctr) >= soft_limit[v]:
        soft_full[v] = True


@njit(nogil=True)
def flush_all(mask, pml, pml_n, base, end, kslot, mode, ring_addr, ring_ctr, soft_limit, vstat, entry_ns,
              soft_full):  # pragma: no cover - compiled
    """:func:`flush_one` for every vCPU v with ``mask[v]`` and a buffer that is not empty."""
    for v in range(pml_n.shape[0]):
        if mask[v] and pml_n[v] > 0:
            flush_one(v, pml, pml_n, base, end, kslot, mode, ring_addr, ring_ctr, soft_limit, vstat, entry_ns,
                      soft_full)


@njit(nogil=True)
def log_all(push_v, push_gfn, flush_at, pml, pml_n, base, end, kslot, mode, ring_addr, ring_ctr, soft_limit, vstat,
            entry_ns, full_exit_ns, soft_full):  # pragma: no cover - compiled
    """A batch's logged writes (vCPU, gfn), in order, into the vCPUs' buffers: a write to log
    into a full buffer first flushes it (the CPU's log-full VM exit comes at the write after the
    one that filled the buffer, before it is done: ``full_exit_ns`` on top of the flush; a full
    buffer otherwise waits), and before the write at each position of ``flush_at`` (ascending;
    a position past the last write: after it) every buffer is flushed (the kernel-handled exits
    of a tick, see :func:`ringenv.kvm.fault.walk_writes`). A direct push (``push_v`` = -1 - v:
    the page of an EPT violation) first flushes vCPU v's buffer (the violation's VM exit), then
    goes into its ring at once (:func:`push_one`); with gfn -1 it is a VM exit that pushes
    nothing (a translation fault that logs nothing): the flush alone."""
    cap = pml.shape[1]
    nv = pml_n.shape[0]
    f = 0
    for i in range(push_v.shape[0] + 1):
        while f < flush_at.shape[0] and flush_at[f] <= i:
            for u in range(nv):
                if pml_n[u] > 0:
                    flush_one(u, pml, pml_n, base, end, kslot, mode, ring_addr, ring_ctr, soft_limit, vstat,
                              entry_ns, soft_full)
            f += 1
        if i == push_v.shape[0]:
            break
        v = push_v[i]
        if v < 0:
            v = -1 - v
            if pml_n[v] > 0:
                flush_one(v, pml, pml_n, base, end, kslot, mode, ring_addr, ring_ctr, soft_limit, vstat, entry_ns,
                          soft_full)
            if push_gfn[i] >= 0:
                push_one(v, push_gfn[i], base, end, kslot, mode, ring_addr, ring_ctr, soft_limit, vstat, soft_full)
            continue
        if pml_n[v] == cap:
            flush_one(v, pml, pml_n, base, end, kslot, mode, ring_addr, ring_ctr, soft_limit, vstat, entry_ns,
                      soft_full)
            vstat[v, FAULT_NS] += full_exit_ns
        pml[v, pml_n[v]] = push_gfn[i]
        pml_n[v] += 1
