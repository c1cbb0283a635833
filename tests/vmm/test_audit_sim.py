"""The migration record against metrics.py's definitions, cases an audit found failing before
their fixes: pass_bytes' last entry is the stop-and-copy alone; bytes_sent counts the device
state as it reaches the link or storage."""

from __future__ import annotations


from ringenv.config import scale_scenario
from ringenv.vmm import CheckpointRun, MigrationRun
from ringenv.vmm.session import PAGE_HEADER_BYTES

MS = 1_000_000
PAGE = 4096
BPP = PAGE + PAGE_HEADER_BYTES


def _bytes_at_stop(run):
    """Spy on ``run.pause_vm``: the list gets ``run.bytes_sent`` when the VM is stopped."""
    at = []
    pause = run.pause_vm

    def spy():
        at.append(run.bytes_sent)
        return (yield from pause())

    run.pause_vm = spy
    return at


# ------------------------------------------------------------------------------------------
# 1. pass_bytes: the last entry of a migration is "the stop-and-copy" (metrics.py: "bytes sent
#    in each completed pass; migration: then the stop-and-copy"). When the loop leaves without
#    an exact sync (forced at give_up_s, or pending == 0 before the bandwidth is measured) the
#    bytes of the pass under way are added to the stop-and-copy's entry.
# ------------------------------------------------------------------------------------------
def test_forced_switchover_last_pass_bytes_entry_is_only_the_stop_and_copy():
    cfg = scale_scenario("analytics", 256 << 20, vm={"vcpus": 2}, link={"give_up_s": 20})
    r = MigrationRun(cfg)
    at = _bytes_at_stop(r)
    m = r.run()
    assert r.forced and not m.converged and len(at) == 1
    stop_copy = m.bytes_sent - at[0]  # pages + headers + device state sent after the stop
    # audited code: 260,604,008 (127,416,888 of the unfinished live pass + 133,187,120)
    assert m.pass_bytes[-1] == stop_copy, (m.pass_bytes, stop_copy)


def test_switchover_without_exact_sync_does_not_fold_the_bulk_pass_into_the_stop_and_copy():
    """A 64 MiB idle VM: the bulk stage is sent before the first 100 ms bandwidth window closes,
    so the threshold is still 0 and QEMU's rule switches over on pending == 0 without an exact
    sync (faithful). The record then says the stop-and-copy sent the whole of RAM."""
    r = MigrationRun("idle", vm={"memory": "64MiB", "vcpus": 2},
                     link={"max_bandwidth_mibps": "link", "device_state_bytes": 0})
    at = _bytes_at_stop(r)
    m = r.run()
    assert m.converged and m.verified
    stop_copy = m.bytes_sent - at[0]
    # audited code: pass_bytes == (67457448,), the stop-and-copy sent 217,512 bytes
    assert m.pass_bytes[-1] == stop_copy, (m.pass_bytes, stop_copy)


# ------------------------------------------------------------------------------------------
# 2. bytes_sent counts the device state as written the moment its write starts (send_bytes adds
#    it before yielding), while pages are counted as they reach the link/storage (_in_flight).
#    metrics.py: a record "is valid at any step of a run"; bytes_sent: "bytes put on the
#    link/storage". At 20 MB/s a 20 MB device state takes 1 s of the pause; during that second
#    every step already reports all 20 MB.
# ------------------------------------------------------------------------------------------
def test_device_state_bytes_are_not_reported_before_they_are_written():
    dev = 20_000_000
    r = CheckpointRun("checkpoint", vm={"memory": "64MiB", "vcpus": 1}, workload="idle",
                      link={"device_state_bytes": dev},
                      checkpoint={"horizon_s": 8, "period_s": 5, "storage_mbps": 20})
    t = 0
    excess = []  # bytes_sent beyond the pages' bytes and the finished checkpoints' device states
    while not r.finished:
        t += 20 * MS
        r.advance(t)
        m = r.metrics()
        if m.phase == "paused":
            excess.append(m.bytes_sent - m.pages_sent * BPP - m.checkpoints * dev)
    m = r.metrics()
    assert m.checkpoints == 1 and r.pauses[0] > 1.0e9  # the device state alone takes 1 s of it
    during_device_state = [x for x in excess if x > PAGE]
    assert len(during_device_state) >= 40  # ~50 steps of 20 ms while it is written
    # while the VM is still paused the device state is not all on storage yet
    # (audited code: every one of those steps reports exactly 20,000,000)
    assert max(during_device_state) < dev, during_device_state[:3]
    assert min(during_device_state) < dev / 2
