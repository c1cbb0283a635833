"""Review of the five changes of 2026-11-30 (x86 PML EPT violations, the reset's re-protect
calls, no measurement after the switchover, the auto-converge sleep under the big lock, the
max-bandwidth rate limiter) against the kernel's and QEMU's behaviour. Each test states what the
kernel or QEMU does and fails on the code as reviewed; expected values are worked by hand in the
docstrings.
"""

from __future__ import annotations

import yaml

from ringenv.config import CONFIG_DIR, HostProfile, load_scenario, scale_scenario
from ringenv.guest.trace import TraceProgram
from ringenv.kvm import Vm
from ringenv.kvm import uapi as U
from ringenv.vmm import MigrationRun

MS = 1_000_000
MiB = 1 << 20


# ====================================================================== change 1: x86 PML
def _x86_pml_lazy_split_vm(writes, syncs=None, reads=None):
    """x86-pml with eager_page_split off (the TDP MMU on, as the profile says), ring 1024, one
    1024-page slot backed by huge pages and mapped (two 512-page blocks) before logging was
    enabled, one vCPU replaying ``writes`` 5 ns apart, faults taking no guest time."""
    data = yaml.safe_load((CONFIG_DIR / "hosts" / "x86-pml.yaml").read_text())
    prof = HostProfile.parse({**data, "eager_page_split": False}, where="host profile")
    assert prof.tdp_mmu and prof.pml
    vm = Vm(prof)
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 1024 * 16)
    vm.set_user_memory_region(0, 0, 0, 1024 * vm.page_size, block_fraction=1.0)
    vm.set_user_memory_region(0, U.KVM_MEM_LOG_DIRTY_PAGES, 0, 1024 * vm.page_size, block_fraction=1.0)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([writes], [syncs or []], reads=None if reads is None else [reads],
                                 write_ns=5, fault_ns=0))
    return vm, v


def test_x86_pml_write_after_a_read_under_a_lazily_split_huge_mapping_is_an_ept_violation():
    """PML logs only a write that sets the dirty bit of a present, WRITABLE SPTE (the change's
    own rule, fault.walk_writes: "PML logs only a write to a mapped, writable page whose dirty
    bit is clear"). With PML, enabling logging write-protects the huge SPTEs
    (kvm_mmu_slot_apply_flags -> kvm_mmu_slot_remove_write_access(..., PG_LEVEL_2M)).

    The TDP MMU (tdp_mmu: true in x86-pml.yaml) does not zap a huge SPTE on a write fault:
    kvm_tdp_mmu_map meets the present huge SPTE above the 4K goal level and calls
    tdp_mmu_split_huge_page(kvm, &iter, sp, true), which fills the new table with 512 child
    SPTEs made from the huge one (make_huge_page_split_spte), i.e. present and write-protected
    like it. The block's other pages stay mapped, read-only.

    Trace: write 3 (EPT violation: split, page 3 writable+dirty, pushed: ring [3]), read 7 (a
    present child: no exit), write 7: the child is not writable, so the write is another EPT
    violation (its exit flushes the empty PML buffer; fast_page_fault / make_spte make it
    writable and mark_page_dirty_in_slot pushes page 7): ring [3, 7], PML buffer empty, two
    write-protect faults and one split charged. (The shadow MMU does zap the huge SPTE; page 7
    then takes a fault of its own at the read or at the write, pushed by the fault: ring [3, 7]
    and an empty buffer either way.)

    The simulator models the split as a zap (every page of the block UNMAPPED); the read then
    "maps page 7 read-only" (UNMAPPED cleared, WP kept), and the write to the read-only page
    is taken as a PML-logged store: page 7 sits in the PML buffer (pml_count 1), ring [3],
    charged dirty_write_ns (5 ns) instead of a fault. Without the read the same write is an
    EPT violation pushed at once (the change's own test)."""
    vm, v = _x86_pml_lazy_split_vm([3, 7, 7], reads=[1])
    c = vm.profile.costs
    assert v.run() is None
    assert vm.run_until(15) == []
    ring = [int(x) for x in v.ring.gfns["offset"][: v.ring.dirty_index]]
    assert (ring, v.pml_count) == ([3, 7], 0), "page 7's write is an EPT violation, pushed at once"
    assert v.stats.fault_ns >= 2 * c.wp_fault_ns + c.split_ns


def test_x86_pml_logging_off_recovers_a_lazily_split_huge_page_write_protected():
    """Same host (TDP MMU, PML, lazy split). Turning logging off, kvm_mmu_slot_apply_flags ->
    kvm_mmu_recover_huge_pages -> the TDP MMU's recover_huge_pages_range installs the huge SPTE
    in place, built from the FIRST present 4K SPTE under it (tdp_mmu_make_huge_spte ->
    make_huge_spte keeps that SPTE's permissions; Vm._commit_logging_off /
    Memslot.recover_huge_pages model exactly this).

    Write page 5 (EPT violation, the huge SPTE split in place: 512 present children,
    write-protected like the huge SPTE, page 5 made writable), sync exit, logging off: the
    first present child is page 0, still write-protected, so the recovered huge SPTE is
    write-protected; the next write (page 9) is a protection fault: one fault, wp_fault_ns
    (nothing logged). The simulator's x86-nopml twin gives exactly that.

    With PML the simulator zapped pages 0..511 but 5 at the split (UNMAPPED), so the first
    "present" page is page 5, writable: the whole block is recovered writable and the write to
    page 9 costs nothing (0 faults)."""
    vm, v = _x86_pml_lazy_split_vm([5, 9], syncs=[0])
    assert v.run() is None
    assert [e.kind for e in vm.run_until(100)] == ["sync"]
    vm.set_user_memory_region(0, 0, 0, 1024 * vm.page_size, block_fraction=1.0)  # logging off
    f0, ns0 = v.stats.faults, v.stats.fault_ns
    assert v.run() is None
    assert [e.kind for e in vm.run_until(1000)] == ["done"]
    assert v.stats.faults - f0 == 1, "the recovered huge SPTE is write-protected as page 0's child was"
    assert v.stats.fault_ns - ns0 >= vm.profile.costs.wp_fault_ns


# ====================================================================== change 4: the throttle sleep and the BQL
def _bql_held_for_50ms():
    """A 64 MiB idle guest, 2 vCPUs, auto-converge, past the set-up (both vCPUs in the guest);
    then another thread (a reaper, a sync's merge) takes the big lock and holds it 50 ms.
    Returns (run, t0, hold): the lock is held from t0 to t0 + hold."""
    run = MigrationRun(scale_scenario("idle", 64 * MiB, vm={"vcpus": 2}, throttle="auto-converge"))
    run.advance(300 * MS)
    hold = 50 * MS

    def holder():
        yield run.bql
        run.bql.release_at(run.loop.now + hold)
        yield hold

    run.spawn(holder(), run.PRIO_MAIN, "bql-holder")
    run.advance(run.loop.now)
    t0 = run.loop.now
    assert run.bql.held_at(t0) and run.phase == "bulk"
    return run, t0, hold


def test_pause_does_not_wait_for_a_throttle_sleep_queued_behind_the_big_lock():
    """QEMU pause_all_vcpus sets cpu->stop, kicks, and waits on qemu_pause_cond releasing the
    BQL. A vCPU thread kicked for its throttle sleep and waiting for the BQL gets it, and
    qemu_wait_io_event -> qemu_wait_io_event_common (system/cpus.c) handles cpu->stop FIRST
    (qemu_cpu_stop: stopped, qemu_pause_cond broadcast) and only then runs its queued work
    (process_queued_cpu_work -> cpu_throttle_thread); even run first, cpu_throttle_thread's loop
    (while (sleeptime_ns > 0 && !cpu->stop)) would not sleep. So the pause completes when the
    lock is released, not a throttle sleep later.

    Here: lock held 50 ms from t0, sleep queued at t0 (990 ms, 99%), the pause asked at
    t0 + 1 ms: QEMU's pause completes at ~t0 + 50 ms. The simulator's vCPU thread takes the
    lock, then sleeps the whole 990 ms although the VM is being stopped (pause_vm only
    interrupts vCPUs already in SLEEP), and the pause completes at t0 + 1040 ms: a
    migration's downtime grows by the whole sleep."""
    run, t0, hold = _bql_held_for_50ms()
    run.queue_throttle_work(990_000_001)
    run.advance(t0 + 1 * MS)
    done = {}

    def pauser():
        yield from run.pause_vm()
        done["t"] = run.loop.now

    run.spawn(pauser(), run.PRIO_MAIN, "pauser")
    run.advance(t0 + 1100 * MS)
    assert "t" in done
    assert done["t"] - t0 <= hold + 10 * MS, f"paused after {(done['t'] - t0) / MS:.1f} ms"


def test_a_throttle_tick_queues_no_second_sleep_while_the_first_waits_for_the_big_lock():
    """QEMU cpu_throttle_timer_tick queues cpu_throttle_thread only if
    !qatomic_xchg(&cpu->throttle_thread_scheduled, 1); cpu_throttle_thread clears the flag at
    its very end (after its sleep, the BQL held again). A tick while the vCPU thread still
    waits for the BQL to run the queued sleep therefore queues nothing. (The tick is a main-loop
    timer, run with the BQL held, so in QEMU the second one comes once the lock is free, at
    >= t0 + 50 ms, the flag still set: nothing queued either.)

    Here (20%: 2.5 ms sleeps, a tick every 12.5 ms): ticks at t0 and t0 + 12.5 ms, the lock
    held until t0 + 50 ms: each vCPU sleeps once in [t0, t0 + 60 ms) (50 -> 52.5 ms). The
    simulator zeroes throttle_work when the thread takes the work and the thread is OUT (not
    SLEEP) while it waits for the lock, so queue_throttle_work queues a second sleep: each vCPU
    sleeps twice (50 -> 52.5 and 52.5 -> 55 ms)."""
    run, t0, hold = _bql_held_for_50ms()
    starts = []
    sleep = run._throttle_sleep

    def spy(i, start, length):
        if length:
            starts.append(i)
        return sleep(i, start, length)

    run._throttle_sleep = spy
    run.queue_throttle_work(2_500_001)
    run.advance(t0 + 12_500_000)
    run.queue_throttle_work(2_500_001)  # the next tick
    run.advance(t0 + 60 * MS)
    assert sorted(starts) == [0, 1], f"sleeps started per vCPU: {sorted(starts)}"


def test_run_on_all_vcpus_waits_for_a_throttle_sleep_queued_ahead_of_its_work():
    """kvm_dirty_ring_flush -> kvm_cpu_synchronize_kick_all: run_on_cpu on each vCPU in turn,
    the caller waiting for its work item to be done. The vCPU's work list is FIFO and
    process_queued_cpu_work runs every item in order before the qemu_work_cond broadcast
    (cpus-common.c): a vCPU that has cpu_throttle_thread queued ahead of the kick runs the
    throttle sleep first. So the flush waits for that sleep, as run_on_all_vcpus's docstring
    says it does for a vCPU already asleep.

    Here: lock held 50 ms from t0, 2.5 ms sleeps queued at t0, the flush starts at t0 + 1 ms:
    it cannot return before t0 + 52.5 ms. The simulator sees the vCPU threads waiting for the
    lock as OUT ("runs it on its way back to KVM_RUN") and returns at once."""
    run, t0, hold = _bql_held_for_50ms()
    run.queue_throttle_work(2_500_001)
    run.advance(t0 + 1 * MS)
    out = {}

    def flusher():
        yield from run.run_on_all_vcpus()
        out["t"] = run.loop.now

    run.spawn(flusher(), run.PRIO_MAIN, "flush")
    run.advance(t0 + 100 * MS)
    assert out["t"] - t0 >= hold + 2_500_001, f"returned after {(out['t'] - t0) / MS:.3f} ms"


# ====================================================================== change 5: the rate limiter
def _rate_limited_idle(**link):
    """A 64 MiB idle guest migrated over 10 GbE with max-bandwidth 10 MiB/s: a budget of
    1048576 bytes per 100 ms window, i.e. 256 wire pages of 4104 bytes (the page that passes
    the budget included), sent in 0.84 ms at the link's rate."""
    return load_scenario("idle", vm={"memory": 64 * MiB, "vcpus": 2},
                         link={"gbps": 10, "max_bandwidth_mibps": 10, "device_state_bytes": MiB, "give_up_s": 60,
                               **link})


def test_rate_limited_bytes_are_on_the_wire_once_their_burst_is_sent():
    """With the rate limiter the migration thread writes a window's budget at the link's rate
    (ram_save_iterate ends with qemu_fflush) and then only waits (migration_rate_limit ->
    qemu_sem_timedwait): during the wait every byte of the window is on the wire and counted
    in QEMU's transferred bytes (migration_transferred_bytes).

    The first send here is 2540 pages (20 slices of 127) from t = 0.02 ms: windows of 256
    pages at 0.02, 100.02, ..., 800.02 ms (each burst over 0.84 ms later), the last 236 pages
    at 900.02 ms. At 50 ms the wire has carried 256 pages (1050624 bytes); at 850 ms 9 x 256
    pages (9455616 bytes). The simulator spreads the whole send pro rata over its 900.8 ms,
    waits included (Session._in_flight over Session._slice): bytes_sent 578385 at 50 ms (under
    the budget), 9836334 at 850 ms (more than has left), remaining_bytes and progress alike."""
    run = MigrationRun(_rate_limited_idle())
    bpp = run.page_wire_bytes
    run.advance(50 * MS)
    m = run.metrics()
    assert run.window_budget == MiB
    assert m.bytes_sent >= 256 * bpp, m.bytes_sent
    assert m.remaining_bytes <= (run.npages - 256) * run.page_size
    run.advance(850 * MS)
    m = run.metrics()
    assert m.bytes_sent <= 9 * 256 * bpp, m.bytes_sent


def test_rate_limited_pending_check_comes_only_when_a_window_has_ended():
    """QEMU migration_thread: migration_iteration_run (pending estimate, the exact sync when
    below threshold_size, the switchover) runs only while !migration_rate_exceeded (or
    urgent). ram_save_iterate sends until the budget is exceeded (or no dirty page is left,
    or 50 ms pass: not here, a budget takes 0.84 ms); migration_rate_limit then waits for the
    window's end, and the budget is reset (migration_update_counters -> migration_rate_reset,
    update_iteration_initial_status) before the next migration_iteration_run. So a pending
    check with dirty pages left always comes at the start of a window with nothing sent in it.

    The simulator sizes a send by ~50 ms slices at the average rate (send_slice's k from
    stop_below): its pending checks come mid-window. Here the exact sync that the estimate
    going below the threshold triggers starts at 6100.04 ms with 5 pages (20520 bytes) sent in
    the window and 763 pages dirty, a point where QEMU is still sending that window's budget."""
    run = MigrationRun(_rate_limited_idle())
    seen = []
    sync = run.sync

    def spy(last_stage=False):
        if not last_stage and run.paused_at is None:
            seen.append((run.loop.now / MS, run.bytes_sent - run._bw_b0, run.dirty.mig_count))
        return (yield from sync(last_stage))

    run.sync = spy
    m = run.run()
    assert m.converged and seen
    bad = [s for s in seen if s[1] and s[2]]
    assert not bad, f"(ms, bytes in the window, dirty pages) at a pending check: {bad}"


def test_max_bandwidth_below_ten_bytes_per_second_disables_the_rate_limiter():
    """QEMU migration_rate_set stores max-bandwidth / XFER_LIMIT_RATIO (integer division by
    10) as rate_limit_max, and migration_rate_exceeded returns false when rate_limit_max ==
    RATE_LIMIT_DISABLED (0): a max-bandwidth of 1..9 bytes/s is no limit at all, the
    migration runs at the link's rate (migration/migration-stats.c, migration-stats.h).

    Here 5 bytes/s on 10 GbE: all 64 MiB leave in ~54 ms. The simulator's window budget is
    int(5 x 0.1) = 0, taken as "no rate limiter", but MigrationRun.rate_Bps is the floor of one
    page per 100 ms (41040 B/s): ~8 KB sent in 200 ms."""
    run = MigrationRun(_rate_limited_idle(max_bandwidth_mibps=5 / MiB))
    run.advance(200 * MS)
    assert run.metrics().bytes_sent >= 32 * MiB
