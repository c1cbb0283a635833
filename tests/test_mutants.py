"""Tests from a mutation run over the run_on_cpu kick, the wire page, the ns conversions,
CLEAR_DIRTY_LOG's fields, the lost-writes report and check_out_dir: each kills a mutant the suite
let survive (named in its docstring). Two more stand beside their twins: the time cap's in
tests/env/test_audit_env.py, the real-KVM replay's in tests/realkvm/test_audit_realkvm.py."""

from __future__ import annotations

from pathlib import Path

from ringenv.config import load_scenario
from ringenv.vmm import MigrationRun
from ringenv.vmm.session import GUEST, SLEEP

MS = 1_000_000


def _sleep_one(r, i: int, sleep_ns: int) -> None:
    """Queue a throttle sleep on vCPU ``i`` alone (cpu_throttle_timer_tick's work, one vCPU)."""
    r.throttle_work[i] = sleep_ns
    e = r.vcpus[i].kick()
    if e is not None:
        r._on_exit(e)


def test_run_on_all_vcpus_waits_for_a_vcpu_that_fell_asleep_while_an_earlier_one_was_waited_for():
    """Session.run_on_all_vcpus: run_on_cpu on each vCPU in turn; "meanwhile the vCPUs not
    reached yet run on: one may ... fall asleep, and is then waited for too". vCPU 0 sleeps
    100 ms; 50 ms into that wait vCPU 1 (still in the guest when the kick began) falls into a
    100 ms sleep of its own: the kick of all ends only when vCPU 1 wakes, not when vCPU 0 does.
    Mutant killed: the vCPU states read once, when the kick began."""
    cfg = load_scenario("web", vm={"memory": "1GiB", "vcpus": 2}, interval_ms=5000)  # (live at 300 ms)
    r = MigrationRun(cfg, host_sync_ms=50)
    r.advance(300 * MS)
    assert list(r.vstate) == [GUEST, GUEST]
    L = 100 * MS
    _sleep_one(r, 0, L)
    r.advance(r.loop.now + r.costs.exit_ns)  # vCPU 0's exit round trip, then its sleep
    assert list(r.vstate) == [SLEEP, GUEST]
    wake0 = r.vproc[0].pending[0]
    t0 = r.loop.now
    took = []

    def proc():
        took.append((yield from r.run_on_all_vcpus()))

    r.spawn(proc(), r.PRIO_MAIN, "kick")
    r.advance(t0 + L // 2)
    assert not took
    _sleep_one(r, 1, L)
    r.advance(r.loop.now + r.costs.exit_ns)
    assert r.vstate[1] == SLEEP
    wake1 = r.vproc[1].pending[0]
    assert wake1 > wake0
    r.advance(wake0 + 1)
    assert not took, "the kick of all ended while vCPU 1, reached after vCPU 0, was still asleep"
    r.advance(wake1 + 5 * r.costs.exit_ns)
    assert took and t0 + took[0] >= wake1


def test_a_max_bandwidth_below_a_page_per_window_still_sends_a_whole_wire_page_per_window():
    """MigrationRun: QEMU's rate limiter lets at least one page through per 100 ms window, "a
    max-bandwidth below a page per 100 ms still sends that much": a page on the wire, i.e. a 64
    KiB host page as 16 target pages each with its 8-byte header (65664 bytes), not its 65536
    payload bytes alone. Mutant killed: the floor from the page size without the headers."""
    from ringenv.vmm.session import BW_WINDOW_NS, NS, PAGE_HEADER_BYTES

    cfg = load_scenario("idle", vm={"memory": "256MiB", "vcpus": 1}, host="arm64-64k",
                        link={"max_bandwidth_mibps": 0.001})
    r = MigrationRun(cfg)
    wire_page = 65536 + 16 * PAGE_HEADER_BYTES
    assert r.rate_Bps == wire_page * NS / BW_WINDOW_NS


def test_clear_dirty_log_num_pages_is_read_as_its_u32_field():
    """Vm.clear_dirty_log: ``num_pages`` is read as the struct's __u32: 2^32 + 64 reaches the
    kernel as 64, a valid range, and clears (only) pages 0..63. Mutant killed: num_pages
    masked to 64 bits (the call then fails with EINVAL)."""
    import numpy as np

    from ringenv.kvm import Vm
    from ringenv.kvm import uapi as U

    vm = Vm("x86-nopml")
    vm.enable_cap(U.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, U.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    vm.set_user_memory_region(0, U.KVM_MEM_LOG_DIRTY_PAGES, 0, 256 * vm.page_size)
    vm.write_without_vcpu(np.arange(0, 128))  # pages 0..127 dirty in the slot bitmap
    before = vm.get_dirty_log(0).copy()
    assert before[0] == before[1] == np.uint64(2**64 - 1)
    vm.clear_dirty_log(0, 0, (1 << 32) + 64, np.full(2, 2**64 - 1, dtype=np.uint64))
    after = vm.get_dirty_log(0)
    assert after[0] == 0 and after[1] == np.uint64(2**64 - 1)


SMALL_SET = ["vm.memory=256MiB", "vm.vcpus=2"]


def test_evaluate_exits_1_and_counts_the_episodes_that_lost_writes(tmp_path, capsys):
    """agents.evaluate.lost_writes: any episode that lost writes makes the commands exit 1 (as
    ``ringenv migrate`` does), and the summary counts them per policy (lost_write_episodes,
    the table's LOST WRITES column). arm64 without WITH_BITMAP loses writes in every episode.
    Mutants killed: evaluate's main returning 0 regardless; the column/count dropped."""
    import csv

    from ringenv.cli import main

    out = tmp_path / "e"
    rc = main(["evaluate", "--policies", "qemu", "--workloads", "oltp-heavy", "--seeds", "1", "--workers", "1",
               "--out", str(out), "--no-progress", "--set", *SMALL_SET, "vm.with_bitmap=false"])
    cap = capsys.readouterr()
    with open(out / "episodes.csv") as f:
        eps = list(csv.DictReader(f))
    assert eps and all(e["verified"] == "False" for e in eps)  # precondition: writes were lost
    assert rc == 1, (rc, cap.err[-1000:])
    assert "LOST WRITES" in cap.err
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["lost_write_episodes"] for r in rows] == [str(len(eps))]
    assert "LOST WRITES (episodes)" in cap.out


def test_evaluate_exits_0_and_shows_no_lost_writes_column_when_every_episode_verified(tmp_path, capsys):
    """The LOST WRITES column appears only when some episode lost writes; a clean evaluation
    exits 0."""
    from ringenv.cli import main

    rc = main(["evaluate", "--policies", "qemu", "--workloads", "oltp-heavy", "--seeds", "1", "--workers", "1",
               "--out", str(tmp_path / "e"), "--no-progress", "--set", *SMALL_SET])
    cap = capsys.readouterr()
    assert rc == 0, cap.err[-1000:]
    assert "LOST WRITES" not in cap.out + cap.err


def test_check_out_dir_refuses_a_path_under_a_file_even_an_executable_one(tmp_path):
    """agents.common.check_out_dir: an output directory "under no file": a path below a file
    is a ValueError naming the flag, whatever the file's mode (an executable, writable file
    too, which passes an access(W_OK | X_OK) check). Mutant killed: the under-a-file check
    dropped (left to the writability check)."""
    import os

    import pytest

    from agents.common import check_out_dir

    f = tmp_path / "script"
    f.write_text("#!/bin/sh\n")
    os.chmod(f, 0o755)
    with pytest.raises(ValueError, match="--out") as e:
        check_out_dir(f / "results" / "run1")
    assert "file" in str(e.value)


def test_check_out_dir_refuses_a_directory_it_cannot_write_into(tmp_path):
    """agents.common.check_out_dir: the output directory (or its nearest existing parent) must
    be writable, checked before any work. Mutant killed: the writability check dropped."""
    import os

    import pytest

    from agents.common import check_out_dir

    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):  # root: mode bits do not stop it; a procfs directory does
            ro = Path("/proc/1")
            if not ro.is_dir() or os.access(ro, os.W_OK):
                pytest.skip("no directory this user cannot write into")
        with pytest.raises(ValueError, match="not writable"):
            check_out_dir(ro / "out", "--out")
    finally:
        os.chmod(tmp_path / "ro", 0o700)


def test_a_harvest_interval_chosen_mid_episode_lands_on_the_same_ns_as_one_chosen_first():
    """env: one ms -> ns conversion (config.to_ns, rounded) for the harvest interval: 33.3 ms
    is 33_300_000 ns whether the episode starts with it or an action switches to it later
    (int() would give 33_299_999). The session's metrics' interval_ms (the reaper's current
    interval; the info's is the action's) is then 33.3 both ways. Mutant killed: the
    mid-episode switch converted with int()."""
    import gymnasium as gym
    import numpy as np
    import pytest

    import ringenv  # noqa: F401

    def intervals(actions):
        env = gym.make("ringenv/Migration-v0", workloads=["oltp"], vm={"memory": "256MiB", "vcpus": 2},
                       intervals_ms=[10, 33.3])
        try:
            env.reset(seed=0)
            out = []
            for a in actions:
                env.step(np.array(a))
                out.append(env.unwrapped._session.metrics().interval_ms)
            return out
        finally:
            env.close()

    first = intervals([[0, 1]])
    later = intervals([[0, 0], [0, 1]])
    assert first[-1] == pytest.approx(33.3, abs=1e-12)
    assert later[-1] == first[-1]
