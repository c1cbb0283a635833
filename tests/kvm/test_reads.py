"""Translation faults and reads (reference s11): a fresh VM's pages are not mapped at stage 2.

- A read fault maps a writable page only if the host's page is writable (hva_to_pfn): fresh
  memory (the host's zero page) is mapped read-only and logs nothing anywhere; memory userspace
  has written (``populated``) is writable.
- arm64 with WITH_BITMAP: the slot is logging, so a read maps the page read-only whatever the
  host page (user_mem_abort: logging_active and not a write fault); the first write faults and
  pushes.
- arm64 without WITH_BITMAP: the ring-only slot is not logging, so a read of populated memory
  maps the page writable and, the mapping being writable, pushes an entry; a block stays a
  block, so one access maps all its pages writable and later writes to them are never reported.
- x86: a read of populated memory in a dirty-tracked slot maps it writable and pushes it
  (make_spte -> mark_page_dirty_in_slot); measured on this project's host, tests/realkvm.
"""

from __future__ import annotations

import numpy as np
import pytest

from ringenv.guest.trace import TraceProgram
from ringenv.kvm import Vm, uapi
from ringenv.replay import replay_trace


def batches(trace, profile="arm64-4k"):
    out = replay_trace(trace, profile=profile)
    return [(b["trigger"], b["offsets"]) for b in out["vcpus"][0]["batches"]]


def trace(writes, reads, syncs=(), with_bitmap=None, populated=None):
    t = {"slot_pages": 1024, "ring_entries": 256, "reap_scope": "all",
         "vcpus": [{"writes": list(writes), "syncs": list(syncs), "reads": list(reads)}]}
    if with_bitmap is not None:
        t["with_bitmap"] = with_bitmap
    if populated is not None:
        t["populated"] = populated
    return t


@pytest.mark.parametrize("populated", [False, True])
def test_read_of_unmapped_page_logs_nothing_when_the_slot_is_logging(populated):
    # accesses: read 5, read 6, write 6, write 7 -> only the writes push: [6, 7]
    assert batches(trace([5, 6, 6, 7], reads=[0, 1], with_bitmap=True, populated=populated)) == [("final", [6, 7])]


def _entries(t, profile):
    """The trace with a ring the profile takes (x86-pml's smallest is 1024 entries)."""
    return {**t, "ring_entries": 1024} if profile == "x86-pml" else t


@pytest.mark.parametrize("profile,with_bitmap", [("x86-nopml", None), ("x86-pml", None), ("arm64-4k", True),
                                                 ("arm64-4k", False)])
def test_read_of_fresh_memory_logs_nothing_anywhere(profile, with_bitmap):
    """Fresh memory: the read maps the zero page read-only (x86, and arm64 even in a ring-only
    slot); the write to 6 then faults and pushes. As measured on x86 (tests/realkvm)."""
    got = batches(_entries(trace([5, 6, 6, 7], reads=[0, 1], with_bitmap=with_bitmap), profile), profile=profile)
    assert got == [("final", [6, 7])]


@pytest.mark.parametrize("profile", ["x86-nopml", "x86-pml"])
def test_read_of_populated_memory_pushes_on_x86(profile):
    """make_spte maps the read fault writable (the host page is) and marks it dirty: read 5
    and read 6 push; the write to 6 finds it writable, the write to 7 faults: [5, 6, 7]."""
    got = batches(_entries(trace([5, 6, 6, 7], reads=[0, 1], populated=True), profile), profile=profile)
    assert got == [("final", [5, 6, 7])]


def test_read_of_unmapped_page_pushes_in_a_ring_only_arm64_slot():
    # read 5 maps 5 writable and pushes it; read 6 likewise; the write to 6 finds it writable
    got = batches(trace([5, 6, 6, 7], reads=[0, 1], with_bitmap=False, populated=True))
    assert got == [("final", [5, 6, 7])]


def test_read_of_a_mapped_page_never_pushes():
    # write 5 (push), sync: harvest+reset re-protects 5; read 5 is allowed by the read-only
    # mapping and pushes nothing, also in the ring-only slot
    got = batches(trace([5, 5], reads=[1], syncs=[0], with_bitmap=False))
    assert got == [("sync", [5])]


def _vm_with_blocks(with_bitmap: bool, populated: bool = True):
    vm = Vm("arm64-4k")
    vm.enable_cap(uapi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 256 * 16)
    if with_bitmap:
        vm.enable_cap(uapi.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
    vm.set_user_memory_region(0, uapi.KVM_MEM_LOG_DIRTY_PAGES, 0, 4 << 20, block_fraction=1.0,
                              mapped_fraction=0.0, populated=populated)
    v = vm.create_vcpu(0)
    return vm, v


def test_read_maps_a_whole_block_writable_in_a_ring_only_slot_and_later_writes_are_missed():
    """One read of page 3 of a 2 MiB block: one push (page 3); the block is mapped writable, so
    the writes to pages 10 and 11 of the same block fault no more and are never reported."""
    vm, v = _vm_with_blocks(with_bitmap=False)
    vm.attach_guest(TraceProgram([[3, 10, 11]], [[]], reads=[[0]]))
    assert v.run() is None
    exits = vm.run_until(1 << 40)
    assert [e.kind for e in exits] == ["done"]
    ring = v.ring_gfns
    assert v.ring.used == 1 and int(ring["offset"][0]) == 3
    assert vm.version[[3, 10, 11]].tolist() == [0, 1, 1]  # written, never pushed: lost to migration


def test_with_bitmap_the_block_is_split_and_every_written_page_is_pushed():
    vm, v = _vm_with_blocks(with_bitmap=True)
    vm.attach_guest(TraceProgram([[3, 10, 11]], [[]], reads=[[0]]))
    v.run()
    vm.run_until(1 << 40)
    assert v.ring.gfns["offset"][: v.ring.used].tolist() == [10, 11]


def test_mapped_fraction_marks_untouched_memory_in_block_sized_chunks():
    vm = Vm("arm64-4k", seed=3)
    vm.set_user_memory_region(0, 0, 0, 64 << 20, mapped_fraction=0.25)
    unmapped = (vm.state & 4) != 0
    assert unmapped.mean() == 0.75
    chunks = unmapped.reshape(-1, 512)
    assert np.all(chunks.all(axis=1) | ~chunks.any(axis=1))


def test_a_read_of_a_fresh_block_maps_the_zero_page_and_the_write_after_it_is_reported():
    """Ring-only arm64 slot over fresh THP memory: the read of page 3 maps the block read-only
    (the huge zero page; nothing pushed), so the write to page 10 faults: the block is mapped
    writable (not logging: it stays a block) and page 10 pushed; page 11's write is then
    missed, as any later write in a block of a ring-only slot is."""
    vm, v = _vm_with_blocks(with_bitmap=False, populated=False)
    vm.attach_guest(TraceProgram([[3, 10, 11]], [[]], reads=[[0]]))
    assert v.run() is None
    assert [e.kind for e in vm.run_until(1 << 40)] == ["done"]
    assert v.ring.gfns["offset"][: v.ring.used].tolist() == [10]
    assert vm.version[[3, 10, 11]].tolist() == [0, 1, 1]
