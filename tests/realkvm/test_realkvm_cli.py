"""The kvm-replay / validate / calibrate subcommands and the calibrated host profile."""

import argparse
import json

import pytest
import yaml

from ringenv.realkvm import calibrate, cli, validate
from ringenv.realkvm.guest import unavailable_reason
from ringenv.realkvm.replay import kvm_replay_trace
from ringenv.realkvm.traces import builtin_traces

NO_KVM = unavailable_reason()
pytestmark = [pytest.mark.kvm, pytest.mark.skipif(NO_KVM is not None, reason=str(NO_KVM))]


def run(*argv) -> int:
    ap = argparse.ArgumentParser()
    cli.add_parsers(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    return args.func(args)


def test_kvm_replay_prints_the_replay_json(tmp_path, capsys):
    trace = builtin_traces()["seq-256"]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(trace))
    assert run("kvm-replay", str(path), "--ring-entries", "512") == 0
    assert json.loads(capsys.readouterr().out) == kvm_replay_trace(trace, ring_entries=512)


def test_kvm_replay_refuses_a_bad_trace(tmp_path, capsys):
    path = tmp_path / "t.json"
    path.write_text('{"slot_pages": 1, "ring_entries": 256, "reap_scope": "self", '
                    '"vcpus": [{"writes": [3]}]}')
    assert run("kvm-replay", str(path)) == 2
    assert "writes" in capsys.readouterr().err
    path.write_text('{"slot_pages": 4, "ring_entries": 256, "reap_scope": "self", '
                    '"vcpus": [{"writes": [3]}]}')
    assert run("kvm-replay", str(path), "--ring-entries", "300") == 2  # the host refuses it
    assert "ring_entries (--ring-entries): 300 entries" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run("kvm-replay", str(path), "--ring-entries", "0")


def test_builtin_traces_are_many_deterministic_and_varied():
    traces = builtin_traces()
    assert traces == builtin_traces() and len(traces) >= 20
    sizes = {t["ring_entries"] for t in traces.values()}
    assert min(sizes) == 256 and max(sizes) == 65536
    assert {len(t["vcpus"]) for t in traces.values()} >= {1, 2, 3, 4}
    assert all(t["reap_scope"] == "self" for t in traces.values())
    for t in traces.values():  # multi-vCPU traces write disjoint pages
        pages = [set(v["writes"]) for v in t["vcpus"]]
        assert sum(map(len, pages)) == len(set().union(*pages))


def _validate_only(monkeypatch, *names) -> dict:
    """``validate`` restricted to the built-in traces ``names`` (skips if the simulator is missing)."""
    try:
        validate.simulator()
    except ImportError as exc:
        pytest.skip(f"simulator not importable: {exc}")
    small = {k: v for k, v in builtin_traces().items() if k in names}
    monkeypatch.setattr(validate, "builtin_traces", lambda: small)
    return small


def test_validate_reports_identical_or_first_difference(monkeypatch, capsys):
    small = _validate_only(monkeypatch, "seq-256", "2vcpu-seq-256")
    assert run("validate", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {k: "identical" for k in small}


def test_kvm_replay_says_when_the_outcome_depends_on_thread_timing(tmp_path, capsys):
    trace = {"slot_pages": 64, "ring_entries": 256, "reap_scope": "self",
             "vcpus": [{"writes": [0, 1, 2], "syncs": []}, {"writes": [2, 3], "syncs": []}]}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(trace))
    assert run("kvm-replay", str(path)) == 0
    assert "depends on thread timing: several vCPUs writing shared pages" in capsys.readouterr().err
    trace["vcpus"][1]["writes"] = [4, 5]  # disjoint: one outcome, no note
    path.write_text(json.dumps(trace))
    assert run("kvm-replay", str(path)) == 0
    assert "thread timing" not in capsys.readouterr().err


def test_validate_skips_a_trace_whose_ring_size_the_host_refuses(monkeypatch, capsys):
    """An x86 host with PML refuses rings under 1024 entries: such a trace is reported skipped,
    not a failure of the whole run, and the others are still compared."""
    _validate_only(monkeypatch, "seq-256", "seq-4096")
    real = validate.kvm_replay_trace

    def refusing(trace, **kw):
        if trace["ring_entries"] < 1024:
            from ringenv.config import ConfigError
            raise ConfigError("trace.ring_entries: 256 entries (4096 bytes) is refused by KVM_ENABLE_CAP")
        return real(trace, **kw)

    monkeypatch.setattr(validate, "kvm_replay_trace", refusing)
    assert run("validate") == 0
    out = capsys.readouterr().out
    assert "seq-256" in out and "skipped: trace.ring_entries" in out
    assert "1/1 traces identical (real KVM vs simulator); 1 skipped" in out


def test_compare_names_the_first_difference():
    a = {"ring_entries": 256, "soft_limit": 192, "resets": [3, 1],
         "vcpus": [{"full_exits": 0, "lost": 0, "resets": [3], "batches": [
             {"trigger": "sync", "offsets": [1, 2, 3]}], "exits": ["sync", "mmio", "done"]}]}
    b = json.loads(json.dumps(a))
    assert validate.compare(a, b) is None
    b["vcpus"][0]["batches"][0]["offsets"][1] = 7
    assert validate.compare(a, b) == "vcpus[0].batches[0].offsets[1]: real 2, sim 7"
    b = json.loads(json.dumps(a))
    b["vcpus"][0]["exits"][1] = "sync"  # the exit sequence is compared too
    assert validate.compare(a, b) == "vcpus[0].exits[1]: real 'mmio', sim 'sync'"
    b = json.loads(json.dumps(a))
    b["vcpus"][0]["lost"] = 5  # and lost entries (none on the real side)
    assert validate.compare(a, b) == "vcpus[0].lost: real 0, sim 5"
    b = dict(json.loads(json.dumps(a)), faults=12)  # the faults, when the real replay counted them
    assert validate.compare(a, b) is None
    assert validate.compare(dict(a, faults=11), b) == "faults: real 11, sim 12"


def test_calibrate_emits_a_valid_profile(tmp_path, capsys):
    out = tmp_path / "host.yaml"
    assert run("calibrate", "--out", str(out)) == 0
    text = capsys.readouterr().out
    assert out.read_text() == text and "nested" in text.lower()
    data = yaml.safe_load(text)
    costs = data["costs"]
    for key in calibrate.FALLBACK_KEYS:
        assert costs[key] >= 0
    assert costs["wp_fault_ns"] > costs["dirty_write_ns"] and costs["exit_ns"] > 0
    try:
        from ringenv.config import load_host_profile
    except ImportError:
        return
    profile = load_host_profile(str(out))
    assert profile.name == "x86-calibrated" and profile.measured


def test_a_calibration_run_that_never_exits_is_kicked_out():
    """The calibration's guest runs are bounded: a run still inside KVM_RUN after the timeout is
    kicked out (no /dev/kvm needed: a stand-in guest blocks until kicked)."""
    import threading
    import time

    from ringenv.realkvm.ioctl import VcpuKicked

    class Stuck:
        def __init__(self):
            self.kicked = threading.Event()

        def run(self, index):
            if not self.kicked.wait(5.0):
                raise AssertionError("not kicked")
            raise VcpuKicked("vCPU 0: stopped (kicked out of KVM_RUN)")

        def kick_all(self):
            self.kicked.set()

    t = time.monotonic()
    with pytest.raises(TimeoutError):
        calibrate._run_to(Stuck(), "sync", timeout=0.2)
    assert time.monotonic() - t < 2.0
