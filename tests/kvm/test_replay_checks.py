"""Trace replay's checks, validate's comparison of the real KVM's and the simulator's outcomes,
and the command line's exit codes (no /dev/kvm needed: the real side is stubbed). A mutation run
found these unchecked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ringenv.config import ConfigError
from ringenv.replay import replay_trace, timing_dependent
from ringenv.realkvm import validate

BASE = {"ring_entries": 256, "soft_limit": 192, "resets": [3, 1],
        "vcpus": [{"full_exits": 0, "lost": 0, "resets": [3], "batches": [
            {"trigger": "sync", "offsets": [1, 2, 3]}], "exits": ["sync", "mmio", "done"]}]}


def cp(x):
    return json.loads(json.dumps(x))


def two():
    a = cp(BASE)
    a["vcpus"].append({"full_exits": 0, "lost": 0, "resets": [5], "batches": [
        {"trigger": "sync", "offsets": [7]}], "exits": ["sync", "done"]})
    a["resets"] = [3, 5, 0]
    return a


def test_a_page_shared_by_the_first_and_third_vcpu():
    t = {"slot_pages": 64, "reap_scope": "self",
         "vcpus": [{"writes": [1]}, {"writes": [2]}, {"writes": [1]}]}
    assert "shared pages" in timing_dependent(t)


def test_arm64_replay_enables_with_bitmap_by_default():
    # QEMU enables WITH_BITMAP on arm64: a read maps read-only and logs nothing; write to 4 pushes
    t = {"slot_pages": 64, "ring_entries": 256, "reap_scope": "self",
         "vcpus": [{"writes": [3, 4], "reads": [0]}]}
    assert replay_trace(t)["vcpus"][0]["batches"] == [{"trigger": "final", "offsets": [4]}]


def test_with_bitmap_must_be_a_bool():
    t = {"slot_pages": 64, "ring_entries": 256, "reap_scope": "self", "with_bitmap": "yes",
         "vcpus": [{"writes": [1]}]}
    with pytest.raises(ConfigError, match=r"trace.with_bitmap: 'yes'; accepted: true, false"):
        replay_trace(t)


def test_ring_entries_true_is_not_an_integer():
    t = {"slot_pages": 64, "ring_entries": True, "reap_scope": "self", "vcpus": [{"writes": [1]}]}
    with pytest.raises(ConfigError, match=r"trace.ring_entries: True is not a positive integer"):
        replay_trace(t)


def test_a_key_only_in_sim_is_a_difference():
    b = cp(BASE)
    b["vcpus"][0]["batches"][0]["extra"] = 1
    assert validate.compare(BASE, b) == "vcpus[0].batches[0].extra: only in sim"


def test_an_extra_batch_is_a_difference():
    b = cp(BASE)
    b["vcpus"][0]["batches"].append({"trigger": "final", "offsets": [9]})
    assert validate.compare(BASE, b) == "vcpus[0].batches: length real 1, sim 2"


def test_with_two_vcpus_each_vcpus_resets_are_compared():
    a, b = two(), two()
    b["vcpus"][1]["resets"] = [4]
    assert validate.compare(a, b) == "vcpus[1].resets[0]: real 5, sim 4"


def test_with_two_vcpus_only_the_final_reset_of_the_list_is_compared():
    a, b = two(), two()
    b["resets"] = [5, 3, 0]  # the order of the vCPUs' resets depends on thread timing
    assert validate.compare(a, b) is None
    b["resets"] = [3, 5, 1]
    assert validate.compare(a, b) == "final_reset[0]: real 0, sim 1"


def test_soft_limit_is_compared():
    b = cp(BASE)
    b["soft_limit"] = 448
    assert validate.compare(BASE, b) == "soft_limit: real 192, sim 448"


def test_a_config_error_other_than_the_ring_size_is_not_a_skip(monkeypatch):
    monkeypatch.setattr(validate, "builtin_traces", lambda: {"t": {"ring_entries": 256}})

    def bad(trace, **kw):
        raise ConfigError("trace.vcpus[0].writes: offset 99 outside the slot (0..63)")
    monkeypatch.setattr(validate, "kvm_replay_trace", bad)
    with pytest.raises(ConfigError, match="vcpus"):
        validate.validate()


def _run(*argv):
    import argparse
    from ringenv.realkvm import cli
    ap = argparse.ArgumentParser()
    cli.add_parsers(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    return args.func(args)


def test_validate_with_every_trace_skipped_cannot_run(monkeypatch, capsys):
    """Nothing compared is no difference (exit 1) but a host that cannot run the check (exit 2)."""
    monkeypatch.setattr(validate, "validate", lambda: {"a": "skipped: trace.ring_entries: refused"})
    assert _run("validate") == 2
    out = capsys.readouterr()
    assert "0/0 traces identical" in out.out and "no trace could be compared" in out.err


def test_a_guest_error_is_exit_1_one_line(monkeypatch, capsys, tmp_path):
    from ringenv.realkvm import replay as kreplay
    from ringenv.realkvm.guest import GuestError
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"slot_pages": 4, "ring_entries": 256, "reap_scope": "self", "vcpus": [{"writes": [1]}]}))

    def boom(*a, **kw):
        raise GuestError("vCPU 0: sync exit after 3 writes, expected 2")
    monkeypatch.setattr(kreplay, "kvm_replay_trace", boom)
    assert _run("kvm-replay", str(p)) == 1
    assert capsys.readouterr().err == "ringenv kvm-replay: vCPU 0: sync exit after 3 writes, expected 2\n"


def test_validate_without_the_simulator_is_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(validate, "validate", lambda: (_ for _ in ()).throw(ImportError("no ringenv.replay")))
    assert _run("validate") == 2
    assert "the simulator is not available" in capsys.readouterr().err


def test_a_reset_that_returns_other_than_harvested_is_a_guest_error():
    from ringenv.realkvm.guest import GuestError
    from ringenv.realkvm.guest import DATA_SLOT
    from ringenv.realkvm.replay import _Collector

    class V:
        def harvest(self):
            return [(DATA_SLOT, 1), (DATA_SLOT, 2)]

    class G:
        vcpus = [V()]

        class vm:
            @staticmethod
            def reset_dirty_rings():
                return 3
    with pytest.raises(GuestError, match="returned 3, harvested 2"):
        _Collector(G(), "self").reap("sync", 0)


def test_a_done_exit_before_the_last_write_is_a_guest_error():
    from ringenv.realkvm.arch import WriteProgram
    from ringenv.realkvm.guest import GuestError
    from ringenv.realkvm.replay import _Collector

    class G:
        vcpus = [object()]

        @staticmethod
        def run(i):
            return "done", 3
    with pytest.raises(GuestError, match="done exit after 3 writes, expected 5"):
        _Collector(G(), "self").vcpu_thread(0, WriteProgram([1, 2, 3, 4, 5], frozenset()))


def test_a_trace_kvm_refuses_is_exit_2_naming_the_field_with_kvm_s_errno(tmp_path):
    # slot_pages 2^31 > KVM_MEM_MAX_NR_PAGES (2^31 - 1): KVM_SET_USER_MEMORY_REGION EINVAL, a bad
    # input as an unaccepted ring_entries is: the field named, KVM's errno and rule kept
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"slot_pages": 1 << 31, "ring_entries": 256, "reap_scope": "self",
                             "vcpus": [{"writes": [1]}]}))
    r = subprocess.run([sys.executable, "-m", "ringenv", "replay", str(p)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("ringenv replay: trace.slot_pages: ") and "Traceback" not in r.stderr
    assert "EINVAL" in r.stderr and "KVM_MEM_MAX_NR_PAGES" in r.stderr


def test_no_command_is_a_usage_error(capsys):
    from ringenv.cli import main
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2 and "required: COMMAND" in capsys.readouterr().err


def test_a_broken_dependency_of_a_subcommand_module_is_not_hidden(monkeypatch):
    import importlib.abc
    from ringenv import cli

    class Broken(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "ringenv.demo":
                raise ModuleNotFoundError("No module named 'yaml'", name="yaml")
            return None
    monkeypatch.delitem(sys.modules, "ringenv.demo", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    with pytest.raises(ModuleNotFoundError):
        cli.build_parser()


@pytest.mark.parametrize("vcpu, message", [
    ({"writes": [1, 2, 3, 4], "syncs": [0, 9]}, "trace.vcpus[0].syncs: 9 is not an index into writes; accepted: 0..3"),
    ({"writes": [1, 2], "reads": [True]}, "trace.vcpus[0].reads: True is not an index into writes; accepted: 0..1"),
    ({"writes": [1], "syncs": "0"}, "trace.vcpus[0].syncs: '0'; expected a list of indices into writes"),
    ({"writes": [], "syncs": [0]}, "trace.vcpus[0].syncs: 0: there are no writes to index"),
])
def test_a_bad_sync_or_read_index_is_named_with_its_value(vcpu, message):
    from ringenv.replay import validate_trace

    with pytest.raises(ConfigError) as e:
        validate_trace({"slot_pages": 64, "ring_entries": 256, "reap_scope": "all", "vcpus": [vcpu]})
    assert str(e.value).startswith(message)
