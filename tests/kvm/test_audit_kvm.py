"""The simulated KVM ioctl surface against the kernel (virt/kvm/kvm_main.c), cases an audit
found failing before their fixes. Each test states what KVM returns, where in the kernel, and
(where it could be measured) what this project's real host (/dev/kvm, x86) returned."""

import errno
import mmap

import numpy as np
import pytest

from ringenv.kvm import KvmError, SigBus, Vm
from ringenv.kvm import uapi as U

RING_BYTES = {"arm64-4k": 4096, "arm64-16k": 16384, "arm64-64k": 65536, "x86-nopml": 4096, "x86-pml": 16384}


# ---------------------------------------------------------------------------- 1. mmap without a ring
@pytest.mark.parametrize("profile", ["arm64-4k", "x86-nopml"])
@pytest.mark.parametrize("flags", [mmap.MAP_SHARED, mmap.MAP_PRIVATE])
def test_mmap_of_the_ring_page_offset_without_a_ring_is_not_einval(profile, flags):
    """kvm_vcpu_mmap (virt/kvm/kvm_main.c) refuses a mapping only if it touches the ring
    (kvm_page_in_dirty_ring) AND is VM_EXEC or not VM_SHARED. Without a ring,
    kvm->dirty_ring_size is 0, so no page offset is "in the dirty ring" and the mmap succeeds
    (MAP_SHARED and MAP_PRIVATE alike); only touching the page fails, with SIGBUS
    (kvm_vcpu_fault -> kvm_arch_vcpu_fault). Measured on this host: both mmaps returned a
    mapping, the first access was killed by SIGBUS."""
    vm = Vm(profile)
    v = vm.create_vcpu(0)
    try:
        m = v.mmap_ring(flags=flags)
    except KvmError as e:
        pytest.fail(f"mmap at KVM_DIRTY_LOG_PAGE_OFFSET without a ring: KVM maps it, the simulator raised {e}")
    with pytest.raises(SigBus):
        m[0] = 1


# ---------------------------------------------------------------------------- 2. CLEAR_DIRTY_LOG fields
def _logging_vm(pages=256):
    vm = Vm("x86-nopml")
    vm.enable_cap(U.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, U.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    vm.set_user_memory_region(0, U.KVM_MEM_LOG_DIRTY_PAGES, 0, pages * vm.page_size)
    return vm


def test_clear_dirty_log_first_page_outside_u64_is_einval_and_clears_nothing():
    """struct kvm_clear_dirty_log.first_page is a __u64: -128 reaches the kernel as 2^64 - 128,
    which passes the 64-alignment check and fails kvm_clear_dirty_log_protect's range check
    (first_page > memslot->npages) with EINVAL; nothing is cleared. Measured on this host:
    EINVAL. (set_user_memory_region already refuses values outside its __u64 fields.)
    The simulator accepts it and, through a negative numpy slice, clears the dirty bits of
    pages 128..191, which the call never named, without re-protecting them."""
    vm = _logging_vm()
    vm.write_without_vcpu(np.arange(128, 192))  # pages 128..191 dirty in the slot bitmap
    before = vm.get_dirty_log(0).copy()
    assert before[2] == np.uint64(2**64 - 1)
    with pytest.raises(KvmError) as e:
        vm.clear_dirty_log(0, -128, 64, np.full(1, 2**64 - 1, dtype=np.uint64))
    assert e.value.errno == errno.EINVAL
    assert (vm.get_dirty_log(0) == before).all()


def test_clear_dirty_log_num_pages_outside_u32_is_einval():
    """struct kvm_clear_dirty_log.num_pages is a __u32: -64 reaches the kernel as 2^32 - 64,
    which fails num_pages > npages - first_page (kvm_clear_dirty_log_protect): EINVAL.
    Measured on this host: EINVAL."""
    for words in (4, 1 << 16):
        vm = _logging_vm()
        with pytest.raises(KvmError) as e:
            vm.clear_dirty_log(0, 0, -64, np.zeros(words, dtype=np.uint64))
        assert e.value.errno == errno.EINVAL


def test_clear_dirty_log_with_a_bitmap_shorter_than_num_pages_is_efault():
    """kvm_clear_dirty_log_protect copies ALIGN(num_pages, 64) / 8 bytes from the user's
    bitmap (copy_from_user); if they cannot all be read the ioctl fails with EFAULT, after all
    argument checks passed. It has no way to know a buffer's size, so it never answers EINVAL
    for this. Measured on this host: a 1-word readable bitmap with num_pages 128 -> EFAULT
    (64 -> ok)."""
    vm = _logging_vm(128)
    with pytest.raises(KvmError) as e:
        vm.clear_dirty_log(0, 0, 128, np.zeros(1, dtype=np.uint64))
    assert e.value.errno == errno.EFAULT


# ---------------------------------------------------------------------------- 3. KVM_RUN while in KVM_RUN
@pytest.mark.parametrize("profile", ["arm64-4k", "x86-nopml"])
def test_kvm_run_on_a_vcpu_that_is_in_kvm_run_returns_no_ebusy(profile):
    """KVM has no EBUSY for KVM_RUN: kvm_vcpu_ioctl takes vcpu->mutex with
    mutex_lock_killable, so a second KVM_RUN on a vCPU whose thread is inside KVM_RUN waits
    for the first to return and then runs the vCPU itself (or fails with EINTR if killed). The
    single-threaded simulator cannot wait: a second run() is a usage error, not a KVM errno."""
    vm = Vm(profile)
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, RING_BYTES[profile])
    v = vm.create_vcpu(0)
    assert v.run() is None and v.in_guest
    with pytest.raises(RuntimeError, match="vcpu->mutex") as e:
        v.run()
    assert not isinstance(e.value, OSError)  # no errno: KVM_RUN never returns EBUSY
