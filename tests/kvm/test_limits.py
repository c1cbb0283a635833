"""Per-VM limits of the kernel and how KVM_CHECK_EXTENSION reports them: memslot address spaces,
vCPU ids and count, memslot ids, the guest-physical range a memslot must fit in.

Kernel rules (Linux 6.x, re-stated): kvm_set_memory_region checks as_id <
kvm_arch_nr_memslot_as_ids (x86: 2 with CONFIG_KVM_SMM, else 1; arm64 1) and that gpa + size
does not wrap 2^64 (EINVAL); x86 kvm_arch_prepare_memory_region refuses a created or moved slot
whose last gfn is above kvm_mmu_max_gfn (EINVAL), arm64's one whose end is above the VM's IPA
size (EFAULT; default IPA 40 bits, KVM_PHYS_SHIFT). kvm_vm_ioctl_create_vcpu: id >=
KVM_MAX_VCPU_IDS, then created_vcpus >= max_vcpus: EINVAL (x86: ids < 4096, at most 1024 vCPUs;
arm64: 512 and 512, the vGICv3 limit), a duplicate id EEXIST after both. Measured on this
project's x86 host (kvm_pvm, Linux 6.18): NR_MEMSLOTS 32764, MAX_VCPUS 1024, MAX_VCPU_ID 4096,
READONLY_MEM 1, MULTI_ADDRESS_SPACE 0."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from ringenv.kvm import KvmError, Vm
from ringenv.kvm import uapi as U

ALL = ["arm64-4k", "arm64-16k", "arm64-64k", "x86-pml", "x86-nopml"]
ARM = ["arm64-4k", "arm64-16k", "arm64-64k"]
LOG = U.KVM_MEM_LOG_DIRTY_PAGES
# memslot address spaces: this host (x86 without SMM) 1, an x86 kernel with SMM 2, arm64 1
ADDRESS_SPACES = {"arm64-4k": 1, "arm64-16k": 1, "arm64-64k": 1, "x86-pml": 2, "x86-nopml": 1}
# guest-physical bits: x86-nopml 52 (shadow paging, measured), x86-pml 46 (Xeon MAXPHYADDR under
# EPT), arm64 40 (the default IPA size)
PHYS_BITS = {"arm64-4k": 40, "arm64-16k": 40, "arm64-64k": 40, "x86-pml": 46, "x86-nopml": 52}
BEYOND = {"arm64-4k": errno.EFAULT, "arm64-16k": errno.EFAULT, "arm64-64k": errno.EFAULT,
          "x86-pml": errno.EINVAL, "x86-nopml": errno.EINVAL}


def errno_of(fn, *a, **kw):
    with pytest.raises(KvmError) as ei:
        fn(*a, **kw)
    return ei.value.errno


# ---------------------------------------------------------------------------- address spaces
@pytest.mark.parametrize("profile", ALL)
def test_address_spaces_are_the_profiles(profile):
    """The profile says how many memslot address spaces a VM has; KVM_CAP_MULTI_ADDRESS_SPACE
    reports it when there are several, and 0 with one (the kernel compiles the case out)."""
    vm = Vm(profile)
    nas = ADDRESS_SPACES[profile]
    assert vm.profile.address_spaces == nas
    assert vm.check_extension(U.KVM_CAP_MULTI_ADDRESS_SPACE) == (nas if nas > 1 else 0)


@pytest.mark.parametrize("profile", ALL)
def test_memslot_and_dirty_log_in_an_address_space_beyond_the_hosts_is_einval(profile):
    """as_id 1 (slot field 0x10000) is EINVAL where the host has one address space (x86-nopml,
    measured: KVM_SET_USER_MEMORY_REGION, GET_DIRTY_LOG and CLEAR_DIRTY_LOG); with SMM it is a
    second address space (an unknown slot there: ENOENT)."""
    vm = Vm(profile)
    vm.set_user_memory_region(0, LOG, 0, 128 * vm.page_size)
    vm.create_vcpu(0)
    nas = ADDRESS_SPACES[profile]
    bm = np.zeros(2, dtype=np.uint64)
    assert errno_of(vm.set_user_memory_region, 0, 0, 0, 16 * vm.page_size, as_id=nas) == errno.EINVAL
    assert errno_of(vm.get_dirty_log, 0, as_id=nas) == errno.EINVAL
    assert errno_of(vm.clear_dirty_log, 0, 0, 64, bm, as_id=nas) == errno.EINVAL
    if nas > 1:
        assert errno_of(vm.get_dirty_log, 0, as_id=1) == errno.ENOENT
        vm.set_user_memory_region(0, LOG, 0, 16 * vm.page_size, as_id=1)
        assert vm._slot(0, 1).kvm_slot == 0x10000


def test_x86_nopml_as_id_1_is_einval_where_the_simulator_used_to_say_enoent():
    """The cross-check's cases: slot field 0x10000 on x86-nopml: GET_DIRTY_LOG EINVAL (was
    ENOENT), SET_USER_MEMORY_REGION EINVAL (was accepted)."""
    vm = Vm("x86-nopml")
    vm.set_user_memory_region(0, LOG, 0, 128 * 4096)
    assert errno_of(vm.get_dirty_log, 0, as_id=1) == errno.EINVAL
    assert errno_of(vm.set_user_memory_region, 5, 0, 1 << 30, 16 * 4096, as_id=1) == errno.EINVAL
    assert len(vm.slots) == 1


# ---------------------------------------------------------------------------- capabilities
@pytest.mark.parametrize("profile", ALL)
def test_check_extension_reports_the_kernels_limits(profile):
    """NR_MEMSLOTS = KVM_USER_MEM_SLOTS (x86 32764, arm64 32767); READONLY_MEM 1; MAX_VCPUS
    and MAX_VCPU_ID: x86 1024 and 4096 (measured), arm64 both kvm->max_vcpus, 512 (vGICv3)."""
    vm = Vm(profile)
    x86 = vm.profile.arch == "x86"
    assert vm.check_extension(U.KVM_CAP_NR_MEMSLOTS) == (32764 if x86 else 32767)
    assert vm.check_extension(U.KVM_CAP_READONLY_MEM) == 1
    assert vm.check_extension(U.KVM_CAP_MAX_VCPUS) == (1024 if x86 else 512)
    assert vm.check_extension(U.KVM_CAP_MAX_VCPU_ID) == (4096 if x86 else 512)


# ---------------------------------------------------------------------------- vCPU ids and count
@pytest.mark.parametrize("profile", ["x86-nopml", "x86-pml"])
def test_x86_vcpu_ids_below_4096_but_at_most_1024_vcpus(profile):
    """x86: id 4095 is fine, 4096 EINVAL; the 1025th vCPU is EINVAL whatever its id, and the
    count is checked before the duplicate id (EEXIST only while there is room)."""
    vm = Vm(profile)
    assert errno_of(vm.create_vcpu, 4096) == errno.EINVAL
    vm.create_vcpu(4095)
    assert errno_of(vm.create_vcpu, 4095) == errno.EEXIST
    for i in range(1023):
        vm.create_vcpu(i)
    assert len(vm.vcpus) == 1024
    assert errno_of(vm.create_vcpu, 1023) == errno.EINVAL  # a new id, but no room
    assert errno_of(vm.create_vcpu, 4095) == errno.EINVAL  # count first, then EEXIST
    assert len(vm.vcpus) == 1024


@pytest.mark.parametrize("profile", ARM)
def test_arm64_vcpu_ids_and_count_are_both_512(profile):
    """arm64: KVM_MAX_VCPU_IDS = KVM_MAX_VCPUS = 512 and kvm_arch_vcpu_precreate refuses an id
    >= kvm->max_vcpus (512 with a vGICv3 host): ids 0..511, so at most 512 vCPUs."""
    vm = Vm(profile)
    assert errno_of(vm.create_vcpu, 512) == errno.EINVAL
    for i in range(512):
        vm.create_vcpu(i)
    assert errno_of(vm.create_vcpu, 0) == errno.EINVAL  # full: the count comes before EEXIST
    assert len(vm.vcpus) == 512


# ---------------------------------------------------------------------------- memslot GPA range
@pytest.mark.parametrize("profile", ALL)
def test_memslot_must_end_within_the_guest_physical_range(profile):
    """A slot ending exactly at 2^bits is accepted; one page more is refused (x86 EINVAL:
    last gfn > kvm_mmu_max_gfn; arm64 EFAULT: end > IPA size), also when moving a slot there."""
    vm = Vm(profile)
    ps, top = vm.page_size, 1 << PHYS_BITS[profile]
    vm.set_user_memory_region(0, 0, top - 48 * ps, 16 * ps)
    assert errno_of(vm.set_user_memory_region, 1, 0, top, 16 * ps) == BEYOND[profile]
    assert errno_of(vm.set_user_memory_region, 1, 0, top - 15 * ps, 16 * ps) == BEYOND[profile]
    vm.set_user_memory_region(1, LOG, top - 16 * ps, 16 * ps)  # ends at 2^bits: fits
    assert errno_of(vm.set_user_memory_region, 0, 0, top, 16 * ps) == BEYOND[profile]  # a move
    assert [(s.id, s.base_gfn) for s in vm.slots] == [(0, (top - 48 * ps) // ps), (1, (top - 16 * ps) // ps)]


def test_x86_nopml_max_gfn_as_measured():
    """The cross-check on this host: 16 pages at 2^52 - 64 KiB fine, at 2^52 EINVAL."""
    vm = Vm("x86-nopml")
    vm.set_user_memory_region(0, 0, (1 << 52) - 16 * 4096, 16 * 4096)
    assert errno_of(vm.set_user_memory_region, 1, 0, 1 << 52, 16 * 4096) == errno.EINVAL


@pytest.mark.parametrize("profile", ALL)
def test_memslot_wrapping_2_to_the_64_is_einval(profile):
    """kvm_set_memory_region: guest_phys_addr + memory_size wraps u64 -> EINVAL (before the
    slot lookup: also for a slot id that exists, and before the arch's range check)."""
    vm = Vm(profile)
    ps = vm.page_size
    assert errno_of(vm.set_user_memory_region, 0, 0, (1 << 64) - ps, 2 * ps) == errno.EINVAL
    assert errno_of(vm.set_user_memory_region, 0, 0, (1 << 64) - ps, ps) == errno.EINVAL  # sum is 0
    vm.set_user_memory_region(0, 0, 0, 2 * ps)
    assert errno_of(vm.set_user_memory_region, 0, 0, (1 << 64) - ps, 2 * ps) == errno.EINVAL
    assert vm.slots[0].base_gfn == 0


@pytest.mark.parametrize("profile", ALL)
@pytest.mark.parametrize("field", ["guest_phys_addr", "memory_size"])
@pytest.mark.parametrize("value", [-4096, 1 << 64])
def test_a_memslot_address_or_size_outside_u64_is_einval_and_builds_nothing(profile, field, value):
    """guest_phys_addr and memory_size are __u64 fields: a value no u64 holds (negative, or
    2^64 and above) is EINVAL naming the field, and no slot is created or changed."""
    vm = Vm(profile)
    ps = vm.page_size
    vm.set_user_memory_region(0, 0, 0, 2 * ps)
    args = {"guest_phys_addr": 16 * ps, "memory_size": 2 * ps, field: value}
    with pytest.raises(KvmError) as e:
        vm.set_user_memory_region(1, 0, args["guest_phys_addr"], args["memory_size"])
    assert e.value.errno == errno.EINVAL and f"{field} {value}: a __u64 field" in str(e.value)
    with pytest.raises(KvmError):  # nor on an existing slot (a move or a resize)
        vm.set_user_memory_region(0, 0, args["guest_phys_addr"], args["memory_size"])
    assert [(s.id, s.base_gfn, s.npages) for s in vm.slots] == [(0, 0, 2)]


@pytest.mark.parametrize("profile", ALL)
def test_overlap_comes_before_the_range_check(profile):
    """EEXIST (generic, before kvm_set_memslot) wins over the arch's prepare check."""
    vm = Vm(profile)
    ps, top = vm.page_size, 1 << PHYS_BITS[profile]
    vm.set_user_memory_region(0, 0, top - 16 * ps, 16 * ps)
    assert errno_of(vm.set_user_memory_region, 1, 0, top - 8 * ps, 16 * ps) == errno.EEXIST


@pytest.mark.parametrize("profile", ALL)
def test_a_memslot_of_more_than_2_31_minus_1_pages_is_einval_before_anything_is_built(profile):
    """kvm_set_memory_region: memory_size >> PAGE_SHIFT > KVM_MEM_MAX_NR_PAGES is EINVAL (a
    generic check, before the architecture's range check)."""
    vm = Vm(profile)
    ps = vm.profile.page_size
    with pytest.raises(KvmError) as e:
        vm.set_user_memory_region(0, LOG, 0, (1 << 31) * ps)
    assert e.value.errno == errno.EINVAL and "KVM_MEM_MAX_NR_PAGES" in str(e.value) and not vm.slots
