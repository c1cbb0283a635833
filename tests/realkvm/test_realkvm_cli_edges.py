"""Edges of the real-KVM commands a third audit found (B5, N1, N3, N4, T1): calibrate's --out
(refused up front, written atomically), negative measurements, a closed standard output, and
validate's exit code. None opens /dev/kvm: the measurements and the comparison are faked; those
that build the x86 profile skip off x86_64."""

import os
import platform
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from ringenv.realkvm import calibrate
from ringenv.realkvm import validate
from tests.realkvm._cli_helpers import cli, write

ROOT = Path(__file__).resolve().parents[2]
x86_only = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                              reason="the x86 host profile (the only real-KVM guest so far)")
FAKE = {key: 1000.0 for key in calibrate.FALLBACK_KEYS}
TRACE = {"slot_pages": 64, "ring_entries": 256, "reap_scope": "self",
         "vcpus": [{"writes": list(range(40)), "syncs": [9]}]}


def _no_measuring(monkeypatch):
    def measure():
        raise AssertionError("measured before checking --out")

    monkeypatch.setattr(calibrate, "measure", measure)


# B5. `--out DIR/` passed the up-front check (abspath drops the slash), measured, then failed
#     with exit 1; `--out ''` was taken as no --out.
@pytest.mark.parametrize("name, why", [("nodir/", "ends in '/'"), ("sub/", "ends in '/'"), ("sub", "a directory"),
                                       ("", "empty"), ("missing/host.yaml", "no directory")])
def test_calibrate_out_naming_no_writable_file_is_refused_before_measuring(monkeypatch, tmp_path, capsys, name, why):
    (tmp_path / "sub").mkdir()
    _no_measuring(monkeypatch)
    out = f"{tmp_path}/{name}" if name else ""  # (not tmp_path / name: pathlib drops a trailing slash)
    code, stdout, err = cli(capsys, "calibrate", "--out", out)
    assert (code, stdout) == (2, "") and len(err) == 1, (code, stdout, err)
    assert err[0].startswith(f"ringenv calibrate: --out {out!r}: {why}"), err
    assert "expected a file" in err[0], err
    assert sorted(os.listdir(tmp_path)) == ["sub"] and os.listdir(tmp_path / "sub") == []


def test_calibrate_out_that_is_no_regular_file_is_refused_before_measuring(monkeypatch, capsys):
    _no_measuring(monkeypatch)  # (renaming a profile over /dev/null would replace the device)
    code, stdout, err = cli(capsys, "calibrate", "--out", os.devnull)
    assert (code, stdout) == (2, "") and len(err) == 1, (code, stdout, err)
    assert err[0].startswith(f"ringenv calibrate: --out {os.devnull!r}: not a regular file"), err
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)


# N4. --out was opened with open(out, "w"): a failure while writing lost the existing profile.
@x86_only
def test_calibrate_out_failing_while_written_keeps_the_existing_profile(tmp_path):
    """The file size limit (RLIMIT_FSIZE, SIGXFSZ ignored) stops the write part way: EFBIG. The
    old profile must be as it was, no temporary file left, the profile on standard output."""
    out = tmp_path / "host.yaml"
    out.write_text("old profile\n")
    script = (
        "import resource, signal, sys\n"
        "import ringenv.cli as c, ringenv.config, yaml\n"
        "from ringenv.realkvm import calibrate\n"
        "calibrate.measure = lambda: {k: 1000.0 for k in calibrate.FALLBACK_KEYS}\n"
        "c.build_parser()\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))\n"
        "sys.exit(c.main(['calibrate', '--out', sys.argv[1]]))\n")
    r = subprocess.run([sys.executable, "-c", script, str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert out.read_text() == "old profile\n"
    assert os.listdir(tmp_path) == ["host.yaml"]
    err = r.stderr.strip().splitlines()
    assert err[-1].startswith(f"ringenv calibrate: --out {str(out)!r}: "), err
    assert "standard output" in err[-1], err
    assert len(r.stdout) > 200 and yaml.safe_load(r.stdout)["costs"]["wp_fault_ns"] == 1000


@x86_only
def test_calibrate_out_replaces_a_profile_keeping_its_mode_and_a_links_target(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(calibrate, "measure", lambda: FAKE)
    out = tmp_path / "host.yaml"
    out.write_text("old profile\n")
    out.chmod(0o640)
    code, stdout, err = cli(capsys, "calibrate", "--out", str(out))
    assert code == 0 and out.read_text() == stdout, err
    assert stat.S_IMODE(out.stat().st_mode) == 0o640 and os.listdir(tmp_path) == ["host.yaml"]
    link = tmp_path / "link.yaml"
    link.symlink_to(out)
    out.write_text("old profile\n")
    code, stdout, err = cli(capsys, "calibrate", "--out", str(link))
    assert code == 0 and link.is_symlink() and out.read_text() == stdout, err
    new = tmp_path / "new.yaml"
    code, stdout, err = cli(capsys, "calibrate", "--out", str(new))
    umask = os.umask(0o022)
    os.umask(umask)
    assert code == 0 and new.read_text() == stdout and stat.S_IMODE(new.stat().st_mode) == 0o666 & ~umask
    assert sorted(os.listdir(tmp_path)) == ["host.yaml", "link.yaml", "new.yaml"]


# N1. wp_fault_ns, harvest_entry_ns (a fitted slope) and get_dirty_log_dirty_ns (a median of
#     differences) were not clamped: a noisy negative one made the measured profile invalid
#     (a ConfigError, exit 2 after measuring, the profile lost).
@x86_only
def test_a_negative_measurement_still_gives_a_valid_profile():
    from ringenv.config import HostProfile

    measured = dict(FAKE, wp_fault_ns=-5.0, harvest_entry_ns=-3.0, get_dirty_log_dirty_ns=-0.4)
    costs = HostProfile.parse(yaml.safe_load(calibrate.profile_yaml(measured))).costs
    assert (costs.wp_fault_ns, costs.harvest_entry_ns, costs.get_dirty_log_dirty_ns) == (1, 0, 0)
    assert costs.exit_ns == 1000


class FakeGuest:
    """A calibration guest without /dev/kvm: every page of the slot dirty, every ring full."""

    def __init__(self, programs, pages, **kw):
        self.vm = SimpleNamespace(set_memory_flags=lambda *a: None, get_dirty_log=lambda slot: list(range(pages)),
                                  clear_dirty_log=lambda *a: None)
        self.vcpus = [SimpleNamespace(harvest=lambda: [0] * pages)]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_measure_writes_gives_a_positive_fault_cost_when_the_fault_pass_looks_faster(monkeypatch):
    times = iter([0.0, 100.0, 1000.0] + [1000.0] * 3)  # pass 0, faulting pass, dirty pass, 3 probes
    monkeypatch.setattr(calibrate, "Guest", FakeGuest)
    monkeypatch.setattr(calibrate, "_run_to", lambda g, kind: next(times))
    got = calibrate.measure_writes(pages=4, probes=3)
    assert got["wp_fault_ns"] == 1.0 and got["dirty_write_ns"] == 0.0, got


def test_measure_reset_clamps_a_negative_harvest_slope(monkeypatch):
    def rows(pattern, slot_pages):
        n = len(pattern)
        return [(n, 1000.0 - 0.1 * n, 100.0 + n)] * calibrate.REPEATS

    monkeypatch.setattr(calibrate, "_reset_run", rows)
    got = calibrate.measure_reset()
    assert got["harvest_entry_ns"] == 0.0 and got["harvest_ring_ns"] > 0, got


def test_measure_bitmap_clamps_a_negative_per_dirty_page_cost(monkeypatch):
    def timed(fn):
        return next(times), fn()

    sizes = (4, 8, 16)
    times = iter(t for pages in sizes for t in (10.0, 50.0 * pages, 1.0, 1.0))  # dirty < clean: noise
    monkeypatch.setattr(calibrate, "BITMAP_SIZES", sizes)
    monkeypatch.setattr(calibrate, "Guest", FakeGuest)
    monkeypatch.setattr(calibrate, "_run_to", lambda g, kind: 0.0)
    monkeypatch.setattr(calibrate, "_timed", timed)
    monkeypatch.setattr(calibrate, "dirty_pages", lambda words: words)
    got = calibrate.measure_bitmap()
    assert got["get_dirty_log_dirty_ns"] == 0.0 and got["get_dirty_log_page_ns"] > 0, got


# N3. With standard output closed (`>&-`) sys.stdout is None: json.dump raised AttributeError,
#     a traceback.
@pytest.mark.parametrize("argv", [["replay", "TRACE"], ["kvm-replay", "TRACE"], ["validate", "--json"],
                                  ["calibrate", "--out", "OUT"], ["demo"]])
def test_a_closed_standard_output_is_one_line_and_exit_2(tmp_path, argv):
    path = write(tmp_path, TRACE)
    out = tmp_path / "host.yaml"
    argv = [{"TRACE": path, "OUT": str(out)}.get(a, a) for a in argv]
    r = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-m", "ringenv", *argv], cwd=ROOT,
                       stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
    assert "Traceback" not in r.stderr, r.stderr
    err = [line for line in r.stderr.splitlines() if not line.startswith("ringenv: compiling")]
    assert r.returncode == 2 and len(err) == 1, (r.returncode, r.stderr)
    assert err[0].startswith(f"ringenv {argv[0]}: standard output is closed"), err
    assert not out.exists()  # nothing ran


def test_a_closed_standard_output_is_refused_in_process(monkeypatch, tmp_path, capsys):
    path = write(tmp_path, TRACE)
    monkeypatch.setattr(sys, "stdout", None)
    code, stdout, err = cli(capsys, "replay", path)
    assert code == 2 and err == ["ringenv replay: standard output is closed; run it with standard output open "
                                 "(>/dev/null to discard it)"], (code, err)


# T1. `validate` exiting 1 on a difference (its main contract) was untested.
DIFF = "vcpus[0].lost: real 0, sim 5"


@pytest.mark.parametrize("verdicts, code", [
    ({"seq-256": validate.IDENTICAL, "seq-512": DIFF}, 1),
    ({"seq-256": DIFF}, 1),
    ({"seq-256": validate.IDENTICAL, "seq-512": validate.IDENTICAL}, 0),
    ({"seq-256": validate.IDENTICAL, "seq-4096": f"{validate.SKIPPED}: trace.ring_entries: refused"}, 0),
    ({"seq-256": DIFF, "seq-4096": f"{validate.SKIPPED}: trace.ring_entries: refused"}, 1),
])
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_validate_exits_1_on_a_difference_and_0_when_all_compared_are_identical(monkeypatch, capsys, verdicts,
                                                                                code, json_flag):
    monkeypatch.setattr(validate, "validate", lambda: dict(verdicts))
    got, stdout, err = cli(capsys, "validate", *json_flag)
    assert (got, err) == (code, []), (got, stdout, err)
    if json_flag:
        assert yaml.safe_load(stdout) == verdicts
    else:
        rows = [line.split(None, 1) for line in stdout.splitlines()[:-1]]
        assert rows == [[name, verdict] for name, verdict in verdicts.items()], stdout
