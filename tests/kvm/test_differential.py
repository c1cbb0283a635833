"""The simulated host against an independent model of the reference, event for event.

``Model`` below is written from docs/reference/kvm-dirty-ring.md alone, in plain Python with
one list element per ring entry and a dict of write-protected pages: s3 (the producer: an entry
per first write to a protected page, flags DIRTY, free-running 32-bit indexes, the soft-full
request raised by the push that reaches ``soft_limit``), s4 (KVM_RUN with the request pending
exits KVM_EXIT_DIRTY_RING_FULL while the ring is still soft-full and drops the request
otherwise), s5 (userspace takes entries in order while their flags are exactly DIRTY and marks
them RESET), s6 (KVM_RESET_DIRTY_RINGS: every ring's RESET entries in order, merged into
re-protect calls by the 64-bit mask rule of the same slot, forwards within 64 and backwards when
the shift loses no bit; arm64 re-protects a call's whole span, x86 exactly its set bits; a call
past its slot's end is skipped; the return is the count of entries) and s7 (x86 PML: the 512
logged writes flushed into the ring at the log-full exit, before the write that found the
buffer full, and at every exit; 64 + 512 entries reserved).

Random long sequences, seeds drawn by hypothesis: 1-4 vCPUs (one in the guest at a time: the
model has no time), two memslots whose ids are out of gfn order (entries of both interleave in
a ring), runs of ascending, descending and scattered writes (both directions of the coalescing
and its breaks), huge-page blocks split lazily or eagerly on arm64 (one fault is one entry
either way), random partial harvests and VM-wide resets. After every exit the test compares:
the exit, each ring's indexes and every entry (flags, slot, offset), what userspace harvested,
what each reset returned and how many re-protect calls it made, and every page's protection;
at the end the entries lost to a full ring (none expected).
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringenv.guest.trace import TraceProgram
from ringenv.kvm import Vm
from ringenv.kvm import uapi as U
from ringenv.kvm.memory import CLEAN, UNMAPPED, WP

from ._helpers import FOREVER

DIRTY, RESET = U.KVM_DIRTY_GFN_F_DIRTY, U.KVM_DIRTY_GFN_F_RESET
SLOT_PAGES = 1024
PML_BUFFER = 512
M64 = (1 << 64) - 1
U32 = (1 << 32) - 1


class Ring:
    """One vCPU's ring as the reference describes it (s3, s5, s6)."""

    def __init__(self, size: int, soft_limit: int):
        self.size, self.soft_limit = size, soft_limit
        self.flags, self.slot, self.offset = [0] * size, [0] * size, [0] * size
        self.dirty_index = self.reset_index = self.fetch_index = 0
        self.soft_full_request = False
        self.lost = 0

    def used(self) -> int:
        return (self.dirty_index - self.reset_index) & U32

    def push(self, slot: int, offset: int) -> None:
        if self.used() >= self.size:  # the kernel's "should never get full" WARN: the entry is lost
            self.lost += 1
        e = self.dirty_index & (self.size - 1)
        self.flags[e], self.slot[e], self.offset[e] = DIRTY, slot, offset
        self.dirty_index = (self.dirty_index + 1) & U32
        if self.used() >= self.soft_limit:
            self.soft_full_request = True

    def harvest(self, limit: int) -> list[tuple[int, int]]:
        """Userspace (s5): entries in order while their flags are exactly DIRTY, marked RESET."""
        out = []
        while len(out) < limit and self.flags[self.fetch_index & (self.size - 1)] == DIRTY:
            e = self.fetch_index & (self.size - 1)
            out.append((self.slot[e], self.offset[e]))
            self.flags[e] |= RESET
            self.fetch_index += 1
        return out

    def reset(self) -> tuple[int, list[tuple[int, int, int]]]:
        """s6: the count of entries reset and the re-protect calls (slot, first offset, mask)."""
        count, calls, mask, cur_slot, cur_off = 0, [], 0, None, None
        while self.flags[self.reset_index & (self.size - 1)] & RESET:
            e = self.reset_index & (self.size - 1)
            slot, off = self.slot[e], self.offset[e]
            self.flags[e] = 0
            self.reset_index = (self.reset_index + 1) & U32
            count += 1
            if mask and slot == cur_slot:
                delta = off - cur_off
                if 0 <= delta < 64:
                    mask |= 1 << delta
                    continue
                if -64 < delta < 0 and ((mask << -delta) & M64) >> -delta == mask:
                    cur_off, mask = off, ((mask << -delta) | 1) & M64
                    continue
            if mask:
                calls.append((cur_slot, cur_off, mask))
            cur_slot, cur_off, mask = slot, off, 1
        if mask:
            calls.append((cur_slot, cur_off, mask))
        return count, calls


class Model:
    """The host: rings, which pages are write-protected (or, with PML, clean), the PML buffers."""

    def __init__(self, writes, slots, *, size, reserved, span, pml):
        self.rings = [Ring(size, size - reserved) for _ in writes]
        self.writes, self.next = writes, [0] * len(writes)
        self.slots = slots  # [(slot id, base gfn)]
        self.span, self.pml = span, pml
        self.protected: dict[int, bool] = {}  # gfn -> a write to it is logged (default: yes)
        self.buffers: list[list[int]] = [[] for _ in writes]

    def locate(self, gfn: int) -> tuple[int, int]:
        for slot, base in self.slots:
            if base <= gfn < base + SLOT_PAGES:
                return slot, gfn - base
        raise AssertionError(gfn)

    def flush(self, v: int) -> None:
        for gfn in self.buffers[v]:
            self.rings[v].push(*self.locate(gfn))
        self.buffers[v] = []

    def run(self, v: int) -> str:
        """KVM_RUN on vCPU v until it exits to userspace: "full" or "done"."""
        ring = self.rings[v]
        if ring.soft_full_request:
            if ring.used() >= ring.soft_limit:
                return "full"
            ring.soft_full_request = False
        writes = self.writes[v]
        while self.next[v] < len(writes):
            gfn = writes[self.next[v]]
            if self.protected.get(gfn, True):
                if self.pml:  # logged by the CPU; the log-full exit comes before the write
                    if len(self.buffers[v]) == PML_BUFFER:
                        self.flush(v)
                        if ring.soft_full_request:
                            return "full"
                    self.buffers[v].append(gfn)
                    self.protected[gfn] = False
                else:  # a write-protect fault: the page made writable, its entry pushed
                    self.protected[gfn] = False
                    ring.push(*self.locate(gfn))
                    if ring.soft_full_request:  # the faulting store re-executes after the exit
                        return "full"  # (and faults again if a reset re-protected its page)
            self.next[v] += 1
        if self.pml:
            self.flush(v)
        return "done"

    def reset(self) -> tuple[int, int]:
        total = ncalls = 0
        bases = dict(self.slots)
        for ring in self.rings:
            count, calls = ring.reset()
            total += count
            for slot, off, mask in calls:
                lo, hi = (mask & -mask).bit_length() - 1, mask.bit_length() - 1
                if off + hi >= SLOT_PAGES:  # past the slot's end: skipped
                    continue
                ncalls += 1
                for b in range(lo, hi + 1):
                    if self.span or (mask >> b) & 1:
                        self.protected[bases[slot] + off + b] = True
        return total, ncalls


def _writes(rng, nv: int) -> list[list[int]]:
    """Per vCPU: runs of ascending and descending pages (strides 1, 2, nv), bursts in a window
    of 128 pages, scattered pages, over both slots."""
    n = 2 * SLOT_PAGES
    out = []
    for _ in range(nv):
        w: list[int] = []
        target = int(rng.integers(200, 2500))
        while len(w) < target:
            kind = int(rng.integers(0, 4))
            start = int(rng.integers(0, n))
            if kind < 2:
                step = int(rng.choice([1, 2, nv])) * (1 if kind == 0 else -1)
                w += [(start + step * k) % n for k in range(int(rng.integers(1, 100)))]
            elif kind == 2:
                start = min(start, n - 128)
                w += [int(x) for x in rng.integers(start, start + 128, size=int(rng.integers(1, 80)))]
            else:
                w += [int(x) for x in rng.integers(0, n, size=int(rng.integers(1, 40)))]
        out.append(w)
    return out


def _trial(seed: int, profile: str, *, blocks: str = "none") -> None:
    rng = np.random.default_rng(seed)
    vm = Vm(profile)
    p = vm.profile
    pml = p.pml
    nv = int(rng.integers(1, 5))
    entries = p.min_ring_entries * int(rng.choice([1, 1, 2]))
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL if p.arch == "arm64" else U.KVM_CAP_DIRTY_LOG_RING, entries * 16)
    if p.with_bitmap_supported:
        vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
    if blocks == "eager":
        vm.enable_cap(U.KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE, p.block_sizes[0])
    ids = [int(x) for x in rng.choice(10, size=2, replace=False)]  # ids out of gfn order half the time
    slots = [(sid, k * SLOT_PAGES) for k, sid in enumerate(ids)]
    for sid, base in slots:
        vm.set_user_memory_region(sid, U.KVM_MEM_LOG_DIRTY_PAGES, base * p.page_size, SLOT_PAGES * p.page_size,
                                  block_fraction=0.0 if blocks == "none" else 1.0,
                                  populated=pml)  # PML logs writes to mapped pages
    vcpus = [vm.create_vcpu(i) for i in range(nv)]
    writes = _writes(rng, nv)
    vm.attach_guest(TraceProgram(writes, [[] for _ in range(nv)], write_ns=1 if pml else 5, fault_ns=0))
    model = Model(writes, slots, size=entries, reserved=p.reserved_entries, span=p.reprotect_span, pml=pml)
    # the page states whose next write is logged: write-protected or not mapped yet (a fault), or
    # with PML mapped with the dirty bit clear
    logs_on_write = WP | UNMAPPED | (CLEAN if pml else 0)
    fetch = [0] * nv
    done = [False] * nv
    where = f"{profile} blocks={blocks} seed={seed} vcpus={nv} entries={entries}"
    for step in range(40_000):
        if all(done):
            break
        v = int(rng.integers(0, nv))
        if not done[v]:
            e = vcpus[v].run()
            if e is None:
                (e,) = vm.run_until(vm.now + FOREVER)
                assert e.vcpu == v, (where, step)
            kind = "full" if e.reason == U.KVM_EXIT_DIRTY_RING_FULL else e.kind
            assert kind == model.run(v), (where, step, v, kind)
            done[v] = kind == "done"
        for u in range(nv):  # userspace harvests some rings, partly or whole (s5)
            if rng.random() < 0.5:
                limit = int(rng.choice([0, 1, 3, 40, 1 << 30]))
                gfns, ring = vcpus[u].ring_gfns, model.rings[u]
                got = []
                while len(got) < limit and gfns["flags"][fetch[u] % entries] == DIRTY:
                    e_ = fetch[u] % entries
                    got.append((int(gfns["slot"][e_]), int(gfns["offset"][e_])))
                    gfns["flags"][e_] |= RESET
                    fetch[u] += 1
                assert got == ring.harvest(limit), (where, step, u)
        if rng.random() < 0.7:
            calls0 = vm.stats.reprotect_calls
            got = vm.reset_dirty_rings(), vm.stats.reprotect_calls - calls0
            assert got == model.reset(), (where, step)
        for u in range(nv):
            ring, g = model.rings[u], vcpus[u].ring_gfns
            assert (vcpus[u].ring.dirty_index, vcpus[u].ring.reset_index) == (ring.dirty_index, ring.reset_index)
            assert g["flags"].tolist() == ring.flags, (where, step, u)
            assert g["slot"].tolist() == ring.slot and g["offset"].tolist() == ring.offset, (where, step, u)
        for sid, base in slots:
            logged = (vm.memslot(sid).state[:SLOT_PAGES] & logs_on_write) != 0
            expect = [model.protected.get(base + k, True) for k in range(SLOT_PAGES)]
            assert logged.tolist() == expect, (where, step, sid, np.flatnonzero(logged != np.array(expect))[:8])
    assert all(done), where
    assert [v.ring.lost for v in vcpus] == [r.lost for r in model.rings] == [0] * nv, where


SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
SEEDS = st.integers(0, 2**32 - 1)


@SETTINGS
@given(seed=SEEDS, profile=st.sampled_from(["arm64-4k", "arm64-16k", "arm64-64k", "x86-nopml"]))
def test_random_rings_harvests_and_resets_match_the_model(seed, profile):
    _trial(seed, profile)


@SETTINGS
@given(seed=SEEDS, profile=st.sampled_from(["arm64-4k", "arm64-16k"]), blocks=st.sampled_from(["lazy", "eager"]))
def test_block_splitting_while_logging_pushes_one_entry_per_fault(seed, profile, blocks):
    _trial(seed, profile, blocks=blocks)


@SETTINGS
@given(seed=SEEDS)
def test_pml_buffer_flushes_match_the_model(seed):
    _trial(seed, "x86-pml")
