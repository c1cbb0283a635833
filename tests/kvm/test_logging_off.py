"""Turning dirty logging off on a memslot (KVM_SET_USER_MEMORY_REGION changing only ``flags``,
KVM_MEM_LOG_DIRTY_PAGES cleared), and on again.

The kernel does not make the slot's pages writable at once:
- arm64 kvm_arch_commit_memory_region does nothing to stage 2 when logging goes off: every
  page still write-protected takes one permission fault on its next write, which maps it
  writable and, the slot no longer logging, may map the whole huge page behind it as a block
  again (user_mem_abort -> transparent_hugepage_adjust);
- x86 kvm_mmu_slot_apply_flags (logging off) recovers huge pages: kvm_mmu_recover_huge_pages
  zaps the collapsible 4K sptes with the shadow MMU (the next fault maps the huge page) and,
  with the TDP MMU (Linux 6.13+), installs the huge spte in place, with the permissions of
  the first present 4K spte under it; the rest stays write-protected until each page faults
  once, except with PML, where logging only cleared dirty bits of 4K sptes (only huge
  mappings were write-protected).
Nothing is logged after logging is off (mark_page_dirty_in_slot checks
kvm_slot_dirty_track_enabled). Turning logging on again write-protects the slot as ever.
"""

from __future__ import annotations

import errno

import numpy as np
import pytest

from ringenv.guest.trace import TraceProgram
from ringenv.kvm import KvmError, Vm
from ringenv.kvm import uapi as U
from ringenv.kvm.memory import CLEAN, UNMAPPED, WP

from ._helpers import Host

LOG = U.KVM_MEM_LOG_DIRTY_PAGES
FOREVER = 1 << 62


def _off(h, pages):
    h.vm.set_user_memory_region(h.slot_id, 0, 0, pages * h.profile.page_size)


def _on(h, pages):
    h.vm.set_user_memory_region(h.slot_id, LOG, 0, pages * h.profile.page_size)


@pytest.mark.parametrize("profile", ["arm64-4k", "x86-nopml"])
def test_logging_off_leaves_pages_write_protected_until_each_faults_once(profile):
    """Pages 1 and 2 are written under logging (two pushes), then logging goes off: page 3,
    never written, is still write-protected, page 1 is writable. The guest then writes 3, 1, 3:
    one write-protect fault (page 3, charged as any such fault), which makes it writable and
    logs nothing; the other writes cost no fault."""
    h = Host([[1, 2, 3, 1, 3]], [[1]], profile=profile)
    v = h.vcpus[0]
    assert h.enter_and_run().kind == "sync"
    assert (v.stats.pushes, v.stats.faults) == (2, 2)
    _off(h, 1024)
    assert h.slot.dirty_bitmap is None
    assert h.wp(3) and not h.wp(1) and not h.wp(2)
    fault_ns = v.stats.fault_ns
    assert h.enter_and_run().kind == "done"
    assert v.stats.faults == 3 and v.stats.fault_ns == fault_ns + h.profile.costs.wp_fault_ns
    assert v.stats.pushes == 2 and v.ring.dirty_index == 2
    assert not h.wp(3) and h.version(3) == 2 and h.version(1) == 2


@pytest.mark.parametrize("eager", [True, False])
def test_logging_off_with_pml_leaves_only_huge_mappings_protected(eager):
    """x86 with PML: enabling logging cleared the dirty bits of 4K sptes and write-protected
    only huge mappings. Two 2 MiB blocks; page 10 is written under logging (one entry). With
    eager page splitting (x86-pml as shipped) both blocks were split when logging was enabled;
    without it, block 0 is split by that write (tdp_mmu_split_huge_page: its 4K children keep
    the huge mapping's write protection, page 10's made writable by the fault) and block 1 is
    still a huge mapping. Logging off: the TDP MMU maps every split block as a huge page again
    at once, with the permissions of its first present 4K spte (make_huge_spte): writable with
    eager splitting (its 4K sptes were writable, only their dirty bits cleared), write-protected
    without (page 0's child); a huge mapping that was never split stays write-protected. The
    writes 20, 11 (block 0), 600, 700 (block 1) then fault on 20 and 600 without eager
    splitting, never with it. Nothing more is logged."""
    p = Vm("x86-pml").profile
    if not eager:
        p = p.model_copy(update={"eager_page_split": False, "name": "x86-pml-lazy"})
    h = Host([[10, 20, 11, 600, 700]], [[0]], profile=p, entries=1024, block_fraction=1.0)
    v = h.vcpus[0]
    assert h.enter_and_run().kind == "sync"
    assert v.stats.pushes == 1 and h.vm.stats.splits == (2 if eager else 1)
    _off(h, 1024)
    assert h.block_mapped(20) and h.wp(20) == h.wp(10) == (not eager)
    assert h.block_mapped(600) and h.wp(600) == (not eager)
    faults = v.stats.faults
    assert h.enter_and_run().kind == "done"
    assert v.stats.faults == faults + (0 if eager else 2)
    assert v.stats.pushes == 1 and h.vm.stats.splits == (2 if eager else 1)
    assert h.block_mapped(700) and not h.wp(700)


def test_logging_off_on_arm64_the_next_fault_maps_the_huge_page_as_a_block_again():
    """arm64: stage 2 is untouched when logging goes off. Block 0 was split by the logging
    write to page 10; block 1 is still a (write-protected) block. After logging off, the write
    to 20 takes a permission fault and user_mem_abort, no longer forced to pages, maps the
    huge page as a block again (writable): 30 then costs nothing; the write to 600 faults once
    and relaxes block 1. Two faults, no split, no push."""
    h = Host([[10, 20, 30, 600, 700]], [[0]], block_fraction=1.0)
    v = h.vcpus[0]
    assert h.enter_and_run().kind == "sync"
    _off(h, 1024)
    assert not h.block_mapped(20) and h.wp(20) and h.block_mapped(600)
    faults = v.stats.faults
    assert h.enter_and_run().kind == "done"
    assert v.stats.faults == faults + 2
    assert (v.stats.pushes, v.stats.splits, h.vm.stats.splits) == (1, 1, 1)
    assert h.block_mapped(20) and h.block_mapped(600)
    assert not (h.vm.state[h.gpi(0): h.gpi(1024)] & WP).any()


def test_logging_off_on_x86_with_the_shadow_mmu_zaps_the_collapsible_pages():
    """x86-nopml (this project's host: tdp_mmu=N): kvm_rmap_zap_collapsible_sptes drops the 4K
    mappings of block 0 (split by the logging write to page 10); the next write there (20) is a
    fault that maps the huge page again, writable, so 10 and 30 cost nothing. Block 1 (still a
    huge mapping) faults once. One TLB flush for the zap."""
    h = Host([[10, 20, 10, 30, 600, 700]], [[0]], profile="x86-nopml", block_fraction=1.0)
    v = h.vcpus[0]
    assert h.enter_and_run().kind == "sync"
    flushes = h.vm.stats.tlb_flushes
    _off(h, 1024)
    assert h.vm.stats.tlb_flushes == flushes + 1
    assert (h.vm.state[h.gpi(0): h.gpi(512)] & UNMAPPED).all()
    assert not (h.vm.state[h.gpi(512): h.gpi(1024)] & UNMAPPED).any()
    faults = v.stats.faults
    assert h.enter_and_run().kind == "done"
    assert v.stats.faults == faults + 2 and v.stats.pushes == 1 and h.vm.stats.splits == 1
    assert h.block_mapped(10) and h.block_mapped(600)
    assert h.version(10) == 2 and h.version(30) == 1


@pytest.mark.parametrize("first,faults_after", [(0, 0), (10, 1)])
def test_tdp_mmu_recovers_a_huge_page_with_the_permission_of_its_first_page(first, faults_after):
    """x86 TDP MMU without PML: kvm_tdp_mmu_recover_huge_pages builds the huge spte from the
    first present 4K spte of the block (make_huge_spte keeps its permissions). If page 0 was
    written under logging (writable), the recovered block is writable: the later writes cost
    nothing; if only page 10 was, page 0 is write-protected and so is the block: one fault."""
    p = Vm("x86-nopml").profile.model_copy(update={"tdp_mmu": True, "name": "x86-nopml-tdp"})
    h = Host([[first, 20, 10, 30]], [[0]], profile=p, block_fraction=1.0)
    v = h.vcpus[0]
    assert h.enter_and_run().kind == "sync"
    _off(h, 1024)
    assert h.block_mapped(20) and h.wp(20) == bool(first)
    faults = v.stats.faults
    assert h.enter_and_run().kind == "done"
    assert v.stats.faults == faults + faults_after and v.stats.pushes == 1


@pytest.mark.parametrize("profile", ["arm64-4k", "x86-nopml"])
def test_logging_on_again_is_exact(profile):
    """Logging on (A), off (B), on again (C), three 2 MiB blocks. A writes 10, 600, 1030 (three
    pushes, three splits). B writes 20, 10, 601: 20 and 601 fault (their blocks map as huge
    pages again), 10 is writable: nothing logged. C: enabling logging write-protects the slot
    again (every mapped page WP and clean) and the writes 20, 21, 10, 600, 20, 1040 push 20,
    21, 10, 600, 1040 once each: blocks 0 and 1 (huge mappings again) are split again, block 2
    (still a table of pages) is not. The ring and the splits are exact."""
    writes = [10, 600, 1030, 20, 10, 601, 20, 21, 10, 600, 20, 1040]
    h = Host([writes], [[2, 5]], profile=profile, slot_pages=1536, block_fraction=1.0)
    v = h.vcpus[0]
    assert h.enter_and_run().kind == "sync"
    assert h.harvest() == [10, 600, 1030] and h.reset() == 3
    _off(h, 1536)
    faults = v.stats.faults
    assert h.enter_and_run().kind == "sync"
    assert v.stats.faults == faults + 2 and h.harvest() == [] and h.reset() == 0
    assert h.block_mapped(20) and h.block_mapped(601)
    _on(h, 1536)
    mapped = (h.vm.state[h.gpi(0): h.gpi(1536)] & UNMAPPED) == 0
    assert (h.vm.state[h.gpi(0): h.gpi(1536)][mapped] & (WP | CLEAN) == (WP | CLEAN)).all()
    splits = h.vm.stats.splits
    assert h.enter_and_run().kind == "done"
    assert h.harvest() == [20, 21, 10, 600, 1040]
    assert h.vm.stats.splits == splits + 2 and v.stats.splits == 5
    assert v.ring.lost == 0 and h.version(20) == 3


def test_logging_on_again_gives_an_exact_bitmap():
    """Bitmap mode (x86-nopml, no ring): pages 1, 2 are logged; logging off drops the bitmap
    (GET_DIRTY_LOG: ENOENT); 2, 3 are written (3 faults once, 2 is writable: no bit anywhere); logging on again
    starts a fresh bitmap and write-protects the slot: 3, 4, 1 are logged, 2 is not."""
    vm = Vm("x86-nopml")
    vm.set_user_memory_region(0, LOG, 0, 64 * 4096)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[1, 2, 2, 3, 3, 4, 1]], [[1, 3]]))

    def run():
        e = v.run()
        return (e or vm.run_until(FOREVER)[0]).kind

    assert run() == "sync"
    assert int(vm.slots[0].dirty_bitmap[0]) == 0b110  # (GET_DIRTY_LOG would re-protect them)
    vm.set_user_memory_region(0, 0, 0, 64 * 4096)
    with pytest.raises(KvmError) as ei:
        vm.get_dirty_log(0)
    assert ei.value.errno == errno.ENOENT
    faults = v.stats.faults
    assert run() == "sync"
    assert v.stats.faults == faults + 1
    vm.set_user_memory_region(0, LOG, 0, 64 * 4096)
    assert not vm.get_dirty_log(0).any()
    assert run() == "done"
    bm = vm.get_dirty_log(0)
    assert int(bm[0]) == (1 << 1) | (1 << 3) | (1 << 4)
    assert np.array_equal(vm.version[:5], [0, 2, 2, 2, 1])


def test_a_read_after_the_zap_maps_the_huge_page_writable():
    """After logging off, a read of a zapped huge page is a translation fault that maps it
    again, writable (the slot does not log, so nothing keeps the mapping read-only): one fault,
    and the later write to another page of the block costs none. Nothing is logged."""
    from ringenv.guest.trace import TraceProgram as T

    h = Host([[10]], [[0]], profile="x86-nopml", block_fraction=1.0)
    v = h.vcpus[0]
    assert h.enter_and_run().kind == "sync"
    _off(h, 1024)
    h.vm.attach_guest(T([[20, 30]], [[]], reads=[[0]]))
    faults = v.stats.faults
    assert h.enter_and_run().kind == "done"
    assert v.stats.faults == faults + 1 and v.stats.pushes == 1
    assert h.block_mapped(30) and not h.wp(30) and h.version(30) == 1 and h.version(20) == 0


def test_pml_entries_flushed_after_logging_went_off_are_dropped():
    """x86 PML: vmx_flush_pml_buffer hands each buffered GPA to kvm_vcpu_mark_page_dirty, which
    logs nothing for a slot without LOG_DIRTY_PAGES (mark_page_dirty_in_slot checks the flag
    at the flush). vCPU 0 has written 40 pages, still in its PML buffer, when vCPU 1 exits at a
    sync (its 40 pages pushed) and userspace turns logging off; vCPU 0's buffer is flushed
    at its next exit: nothing is pushed (the flush's time is still paid)."""
    h = Host([list(range(100)), list(range(500, 540))], [[], [39]], profile="x86-pml", entries=1024)
    v0, v1 = h.vcpus
    assert h.enter(0) is None and h.enter(1) is None
    e = h.run()
    assert (e.vcpu, e.kind) == (1, "sync") and v1.stats.pushes == 40
    assert v0.pml_count == 40 and v0.stats.pushes == 0
    _off(h, 1024)
    e = v0.kick()
    assert e.kind == "kick" and v0.pml_count == 0
    assert v0.stats.pushes == 0 and v0.ring.dirty_index == 0 and v0.stats.pml_flushes == 1


def test_with_pml_a_page_never_mapped_still_faults_after_logging_off():
    """x86 PML, untouched memory (no stage-2 mapping): logging off makes the mapped 4K pages
    writable (their dirty bits were all logging changed), but a page never mapped has nothing
    to make writable: its first write is still a fault (which maps it; nothing logged)."""
    vm = Vm("x86-pml")
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING, 1024 * 16)
    vm.set_user_memory_region(0, LOG, 0, 1024 * 4096, mapped_fraction=0.0)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[3, 3, 700]], [[0]]))
    assert (v.run() or vm.run_until(FOREVER)[0]).kind == "sync"
    assert v.stats.pushes == 1
    vm.set_user_memory_region(0, 0, 0, 1024 * 4096)
    faults = v.stats.faults
    assert (v.run() or vm.run_until(FOREVER)[0]).kind == "done"
    assert v.stats.faults == faults + 1 and v.stats.pushes == 1


@pytest.mark.parametrize("entries", [1024, 0])
@pytest.mark.parametrize("case", ["huge mapping", "never mapped"])
def test_with_pml_a_fault_after_logging_off_costs_a_protection_fault(case, entries):
    """x86 with PML: a logging write to a 4K page costs dirty_write_ns (the CPU logs the GPA,
    no VM exit). After logging off, what still faults is a real EPT violation handled by
    kvm_tdp_page_fault: a huge mapping logging left write-protected (eager_page_split off, so
    block 1 was never split), or a page never mapped. It costs wp_fault_ns, with a ring or
    without one (the bitmap: no PML-full flush to amortize either)."""
    p = Vm("x86-pml").profile.model_copy(update={"eager_page_split": False, "name": "x86-pml-lazy"})
    vm = Vm(p)
    if entries:
        vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING, entries * 16)
    mapped = 1.0 if case == "huge mapping" else 0.0
    vm.set_user_memory_region(0, LOG, 0, 1024 * 4096, block_fraction=1.0, mapped_fraction=mapped)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[10, 600, 700]], [[0]]))
    assert (v.run() or vm.run_until(FOREVER)[0]).kind == "sync"
    vm.set_user_memory_region(0, 0, 0, 1024 * 4096)
    faults, ns = v.stats.faults, v.stats.fault_ns
    assert (v.run() or vm.run_until(FOREVER)[0]).kind == "done"
    assert v.stats.faults == faults + 1
    assert v.stats.fault_ns == ns + p.costs.wp_fault_ns
