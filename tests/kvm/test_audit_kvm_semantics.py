"""Semantic audit of the simulated KVM host against docs/reference/kvm-dirty-ring.md (shared
reference), event for event: cases found failing on the code as audited. Each test says what the
reference (and, where it settles a point, the kernel) requires and what the simulator did.

Expected values are worked by hand in each docstring.
"""

from __future__ import annotations

import yaml

from ringenv.config import CONFIG_DIR, HostProfile
from ringenv.guest.trace import TraceProgram
from ringenv.kvm import Vm
from ringenv.kvm import uapi as U
from ringenv.replay import replay_trace

from ._helpers import Host

FULL = U.KVM_EXIT_DIRTY_RING_FULL


# ---------------------------------------------------------------------------- x86 PML: EPT violations
def _x86_pml_fresh_vm(ring_entries=1024, pages=4096, writes=600):
    """x86-pml, ring of ``ring_entries`` (1024: soft limit 1024 - 576 = 448), one logging slot
    whose memory nothing has touched yet (mapped_fraction 0: every first access is an EPT
    violation, as in a fresh VM and in ringenv.replay), one vCPU writing pages 0.. once each,
    5 ns apart, faults taking no guest time."""
    vm = Vm("x86-pml")
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, ring_entries * 16)
    vm.set_user_memory_region(0, U.KVM_MEM_LOG_DIRTY_PAGES, 0, pages * vm.page_size, mapped_fraction=0.0)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([list(range(writes))], [[]], write_ns=5, fault_ns=0))
    return vm, v


def test_x86_pml_write_to_an_unmapped_page_is_an_ept_violation_that_pushes_at_once():
    """Reference s7 ("KVM flushes the buffer into the ring at the next exit") and s12 ("The CPU
    flushes at every VM exit"), s3 (mark_page_dirty with a running vCPU pushes to its ring), s4
    (the exit comes at the entry check right after the push that made the ring soft-full).

    A write to a page with no EPT mapping is not logged by PML: it is an EPT violation, a VM
    exit. vmx_handle_exit flushes the PML buffer first; the fault then installs a writable SPTE
    with the dirty bit already set (make_spte: PT_WRITABLE_MASK | shadow_dirty_mask) and calls
    mark_page_dirty_in_slot itself (spte.c: "if ((spte & PT_WRITABLE_MASK) &&
    kvm_slot_dirty_track_enabled(slot)) mark_page_dirty_in_slot(...)"), i.e. kvm_dirty_ring_push
    into this vCPU's ring, and the request is raised at the 448th push.

    Hand-worked, ring 1024 (soft 448), 600 fresh pages: every write pushes at once; the 448th
    (page 447) makes the ring soft-full -> KVM_EXIT_DIRTY_RING_FULL with exactly 448 entries
    (pages 0..447), page 447's store not retired, nothing left in the PML buffer. After 10
    writes the ring already holds 10 entries.

    The simulator puts these faults' pages in the PML buffer instead: after 10 writes the ring
    is empty, and the full exit comes only at the log-full flush, with 512 entries."""
    vm, v = _x86_pml_fresh_vm()
    assert v.ring.soft_limit == 448
    assert v.run() is None
    assert vm.run_until(5 * 10) == []
    assert (v.ring.dirty_index, v.pml_count) == (10, 0), "each EPT violation pushes its page into the ring at once"
    exits = vm.run_until(1 << 40)
    assert [e.reason for e in exits] == [FULL]
    assert v.ring.used == 448 and v.pml_count == 0
    assert int(vm.version[447]) == 0 and int(vm.version[446]) == 1


def test_x86_pml_replay_of_fresh_pages_exits_at_the_soft_limit():
    """The same through ringenv.replay (the fidelity path: its slot starts unmapped). Worked
    by hand, ring 1024 (soft 448), writes 0..599, reap_scope all:
    - writes 0..447: EPT violations, pushed at once; the push of 447 -> full exit, batch
      "full" = [0..447], reset returns 448 (kvm_mmu_clear_dirty_pt_masked clears the dirty bits
      of 0..447, which are mapped now);
    - re-entry: the store to 447 re-executes on a writable SPTE with D clear: the CPU logs 447
      into the PML buffer, no exit; write 448 is an EPT violation: the VM exit flushes the
      buffer (push 447), then the fault pushes 448; 449..599 likewise;
    - the done exit: final batch [447, 448, ..., 599] (153 entries), reset 153.
    The simulator gives resets [512, 88] (a full exit at the PML log-full flush)."""
    out = replay_trace({"slot_pages": 4096, "ring_entries": 1024, "reap_scope": "all",
                        "vcpus": [{"writes": list(range(600)), "syncs": []}]}, profile="x86-pml")
    assert out["soft_limit"] == 448
    v = out["vcpus"][0]
    assert [(b["trigger"], b["offsets"]) for b in v["batches"]] == [
        ("full", list(range(448))), ("final", list(range(447, 600)))]
    assert out["resets"] == [448, 153]
    assert v["lost"] == 0


def test_x86_pml_an_ept_violation_costs_a_fault_not_a_logged_write():
    """Reference s7 (a write to a protected or unmapped page is a fault; only a write to a
    mapped, writable page with a clear dirty bit is logged by the CPU without an exit) and the
    profile's costs (wp_fault_ns: a fault; dirty_write_ns: a store that does not exit).
    Ten writes to fresh pages on x86-pml are ten EPT violations (VM exit, fault handling, SPTE
    installed): the vCPU loses at least 10 x wp_fault_ns in the kernel (the simulator charges a
    fault at that price for the same EPT violation in a slot without dirty logging). The
    simulator charges them as PML-logged stores: 10 x dirty_write_ns = 50 ns."""
    vm, v = _x86_pml_fresh_vm()
    assert v.run() is None
    assert vm.run_until(5 * 10) == []
    assert v.stats.faults == 10
    assert v.stats.fault_ns >= 10 * vm.profile.costs.wp_fault_ns


# ---------------------------------------------------------------------------- reset accounting
def test_reset_counts_only_the_reprotect_calls_kvm_makes():
    """Reference s6: "One re-protect call = kvm_arch_mmu_enable_log_dirty_pt_masked(slot,
    cur_offset, mask)" and "A bad slot/offset in an entry is skipped silently": the kernel's
    kvm_reset_dirty_gfn returns before calling the arch function (and before taking mmu_lock)
    when the slot does not exist or offset + __fls(mask) >= npages. VmStats.reprotect_calls is
    documented as counting kvm_arch_mmu_enable_log_dirty_pt_masked calls, and each is charged
    reprotect_call_ns.

    Ring [10, 11, 13] with entry 0's slot forged to 77: coalescing gives (77, 10, 0b1) then
    (0, 11, 0b101); the first names no memslot and is skipped -> ONE arch call (protecting
    11..13), 3 entries reset. The simulator counts (and charges) 2 calls."""
    h = Host([[10, 11, 13]], [[2]])
    assert h.enter_and_run().kind == "sync"
    h.vcpus[0].ring_gfns["slot"][0] = 77
    h.harvest()
    calls0 = h.vm.stats.reprotect_calls
    assert h.reset() == 3
    assert h.wp(11) and h.wp(12) and h.wp(13) and not h.wp(10)
    assert h.vm.stats.reprotect_calls - calls0 == 1


def _x86_pml_lazy_split_vm(writes, syncs=None, reads=None):
    """x86-pml with eager_page_split off (the TDP MMU on, as the profile says), ring 1024, one
    1024-page slot backed by huge pages and mapped (two 512-page blocks) before logging was
    enabled, one vCPU replaying ``writes`` 5 ns apart, faults taking no guest time."""
    data = yaml.safe_load((CONFIG_DIR / "hosts" / "x86-pml.yaml").read_text())
    prof = HostProfile.parse({**data, "eager_page_split": False}, where="host profile")
    assert prof.tdp_mmu and prof.pml
    vm = Vm(prof)
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 1024 * 16)
    vm.set_user_memory_region(0, 0, 0, 1024 * vm.page_size, block_fraction=1.0)
    vm.set_user_memory_region(0, U.KVM_MEM_LOG_DIRTY_PAGES, 0, 1024 * vm.page_size, block_fraction=1.0)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([writes], [syncs or []], reads=None if reads is None else [reads],
                                 write_ns=5, fault_ns=0))
    return vm, v


def test_x86_pml_write_under_a_huge_mapping_logging_protected_faults_splits_and_pushes_at_once():
    """x86 with PML and eager_page_split off: enabling logging write-protects the slot's huge
    mappings (kvm_mmu_slot_apply_flags -> kvm_mmu_slot_remove_write_access at PG_LEVEL_2M) and
    clears the 4K dirty bits. A write under a huge mapping is then a write-protection EPT
    violation, not a PML-logged store: the VM exit flushes the buffer, the fault replaces the
    huge SPTE by 4K ones (dirty logging forbids the huge page; the TDP MMU's
    tdp_mmu_split_huge_page fills the new table with 4K children that keep the huge SPTE's
    write protection, so the block's other pages fault on their writes too) and installs the written page's
    SPTE writable with the dirty bit set, pushing it itself (make_spte ->
    mark_page_dirty_in_slot).

    Hand-worked: ring 1024, one 512-page block mapped before logging; write page 3: 1 fault,
    1 split, the ring holds page 3 at once, the buffer is empty, the fault costs a write-protect
    fault and the split. Then page 7 of the same (now split) block: write-protected, another EPT
    violation: the ring holds [3, 7], still nothing in the buffer. The simulator logged page 3
    into the PML buffer (ring empty)."""
    vm, v = _x86_pml_lazy_split_vm([3, 7])
    assert v.run() is None
    assert vm.run_until(5) == []
    assert (v.ring.dirty_index, v.pml_count, v.stats.faults, vm.stats.splits) == (1, 0, 1, 1)
    c = vm.profile.costs
    assert v.stats.fault_ns >= c.wp_fault_ns + c.split_ns
    assert vm.run_until(10) == []
    assert (v.ring.dirty_index, v.pml_count, v.stats.faults) == (2, 0, 2)
    assert [int(x) for x in v.ring.gfns["offset"][:2]] == [3, 7]


def test_x86_pml_write_after_a_read_under_a_lazily_split_huge_mapping_is_an_ept_violation():
    """PML logs only a write that sets the dirty bit of a present, WRITABLE SPTE (the change's
    own rule, fault.walk_writes: "PML logs only a write to a mapped, writable page whose dirty
    bit is clear"). With PML, enabling logging write-protects the huge SPTEs
    (kvm_mmu_slot_apply_flags -> kvm_mmu_slot_remove_write_access(..., PG_LEVEL_2M)).

    The TDP MMU (tdp_mmu: true in x86-pml.yaml) does not zap a huge SPTE on a write fault:
    kvm_tdp_mmu_map meets the present huge SPTE above the 4K goal level and calls
    tdp_mmu_split_huge_page(kvm, &iter, sp, true), which fills the new table with 512 child
    SPTEs made from the huge one (make_huge_page_split_spte), i.e. present and write-protected
    like it. The block's other pages stay mapped, read-only.

    Trace: write 3 (EPT violation: split, page 3 writable+dirty, pushed: ring [3]), read 7 (a
    present child: no exit), write 7: the child is not writable, so the write is another EPT
    violation (its exit flushes the empty PML buffer; fast_page_fault / make_spte make it
    writable and mark_page_dirty_in_slot pushes page 7): ring [3, 7], PML buffer empty, two
    write-protect faults and one split charged. (The shadow MMU does zap the huge SPTE; page 7
    then takes a fault of its own at the read or at the write, pushed by the fault: ring [3, 7]
    and an empty buffer either way.)

    The simulator models the split as a zap (every page of the block UNMAPPED); the read then
    "maps page 7 read-only" (UNMAPPED cleared, WP kept), and the write to the read-only page
    is taken as a PML-logged store: page 7 sits in the PML buffer (pml_count 1), ring [3],
    charged dirty_write_ns (5 ns) instead of a fault. Without the read the same write is an
    EPT violation pushed at once (the change's own test)."""
    vm, v = _x86_pml_lazy_split_vm([3, 7, 7], reads=[1])
    c = vm.profile.costs
    assert v.run() is None
    assert vm.run_until(15) == []
    ring = [int(x) for x in v.ring.gfns["offset"][: v.ring.dirty_index]]
    assert (ring, v.pml_count) == ([3, 7], 0), "page 7's write is an EPT violation, pushed at once"
    assert v.stats.fault_ns >= 2 * c.wp_fault_ns + c.split_ns


def test_x86_pml_logging_off_recovers_a_lazily_split_huge_page_write_protected():
    """Same host (TDP MMU, PML, lazy split). Turning logging off, kvm_mmu_slot_apply_flags ->
    kvm_mmu_recover_huge_pages -> the TDP MMU's recover_huge_pages_range installs the huge SPTE
    in place, built from the FIRST present 4K SPTE under it (tdp_mmu_make_huge_spte ->
    make_huge_spte keeps that SPTE's permissions; Vm._commit_logging_off /
    Memslot.recover_huge_pages model exactly this).

    Write page 5 (EPT violation, the huge SPTE split in place: 512 present children,
    write-protected like the huge SPTE, page 5 made writable), sync exit, logging off: the
    first present child is page 0, still write-protected, so the recovered huge SPTE is
    write-protected; the next write (page 9) is a protection fault: one fault, wp_fault_ns
    (nothing logged). The simulator's x86-nopml twin gives exactly that.

    With PML the simulator zapped pages 0..511 but 5 at the split (UNMAPPED), so the first
    "present" page is page 5, writable: the whole block is recovered writable and the write to
    page 9 costs nothing (0 faults)."""
    vm, v = _x86_pml_lazy_split_vm([5, 9], syncs=[0])
    assert v.run() is None
    assert [e.kind for e in vm.run_until(100)] == ["sync"]
    vm.set_user_memory_region(0, 0, 0, 1024 * vm.page_size, block_fraction=1.0)  # logging off
    f0, ns0 = v.stats.faults, v.stats.fault_ns
    assert v.run() is None
    assert [e.kind for e in vm.run_until(1000)] == ["done"]
    assert v.stats.faults - f0 == 1, "the recovered huge SPTE is write-protected as page 0's child was"
    assert v.stats.fault_ns - ns0 >= vm.profile.costs.wp_fault_ns
