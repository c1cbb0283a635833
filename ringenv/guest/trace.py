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
"""

from __future__ import annotations

import numpy as np

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
    A batch per fault costs ~50 us: 32768 first writes of 8 vCPUs replay in ~2 s."""

    def __init__(self, writes: list, syncs: list, *, reads: list | None = None, base_gfn: int = 0,
                 write_ns: int = 5, fault_ns: int | None = None, max_batch: int = 512):
        if len(writes) != len(syncs) or (reads is not None and len(reads) != len(writes)):
            raise ValueError("writes, syncs (and reads) must have one entry per vCPU")
        self.nr_vcpus = len(writes)
        self.gfn, self.code, self.read = [], [], []
        for i, (w, s) in enumerate(zip(writes, syncs)):
            g = np.concatenate([base_gfn + np.asarray(w, dtype=np.int64), [NO_WRITE]])
            code = np.full(len(g), EXIT_NONE, dtype=np.int8)
            code[np.asarray(s, dtype=np.int64)] = EXIT_SYNC
            code[-1] = EXIT_DONE
            rd = np.zeros(len(g), dtype=np.int8)
            if reads is not None:
                rd[np.asarray(reads[i], dtype=np.int64)] = 1
            self.gfn.append(g)
            self.code.append(code)
            self.read.append(rd)
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
        ts, vs, gs, cs, rs = [], [], [], [], []
        complete = until
        for v in range(self.nr_vcpus):
            if not running[v] or self.pos[v] >= len(self.gfn[v]):
                continue
            start = max(self.clock[v], now)
            left = len(self.gfn[v]) - self.pos[v]
            k = int(min(left, self._k[v], max(0, -(-(until - start) // self.write_ns))))
            if k < left:
                complete = min(complete, start + k * self.write_ns)
            if k == 0:
                continue
            p = self.pos[v]
            ts.append(start + np.arange(k, dtype=np.int64) * self.write_ns)
            vs.append(np.full(k, v, dtype=np.int32))
            gs.append(self.gfn[v][p: p + k])
            cs.append(self.code[v][p: p + k])
            rs.append(self.read[v][p: p + k])
        if not ts:
            z = np.zeros(0, dtype=np.int64)
            self._last = (z, z.astype(np.int32))
            return WriteBatch.empty(complete)
        t, vc, g, c, r = (np.concatenate(x) for x in (ts, vs, gs, cs, rs))
        keep = t < complete
        order = np.lexsort((vc[keep], t[keep]))  # by time, then vCPU; program order kept (stable)
        t, vc, g, c, r = (x[keep][order] for x in (t, vc, g, c, r))
        self._last = (t, vc)
        return WriteBatch(t, vc, g, c, complete, read=r if r.any() else None, fault_cut=self.fault_ns != 0)

    def consumed(self, n, t_cut, faults_per_vcpu, retried, written):
        t, vc = self._last
        whole = n >= len(t)
        t, vc = t[:n], vc[:n]
        counts = np.bincount(vc, minlength=self.nr_vcpus)
        self._k = np.minimum(self.max_batch, 2 * self._k if whole else np.maximum(4, 2 * counts))
        for v in np.flatnonzero(counts):
            self.pos[v] += counts[v]
            last_t = t[vc == v][-1]
            fixed = int(faults_per_vcpu[v]) * self.fault_ns if self._vm is None else 0  # (else: next_writes)
            self.clock[v] = last_t + self.write_ns + fixed

    def resumed(self, vcpu, now):
        if vcpu < self.nr_vcpus:
            self._charge_kernel_time()  # for this vCPU, up to its exit and while out: behind ``now``
            self.clock[vcpu] = max(self.clock[vcpu], now)
