"""The enable-cap / ioctl error cases on the real KVM, and the simulator's answers to them."""

import pytest

from ringenv.realkvm.errors import errno_table
from ringenv.realkvm.guest import unavailable_reason

NO_KVM = unavailable_reason()
pytestmark = [pytest.mark.kvm, pytest.mark.skipif(NO_KVM is not None, reason=str(NO_KVM))]

# docs/reference/real-kvm-host.md, "Errors observed" (x86 without WITH_BITMAP)
REFERENCE = {
    "ring_size_0": "EINVAL",
    "ring_not_power_of_two": "EINVAL",
    "ring_below_4096_bytes": "EINVAL",
    "ring_2mib": "E2BIG",
    "ring_after_vcpu": "EINVAL",
    "ring_twice": "EINVAL",
    "plain_ring_192": "ok",
    "with_bitmap": "EINVAL",
    "get_dirty_log_with_ring": "ENXIO",
    "ring_mmap_private": "EINVAL",
    "ring_mmap_exec": "EPERM",  # measured: the VFS refuses PROT_EXEC on an anon inode before KVM
    "reset_without_ring": "EINVAL",
    "reset_with_ring_nothing_harvested": 0,
}


@pytest.fixture(scope="module")
def real_table():
    return errno_table()


def test_real_kvm_matches_the_reference(real_table):
    assert real_table == REFERENCE


def test_simulator_gives_the_same_errors(real_table):
    try:
        from ringenv.kvm import Vm
        from ringenv.realkvm.arch import host_arch
    except ImportError as exc:
        pytest.skip(f"simulator not importable: {exc}")
    profile = host_arch().profile_name()
    sim = errno_table(lambda: Vm(profile))
    assert sim == real_table
