"""Randomized configurations never lose a write (docs/DESIGN.md: reliability), and runs are exact
under random stepping."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringenv.config import HOST_PROFILES, load_host_profile, load_scenario
from ringenv.vmm import make_run

WORKLOADS = ["idle", "web", "oltp", "oltp-heavy", "memcached", "redis", "kernel-build", "analytics", "stream-scan",
             "hpc-stencil", "jvm-gc", "ml-training", "bursty", "file-server", "vdi-desktop", "uniform-800"]


@st.composite
def configs(draw):
    host = draw(st.sampled_from(HOST_PROFILES))
    prof = load_host_profile(host)
    collector = draw(st.sampled_from(["ring", "bitmap"]))
    kind = draw(st.sampled_from(["migration", "migration", "checkpoint"]))
    throttle = draw(st.sampled_from((["none"] if kind == "checkpoint" else ["none", "auto-converge"])
                                    + (["dirty-limit"] if collector == "ring" else [])))
    vm = {"memory": f"{draw(st.sampled_from([128, 256, 512]))}MiB", "vcpus": draw(st.integers(1, 6)),
          "block_fraction": draw(st.sampled_from([0.0, 0.5, 1.0])),
          "zero_fraction": draw(st.sampled_from([0.0, 0.0, 0.5, 0.95]))}
    if prof.eager_split_chunk_sizes and draw(st.booleans()):
        vm["eager_split_chunk"] = draw(st.sampled_from(prof.eager_split_chunk_sizes))
    return load_scenario("default", host=host, vm=vm, workload=draw(st.sampled_from(WORKLOADS)),
                         rate_scale=draw(st.sampled_from([0.05, 0.2, 0.5])), collector=collector,
                         ring_entries=draw(st.sampled_from(prof.ring_sizes[:4])),
                         interval_ms=draw(st.sampled_from([5, 50, 500, 3000])), throttle=throttle,
                         switchover=draw(st.sampled_from(["qemu", "pass-end"])),
                         kind=kind,
                         link={"gbps": draw(st.sampled_from([0.5, 2.0])), "give_up_s": 8},
                         checkpoint={"period_s": 1.5, "storage_mbps": 300, "horizon_s": 5,
                                     "stop_the_world": draw(st.booleans())},
                         seed=draw(st.integers(0, 1000)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(), step_ms=st.integers(7, 400))
def test_random_correct_configurations_verify_and_step_exactly(cfg, step_ms):
    whole = make_run(cfg).run()
    assert whole.done and whole.verified is True and whole.lost_writes == 0, whole
    assert whole.ring_overflows == 0 and whole.wedged_vcpus == 0
    assert whole.zero_pages <= whole.pages_sent and (whole.zero_pages > 0) <= (cfg.vm.zero_fraction > 0)
    r = make_run(cfg)
    t, prev = 0, (0, 0, 0, 0)
    while not r.done:
        t += step_ms * 1_000_000
        r.advance(t)
        m = r.metrics()  # read mid-send too: what is on the wire so far, never going back
        now = (m.bytes_sent, m.pages_sent, m.pages_resent, m.zero_pages)
        assert all(a >= b for a, b in zip(now, prev)) and m.zero_pages <= m.pages_sent, (prev, now)
        prev = now
    assert r.metrics() == whole
