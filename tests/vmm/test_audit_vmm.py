"""The VMM against QEMU's code (accel/kvm/kvm-all.c, system/dirtylimit.c, system/cpu-throttle.c,
migration/ram.c, migration/migration.c): rules an audit found missing. Each test states QEMU's
rule and where it lives."""

from __future__ import annotations

import sys

from ringenv.vmm import MigrationRun
from ringenv.vmm.session import DLSLEEP

from ._helpers import small

MS = 1_000_000
NS = 1_000_000_000


def _uneven_dirty_limit_run(weights=(0.7, 1.0)):
    """analytics scaled to 1 GiB on 2 vCPUs whose write rates differ (vcpu_weights), so that
    dirty-limit gives them different sleeps that do not line up; dirty-limit engages (~22 s)."""
    wl = {"name": "uneven", "cpu_busy": 1.0,
          "regions": [{"fraction": 0.75, "rate_mbps": 1500, "layout": "scattered",
                       "vcpu_weights": list(weights)}]}
    cfg = small("analytics", 1 << 30, vm={"vcpus": 2}, workload=wl, throttle="dirty-limit",
                link={"give_up_s": 40}, seed=0)
    return MigrationRun(cfg)


def test_a_ring_flush_waits_for_run_on_cpu_on_each_vcpu_in_turn():
    """kvm_dirty_ring_flush -> kvm_cpu_synchronize_kick_all: ``CPU_FOREACH(cpu)
    run_on_cpu(cpu, do_kvm_cpu_synchronize_kick, ...)``, one vCPU after the other, each call
    waiting (qemu_cond_wait, the BQL released) until that vCPU's thread ran the work in
    qemu_wait_io_event; only then kvm_dirty_ring_reap. A vCPU thread asleep in
    dirtylimit_vcpu_execute (g_usleep after the ring-full reap, which the SIG_IPI does not cut
    short) runs the work when it wakes. So while run_on_cpu waits for vCPU 0's sleep, vCPU 1
    (not kicked yet: its run_on_cpu has not been called) keeps running, may fill its ring,
    reap its own ring under the BQL (free during the wait) and start a new dirty-limit sleep;
    run_on_cpu(vCPU 1) then waits for that sleep too. The flush (in a migration sync or in the
    dirty-limit thread's global_dirty_log_sync) cannot reap before.

    (Before, the simulator waited only for the sleeps under way when the sync started: here,
    seed 0, the sync at 27.48 s waited for vCPU 0 until 37.77 s while vCPU 1 woke at 33.63 s,
    filled its ring at 33.94 s and slept until 44.72 s: QEMU's flush reaps at >= 44.72 s.)

    Checked from the run's own history: for every flush, the earliest time QEMU's sequence
    of run_on_cpu could be done (each vCPU in index order: if it is asleep then in a
    dirty-limit sleep it began before the simulator's flush, wait until it wakes) must not be
    after the simulator's flush."""
    run = _uneven_dirty_limit_run()
    sleeps = []  # (vCPU, began, wakes) of every dirty-limit sleep
    waits = []  # (caller, time): a flush's caller starts waiting for the sleeping vCPU threads
    flushes = []  # (caller, time): the flush kicks and reaps

    orig_sleep = run._throttle_sleep

    def spy_sleep(i, start, length):
        if run.vstate[i] == DLSLEEP and length:
            sleeps.append((i, run.loop.now, start + length))
        return orig_sleep(i, start, length)

    run._throttle_sleep = spy_sleep
    orig_wait = run.run_on_all_vcpus

    def spy_wait():
        waits.append((sys._getframe(1).f_code.co_name, run.loop.now))
        return (yield from orig_wait())

    run.run_on_all_vcpus = spy_wait
    col = run.collector
    orig_flush = col.flush

    def spy_flush():  # called by RingCollector.sync (a migration sync) or by the dirty-limit thread
        flushes.append((sys._getframe(1).f_code.co_name, run.loop.now))
        return orig_flush()

    col.flush = spy_flush
    m = run.run()
    assert run.throttle.in_service and m.vcpu_throttle_s > 10

    late = []
    for who, t in waits:
        tf = next((f for caller, f in flushes if caller == who and f >= t), None)
        if tf is None:
            continue
        done = t  # QEMU: run_on_cpu(vCPU 0), then vCPU 1, ...
        for v in range(len(run.vcpus)):
            for i, began, wakes in sleeps:
                if i == v and began <= done < wakes and began < tf:
                    done = wakes
        if done > tf:
            late.append((who, t / NS, tf / NS, done / NS))
    assert not late, f"flushes that reap before QEMU's run_on_cpu sequence could end: {late}"


def test_a_16k_or_64k_host_page_goes_on_the_wire_as_4k_target_pages_each_with_its_header():
    """QEMU's migration stream is in target pages (TARGET_PAGE_SIZE, 4 KiB for an arm64 guest
    whatever the host's granule: arm_cpu_realizefn asks set_preferred_target_page_bits(12)).
    KVM logs a host page; kvm_slot_sync_dirty_pages -> cpu_physical_memory_set_dirty_lebitmap
    marks each of its host_page / 4 KiB target pages dirty, and ram_save_host_page sends them
    one by one (ram_save_target_page -> save_normal_page -> save_page_header: a be64 offset |
    flags, 8 bytes, per target page). A dirty 64 KiB host page is 16 x (8 + 4096) = 65664 bytes
    on the wire, a 16 KiB page 4 x 4104 = 16416; ram_transferred_add counts TARGET_PAGE_SIZE per
    page (the same payload bytes).

    (Before, a host page had one header: 65544 and 16392 bytes, 0.18% and 0.15% short.)"""
    for host in ("arm64-16k", "arm64-64k"):
        cfg = small("web", 512 << 20, host=host)
        m = MigrationRun(cfg).run()
        ps = cfg.profile.page_size
        per_page = (m.bytes_sent - cfg.link.device_state_bytes) / m.pages_sent
        assert per_page >= ps + 8 * (ps // 4096), (host, per_page, ps + 8 * (ps // 4096))
