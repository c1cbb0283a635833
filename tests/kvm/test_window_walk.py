"""A workload's window of candidate first writes is walked in one compiled call with its gather
and address check (``Vm._apply_window``); it must do exactly what the general walk does with
the same writes gathered in order first."""

from __future__ import annotations

import numpy as np
import pytest

from ringenv.guest.base import GuestProgram, WriteBatch
from ringenv.kvm import Vm
from ringenv.kvm import uapi as U

SLOT_BASE = 4096  # gfns of the RAM slot: 4096 .. 4096 + 2048
SLOT_PAGES = 2048


class Scripted(GuestProgram):
    """Hands out one prepared window of candidate first writes, then nothing. ``general``: the
    same writes gathered in event order and marked as reads-present (all zero), which sends
    them down the general walk instead of the window walk."""

    def __init__(self, t, vcpu, gfn, order, general):
        self.nr_vcpus = 2
        self.batch = (t, vcpu, gfn, order)
        self.general = general
        self.consumed_calls = []

    def next_writes(self, now, until, running):
        return WriteBatch.empty(until)

    def window(self, now, until, running, room):
        if self.batch is None:
            return WriteBatch.empty(until)
        t, vc, gfn, order = self.batch
        self.batch = None
        b = WriteBatch(t, vc, gfn, None, int(t.max()) + 1, first_touch=True, order=order)
        if self.general:
            b = b.ordered()
            b.read = np.zeros(len(t), dtype=np.int8)
        return b

    def consumed(self, n, t_cut, faults_per_vcpu, retried, written):
        self.consumed_calls.append((n, t_cut, faults_per_vcpu.tolist(), retried.tolist(), written))


def _vm(guest, entries=256):
    vm = Vm("arm64-4k", seed=1)
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, entries * 16)
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
    vm.set_user_memory_region(0, 0, SLOT_BASE * 4096, SLOT_PAGES * 4096, block_fraction=0.5)
    vcpus = [vm.create_vcpu(i) for i in range(2)]
    vm.attach_guest(guest)
    vm.set_user_memory_region(0, U.KVM_MEM_LOG_DIRTY_PAGES, SLOT_BASE * 4096, SLOT_PAGES * 4096)
    for v in vcpus:
        assert v.run() is None
    return vm, vcpus


def _window(n, rng, bad=None):
    """n writes in sampling order (random times, vCPUs, pages with repeats) and their order."""
    t = rng.integers(0, 10_000, n)
    vc = rng.integers(0, 2, n).astype(np.int32)
    gfn = SLOT_BASE + rng.integers(0, SLOT_PAGES, n)
    if bad is not None:
        gfn[bad] = SLOT_BASE + SLOT_PAGES + 7  # just past the slot
    order = np.lexsort((np.arange(n), vc, t))
    return t, vc, gfn, order


@pytest.mark.parametrize("n", [20, 150, 600])  # at 600 a ring reaches its soft limit (192 entries)
def test_window_walk_matches_the_general_walk(n):
    runs = []
    for general in (False, True):
        guest = Scripted(*_window(n, np.random.default_rng(n)), general=general)
        vm, vcpus = _vm(guest)
        exits = vm.run_until(20_000)
        runs.append((vm, vcpus, exits, guest))
    (a, av, ae, ag), (b, bv, be, bg) = runs
    assert [(e.vcpu, e.reason, e.time_ns, e.kind) for e in ae] == [(e.vcpu, e.reason, e.time_ns, e.kind) for e in be]
    assert a.now == b.now and ag.consumed_calls == bg.consumed_calls
    for vm in (a, b):  # (the window walk leaves the tables of its splits to write out)
        vm.leaf_mappings()
    assert np.array_equal(a.state, b.state) and np.array_equal(a.version, b.version)
    assert np.array_equal(a.block_map, b.block_map) and a.stats.splits == b.stats.splits
    for u, v in zip(av, bv):
        assert (u.ring.dirty_index, u.ring.reset_index, u.request_soft_full) == \
               (v.ring.dirty_index, v.ring.reset_index, v.request_soft_full)
        assert np.array_equal(u.ring_gfns, v.ring_gfns)
        assert (u.stats.faults, u.stats.pushes, u.stats.fault_ns, u.pending_store) == \
               (v.stats.faults, v.stats.pushes, v.stats.fault_ns, v.pending_store)
    assert [e.kind for e in ae] == (["full"] if n == 600 else [])


def _snapshot(vm, vcpus, guest):
    return (vm.now, list(guest.consumed_calls), vm.state.copy(), vm.version.copy(), vm.block_map.copy(),
            vm.stats.splits, [(v.ring.dirty_index, v.ring.reset_index, v.request_soft_full, v.in_guest,
                               v.stats.faults, v.stats.pushes, v.stats.fault_ns, v.ring_gfns.copy()) for v in vcpus])


def _same(a, b, calls=True):
    assert a[0] == b[0] and a[5] == b[5] and (not calls or a[1] == b[1])
    for x, y in zip(a[2:5], b[2:5]):
        assert np.array_equal(x, y)
    for u, v in zip(a[6], b[6]):
        assert u[:7] == v[:7] and np.array_equal(u[7], v[7])


@pytest.mark.parametrize("general", [False, True])
def test_a_write_outside_every_memslot_is_an_mmio_exit_when_the_walk_reaches_it(general):
    """A write outside every memslot is an access to an unbacked guest-physical address: when
    the walk reaches it (not before) its vCPU exits with KVM_EXIT_MMIO ("mmio"), the store
    completed as MMIO. The writes before it (in event order) are applied as if the window ended
    there, the guest is told they and the MMIO store were consumed, the other vCPU is still in
    the guest and the clock is at the store's time. The window walk and the general walk agree."""
    t, vc, gfn, order = _window(50, np.random.default_rng(7), bad=31)
    p = int(np.flatnonzero(order == 31)[0])  # its place in event order
    assert 0 < p < 49
    guest = Scripted(t, vc, gfn, order, general=general)
    vm, vcpus = _vm(guest)
    exits = vm.run_until(20_000)
    assert [(e.vcpu, e.reason, e.time_ns, e.kind) for e in exits] == [(int(vc[31]), U.KVM_EXIT_MMIO, int(t[31]),
                                                                        "mmio")]
    assert guest.consumed_calls[-1][:2] == (p + 1, int(t[31]))
    assert not vcpus[vc[31]].in_guest and vcpus[1 - vc[31]].in_guest

    # the same as a window holding only the writes before it, stopped at its time
    keep = order[:p]
    ref_guest = Scripted(t[keep], vc[keep], gfn[keep], None, general=general)
    ref, ref_vcpus = _vm(ref_guest)
    assert ref.run_until(int(t[31])) == []
    vcpus[vc[31]].in_guest = True  # (only to compare the rest)
    _same(_snapshot(vm, vcpus, guest), _snapshot(ref, ref_vcpus, ref_guest), calls=False)


@pytest.mark.parametrize("general", [False, True])
def test_an_exit_before_the_write_outside_every_memslot_stops_the_walk_first(general):
    """600 writes fill a ring (a full exit) before the last one in event order, which lies
    outside every memslot: the walk stops at the full exit and never reaches it; no MMIO exit, and
    the same results as with that write inside the slot."""
    runs = []
    for bad in (None, 599):
        t, vc, gfn, order = _window(600, np.random.default_rng(600))
        if bad is not None:
            gfn[order[bad]] = SLOT_BASE + SLOT_PAGES + 7
        guest = Scripted(t, vc, gfn, order, general=general)
        vm, vcpus = _vm(guest)
        exits = vm.run_until(20_000)
        assert [e.kind for e in exits] == ["full"]
        runs.append(_snapshot(vm, vcpus, guest))
    _same(*runs)


@pytest.mark.parametrize("profile", ["arm64-4k", "x86-nopml"])
def test_tables_a_window_split_left_behave_as_the_general_walk_leaves_them(profile):
    """A split that maps only the faulting page leaves the block's other pages unmapped. The
    window walk marks the block (memory.EMPTY) instead of its pages and the stage-2 state is
    written out when something else reads it; until then the walks take an EMPTY block's pages
    as unmapped. After a window that splits blocks, a trace of loads and stores in them (loads
    of pages written or not, a store then a load of a page not written) takes the faults,
    pushes and mappings it takes after the general walk, and the leaf counts agree."""
    from ringenv.guest.trace import TraceProgram

    t, vc, gfn, order = _window(150, np.random.default_rng(7))
    written = sorted(set(int(g) for g in gfn))
    others = [g for g in range(SLOT_BASE, SLOT_BASE + SLOT_PAGES) if g not in set(written)]
    accesses = [written[0], others[0], others[1], others[1], written[1], others[2]]
    reads = [0, 1, 3, 4]  # loads of: a page written, one not, the one stored just before, a written one
    runs = []
    for general in (False, True):
        guest = Scripted(t, vc, gfn, order, general=general)
        vm = Vm(profile, seed=1)
        vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL if profile.startswith("arm64") else U.KVM_CAP_DIRTY_LOG_RING,
                      256 * 16)
        if vm.profile.with_bitmap_supported:  # (arm64: else the ring-only slot does not log, nor split)
            vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
        vm.set_user_memory_region(0, 0, SLOT_BASE * 4096, SLOT_PAGES * 4096, block_fraction=1.0, populated=True)
        vcpus = [vm.create_vcpu(i) for i in range(2)]
        vm.attach_guest(guest)
        vm.set_user_memory_region(0, U.KVM_MEM_LOG_DIRTY_PAGES, SLOT_BASE * 4096, SLOT_PAGES * 4096)
        for v in vcpus:
            assert v.run() is None
        assert vm.run_until(20_000) == []
        assert vm.stats.splits > 0
        if not general:
            assert (vm.block_map == 3).any()  # (EMPTY: not written out yet)
        before = [(v.stats.faults, v.stats.pushes) for v in vcpus]
        vm.attach_guest(TraceProgram([[g - SLOT_BASE for g in accesses], []], [[], []], reads=[reads, []],
                                     base_gfn=SLOT_BASE))
        exits = []
        while not any(e.vcpu == 0 for e in exits):  # (the vCPUs are in the guest: no ring gets full)
            exits += vm.run_until(vm.now + (1 << 40))
        assert {e.kind for e in exits} == {"done"}
        after = [(v.stats.faults, v.stats.pushes) for v in vcpus]
        runs.append((vm, before, after, vcpus[0].ring_gfns.copy()))
    (a, ab, aa, ar), (b, bb, ba, br) = runs
    assert ab == bb and aa == ba and np.array_equal(ar, br)
    assert aa[0][0] - ab[0][0] >= 3  # the loads of pages not mapped since the splits faulted
    assert a.leaf_mappings() == b.leaf_mappings()
    assert np.array_equal(a.state, b.state) and np.array_equal(a.block_map, b.block_map)
