"""The VM limits of the real KVM against the simulator's profile for this host: KVM_CHECK_EXTENSION
of the limits, memslot address spaces and guest-physical range, the vCPU count; and a write
that only a later memslot move maps (the walk must not look it up before the guest gets there)."""

import errno
import mmap
import os

import numpy as np
import pytest

from ringenv.realkvm import ioctl as k
from ringenv.realkvm.arch import WriteProgram
from ringenv.realkvm.guest import DATA_SLOT, Guest, unavailable_reason

NO_KVM = unavailable_reason()
pytestmark = [pytest.mark.kvm, pytest.mark.skipif(NO_KVM is not None, reason=str(NO_KVM))]

PAGE = k.PAGE_SIZE
LOG = k.KVM_MEM_LOG_DIRTY_PAGES
CAPS = {"NR_MEMSLOTS": 10, "MAX_VCPUS": 66, "READONLY_MEM": 81, "MULTI_ADDRESS_SPACE": 118, "MAX_VCPU_ID": 128}


@pytest.fixture(scope="module")
def sim():
    """A new simulated VM on the profile of this host."""
    try:
        from ringenv.kvm import Vm
        from ringenv.realkvm.arch import host_arch
    except ImportError as exc:
        pytest.skip(f"simulator not importable: {exc}")
    profile = host_arch().profile_name()
    return lambda: Vm(profile)


def outcome(fn, *a, **kw):
    try:
        fn(*a, **kw)
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return "ok"


def _region(vm, slot_field, flags, gpa, size, uaddr):
    """KVM_SET_USER_MEMORY_REGION with a raw u32 slot field (as_id << 16 | id)."""
    k.ioctl(vm.fd, k.KVM_SET_USER_MEMORY_REGION, k.kvm_userspace_memory_region(
        slot=slot_field, flags=flags, guest_phys_addr=gpa, memory_size=size, userspace_addr=uaddr))


def test_check_extension_limits_match(sim):
    with k.KvmSystem() as system, system.create_vm() as vm:
        real = {name: vm.check_extension(cap) for name, cap in CAPS.items()}
    model = sim()
    assert {name: model.check_extension(cap) for name, cap in CAPS.items()} == real


def test_memslot_errors_match(sim):
    """Address space 1 (slot field 0x10000), the top of the guest-physical range, a wrap of 2^64."""
    top = 1 << sim().profile.phys_addr_bits
    cases = {  # name: (slot field, gpa, pages)
        "as_id_1": (1 << 16, 0, 16),
        "ends_at_the_top": (0, top - 16 * PAGE, 16),
        "starts_at_the_top": (0, top, 16),
        "wraps_2_64": (0, (1 << 64) - PAGE, 2),
    }
    real, model = {}, {}
    backing = mmap.mmap(-1, 16 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # page-aligned
    with k.KvmSystem() as system:
        for name, (field, gpa, pages) in cases.items():
            with system.create_vm() as vm:
                real[name] = outcome(_region, vm, field, 0, gpa, pages * PAGE, k.address_of(backing))
            model[name] = outcome(sim().set_user_memory_region, field & 0xFFFF, 0, gpa, pages * PAGE,
                                  as_id=field >> 16)
        with system.create_vm() as vm:
            vm.set_user_memory_region(0, LOG, 0, 128 * PAGE)
            words = np.zeros(2, dtype=np.uint64)
            real["get_dirty_log_as_id_1"] = outcome(k.ioctl, vm.fd, k.KVM_GET_DIRTY_LOG, k.kvm_dirty_log(
                slot=1 << 16, dirty_bitmap=words.ctypes.data))
    backing.close()
    vm = sim()
    vm.set_user_memory_region(0, LOG, 0, 128 * PAGE)
    model["get_dirty_log_as_id_1"] = outcome(vm.get_dirty_log, 0, as_id=1)
    assert model == real
    assert real["ends_at_the_top"] == "ok" and real["wraps_2_64"] == "EINVAL"


def test_vcpu_count_limit_matches(sim):
    """As many vCPUs as KVM_CAP_MAX_VCPUS says, then one more (a new id): EINVAL on both."""
    model = sim()
    limit = model.check_extension(CAPS["MAX_VCPUS"])
    with k.KvmSystem() as system, system.create_vm() as vm:
        fds = []
        try:
            for i in range(limit):
                fds.append(k.ioctl(vm.fd, k.KVM_CREATE_VCPU, i))
            real = outcome(k.ioctl, vm.fd, k.KVM_CREATE_VCPU, limit)
        finally:
            for fd in fds:
                os.close(fd)
    for i in range(limit):
        model.create_vcpu(i)
    assert outcome(model.create_vcpu, limit) == real == "EINVAL"


def test_a_write_only_a_later_memslot_move_maps(sim):
    """The data slot covers pages 0..63; the guest writes page 5, syncs, then writes page 70.
    At the sync userspace moves the slot up by 64 pages, so page 70 is the slot's page 6. Both
    hosts run to the end and log (slot 1, offset 5) and (slot 1, offset 6)."""
    from ringenv.guest.trace import TraceProgram

    with Guest([WriteProgram([5, 70], frozenset({0}))], 128, ring_entries=256) as g:
        ua, base = k.address_of(g.vm.memory[DATA_SLOT]), g.image.data_gpa
        _region(g.vm, DATA_SLOT, LOG, base, 0, ua)  # the data slot again, 64 pages only
        _region(g.vm, DATA_SLOT, LOG, base, 64 * PAGE, ua)
        kinds = [g.run(0)[0]]
        _region(g.vm, DATA_SLOT, LOG, base + 64 * PAGE, 64 * PAGE, ua)
        kinds.append(g.run(0)[0])
        real = (kinds, g.vcpus[0].harvest())

    vm = sim()
    vm.enable_cap(k.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 256 * 16)
    dgfn = base // PAGE
    vm.set_user_memory_region(DATA_SLOT, LOG, base, 64 * PAGE)
    vcpu = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[5, 70]], [[0]], base_gfn=dgfn))
    kinds = []
    for move in (False, True):
        if move:
            vm.set_user_memory_region(DATA_SLOT, LOG, base + 64 * PAGE, 64 * PAGE)
        e = vcpu.run() or vm.run_until(vm.now + (1 << 50))[0]
        kinds.append(e.kind)
    g = vcpu.ring_gfns
    model = (kinds, [(int(s), int(o)) for f, s, o in zip(g["flags"], g["slot"], g["offset"]) if f])
    assert model == real == (["sync", "done"], [(DATA_SLOT, 5), (DATA_SLOT, 6)])
