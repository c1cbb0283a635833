"""``ringenv migrate`` / ``ringenv checkpoint``: tables, JSON, exit codes, errors naming flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ringenv.cli import main

from ._helpers import nosplit_scenario_file

SMALL = """name: tiny
host: arm64-4k
vm: {memory: 512MiB, vcpus: 2}
workload: web
link: {gbps: 1, max_bandwidth_mibps: link}
checkpoint: {period_s: 2, storage_mbps: 500, horizon_s: 6}
"""


@pytest.fixture
def tiny(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(SMALL)
    return str(p)


def test_migrate_prints_the_metrics_table(tiny, capsys):
    assert main(["migrate", "--scenario", tiny, "--ring-entries", "1024", "--interval-ms", "200"]) == 0
    out = capsys.readouterr().out
    assert "migration of scenario tiny" in out and "ring 1024 entries, reaper 200 ms" in out
    for field in ("downtime_s", "total_s", "converged", "full_exits", "vcpu_stall_s", "lost_writes", "verified"):
        assert field in out


def test_migrate_json_and_flags(tiny, capsys):
    assert main(["migrate", "--scenario", tiny, "--collector", "bitmap", "--seed", "3", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["collector"] == "bitmap" and d["verified"] is True and d["ring_bytes"] == 0
    assert main(["migrate", "--scenario", tiny, "--throttle", "auto-converge", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["done"] is True


@pytest.mark.parametrize("command", ["migrate", "checkpoint"])
def test_zero_fraction_flag(tiny, capsys, command):
    """--zero-fraction sets vm.zero_fraction over the scenario file's vm section (its memory and
    vCPUs stay): a 90% zero guest sends most of its pages as zero pages, in fewer bytes."""
    assert main([command, "--scenario", tiny, "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert main([command, "--scenario", tiny, "--zero-fraction", "0.9", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert full["zero_pages"] == 0 and 0.8 * (512 << 20) // 4096 < d["zero_pages"] <= (512 << 20) // 4096
    assert d["bytes_sent"] < 0.5 * full["bytes_sent"] and d["verified"] is True
    assert main([command, "--scenario", tiny, "--zero-fraction", "0.9"]) == 0
    assert "zero_pages" in capsys.readouterr().out


def test_checkpoint_command(tiny, capsys):
    assert main(["checkpoint", "--scenario", tiny, "--period-s", "1.5", "--live", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["kind"] == "checkpoint" and d["checkpoints"] >= 2 and d["verified"] is True


@pytest.mark.parametrize("argv, needle", [
    (["--ring-entries", "1000"], "ring_entries (--ring-entries): 1000 is not accepted by host arm64-4k; accepted: 256"),
    (["--interval-ms", "0"], "interval_ms (--interval-ms): Input should be greater than 0"),
    (["--seed", "-2"], "seed (--seed)"),
    (["--collector", "bitmap", "--throttle", "dirty-limit"], "throttle (--throttle): dirty-limit needs collector ring"),
    (["--zero-fraction", "1.5"], "vm.zero_fraction (--zero-fraction): Input should be less than or equal to 1"),
])
def test_bad_values_exit_2_naming_the_flag(tiny, capsys, argv, needle):
    assert main(["migrate", "--scenario", tiny, *argv]) == 2
    assert needle in capsys.readouterr().err


def test_unknown_scenario_and_choices(capsys):
    assert main(["migrate", "--scenario", "nope"]) == 2
    assert "accepted: analytics" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["migrate", "--collector", "pml"])
    assert e.value.code == 2
    assert "invalid choice: 'pml'" in capsys.readouterr().err


def test_a_misspelt_kind_in_the_file_exits_2(tmp_path, capsys):
    """The command decides the kind; a file whose ``kind`` is neither is still an error."""
    p = tmp_path / "typo.yaml"
    p.write_text(SMALL + "kind: chekpoint\n")
    for cmd in ("migrate", "checkpoint"):
        assert main([cmd, "--scenario", str(p)]) == 2
        assert "kind: 'chekpoint' is not accepted; accepted: migration, checkpoint" in capsys.readouterr().err


def test_lost_writes_exit_1_loudly(tmp_path, capsys):
    p = tmp_path / "lossy.yaml"
    p.write_text(SMALL.replace("vcpus: 2}", "vcpus: 2, with_bitmap: false}"))
    assert main(["migrate", "--scenario", str(p)]) == 1
    assert "LOST WRITES" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["migrate", "checkpoint"])
def test_a_ring_overflow_is_reported_loudly_and_fails_the_run(command, tmp_path, capsys):
    """Splitting off and every page in 2 MiB blocks: one write dirties 512 pages, more than a
    256-entry ring's reserve holds. The kernel overwrites entries (its WARN) and the vCPUs wedge;
    nothing may look like a clean run, even where no write was lost."""
    p = nosplit_scenario_file(tmp_path / "nosplit.yaml")
    assert main([command, "--scenario", p]) == 1
    out, err = capsys.readouterr()
    assert "RING OVERFLOW: the kernel overwrote" in err and "vCPUs wedged" in err
    overflows = int(next(ln for ln in out.splitlines() if ln.split()[:1] == ["ring_overflows"]).split()[1])
    wedged = int(next(ln for ln in out.splitlines() if ln.split()[:1] == ["wedged_vcpus"]).split()[1])
    assert overflows > 0 and wedged > 0 and f"{wedged} of 2 vCPUs wedged" in err


def test_a_migration_that_did_not_complete_is_not_reported_as_a_checkpoint_run(tiny, capsys, monkeypatch):
    """Nothing verified because the run stopped early: the message is the migration's own."""
    from ringenv.vmm.migration import MigrationRun

    monkeypatch.setattr(MigrationRun, "run", lambda self: (self.advance(100_000_000), self.metrics())[1])
    assert main(["migrate", "--scenario", tiny]) == 0
    err = capsys.readouterr().err
    assert "nothing verified: the migration did not complete (" in err and "at 0.1 s)" in err, err
    assert "checkpoint" not in err


def test_a_config_error_s_header_names_the_options_given_not_the_loader_s_keywords(tiny, tmp_path, capsys):
    assert main(["checkpoint", "--scenario", tiny, "--period-s", "-1", "--live"]) == 2
    err = capsys.readouterr().err
    assert "invalid scenario tiny.yaml with the options --period-s --live:" in err, err
    assert "keyword overrides" not in err and "kind" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(tiny).read_text().replace("vcpus: 2", "vcpus: 0"))
    assert main(["migrate", "--scenario", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "invalid scenario bad.yaml:\n  vm.vcpus:" in err, err


@pytest.mark.parametrize("flags", [["--ring-entries", "100"], ["--interval-ms", "200"]])
def test_ring_options_with_the_bitmap_collector_are_an_error(flags, tiny, capsys):
    assert main(["migrate", "--scenario", tiny, "--collector", "bitmap", *flags]) == 2
    err = capsys.readouterr().err
    assert f"{flags[0]}: not used by the dirty-bitmap collector" in err and "--collector ring" in err, err
