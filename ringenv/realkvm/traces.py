"""The built-in trace set for ``ringenv validate``: deterministic, small, a few seconds on KVM.

Multi-vCPU traces give each vCPU a disjoint, contiguous part of the slot and reap only the
vCPU's own ring ("self"): then the real kernel's output does not depend on thread timing.
"""

from __future__ import annotations

import numpy as np

SMALL, DEFAULT, LARGEST = 256, 4096, 65536


def _trace(slot_pages: int, ring_entries: int, *vcpus: tuple[list[int], list[int]], unmapped_pages: int = 0,
           reads: list[int] | None = None, populated: bool = False) -> dict:
    out = {"slot_pages": slot_pages, "ring_entries": ring_entries, "reap_scope": "self",
           "vcpus": [{"writes": [int(w) for w in writes], "syncs": [int(s) for s in syncs]}
                     for writes, syncs in vcpus]}
    if unmapped_pages:
        out["unmapped_pages"] = unmapped_pages
    if reads is not None:  # (one vCPU)
        out["vcpus"][0]["reads"] = reads
    if populated:
        out["populated"] = True
    return out


def _reads_then_writes() -> tuple[list[int], list[int], list[int]]:
    """Reads of pages 0..299 (with a populated slot on x86 each is logged: the 192nd fills a
    256-entry ring on a read), writes of 100..399, a sync, reads of 0..49 again (mapped now:
    nothing) and of 400..449 (never touched), then writes of 0..9 and 400..409.
    Returns (accesses, syncs, reads)."""
    acc = list(range(300)) + list(range(100, 400))
    syncs = [len(acc) - 1]
    acc += list(range(50)) + list(range(400, 450)) + list(range(10)) + list(range(400, 410))
    reads = list(range(300)) + list(range(600, 700))
    return acc, syncs, reads


def _unmapped_mid_run() -> list[int]:
    """Writes past the end of a 1024-page slot (offsets 1024..1087, no memslot there: each is an
    MMIO exit) among ordinary ones: one early, one right after the store whose push fills a
    256-entry ring (soft limit 192: page 191), two in a row at the end, before a re-write pass."""
    return (list(range(120)) + [1024] + list(range(120, 192)) + [1030] + list(range(192, 300))
            + [1087, 1087] + list(range(10)))


def _every(n: int, step: int) -> list[int]:
    """Sync after every ``step``-th write (indices step-1, 2*step-1, ...)."""
    return list(range(step - 1, n, step))


def _split(slot_pages: int, nvcpu: int, make) -> list[tuple[list[int], list[int]]]:
    """One program per vCPU on its own contiguous part: ``make(part_pages, rng)`` gives
    (writes relative to the part, syncs)."""
    part = slot_pages // nvcpu
    out = []
    for i in range(nvcpu):
        writes, syncs = make(part, np.random.default_rng(100 + i))
        out.append(([i * part + w for w in writes], syncs))
    return out


def builtin_traces() -> dict[str, dict]:
    """Name -> trace; the same every call."""
    rng = np.random.default_rng(20261129)
    seq = list(range(1000))
    rand = rng.integers(0, 2048, size=1500).tolist()       # repeats included
    perm = rng.permutation(4096)[:1200].tolist()           # distinct, scattered
    acc, acc_syncs, reads = _reads_then_writes()
    return {
        "seq-256": _trace(1024, SMALL, (seq, [])),
        "seq-256-syncs": _trace(1024, SMALL, (seq, _every(1000, 100))),
        "reversed-256": _trace(1024, SMALL, (seq[::-1], [499])),
        "stride67-256": _trace(4096, SMALL, ([i * 67 % 4096 for i in range(1000)], [300])),
        "stride64-512": _trace(65536, 512, ([i * 64 for i in range(1000)], [])),
        "random-256": _trace(2048, SMALL, (rand, _every(1500, 250))),
        "perm-1024": _trace(4096, 1024, (perm, [])),
        "twice-each-256": _trace(1024, SMALL, ([p for p in range(500) for _ in (0, 1)], [])),
        "rewrite-after-sync": _trace(256, SMALL, (list(range(100)) * 2, [99])),
        "three-passes-512": _trace(300, 512, (list(range(300)) * 3, [299, 599, 899])),
        "passes-no-sync-256": _trace(150, SMALL, (list(range(150)) * 4, [])),
        "hot-set-256": _trace(64, SMALL, (rng.integers(0, 64, size=2000).tolist(), [999])),
        "sync-every-write": _trace(64, SMALL, (list(range(40)), list(range(40)))),
        "sync-at-0": _trace(16, SMALL, ([5, 5, 6], [0])),
        "exact-soft-limit": _trace(512, SMALL, (list(range(192)) + [0], [191])),
        "seq-4096": _trace(8192, DEFAULT, (list(range(5000)), [2499])),
        "seq-16384": _trace(20480, 16384, (list(range(20000)) + list(range(1000)), [2999])),
        "seq-65536": _trace(4096, LARGEST, (list(range(4096)), [2047])),
        "2vcpu-seq-256": _trace(2048, SMALL, *_split(
            2048, 2, lambda n, r: (list(range(1000)), [500]))),
        "2vcpu-random-512": _trace(4096, 512, *_split(
            4096, 2, lambda n, r: (r.integers(0, n, size=1200).tolist(), [599]))),
        "3vcpu-reversed-256": _trace(1536, SMALL, *_split(
            1536, 3, lambda n, r: (list(range(n))[::-1], _every(n, 200)))),
        "4vcpu-seq-256": _trace(2048, SMALL, *_split(
            2048, 4, lambda n, r: (list(range(n)) * 2, [n - 1]))),
        "4vcpu-stride-1024": _trace(8192, 1024, *_split(
            8192, 4, lambda n, r: ([i * 5 % n for i in range(1500)], [749]))),
        "4vcpu-uneven-256": _trace(1024, SMALL, *_split(
            1024, 4, lambda n, r: (list(range(int(r.integers(1, n)))), []))),
        "reads-fresh-256": _trace(1024, SMALL, (acc, acc_syncs), reads=reads),
        "reads-populated-256": _trace(1024, SMALL, (acc, acc_syncs), reads=reads, populated=True),
        "unmapped-256": _trace(1024, SMALL, (_unmapped_mid_run(), [250, 302]), unmapped_pages=64),
        "2vcpu-unmapped-256": _trace(2048, SMALL, *[
            ([w + i * 1024 if w < 1024 else w + 1024 + 64 * i for w in _unmapped_mid_run()], [302 - 100 * i])
            for i in range(2)], unmapped_pages=128),
    }
