"""The VMM commands at their edges (an audit of 2026-12-03): Ctrl-C, paths inside a scenario
file, a link too slow to give up in time, sizes written as floats, a memory under 1 MiB."""

from __future__ import annotations

import shutil

import pytest
import yaml

from ringenv import cli
from ringenv.config import CONFIG_DIR, ConfigError, load_scenario, parse_size


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    from ringenv.vmm import migration

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(migration.MigrationRun, "run", interrupted)
    assert cli.main(["migrate"]) == 130
    err = capsys.readouterr().err
    assert err == "ringenv migrate: interrupted\n"


def test_relative_host_and_workload_paths_in_a_scenario_file_are_read_beside_it(tmp_path, monkeypatch):
    """As an include in any config language: the scenario's own directory, not the current one."""
    d = tmp_path / "scenarios"
    d.mkdir()
    shutil.copy(CONFIG_DIR / "workloads" / "oltp.yaml", d / "mywl.yaml")
    host = yaml.safe_load((CONFIG_DIR / "hosts" / "arm64-4k.yaml").read_text())
    host["name"] = "arm64-4k-copy"
    (tmp_path / "myhost.yml").write_text(yaml.safe_dump(host))
    (d / "s.yaml").write_text("name: s\nvm: {memory: 256MiB, vcpus: 2}\nworkload: mywl.yaml\nhost: ../myhost.yml\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_scenario(d / "s.yaml")
    assert cfg.workload_config.name == "oltp" and cfg.profile.name == "arm64-4k-copy"
    (d / "t.yaml").write_text("name: t\nvm: {memory: 256MiB, vcpus: 2}\nworkload: nosuch.yaml\n")
    with pytest.raises(ConfigError, match="no such file .*scenarios/nosuch.yaml"):  # the path it looked at
        load_scenario(d / "t.yaml")


def test_a_link_too_slow_to_give_up_on_time_is_refused():
    """Give-up is checked between pages: at 1e-9 Gb/s one page took 9 simulated hours."""
    with pytest.raises(ConfigError, match=r"link.gbps: Input should be greater than or equal to 0.001 \(got 1e-09\)"):
        load_scenario("default", link={"gbps": 1e-9})
    assert load_scenario("default", link={"gbps": 1e-3}).link.gbps == 1e-3


@pytest.mark.parametrize("value", ["1e3MiB", 4.294967296e9])
def test_sizes_as_floats_are_refused_and_the_message_says_so(value):
    with pytest.raises(ConfigError) as e:
        parse_size(value, "vm.memory")
    assert "no exponent: not a float such as 4.3e9" in str(e.value)
    assert parse_size("1000MiB", "vm.memory") == 1000 << 20


def test_the_run_header_shows_memory_under_a_mib(tmp_path, capsys):
    p = tmp_path / "s.yaml"
    p.write_text("name: s\nvm: {memory: 512KiB, vcpus: 1}\nworkload: idle\n")
    assert cli.main(["migrate", "--scenario", str(p)]) == 0
    assert "arm64-4k, 0.5 MiB, 1 vCPUs" in capsys.readouterr().out


def test_a_yaml_suffix_in_any_case_is_a_file_and_a_directory_is_named(tmp_path):
    p = tmp_path / "SMALL.YAML"
    p.write_text("name: small\nvm: {memory: 256MiB, vcpus: 2}\nworkload: idle\n")
    assert load_scenario(p).name == "small"  # was "unknown scenario" (a name)
    with pytest.raises(ConfigError, match=r"scenario: '.*' is a directory; expected a scenario name or a YAML file"):
        load_scenario(tmp_path)


@pytest.mark.parametrize("flag, stop_the_world", [("--live", False), ("--no-live", True), (None, False)])
def test_live_can_be_switched_on_and_off_over_the_file(tmp_path, monkeypatch, flag, stop_the_world):
    """The file says live (stop_the_world false); --no-live turns it back off, no flag keeps the file's."""
    import ringenv.config as config

    p = tmp_path / "s.yaml"
    p.write_text("name: s\nkind: checkpoint\nvm: {memory: 256MiB, vcpus: 2}\nworkload: idle\n"
                 "checkpoint: {period_s: 1, horizon_s: 2, stop_the_world: false}\n")
    seen, real = [], config.load_scenario
    monkeypatch.setattr(config, "load_scenario", lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1])
    assert cli.main(["checkpoint", "--scenario", str(p), "--json"] + ([flag] if flag else [])) == 0
    assert seen[-1].checkpoint.stop_the_world is stop_the_world
