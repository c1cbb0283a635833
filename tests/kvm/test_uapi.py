"""uAPI constants and ``struct kvm_dirty_gfn`` (reference kvm-dirty-ring.md section 1)."""

from __future__ import annotations

import struct

import numpy as np

from ringenv.kvm import uapi as U

from ._helpers import Host


def test_kvm_dirty_gfn_is_16_bytes_flags_slot_offset():
    """s1: struct kvm_dirty_gfn { u32 flags; u32 slot; u64 offset } -- 16 bytes, no padding."""
    dt = U.kvm_dirty_gfn
    assert dt.itemsize == 16
    assert dt.names == ("flags", "slot", "offset")
    # byte offsets 0, 4, 8 and little-endian u32/u32/u64
    assert [dt.fields[n][1] for n in dt.names] == [0, 4, 8]
    assert dt["flags"] == np.dtype("<u4")
    assert dt["slot"] == np.dtype("<u4")
    assert dt["offset"] == np.dtype("<u8")


def test_kvm_dirty_gfn_byte_layout_matches_the_c_struct():
    """s1: one entry with flags=DIRTY, slot=(as_id 1 << 16 | slot 3), offset=0x123456789 packs
    exactly like the C struct on a little-endian host ("<IIQ")."""
    e = np.array([(1, (1 << 16) | 3, 0x123456789)], dtype=U.kvm_dirty_gfn)
    assert e.tobytes() == struct.pack("<IIQ", 1, 0x10003, 0x123456789)


def test_flag_values_and_ring_limits():
    """s1: F_DIRTY = 1, F_RESET = 2, RSVD = 64 entries, MAX = 65536 entries per vCPU,
    mmap offset 64 pages."""
    assert U.KVM_DIRTY_GFN_F_DIRTY == 1
    assert U.KVM_DIRTY_GFN_F_RESET == 2
    assert U.KVM_DIRTY_RING_RSVD_ENTRIES == 64
    assert U.KVM_DIRTY_RING_MAX_ENTRIES == 65536
    assert U.KVM_DIRTY_LOG_PAGE_OFFSET == 64


def test_capability_numbers():
    """s1 (+ s11 for 229)."""
    assert U.KVM_CAP_DIRTY_LOG_RING == 192
    assert U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL == 223
    assert U.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP == 225
    assert U.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 == 168
    assert U.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE == 1
    assert U.KVM_DIRTY_LOG_INITIALLY_SET == 2
    assert U.KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE == 228
    assert U.KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES == 229
    # limits (include/uapi/linux/kvm.h; the same numbers answered on the real x86 host)
    assert (U.KVM_CAP_NR_MEMSLOTS, U.KVM_CAP_MAX_VCPUS, U.KVM_CAP_READONLY_MEM) == (10, 66, 81)
    assert (U.KVM_CAP_MULTI_ADDRESS_SPACE, U.KVM_CAP_MAX_VCPU_ID) == (118, 128)


def test_exit_reason_and_reset_ioctl_number():
    """s1: KVM_EXIT_DIRTY_RING_FULL = 31; KVM_RESET_DIRTY_RINGS = _IO(0xAE, 0xc7): direction
    NONE (0) << 30 | size 0 << 16 | type 0xAE << 8 | nr 0xC7 = 0xAEC7."""
    assert U.KVM_EXIT_DIRTY_RING_FULL == 31
    assert U.KVM_RESET_DIRTY_RINGS == 0xAEC7
    assert U.KVM_RESET_DIRTY_RINGS == (0 << 30) | (0 << 16) | (0xAE << 8) | 0xC7


def test_entry_slot_and_offset_are_relative_to_the_memslot():
    """s1: slot = as_id << 16 | slot_id (as_id 0 here), offset = gfn - slot base gfn.
    Memslot id 3 at gfn 1000; the guest writes gfn 1007 -> entry (slot 3, offset 7, DIRTY)."""
    h = Host([[7]], slot_id=3, base_gfn=1000, slot_pages=64)
    assert h.enter_and_run().kind == "done"
    g = h.vcpus[0].ring_gfns[0]
    assert (int(g["flags"]), int(g["slot"]), int(g["offset"])) == (U.KVM_DIRTY_GFN_F_DIRTY, 3, 7)


def test_memslot_in_address_space_1_is_named_with_as_id_in_the_high_half():
    """s1: slot = as_id << 16 | slot_id; x86 with SMM (x86-pml) has two address spaces: slot 5
    of as 1 -> 0x10005."""
    from ringenv.kvm import Vm

    vm = Vm("x86-pml")
    vm.set_user_memory_region(5, 0, 0, 16 * 4096, as_id=1)
    assert vm.slots[0].kvm_slot == 0x10005
