"""A stop (a checkpoint's stop-the-world pause, a migration's stop-and-copy) waits out a
dirty-limit sleep under way: QEMU's pause_all_vcpus waits for every vCPU thread to stop, and one
in g_usleep stops only when the sleep ends. From the stop on, those seconds are the stop's (the
run measures its pause or downtime from there), not the vCPU's throttle time: counted as both,
the env's reward charged the same seconds twice (downtime and lost vCPU time are weighted alike,
as seconds the whole VM does not run). Found by a checkpoint audit: a 10.18 s pause of which
10.08 s waited for the vCPUs to park, 20.0 vCPU-s of throttle sleep counted inside it."""

from __future__ import annotations

from ringenv.config import load_scenario
from ringenv.vmm.checkpoint import CheckpointRun

NS = 1_000_000_000


def _scenario():
    return load_scenario({"name": "t", "kind": "checkpoint", "host": "arm64-4k",
                          "vm": {"memory": "256MiB", "vcpus": 2}, "workload": "memcached",
                          "throttle": "dirty-limit",
                          "checkpoint": {"period_s": 2, "storage_mbps": 1000, "horizon_s": 9,
                                         "stop_the_world": True}})


class _Watched(CheckpointRun):
    """Records, for each pause, its length and the throttle time counted while it lasted."""

    def __init__(self, *a, **k):
        self.windows = []
        super().__init__(*a, **k)

    def _checkpoint(self, stw):
        th0 = None
        gen = super()._checkpoint(stw)
        orig = self.pause_vm

        def pause_vm():
            nonlocal th0
            th0 = self._throttled_ns(self.loop.now)
            yield from orig()
        self.pause_vm = pause_vm
        yield from gen
        del self.pause_vm
        self.windows.append((self.pauses[-1], self._throttled_ns(self.loop.now) - th0))


def test_a_pause_waiting_out_dirty_limit_sleeps_counts_them_as_pause_only():
    run = _Watched(_scenario(), seed=1)
    run.run()
    long = [(p, th) for p, th in run.windows if p > 1 * NS]
    assert long, f"no pause waited for a sleep: {run.windows}"  # the set-up worked: 10.18 s
    for p, th in run.windows:
        assert th == 0, f"{th / NS:.3f} vCPU-s of throttle counted inside a {p / NS:.3f} s pause"
    assert run.metrics().vcpu_throttle_s > 1  # the sleeps before each stop still count


def test_only_the_part_of_a_sleep_before_the_stop_counts():
    """_cut_throttle_sleeps at t: a sleep begun 3 ns before t counts 3 ns (then stops growing);
    one that begins after t does not count and is no longer under way."""
    run = CheckpointRun(_scenario(), seed=1)
    t = run.loop.now + 1000
    run._throttle_sleep(0, t - 3, 500)
    run._throttle_sleep(1, t + 5, 500)
    assert run._throttling == 2
    run._cut_throttle_sleeps(t)
    assert run._throttling == 1 and run._throttled_ns(t + 10_000) == 3
    run.loop.now = t + 10_000
    run._throttle_woke(0)
    run._throttle_woke(1)
    assert run._throttling == 0 and run.throttle_ns.tolist()[:2] == [3, 0]
    run.close()
