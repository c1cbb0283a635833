"""Validation gaps found by a configuration audit: a value accepted and then failing deep inside
(an AssertionError in the ring, a raw OverflowError or TypeError), an invalid value accepted
silently (np.bool_ taken as 1, a fractional byte truncated, a chunk size given twice), a valid one
refused (a zero size in string form), and messages that did not say what is accepted or said two
different things. Each now raises ConfigError naming the field (or argument), the value given and
what is accepted, and every value a field documents as valid is accepted and runs."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import yaml

import ringenv  # noqa: F401  (registers the environments)
from ringenv import config as C
from ringenv.config import ConfigError, load_host_profile, load_scenario
from ringenv.kvm.ring import DirtyRing
from ringenv.vmm.migration import MigrationRun

BASE_HOST = yaml.safe_load((C.CONFIG_DIR / "hosts" / "arm64-4k.yaml").read_text())


def _host(tmp_path, **changes):
    """The arm64-4k profile with ``changes``, loaded from a file as a user's would be."""
    f = tmp_path / "h.yaml"
    f.write_text(yaml.safe_dump({**BASE_HOST, "name": "h", **changes}))
    C._LOAD_CACHE.clear()
    return load_host_profile(str(f))


def _line(err, field: str) -> str:
    """The line of a ConfigError's message that names ``field``."""
    msg = str(err.value)
    line = next((ln for ln in msg.splitlines() if ln.strip().startswith(field + ":")), None)
    assert line is not None, f"no line names {field!r}:\n{msg}"
    return line


# ------------------------------------------------------------ 1. arch_dirty_log_size: every ring runs
def test_arch_dirty_log_size_past_the_largest_ring_is_refused(tmp_path):
    """65472 (the bound said "0 to 65472") loaded with ring_sizes [65536] and every run failed with an
    AssertionError in DirtyRing: 64 + 65472 reserved entries leave the 65536-entry ring no usable one."""
    with pytest.raises(ConfigError) as e:
        _host(tmp_path, arch_dirty_log_size=65472)
    line = _line(e, "arch_dirty_log_size")
    assert "65472" in line and "accepted: 0 to 65471" in line, line
    assert _host(tmp_path, arch_dirty_log_size=65471).ring_sizes == [65536]


@pytest.mark.parametrize("extra", [0, 192, 448, 512, 960, 4032, 65471])
def test_every_ring_size_a_host_accepts_has_an_entry_above_the_reserved_ones(tmp_path, extra):
    """With 64 + arch_dirty_log_size reserved entries a power of two (192: 256), the smallest ring
    size offered was exactly the reserved count: soft limit 0, and the run failed with an AssertionError."""
    prof = _host(tmp_path, arch_dirty_log_size=extra)
    assert prof.ring_sizes and prof.ring_sizes[0] == prof.min_ring_entries
    for n in prof.ring_sizes:
        assert n > prof.reserved_entries and n * 16 >= prof.page_size
        DirtyRing(n, prof.reserved_entries)


@pytest.mark.parametrize("extra", [192, 65471])
def test_the_smallest_and_largest_ring_with_many_reserved_entries_run(tmp_path, extra):
    prof = _host(tmp_path, arch_dirty_log_size=extra)
    cfg = load_scenario("default", host=prof, ring_entries=prof.ring_sizes[0], vm={"memory": "64MiB"},
                        link={"give_up_s": 0.2})
    assert MigrationRun(cfg, seed=1).run().done


# ------------------------------------------------------------ 2. an int too large for a float
def test_max_bandwidth_too_large_for_a_float_is_a_config_error_with_the_range():
    """10**400 raised a raw OverflowError ("int too large to convert to float") from the check."""
    for v in (10**400, -(10**400)):
        with pytest.raises(ConfigError) as e:
            load_scenario("default", link={"max_bandwidth_mibps": v})
        line = _line(e, "link.max_bandwidth_mibps")
        assert str(v)[:20] in line and "accepted: a finite number of MiB/s > 0 (at most 1.79769e308" in line, line
    assert load_scenario("default", link={"max_bandwidth_mibps": 10**6}).link.max_bandwidth_mibps == 1e6


def test_checked_number_refuses_an_int_too_large_for_a_float():
    """The check of arguments that are no config field (a session's host_sync_ms) overflowed the same way."""
    for valid in (lambda v: v > 0, lambda v: float(v) > 0):
        with pytest.raises(ConfigError, match=r"^x: 1000000000\d* is not accepted; accepted: a finite number > 0$"):
            C.checked_number(10**400, "x", "a finite number > 0", valid)
    assert C.checked_number(10**400, "n", "an integer >= 0", lambda v: v >= 0, integral=True) == 10**400


def test_scale_scenario_to_a_memory_too_large_for_a_float_names_it():
    """scale_scenario(..., 10**400) raised OverflowError ("integer division result too large for a float")."""
    with pytest.raises(ConfigError, match=r"^memory: 1000000000\d* is not accepted; accepted: a size up to 4 PiB"):
        C.scale_scenario("default", 10**400)


def test_vcpu_weights_whose_sum_is_not_a_finite_float_are_refused():
    """[1e308, 1e308] sums to inf as floats: every weight divided by it is 0, and the region silently never wrote."""
    region = {"fraction": 0.5, "rate_mbps": 10.0}
    with pytest.raises(ConfigError) as e:
        C.load_workload({"name": "w", "regions": [{**region, "vcpu_weights": [1e308, 1e308]}]})
    line = _line(e, "regions.0.vcpu_weights")
    assert "accepted: non-negative numbers with a positive sum that is finite" in line, line
    assert C.load_workload({"name": "w", "regions": [{**region, "vcpu_weights": [1e307, 1]}]})


# ------------------------------------------------------------ 3. numpy's bool is no number
@pytest.mark.parametrize("kw, field", [
    ({"vm": {"vcpus": np.True_}}, "vm.vcpus"),
    ({"link": {"gbps": np.True_}}, "link.gbps"),
    ({"seed": np.True_}, "seed"),
    ({"seed": np.False_}, "seed"),
    ({"interval_ms": np.True_}, "interval_ms"),
    ({"link": {"max_bandwidth_mibps": np.True_}}, "link.max_bandwidth_mibps"),
])
def test_numpy_bool_is_not_a_number_in_a_scenario(kw, field):
    """load_scenario("default", vm={"vcpus": np.True_}) gave vcpus=1: the check of YAML's true/false
    looked for Python's bool only."""
    with pytest.raises(ConfigError) as e:
        load_scenario("default", **kw)
    line = _line(e, field)
    assert repr(np.bool_(next(iter(_leaves(kw))))) in line and ("expected a number" in line or "accepted" in line), line


def _leaves(d):
    for v in d.values():
        yield from (_leaves(v) if isinstance(v, dict) else [v])


def test_numpy_bool_is_not_a_number_in_env_keywords_or_lists():
    with pytest.raises(ConfigError, match=r"control_interval_ms: np.True_ is not a number; expected a number"):
        gym.make("ringenv/Migration-v0", control_interval_ms=np.True_)
    with pytest.raises(ConfigError, match=r"intervals_ms: \[np.True_, 10\]: np.True_ is not a number; expected num"):
        C.EnvConfig.parse({"intervals_ms": [np.True_, 10]}, where="env")
    assert load_scenario("default", vm={"vcpus": np.int64(2)}).vm.vcpus == 2  # numpy's numbers are numbers


# ------------------------------------------------------------ 4, 5. sizes: whole bytes, zero where 0 is valid
@pytest.mark.parametrize("section, field, value", [
    ("vm", "memory", "262144.7"),
    ("vm", "memory", "1.00000000001GiB"),
    ("vm", "memory", "1.5"),
    ("link", "device_state_bytes", "1000.9"),
    ("link", "device_state_bytes", "0.5B"),
    ("vm", "eager_split_chunk", "2.0000001MiB"),
])
def test_a_size_that_is_not_whole_bytes_is_refused_as_given(section, field, value):
    """int(Fraction(...)) truncated: '262144.7' was 262144 bytes, '1.00000000001GiB' 1 GiB, '1000.9' 1000, and
    '1.5' was reported as "vm.memory: 1 bytes is not a multiple..." (not the value given)."""
    with pytest.raises(ConfigError) as e:
        load_scenario("default", **{section: {field: value}})
    line = _line(e, f"{section}.{field}")
    assert f"{value!r} is not a whole number of bytes; accepted: a whole number of bytes" in line, line
    assert "'1.5GiB'" in line, line  # (an example of a fraction that is whole bytes)
    assert load_scenario("default", vm={"memory": "1.5GiB"}).vm.memory == 3 << 29


@pytest.mark.parametrize("value", [0, 0.0, "0", "0B", "0MiB", " 0 GiB ", "0.0KiB"])
def test_zero_is_a_size_in_any_form_where_the_field_accepts_0(value):
    """device_state_bytes took 0 and 0.0, but '0', '0B', '0MiB' were "'0MiB' must be positive"."""
    cfg = load_scenario("default", link={"device_state_bytes": value}, vm={"eager_split_chunk": value})
    assert cfg.link.device_state_bytes == 0 and cfg.vm.eager_split_chunk == 0


@pytest.mark.parametrize("value", [0, "0", "0MiB", -4096])
def test_a_size_that_must_be_positive_says_what_is_accepted(value):
    with pytest.raises(ConfigError) as e:
        load_scenario("default", vm={"memory": value})
    line = _line(e, "vm.memory")
    assert f"{value!r} is not accepted; accepted: a whole number of bytes > 0: an integer, or digits" in line, line
    with pytest.raises(ConfigError) as e:
        load_scenario("default", link={"device_state_bytes": -1})
    assert "-1 is not accepted; accepted: a whole number of bytes >= 0" in _line(e, "link.device_state_bytes")


def test_parse_size_refuses_fractions_and_zero_unless_asked():
    with pytest.raises(ConfigError, match=r"^memory: '1.5' is not a whole number of bytes; accepted: "):
        C.parse_size("1.5", "memory")
    with pytest.raises(ConfigError, match=r"^memory: '0MiB' is not accepted; accepted: a whole number of bytes > 0"):
        C.parse_size("0MiB", "memory")
    assert C.parse_size("0MiB", "x", zero=True) == 0 and C.parse_size("1.5KiB") == 1536


def test_a_memory_that_is_no_page_multiple_says_what_is_accepted():
    with pytest.raises(ConfigError) as e:
        load_scenario("default", vm={"memory": "4097"})
    line = _line(e, "vm.memory")
    assert "4097 bytes is not a multiple of the page size 4096; accepted on host arm64-4k: a multiple of the page " \
           "size 4096 from 262144 (64 pages) to 1099511627776 bytes" in line, line


# ------------------------------------------------------------ 6. one accepted set per field, and true
def test_dirty_sync_timer_says_one_accepted_set_and_accepts_what_it_says():
    """-1 and 1e300 said "accepted: 0, or 1e-6 to 1e9 ms (1 ns and up)" (the field's bounds), and 1e-6 was then
    refused with "accepted: 0 (no timer) or 1 to 1e9 ms" (the model's rule): now both say the rule."""
    said = "accepted: 0 (no timer), or 1 to 1e9 ms"
    for v in (-1, 1e300, 1e-6, 1e-12, 0.5, 0.999):
        with pytest.raises(ConfigError) as e:
            load_scenario("default", auto_converge={"dirty_sync_timer_ms": v})
        line = _line(e, "auto_converge.dirty_sync_timer_ms")
        assert repr(v) in line and line.endswith(said), line
    for v in (0, 1, 5000.5, 1e9):
        assert load_scenario("default", auto_converge={"dirty_sync_timer_ms": v}).auto_converge.dirty_sync_timer_ms == v


# ------------------------------------------------------------ 7. the loaders' argument
@pytest.mark.parametrize("arg", [5, {"name": "x"}, [1], 1.5])
def test_load_host_profile_of_something_else_says_what_it_accepts(arg):
    """load_host_profile(5) and load_host_profile({"name": "x"}) raised TypeError from pathlib."""
    with pytest.raises(ConfigError) as e:
        load_host_profile(arg)
    msg = str(e.value)
    assert msg.startswith(f"profile: {arg!r} ({type(arg).__name__}) is not accepted; accepted: a host profile name "
                          "(arm64-16k, arm64-4k,"), msg
    assert "a YAML path (str or pathlib.Path), a HostProfile, or None (the default, arm64-4k)" in msg, msg
    assert load_host_profile(None).name == "arm64-4k" and load_host_profile("x86-pml").name == "x86-pml"


@pytest.mark.parametrize("arg", [5, [1], None, 2.5, ("web",)])
def test_load_workload_of_something_else_says_what_it_accepts(arg):
    """load_workload(5), load_workload([1]) and load_workload(None) raised TypeError from pathlib."""
    with pytest.raises(ConfigError) as e:
        C.load_workload(arg)
    msg = str(e.value)
    assert msg.startswith(f"workload: {arg!r} ({type(arg).__name__}) is not accepted; accepted: a workload name "
                          "(analytics,"), msg
    assert "a YAML path (str or pathlib.Path), a mapping of workload fields or a WorkloadConfig" in msg, msg
    with pytest.raises(ConfigError, match=r"^workloads\[2\]: 5 \(int\) is not accepted; accepted: a workload name"):
        C.load_workload(5, where="workloads[2]")
    assert C.load_workload("web").name == "web"


# ------------------------------------------------------------ 8. a session's arguments
@pytest.fixture(scope="module")
def small_cfg():
    return load_scenario("default", vm={"memory": "64MiB"}, link={"give_up_s": 1})


@pytest.mark.parametrize("bad", ["x", float("nan"), float("inf"), -float("inf"), None, True, np.True_, -1, 1 << 63])
def test_advance_names_its_argument_and_what_it_accepts(small_cfg, bad):
    """advance("x"), advance(nan) and advance(inf) raised ValueError or OverflowError from int() without
    naming the argument; a bool was taken as 1 ns, a negative time or one past FOREVER silently."""
    run = MigrationRun(small_cfg, seed=1)
    with pytest.raises(ConfigError) as e:
        run.advance(bad)
    assert str(e.value) == (f"until_ns: {bad!r} is not accepted; accepted: a number of simulated ns from 0 to "
                            f"{1 << 62} (2**62, sim.FOREVER: until the run is over); a fraction of a ns is dropped")
    run.advance(np.int64(1000))
    run.advance(2000.7)
    assert run.now_ns == 2000
    run.close()


@pytest.mark.parametrize("bad", [1e300, 10**400, 1e6 + 1, -1, float("nan"), float("inf"), "1", np.True_])
def test_workload_start_s_is_bounded_by_the_longest_simulated_time(small_cfg, bad):
    """1e300 raised OverflowError (to_ns), a huge finite start made the run take for ever."""
    with pytest.raises(ConfigError) as e:
        MigrationRun(small_cfg, seed=1, workload_start_s=bad)
    assert str(e.value) == (f"workload_start_s: {bad!r} is not accepted; accepted: a number of seconds from 0 to 1e6 "
                            "(the longest simulated time a setting may give)")
    assert MigrationRun(small_cfg, seed=1, workload_start_s=1e6).run().done


# ------------------------------------------------------------ 9. a host's eager split chunk sizes
def test_eager_split_chunk_sizes_given_twice_are_refused(tmp_path):
    """[4096, 4096] was accepted (a chunk size is offered or not: listing it twice is a slip)."""
    with pytest.raises(ConfigError) as e:
        _host(tmp_path, eager_split_chunk_sizes=[4096, 2 << 20, 4096])
    line = _line(e, "eager_split_chunk_sizes")
    assert "4096 is given twice in [4096, 2097152, 4096]; accepted: distinct sizes among the page size and the " \
           "block sizes (4096, 2097152, 1073741824)" in line, line


def test_an_eager_split_chunk_size_error_lists_the_page_size_too(tmp_path):
    """The error listed only the block sizes as supported, though the page size (4096) is accepted too."""
    with pytest.raises(ConfigError) as e:
        _host(tmp_path, eager_split_chunk_sizes=[8192])
    line = _line(e, "eager_split_chunk_sizes")
    assert line.strip() == ("eager_split_chunk_sizes: 8192 is not the page size or a block size; accepted: distinct "
                            "sizes among the page size and the block sizes (4096, 2097152, 1073741824)"), line
    assert _host(tmp_path, eager_split_chunk_sizes=[1 << 30, 4096]).eager_split_chunk_sizes == [1 << 30, 4096]


# ------------------------------------------------------------ unknown keys list what their section accepts
@pytest.mark.parametrize("kw, line", [
    ({"link": {"bandwidth": "10Gbit"}}, "link.bandwidth: unknown key (value '10Gbit'); remove it or check its "
     "spelling; accepted keys: gbps, max_bandwidth_mibps, downtime_limit_ms, device_state_bytes, give_up_s, "
     "give_up_action, cancel_at_s"),
    ({"reward": {"downtime_weight": 5}}, "reward.downtime_weight: unknown key (value 5); remove it or check its "
     "spelling; accepted keys: vcpu, vmm, memory, time, downtime, truncation, cancel, scale"),
    ({"env": {"reward": {"x": 1}}}, "env.reward.x: unknown key (value 1); remove it or check its spelling; "
     "accepted keys: vcpu, vmm, memory, time, downtime, truncation, cancel, scale"),
    ({"checkpoint": {"perod_s": 1}}, "checkpoint.perod_s: unknown key (value 1); remove it or check its spelling; "
     "accepted keys: period_s, storage_mbps, horizon_s, stop_the_world"),
    ({"scenario": {"name": "x", "vm": {"memory": "64MiB"}, "workload": {
        "name": "w", "regions": [{"fraction": 0.5, "rate_mbps": 1, "zipf": 1}]}}},
     "workload.regions.0.zipf: unknown key (value 1); remove it or check its spelling; accepted keys: name, "
     "fraction, rate_mbps, pattern, zipf_s, layout, share, vcpu_weights"),
    ({"host": {"name": "h", "bogus": 1}}, "host.bogus: unknown key (value 1); remove it or check its spelling; "
     "accepted keys: name, description, measured, arch, page_size,"),
])
def test_an_unknown_key_in_a_section_lists_the_keys_that_section_accepts(kw, line):
    """A misspelt key inside ``link``, ``reward``, a workload's region (through the ``str |
    WorkloadConfig`` union, a list index) or an inline host said only "unknown key": the
    top-level unknown argument listed its choices, the sections did not."""
    with pytest.raises(ConfigError) as e:
        gym.make("ringenv/Migration-v0", **kw)
    assert any(ln.strip().startswith(line) for ln in str(e.value).splitlines()), str(e.value)


# ------------------------------------------------------------ a value of the wrong type gets the range too
@pytest.mark.parametrize("kw, line", [
    ({"max_episode_s": "abc"}, "max_episode_s: 'abc' is a string; expected a number; accepted: 1e-9 to 1e6 s"),
    ({"control_interval_ms": [50]}, "control_interval_ms: Input should be a valid number (got [50]); accepted: "
     "1e-6 to 1e9 ms"),
    ({"vm": {"vcpus": 2.5}}, "vm.vcpus: Input should be a valid integer, got a number with a fractional part "
     "(got 2.5); accepted: 1 to 512"),
    ({"link": {"gbps": None}}, "link.gbps: Input should be a valid number (got None); accepted: 0.001 to "
     "100000 Gb/s"),
    ({"checkpoint": {"period_s": None}}, "checkpoint.period_s: Input should be a valid number (got None); "
     "accepted: 1e-9 to 1e6 s"),
    ({"checkpoint": {"storage_mbps": "fast"}}, "checkpoint.storage_mbps: 'fast' is a string; expected a number; "
     "accepted: more than 0, up to 1e8 MB/s"),
    ({"intervals_ms": [10, "a"]}, "intervals_ms: [10, 'a']: 'a' is not a number; expected numbers; accepted: 1 to "
     "10000 ms"),
])
def test_a_value_of_the_wrong_type_is_refused_with_the_fields_range(kw, line):
    """A string, a list or None where a bounded number goes said only "expected a number" or
    pydantic's "Input should be a valid number", where a number out of range gave the range."""
    with pytest.raises(ConfigError) as e:
        gym.make("ringenv/Checkpoint-v0" if "checkpoint" in kw else "ringenv/Migration-v0", **kw)
    assert any(ln.strip().startswith(line) for ln in str(e.value).splitlines()), str(e.value)
