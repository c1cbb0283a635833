"""The array helpers of ringenv/arrays.py that carry state: the recycler of page arrays."""

import numpy as np
import pytest

from ringenv.arrays import Recycler


@pytest.fixture
def recycler(monkeypatch):
    """A fresh process recycler for the VM's and the VMM's page arrays: what earlier tests left
    in the real one (arrays still held by their runs, or trimmed) does not change these."""
    import ringenv.arrays
    import ringenv.kvm.vm
    import ringenv.vmm.dirty

    fresh = Recycler()
    for mod in (ringenv.arrays, ringenv.kvm.vm, ringenv.vmm.dirty):
        monkeypatch.setattr(mod, "RECYCLER", fresh)
    return fresh


def _addr(a):
    return a.__array_interface__["data"][0]  # (a.ctypes would hold a reference to a)


def test_an_array_nobody_holds_is_handed_out_again_cleared():
    r = Recycler(min_bytes=0)
    a = r.zeros(1000, np.uint32)
    a[:] = 7
    addr = _addr(a)
    del a
    b = r.zeros(1000, np.uint32)
    assert _addr(b) == addr and not b.any()
    assert r.kept_bytes == 4000  # the same array: none was added


def test_empty_hands_out_a_kept_array_as_its_last_user_left_it():
    r = Recycler(min_bytes=0)
    a = r.empty(1000, np.uint32)
    assert not a.any()  # a new array is zeroed all the same
    a[:] = 7
    addr = _addr(a)
    del a
    b = r.empty(1000, np.uint32)
    assert _addr(b) == addr and (b == 7).all()
    del b
    assert not r.zeros(1000, np.uint32).any()  # zeros clears what empty left


def test_an_array_or_a_view_still_held_is_never_handed_out():
    r = Recycler(min_bytes=0)
    a = r.zeros(1000, np.uint8)
    view = a[10:20]
    del a
    b = r.zeros(1000, np.uint8)
    assert _addr(b) != _addr(view.base)
    b[:] = 1
    view[:] = 3
    assert (b == 1).all() and (view == 3).all()  # no aliasing either way
    c = r.zeros(1000, np.uint8)
    assert _addr(c) not in (_addr(b), _addr(view.base))


def test_shape_and_dtype_must_match():
    r = Recycler(min_bytes=0)
    a = r.zeros(64, np.uint32)
    addr = _addr(a)
    del a
    assert _addr(r.zeros(64, np.int32)) != addr
    assert _addr(r.zeros(65, np.uint32)) != addr
    assert r.kept_bytes == 256 + 256 + 260
    assert _addr(r.zeros(64, np.uint32)) == addr
    assert r.kept_bytes == 256 + 256 + 260


def test_small_arrays_are_not_kept_and_the_kept_bytes_are_capped():
    r = Recycler(min_bytes=4096, max_bytes=3 * 8192)
    r.zeros(100, np.uint8)
    assert r.kept_bytes == 0
    held = [r.zeros(1024, np.float64) for _ in range(5)]  # 8 KiB each, all in use
    assert r.kept_bytes <= 3 * 8192
    del held
    for _ in range(10):
        r.zeros(1024, np.float64)
    assert r.kept_bytes <= 3 * 8192


def test_a_simulated_vm_rebuilt_per_episode_reuses_its_page_arrays(recycler):
    """A dropped VM's page state comes back to the next VM: the process does not grow with
    the number of VMs built (as an env does per episode)."""
    RECYCLER = recycler
    from ringenv.kvm.uapi import KVM_MEM_LOG_DIRTY_PAGES
    from ringenv.kvm.vm import Vm

    def build():
        vm = Vm("arm64-4k")
        vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 2 << 30)  # version: 2 MiB
        return _addr(vm.version)

    build()
    kept = RECYCLER.kept_bytes
    assert kept >= 2 << 20
    addrs = {build() for _ in range(5)}
    assert len(addrs) == 1 and RECYCLER.kept_bytes == kept


def test_a_vm_without_page_versions_runs_the_same_and_skips_clearing_them(recycler):
    """page_versions=False (the dirty-rate sample's VM): the same faults, ring entries and
    dirty log as a VM with versions; only its version array is left as the last VM left it."""
    from ringenv.kvm.uapi import KVM_MEM_LOG_DIRTY_PAGES
    from ringenv.kvm.vm import Vm
    from ringenv.guest.trace import TraceProgram

    def run(versions):
        vm = Vm("arm64-4k", page_versions=versions)
        vm.set_user_memory_region(0, 0, 0, 2 << 30)  # version: 2 MiB, recycled
        vm.create_vcpu(0)
        vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0, 2 << 30)
        vm.attach_guest(TraceProgram([[5, 9, 5, 4000, 12]], [[]]))
        vm.vcpus[0].run()
        vm.run_until(1 << 40)
        out = (vm.vcpus[0].stats.faults, vm.get_dirty_log(0).tolist(), vm.version.copy(), _addr(vm.version))
        vm.close()
        return out

    faults, log, version, addr = run(True)
    assert version[[5, 9, 4000, 12]].tolist() == [2, 1, 1, 1] and version.sum() == 5  # a bump per write
    faults2, log2, version2, addr2 = run(False)  # gets the first VM's array back, not cleared
    assert (faults2, log2) == (faults, log) and addr2 == addr
    assert version2[[5, 9, 4000, 12]].tolist() == [4, 2, 2, 2]
    _, _, version3, _ = run(True)
    assert np.array_equal(version3, version)  # cleared again for a VM that keeps versions
