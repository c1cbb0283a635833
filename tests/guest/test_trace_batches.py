"""TraceProgram's compiled batch making (ringenv/guest/trace.py: _propose, _consume) against a
plain reference written from its rules: each running vCPU with accesses left proposes up to k
of them, one every write_ns from max(its clock, now), before ``until``; the batch is complete up
to the first time a vCPU would have proposed more, and ordered by (time, vCPU, program order)."""

from __future__ import annotations

import numpy as np
import pytest

from ringenv.guest.base import EXIT_DONE, EXIT_SYNC
from ringenv.guest.trace import TraceProgram


def _reference(prog: TraceProgram, now: int, until: int, running: np.ndarray):
    ts, vs, gs, cs, rs = [], [], [], [], []
    complete = until
    w = prog.write_ns
    for v in range(prog.nr_vcpus):
        lo, hi = prog.off[v] + prog.pos[v], prog.off[v + 1]
        if not running[v] or lo >= hi:
            continue
        start = max(int(prog.clock[v]), now)
        left = hi - lo
        k = int(min(left, prog._k[v], max(0, -(-(until - start) // w))))
        if k < left:
            complete = min(complete, start + k * w)
        ts.append(start + np.arange(k, dtype=np.int64) * w)
        vs.append(np.full(k, v, dtype=np.int32))
        gs.append(prog.gfn[lo: lo + k])
        cs.append(prog.code[lo: lo + k])
        rs.append(prog.read[lo: lo + k])
    if not ts:
        return [np.zeros(0, dtype=np.int64)] * 5, complete
    t, vc, g, c, r = (np.concatenate(x) for x in (ts, vs, gs, cs, rs))
    keep = t < complete
    order = np.lexsort((vc[keep], t[keep]))
    return [x[keep][order] for x in (t, vc, g, c, r)], complete


@pytest.mark.parametrize("seed", range(40))
def test_batches_match_the_reference(seed):
    rng = np.random.default_rng(seed)
    nv = int(rng.integers(1, 6))
    writes = [rng.integers(0, 500, size=int(rng.integers(0, 40))).tolist() for _ in range(nv)]
    syncs = [sorted(set(rng.integers(0, max(1, len(w)), size=2).tolist()) & set(range(len(w)))) for w in writes]
    reads = [[i for i in range(len(w)) if rng.random() < 0.2] for w in writes]
    prog = TraceProgram(writes, syncs, reads=reads, write_ns=int(rng.integers(1, 9)), fault_ns=int(rng.integers(0, 3)),
                        max_batch=int(rng.integers(1, 12)))
    now = 0
    for _ in range(30):
        running = rng.random(nv + 1) < 0.8  # (the VM may have more vCPUs than the trace)
        until = now + int(rng.integers(0, 60))
        want, complete = _reference(prog, now, until, running)
        batch = prog.next_writes(now, until, running)
        got = [batch.t, batch.vcpu, batch.gfn,
               batch.exit_after if batch.exit_after is not None else np.zeros(0, np.int8),
               batch.read if batch.read is not None else np.zeros(len(batch), np.int8)]
        assert batch.complete_until == complete
        for a, b in zip(got, want):
            assert a.tolist() == b.tolist()
        if len(batch) == 0:
            now = max(now, complete)
            continue
        n = int(rng.integers(0, len(batch) + 1))
        faults = rng.integers(0, 2, size=nv + 1)
        pos, clock, k = prog.pos.copy(), prog.clock.copy(), prog._k.copy()
        prog.consumed(n, int(batch.t[n - 1]) if n else now, faults, np.zeros(nv + 1, bool), 0)
        counts = np.bincount(batch.vcpu[:n], minlength=nv)
        whole = n >= len(batch)
        assert prog._k.tolist() == np.minimum(prog.max_batch, 2 * k if whole else np.maximum(4, 2 * counts)).tolist()
        for v in range(nv):
            if counts[v]:
                last = int(batch.t[:n][batch.vcpu[:n] == v][-1])
                assert prog.pos[v] == pos[v] + counts[v]
                assert prog.clock[v] == last + prog.write_ns + faults[v] * prog.fault_ns
            else:
                assert (prog.pos[v], prog.clock[v]) == (pos[v], clock[v])
        now = int(batch.t[n - 1]) if n else now


def test_exit_codes_and_the_end_of_each_program():
    prog = TraceProgram([[7, 8], [9]], [[0], []], write_ns=10, fault_ns=0)
    b = prog.next_writes(0, 1000, np.array([True, True]))
    assert list(zip(b.t.tolist(), b.vcpu.tolist(), b.gfn.tolist(), b.exit_after.tolist())) == [
        (0, 0, 7, EXIT_SYNC), (0, 1, 9, 0), (10, 0, 8, 0), (10, 1, -1, EXIT_DONE), (20, 0, -1, EXIT_DONE)]
    assert b.read is None
