"""KVM_ENABLE_CAP / KVM_CHECK_EXTENSION rules and their errnos (reference s2 and s11;
x86 facts from real-kvm-host.md "Errors observed")."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from ringenv.config import load_host_profile
from ringenv.kvm import KvmError, SigBus, Vm
from ringenv.kvm import uapi as U

ACQ = U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL
PLAIN = U.KVM_CAP_DIRTY_LOG_RING
BITMAP = U.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP
EAGER = U.KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE
LOG = U.KVM_MEM_LOG_DIRTY_PAGES
MiB = 1 << 20
GiB = 1 << 30

ALL = ["arm64-4k", "arm64-16k", "arm64-64k", "x86-pml", "x86-nopml"]
ARM = ["arm64-4k", "arm64-16k", "arm64-64k"]
X86 = ["x86-pml", "x86-nopml"]
# The ring cap each host offers (s1: arm64 offers only ACQ_REL).
RING_CAP = {"arm64-4k": ACQ, "arm64-16k": ACQ, "arm64-64k": ACQ, "x86-pml": PLAIN, "x86-nopml": PLAIN}

# Smallest accepted ring, worked from s2: bytes >= max(reserved * 16, PAGE_SIZE), power of two.
#   arm64-4k : reserved 64  -> 1024 B; PAGE 4 KiB  -> 4096 B  = 256 entries
#   arm64-16k: reserved 64  -> 1024 B; PAGE 16 KiB -> 16384 B = 1024 entries
#   arm64-64k: reserved 64  -> 1024 B; PAGE 64 KiB -> 65536 B = 4096 entries
#   x86-pml  : reserved 576 -> 9216 B -> next power of two 16384 B = 1024 entries
#   x86-nopml: reserved 64  -> 1024 B; PAGE 4 KiB  -> 4096 B  = 256 entries
SMALLEST_BYTES = {"arm64-4k": 4096, "arm64-16k": 16384, "arm64-64k": 65536, "x86-pml": 16384, "x86-nopml": 4096}
RESERVED = {"arm64-4k": 64, "arm64-16k": 64, "arm64-64k": 64, "x86-pml": 576, "x86-nopml": 64}


def errno_of(fn, *a, **kw):
    with pytest.raises(KvmError) as ei:
        fn(*a, **kw)
    assert isinstance(ei.value, OSError)
    return ei.value.errno


# ---------------------------------------------------------------------------- ring size rules
@pytest.mark.parametrize("profile", ALL)
@pytest.mark.parametrize("size", [0, 3000, 6144, 4096 + 16, 3 * 4096])
def test_ring_size_zero_or_not_power_of_two_is_einval(profile, size):
    """s2: size 0 or not a power of two -> EINVAL (s11: 0, 3000, 6144 measured)."""
    vm = Vm(profile)
    assert errno_of(vm.enable_cap, RING_CAP[profile], size) == errno.EINVAL
    assert vm.ring_entries == 0


@pytest.mark.parametrize("profile,size", [
    ("arm64-4k", 16), ("arm64-4k", 512), ("arm64-4k", 1024), ("arm64-4k", 2048),
    ("arm64-16k", 4096), ("arm64-16k", 8192),
    ("arm64-64k", 1024), ("arm64-64k", 4096), ("arm64-64k", 16384), ("arm64-64k", 32768),
    ("x86-pml", 1024), ("x86-pml", 4096), ("x86-pml", 8192),      # 8192 < 576 * 16 = 9216
    ("x86-nopml", 1024), ("x86-nopml", 2048),
])
def test_ring_below_reserved_or_page_size_is_einval(profile, size):
    """s2: size < reserved * 16 or size < PAGE_SIZE -> EINVAL (s11: 1024, 2048 on arm64-4k)."""
    vm = Vm(profile)
    assert errno_of(vm.enable_cap, RING_CAP[profile], size) == errno.EINVAL
    assert vm.ring_entries == 0


@pytest.mark.parametrize("profile", ALL)
def test_smallest_ring_is_accepted_and_half_of_it_is_not(profile):
    """s2: smallest ring arm64-4k 256, arm64-16k 1024, arm64-64k 4096, x86-pml 1024,
    x86-nopml 256 entries; entries = bytes / 16, soft_limit = entries - reserved."""
    smallest = SMALLEST_BYTES[profile]
    vm = Vm(profile)
    assert errno_of(vm.enable_cap, RING_CAP[profile], smallest // 2) == errno.EINVAL
    vm.enable_cap(RING_CAP[profile], smallest)
    assert vm.ring_entries == smallest // 16
    vm.set_user_memory_region(0, LOG, 0, 64 * vm.page_size)
    v = vm.create_vcpu(0)
    assert v.ring.size == smallest // 16
    assert v.ring.soft_limit == smallest // 16 - RESERVED[profile]
    assert len(v.ring_gfns) == smallest // 16


def test_smallest_ring_per_profile_in_entries():
    """s2/s11 worked values; the profiles' accepted sizes start there and end at 65536."""
    expected = {"arm64-4k": 256, "arm64-16k": 1024, "arm64-64k": 4096, "x86-pml": 1024, "x86-nopml": 256}
    for name, entries in expected.items():
        p = load_host_profile(name)
        assert p.reserved_entries == RESERVED[name]
        assert p.min_ring_entries == entries
        assert p.ring_sizes[0] == entries and p.ring_sizes[-1] == 65536
        assert all(b == 2 * a for a, b in zip(p.ring_sizes, p.ring_sizes[1:]))


def test_arm64_4k_4096_bytes_is_256_entries_soft_limit_192():
    """s11: 4096 accepted on arm64-4k; 256 entries, soft limit 256 - 64 = 192."""
    vm = Vm("arm64-4k")
    vm.enable_cap(ACQ, 4096)
    v = vm.create_vcpu(0)
    assert (v.ring.size, v.ring.soft_limit) == (256, 192)


@pytest.mark.parametrize("profile", ALL)
def test_one_mib_ok_two_mib_e2big(profile):
    """s2: E2BIG above 65536 * 16 = 1 MiB; 1 MiB itself is accepted (s11)."""
    vm = Vm(profile)
    assert errno_of(vm.enable_cap, RING_CAP[profile], 2 * MiB) == errno.E2BIG
    assert vm.ring_entries == 0  # the failed call left no ring behind
    vm.enable_cap(RING_CAP[profile], MiB)
    assert vm.ring_entries == 65536


@pytest.mark.parametrize("profile", ALL)
def test_a_second_ring_too_big_is_e2big_before_already_enabled(profile):
    """s2, the kernel's order: the size rules (E2BIG above 1 MiB) come before the "already
    set" check (EINVAL): a second enable with 2 MiB is E2BIG, the first ring stays."""
    vm = Vm(profile)
    vm.enable_cap(RING_CAP[profile], SMALLEST_BYTES[profile])
    assert errno_of(vm.enable_cap, RING_CAP[profile], 2 * MiB) == errno.E2BIG
    assert vm.ring_entries == SMALLEST_BYTES[profile] // 16


@pytest.mark.parametrize("profile", ALL)
def test_args0_is_read_as_u32(profile):
    """s11: args[0] = 4 GiB is read as a u32 (0) -> EINVAL. By the same truncation
    4 GiB + smallest reads as the smallest size and is accepted (derived, not measured)."""
    vm = Vm(profile)
    assert errno_of(vm.enable_cap, RING_CAP[profile], 4 * GiB) == errno.EINVAL
    vm.enable_cap(RING_CAP[profile], 4 * GiB + SMALLEST_BYTES[profile])
    assert vm.ring_entries == SMALLEST_BYTES[profile] // 16


@pytest.mark.parametrize("profile", ALL)
def test_ring_enabled_twice_is_einval_and_keeps_the_first(profile):
    """s2: ring already set -> EINVAL (s11 "twice -> EINVAL")."""
    vm = Vm(profile)
    vm.enable_cap(RING_CAP[profile], SMALLEST_BYTES[profile])
    assert errno_of(vm.enable_cap, RING_CAP[profile], 2 * SMALLEST_BYTES[profile]) == errno.EINVAL
    assert errno_of(vm.enable_cap, RING_CAP[profile], SMALLEST_BYTES[profile]) == errno.EINVAL
    assert vm.ring_entries == SMALLEST_BYTES[profile] // 16


@pytest.mark.parametrize("profile", ALL)
def test_ring_after_a_vcpu_is_einval(profile):
    """s2: any vCPU already created -> EINVAL."""
    vm = Vm(profile)
    vm.create_vcpu(0)
    assert errno_of(vm.enable_cap, RING_CAP[profile], SMALLEST_BYTES[profile]) == errno.EINVAL
    assert vm.ring_entries == 0


@pytest.mark.parametrize("profile", ALL)
def test_ring_after_a_memslot_but_before_vcpus_is_allowed(profile):
    """s11: after a memslot but before vCPUs -> allowed."""
    vm = Vm(profile)
    vm.set_user_memory_region(0, LOG, 0, 64 * vm.page_size)
    vm.enable_cap(RING_CAP[profile], SMALLEST_BYTES[profile])
    v = vm.create_vcpu(0)
    assert v.ring.size == SMALLEST_BYTES[profile] // 16


@pytest.mark.parametrize("profile", ARM)
def test_plain_ring_cap_192_is_einval_on_arm64(profile):
    """s1/s11: arm64 offers only ACQ_REL; 192 -> EINVAL even with a valid size."""
    vm = Vm(profile)
    assert errno_of(vm.enable_cap, PLAIN, SMALLEST_BYTES[profile]) == errno.EINVAL
    assert vm.ring_entries == 0
    vm.enable_cap(ACQ, SMALLEST_BYTES[profile])


@pytest.mark.parametrize("profile", X86)
@pytest.mark.parametrize("cap", [PLAIN, ACQ])
def test_both_ring_caps_accepted_on_x86(profile, cap):
    """real-kvm-host.md: plain 192 accepted on x86 (TSO); ACQ_REL (223) reports 1 MiB too."""
    vm = Vm(profile)
    vm.enable_cap(cap, SMALLEST_BYTES[profile])
    assert vm.ring_entries == SMALLEST_BYTES[profile] // 16


# ---------------------------------------------------------------------------- WITH_BITMAP
@pytest.mark.parametrize("profile", ARM)
def test_with_bitmap_before_the_ring_is_einval(profile):
    """s2/s11: WITH_BITMAP only after the ring is on."""
    vm = Vm(profile)
    assert errno_of(vm.enable_cap, BITMAP) == errno.EINVAL
    assert vm.with_bitmap is False


@pytest.mark.parametrize("profile", ARM)
def test_with_bitmap_with_flags_is_einval(profile):
    """s11: WITH_BITMAP with flags != 0 -> EINVAL."""
    vm = Vm(profile)
    vm.enable_cap(ACQ, SMALLEST_BYTES[profile])
    assert errno_of(vm.enable_cap, BITMAP, flags=1) == errno.EINVAL
    assert vm.with_bitmap is False


@pytest.mark.parametrize("profile", ARM)
def test_with_bitmap_after_a_memslot_is_einval(profile):
    """s2/s11: WITH_BITMAP only before any memslot exists."""
    vm = Vm(profile)
    vm.enable_cap(ACQ, SMALLEST_BYTES[profile])
    vm.set_user_memory_region(0, LOG, 0, 64 * vm.page_size)
    assert errno_of(vm.enable_cap, BITMAP) == errno.EINVAL
    assert vm.with_bitmap is False


@pytest.mark.parametrize("profile", ARM)
def test_with_bitmap_after_ring_before_memslots_ok_twice(profile):
    """s11: after the ring and before memslots -> 0; a second enable also 0."""
    vm = Vm(profile)
    vm.enable_cap(ACQ, SMALLEST_BYTES[profile])
    assert vm.enable_cap(BITMAP) in (None, 0)
    assert vm.enable_cap(BITMAP) in (None, 0)
    assert vm.with_bitmap is True


@pytest.mark.parametrize("profile", X86)
def test_with_bitmap_on_x86_is_einval(profile):
    """real-kvm-host.md: WITH_BITMAP reports 0 on x86 and enabling it is EINVAL (ring on)."""
    vm = Vm(profile)
    vm.enable_cap(PLAIN, SMALLEST_BYTES[profile])
    assert vm.check_extension(BITMAP) == 0
    assert errno_of(vm.enable_cap, BITMAP) == errno.EINVAL


# ---------------------------------------------------------------------------- GET_DIRTY_LOG / RESET
@pytest.mark.parametrize("profile", ALL)
def test_get_dirty_log_with_ring_and_no_bitmap_is_enxio(profile):
    """s11 / real-kvm-host.md: KVM_GET_DIRTY_LOG with the ring but no bitmap -> ENXIO."""
    vm = Vm(profile)
    vm.enable_cap(RING_CAP[profile], SMALLEST_BYTES[profile])
    vm.set_user_memory_region(0, LOG, 0, 128 * vm.page_size)
    vm.create_vcpu(0)
    assert errno_of(vm.get_dirty_log, 0) == errno.ENXIO


@pytest.mark.parametrize("profile", ARM)
def test_get_dirty_log_with_ring_and_bitmap_works(profile):
    """s3: with WITH_BITMAP the backup bitmap is readable with KVM_GET_DIRTY_LOG (all clear)."""
    vm = Vm(profile)
    vm.enable_cap(ACQ, SMALLEST_BYTES[profile])
    vm.enable_cap(BITMAP)
    vm.set_user_memory_region(0, LOG, 0, 128 * vm.page_size)
    vm.create_vcpu(0)
    bm = vm.get_dirty_log(0)
    assert len(bm) == 2 and not bm.any()


@pytest.mark.parametrize("profile", ALL)
def test_reset_without_a_ring_is_einval(profile):
    """s6: KVM_RESET_DIRTY_RINGS on a VM without a ring -> EINVAL."""
    vm = Vm(profile)
    vm.set_user_memory_region(0, LOG, 0, 64 * vm.page_size)
    vm.create_vcpu(0)
    assert errno_of(vm.reset_dirty_rings) == errno.EINVAL


@pytest.mark.parametrize("profile", ALL)
def test_reset_with_a_ring_and_nothing_harvested_returns_0(profile):
    """real-kvm-host.md: with a ring and nothing harvested the reset returns 0 (also with no
    vCPU at all, and no TLB flush: s6 flushes only if anything was reset)."""
    vm = Vm(profile)
    vm.enable_cap(RING_CAP[profile], SMALLEST_BYTES[profile])
    assert vm.reset_dirty_rings() == 0
    vm.set_user_memory_region(0, LOG, 0, 64 * vm.page_size)
    vm.create_vcpu(0)
    vm.create_vcpu(1)
    flushes = vm.stats.tlb_flushes
    assert vm.reset_dirty_rings() == 0
    assert vm.stats.tlb_flushes == flushes


# ---------------------------------------------------------------------------- CHECK_EXTENSION
def test_check_extension_arm64_4k_values_measured():
    """s11: 192 = 0, 223 = 1048576, 225 = 1, 228 = 0, 229 = 4K | 2M | 1G."""
    vm = Vm("arm64-4k")
    assert vm.check_extension(PLAIN) == 0
    assert vm.check_extension(ACQ) == 1048576
    assert vm.check_extension(BITMAP) == 1
    assert vm.check_extension(EAGER) == 0
    assert vm.check_extension(U.KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES) == 4096 | (2 * MiB) | GiB


@pytest.mark.parametrize("profile,sizes", [
    ("arm64-16k", 16384 | (32 * MiB)),      # s7: 16K granule, 32 MiB blocks
    ("arm64-64k", 65536 | (512 * MiB)),     # s7: 64K granule, 512 MiB blocks
])
def test_check_extension_other_arm64_granules(profile, sizes):
    """s7 granules/blocks, with the arm64 values of s11 for the ring caps."""
    vm = Vm(profile)
    assert vm.check_extension(PLAIN) == 0
    assert vm.check_extension(ACQ) == 1048576
    assert vm.check_extension(BITMAP) == 1
    assert vm.check_extension(EAGER) == 0
    assert vm.check_extension(U.KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES) == sizes


@pytest.mark.parametrize("profile", X86)
def test_check_extension_x86_values_measured(profile):
    """real-kvm-host.md: 192 and 223 report 1048576, 225 reports 0."""
    vm = Vm(profile)
    assert vm.check_extension(PLAIN) == 1048576
    assert vm.check_extension(ACQ) == 1048576
    assert vm.check_extension(BITMAP) == 0


# ---------------------------------------------------------------------------- EAGER_SPLIT_CHUNK_SIZE
@pytest.mark.parametrize("chunk", [0, 4096, 2 * MiB, GiB])
def test_eager_split_chunk_zero_or_supported_block_size_ok(chunk):
    """s2: 0 or a supported block size (229 = 4K | 2M | 1G on arm64-4k), before memslots."""
    vm = Vm("arm64-4k")
    vm.enable_cap(EAGER, chunk)
    assert vm.eager_split_chunk == chunk


@pytest.mark.parametrize("chunk", [1, 8192, 3 * MiB, 4 * MiB, 32 * MiB, 512 * MiB])
def test_eager_split_chunk_unsupported_size_is_einval(chunk):
    """s2: anything but 0 or a supported block size -> EINVAL."""
    vm = Vm("arm64-4k")
    assert errno_of(vm.enable_cap, EAGER, chunk) == errno.EINVAL
    assert vm.eager_split_chunk == 0


def test_eager_split_chunk_per_granule():
    """s7: 16K granule blocks are 32 MiB; a 4K-granule 2 MiB chunk is not a block there."""
    vm = Vm("arm64-16k")
    assert errno_of(vm.enable_cap, EAGER, 2 * MiB) == errno.EINVAL
    vm.enable_cap(EAGER, 32 * MiB)
    vm = Vm("arm64-64k")
    assert errno_of(vm.enable_cap, EAGER, 32 * MiB) == errno.EINVAL
    vm.enable_cap(EAGER, 512 * MiB)


def test_eager_split_chunk_after_a_memslot_is_einval():
    """s2: only before any memslot exists (also for 0)."""
    vm = Vm("arm64-4k")
    vm.set_user_memory_region(0, 0, 0, 1024 * 4096)
    assert errno_of(vm.enable_cap, EAGER, 2 * MiB) == errno.EINVAL
    assert errno_of(vm.enable_cap, EAGER, 0) == errno.EINVAL
    assert vm.eager_split_chunk == 0


def test_eager_split_chunk_with_flags_is_einval():
    """arm64 kvm_vm_ioctl_enable_cap: cap->flags must be 0, checked first: EINVAL even with a
    supported size, and the chunk stays 0."""
    vm = Vm("arm64-4k")
    assert errno_of(vm.enable_cap, EAGER, 2 * MiB, flags=1) == errno.EINVAL
    assert vm.eager_split_chunk == 0 and vm.check_extension(EAGER) == 0


@pytest.mark.parametrize("chunk", [0, 4096, 2 * MiB, GiB])
def test_check_extension_reports_the_eager_split_chunk_set(chunk):
    """KVM_CHECK_EXTENSION(228) on the VM answers the VM's current chunk size (0 until set)."""
    vm = Vm("arm64-4k")
    vm.enable_cap(EAGER, chunk)
    assert vm.check_extension(EAGER) == chunk


@pytest.mark.parametrize("profile", ALL)
def test_check_extension_manual_protect2_offers_both_flags(profile):
    """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (168) answers KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE |
    KVM_DIRTY_LOG_INITIALLY_SET = 3 (KVM_DIRTY_LOG_MANUAL_CAPS): QEMU enables what it offers."""
    assert Vm(profile).check_extension(U.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) == 3


@pytest.mark.parametrize("profile", X86)
def test_eager_split_chunk_is_arm64_only(profile):
    """s1: KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE is an arm64 capability: not on x86."""
    vm = Vm(profile)
    assert vm.check_extension(EAGER) == 0
    assert errno_of(vm.enable_cap, EAGER, 2 * MiB) == errno.EINVAL


def test_closed_vm_and_vcpus_raise_ebadf_and_free_their_memory_at_once():
    import gc
    import weakref

    vm = Vm("arm64-4k")
    vm.enable_cap(ACQ, 4096 * 16)
    vm.set_user_memory_region(0, LOG, 0, 64 * MiB)
    v = vm.create_vcpu(0)
    state, ring = weakref.ref(vm.state), weakref.ref(v.ring_gfns)
    gc.disable()  # the VM and its vCPUs refer to each other: closing must not wait for the collector
    try:
        vm.close()
        assert state() is None and ring() is None
    finally:
        gc.enable()
    for call in (lambda: vm.reset_dirty_rings(), lambda: vm.create_vcpu(1), lambda: v.run(), lambda: v.ring_gfns):
        with pytest.raises(KvmError) as e:
            call()
        assert e.value.errno == errno.EBADF


def test_a_vm_cannot_be_copied_or_pickled():
    import copy
    import pickle

    vm = Vm("arm64-4k")
    vm.enable_cap(ACQ, 4096 * 16)
    vm.create_vcpu(0)
    for clone in (copy.deepcopy, copy.copy, pickle.dumps):
        with pytest.raises(TypeError, match="cannot be copied or pickled"):
            clone(vm)


# ---------------------------------------------------------------------------- MANUAL_DIRTY_LOG_PROTECT2
@pytest.mark.parametrize("profile", ALL)
def test_manual_protect2_initially_set_without_protect_enable_is_einval(profile):
    """kvm_vm_ioctl_enable_cap_generic: KVM_DIRTY_LOG_INITIALLY_SET is accepted only together
    with KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE; alone -> EINVAL, and nothing is enabled."""
    vm = Vm(profile)
    MP2 = U.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
    ENA, INIT = U.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, U.KVM_DIRTY_LOG_INITIALLY_SET
    assert errno_of(vm.enable_cap, MP2, INIT) == errno.EINVAL
    assert vm.manual_protect == 0
    assert errno_of(vm.enable_cap, MP2, ENA, flags=1) == errno.EINVAL
    assert errno_of(vm.enable_cap, MP2, ENA | 4) == errno.EINVAL
    vm.enable_cap(MP2, ENA | INIT)
    assert vm.manual_protect == ENA | INIT
    vm.enable_cap(MP2, ENA)
    assert vm.manual_protect == ENA
    vm.enable_cap(MP2, 0)
    assert vm.manual_protect == 0


# ---------------------------------------------------------------------------- memslot ids and errnos
# KVM_USER_MEM_SLOTS = KVM_MEM_SLOTS_NUM (SHRT_MAX) - KVM_INTERNAL_MEM_SLOTS: arm64 has no
# internal slots (32767), x86 three (32764); address spaces, per host: arm64 1, x86 with SMM
# (x86-pml) 2, this project's x86 host without SMM (x86-nopml, measured) 1.
USER_MEM_SLOTS = {"arm64": 32767, "x86": 32764}
ADDRESS_SPACES = {"arm64-4k": 1, "arm64-16k": 1, "arm64-64k": 1, "x86-pml": 2, "x86-nopml": 1}


@pytest.mark.parametrize("profile", ALL)
def test_user_mem_slots_per_arch(profile):
    """kvm_vm_ioctl_set_memory_region: (u16)slot >= KVM_USER_MEM_SLOTS -> EINVAL."""
    vm = Vm(profile)
    limit = USER_MEM_SLOTS[vm.profile.arch]
    vm.set_user_memory_region(limit - 1, 0, 0, 16 * vm.page_size)
    assert vm.slots[0].id == limit - 1
    assert errno_of(vm.set_user_memory_region, limit, 0, 1 << 30, 16 * vm.page_size) == errno.EINVAL


@pytest.mark.parametrize("profile", ALL)
def test_deleting_a_memslot_that_does_not_exist_is_einval(profile):
    """kvm_set_memory_region: memory_size 0 for a slot that does not exist -> EINVAL (also the
    second delete of a slot)."""
    vm = Vm(profile)
    assert errno_of(vm.set_user_memory_region, 5, 0, 0, 0) == errno.EINVAL
    vm.set_user_memory_region(5, LOG, 0, 16 * vm.page_size)
    vm.set_user_memory_region(5, 0, 0, 0)
    assert vm.slots == []
    assert errno_of(vm.set_user_memory_region, 5, 0, 0, 0) == errno.EINVAL


def _bitmap_vm(profile):
    """A VM that uses the dirty bitmap (no ring), one logging slot 0 of 128 pages."""
    vm = Vm(profile)
    vm.set_user_memory_region(0, LOG, 0, 128 * vm.page_size)
    vm.create_vcpu(0)
    return vm


@pytest.mark.parametrize("profile", ALL)
def test_get_and_clear_dirty_log_slot_or_as_id_out_of_range_is_einval_before_enoent(profile):
    """kvm_get_dirty_log_protect / kvm_clear_dirty_log_protect: as_id >= the address spaces or
    slot id >= KVM_USER_MEM_SLOTS -> EINVAL, checked before the slot lookup (ENOENT for an id
    in range that names no slot)."""
    vm = _bitmap_vm(profile)
    arch = vm.profile.arch
    limit, nas = USER_MEM_SLOTS[arch], ADDRESS_SPACES[profile]
    bm = np.zeros(2, dtype=np.uint64)
    for slot, as_id in [(limit, 0), (limit + 100, 0), (0, nas), (-1, 0)]:
        assert errno_of(vm.get_dirty_log, slot, as_id=as_id) == errno.EINVAL
        assert errno_of(vm.clear_dirty_log, slot, 0, 64, bm, as_id=as_id) == errno.EINVAL
    assert errno_of(vm.clear_dirty_log, limit, 1, 64, bm) == errno.EINVAL
    assert errno_of(vm.get_dirty_log, limit - 1) == errno.ENOENT
    assert errno_of(vm.clear_dirty_log, limit - 1, 0, 64, bm) == errno.ENOENT
    if nas > 1:
        assert errno_of(vm.get_dirty_log, 0, as_id=nas - 1) == errno.ENOENT


@pytest.mark.parametrize("profile", ALL)
def test_get_dirty_log_enxio_comes_before_the_slot_range_check(profile):
    """kvm_get_dirty_log_protect: "dirty ring tracking may be exclusive": with a ring and no
    bitmap ENXIO comes first, whatever the slot id."""
    vm = Vm(profile)
    vm.enable_cap(RING_CAP[profile], SMALLEST_BYTES[profile])
    assert errno_of(vm.get_dirty_log, USER_MEM_SLOTS[vm.profile.arch]) == errno.ENXIO
    assert errno_of(vm.clear_dirty_log, USER_MEM_SLOTS[vm.profile.arch], 0, 64,
                    np.zeros(1, dtype=np.uint64)) == errno.ENXIO


# ---------------------------------------------------------------------------- mmap of the ring
@pytest.mark.parametrize("profile", ALL)
def test_the_ring_maps_shared_only_and_never_executable(profile):
    """s11 / real-kvm-host.md: mmap of the ring MAP_PRIVATE is EINVAL (kvm_vcpu_mmap); with
    PROT_EXEC it is EPERM, from the VFS before KVM (a vCPU fd is an anon inode: noexec; measured
    on this project's host, tests/realkvm). Shared and read-write it is the ring itself."""
    import mmap

    vm = Vm(profile)
    vm.enable_cap(RING_CAP[profile], SMALLEST_BYTES[profile])
    v = vm.create_vcpu(0)
    assert errno_of(v.mmap_ring, flags=mmap.MAP_PRIVATE) == errno.EINVAL
    assert errno_of(v.mmap_ring, prot=mmap.PROT_READ | mmap.PROT_EXEC) == errno.EPERM
    assert errno_of(v.mmap_ring, prot=mmap.PROT_EXEC, flags=mmap.MAP_PRIVATE) == errno.EPERM
    ring = v.mmap_ring()
    assert ring is v.ring_gfns and len(ring) == SMALLEST_BYTES[profile] // 16
    # no ring: no page is the ring's, so kvm_vcpu_mmap maps it, shared or private (measured on
    # the real host); the first access is SIGBUS (kvm_vcpu_fault)
    for flags in (mmap.MAP_SHARED, mmap.MAP_PRIVATE):
        unbacked = Vm(profile).create_vcpu(0).mmap_ring(flags=flags)
        with pytest.raises(SigBus):
            unbacked[0]
        with pytest.raises(SigBus):
            np.asarray(unbacked)
    assert errno_of(Vm(profile).create_vcpu(0).mmap_ring, prot=mmap.PROT_EXEC) == errno.EPERM


@pytest.mark.parametrize("arg,said", [
    (0, "dirty ring size 0 bytes is not a power of two; accepted: powers of two from 4096 to 1048576 bytes"),
    (3000, "dirty ring size 3000 bytes is not a power of two; accepted: powers of two from 4096 to 1048576 bytes"),
    (4 << 30, "args[0] 4294967296 is read as a u32 (struct kvm_enable_cap's size): dirty ring size 0 bytes is not a "
              "power of two"),
    (-1, "args[0] -1 is read as a u32 (struct kvm_enable_cap's size): dirty ring size 4294967295 bytes is not a "
         "power of two"),
])
def test_ring_size_error_names_the_value_given_and_the_u32_truncation(arg, said):
    """The EINVAL's message for a size that is no power of two says what is accepted, and for an
    args[0] beyond a u32 names the value given and that KVM reads only its low 32 bits (4 GiB
    said "0 bytes" before, naming neither)."""
    vm = Vm("arm64-4k")
    with pytest.raises(KvmError) as ei:
        vm.enable_cap(RING_CAP["arm64-4k"], arg)
    assert ei.value.errno == errno.EINVAL and said in str(ei.value), str(ei.value)
