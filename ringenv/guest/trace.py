"""Trace replay: explicit per-vCPU access lists (writes, and optionally reads) with sync points.

Each vCPU executes its writes in program order, one every ``write_ns`` of guest time plus the
service time of the faults it took; different vCPUs' writes interleave by that simulated time
(ties: lower vCPU index first). After a write listed in ``syncs`` the guest exits to userspace
(an MMIO write); after its last write it exits once more, as "done".

The service time is the host's: the kernel time the host charged the vCPU (its write-protect
faults, splits and their TLB invalidations, PML buffer flushes; ``Vm.vcpu_kernel_ns``), unless a
fixed ``fault_ns`` per fault is given. Unless that is 0 the host ends a batch after each access
that faulted (:attr:`WriteBatch.fault_cut`), so the vCPU's later accesses come after the fault,
and the interleaving of the vCPUs does not depend on how many writes a batch proposes.

A batch per fault means a round trip between host and guest per faulting access; the guest's
share of it (proposing the next writes, taking back what the host consumed) is compiled
(:func:`_propose`, :func:`_consume`).
"""

from __future__ import annotations

import numpy as np

from ..jit import njit
from .base import EXIT_DONE, EXIT_NONE, EXIT_SYNC, NO_WRITE, GuestProgram, WriteBatch


class TraceProgram(GuestProgram):
    """Replays ``writes[v]`` (page offsets from ``base_gfn``) with sync points ``syncs[v]``.

    ``fault_ns``: None (the default) times each vCPU after the kernel time the host charged it;
    an int, a fixed service time per fault instead (0: faults take no guest time, the writes
    come every ``write_ns`` whatever happens).
    ``max_batch``: writes proposed per vCPU and batch at most (a bound on the work per batch
    only). A batch the host ends early (an exit, a fault, a tick) makes the next proposals
    shorter (twice what each vCPU got through, at least 4), a batch walked whole longer again:
    with a fault per batch, re-sorting hundreds of withdrawn writes for each would dominate.
    A batch per fault costs ~20 us: the 21000 writes of the built-in trace seq-16384, 20000 of
    them first writes, replay in ~0.45 s."""

    def __init__(self, writes: list, syncs: list, *, reads: list | None = None, base_gfn: int = 0,
                 write_ns: int = 5, fault_ns: int | None = None, max_batch: int = 512):
        if len(writes) != len(syncs) or (reads is not None and len(reads) != len(writes)):
            raise ValueError("writes, syncs (and reads) must have one entry per vCPU")
        self.nr_vcpus = len(writes)
        gfn, code_, read = [], [], []
        for i, (w, s) in enumerate(zip(writes, syncs)):
            w = _checked_ints(w, f"writes[{i}]", -base_gfn, None)  # a gfn >= 0 (below a slot's base too)
            g = np.concatenate([base_gfn + w, [NO_WRITE]])
            code = np.full(len(g), EXIT_NONE, dtype=np.int8)
            code[_checked_ints(s, f"syncs[{i}]", 0, len(w))] = EXIT_SYNC
            code[-1] = EXIT_DONE
            rd = np.zeros(len(g), dtype=np.int8)
            if reads is not None:
                rd[_checked_ints(reads[i], f"reads[{i}]", 0, len(w))] = 1
            gfn.append(g)
            code_.append(code)
            read.append(rd)
        # every vCPU's accesses end to end: vCPU v's are [off[v], off[v + 1])
        self.off = np.concatenate([[0], np.cumsum([len(g) for g in gfn])]).astype(np.int64)
        self.gfn = np.concatenate(gfn) if gfn else np.zeros(0, dtype=np.int64)
        self.code = np.concatenate(code_) if code_ else np.zeros(0, dtype=np.int8)
        self.read = np.concatenate(read) if read else np.zeros(0, dtype=np.int8)
        self.write_ns = max(1, int(write_ns))
        self.fault_ns = None if fault_ns is None else int(fault_ns)
        self.max_batch = max(1, int(max_batch))
        self.pos = np.zeros(self.nr_vcpus, dtype=np.int64)
        self.clock = np.zeros(self.nr_vcpus, dtype=np.int64)
        self._k = np.full(self.nr_vcpus, self.max_batch, dtype=np.int64)  # writes to propose per vCPU
        self._last = None
        self._vm = None
        self._kernel_seen = np.zeros(self.nr_vcpus, dtype=np.int64)

    def attach(self, vm) -> None:
        if self.nr_vcpus > len(vm.vcpus):
            raise ValueError(f"trace has {self.nr_vcpus} vCPUs, the VM {len(vm.vcpus)}")
        if self.fault_ns is None:
            self._vm = vm
            self._kernel_seen = vm.vcpu_kernel_ns()[: self.nr_vcpus].copy()

    def _charge_kernel_time(self) -> None:
        """Move each vCPU's clock on by the kernel time the host charged it since the last call
        (with the host's service times: ``fault_ns`` None)."""
        if self._vm is not None:
            now = self._vm.vcpu_kernel_ns()[: self.nr_vcpus]
            self.clock += now - self._kernel_seen
            self._kernel_seen = now.copy()

    def next_writes(self, now, until, running):
        self._charge_kernel_time()  # faults and splits since the last batch delay their vCPU
        t, vc, g, c, r, complete, anyread = _propose(int(now), int(until), running, self.gfn, self.code, self.read,
                                                     self.off, self.pos, self.clock, self._k, self.write_ns)
        self._last = (t, vc)
        if len(t) == 0:
            return WriteBatch.empty(int(complete))
        return WriteBatch(t, vc, g, c, int(complete), read=r if anyread else None, fault_cut=self.fault_ns != 0)

    def consumed(self, n, t_cut, faults_per_vcpu, retried, written):
        t, vc = self._last
        fixed = self.fault_ns if self._vm is None and self.fault_ns else 0  # (else next_writes charges the host's)
        _consume(t, vc, int(n), self.pos, self.clock, self._k, self.max_batch, self.write_ns, fixed,
                 faults_per_vcpu)

    def resumed(self, vcpu, now):
        if vcpu < self.nr_vcpus:
            self._charge_kernel_time()  # for this vCPU, up to its exit and while out: behind ``now``
            self.clock[vcpu] = max(self.clock[vcpu], now)


@njit(nogil=True)
def _propose(now, until, running, gfn, code, read, off, pos, clock, k, write_ns):  # pragma: no cover - compiled
    """The next batch of a trace: each running vCPU v with accesses left proposes up to ``k[v]``
    of them from ``pos[v]``, one every ``write_ns`` from max(``clock[v]``, ``now``), those before
    ``until``; the batch is complete up to the first time a vCPU would have proposed more
    (``complete``: its accesses before it are kept, the others dropped). Returns (times, vCPUs,
    gfns, exit codes, read flags, complete, any read), in (time, vCPU, program order) order."""
    nv = pos.shape[0]
    start = np.zeros(nv, dtype=np.int64)
    count = np.zeros(nv, dtype=np.int64)
    complete = until
    for v in range(nv):
        left = off[v + 1] - off[v] - pos[v]
        if not running[v] or left <= 0:
            continue
        s = max(clock[v], now)
        span = until - s
        kv = min(left, k[v], (span + write_ns - 1) // write_ns if span > 0 else 0)
        if kv < left:
            complete = min(complete, s + kv * write_ns)
        start[v] = s
        count[v] = kv
    total = 0
    for v in range(nv):  # keep what comes before ``complete``
        span = complete - start[v]
        count[v] = min(count[v], (span + write_ns - 1) // write_ns if span > 0 else 0)
        total += count[v]
    t = np.empty(total, dtype=np.int64)
    vc = np.empty(total, dtype=np.int32)
    j = 0
    for v in range(nv):
        for i in range(count[v]):
            t[j] = start[v] + i * write_ns
            vc[j] = v
            j += 1
    order = np.argsort(t, kind="mergesort")  # stable: ties by vCPU, then program order
    ts = np.empty(total, dtype=np.int64)
    vs = np.empty(total, dtype=np.int32)
    g = np.empty(total, dtype=np.int64)
    c = np.empty(total, dtype=np.int8)
    r = np.empty(total, dtype=np.int8)
    first = np.zeros(nv, dtype=np.int64)  # vCPU v's proposals start at position first[v] of t
    for v in range(1, nv):
        first[v] = first[v - 1] + count[v - 1]
    anyread = False
    for x in range(total):
        o = order[x]
        v = vc[o]
        a = off[v] + pos[v] + (o - first[v])
        ts[x] = t[o]
        vs[x] = v
        g[x] = gfn[a]
        c[x] = code[a]
        r[x] = read[a]
        anyread = anyread or read[a] != 0
    return ts, vs, g, c, r, complete, anyread


@njit(nogil=True)
def _consume(t, vc, n, pos, clock, k, max_batch, write_ns, fault_ns, faults):  # pragma: no cover - compiled
    """The host consumed the first ``n`` accesses of the batch (``t``/``vc``): each vCPU's
    position moves on by its share, its clock to after its last consumed access (plus
    ``fault_ns`` per fault it took, with a fixed service time); the next proposals get twice
    what each vCPU got through (at least 4), or twice the last size if the batch was walked
    whole (at most ``max_batch``)."""
    nv = pos.shape[0]
    whole = n >= t.shape[0]
    counts = np.zeros(nv, dtype=np.int64)
    last = np.zeros(nv, dtype=np.int64)
    for i in range(min(n, t.shape[0])):
        counts[vc[i]] += 1
        last[vc[i]] = t[i]
    for v in range(nv):
        k[v] = min(max_batch, 2 * k[v] if whole else max(4, 2 * counts[v]))
        if counts[v]:
            pos[v] += counts[v]
            clock[v] = last[v] + write_ns + faults[v] * fault_ns


def _checked_ints(values, name: str, lo: int, hi: int | None) -> np.ndarray:
    """``values`` as an int64 array, each an integer in lo..hi-1 (no upper bound if hi is None);
    a ValueError naming ``name``, the first bad element and the accepted range otherwise (a
    float, a bool, a negative offset or an index past the writes would be misread silently)."""
    a = np.asarray(values)
    if a.ndim != 1 and a.size:
        raise ValueError(f"{name}: expected a flat list of integers, got shape {a.shape}")
    if isinstance(values, np.ndarray):
        k = 0 if a.size and a.dtype.kind not in "iu" else None
    else:  # element by element: numpy makes [1, True] an int array
        k = next((k for k, x in enumerate(values)
                  if not isinstance(x, (int, np.integer)) or isinstance(x, (bool, np.bool_))), None)
    if k is not None:
        raise ValueError(f"{name}[{k}]: {values[k]!r} is not an integer")
    a = a.astype(np.int64).reshape(-1)
    bad = (a < lo) | (a >= hi) if hi is not None else a < lo
    if bad.any():
        k = int(np.argmax(bad))
        accepted = f"{lo}..{hi - 1}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name}[{k}]: {int(a[k])} is out of range; accepted: {accepted}")
    return a
