"""Zero pages (``vm.zero_fraction``): QEMU checks each page it sends (buffer_is_zero) and puts a
zero page on the stream as its header and one byte (save_zero_page), 9 bytes per 4 KiB target
page, the check costing the migration thread the host's ``zero_page_check_ns`` per target page.
A page is zero while it is one of the pages that start zero and the guest has not written it.
Hand-worked cases first, then whole runs against the stream's byte arithmetic."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest

import ringenv  # noqa: F401
from ringenv.config import ConfigError, load_scenario
from ringenv.vmm.checkpoint import CheckpointRun
from ringenv.vmm.dirty import DirtyPages, initially_zero, zero_q
from ringenv.vmm.migration import MigrationRun

MiB = 1 << 20
STILL = {"name": "still", "regions": [{"fraction": 1.0, "rate_mbps": 0.0}]}  # the guest writes nothing
HEADER = 8  # QEMU: be64 offset | flags, per target page


# ---------------------------------------------------------------- which pages start zero
def test_initially_zero_steps_evenly():
    """z = 1/4: the pages where floor(p z) steps up are 3, 7, 11, ...; z = 1: every page; z = 0:
    none."""
    q = zero_q(0.25)
    assert [p for p in range(16) if initially_zero(p, q)] == [3, 7, 11, 15]
    assert all(initially_zero(p, zero_q(1.0)) for p in range(100))
    assert not any(initially_zero(p, 0) for p in range(100))


@pytest.mark.parametrize("z", [0.1, 1 / 3, 0.5, 0.9, 0.999])
def test_every_run_of_pages_has_its_share(z):
    """Any run [a, b) holds floor(b z) - floor(a z) of them (up to the 24-bit fixed point)."""
    q = zero_q(z)
    flags = np.array([initially_zero(p, q) for p in range(5000)])
    rng = np.random.default_rng(0)
    for a, b in np.sort(rng.integers(0, 5001, size=(50, 2)), axis=1):
        assert flags[a:b].sum() == (int(b) * q >> 24) - (int(a) * q >> 24)
        assert abs(flags[a:b].sum() - (b - a) * z) < 1 + 1e-6 * b


# ---------------------------------------------------------------- the VMM's copy
def _pages(z):
    d = DirtyPages(16, with_slot=True, zero_fraction=z)
    version = np.zeros(16, dtype=np.uint32)
    version[3], version[4] = 2, 1  # the guest wrote pages 3 and 4
    return d, version


def test_copy_run_counts_the_zero_pages_it_sends():
    """z = 1/2: pages 1, 3, 5, ... start zero; page 3 was written since: of the run 0..7 the
    zero pages are 1, 5 and 7."""
    d, version = _pages(0.5)
    assert d.copy_run(0, 8, version) == 3
    assert (d.zero_pages, d.pages_sent) == (3, 8)
    assert d.copy_run(8, 8, version) == 4  # 9, 11, 13, 15
    assert d.zero_pages == 7 and d.lost_writes(version) == 0  # zero pages are sent (verified) too


def test_copy_of_scattered_pages_counts_the_zero_pages():
    d, version = _pages(0.5)
    pages = np.array([1, 2, 3, 9, 12], dtype=np.int64)  # zero: 1 and 9 (3 was written)
    assert d.copy(pages, version) == 2
    assert (d.zero_pages, d.pages_sent) == (2, 5)
    version[9] = 1  # written after it was sent: re-sent in full
    assert d.copy(np.array([9, 11], dtype=np.int64), version) == 1  # only 11
    assert (d.zero_pages, d.pages_resent) == (3, 1)


def test_no_zero_fraction_no_zero_page():
    d, version = _pages(0.0)
    assert d.copy_run(0, 16, version) == 0 and d.zero_pages == 0


# ---------------------------------------------------------------- whole runs
def _run(cls=MigrationRun, z=1.0, host="x86-nopml", memory=64 * MiB, workload=STILL, **over):
    link = {"downtime_limit_ms": 1.0, "device_state_bytes": 0, "max_bandwidth_mibps": "link",
            **over.pop("link", {})}
    run = cls("default", host=host, vm={"memory": memory, "vcpus": 2, "zero_fraction": z, "block_fraction": 0.0},
              workload=workload, link=link, **over)
    return run, run.run()


def test_a_guest_of_zero_pages_sends_nine_bytes_a_page_at_the_check_rate():
    """Nothing written, every page zero: the stream is 9 bytes per page, and the bulk stage
    takes the checks' time (300 ns a page on the x86 profile), not the wire's (7 ns a page at
    10 Gb/s); the bandwidth QEMU measures (over >= 100 ms) is then 9 bytes per 300 ns."""
    run, m = _run(memory=1 << 32)
    n = run.npages
    check = run.costs.zero_page_check_ns
    assert check == 300
    assert (m.pages_sent, m.zero_pages, m.pages_resent) == (n, n, 0)
    assert m.bytes_sent == 9 * n and m.lost_writes == 0 and m.verified
    assert m.bandwidth_Bps == pytest.approx(9 / (check * 1e-9), rel=1e-3)
    _, full = _run(z=0.0, memory=1 << 32)
    assert full.bytes_sent == (4096 + HEADER) * n and full.zero_pages == 0
    # the sends: n checks against n pages on the wire; the rest (syncs, setup) is the same
    wire = (4096 + HEADER) * n / (10e9 / 8)
    assert m.total_s - n * check * 1e-9 == pytest.approx(full.total_s - wire, abs=2e-4)


def test_a_quarter_of_zero_pages():
    """z = 1/4, nothing written: a quarter of the pages go as 9 bytes, the rest in full; the
    slices are wire-bound (3.3 us a full page against 0.3 us a check)."""
    run, m = _run(z=0.25)
    n = run.npages
    assert m.zero_pages == n // 4
    assert m.bytes_sent == (n - n // 4) * (4096 + HEADER) + n // 4 * 9


@pytest.mark.parametrize("host, targets", [("arm64-16k", 4), ("arm64-64k", 16)])
def test_a_large_page_is_its_target_pages(host, targets):
    """A 16K/64K host page is 4/16 target pages on the stream: a zero one is 9 bytes and one
    check per target page."""
    run, m = _run(host=host, z=1.0, memory=256 * MiB)
    assert (run.zero_wire_bytes, run.zero_check_ns) == (9 * targets, 300 * targets)
    vgic = len(run.vgic_gfns)  # written by KVM at the stop: re-sent in full
    full = run.page_size + HEADER * targets
    assert m.zero_pages == run.npages
    assert m.bytes_sent == run.npages * 9 * targets + vgic * full


@pytest.mark.parametrize("host", ["arm64-4k", "x86-pml", "arm64-64k"])
@pytest.mark.parametrize("rate", ["link", 400])
def test_the_stream_is_whole_pages_and_zero_pages_when_the_guest_writes(host, rate):
    """A guest that writes: each page is sent in full or as a zero page, whichever it was when
    sent; the pages written before the bulk stage reached them are not zero. No write is lost,
    with or without the rate limiter."""
    run, m = _run(z=0.6, host=host, memory=128 * MiB, workload="web", rate_scale=8.0,
                  link={"max_bandwidth_mibps": rate, "device_state_bytes": 4096, "downtime_limit_ms": 300})
    targets = max(1, run.page_size // 4096)
    full = run.page_size + HEADER * targets
    assert m.lost_writes == 0 and m.converged
    assert m.bytes_sent == (m.pages_sent - m.zero_pages) * full + m.zero_pages * 9 * targets + 4096
    start_zero = sum(initially_zero(p, zero_q(0.6)) for p in range(run.npages))
    written = int(np.count_nonzero(run.source_version()[np.array(
        [initially_zero(p, zero_q(0.6)) for p in range(run.npages)])]))
    assert written > 0  # the guest wrote some of the zero pages
    assert start_zero - written <= m.zero_pages <= start_zero


@pytest.mark.parametrize("collector", ["ring", "bitmap"])
@pytest.mark.parametrize("rate", ["link", 400])
def test_a_guest_of_zero_pages_with_either_collector_and_the_rate_limiter(collector, rate):
    """Every page zero, 2 GiB: the run takes the checks' time, 300 ns a page, with the rate
    limiter too (9 bytes per 300 ns is 30 MB/s, far below its 400 MiB/s: it never waits), and
    with the bitmap collector's scattered sends (take/copy), plus its CLEARs (50 ns a page)."""
    run, m = _run(memory=1 << 31, collector=collector, link={"max_bandwidth_mibps": rate})
    n = run.npages
    assert (m.zero_pages, m.pages_sent, m.bytes_sent, m.lost_writes) == (n, n, 9 * n, 0)
    clears = n * run.costs.clear_dirty_log_page_ns * 1e-9 if collector == "bitmap" else 0.0
    assert m.total_s == pytest.approx(n * 300e-9 + clears, abs=0.005)
    if collector == "ring":
        assert m.bandwidth_Bps == pytest.approx(9 / 300e-9, rel=0.01)
    else:  # the CLEARs run on the migration thread, inside the bandwidth's windows: the last window
        # measured (>= 100 ms) holds at most both 1 GiB chunks' CLEARs
        chunk_clear_s = (1 << 30) // run.page_size * run.costs.clear_dirty_log_page_ns * 1e-9
        assert 9 / 300e-9 * (1 - 2 * chunk_clear_s / 0.1) <= m.bandwidth_Bps <= 9 / 300e-9 * 1.001


@pytest.mark.parametrize("host, collector", [("x86-nopml", "ring"), ("arm64-4k", "bitmap"), ("arm64-64k", "ring")])
@pytest.mark.parametrize("rate", ["link", 400])
def test_metrics_read_mid_send_count_only_what_the_thread_has_checked(host, collector, rate):
    """Read every 20 ms, an all-zero guest's metrics show the pages the thread has got
    through by then: all zero pages, at 300 ns each per target page."""
    run = MigrationRun("default", host=host, collector=collector, workload=STILL,
                       vm={"memory": 1 << 30, "vcpus": 2, "zero_fraction": 1.0},
                       link={"downtime_limit_ms": 1.0, "max_bandwidth_mibps": rate})
    per_page_s = 300e-9 * max(1, run.page_size // 4096)
    t, seen = 0, []
    while run.phase in ("setup", "bulk"):
        t += 20_000_000
        run.advance(t)
        m = run.metrics()
        if run.phase == "bulk":
            assert m.zero_pages == m.pages_sent
            seen.append(m.pages_sent)
            assert m.pages_sent <= t * 1e-9 / per_page_s + 1
    assert len(seen) >= 3 and seen == sorted(seen) and seen[-1] > seen[0]


def test_a_large_page_is_checked_per_target_page():
    """arm64-64k, every page zero: 16 checks a host page."""
    run, m = _run(host="arm64-64k", memory=1 << 30)
    assert m.total_s == pytest.approx(run.npages * 16 * 300e-9, abs=0.005)


def test_zero_pages_left_at_the_stop_are_checked_in_the_downtime():
    """Forced to stop early (give_up_s 20 ms): the stop-and-copy sends the zero pages the bulk
    stage had not reached, each checked: the downtime is at least their checks' time."""
    run, m = _run(memory=1 << 30, link={"give_up_s": 0.02})
    assert not m.converged
    left = run.npages - round(0.02 / 300e-9)  # sent live: about 20 ms of checks (a slice past it at most)
    assert m.downtime_s >= 0.9 * (run.npages - round(0.07 / 300e-9)) * 300e-9
    assert m.downtime_s <= left * 300e-9 + 0.005


def test_a_fast_link_does_not_run_past_the_deadline():
    """400 Gb/s: a full page is 82 ns on the wire, a zero page's check 300 ns. The slices are
    sized for the checks, so the live phase stops within a 50 ms slice of give_up_s, as QEMU's
    ram_save_iterate returns after 50 ms whatever the pages hold."""
    run = MigrationRun("default", host="x86-nopml", workload=STILL, vm={"memory": 1 << 32, "vcpus": 2,
                                                                         "zero_fraction": 1.0},
                       link={"gbps": 400, "downtime_limit_ms": 1.0, "give_up_s": 0.02})
    stops = []
    pause = run.pause_vm

    def spy():
        stops.append(run.loop.now)
        return (yield from pause())

    run.pause_vm = spy
    m = run.run()
    assert not m.converged and len(stops) == 1
    assert stops[0] <= 0.02e9 + 50_000_000 + 1_000_000


def test_the_checkpoint_base_image_takes_the_checks_time():
    """10 ms into a checkpoint run of an all-zero 1 GiB guest its base image is still being
    written, about 10 ms of checks' worth of zero pages so far."""
    run = CheckpointRun("default", host="x86-nopml", workload=STILL,
                        vm={"memory": 1 << 30, "vcpus": 2, "zero_fraction": 1.0},
                        checkpoint={"horizon_s": 2.0, "period_s": 1.0, "storage_mbps": 2000})
    run.advance(10_000_000)
    m = run.metrics()
    assert run.phase == "base"
    assert 0 < m.zero_pages == m.pages_sent <= 0.01 / 300e-9 + 1


def test_the_measured_bandwidth_counts_the_stream_bytes():
    """QEMU's bandwidth is bytes on the stream over >= 100 ms: zero pages lower it, and with it
    the switchover threshold (bandwidth x downtime-limit). 4 GiB, nothing written: with z = 0.99
    a send of 20 slices' pages (304k) is check-bound, ~91 ms, and the second one closes the
    first window; with z = 0 the first send (1 s on the wire) does."""
    for z, look_ns in ((0.0, 1_200_000_000), (0.99, 200_000_000)):
        run = MigrationRun("default", host="x86-nopml", vm={"memory": 1 << 32, "vcpus": 2, "zero_fraction": z},
                           workload=STILL, link={"downtime_limit_ms": 1.0})
        run.advance(look_ns)
        assert run.phase == "bulk"
        per_page = (4096 + HEADER) * (1 - z) + 9 * z  # bytes, and the time each page takes:
        per_page_s = max((4096 + HEADER) * (1 - z) / 1.25e9, 300e-9 * z)
        assert run.bandwidth_Bps == pytest.approx(per_page / per_page_s, rel=0.01), z
        assert run.threshold_bytes == int(run.bandwidth_Bps * 1e-3)


def test_a_checkpoint_base_image_of_zero_pages():
    """A checkpoint's base image goes through the same stream: zero pages as 9 bytes."""
    run, m = _run(cls=CheckpointRun, z=1.0, checkpoint={"horizon_s": 2.0, "period_s": 1.0})
    assert m.pass_bytes[0] == 9 * run.npages
    assert m.lost_writes == 0


def test_the_default_has_no_zero_page():
    assert load_scenario("default").vm.zero_fraction == 0.0
    _, m = _run(z=0.0)
    assert m.zero_pages == 0


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf"), "half", True])
def test_zero_fraction_is_validated(bad):
    with pytest.raises(ConfigError, match="vm.zero_fraction"):
        load_scenario("default", vm={"memory": 64 * MiB, "vcpus": 2, "zero_fraction": bad})


def test_the_env_takes_it_and_reports_zero_pages():
    """The env passes vm.zero_fraction through; info carries zero_pages; a mostly zero idle
    guest migrates in less time than the same guest with data in every page."""
    steps = {}
    for z in (0.0, 0.9):
        env = gym.make("ringenv/Migration-v0", workloads=["idle"], vm={"memory": "1GiB", "vcpus": 2,
                                                                       "zero_fraction": z})
        env.reset(seed=0)
        n, done = 0, False
        while not done:
            _, _, te, tr, info = env.step(env.action_space.sample())
            n, done = n + 1, te or tr
        assert te and info["lost_writes"] == 0
        assert (info["zero_pages"] > 0) == (z > 0)
        steps[z] = info["total_s"]
    assert steps[0.9] < 0.5 * steps[0.0]
    assert math.isfinite(steps[0.9])


def test_scale_scenario_keeps_the_zero_pages_timing():
    """scale_scenario slows the link by the factor it shrinks the memory: a zero page's check is
    a page's sending time as well, so it is scaled with it, and the migration takes the same
    simulated time (before: 0.63 s at 8 GiB, 0.10 s at 512 MiB)."""
    from ringenv.config import scale_scenario

    over = {"vm": {"zero_fraction": 0.99}, "workload": STILL}
    full = MigrationRun(load_scenario("idle", **over)).run()
    small = scale_scenario("idle", "512MiB", **over)
    assert small.profile.costs.zero_page_check_ns == 300 * 16
    assert MigrationRun(small).run().total_s == pytest.approx(full.total_s, rel=0.03)
    assert scale_scenario("idle", "512MiB").host == "arm64-4k"  # no zero pages: the profile by name


def test_a_host_profile_without_the_check_cost_takes_the_default():
    """A host profile written before zero pages were modelled still loads: 300 ns, the shipped
    profiles' estimate."""
    from ringenv.config import HostProfile, load_host_profile

    d = load_host_profile("x86-pml").model_dump()
    del d["costs"]["zero_page_check_ns"]
    assert HostProfile.parse(d).costs.zero_page_check_ns == 300.0
