"""Finite but absurd settings found by a fuzzing audit: each was accepted and then hung, overflowed
or failed deep inside (numba's TypingError, "cannot convert float infinity to integer", a TypeError
from the env creator). Now refused where they are read, with an error naming the field (or the
file, the set, the split and the position) and what is accepted. The per-field bounds are swept
in tests/test_config_sweep.py; here the paths around them: the CLI flag, the env keyword, the
size strings, the workload sets file."""

from __future__ import annotations

import shutil
from pathlib import Path

import gymnasium as gym
import pytest
import yaml

import ringenv  # noqa: F401  (registers the environments)
from ringenv import config as C
from ringenv.cli import main
from ringenv.config import ConfigError, load_scenario, parse_size


# ---------------------------------------------------------------------------------- scenario / env
def test_migrate_interval_ms_below_1_ns_is_a_usage_error_not_a_hang(capsys):
    """--interval-ms 1e-12 rounded to a 0-ns reaper interval and the run never ended."""
    assert main(["migrate", "--interval-ms", "1e-12"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "interval_ms (--interval-ms): 1e-12 ms is below 1 ns" in err and "accepted: 1e-6 to 1e9 ms" in err, err


@pytest.mark.parametrize("kw, field", [
    ({"rate_scale": 1e300}, "rate_scale"),
    ({"max_episode_s": 1e30}, "max_episode_s"),
    ({"sample_s": 10**30}, "sample_s"),
    ({"link": {"give_up_s": 1e300}}, "link.give_up_s"),
    ({"link": {"cancel_at_s": 1e300}}, "link.cancel_at_s"),
    ({"link": {"downtime_limit_ms": 1e300}}, "link.downtime_limit_ms"),
    ({"link": {"gbps": 1e300}}, "link.gbps"),
])
def test_env_keywords_out_of_range_are_config_errors_at_make(kw, field):
    """gym.make keywords (env settings and scenario fields) that overflowed at reset ("negative
    dimensions", "cannot convert float infinity to integer", numba's TypingError)."""
    with pytest.raises(ConfigError) as e:
        gym.make("ringenv/Migration-v0", **kw)
    line = next((ln for ln in str(e.value).splitlines() if ln.strip().startswith(field + ":")), None)
    assert line is not None and "accepted:" in line, str(e.value)


# ---------------------------------------------------------------------------------- sizes
def test_a_size_is_parsed_exactly_and_a_huge_one_is_shown_as_given():
    """'999999999999999TiB' was accepted for link.device_state_bytes; vm.memory's error showed a
    float-rounded byte count instead of what was written."""
    assert parse_size("1.5GiB") == 3 << 29 and parse_size("999999999999999TiB") == 999999999999999 << 40
    for section, field in (("link", "device_state_bytes"), ("vm", "memory")):
        with pytest.raises(ConfigError) as e:
            load_scenario("default", **{section: {field: "999999999999999TiB"}})
        line = next(ln for ln in str(e.value).splitlines() if f"{section}.{field}:" in ln)
        assert "'999999999999999TiB' is not accepted; accepted: a size up to" in line, line
    with pytest.raises(ConfigError, match=r"device_state_bytes: .*accepted: a size up to 1 TiB"):
        load_scenario("default", link={"device_state_bytes": "2TiB"})
    assert load_scenario("default", link={"device_state_bytes": "1TiB"}).link.device_state_bytes == 1 << 40


def test_the_shipped_configs_are_within_the_bounds():
    """Bounds generous enough for every shipped scenario, workload, host and training file."""
    for n in C.scenario_names():
        s = load_scenario(n)
        C.EnvConfig.parse(s.env or {}, where="env")
    for q in (C.CONFIG_DIR / "workloads").glob("*.yaml"):
        C.load_workload(q.stem)


# ---------------------------------------------------------------------------------- workload sets
@pytest.fixture
def sets_dir(tmp_path, monkeypatch):
    """A copy of configs/ whose workload-sets.yaml a test rewrites (``write(change)``: ``change`` maps the
    shipped file's data to the new)."""
    base = yaml.safe_load((C.CONFIG_DIR / "workload-sets.yaml").read_text())
    for sub in ("workloads", "hosts", "scenarios"):
        shutil.copytree(C.CONFIG_DIR / sub, tmp_path / sub)
    monkeypatch.setattr(C, "CONFIG_DIR", tmp_path)
    C._LOAD_CACHE.clear()

    def write(change):
        data = change(yaml.safe_load(yaml.safe_dump(base)))
        (tmp_path / "workload-sets.yaml").write_text(yaml.safe_dump(data))
    yield write
    C._LOAD_CACHE.clear()


def _set(split, value):
    def change(d):
        d["default"][split] = value
        return d
    return change


def _entry(split, i, value):
    def change(d):
        d["default"][split][i] = value
        return d
    return change


@pytest.mark.parametrize("change, needle", [
    (_set("test", None), "set 'default', test: None is not accepted; accepted: a non-empty list of workload names"),
    (_set("train", 5), "set 'default', train: 5 is not accepted; accepted: a non-empty list of workload names"),
    (_set("train", "web"), "set 'default', train: 'web' is not accepted; accepted: a non-empty list"),
    (_set("train", []), "set 'default', train: [] is not accepted; accepted: a non-empty list"),
    (_set("train", [["idle"]]), "set 'default', train[0]: ['idle'] is not accepted; accepted: workload names ("),
    (_entry("train", 2, 5), "set 'default', train[2]: 5 is not accepted; accepted: workload names ("),
    (_entry("test", 1, None), "set 'default', test[1]: None is not accepted; accepted: workload names ("),
    (_entry("test", 0, "nope"), "set 'default', test[0]: unknown workload 'nope'; accepted: analytics"),
    (lambda d: {**d, "extra": {"train": ["idle"]}}, "set 'extra': {'train': ['idle']} is not accepted; accepted: a "
                                                   "mapping with exactly the keys train and test"),
    (lambda d: [], "workload-sets.yaml: [] is not accepted; accepted: a mapping of set names"),
])
def test_a_bad_workload_sets_file_names_the_file_the_set_the_split_and_the_position(sets_dir, change, needle):
    """The whole file is validated when it is read: before, a null or an int there was a TypeError
    from the env creator, a string was iterated character by character ("unknown workload 'w'"),
    an empty list was accepted until an episode drew from it, and the errors said "invalid env:"."""
    sets_dir(change)
    with pytest.raises(ConfigError) as e:
        C.load_workload_sets()
    assert str(e.value).startswith("workload-sets.yaml: ") and needle in str(e.value), str(e.value)
    with pytest.raises(ConfigError) as e:  # and so does making an environment, before anything else
        gym.make("ringenv/Migration-v0", split="test")
    assert str(e.value).startswith("workload-sets.yaml: ") and needle in str(e.value), str(e.value)


def test_the_workload_sets_file_is_read_once_per_edit_and_its_workloads_are_checked_each_time(sets_dir, monkeypatch):
    """Making an env validated the file three times (the env section, its workload_set, the env's
    split): now its structure is read once per modification; an edit is seen at once, and so is an
    edited workload file it names (the workloads are loaded, memoised on their own files, each call)."""
    sets_dir(lambda d: d)
    reads = []
    real = C._read_yaml
    monkeypatch.setattr(C, "_read_yaml", lambda path: reads.append(Path(path).name) or real(path))
    gym.make("ringenv/Migration-v0", split="test")
    gym.make("ringenv/Migration-v0", split="train")
    assert reads.count("workload-sets.yaml") == 1, reads
    sets_dir(_set("test", ["analytics", "uniform-800"]))  # a rewrite, even within one mtime tick (the size differs)
    assert C.load_workload_sets()["default"]["test"] == ["analytics", "uniform-800"]
    assert reads.count("workload-sets.yaml") == 2, reads
    C.load_workload_sets()["default"]["test"].append("oltp")  # the caller's copy, not the memo
    assert C.load_workload_sets()["default"]["test"] == ["analytics", "uniform-800"]
    (C.CONFIG_DIR / "workloads" / "web.yaml").write_text("name: web\nregions: oops\n")
    with pytest.raises(ConfigError, match=r"workload-sets.yaml: set 'default', train\[1\]: invalid workload web.yaml"):
        C.load_workload_sets()


# ------------------------------------------------------------------- factors on a workload's rates
FAST = {"name": "fast", "regions": [{"fraction": 0.5, "rate_mbps": 2e6}],
        "phases": {"calm_multiplier": 1, "burst_multiplier": 4, "mean_calm_s": 1, "mean_burst_s": 1}}


def test_a_rate_scale_that_takes_a_workload_past_the_fastest_rate_is_refused_naming_it():
    """Each bound holds alone (8e6 MB/s in the burst phase, rate_scale 2), their product does not:
    1.6e7 MB/s, past what the sampler is bounded for (1e7)."""
    assert load_scenario("default", workload=FAST, rate_scale=1.25).rate_scale == 1.25  # 1e7: the limit itself
    with pytest.raises(ConfigError) as e:
        load_scenario("default", workload=FAST, rate_scale=2)
    msg = str(e.value)
    assert "rate_scale: 2 makes workload 'fast' write 1.6e+07 MB/s in its fastest phase" in msg, msg
    assert "accepted: at most 1e7 MB/s in any phase, i.e. a factor up to 1.25 for this workload" in msg, msg


def test_an_env_s_rate_scale_range_is_checked_against_each_of_its_workloads_at_make(tmp_path):
    path = tmp_path / "fast.yaml"
    path.write_text(yaml.safe_dump(FAST))
    gym.make("ringenv/Migration-v0", workloads=["idle", str(path)], rate_scale_range=[0.5, 1.25]).close()
    with pytest.raises(ConfigError) as e:
        gym.make("ringenv/Migration-v0", workloads=["idle", str(path)], rate_scale_range=[0.5, 2])
    msg = str(e.value)
    assert msg.startswith("rate_scale_range: [0.5, 2] (with the scenario's rate_scale 1) makes workload 'fast' "
                          "write 1.6e+07 MB/s"), msg


def test_a_reset_option_s_workload_is_checked_against_the_rate_scale_range_before_anything_changes(tmp_path):
    path = tmp_path / "fast.yaml"
    path.write_text(yaml.safe_dump(FAST))
    env = gym.make("ringenv/Migration-v0", workloads=["idle"], rate_scale_range=[0.5, 2])
    obs, info = env.reset(seed=3)
    with pytest.raises(ConfigError, match=r"^options: workload: rate_scale_range: \[0.5, 2\] .* makes workload 'fast'"):
        env.reset(seed=4, options={"workload": str(path)})
    assert env.unwrapped.workload == info["workload"] == "idle"  # the episode before is the env's still
    env.close()
