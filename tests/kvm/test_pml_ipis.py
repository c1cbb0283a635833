"""x86 PML and the kernel's IPIs (reference s7): vmx_handle_exit flushes the PML buffer at every
VM exit, and the kernel forces running vCPUs out of the guest whenever it asks all of them to do
something: kvm_flush_remote_tlbs (KVM_REQ_TLB_FLUSH: the VM-wide TLB flush after
KVM_RESET_DIRTY_RINGS reset something, after a memslot's pages were write-protected, after a
zap), kvm_mmu_zap_all_fast when a memslot is deleted or moved (KVM_REQ_MMU_FREE_OBSOLETE_ROOTS),
and kvm_arch_memslots_updated, which kicks every vCPU each time new memslots are installed
(any KVM_SET_USER_MEMORY_REGION that changes something; a delete or move first installs the
slot being removed marked invalid: it is still found and still logs). Each IPI is a VM exit of
every vCPU in the guest: its buffer goes into its ring, each gfn looked up in the memslots as
they are then (kvm_vcpu_mark_page_dirty), and a ring it leaves soft-full sends that vCPU out
with KVM_EXIT_DIRTY_RING_FULL before it re-enters (kvm_dirty_ring_check_request in
vcpu_enter_guest): at the IPI, whatever userspace does before it learns of the exit. A vCPU out
of the guest gets no IPI (its buffer was flushed at its exit).

The guest writes one store every 5 ns (TraceProgram, fault cost 0).
"""

from __future__ import annotations

from ringenv.guest.trace import TraceProgram
from ringenv.kvm import Vm
from ringenv.kvm import uapi as U

from ._helpers import FOREVER, Host

FULL = U.KVM_EXIT_DIRTY_RING_FULL
LOG_ = U.KVM_MEM_LOG_DIRTY_PAGES
PAGE = 4096


def _buffered():
    """vCPU 0 writes pages 0..99 of the slot, vCPU 1 pages 500..539 with a sync after the last;
    returns the host when vCPU 1 has exited (its 40 entries harvested), vCPU 0 in the guest with
    gfns 0..39 in its buffer."""
    h = Host([list(range(100)), list(range(500, 540))], [[], [39]], profile="x86-pml", entries=1024,
             slot_pages=2048)
    assert h.enter(0) is None and h.enter(1) is None
    e = h.run()
    assert (e.vcpu, e.kind) == (1, "sync")
    assert h.harvest_entries(1) == [(0, k) for k in range(500, 540)]
    assert h.vcpus[0].pml_count == 40
    return h


def test_a_reset_that_resets_entries_flushes_the_running_vcpus_buffers():
    """KVM_RESET_DIRTY_RINGS reset vCPU 1's 40 entries: its TLB flush's IPI is a VM exit of
    vCPU 0, in the guest with 40 gfns buffered: they go into its ring (0, 0..39), the flush
    paid per entry."""
    h = _buffered()
    v = h.vcpus[0]
    assert v.pml_count == 40 and v.ring.used == 0
    ns, flushes = v.stats.fault_ns, v.stats.pml_flushes
    assert h.reset() == 40
    assert v.pml_count == 0 and v.ring.used == 40
    assert v.stats.pml_flushes == flushes + 1
    assert v.stats.fault_ns == ns + 40 * h.profile.costs.pml_flush_entry_ns
    assert h.harvest_entries(0) == [(0, k) for k in range(40)]
    # vCPU 0 goes on writing where it was (below the soft limit: no exit)
    assert h.vm.run_until(5 * 50) == []  # (writes 40..49)
    assert v.pml_count == 10 and v.ring.used == 40


def test_a_reset_that_resets_nothing_sends_no_ipi():
    """Nothing harvested: the reset resets no entry, flushes no TLB, and vCPU 0 keeps its
    buffer."""
    h = Host([list(range(100)), list(range(500, 540))], [[], [39]], profile="x86-pml", entries=1024, slot_pages=2048)
    assert h.enter(0) is None and h.enter(1) is None
    assert h.run().vcpu == 1
    tlb = h.vm.stats.tlb_flushes
    assert h.reset() == 0
    assert h.vm.stats.tlb_flushes == tlb
    assert h.vcpus[0].pml_count == 40 and h.vcpus[0].ring.used == 0


def test_a_vcpu_out_of_the_guest_gets_no_ipi():
    """vCPU 1 is out (its buffer flushed at its exit); the reset's IPI flushes vCPU 0 only."""
    h = _buffered()
    f1 = h.vcpus[1].stats.pml_flushes
    h.reset()
    assert h.vcpus[1].stats.pml_flushes == f1 and h.vcpus[0].stats.pml_flushes == 1


def test_an_ipi_flush_that_leaves_the_ring_soft_full_sends_the_vcpu_out_at_once():
    """Ring 1024 (soft limit 448). vCPU 0 has logged 470 gfns (under 512: no log-full exit)
    when vCPU 1 starts and syncs after 10 writes (vCPU 0 is at ~480 then). The reset of
    vCPU 1's entries kicks vCPU 0: its flush leaves its ring soft-full, so it exits with
    KVM_EXIT_DIRTY_RING_FULL at the reset's time, before any further write; KVM_RUN exits
    again while the ring is soft-full, and after harvest + reset the guest goes on."""
    h = Host([list(range(1000)), list(range(1500, 1510))], [[], [9]], profile="x86-pml", entries=1024,
             slot_pages=2048)
    v = h.vcpus[0]
    assert h.enter(0) is None
    assert h.vm.run_until(5 * 470) == []
    assert h.enter(1) is None
    e = h.run()
    assert (e.vcpu, e.kind) == (1, "sync")
    buffered = v.pml_count
    assert 448 <= buffered < 512
    h.harvest(1)
    assert h.reset() == 10
    assert v.ring.used == buffered and v.ring.soft_full() and not v.in_guest  # out at the IPI
    now = h.vm.now
    written = [h.version(k) for k in range(buffered, buffered + 3)]
    exits = h.vm.run_until(now + 1000)
    assert [(x.vcpu, x.reason, x.time_ns) for x in exits] == [(0, FULL, now)]
    assert [h.version(k) for k in range(buffered, buffered + 3)] == written  # nothing more written
    assert v.stats.full_exits == 1
    e = h.enter(0)
    assert e is not None and e.reason == FULL  # still soft-full: out again at once
    assert h.harvest(0) == list(range(buffered))
    h.reset()
    assert h.enter(0) is None
    assert h.vm.run_until(h.vm.now + 5 * 20) == []
    assert v.pml_count > 0 and v.ring.used == 0


def test_deleting_the_buffered_slot_flushes_its_gfns_while_it_still_logs():
    """The delete's zap kicks vCPU 0 while the slot being deleted is installed (invalid, still
    logging): its 40 buffered gfns go into the ring as (0, 0..39). A later reset of them and of
    vCPU 1's 40 skips their re-protect (no slot 0), and vCPU 0's next write, to a gfn no slot maps, exits as MMIO."""
    h = _buffered()
    v = h.vcpus[0]
    h.vm.set_user_memory_region(0, 0, 0, 0)
    assert v.pml_count == 0 and v.stats.pml_flushes == 1
    assert h.harvest_entries(0) == [(0, k) for k in range(40)]
    assert h.reset() == 80
    assert h.vm.stats.reprotect_calls == 0
    exits = h.vm.run_until(h.vm.now + FOREVER)
    assert [(x.vcpu, x.kind) for x in exits] == [(0, "mmio")]


def test_moving_the_buffered_slot_flushes_its_gfns_at_their_old_place():
    """Slot 0 moves to gfn 8192 and a logging slot 1 is created at gfn 16: the move's zap kicks
    vCPU 0 first, so its gfns 0..39 are slot 0's offsets 0..39 (not slot 1's, nor dropped)."""
    h = _buffered()
    h.vm.set_user_memory_region(0, LOG_, 8192 * PAGE, 2048 * PAGE)
    h.vm.set_user_memory_region(1, LOG_, 16 * PAGE, 512 * PAGE)
    assert h.harvest_entries(0) == [(0, k) for k in range(40)]


def test_turning_logging_off_kicks_the_vcpus_and_their_gfns_push_nothing():
    """One slot, no huge pages (nothing to map huge again, no TLB flush): turning its logging
    off installs new memslots, which kicks vCPU 0 after the change; its flush finds the slot
    not logging: nothing pushed, the buffer empty, its time paid."""
    h = _buffered()
    v = h.vcpus[0]
    tlb = h.vm.stats.tlb_flushes
    ns = v.stats.fault_ns
    h.vm.set_user_memory_region(0, 0, 0, 2048 * PAGE)
    assert h.vm.stats.tlb_flushes == tlb
    assert v.pml_count == 0 and v.ring.used == 0 and v.stats.pml_flushes == 1
    assert v.stats.fault_ns == ns + 40 * h.profile.costs.pml_flush_entry_ns


def _two_slots():
    """Slot 0 (gfn 0, 1024 pages) and slot 1 (gfn 4096, 4096 pages), both logging, ring 1024
    (soft limit 448). vCPU 0 writes 200 pages of slot 0, then 2000 of slot 1; vCPU 1 writes 200
    pages of slot 1 and syncs. Returns the VM when vCPU 1 has exited, vCPU 0 holding the 200
    gfns of slot 0 in its buffer."""
    vm = Vm("x86-pml")
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 1024 * 16)
    vm.set_user_memory_region(0, LOG_, 0, 1024 * PAGE)
    vm.set_user_memory_region(1, LOG_, 4096 * PAGE, 4096 * PAGE)
    v0, v1 = vm.create_vcpu(0), vm.create_vcpu(1)
    vm.attach_guest(TraceProgram([list(range(200)) + list(range(4096, 6096)), list(range(6500, 6700))],
                                 [[], [199]], write_ns=5, fault_ns=0))
    v0.run()
    v1.run()
    exits = vm.run_until(FOREVER)
    assert [(e.vcpu, e.kind) for e in exits] == [(1, "sync")] and v0.pml_count == 200
    return vm


def test_a_slot_that_stops_logging_while_another_logs_kicks_too():
    """Slot 0 stops logging while slot 1 still logs, with nothing mapped huge (no TLB flush):
    the new memslots' kick still flushes vCPU 0's 200 gfns of slot 0, which push nothing. Its
    writes to slot 1 then fill the buffer (512) and the 513th raises the log-full exit: ring
    512, soft-full, out."""
    vm = _two_slots()
    v0 = vm.vcpus[0]
    tlb = vm.stats.tlb_flushes
    vm.set_user_memory_region(0, 0, 0, 1024 * PAGE)
    assert vm.stats.tlb_flushes == tlb
    assert (v0.pml_count, v0.ring.used, v0.stats.pml_flushes) == (0, 0, 1)
    exits = vm.run_until(FOREVER)
    assert [(e.vcpu, e.reason) for e in exits] == [(0, FULL)]
    assert v0.ring.used == 512 and v0.stats.pml_flushes == 2


def test_creating_a_slot_kicks_the_running_vcpus():
    """A new slot elsewhere (gfn 65536): installing the new memslots kicks vCPU 0, whose 200
    buffered gfns go into its ring as slot 0's."""
    vm = _two_slots()
    v0 = vm.vcpus[0]
    vm.set_user_memory_region(2, LOG_, 65536 * PAGE, 512 * PAGE)
    assert (v0.pml_count, v0.ring.used, v0.stats.pml_flushes) == (0, 200, 1)
    assert v0.in_guest


def test_a_memslot_change_that_changes_nothing_kicks_nobody():
    """The same flags and address again: the kernel returns before installing anything."""
    vm = _two_slots()
    vm.set_user_memory_region(1, LOG_, 4096 * PAGE, 4096 * PAGE)
    assert vm.vcpus[0].pml_count == 200 and vm.vcpus[0].stats.pml_flushes == 0


def _soft_full_at_a_kick():
    """vCPU 0 writes from t = 0 and vCPU 1 from 2350 (its sync after its 10th write, at 2395):
    vCPU 0 has logged its writes at 0, 5, .., 2395 (ties: the lower vCPU first), 480 gfns,
    under the buffer's 512 (ring 1024, soft limit 448). Creating a slot then kicks vCPU 0:
    480 >= 448, it exits at the ioctl (t = 2395). Returns the host and the 480."""
    h = Host([list(range(1000)), list(range(1500, 1510))], [[], [9]], profile="x86-pml", entries=1024,
             slot_pages=2048)
    assert h.enter(0) is None
    assert h.vm.run_until(5 * 470) == []
    assert h.enter(1) is None
    assert h.run().vcpu == 1
    buffered = h.vcpus[0].pml_count
    assert buffered == 480
    h.vm.set_user_memory_region(1, LOG_, 65536 * PAGE, 512 * PAGE)
    v = h.vcpus[0]
    assert v.ring.used == buffered and v.ring.soft_full() and not v.in_guest and h.vm.now == 2395
    return h, buffered


def test_a_kick_that_leaves_a_ring_soft_full_exits_at_the_ioctl():
    h, buffered = _soft_full_at_a_kick()
    now = h.vm.now
    exits = h.vm.run_until(now + 1000)
    assert [(x.vcpu, x.reason, x.time_ns) for x in exits] == [(0, FULL, now)]
    assert h.version(buffered) == 0  # nothing more written
    assert h.vm.run_until(now + 1000) == [] and h.version(buffered) == 0  # the vCPU stays out


def test_the_exit_at_an_ipi_is_what_kvm_run_returns_to_a_signal():
    """QEMU kicks the vCPU (SIG_IPI) before it has seen the exit: KVM_RUN returns the ring-full
    exit it took at the IPI, not KVM_EXIT_INTR."""
    h, _ = _soft_full_at_a_kick()
    e = h.vcpus[0].kick()
    assert e is not None and (e.reason, e.kind) == (FULL, "full")
    assert h.vm.run_until(h.vm.now + 1000) == []


def test_the_exit_at_an_ipi_stands_if_userspace_harvests_before_seeing_it():
    """The reaper harvests and resets vCPU 0's ring before the vCPU thread sees the exit: the
    exit was taken while the ring was soft-full and is still returned; KVM_RUN then re-enters
    (the request's ring is no longer soft-full)."""
    h, buffered = _soft_full_at_a_kick()
    now = h.vm.now
    assert h.harvest(0) == list(range(buffered))
    assert h.reset() == buffered
    exits = h.vm.run_until(now + 1000)
    assert [(x.vcpu, x.reason, x.time_ns) for x in exits] == [(0, FULL, now)]
    assert h.enter(0) is None


def test_no_full_exit_below_the_soft_limit_after_the_buffered_slot_is_deleted():
    """Reference s4: KVM_EXIT_DIRTY_RING_FULL only when the ring is soft-full. The delete of
    slot 0 kicks vCPU 0, whose 200 gfns go into its ring as slot 0's (the slot still logs
    then). The delete zapped every mapping of the VM (x86 kvm_mmu_zap_all_fast), so its writes
    to slot 1 are EPT violations, each pushed by its fault: the 248th leaves the ring at the
    soft limit, 448, and vCPU 0 exits before that write retires."""
    vm = _two_slots()
    v0 = vm.vcpus[0]
    vm.set_user_memory_region(0, 0, 0, 0)
    assert v0.ring.used == 200 and v0.pml_count == 0
    exits = vm.run_until(FOREVER)
    assert [(e.vcpu, e.reason) for e in exits] == [(0, FULL)]
    assert v0.ring.used == 448 and v0.ring.soft_full()


def test_the_tick_after_a_slot_stopped_logging_flushes_only_the_new_gfns():
    """Writes 1999 ns apart, ticks every 1 ms. vCPU 0 has logged 200 gfns of slot 0 (t < 0.4
    ms) when slot 0 stops logging (slot 1 still logs): the new memslots' kick flushes them
    (nothing pushed); it then writes slot 1's pages, 301 before the tick (1999 k < 1 ms for
    k <= 500), which the tick's flush pushes (ring 301 < 448: no exit, the guest goes on)."""
    vm = Vm("x86-pml")
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 1024 * 16)
    vm.set_user_memory_region(0, LOG_, 0, 1024 * PAGE)
    vm.set_user_memory_region(1, LOG_, 4096 * PAGE, 4096 * PAGE)
    v0 = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([list(range(200)) + list(range(4096, 6096))], [[]], write_ns=1999, fault_ns=0))
    assert v0.run() is None
    assert vm.run_until(200 * 1999) == [] and v0.pml_count == 200
    vm.set_user_memory_region(0, 0, 0, 1024 * PAGE)
    assert (v0.pml_count, v0.stats.pml_flushes) == (0, 1)
    assert vm.run_until(1_001_000) == []
    assert (v0.ring.used, v0.pml_count, v0.stats.pml_flushes) == (301, 0, 2)
