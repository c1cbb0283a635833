"""Scenario configuration: every shipped scenario loads; bad values name the field."""

from __future__ import annotations

import pytest

from ringenv.config import ConfigError, ScenarioConfig, load_host_profile, load_scenario, scale_scenario, scenario_names

REQUIRED = {"idle", "web", "oltp", "memcached", "kernel-build", "analytics", "default", "ring-vs-bitmap", "stress"}


def test_required_scenarios_exist_and_load():
    names = set(scenario_names())
    assert REQUIRED <= names
    for n in names:
        cfg = load_scenario(n)
        assert cfg.name == n
        assert cfg.profile.name == cfg.host
        assert cfg.vm.memory % cfg.profile.page_size == 0


def test_shapes_of_the_named_scenarios():
    d = load_scenario()  # default
    assert d.name == "default" and d.vm.vcpus == 8 and d.vm.memory == 16 << 30 and d.link.gbps == 10
    rvb = load_scenario("ring-vs-bitmap")
    assert (rvb.vm.memory, rvb.vm.vcpus, rvb.link.gbps, rvb.workload) == (24 << 30, 8, 10, "uniform-800")
    st = load_scenario("stress")
    assert (st.vm.vcpus, st.vm.memory) == (64, 256 << 30)
    assert load_scenario("analytics").workload_config.rate_mbps > 1000


def test_defaults_follow_qemu():
    cfg = ScenarioConfig.parse({"name": "x", "vm": {"memory": "1GiB", "vcpus": 2}, "workload": "idle"})
    assert cfg.link.max_bandwidth_mibps == 128.0 and cfg.link.downtime_limit_ms == 300
    assert cfg.link.rate_Bps == 128 << 20
    assert (cfg.ring_entries, cfg.interval_ms, cfg.collector, cfg.throttle) == (4096, 1000.0, "ring", "none")
    assert cfg.vm.block_fraction == 0.5 and cfg.vm.with_bitmap is None
    assert cfg.auto_converge.initial_pct == 20 and cfg.auto_converge.increment_pct == 10
    assert cfg.dirty_limit.vcpu_limit_mbps == 1.0 and cfg.dirty_limit.period_ms == 1000
    assert load_scenario(cfg, link={"max_bandwidth_mibps": "link"}).link.rate_Bps == 10e9 / 8


def test_sizes_are_parsed():
    cfg = load_scenario("default", vm={"memory": "512MiB", "eager_split_chunk": "2MiB"},
                        link={"device_state_bytes": "4MiB"})
    assert cfg.vm.memory == 512 << 20 and cfg.vm.eager_split_chunk == 2 << 20
    assert cfg.link.device_state_bytes == 4 << 20


@pytest.mark.parametrize("overrides, field, accepted", [
    ({"ring_entries": 1000}, "ring_entries", "256, 512, 1024"),
    ({"ring_entries": 128}, "ring_entries", "256"),
    ({"ring_entries": 0}, "ring_entries", "accepted: 256, 512, 1024"),  # the host's sizes, not "more than 0"
    ({"ring_entries": -4, "collector": "bitmap"}, "ring_entries", "more than 0 (not used by collector bitmap)"),
    ({"collector": "pml"}, "collector", "'ring' or 'bitmap'"),
    ({"throttle": "fast"}, "throttle", "'auto-converge'"),
    ({"vm": {"memory": "16 GB!"}}, "vm.memory", "16GiB"),
    ({"vm": {"vcpus": 0}}, "vm.vcpus", "greater than or equal to 1"),
    ({"vm": {"memory": "2TiB"}}, "vm.memory", "40-bit guest physical addresses"),
    ({"vm": {"block_fraction": 2}}, "vm.block_fraction", "less than or equal to 1"),
    ({"vm": {"eager_split_chunk": "3MiB"}}, "vm.eager_split_chunk", "accepted: 0"),
    ({"interval_ms": 0}, "interval_ms", "greater than 0"),
    ({"link": {"max_bandwidth_mibps": "fast"}}, "link.max_bandwidth_mibps", "'link'"),
    ({"link": {"gbps": -1}}, "link.gbps", "greater than or equal to 0.001"),
    ({"workload": "nope"}, "workload", "accepted: analytics"),
    ({"host": "riscv"}, "host", "arm64-4k"),
    ({"seed": -1}, "seed", "greater than or equal to 0"),
    ({"bogus": 1}, "bogus", "unknown key"),
    ({"link": {"gbit": 1}}, "link.gbit", "unknown key"),
    ({"throttle": "dirty-limit", "collector": "bitmap"}, "throttle", "needs collector ring"),
    ({"kind": "checkpoint", "throttle": "auto-converge"}, "throttle",
     "accepted for checkpointing: 'none', 'dirty-limit'"),
    ({"dirty_limit": {"vcpu_limit_mbps": 1.5}}, "dirty_limit.vcpu_limit_mbps", "integer"),
    ({"dirty_limit": {"vcpu_limit_mbps": 0}}, "dirty_limit.vcpu_limit_mbps", "greater than or equal to 1"),
    ({"dirty_limit": {"period_ms": 2000}}, "dirty_limit.period_ms", "less than or equal to 1000"),
])
def test_bad_values_name_the_field_and_what_is_accepted(overrides, field, accepted):
    with pytest.raises(ConfigError) as e:
        load_scenario("default", **overrides)
    msg = str(e.value)
    assert field in msg and accepted in msg, msg


def test_an_error_in_an_override_is_not_blamed_on_the_file():
    with pytest.raises(ConfigError, match=r"^invalid scenario default.yaml with the keyword overrides "
                                          r"\(collector, seed\):\n  collector: .*'ring' or 'bitmap' \(got 'rings'\)"):
        load_scenario("default", collector="rings", seed=3)


def test_with_bitmap_on_x86_is_refused():
    with pytest.raises(ConfigError, match="vm.with_bitmap: host x86-pml does not offer"):
        load_scenario("default", host="x86-pml", vm={"with_bitmap": True})


def test_unknown_scenario_lists_the_known_ones():
    with pytest.raises(ConfigError, match="accepted: .*default"):
        load_scenario("no-such-scenario")


def test_a_host_profile_object_is_accepted():
    prof = load_host_profile("arm64-4k").model_copy(update={"split_blocks": False})
    cfg = load_scenario("default", host=prof)
    assert cfg.profile.split_blocks is False


def test_a_mapping_and_a_file_load(tmp_path):
    d = {"name": "mine", "vm": {"memory": "1GiB", "vcpus": 2}, "workload": "web"}
    assert load_scenario(d).name == "mine"
    p = tmp_path / "mine.yaml"
    p.write_text("name: mine\nvm: {memory: 1GiB, vcpus: 2}\nworkload: web\ncollector: bitmap\n")
    assert load_scenario(str(p)).collector == "bitmap"
    with pytest.raises(ConfigError, match="no such file"):
        load_scenario(str(tmp_path / "missing.yaml"))


def test_a_scaled_scenario_keeps_memory_over_rate_and_scales_what_moves_pages():
    full = load_scenario("ring-vs-bitmap", link={"max_bandwidth_mibps": 1000})
    s = scale_scenario(full, 3 << 30, seed=7)  # 24 GiB -> 3 GiB: a factor 1/8
    assert s.vm.memory == 3 << 30 and s.vm.vcpus == full.vm.vcpus and s.seed == 7
    assert s.link.gbps == full.link.gbps / 8 and s.link.max_bandwidth_mibps == 125
    assert s.rate_scale == full.rate_scale / 8 and s.checkpoint.storage_mbps == full.checkpoint.storage_mbps / 8
    assert s.vm.memory / s.link.rate_Bps == full.vm.memory / full.link.rate_Bps
    # not scaled: rings, device state, the host and the other link settings
    assert (s.ring_entries, s.link.device_state_bytes, s.host, s.link.downtime_limit_ms,
            s.dirty_limit.vcpu_limit_mbps) == (full.ring_entries, full.link.device_state_bytes, full.host,
                                               full.link.downtime_limit_ms, full.dirty_limit.vcpu_limit_mbps)
    assert scale_scenario("default", 1 << 30, link={"gbps": 1}).link.gbps == 1  # overrides come last
    assert scale_scenario("default", 1 << 30).link.max_bandwidth_mibps == "link"


@pytest.mark.parametrize("memory", [0, -4096, 1.5, "1 GB of RAM", True])
def test_a_scaled_scenario_needs_a_memory_size(memory):
    with pytest.raises(ConfigError, match="^memory: .*; accepted: a whole number of bytes > 0"):
        scale_scenario("default", memory)
    assert scale_scenario("default", "2GiB").vm.memory == 2 << 30


def test_a_union_field_gets_one_line_without_pydantic_tags():
    with pytest.raises(ConfigError) as e:
        load_scenario("default", host=12345)
    msg = str(e.value)
    assert "  host: Input should be a valid string or a valid dictionary or instance of HostProfile (got 12345)" in msg
    assert "function-after" not in msg and "host.str" not in msg
    with pytest.raises(ConfigError, match=r"\n  host\.arch: missing; this field is required") as e:
        load_scenario("default", host={"name": "x"})
    assert "valid string" not in str(e.value)  # taken as a mapping: its own errors only


def test_a_whole_model_check_names_the_nested_field():
    wl = {"name": "w", "regions": [{"fraction": 0.5, "rate_mbps": 1, "vcpu_weights": [0]}]}
    with pytest.raises(ConfigError, match=r"\n  workload\.regions\.0\.vcpu_weights: \[0\.0\] is not accepted"):
        load_scenario("default", workload=wl)
    with pytest.raises(ConfigError, match=r"\n  env\.bogus: unknown key"):
        load_scenario("default", env={"bogus": 1})


@pytest.mark.parametrize("bad", [True, False, 0, -5, float("nan"), float("inf"), -float("inf"), "100", 1e-9,
                                 1e300, 10**400])
def test_host_sync_ms_must_be_a_positive_finite_number_of_ms(bad):
    """A bool is not a number of ms, infinity is no grid, a period below 1 ns rounds to none, and one
    past 1e9 ms (an env's longest control interval) or too large for a float is none either: each is
    refused with the argument named and what is accepted (not an OverflowError)."""
    from ringenv.vmm import MigrationRun

    with pytest.raises(ConfigError, match=r"^host_sync_ms: .* accepted: a number of ms from 1e-6 \(1 ns\) to 1e9, "
                                          r"or None"):
        MigrationRun("default", host_sync_ms=bad)


def test_host_sync_ms_takes_any_real_number():
    import numpy as np

    from ringenv.vmm import MigrationRun

    for ok in (50, 12.5, np.float64(20), np.int64(7)):
        run = MigrationRun(scale_scenario("default", 256 << 20), host_sync_ms=ok)
        assert run.host_sync_ns == int(round(float(ok) * 1_000_000))
        run.close()
