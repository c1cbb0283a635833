"""The VM limits of the real KVM against the simulator's profile for this host: KVM_CHECK_EXTENSION
of the limits, memslot address spaces and guest-physical range, the vCPU count, the kvm module
parameters; a write that only a later memslot move maps (the walk must not look it up before
the guest gets there), a retried store whose memslot was deleted (an MMIO exit), and dirty
logging turned off and on again (faults and pushes)."""

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


def sim_ring_guest(sim, base, pages, writes, syncs, **region):
    """The simulator's side of a ring test: a 256-entry ring, the data slot (logging) at ``base``
    of ``pages`` pages, one vCPU running ``writes`` with ``syncs`` there. Returns (vm, vcpu)."""
    from ringenv.guest.trace import TraceProgram

    vm = sim()
    vm.enable_cap(k.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 256 * 16)
    vm.set_user_memory_region(DATA_SLOT, LOG, base, pages * PAGE, **region)
    vcpu = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([writes], [syncs], base_gfn=base // PAGE))
    return vm, vcpu


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
    with Guest([WriteProgram([5, 70], frozenset({0}))], 128, ring_entries=256) as g:
        ua, base = k.address_of(g.vm.memory[DATA_SLOT]), g.image.data_gpa
        _region(g.vm, DATA_SLOT, LOG, base, 0, ua)  # the data slot again, 64 pages only
        _region(g.vm, DATA_SLOT, LOG, base, 64 * PAGE, ua)
        kinds = [g.run(0)[0]]
        _region(g.vm, DATA_SLOT, LOG, base + 64 * PAGE, 64 * PAGE, ua)
        kinds.append(g.run(0)[0])
        real = (kinds, g.vcpus[0].harvest())

    vm, vcpu = sim_ring_guest(sim, base, 64, [5, 70], [0])
    kinds = []
    for move in (False, True):
        if move:
            vm.set_user_memory_region(DATA_SLOT, LOG, base + 64 * PAGE, 64 * PAGE)
        e = vcpu.run() or vm.run_until(vm.now + (1 << 50))[0]
        kinds.append(e.kind)
    g = vcpu.ring_gfns
    model = (kinds, [(int(s), int(o)) for f, s, o in zip(g["flags"], g["slot"], g["offset"]) if f])
    assert model == real == (["sync", "done"], [(DATA_SLOT, 5), (DATA_SLOT, 6)])


def test_a_store_retried_after_its_memslot_was_deleted_is_an_mmio_exit(sim):
    """A 256-entry ring (soft limit 192): the push of page 191 fills it and the vCPU exits
    before that store retires. Userspace harvests, resets and deletes the data slot: the store
    re-executed by the next KVM_RUN finds no memslot and exits as KVM_EXIT_MMIO at its own
    address. The slot is created again; the guest goes on after that store (page 192 is pushed,
    191 is not pushed again) and ends. The simulator gives the same exits and entries."""
    writes = list(range(193))
    with Guest([WriteProgram(writes)], 256, ring_entries=256) as g:
        ua, base = k.address_of(g.vm.memory[DATA_SLOT]), g.image.data_gpa
        kinds = [g.run(0)[0]]
        first = g.vcpus[0].harvest()
        g.vm.reset_dirty_rings()
        _region(g.vm, DATA_SLOT, LOG, base, 0, ua)  # delete the data slot
        kind, addr = g.run(0)
        kinds.append(kind)
        _region(g.vm, DATA_SLOT, LOG, base, 256 * PAGE, ua)
        kinds.append(g.run(0)[0])
        real = (kinds, addr - base, first, g.vcpus[0].harvest())

    vm, vcpu = sim_ring_guest(sim, base, 256, writes, [], mapped_fraction=0.0)

    def entries():
        g = vcpu.ring_gfns
        live = g["flags"] == 1
        out = [(int(s), int(o)) for s, o in zip(g["slot"][live], g["offset"][live])]
        g["flags"][live] |= 2
        return out

    kinds = []
    for step in range(3):
        e = vcpu.run() or vm.run_until(vm.now + (1 << 50))[0]
        kinds.append(e.kind)
        if step == 0:
            first = entries()
            vm.reset_dirty_rings()
            vm.set_user_memory_region(DATA_SLOT, LOG, base, 0)
        elif step == 1:
            vm.set_user_memory_region(DATA_SLOT, LOG, base, 256 * PAGE, mapped_fraction=0.0)
    model = (kinds, 191 * PAGE, first, entries())
    assert model == real
    assert real[0] == ["full", "mmio", "done"] and real[3] == [(DATA_SLOT, 192)]
    assert real[2] == [(DATA_SLOT, o) for o in range(192)]


def test_the_profile_has_this_hosts_kvm_module_parameters(sim):
    """The simulator's profile for this host carries the kvm module's eager_page_split and
    tdp_mmu as /sys/module/kvm/parameters reports them (eager page splitting acts only with
    the TDP MMU: kvm_mmu_slot_try_split_huge_pages returns at once without it)."""
    from pathlib import Path

    params = Path("/sys/module/kvm/parameters")
    if not (params / "eager_page_split").is_file():
        pytest.skip("no x86 kvm module parameters here")
    real = {name: (params / name).read_text().strip() in ("Y", "1") for name in ("eager_page_split", "tdp_mmu")}
    profile = sim().profile
    assert {"eager_page_split": profile.eager_page_split, "tdp_mmu": profile.tdp_mmu} == real


def test_logging_off_pushes_nothing_and_on_again_logs_exactly(sim):
    """The data slot's KVM_MEM_LOG_DIRTY_PAGES is cleared at the first sync and set again at the
    second (KVM_SET_USER_MEMORY_REGION changing only flags). Writes 1, 2 | 3, 1 | 3, 4, 1: the
    first phase pushes 1 and 2; with logging off nothing is pushed (page 3 faults, page 1 is
    writable); logging on again write-protects the slot: 3, 4, 1 are pushed once each. The
    simulator gives the same exits and entries."""
    writes, syncs = [1, 2, 3, 1, 3, 4, 1], [1, 3]
    with Guest([WriteProgram(writes, frozenset(syncs))], 64, ring_entries=256) as g:
        ua, base = k.address_of(g.vm.memory[DATA_SLOT]), g.image.data_gpa
        real = []
        for flags in (0, LOG, None):
            kind, _ = g.run(0)
            got = g.vcpus[0].harvest()
            assert g.vm.reset_dirty_rings() == len(got)
            real.append((kind, got))
            if flags is not None:
                _region(g.vm, DATA_SLOT, flags, base, 64 * PAGE, ua)

    vm, vcpu = sim_ring_guest(sim, base, 64, writes, syncs, mapped_fraction=0.0)
    from ringenv.vmm.reap import RingReader

    reader, model = RingReader(vcpu.ring_gfns), []
    for flags in (0, LOG, None):
        e = vcpu.run() or vm.run_until(vm.now + (1 << 50))[0]
        slots, offs = reader.reap()
        assert vm.reset_dirty_rings() == len(offs)
        model.append((e.kind, [(int(s), int(o)) for s, o in zip(slots, offs)]))
        if flags is not None:
            vm.set_user_memory_region(DATA_SLOT, flags, base, 64 * PAGE)
    assert model == real == [("sync", [(DATA_SLOT, 1), (DATA_SLOT, 2)]), ("sync", []),
                             ("done", [(DATA_SLOT, 3), (DATA_SLOT, 4), (DATA_SLOT, 1)])]


def test_pages_stay_write_protected_after_logging_off(sim):
    """Pages 1 and 2 are written (logged), harvested and reset: the reset write-protects them
    again. Then logging is turned off (flags only) and the guest writes 1, 2, 1, 2: each page
    takes one write-protect fault (x86 vCPU statistic pf_fixed), as it would with logging on,
    but nothing is pushed. Logging on again: writes 1, 2, 1 fault and push once per page. The
    simulator counts the same faults in each phase."""
    writes, syncs = [1, 2, 1, 2, 1, 2, 1, 2, 1], [1, 5]
    flags_after = (0, LOG, None)
    with Guest([WriteProgram(writes, frozenset(syncs))], 64, ring_entries=256) as g:
        ua, base = k.address_of(g.vm.memory[DATA_SLOT]), g.image.data_gpa
        vcpu, real = g.vcpus[0], []
        if "pf_fixed" not in vcpu.stats():
            pytest.skip("no pf_fixed vCPU statistic on this host")
        for flags in flags_after:
            before = vcpu.stats()["pf_fixed"]
            kind, _ = g.run(0)
            real.append((kind, [o for _, o in vcpu.harvest()], vcpu.stats()["pf_fixed"] - before))
            g.vm.reset_dirty_rings()
            if flags is not None:
                _region(g.vm, DATA_SLOT, flags, base, 64 * PAGE, ua)

    vm, v = sim_ring_guest(sim, base, 64, writes, syncs, mapped_fraction=0.0)
    from ringenv.vmm.reap import RingReader

    reader, model = RingReader(v.ring_gfns), []
    for flags in flags_after:
        before = v.stats.faults
        kind = (v.run() or vm.run_until(vm.now + (1 << 50))[0]).kind
        model.append((kind, reader.reap()[1].astype(int).tolist(), v.stats.faults - before))
        vm.reset_dirty_rings()
        if flags is not None:
            vm.set_user_memory_region(DATA_SLOT, flags, base, 64 * PAGE)
    # the first touch of a page costs the real (shadow-paging) host more than one fault: compare
    # the phases after it
    assert model[1:] == real[1:] == [("sync", [], 2), ("done", [1, 2], 2)]
    assert model[0][:2] == real[0][:2] == ("sync", [1, 2])
