"""API traps a KVM engineer's walkthrough found (a helper drove the simulated kernel as QEMU
and the kernel selftests drive the real one): each used to do something silently wrong."""

from __future__ import annotations

import errno
import mmap

import numpy as np
import pytest

from ringenv.kvm import Vm
from ringenv.kvm import uapi as U
from ringenv.vmm.reap import RingReader

from ._helpers import Host

PAGE = 4096


def test_a_negative_reap_limit_is_refused_and_leaves_the_reader_as_it_was():
    """RingReader.reap(limit=-1) used to return the whole ring's slots (zeros included), mark
    nothing and move the fetch index to -1, after which nothing was ever harvested again."""
    h = Host([[1, 2, 3]], [[2]])
    assert h.enter_and_run().kind == "sync"
    r = h.readers[0]
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="limit"):
            r.reap(bad)
    assert r.fetch == 0
    assert r.reap(2)[1].tolist() == [1, 2] and r.reap(0)[1].tolist() == [] and r.reap()[1].tolist() == [3]
    assert h.reset() == 3


def test_a_reader_of_a_vcpu_without_a_ring_is_sigbus():
    """No ring: the vCPU fd's ring page has nothing behind it (kvm_vcpu_fault: SIGBUS); building
    a reader on it used to fail with an AttributeError about a view."""
    vm = Vm("arm64-4k")
    vm.set_user_memory_region(0, U.KVM_MEM_LOG_DIRTY_PAGES, 0, 64 * PAGE)
    v = vm.create_vcpu(0)
    with pytest.raises(U.SigBus):
        RingReader(v.mmap_ring())


def test_a_ring_mapped_without_prot_write_cannot_be_written():
    """mmap(PROT_READ) of the ring: a store to it would be SIGSEGV on a real host; it used to
    return the writable entries."""
    h = Host([[1, 2, 3]], [[2]])
    assert h.enter_and_run().kind == "sync"
    ro = h.vcpus[0].mmap_ring(mmap.PROT_READ)
    assert ro["offset"][:3].tolist() == [1, 2, 3]  # it reads the live entries
    with pytest.raises(ValueError, match="read-only"):
        ro["flags"][0] = U.KVM_DIRTY_GFN_F_RESET
    with pytest.raises(ValueError, match="read-only"):
        RingReader(ro)
    assert h.vcpus[0].mmap_ring()["flags"].flags.writeable


def test_a_kernel_write_into_a_read_only_slot_is_efault_and_logs_nothing():
    """kvm_write_guest -> __gfn_to_hva_many refuses a write into a KVM_MEM_READONLY slot: EFAULT.
    write_without_vcpu used to bump the page and set its bit in the backup bitmap."""
    vm = Vm("arm64-4k")
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 256 * 16)
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
    vm.set_user_memory_region(0, U.KVM_MEM_LOG_DIRTY_PAGES, 0, 64 * PAGE)
    vm.set_user_memory_region(1, U.KVM_MEM_LOG_DIRTY_PAGES | U.KVM_MEM_READONLY, 64 * PAGE, 64 * PAGE)
    vm.create_vcpu(0)
    with pytest.raises(U.KvmError) as e:
        vm.write_without_vcpu(np.array([3, 65]))
    assert e.value.errno == errno.EFAULT and "READONLY" in str(e.value)
    assert int(vm.version[vm.memslot(0).start + 3]) == 0  # nothing written, not even the first gfn
    assert not vm.get_dirty_log(1).any() and not vm.get_dirty_log(0).any()
    vm.write_without_vcpu(np.array([3]))
    assert int(vm.version[vm.memslot(0).start + 3]) == 1 and vm.get_dirty_log(0).any()
