"""x86 with PML (reference s2 and s7): reserved = 64 + 512 = 576, smallest ring 1024 entries;
the CPU logs up to 512 GPAs in a hardware buffer that KVM flushes into the ring when it is full
and at every exit, so pushes arrive 512 at a time (or whatever is buffered at an exit), and the
soft-full request can only fire after a flush.

The guest is a TraceProgram writing one store every 5 ns (write k at t = 5k, fault cost 0), so
run_until(5 * k) lets exactly writes 0..k-1 happen.
"""

from __future__ import annotations

import pytest

from ringenv.config import load_host_profile
from ringenv.kvm import uapi as U

from ._helpers import Host

FULL = U.KVM_EXIT_DIRTY_RING_FULL


def test_pml_reserved_576_smallest_ring_1024_soft_limit_448():
    """s2: reserved = 64 + 512; smallest ring: 576 * 16 = 9216 B -> 16384 B = 1024 entries;
    soft_limit = 1024 - 576 = 448."""
    p = load_host_profile("x86-pml")
    assert p.reserved_entries == 576
    assert p.min_ring_entries == 1024
    h = Host([[]], profile="x86-pml", entries=1024)
    assert (h.vcpus[0].ring.size, h.vcpus[0].ring.soft_limit) == (1024, 448)


def test_pushes_arrive_512_at_a_time_while_running():
    """s7 + Intel SDM (PML): the 512th logged write fills the buffer (the PML index leaves
    0..511) and nothing exits yet; the next write that must be logged raises the log-full
    VM exit before it is done, and KVM flushes: 512 entries at once, then that write is
    logged into the empty buffer. Ring 4096 entries (soft 3520): no exit to userspace."""
    h = Host([list(range(600))], profile="x86-pml", entries=4096, slot_pages=2048)
    v = h.vcpus[0]
    assert h.enter() is None
    assert h.vm.run_until(5 * 512) == []
    assert v.ring.dirty_index == 0 and v.pml_count == 512  # full, not flushed
    assert h.version(511) == 1  # the writes did happen
    assert h.vm.run_until(5 * 513) == []
    assert v.ring.dirty_index == 512 and v.pml_count == 1  # the 513th write logged after the flush
    assert h.ring_offsets() == list(range(512))
    assert v.stats.pml_flushes == 1
    assert h.vm.run_until(5 * 550) == []
    assert v.ring.dirty_index == 512  # 38 logged, not yet in the ring


def test_any_exit_flushes_the_pml_buffer():
    """s7: "KVM flushes the buffer into the ring at the next exit": after 550 writes a kick
    (KVM_EXIT_INTR) brings the ring from 512 to 550 entries."""
    h = Host([list(range(600))], profile="x86-pml", entries=4096, slot_pages=2048)
    v = h.vcpus[0]
    assert h.enter() is None
    h.vm.run_until(5 * 550)
    e = v.kick()
    assert e is not None and e.reason == U.KVM_EXIT_INTR
    assert v.ring.dirty_index == 550
    assert h.harvest() == list(range(550))


def test_sync_exit_flushes_the_pml_buffer():
    """s7: 100 writes then a sync (MMIO) exit: the 100 buffered pages are in the ring."""
    h = Host([list(range(100))], [[99]], profile="x86-pml", entries=1024)
    e = h.enter_and_run()
    assert e.kind == "sync"
    assert h.harvest() == list(range(100))


def test_no_full_exit_between_flush_points():
    """s4 + s7: ring 1024, soft 448. After 480 writes (more than the soft limit) the ring is
    still empty -- everything is in the buffer -- and the vCPU is still in the guest."""
    h = Host([list(range(2000))], profile="x86-pml", entries=1024, slot_pages=4096)
    assert h.enter() is None
    assert h.vm.run_until(5 * 480) == []
    assert h.vcpus[0].in_guest and h.vcpus[0].ring.used == 0


def test_full_exit_at_the_first_flush_with_512_entries():
    """s7: ring 1024 (soft 448): the first flush (the log-full exit at the 513th write) gives
    used 512 >= 448 -> full exit with 512 entries, within [soft_limit, soft_limit + 511] =
    [448, 959], at the 513th write's time (write_ns 5: 5 x 512 ns in), that write not done yet.
    Then batches of 512 after each harvest + reset (no duplicate: the 513th write is done once,
    after re-entry), and the rest, 2000 - 3 * 512 = 464, at the end."""
    h = Host([list(range(2000))], profile="x86-pml", entries=1024, slot_pages=4096)
    r = h.vcpus[0].ring
    batches = []
    e = h.enter_and_run()
    assert h.vm.now == 5 * 512 and h.version(512) == 0
    while e.kind == "full":
        assert e.reason == FULL
        assert r.soft_limit <= r.used <= r.soft_limit + 511
        batches.append(h.harvest())
        assert h.reset() == len(batches[-1])
        e = h.enter_and_run()
    assert e.kind == "done"
    batches.append(h.harvest())
    assert [len(b) for b in batches] == [512, 512, 512, 464]
    assert sum(batches, []) == list(range(2000))
    assert r.lost == 0


def test_full_exit_with_a_2048_ring_holds_1536():
    """ring 2048, soft 2048 - 576 = 1472: flushes at 512 and 1024 stay below it; the third
    (1536) crosses it -> full exit with 1536 entries, within [1472, 1983]."""
    h = Host([list(range(2000))], profile="x86-pml", entries=2048, slot_pages=4096)
    e = h.enter_and_run()
    r = h.vcpus[0].ring
    assert e.reason == FULL
    assert r.used == 1536
    assert r.soft_limit <= r.used <= r.soft_limit + 511


def test_flush_at_a_sync_exit_can_make_the_ring_soft_full():
    """s4 + s7: ring 1024 (soft 448): 480 writes then a sync exit flush 480 >= 448 entries;
    SOFT_FULL is raised by the push, so KVM_RUN without a reset exits 31 at once; after
    harvest + reset the vCPU enters again."""
    h = Host([list(range(500))], [[479]], profile="x86-pml", entries=1024, slot_pages=1024)
    e = h.enter_and_run()
    assert e.kind == "sync"
    assert h.vcpus[0].ring.used == 480
    again = h.enter()
    assert again is not None and again.reason == FULL
    assert len(h.harvest()) == 480 and h.reset() == 480
    assert h.enter() is None
    assert h.run().kind == "done"
    assert h.harvest() == list(range(480, 500))


def test_pml_logs_a_page_once_until_reset():
    """s3: the ring does not de-duplicate, the logging does: 5, 5, 6 -> [5, 6]; after harvest
    + reset, 5 is logged again."""
    h = Host([[5, 5, 6, 5]], [[2]], profile="x86-pml", entries=1024)
    assert h.enter_and_run().kind == "sync"
    assert h.harvest() == [5, 6]
    assert h.reset() == 2
    assert h.enter_and_run().kind == "done"
    assert h.harvest() == [5]


def test_the_sync_after_the_write_that_fills_the_pml_buffer_exits_before_the_full_exit():
    """s4 + s7: ring 1024 (soft 448), a sync point after write 511. That 512th write fills the
    PML buffer and retires; no log-full exit yet (none comes before a 513th write to log). The
    guest's sync (MMIO) exits: the exit flushes the buffer (vmx_flush_pml_buffer at every VM
    exit), used 512 >= 448 raises the soft-full request, and the sync reaches userspace first;
    the next KVM_RUN returns the full exit at once (the request checked at entry)."""
    h = Host([list(range(600))], [[511]], profile="x86-pml", entries=1024, slot_pages=1024)
    v = h.vcpus[0]
    e = h.enter_and_run()
    assert e.kind == "sync" and e.reason == U.KVM_EXIT_MMIO
    assert v.ring.used == 512 and h.version(511) == 1  # the store retired once
    e = h.enter()
    assert e is not None and e.reason == FULL
    assert h.harvest() == list(range(512)) and h.reset() == 512
    assert h.enter_and_run().kind == "done"
    assert h.harvest() == list(range(512, 600))


# ---------------------------------------------------------------------------- memslot changes with a buffered vCPU
# The PML buffer holds guest-physical addresses: vmx_flush_pml_buffer hands each to
# kvm_vcpu_mark_page_dirty, which looks the gfn up in the memslots as they are at the flush
# (kvm_vcpu_gfn_to_memslot) and pushes (slot, gfn - base_gfn), or nothing for a gfn no slot maps
# or a slot without LOG_DIRTY_PAGES. In each test vCPU 0 has written pages 0..39 of its slot,
# all still in its PML buffer, when vCPU 1 exits at a sync; userspace changes the memslots, then
# kicks vCPU 0 (its exit flushes the buffer). Deleting or moving any slot kicks vCPU 0 first,
# the buffered slot still in place (x86 zaps every mapping: tests/kvm/test_pml_ipis.py).

def _buffered(base_gfn=0, slot_pages=1024):
    """vCPU 0: 40 writes (offsets 0..39) buffered; vCPU 1: 40 writes (500..539), then a sync."""
    h = Host([list(range(100)), list(range(500, 540))], [[], [39]], profile="x86-pml", entries=1024,
             base_gfn=base_gfn, slot_pages=slot_pages)
    assert h.enter(0) is None and h.enter(1) is None
    e = h.run()
    assert (e.vcpu, e.kind) == (1, "sync") and h.vcpus[0].pml_count == 40
    assert h.harvest_entries(1) == [(0, k) for k in range(500, 540)]
    return h


def _kick(h):
    e = h.vcpus[0].kick()
    assert e.kind == "kick" and h.vcpus[0].pml_count == 0
    return h.harvest_entries(0)


LOG_ = U.KVM_MEM_LOG_DIRTY_PAGES
PAGE = 4096


def test_pml_flush_after_a_slot_is_created_below_the_buffered_slot():
    """The buffered slot is at gfn 4096; a new logging slot 1 at gfn 0 comes before it in the
    address space. The buffered gfns are still those of slot 0: (0, 0..39) are pushed."""
    h = _buffered(base_gfn=4096)
    h.vm.set_user_memory_region(1, LOG_, 0, 512 * PAGE)
    assert _kick(h) == [(0, k) for k in range(40)]
    assert h.vcpus[0].stats.pushes == 40


def test_pml_flush_after_another_slot_is_deleted():
    """Slot 5 (gfn 0, 512 pages) sits below the buffered slot (gfn 4096); deleting it leaves
    the buffered gfns where they were: (0, 0..39)."""
    h = Host([list(range(100)), list(range(500, 540))], [[], [39]], profile="x86-pml", entries=1024,
             base_gfn=4096)
    h.vm.set_user_memory_region(5, LOG_, 0, 512 * PAGE)
    assert h.enter(0) is None and h.enter(1) is None
    assert h.run().vcpu == 1 and h.vcpus[0].pml_count == 40
    h.vm.set_user_memory_region(5, 0, 0, 0)
    assert _kick(h) == [(0, k) for k in range(40)]


def test_pml_flush_after_another_slot_moved_above():
    """Slot 3 (gfn 0, 512 pages) moves from below the buffered slot (gfn 4096) to above it (gfn
    65536): the buffered gfns are still slot 0's offsets 0..39."""
    h = Host([list(range(100)), list(range(500, 540))], [[], [39]], profile="x86-pml", entries=1024,
             base_gfn=4096)
    h.vm.set_user_memory_region(3, LOG_, 0, 512 * PAGE)
    assert h.enter(0) is None and h.enter(1) is None
    assert h.run().vcpu == 1 and h.vcpus[0].pml_count == 40
    h.vm.set_user_memory_region(3, LOG_, 65536 * PAGE, 512 * PAGE)
    assert _kick(h) == [(0, k) for k in range(40)]


# ---- kernel-handled VM exits (host timer ticks): each flushes the PML buffer ----------------
# vmx_handle_exit flushes the buffer at every VM exit, not only at exits to userspace: a
# running vCPU takes host timer ticks, timer and IPI exits all the time. The profile gives
# their interval (kernel_exit_interval_us: 1000 us for x86-pml, ticks at multiples of it).
# Writes every 1999 ns: writes 0..500 come before the tick at 1 ms (write 500 at 999500 ns),
# write 501 after it (1001499 ns); 501 < 512, so no buffer-full flush comes first.

TICK = 1_000_000


def _ticked(entries=4096, profile="x86-pml"):
    h = Host([list(range(600))], profile=profile, entries=entries, slot_pages=2048, write_ns=1999)
    assert h.enter() is None
    return h


def test_x86_pml_profile_takes_a_kernel_exit_every_ms():
    """The shipped profile's tick (CONFIG_HZ=1000) is the TICK the tests below work with."""
    assert load_host_profile("x86-pml").kernel_exit_interval_us * 1000 == TICK


def test_a_kernel_exit_flushes_the_pml_buffer_at_the_tick():
    h = _ticked()
    v = h.vcpus[0]
    assert h.vm.run_until(TICK - 1) == []
    assert (v.ring.dirty_index, v.pml_count) == (0, 501)  # all buffered
    fault_ns = v.stats.fault_ns
    assert h.vm.run_until(TICK + 100) == []  # the tick: flushed, the vCPU stays in the guest
    assert (v.ring.dirty_index, v.pml_count) == (501, 0)
    assert h.ring_offsets() == list(range(501))
    assert v.stats.fault_ns - fault_ns == 501 * h.profile.costs.pml_flush_entry_ns
    assert v.in_guest and v.stats.exits == 0  # no exit to userspace
    assert h.vm.run_until(TICK + 2000) == []
    assert (v.ring.dirty_index, v.pml_count) == (501, 1)  # write 501 waits for the next one


def test_a_kernel_exit_flush_that_makes_the_ring_soft_full_exits_at_the_tick():
    # ring 1024 entries, soft limit 448: the tick's flush of 501 entries crosses it
    h = _ticked(entries=1024)
    v = h.vcpus[0]
    exits = h.vm.run_until(2 * TICK)
    assert [(e.vcpu, e.reason, e.time_ns, e.kind) for e in exits] == [(0, FULL, TICK, "full")]
    assert not v.in_guest and v.ring.used == 501 and v.pml_count == 0
    assert h.version(500) == 1 and h.version(501) == 0  # nothing after the tick ran
    assert v.stats.full_exits == 1
    assert h.harvest() == list(range(501))
    h.reset()
    assert h.enter() is None  # re-entry: the guest goes on with write 501
    assert h.vm.run_until(TICK + 1999 * 2) == []
    assert h.version(501) == 1


def test_without_kernel_exits_the_buffer_waits_for_an_exit_or_a_full_buffer():
    p = load_host_profile("x86-pml").model_copy(update={"kernel_exit_interval_us": 0})
    h = _ticked(profile=p)
    v = h.vcpus[0]
    assert h.vm.run_until(TICK + 100) == []
    assert (v.ring.dirty_index, v.pml_count) == (0, 501)


def test_every_vcpu_a_tick_flush_leaves_soft_full_exits_at_that_tick():
    # two vCPUs, 460 writes each before the tick (460 < 512: no buffer-full flush), then more
    writes = [list(range(600)), list(range(1000, 1600))]
    h = Host(writes, profile="x86-pml", entries=1024, slot_pages=2048, write_ns=2000)
    assert h.enter(0) is None and h.enter(1) is None
    exits = h.vm.run_until(2 * TICK)
    assert [(e.vcpu, e.time_ns, e.kind) for e in exits] == [(0, TICK, "full"), (1, TICK, "full")]
    # write 500 of each vCPU (at 1 ms exactly) comes after the tick's flush: not run
    assert [v.ring.used for v in h.vcpus] == [500, 500]
    assert h.version(499) == 1 and h.version(500) == 0 and h.version(1499) == 1 and h.version(1500) == 0


def test_ticks_with_no_write_between_flush_nothing_and_each_write_waits_for_the_next_tick():
    # a write every 2.5 ms: writes at 0, 2.5, 5 (= a tick: the tick's flush comes first), 7.5 ms
    h = Host([list(range(10))], profile="x86-pml", entries=4096, slot_pages=2048, write_ns=2_500_000)
    v = h.vcpus[0]
    assert h.enter() is None
    seen = []
    for t in (TICK // 2, TICK + 1, 3 * TICK + 1, 5 * TICK + 1, 6 * TICK + 1):
        assert h.vm.run_until(t) == []
        seen.append((v.ring.dirty_index, v.pml_count, v.stats.pml_flushes))
    assert seen == [(0, 1, 0), (1, 0, 1), (2, 0, 2), (2, 1, 2), (3, 0, 3)]


def test_a_tick_flushes_what_came_after_a_full_buffer_flush_in_the_same_window():
    # a write every 1.5 us: write 511 (766.5 us) fills the buffer (512 into the ring), writes
    # 512..666 wait for the tick (666: 999 us), write 667 comes at 1000.5 us
    h = Host([list(range(700))], profile="x86-pml", entries=4096, slot_pages=2048, write_ns=1500)
    v = h.vcpus[0]
    assert h.enter() is None
    assert h.vm.run_until(TICK + 100) == []
    assert (v.ring.dirty_index, v.pml_count, v.stats.pml_flushes) == (667, 0, 2)
    assert h.ring_offsets() == list(range(667))


@pytest.mark.parametrize("until", [TICK + 100, TICK + 1400, 2 * TICK])
def test_the_exit_at_a_tick_does_not_depend_on_how_far_userspace_runs_the_guest(until):
    # ring 1024 (soft 448): 501 buffered at the tick; with no write between the tick and the
    # end of the run (TICK + 100, + 1400: write 501 comes at + 1499) or with one (2 TICK)
    h = _ticked(entries=1024)
    exits = h.vm.run_until(until)
    assert [(e.vcpu, e.time_ns, e.kind) for e in exits] == [(0, TICK, "full")]
    assert h.vm.now == TICK and h.vcpus[0].ring.used == 501


def test_a_tick_comes_before_an_access_no_memslot_maps():
    # write 501 (after the tick) is to a gfn outside the slot: the tick's flush fills the ring
    # first (exit at the tick); the MMIO exit comes after re-entry
    writes = list(range(501)) + [5000] + [501]
    h = Host([writes], profile="x86-pml", entries=1024, slot_pages=2048, write_ns=1999)
    assert h.enter() is None
    exits = h.vm.run_until(2 * TICK)
    assert [(e.time_ns, e.kind) for e in exits] == [(TICK, "full")]
    assert h.harvest() == list(range(501))
    h.reset()
    assert h.enter() is None
    exits = h.vm.run_until(2 * TICK)
    assert [(e.time_ns, e.kind) for e in exits] == [(501 * 1999, "mmio")]


def test_deleting_the_slot_before_the_tick_flushes_the_buffer_at_the_delete():
    """The delete's zap kicks the vCPU (tests/kvm/test_pml_ipis.py): its 501 buffered gfns go
    into the ring while the slot still logs, which leaves it soft-full (soft limit 448): the
    vCPU exits at the delete's time, not at the tick."""
    h = _ticked(entries=1024)
    v = h.vcpus[0]
    assert h.vm.run_until(TICK - 1) == []
    assert v.pml_count == 501
    h.vm.set_user_memory_region(0, 0, 0, 0)
    assert (v.ring.dirty_index, v.pml_count, v.stats.pml_flushes) == (501, 0, 1)
    exits = h.vm.run_until(2 * TICK)
    assert [(e.time_ns, e.kind) for e in exits] == [(TICK - 1, "full")]


def test_an_access_no_memslot_maps_before_the_tick_exits_first():
    # write 501 (976950 ns, before the tick) has no slot: the MMIO exit comes first, its flush
    # fills the ring, and the soft-full request makes the vCPU exit again at re-entry
    writes = list(range(501)) + [5000] + [501]
    h = Host([writes], profile="x86-pml", entries=1024, slot_pages=2048, write_ns=1950)
    assert h.enter() is None
    exits = h.vm.run_until(2 * TICK)
    assert [(e.time_ns, e.kind) for e in exits] == [(501 * 1950, "mmio")]
    assert h.vcpus[0].ring.used == 501
    e = h.enter()
    assert e is not None and e.kind == "full"


def test_the_log_full_exit_belongs_to_the_vcpu_whose_write_found_its_buffer_full():
    """Two vCPUs writing at the same pace (one write each every 5 ns, vCPU 0 first at each
    instant), ring 1024 (soft 448): each vCPU's 513th write finds its buffer full; the flush
    makes its ring soft-full and that vCPU exits at that write's time, the write not done. The
    walk's last consumed access before vCPU 0's exit is vCPU 1's 512th write: the exit is still
    vCPU 0's, then vCPU 1's at the same instant."""
    h = Host([list(range(600)), list(range(1000, 1600))], profile="x86-pml", entries=1024, slot_pages=2048)
    assert h.enter(0) is None and h.enter(1) is None
    exits = h.vm.run_until(5 * 600)
    exits += h.vm.run_until(5 * 600)  # (the walk stops at the first exit)
    assert [(e.vcpu, e.kind, e.time_ns) for e in exits] == [(0, "full", 5 * 512), (1, "full", 5 * 512)]
    for i, base in ((0, 0), (1, 1000)):
        v = h.vcpus[i]
        assert v.ring.used == 512 and v.pml_count == 0
        assert h.version(base + 511) == 1 and h.version(base + 512) == 0
        assert h.harvest(i) == list(range(base, base + 512))
