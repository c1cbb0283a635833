"""Stage-2 blocks sit on guest-physical block boundaries, whatever the memslot's base.

arm64 user_mem_abort maps a block only if fault_supports_stage2_huge_mapping: the block around
the faulting IPA lies wholly inside the memslot, and the IPA and the userspace address have the
same offset in a block. x86 kvm_alloc_memslot_metadata disallows large pages in the memslot's
partial first and last large-page frames, and everywhere in a slot whose base gfn and userspace
frame are not congruent modulo the large page. So a slot at 1 MiB (QEMU's x86 RAM above the
legacy hole) has 4 KiB pages from 1 to 2 MiB and blocks from 2 MiB on; a slot moved by other
than a block multiple (its userspace memory unchanged) has no block at all.

The simulator has no userspace address: the memory behind a slot is taken as aligned the way
the slot was when created (QEMU maps guest RAM with the alignment of its huge pages)."""

from __future__ import annotations

import numpy as np
import pytest

from ringenv.guest.trace import TraceProgram
from ringenv.kvm import Vm
from ringenv.kvm import uapi as U
from ringenv.kvm.memory import UNMAPPED

from ._helpers import Host, block_mapped

MiB = 1 << 20
BLOCK = 512  # 2 MiB of 4 KiB pages


def _slot_blocks(vm, slot):
    """Per slot page, whether it is mapped by (or, untouched, stands for) a block."""
    return np.array([block_mapped(vm, slot.start + o) for o in range(slot.npages)])


@pytest.mark.parametrize("profile", ["arm64-4k", "x86-nopml", "x86-pml"])
@pytest.mark.parametrize("base_gfn, npages", [(256, 2048), (0, 2048), (100, 1000), (512, 700), (1, 511),
                                              (300, 2000)])
def test_blocks_are_the_aligned_blocks_wholly_inside_the_slot(profile, base_gfn, npages):
    """Every THP-backed block of the slot's guest-physical range that the slot covers whole is a
    block; the partial first and last blocks are pages."""
    vm = Vm(profile)
    vm.set_user_memory_region(0, 0, base_gfn * 4096, npages * 4096, block_fraction=1.0)
    s = vm.memslot(0)
    gfn = base_gfn + np.arange(npages)
    first = gfn // BLOCK * BLOCK
    whole = (first >= base_gfn) & (first + BLOCK <= base_gfn + npages)
    assert (_slot_blocks(vm, s) == whole).all()
    assert s.nblocks == int(whole.sum()) // BLOCK
    assert s.nr_block_mapped == s.nblocks


def test_a_write_in_the_partial_first_block_splits_nothing():
    """arm64, slot at 1 MiB, 8 MiB, all THP-backed, logging: offsets 0-255 (gfns 256-511) are the
    partial block below 2 MiB, mapped by pages; offsets 256-767 the block 2-4 MiB. Writes at
    10 and 1800 (the partial block above 9 MiB) fault page by page; the write at 300 splits the
    block 2-4 MiB, the only split."""
    h = Host([[10, 300, 1800]], base_gfn=256, slot_pages=2048, block_fraction=1.0)
    v = h.vcpus[0]
    assert not h.block_mapped(10) and h.block_mapped(256) and h.block_mapped(1791)
    assert not h.block_mapped(1792)
    assert h.enter_and_run().kind == "done"
    assert (h.vm.stats.splits, v.stats.pushes, v.stats.faults) == (1, 3, 3)
    assert not h.block_mapped(300) and not h.block_mapped(767) and h.block_mapped(768)
    assert h.harvest() == [10, 300, 1800]


def _moved(new_base_gfn, profile="arm64-4k", npages=2048):
    vm = Vm(profile)
    vm.set_user_memory_region(0, 0, 0, npages * 4096, block_fraction=1.0)
    assert vm.memslot(0).nr_block_mapped == npages // BLOCK
    vm.set_user_memory_region(0, 0, new_base_gfn * 4096, npages * 4096)  # KVM_MR_MOVE
    return vm


@pytest.mark.parametrize("profile, npages", [("arm64-4k", 2048), ("x86-nopml", 2048), ("arm64-4k", 2304)])
def test_a_slot_moved_off_its_alignment_has_no_block(profile, npages):
    """The userspace memory behind the slot stays where it was: moved by 1 MiB its huge pages
    no longer line up with guest-physical blocks, so none can be mapped by a block; a write
    fault there maps one page (on the x86 shadow MMU with the rest of its aligned group of 8: the
    slot does not log and the host pages exist, so the fault prefetches them). (2304 pages: as
    many whole blocks before the move as after.)"""
    vm = _moved(256, profile, npages)
    s = vm.memslot(0)
    assert s.nr_block_mapped == 0 and not _slot_blocks(vm, s).any()
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[300]], [[]], base_gfn=256))
    assert v.run() is None and vm.run_until(1 << 40)[0].kind == "done"
    assert not _slot_blocks(vm, s).any()
    first, mapped = (300 - (256 + 300) % 8, 8) if profile == "x86-nopml" else (300, 1)  # (the prefetched group)
    assert (s.state & UNMAPPED != 0).sum() == s.npages - mapped
    assert (s.state[first:first + mapped] & UNMAPPED == 0).all()


def test_a_slot_moved_by_whole_blocks_keeps_its_blocks():
    vm = _moved(4096)
    s = vm.memslot(0)
    assert s.nr_block_mapped == 4 and _slot_blocks(vm, s).all()


def test_untouched_memory_comes_in_guest_physical_blocks():
    """mapped_fraction < 1 leaves memory untouched a whole block at a time: with the slot at
    1 MiB, each aligned block (and each partial end) is all mapped or all not."""
    vm = Vm("arm64-4k")
    vm.set_user_memory_region(0, 0, 256 * 4096, 4096 * 4096, block_fraction=1.0, mapped_fraction=0.5)
    s = vm.memslot(0)
    gone = (s.state & UNMAPPED) != 0
    assert 0 < gone.sum() < s.npages
    chunks = (256 + np.arange(s.npages)) // BLOCK
    for c in np.unique(chunks):
        assert len(set(gone[chunks == c].tolist())) == 1, c


def test_a_second_slot_beside_a_misaligned_one():
    """Two slots, 0-1 MiB and 1-9 MiB: each keeps its own pages and blocks (the first has none,
    the second the three aligned blocks it covers whole), and writes to both are logged with
    the right slot and offset."""
    vm = Vm("arm64-4k")
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 256 * 16)
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
    vm.set_user_memory_region(0, U.KVM_MEM_LOG_DIRTY_PAGES, 0, 256 * 4096, block_fraction=1.0)
    vm.set_user_memory_region(1, U.KVM_MEM_LOG_DIRTY_PAGES, 256 * 4096, 2048 * 4096, block_fraction=1.0)
    a, b = vm.memslot(0), vm.memslot(1)
    assert (a.nblocks, b.nblocks) == (0, 3)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[5, 255, 256, 600, 2303]], [[]]))
    assert v.run() is None and vm.run_until(1 << 40)[0].kind == "done"
    assert vm.stats.splits == 1  # gfn 600, in the block 2-4 MiB
    slots = v.ring.gfns["slot"][:5].tolist()
    offsets = v.ring.gfns["offset"][:5].tolist()
    assert list(zip(slots, offsets)) == [(0, 5), (0, 255), (1, 0), (1, 344), (1, 2047)]
    assert vm.version[a.start + 255] == 1 and vm.version[b.start + 2047] == 1


# ---------------------------------------------------------------- the logging transitions, padding, granules
LOG = U.KVM_MEM_LOG_DIRTY_PAGES


def _off(h, npages):
    h.vm.set_user_memory_region(h.slot_id, 0, h.base_gfn * 4096, npages * 4096)


def _padding(vm):
    owned = np.zeros(len(vm.state), dtype=bool)
    for s in vm.slots:
        owned[s.start: s.start + s.npages] = True
    return ~owned


@pytest.mark.parametrize("base", [256, 100, 400])
@pytest.mark.parametrize("profile", ["arm64-4k", "x86-pml"])
def test_eager_split_splits_exactly_the_blocks_whose_memory_is_mapped(profile, base):
    """Slot at 1 MiB, 64 blocks, half the memory untouched (whole guest-physical blocks):
    enabling logging with eager split splits a block iff its own pages are mapped."""
    vm = Vm(profile)
    if profile.startswith("arm64"):
        vm.enable_cap(U.KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE, 2 << 20)
    n = 64 * BLOCK + 256
    vm.set_user_memory_region(0, 0, base * 4096, n * 4096, block_fraction=1.0, mapped_fraction=0.5)
    s = vm.memslot(0)
    mapped = [(s.state[s.head + i * BLOCK] & UNMAPPED) == 0 for i in range(s.nblocks)]
    assert 0 < sum(mapped) < s.nblocks
    vm.set_user_memory_region(0, LOG, base * 4096, n * 4096)
    assert vm.stats.splits == sum(mapped)
    for i in range(s.nblocks):
        assert block_mapped(vm, s.start + s.head + i * BLOCK) == (not mapped[i]), i


@pytest.mark.parametrize("base", [256, 100, 400])
def test_pml_logging_off_frees_the_4k_pages_of_the_partial_block_not_the_huge_ones(base):
    """x86-pml without eager split, slot at 1 MiB: logging on write-protects the blocks; a
    write to 10 (partial first block, 4K) and 300 (block 0, split). Logging off: the 4K
    mappings are writable (10), block 2 (still huge, offsets 1280..1791) stays protected."""
    p = Vm("x86-pml").profile.model_copy(update={"eager_page_split": False, "name": "x86-pml-lazy"})
    hd = (512 - base) % 512
    h = Host([[hd - 1, hd + 44]], [[1]], profile=p, entries=1024, base_gfn=base, slot_pages=2048, block_fraction=1.0)
    assert h.enter_and_run().kind == "sync"
    _off(h, 2048)
    last = hd + 3 * 512 - 1
    assert not h.wp(hd - 1) and not h.wp(0) and not h.wp(2047)
    assert h.block_mapped(last) and h.wp(last) and h.wp(hd + 1024)


@pytest.mark.parametrize("base", [256, 100, 400])
def test_shadow_mmu_logging_off_zaps_the_split_block_not_the_partial_one(base):
    """x86-nopml, slot at 1 MiB: the write to 300 split block 0 (offsets 256..767); the zap at
    logging off drops exactly its pages; the partial first block's page 10 stays mapped."""
    hd = (512 - base) % 512
    h = Host([[hd - 1, hd + 44]], [[1]], profile="x86-nopml", base_gfn=base, slot_pages=2048, block_fraction=1.0)
    assert h.enter_and_run().kind == "sync"
    _off(h, 2048)
    st = h.vm.state[h.gpi(0): h.gpi(2048)]
    assert (st[hd:hd + 512] & UNMAPPED).all()
    assert not (st[:hd] & UNMAPPED).any() and not (st[hd + 512:] & UNMAPPED).any()
    assert h.block_mapped(hd + 44)


@pytest.mark.parametrize("base", [256, 100, 400])
def test_tdp_mmu_recovers_the_block_from_its_own_first_page(base):
    """x86 TDP MMU, slot at 1 MiB: writes to 256 (block 0's first page) and 300 under logging;
    logging off recovers block 0 writable (its first present page is writable); page 10 of the
    partial block, never written, keeps its protection."""
    p = Vm("x86-nopml").profile.model_copy(update={"tdp_mmu": True, "name": "x86-nopml-tdp"})
    hd = (512 - base) % 512
    h = Host([[hd, hd + 44]], [[1]], profile=p, base_gfn=base, slot_pages=2048, block_fraction=1.0)
    assert h.enter_and_run().kind == "sync"
    _off(h, 2048)
    assert h.block_mapped(hd + 44) and not h.wp(hd + 44) and not h.wp(hd + 511) and h.wp(hd - 1)
    assert h.wp(hd + 512)


@pytest.mark.parametrize("profile", ["arm64-4k", "x86-pml", "x86-nopml"])
def test_padding_is_never_touched(profile):
    """Two misaligned slots, logging, writes across every boundary, reset, logging off, a move:
    the global pages no slot owns stay all-zero (state and version)."""
    vm = Vm(profile)
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 1024 * 16)
    vm.set_user_memory_region(0, LOG, 100 * 4096, 1000 * 4096, block_fraction=1.0)
    vm.set_user_memory_region(1, LOG, 1300 * 4096, 1900 * 4096, block_fraction=1.0)
    v = vm.create_vcpu(0)
    w = [100, 411, 412, 511, 512, 1023, 1099, 1300, 1535, 1536, 2047, 2048, 3199]
    vm.attach_guest(TraceProgram([w], [[]]))
    assert v.run() is None and vm.run_until(1 << 40)[0].kind == "done"
    pad = _padding(vm)
    assert pad.any() and not vm.state[pad].any() and not vm.version[pad].any()
    vm.set_user_memory_region(1, 0, 1300 * 4096, 1900 * 4096)
    vm.set_user_memory_region(0, LOG, 4196 * 4096, 1000 * 4096)  # moved by 8 blocks
    pad = _padding(vm)
    assert not vm.state[pad].any() and not vm.version[pad].any()


def test_a_slot_moved_back_to_its_alignment_gets_its_blocks_again():
    vm = Vm("arm64-4k")
    vm.set_user_memory_region(0, 0, 0, 2048 * 4096, block_fraction=1.0)
    vm.set_user_memory_region(0, 0, 256 * 4096, 2048 * 4096)
    assert vm.memslot(0).nr_block_mapped == 0
    vm.set_user_memory_region(0, 0, 8192 * 4096, 2048 * 4096)
    assert vm.memslot(0).nr_block_mapped == 4


@pytest.mark.parametrize("profile, bp", [("arm64-16k", 2048), ("arm64-64k", 8192)])
def test_big_granules(profile, bp):
    vm = Vm(profile)
    ps = vm.page_size
    base, n = bp // 2, 3 * bp
    vm.set_user_memory_region(0, 0, base * ps, n * ps, block_fraction=1.0)
    s = vm.memslot(0)
    assert (s.head, s.nblocks, s.nr_block_mapped) == (bp // 2, 2, 2)
    assert not block_mapped(vm, s.start) and block_mapped(vm, s.start + bp // 2)
    assert not block_mapped(vm, s.start + n - 1)


def test_padding_untouched_by_a_block_reprotect():
    """arm64 ring without a bitmap (blocks stay while tracking): the re-protect of a page under
    a block protects the block leaf; padding (global pages 0..99, 1100..1535) stays zero."""
    h = Host([[0, 411, 412, 999]], base_gfn=100, slot_pages=1000, with_bitmap=False, block_fraction=1.0)
    assert h.enter_and_run().kind == "done"
    assert h.harvest() == [0, 411, 412, 999]
    assert h.reset() == 4
    pad = _padding(h.vm)
    assert pad.any() and not h.vm.state[pad].any()
    assert h.wp(412) and h.wp(923)  # the block 412..923 protected whole


@pytest.mark.parametrize("base", [100, 400])
def test_untouched_memory_comes_in_guest_physical_blocks_at_other_bases(base):
    vm = Vm("arm64-4k")
    vm.set_user_memory_region(0, 0, base * 4096, 8192 * 4096, block_fraction=1.0, mapped_fraction=0.5)
    s = vm.memslot(0)
    gone = (s.state & UNMAPPED) != 0
    chunks = (base + np.arange(s.npages)) // BLOCK
    for c in np.unique(chunks):
        assert len(set(gone[chunks == c].tolist())) == 1, c


@pytest.mark.parametrize("base_gfn, created_at, expected", [
    (0, 0, (0, 3)),  # 3 whole blocks
    (256, 256, (512, 2)),  # at 1 MiB: 256 + 256 pages at the ends, 2 blocks inside
    (0, 256 + 8192, (1536, 0)),  # memory aligned as at 1 MiB, moved to 0: no block at all
    (256, 257 + 8192, (1536, 0)),  # memory one page off the slot's alignment
])
def test_leaf_mappings_of_a_slot_written_whole(base_gfn, created_at, expected):
    """x86 (the VM statistics pages_4k, pages_2m), a 6 MiB slot of untouched THP-backed memory,
    created at gfn ``created_at`` (its memory's alignment) and moved to ``base_gfn``; nothing
    is mapped until the guest writes every page once. The real kernel's counts for the same
    slots: tests/realkvm/test_realkvm_blocks.py."""
    vm = Vm("x86-nopml")
    vm.set_user_memory_region(0, 0, created_at * 4096, 1536 * 4096, block_fraction=1.0, mapped_fraction=0.0)
    if created_at != base_gfn:
        vm.set_user_memory_region(0, 0, base_gfn * 4096, 1536 * 4096)  # KVM_MR_MOVE
    assert vm.leaf_mappings() == (0, 0)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([list(range(1536))], [[]], base_gfn=base_gfn))
    assert v.run() is None and vm.run_until(1 << 40)[0].kind == "done"
    assert vm.leaf_mappings() == vm.memslot(0).leaf_mappings() == expected
