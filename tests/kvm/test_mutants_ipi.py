"""Tests from a mutation run over the kernel IPIs of x86 PML (commit 533738d: Vm._kick, the
TLB flush's IPI, the kick of every memslot change, the ring-full exit taken at an IPI and
returned by the next run_until / Vcpu.kick / Vcpu.run). Each kills a mutant the suite let
live; the docstring names the rule (reference s4, s7) and the mutant.

The rules: vmx_handle_exit flushes a vCPU's PML buffer at every VM exit; the kernel makes every
vCPU in guest mode exit when it asks all of them for something (kvm_flush_remote_tlbs, e.g.
after KVM_RESET_DIRTY_RINGS reset something; kvm_arch_memslots_updated after any
KVM_SET_USER_MEMORY_REGION that changes something). A vCPU that such a flush leaves soft-full
exits with KVM_EXIT_DIRTY_RING_FULL before it re-enters, at the IPI: that KVM_RUN returns that
exit, once, whichever of run_until, Vcpu.kick or Vcpu.run asks first.

The guest writes one store every 5 ns (TraceProgram, fault cost 0); ring 1024 entries (soft
limit 448), PML buffer 512.
"""

from __future__ import annotations

from ringenv.guest.trace import TraceProgram
from ringenv.kvm import Vm
from ringenv.kvm import uapi as U
from ringenv.vmm.reap import RingReader

from ._helpers import FOREVER, Host
from .test_pml_ipis import _buffered, _soft_full_at_a_kick

FULL = U.KVM_EXIT_DIRTY_RING_FULL
LOG_ = U.KVM_MEM_LOG_DIRTY_PAGES
PAGE = 4096


def test_one_ipi_sends_every_vcpu_it_leaves_soft_full_out_in_vcpu_order():
    """s7: the TLB flush after a reset is an IPI to every vCPU in the guest; each that its
    flush leaves soft-full exits (s4), not only the first. vCPUs 0 and 1 write from t = 0
    (pages 0.. and 1000..), vCPU 2 from 2350 (pages 2000..2009, a sync after the 10th, at
    2395): vCPUs 0 and 1 have logged their writes at 0, 5, .., 2395, 480 gfns each. The reset
    of vCPU 2's 10 entries flushes both: 480 >= 448, both exit at 2395; run_until returns the
    two exits in vCPU order (as a tick's), each counted once.
    Mutants killed: Vm._kick stopping after the first vCPU it sends out (vCPU 1 stayed in the
    guest), run_until returning the recorded exits in descending vCPU order, or only the
    first of them."""
    h = Host([list(range(1000)), list(range(1000, 2000)), list(range(2000, 2010))], [[], [], [9]],
             profile="x86-pml", entries=1024, slot_pages=4096)
    assert h.enter(0) is None and h.enter(1) is None
    assert h.vm.run_until(5 * 470) == []
    assert h.enter(2) is None
    e = h.run()
    assert (e.vcpu, e.kind, e.time_ns) == (2, "sync", 2395)
    v0, v1 = h.vcpus[0], h.vcpus[1]
    assert (v0.pml_count, v1.pml_count) == (480, 480)
    assert h.harvest(2) == list(range(2000, 2010))
    assert h.reset() == 10
    assert (v0.ring.used, v1.ring.used) == (480, 480)
    assert not v0.in_guest and not v1.in_guest
    exits = h.vm.run_until(h.vm.now + 1000)
    assert [(x.vcpu, x.reason, x.time_ns) for x in exits] == [(0, FULL, 2395), (1, FULL, 2395)]
    assert (v0.stats.full_exits, v1.stats.full_exits) == (1, 1)
    assert h.vm.run_until(h.vm.now + 1000) == []


def test_creating_a_slot_that_does_not_log_kicks_the_running_vcpus():
    """s7: kvm_arch_memslots_updated kicks every vCPU whenever new memslots are installed, a
    creation included, even one that needs no TLB flush (a slot without LOG_DIRTY_PAGES: no
    write-protect). vCPU 0 holds gfns 0..39 of slot 0: the kick flushes them into its ring as
    slot 0's offsets 0..39 (40 < 448: it stays in the guest).
    Mutant killed: _change_memslot returning False (nothing changed) for a creation: no kick,
    the buffer kept (a creation with logging hid it, its write-protect's TLB flush kicking)."""
    h = _buffered()
    v = h.vcpus[0]
    tlb = h.vm.stats.tlb_flushes
    h.vm.set_user_memory_region(1, 0, 65536 * PAGE, 512 * PAGE)
    assert h.vm.stats.tlb_flushes == tlb
    assert (v.pml_count, v.ring.used, v.stats.pml_flushes) == (0, 40, 1)
    assert v.in_guest
    assert h.harvest_entries(0) == [(0, k) for k in range(40)]


def test_the_exit_at_an_ipi_is_what_the_next_kvm_run_returns_once():
    """s4/s7: the KVM_RUN under way returned KVM_EXIT_DIRTY_RING_FULL at the IPI (t = 2395):
    a KVM_RUN issued before run_until gets that exit, counted once (one full exit, one exit);
    it is not returned again (run_until then has nothing); the next KVM_RUN finds the request
    pending and the ring still soft-full: a second full exit; after harvest and reset it
    enters.
    Mutants killed: Vcpu.run not returning the recorded exit (it exited anew on the request:
    two full exits, and run_until later returned the stale one), Vcpu.run reading it without
    removing it (returned again and again), Vcpu.run checking the request before the recorded
    exit."""
    h, _ = _soft_full_at_a_kick()
    v = h.vcpus[0]
    exits0 = v.stats.exits
    e = h.enter(0)
    assert e is not None and (e.vcpu, e.reason, e.kind, e.time_ns) == (0, FULL, "full", 2395)
    assert (v.stats.full_exits, v.stats.exits) == (1, exits0)
    assert h.vm.run_until(h.vm.now + 1000) == []
    e = h.enter(0)
    assert e is not None and e.reason == FULL
    assert v.stats.full_exits == 2
    assert h.harvest(0) == list(range(480))
    assert h.reset() == 480
    assert h.enter(0) is None
    assert h.vm.run_until(h.vm.now + 1000) == []


def test_a_run_until_that_lets_no_time_pass_still_returns_the_exit_at_an_ipi():
    """s7: the exit happened at the IPI, at ``now``: run_until(now) returns it (it runs
    nothing), and the next call has nothing more.
    Mutant killed: run_until returning the recorded exits only when time is to pass."""
    h, _ = _soft_full_at_a_kick()
    now = h.vm.now
    exits = h.vm.run_until(now)
    assert [(x.vcpu, x.reason, x.time_ns) for x in exits] == [(0, FULL, now)]
    assert h.vm.run_until(now + 1000) == []


def test_the_exit_at_an_ipi_is_the_vcpus_whatever_its_id():
    """s7: the exit belongs to the vCPU the IPI sent out, however userspace numbered it (vCPU
    id 5, the VM's first vCPU). One vCPU writes pages 0.. from t = 0; at 2350 it has logged
    470 gfns (t = 0..2345); creating a slot kicks it: 470 >= 448, out at 2350. QEMU's SIG_IPI
    then gets that exit from KVM_RUN (not KVM_EXIT_INTR), and nothing is left for run_until.
    Mutant killed: Vm._kick recording the exit under the vCPU id instead of its index
    (Vcpu.kick returned None, and run_until returned the exit later)."""
    vm = Vm("x86-pml")
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 1024 * 16)
    vm.set_user_memory_region(0, LOG_, 0, 2048 * PAGE)
    v = vm.create_vcpu(5)
    assert (v.id, v.index) == (5, 0)
    vm.attach_guest(TraceProgram([list(range(1000))], [[]], write_ns=5, fault_ns=0))
    assert v.run() is None
    assert vm.run_until(5 * 470) == [] and v.pml_count == 470
    vm.set_user_memory_region(1, LOG_, 65536 * PAGE, 512 * PAGE)
    assert v.ring.used == 470 and not v.in_guest
    e = v.kick()
    assert e is not None and (e.vcpu, e.reason, e.kind, e.time_ns) == (0, FULL, "full", 2350)
    assert v.stats.full_exits == 1
    assert vm.run_until(vm.now + 1000) == []


def test_exits_at_two_ipis_come_back_in_vcpu_order():
    """s4/s7, with the re-executed store of s4. Slot 0 (gfn 0, mapped) and slot 1 (gfn 4096,
    nothing mapped: each first write is an EPT violation that pushes its page). vCPU 1 writes
    slot 0's pages from t = 0, vCPU 0 slot 1's from t = 200: its 448th write (offset 447, t =
    2435) fills its ring to the soft limit and it exits, the store not retired; vCPU 1 has
    logged its writes at 0..2430 then, 487 gfns. Harvest and reset of vCPU 0's first entry
    (ring 447): the reset's TLB flush sends vCPU 1 out (487 >= 448), first IPI. Slot 1's
    logging off then on again write-protects its pages (the PML dirty bits cleared), offset 447
    included; KVM_RUN of vCPU 0 (447 < 448: the request dropped) re-executes the store, which
    the CPU logs. Creating slot 2 kicks vCPU 0, second IPI: its flush pushes offset 447, ring
    448, out. Both exits are at 2435: run_until returns them in vCPU order (vCPU 0 first,
    though its exit came second).
    Mutant killed: run_until returning the recorded exits in the order they were taken."""
    vm = Vm("x86-pml")
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 1024 * 16)
    vm.set_user_memory_region(0, LOG_, 0, 2048 * PAGE)
    vm.set_user_memory_region(1, LOG_, 4096 * PAGE, 2048 * PAGE, mapped_fraction=0.0)
    v0, v1 = vm.create_vcpu(0), vm.create_vcpu(1)
    vm.attach_guest(TraceProgram([list(range(4096, 5096)), list(range(1000))], [[], []], write_ns=5, fault_ns=0))
    r0 = RingReader(v0.ring_gfns)
    assert v1.run() is None
    assert vm.run_until(200) == []
    assert v0.run() is None
    exits = vm.run_until(FOREVER)
    assert [(e.vcpu, e.reason, e.time_ns) for e in exits] == [(0, FULL, 2435)]
    assert (v0.ring.used, v1.pml_count) == (448, 487)
    s, off = r0.reap(1)
    assert (s.tolist(), off.tolist()) == ([1], [0])
    assert vm.reset_dirty_rings() == 1
    assert v0.ring.used == 447 and v1.ring.used == 487 and not v1.in_guest  # first IPI
    vm.set_user_memory_region(1, 0, 4096 * PAGE, 2048 * PAGE)
    vm.set_user_memory_region(1, LOG_, 4096 * PAGE, 2048 * PAGE)
    assert v0.run() is None
    assert (v0.pml_count, v0.ring.used) == (1, 447)
    vm.set_user_memory_region(2, 0, 65536 * PAGE, 512 * PAGE)  # second IPI
    assert v0.ring.used == 448 and not v0.in_guest
    exits = vm.run_until(vm.now + 1000)
    assert [(e.vcpu, e.reason, e.time_ns) for e in exits] == [(0, FULL, 2435), (1, FULL, 2435)]
    assert vm.run_until(vm.now + 1000) == []


def test_a_vcpu_out_of_the_guest_takes_no_exit_at_an_ipi():
    """s7: the IPI goes to the vCPUs in guest mode only. vCPU 1 writes from t = 0, vCPU 0 from
    1500. vCPU 1's buffer is full after its writes at 0..2555 (512); its write at 2560 raises
    the log-full exit first: the flush leaves its ring at 512 >= 448, it exits
    KVM_EXIT_DIRTY_RING_FULL, its request pending. vCPU 0 has logged its writes at
    1500..2560 (ties: the lower vCPU first), 213. Creating a slot kicks vCPU 0 only: 213 < 448,
    it stays in the guest; vCPU 1 (out, still soft-full) takes no second exit: run_until to
    2660 goes on with vCPU 0 (19 writes), and vCPU 1's next KVM_RUN is its second full exit.
    Mutant killed: Vm._kick recording a full exit for every vCPU with the request pending, in
    the guest or not (killed before only by a random trace of test_properties.py)."""
    h = Host([list(range(1000)), list(range(1000, 2000))], profile="x86-pml", entries=1024, slot_pages=4096)
    v0, v1 = h.vcpus
    assert h.enter(1) is None
    assert h.vm.run_until(5 * 300) == []
    assert h.enter(0) is None
    e = h.run()
    assert (e.vcpu, e.reason, e.time_ns) == (1, FULL, 2560)
    assert v1.ring.used == 512 and v0.pml_count == 213
    h.vm.set_user_memory_region(1, 0, 65536 * PAGE, 512 * PAGE)
    assert (v0.ring.used, v0.pml_count) == (213, 0) and v0.in_guest
    assert (v1.stats.full_exits, v1.stats.exits) == (1, 1)
    assert h.vm.run_until(h.vm.now + 100) == []  # vCPU 0's writes at 2565..2655
    assert v0.pml_count == 19
    e = h.enter(1)
    assert e is not None and e.reason == FULL and v1.stats.full_exits == 2
