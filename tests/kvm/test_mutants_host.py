"""Tests from a mutation run over the simulated host's write path (kvm/fault.py walk_writes,
apply_batch, apply_window), its re-protect and stage-2 helpers (kvm/memory.py), the PML buffers
(kvm/pml.py) and the ioctls that consume them (kvm/vm.py): each kills a mutant the suite let
survive, named in its docstring. Expected values are worked by hand from
docs/reference/kvm-dirty-ring.md (section numbers s2..s12) and the profiles' costs."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from ringenv.config import load_host_profile
from ringenv.guest.base import EXIT_NONE, EXIT_SYNC, GuestProgram, WriteBatch
from ringenv.guest.trace import TraceProgram
from ringenv.kvm import Vm
from ringenv.kvm import uapi as U
from ringenv.kvm.memory import UNMAPPED, WP

from ._helpers import Host
from .test_pml import _buffered, _kick
from .test_window_walk import SLOT_BASE, SLOT_PAGES, Scripted, _vm

FULL = U.KVM_EXIT_DIRTY_RING_FULL
LOG_ = U.KVM_MEM_LOG_DIRTY_PAGES
TICK = 1_000_000  # x86-pml: kernel_exit_interval_us 1000 (CONFIG_HZ=1000)


def _pml_vm(entries, pages, mapped_fraction=1.0, block_fraction=0.0, profile="x86-pml"):
    vm = Vm(profile)
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, entries * 16)
    vm.set_user_memory_region(0, LOG_, 0, pages * vm.page_size, mapped_fraction=mapped_fraction,
                              block_fraction=block_fraction)
    return vm


# ------------------------------------- x86 PML: the walk's buffer flushes, soft-full exits and costs
def test_an_ept_violation_flushes_the_buffer_before_its_push_and_the_exit_comes_at_the_soft_limit():
    """s7 + s12: the EPT violation of a write to a page not mapped yet is a VM exit, which
    flushes the vCPU's PML buffer into the ring (vmx_handle_exit) before the fault pushes the
    page itself; a push that reaches the soft limit makes the vCPU exit before the store
    retires (s4).

    x86-pml, ring 1024 (soft 448), slot of 2048 pages of which two 512-page chunks are mapped.
    447 writes to mapped pages sit in the buffer (447 < 512: no log-full exit); the next write,
    to an unmapped page, exits: flush 447 + its own push = 448 >= 448 -> KVM_EXIT_DIRTY_RING_FULL
    at that write's time, 448 entries (the 447 pages, then the unmapped one), the store not
    retired. Mutant killed: the walk's EPT path not counting the flushed buffer into the ring
    (fault.py, ``used[v] += pml_count[v]; pml_count[v] = 0`` dropped): the vCPU ran on."""
    vm = _pml_vm(1024, 2048, mapped_fraction=0.5)
    unmapped = (vm.state & UNMAPPED) != 0
    mapped_pages = np.flatnonzero(~unmapped)[:447].tolist()
    fresh = int(np.flatnonzero(unmapped)[0])
    assert len(mapped_pages) == 447
    v = vm.create_vcpu(0)
    writes = mapped_pages + [fresh] + mapped_pages[:1] + [fresh + 1]
    vm.attach_guest(TraceProgram([writes], [[]], write_ns=5, fault_ns=0))
    assert v.run() is None
    exits = vm.run_until(1 << 40)
    assert [(e.kind, e.time_ns) for e in exits] == [("full", 5 * 447)]
    assert v.ring.used == 448 and v.pml_count == 0
    assert v.ring.gfns["offset"][:448].astype(int).tolist() == mapped_pages + [fresh]
    assert int(vm.version[fresh]) == 0 and int(vm.version[mapped_pages[-1]]) == 1


def test_the_log_full_flush_that_reaches_exactly_the_soft_limit_exits():
    """s4 (soft-full is used >= soft_limit) + s7 (the log-full exit flushes 512 at once).

    x86-pml, ring 2048 (soft 2048 - 576 = 1472), 2000 distinct writes, a sync after write 959:
    write 512 finds the buffer full -> flush 512 (ring 512 < 1472); writes 512..959 buffered,
    the sync exit flushes them -> 960. Re-entry: writes 960..1471 fill the buffer; write 1472
    finds it full -> flush -> 1472 = soft limit: KVM_EXIT_DIRTY_RING_FULL at write 1472's time
    (5 ns each from the re-entry at 5 x 960), the write not done. Mutant killed: the walk's
    log-full soft-full check ``used >= limit`` made ``>`` (the vCPU ran on to its end)."""
    h = Host([list(range(2000))], [[959]], profile="x86-pml", entries=2048, slot_pages=2048)
    v = h.vcpus[0]
    assert v.ring.soft_limit == 1472
    e = h.enter_and_run()
    assert e.kind == "sync" and v.ring.used == 960
    assert h.enter() is None
    e = h.run()
    assert (e.kind, e.reason, e.time_ns) == ("full", FULL, 5 * 1472)
    assert v.ring.used == 1472 and v.pml_count == 0
    assert h.version(1471) == 1 and h.version(1472) == 0


def test_a_log_full_exit_that_leaves_the_ring_soft_full_costs_the_exit_the_flush_and_the_logged_writes():
    """s7 + the x86-pml profile's costs (dirty_write_ns 5 per logged write, pml_flush_entry_ns
    5 per entry flushed, pml_full_exit_ns 1500 per PML log-full VM exit). Ring 1024 (soft
    448), distinct writes: writes 0..511 are logged (512 x 5 = 2560); write 512 finds the
    buffer full: the log-full VM exit (1500) flushes 512 entries (512 x 5 = 2560), the ring is
    soft-full and the vCPU exits to userspace before write 512 is done. The vCPU's kernel time
    is 2560 + 1500 + 2560 = 6620 ns. Mutant killed: _after_batch not charging the log-full exit
    of a CUT_PML_FULL (the vCPU was charged 5120)."""
    h = Host([list(range(600))], profile="x86-pml", entries=1024, slot_pages=2048)
    c = h.profile.costs
    assert (c.dirty_write_ns, c.pml_flush_entry_ns, c.pml_full_exit_ns) == (5, 5.0, 1500)
    e = h.enter_and_run()
    assert (e.kind, e.time_ns) == ("full", 5 * 512)
    v = h.vcpus[0]
    assert (v.stats.faults, v.stats.pml_flushes, v.ring.used) == (512, 1, 512)
    assert v.stats.fault_ns == 6620


def test_a_tick_flush_that_reaches_exactly_the_soft_limit_exits_at_the_tick():
    """s4 (soft-full: used >= soft_limit) + s12 (the CPU flushes the PML buffer at every VM
    exit, the kernel-handled ones of a host tick too). x86-pml, ring 1024 (soft 448), a write
    every 2235 ns: writes 0..447 come before the 1 ms tick (447 x 2235 = 999045 ns), write 448
    after it (1001280 ns); 448 < 512, so no log-full exit comes first. The tick's flush puts
    448 entries in the ring, exactly the soft limit: the vCPU exits with
    KVM_EXIT_DIRTY_RING_FULL at the tick, write 448 not run. Mutant killed: the tick flush's
    soft-full test ``used >= limit`` made ``>`` (the vCPU stayed in the guest)."""
    h = Host([list(range(600))], profile="x86-pml", entries=1024, slot_pages=2048, write_ns=2235)
    v = h.vcpus[0]
    assert h.enter() is None
    exits = h.vm.run_until(2 * TICK)
    assert [(e.vcpu, e.time_ns, e.kind) for e in exits] == [(0, TICK, "full")]
    assert v.ring.used == 448 and v.pml_count == 0
    assert h.version(447) == 1 and h.version(448) == 0


def test_a_tick_with_an_empty_pml_buffer_is_no_flush():
    """s12 + kvm/pml.py flush_all ("for every vCPU v with mask[v] and a buffer that is not
    empty"; vmx_flush_pml_buffer does nothing for an empty buffer). x86-pml, ring 4096, writes
    10 ms apart: the write at 0 is flushed at the 1 ms tick (one flush); the host ticks again
    at 2, 3, ... 9 ms with the buffer empty: still one flush, no entry and no kernel time
    more. Mutant killed: flush_all flushing every running vCPU's buffer, empty or not (each
    tick counted a flush)."""
    h = Host([[0, 1]], profile="x86-pml", entries=4096, slot_pages=2048, write_ns=10 * TICK, fault_ns=0)
    v = h.vcpus[0]
    assert h.enter() is None
    assert h.vm.run_until(TICK + 1) == []
    assert (v.ring.dirty_index, v.pml_count, v.stats.pml_flushes) == (1, 0, 1)
    ns = v.stats.fault_ns
    assert h.vm.run_until(9 * TICK + 1) == []
    assert (v.ring.dirty_index, v.pml_count, v.stats.pml_flushes, v.stats.fault_ns) == (1, 0, 1, ns)


def test_a_pml_flush_into_a_read_only_slot_without_logging_pushes_nothing():
    """s12: vmx_flush_pml_buffer hands each logged gfn to kvm_vcpu_mark_page_dirty, which looks
    it up in the memslots current at the flush; mark_page_dirty_in_slot logs nothing for a slot
    without KVM_MEM_LOG_DIRTY_PAGES (kvm_slot_dirty_track_enabled), a KVM_MEM_READONLY one
    included. vCPU 0 holds gfns 0..39 of logging slot 0 in its PML buffer: deleting slot 0
    kicks it first (the zap's IPI, tests/kvm/test_pml_ipis.py), so they are (0, 0..39). The
    simulator's buffer is then filled by hand with gfns 0..39 again (no guest write can put
    them there: any memslot change that removes their slot kicks the vCPU first) once a
    read-only slot 1 without logging maps them: the kick's flush finds slot 1, which does not
    log, and pushes nothing (the flush is still counted).
    Mutant killed: Vm._mode giving a read-only slot without logging only READONLY, not
    UNTRACKED (the flush pushed (1, 0..39))."""
    h = _buffered()
    h.vm.set_user_memory_region(0, 0, 0, 0)
    assert h.harvest_entries(0) == [(0, k) for k in range(40)]
    h.vm.set_user_memory_region(1, U.KVM_MEM_READONLY, 0, 512 * 4096)
    v = h.vcpus[0]
    v.pml[:40] = np.arange(40)
    v.pml_count = 40
    assert _kick(h) == []
    assert (v.stats.pushes, v.stats.pml_flushes) == (40, 2)


def test_a_what_if_block_mapped_by_an_ept_violation_is_pushed_directly_not_buffered():
    """The what-if profile without splitting (s7: a write to a block logs every page of it) on
    x86 with PML: a write to a block not mapped yet is an EPT violation (fault.py docstring: a
    write to a page not mapped yet is a fault that pushes the page itself, directly); the fault
    maps the whole block and logs its 512 pages, pushed into the ring at once, none of them
    through the PML buffer (which stays empty, with no flush). Ring 4096 (soft 3520): no exit.
    Mutant killed: the block's pushes left as PML-logged writes (``push_v = v`` instead of
    ``-1 - v`` in the pushall loop): they sat in the buffer, the ring empty."""
    prof = load_host_profile("x86-pml").model_copy(update={"split_blocks": False})
    vm = _pml_vm(4096, 2048, mapped_fraction=0.0, block_fraction=1.0, profile=prof)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[3, 600]], [[]], write_ns=5, fault_ns=0))
    assert v.run() is None
    assert vm.run_until(5) == []
    assert (v.ring.dirty_index, v.pml_count, v.stats.pml_flushes, v.stats.faults) == (512, 0, 0, 1)
    assert v.ring.gfns["offset"][:512].astype(int).tolist() == list(range(512))


def test_a_what_if_block_that_overflows_the_pml_buffer_into_a_soft_full_ring_retires_and_exits():
    """The what-if profile without splitting (s7: a write to a block logs all its 512 pages) on
    x86 with PML, ring 1024 (soft 448), half of the slot's 512-page blocks huge pages. A write to
    a small page logs 1 gfn into the buffer; the next write, to a huge block, logs 512 more:
    the buffer overflows (1 + 512 > 512), its 512 entries go into the ring (512 >= 448,
    soft-full) and the vCPU exits with KVM_EXIT_DIRTY_RING_FULL at that write's time; the
    block's write is logged whole, so it has retired (fault.py: "the what-if block's log
    overflowed the buffer into a soft-full ring: it retired"): its page's version is 1 and it is
    not re-executed after re-entry. The exit flushes the rest: 513 entries, the small page, then
    the block's pages in order. Mutant killed: the walk's overflow check (``late``) dropped: the
    vCPU ran on past the block."""
    prof = load_host_profile("x86-pml").model_copy(update={"split_blocks": False})
    vm = _pml_vm(1024, 2048, block_fraction=0.5, profile=prof)
    huge = np.flatnonzero(vm.block_map[:4] == 1).tolist()
    small = [b for b in range(4) if b not in huge]
    assert len(huge) == 2 and len(small) == 2
    p, b0 = small[0] * 512, huge[0] * 512
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[p, b0 + 3, p + 1]], [[]], write_ns=5, fault_ns=0))
    assert v.run() is None
    exits = vm.run_until(1 << 40)
    assert [(e.kind, e.time_ns) for e in exits] == [("full", 5)]
    assert v.ring.used == 513 and v.pml_count == 0
    assert v.ring.gfns["offset"][:513].astype(int).tolist() == [p] + list(range(b0, b0 + 512))
    assert int(vm.version[b0 + 3]) == 1 and int(vm.version[p + 1]) == 0
    v.ring.gfns["flags"][:513] |= U.KVM_DIRTY_GFN_F_RESET
    assert vm.reset_dirty_rings() == 513
    assert v.run() is None
    assert [e.kind for e in vm.run_until(1 << 40)] == ["done"]
    assert int(vm.version[b0 + 3]) == 1 and int(vm.version[p + 1]) == 1
    assert v.ring.used == 1 and int(v.ring.gfns["offset"][513]) == p + 1


def test_the_sync_after_a_retired_what_if_block_write_comes_at_reentry():
    """The scenario of the test above (a what-if block's write overflowing the PML buffer into
    a soft-full ring) with a sync point right after the block's write: that write retired before the
    KVM_EXIT_DIRTY_RING_FULL, so the guest's MMIO sync that follows it is still due; it comes
    first thing after re-entry (KVM_RUN returns it at once), without the write running again
    (s4: only a store that has not retired re-executes), then the guest goes on to its end.
    Mutant killed: _after_batch dropping the exit code of an access that retired at a full
    exit (``v.pending_code = cut_code`` for a retired CUT_FULL): the sync was lost."""
    prof = load_host_profile("x86-pml").model_copy(update={"split_blocks": False})
    vm = _pml_vm(1024, 2048, block_fraction=0.5, profile=prof)
    huge = np.flatnonzero(vm.block_map[:4] == 1).tolist()
    p = [b for b in range(4) if b not in huge][0] * 512
    b0 = huge[0] * 512
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[p, b0 + 3, p + 1]], [[1]], write_ns=5, fault_ns=0))
    assert v.run() is None
    assert [(e.kind, e.time_ns) for e in vm.run_until(1 << 40)] == [("full", 5)]
    v.ring.gfns["flags"][:513] |= U.KVM_DIRTY_GFN_F_RESET
    assert vm.reset_dirty_rings() == 513
    e = v.run()
    assert e is not None and (e.kind, e.reason) == ("sync", U.KVM_EXIT_MMIO)
    assert int(vm.version[b0 + 3]) == 1 and v.ring.used == 0
    assert v.run() is None
    assert [e.kind for e in vm.run_until(1 << 40)] == ["done"]
    assert int(vm.version[b0 + 3]) == 1 and int(vm.version[p + 1]) == 1


# ----------- the walk's bookkeeping: soft-full requests, the guest's counts, the window's slot check
class _Spy(TraceProgram):
    """A trace that records what the host tells it at each ``consumed``: (events, written)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seen = []

    def consumed(self, n, t_cut, faults_per_vcpu, retried, written):
        self.seen.append((n, written))
        super().consumed(n, t_cut, faults_per_vcpu, retried, written)


def test_the_guest_is_told_how_many_consumed_writes_found_their_page_clean():
    """GuestProgram.consumed: ``written`` "counts the consumed writes that found their page
    clean" (written since it was last write-protected: the real first writes a workload model
    learns its efficiency from). arm64-4k, writes 5, 5, 6, 5 with a sync after the third:
    the first batch consumes 3 writes of which 2 found their page clean (the second write to 5
    did not). After harvest + reset (5 and 6 re-protected, clean again) the fourth write, to 5,
    is a clean page's: written 1. Mutant killed: ``ndirty += 1`` dropped from the walk."""
    vm = Vm("arm64-4k")
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 256 * 16)
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
    vm.set_user_memory_region(0, LOG_, 0, 1024 * vm.page_size)
    v = vm.create_vcpu(0)
    g = _Spy([[5, 5, 6, 5]], [[2]], write_ns=5, fault_ns=0)
    vm.attach_guest(g)
    assert v.run() is None
    assert [e.kind for e in vm.run_until(1 << 40)] == ["sync"]
    assert g.seen == [(3, 2)]
    v.ring.gfns["flags"][:2] |= U.KVM_DIRTY_GFN_F_RESET
    assert vm.reset_dirty_rings() == 2
    assert v.run() is None
    assert [e.kind for e in vm.run_until(1 << 40)] == ["done"]
    assert g.seen[1:] == [(2, 1)]


def test_a_vcpu_that_pushed_nothing_gets_no_soft_full_request_from_another_vcpus_pushes():
    """s3 + s4: the SOFT_FULL request is raised by a push into the vCPU's own ring (the push
    that leaves it soft-full); a vCPU that pushes nothing gets no request, whatever its ring's
    counters say. Here vCPU 1's ring reads as soft-full by u32 arithmetic without any push: it
    exited at a sync with one entry; userspace marked that entry and, wrongly, the stale entry
    after it RESET, and KVM_RESET_DIRTY_RINGS followed the flag past dirty_index (s6: "while
    the entry has RESET set"): reset 2, used = 1 - 2 = 0xFFFFFFFF as a u32. With no request
    pending vCPU 1 re-enters. While it only reads (no fault, no push) and exits at its next
    sync, vCPU 0 pushes in the same batch. vCPU 1 still has no request: its next KVM_RUN enters
    the guest. Mutant killed: apply_batch raising the request for every vCPU whose ring is
    soft-full after the batch (``pushed and`` dropped): vCPU 1 got KVM_EXIT_DIRTY_RING_FULL."""
    vm = Vm("arm64-4k")
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 256 * 16)
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
    vm.set_user_memory_region(0, LOG_, 0, 1024 * vm.page_size)
    v0, v1 = vm.create_vcpu(0), vm.create_vcpu(1)
    vm.attach_guest(TraceProgram([list(range(300, 310)), [100, 200]], [[], [0, 1]], reads=[[], [1]],
                                 write_ns=5, fault_ns=0))
    assert v1.run() is None
    assert [(e.vcpu, e.kind) for e in vm.run_until(1 << 40)] == [(1, "sync")]
    assert v1.ring.used == 1
    v1.ring.gfns["flags"][:2] |= U.KVM_DIRTY_GFN_F_RESET
    assert vm.reset_dirty_rings() == 2
    assert v1.ring.used == 0xFFFFFFFF and not v1.request_soft_full
    assert v0.run() is None and v1.run() is None
    exits = vm.run_until(1 << 40)
    assert [(e.vcpu, e.kind) for e in exits] == [(1, "sync")]
    assert v0.ring.dirty_index > 0  # vCPU 0 pushed in that batch
    assert not v1.request_soft_full
    assert v1.run() is None and v1.in_guest


def test_a_window_write_to_the_first_gfn_past_the_slot_is_an_mmio_exit():
    """s12: an access to a gfn no memslot maps exits as KVM_EXIT_MMIO when the walk reaches it.
    The slot covers gfns [4096, 4096 + 2048): gfn 6144, its end, is outside it. A workload
    window (candidate first writes, walked by apply_window) of writes to 4100, 6144, 4101:
    the first is applied, the second exits "mmio" at its time (the third never runs). The
    general walk agrees. Mutant killed: apply_window's slot check ``x >= gfn_hi`` made
    ``x > gfn_hi`` (gfn 6144 was walked as page 2048 of a 2048-page slot)."""
    for general in (False, True):
        t = np.array([10, 20, 30], dtype=np.int64)
        vc = np.zeros(3, dtype=np.int32)
        gfn = np.array([SLOT_BASE + 4, SLOT_BASE + SLOT_PAGES, SLOT_BASE + 5], dtype=np.int64)
        guest = Scripted(t, vc, gfn, None, general=general)
        vm, vcpus = _vm(guest)
        exits = vm.run_until(20_000)
        assert [(e.vcpu, e.reason, e.time_ns, e.kind) for e in exits] == [(0, U.KVM_EXIT_MMIO, 20, "mmio")], general
        s = vm.slots[0]
        assert int(s.version[4]) == 1 and int(s.version[5]) == 0
        assert guest.consumed_calls[-1][:2] == (2, 20)


def test_the_exit_code_of_a_first_touch_write_the_host_skips_still_exits():
    """WriteBatch.first_touch: "a write to a page that is not clean is invisible to KVM and the
    host skips it"; the guest's exit code attached to that access (its MMIO sync after it) is
    the guest's own doing and still happens. arm64-4k, a batch of candidate first writes to 5
    (t 10), 5 with a sync after it (t 20), 6 (t 30): the first faults and pushes 5; the second
    finds 5 written (not clean) and is skipped, but the vCPU exits "sync" at t 20, the write to
    6 not run. Mutant killed: the walk's first-touch skip dropping the access's exit code."""
    class OneBatch(GuestProgram):
        nr_vcpus = 1

        def __init__(self):
            self.batch = WriteBatch(np.array([10, 20, 30], dtype=np.int64), np.zeros(3, dtype=np.int32),
                                    np.array([5, 5, 6], dtype=np.int64),
                                    np.array([EXIT_NONE, EXIT_SYNC, EXIT_NONE], dtype=np.int8), 31, first_touch=True)

        def next_writes(self, now, until, running):
            b, self.batch = self.batch, None
            return b if b is not None else WriteBatch.empty(until)

        def consumed(self, n, t_cut, faults_per_vcpu, retried, written):
            pass

    vm = Vm("arm64-4k")
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 256 * 16)
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
    vm.set_user_memory_region(0, LOG_, 0, 1024 * vm.page_size)
    v = vm.create_vcpu(0)
    vm.attach_guest(OneBatch())
    assert v.run() is None
    exits = vm.run_until(1000)
    assert [(e.kind, e.time_ns) for e in exits] == [("sync", 20)]
    assert v.ring.used == 1 and int(vm.version[5]) == 1 and int(vm.version[6]) == 0


# ---------------------------------------------------------------- re-protect (memory.protect_masked)
def test_a_clear_with_initially_set_splits_no_block_of_memory_not_mapped_yet():
    """s7 + s12: with manual protect, INITIALLY_SET and an eager split chunk, each
    kvm_arch_mmu_enable_log_dirty_pt_masked call splits the block mappings of its span
    (kvm_mmu_split_huge_pages walks stage 2). Memory the guest never touched has no stage-2
    mapping at all, so there is nothing to split (memory.py: a block of memory not mapped yet
    "stands for the huge page behind it"). arm64-4k, bitmap mode, a logging slot of 1024 pages
    backed by huge pages, nothing mapped (mapped_fraction 0): CLEAR_DIRTY_LOG of pages 0..63
    splits nothing (stats.splits 0), block 0 still stands for a huge page, and the ioctl costs
    exactly what it costs on the same VM without the eager split chunk (no split time).
    Mutant killed: protect_masked's split of the span without the ``UNMAPPED`` test (it
    counted, and charged, a split of block 0)."""
    ns = []
    for eager in (2 << 20, 0):
        vm = Vm("arm64-4k")
        vm.enable_cap(U.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                      U.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | U.KVM_DIRTY_LOG_INITIALLY_SET)
        vm.enable_cap(U.KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE, eager)
        vm.set_user_memory_region(0, LOG_, 0, 1024 * 4096, block_fraction=1.0, mapped_fraction=0.0)
        vm.create_vcpu(0)
        assert (vm.state & UNMAPPED).all() and vm.stats.splits == 0
        vm.clear_dirty_log(0, 0, 64, np.array([~np.uint64(0)], dtype=np.uint64))
        assert vm.stats.splits == 0
        assert int(vm.block_map[0]) == 1
        ns.append(vm.last_ioctl_ns)
    assert ns[0] == ns[1]


# -------------------------------------------------------------------------------- the ioctls (vm.py)
def test_get_dirty_log_reprotects_the_dirty_pages_of_every_word_of_the_bitmap():
    """s8: without manual protect, KVM_GET_DIRTY_LOG copies the bitmap, clears it and
    re-protects the dirty pages (kvm_arch_mmu_enable_log_dirty_pt_masked per u64 word, at
    offset 64 x word), so their next writes fault and are logged again. arm64-4k with the dirty
    bitmap (no ring), a logging slot of 1024 pages: writes to 70 (word 1, bit 6) and 130 (word
    2, bit 2), a sync, GET -> bits 70 and 130, and pages 70 and 130 are write-protected again.
    The guest writes 70 and 130 again: both fault, the second GET returns them again.
    Mutant killed: GET's re-protect calls at offset ``word`` instead of ``64 x word``."""
    vm = Vm("arm64-4k")
    vm.set_user_memory_region(0, LOG_, 0, 1024 * vm.page_size)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[70, 130, 70, 130]], [[1]], write_ns=5, fault_ns=0))
    assert v.run() is None
    assert [e.kind for e in vm.run_until(1 << 40)] == ["sync"]
    assert v.stats.faults == 2
    assert not vm.state[70] & WP and not vm.state[130] & WP
    bm = vm.get_dirty_log(0)
    assert bm[:3].tolist() == [0, 1 << 6, 1 << 2] and not bm[3:].any()
    assert vm.state[70] & WP and vm.state[130] & WP
    assert not vm.get_dirty_log(0).any()  # cleared by the first GET
    assert v.run() is None
    assert [e.kind for e in vm.run_until(1 << 40)] == ["done"]
    assert v.stats.faults == 4
    assert vm.get_dirty_log(0)[:3].tolist() == [0, 1 << 6, 1 << 2]


def test_an_x86_memslot_delete_unmaps_a_slot_that_does_not_log_without_write_protecting_it():
    """s12 (a delete zaps; x86 with KVM_X86_QUIRK_SLOT_ZAP_ALL zaps every slot's mappings) and
    the stage-2 model of memory.py ("in a slot with dirty tracking on, a page not mapped yet
    carries WP: the fault that maps it writable logs it"): the zap drops mappings, it does not
    write-protect anything; only a logging slot's zapped pages get WP (and CLEAN), so that their
    next write logs. A slot without LOG_DIRTY_PAGES comes out of the zap exactly like memory the
    guest never touched (but userspace wrote, ``populated``): unmapped, not write-protected, not
    clean, and its writes take no write-protect fault: the first is a translation fault (whose
    shadow-MMU prefetch maps the second's page too), nothing is pushed, the same as on a VM where
    that slot was never mapped. Mutant killed: _zap write-protecting the other slots whether or
    not they log (``t.logging`` dropped)."""
    runs = []
    for delete in (False, True):
        vm = Vm("x86-nopml")
        vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING, 1024 * 16)
        vm.set_user_memory_region(0, LOG_, 0, 1024 * 4096)
        vm.set_user_memory_region(1, 0, 4096 * 4096, 1024 * 4096, mapped_fraction=1.0 if delete else 0.0,
                                  populated=True)
        v = vm.create_vcpu(0)
        vm.attach_guest(TraceProgram([[4100, 4101, 4100]], [[]], write_ns=5, fault_ns=0))
        if delete:
            vm.set_user_memory_region(0, 0, 0, 0)  # KVM_MR_DELETE of slot 0: x86 zaps slot 1 too
        s1 = vm.memslot(1)
        assert (s1.state == UNMAPPED).all()  # unmapped, not write-protected, not clean
        assert v.run() is None
        assert [e.kind for e in vm.run_until(1 << 40)] == ["done"]
        runs.append((v.stats.faults, v.stats.fault_ns, v.ring.dirty_index, s1.version[4:6].tolist()))
    wp_fault_ns = vm.profile.costs.wp_fault_ns
    assert runs[0] == runs[1] == (1, wp_fault_ns, 0, [2, 1])


def test_memslots_that_touch_do_not_overlap():
    """kvm_check_memslot_overlap: the gfn ranges [base, base + npages) of two slots of an
    address space may not intersect; slots that only touch are fine. Slot 0 covers gfns
    1024..2047: a slot at 0..1023 (ending where slot 0 begins) and one at 2048..3071 (beginning
    where it ends) are both created; one at 3071..3072 (its first page is slot 2's last) is
    EEXIST.
    Mutant killed: the overlap test ``s.base_gfn < base + npages`` made ``<=`` (the slot
    below, touching slot 0, was refused)."""
    vm = Vm("arm64-4k")
    P = vm.page_size
    vm.set_user_memory_region(0, 0, 1024 * P, 1024 * P)
    vm.set_user_memory_region(1, 0, 0, 1024 * P)
    vm.set_user_memory_region(2, 0, 2048 * P, 1024 * P)
    assert sorted((s.base_gfn, s.npages) for s in vm.slots) == [(0, 1024), (1024, 1024), (2048, 1024)]
    with pytest.raises(U.KvmError) as e:
        vm.set_user_memory_region(3, 0, 3072 * P - P, 2 * P)
    assert e.value.errno == errno.EEXIST
