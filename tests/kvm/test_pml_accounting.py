"""x86 PML worked by hand from the profile's costs and the kernel's rules (vmx_flush_pml_buffer at
every exit and tick, the in-kernel PML-full exit, mark_page_dirty_in_slot): a mutation run found
these unchecked."""

from __future__ import annotations

from ringenv.guest.trace import TraceProgram
from ringenv.kvm import Vm
from ringenv.kvm import uapi as U

from ._helpers import Host
from .test_pml import _buffered, _kick

LOG_ = U.KVM_MEM_LOG_DIRTY_PAGES
PAGE = 4096


def test_gfn_at_a_slots_end_is_in_no_slot():
    # slot 0 moves away (its zap's IPI flushes the buffer: (0, 0..39)); new slot 1 covers gfns
    # 0..19 (end 20, exclusive). The buffer filled again by hand with gfns 0..39 (no guest
    # write can leave them there: tests/kvm/test_pml_ipis.py): only 0..19 are slot 1's offsets
    # 0..19; gfn 20 (= end) maps nothing
    h = _buffered()
    h.vm.set_user_memory_region(0, LOG_, 8192 * PAGE, 1024 * PAGE)
    assert h.harvest_entries(0) == [(0, k) for k in range(40)]
    h.vm.set_user_memory_region(1, LOG_, 0, 20 * PAGE)
    v = h.vcpus[0]
    v.pml[:40] = range(40)
    v.pml_count = 40
    assert _kick(h) == [(1, k) for k in range(20)]
    assert v.stats.pushes == 40 + 20


def test_flush_into_a_slot_whose_logging_was_turned_off_pushes_nothing():
    # mark_page_dirty_in_slot: no dirty tracking in the slot -> nothing pushed; flush still counted
    h = _buffered()
    h.vm.set_user_memory_region(0, 0, 0, 1024 * PAGE)
    assert _kick(h) == []
    v = h.vcpus[0]
    assert v.stats.pushes == 0 and v.stats.pml_flushes == 1


def test_flush_that_reaches_exactly_the_soft_limit_is_soft_full():
    # ring 1024, soft 448: 448 writes then sync: the exit flush pushes 448 = soft_limit;
    # kvm_dirty_ring_soft_full is used >= soft_limit -> KVM_RUN exits FULL at once
    h = Host([list(range(500))], [[447]], profile="x86-pml", entries=1024, slot_pages=1024)
    assert h.enter_and_run().kind == "sync"
    assert h.vcpus[0].ring.used == 448
    again = h.enter()
    assert again is not None and again.reason == U.KVM_EXIT_DIRTY_RING_FULL


def test_a_pml_full_exit_costs_its_exit_time():
    # x86-pml, ring 4096 (soft 3520, no ring-full exit), 600 distinct writes in 6 us (no tick):
    # logging 600 x 5 ns, PML-full flush at write 512: 512 x 5 + 1500 (pml_full_exit_ns),
    # done-exit flush 88 x 5  -> 3000 + 2560 + 1500 + 440 = 7500
    vm = Vm("x86-pml")
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 4096 * 16)
    vm.set_user_memory_region(0, LOG_, 0, 2048 * vm.page_size)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([list(range(600))], [[]], write_ns=5))
    assert v.run() is None
    assert [e.kind for e in vm.run_until(1 << 40)] == ["done"]
    c = vm.profile.costs
    assert (c.dirty_write_ns, c.pml_flush_entry_ns, c.pml_full_exit_ns) == (5, 5.0, 1500)
    assert int(vm.vcpu_kernel_ns()[0]) == 7500
    assert v.stats.pml_flushes == 2


TICK = 1_000_000
FULL = U.KVM_EXIT_DIRTY_RING_FULL


def test_pml_without_a_ring_charges_the_amortized_flush():
    # x86-pml with the dirty bitmap (no ring): a logged write costs dirty_write_ns +
    # pml_flush_entry_ns + pml_full_exit_ns / 512 = 5 + 5 + 2.93 -> round 13 ns;
    # 100 distinct writes (write_ns 5, fault_ns from the host) -> kernel 1300, done at 100 x 18
    vm = Vm("x86-pml")
    vm.set_user_memory_region(0, LOG_, 0, 1024 * vm.page_size)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([list(range(100))], [[]], write_ns=5))
    assert v.run() is None
    assert [e.kind for e in vm.run_until(1 << 40)] == ["done"]
    assert int(vm.vcpu_kernel_ns()[0]) == 1300
    assert vm.now == 100 * 18


def test_ticks_stay_on_multiples_of_the_interval_after_an_idle_stretch():
    # writes every 4.1 ms (fault_ns 0): at 0 and 4.1 ms. The 1 ms tick flushes write 0; no
    # buffer holds anything from then to 4.1 ms; the host ticks at 2, 3, 4 ms (CONFIG_HZ=1000),
    # so write 1 (4.1 ms) waits for the 5 ms tick, not for one at 3.3 + 1 ms.
    h = Host([[0, 1, 2]], profile="x86-pml", entries=4096, slot_pages=2048, write_ns=4_100_000)
    v = h.vcpus[0]
    assert h.enter() is None
    seen = []
    for t in (TICK + 1, 3 * TICK + 300_000, 4 * TICK + 200_000, 4 * TICK + 500_000, 5 * TICK + 1):
        assert h.vm.run_until(t) == []
        seen.append((v.ring.dirty_index, v.pml_count))
    assert seen == [(1, 0), (1, 0), (1, 1), (1, 1), (2, 0)]


def test_a_tick_does_not_exit_a_vcpu_that_is_already_out():
    # writes every 1999 ns, ring 1024 (soft 448). vCPU0 writes 600 distinct pages: 501 flushed
    # at the 1 ms tick -> full exit at 1 ms; userspace leaves it out. vCPU1: 300 distinct then
    # repeats (1 ms flush: 300 < 448), 200 more distinct before 2 ms: the 2 ms flush -> 500 >=
    # 448: only vCPU1 exits at 2 ms.
    w1 = list(range(1000, 1300)) + [1000] * 201 + list(range(1300, 1500)) + [1300] * 300 + [1600] * 10
    h = Host([list(range(600)), w1], profile="x86-pml", entries=1024, slot_pages=2048, write_ns=1999)
    assert h.enter(0) is None and h.enter(1) is None
    exits = h.vm.run_until(TICK + 100)
    assert [(e.vcpu, e.time_ns, e.kind) for e in exits] == [(0, TICK, "full")]
    exits = h.vm.run_until(3 * TICK)
    assert [(e.vcpu, e.time_ns, e.kind) for e in exits] == [(1, 2 * TICK, "full")]
    assert [v.stats.full_exits for v in h.vcpus] == [1, 1]


def test_pml_logging_off_leaves_4k_pages_writable_without_a_fault():
    # x86 PML only clears D-bits of 4K mappings (never write-protects them): after harvest +
    # reset and KVM_SET_USER_MEMORY_REGION clearing LOG_DIRTY_PAGES, rewriting page 1 takes
    # no fault (0 faults, 0 ns) and logs nothing
    h = Host([[1, 1]], [[0]], profile="x86-pml", entries=1024, slot_pages=64)
    v = h.vcpus[0]
    assert h.enter_and_run().kind == "sync"
    assert h.harvest() == [1] and h.reset() == 1
    h.vm.set_user_memory_region(0, 0, 0, 64 * PAGE)
    f, ns = v.stats.faults, v.stats.fault_ns
    assert h.enter_and_run().kind == "done"
    assert (v.stats.faults - f, v.stats.fault_ns - ns, h.harvest()) == (0, 0, [])
