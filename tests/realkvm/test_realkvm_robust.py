"""Every way /dev/kvm can be unusable gives one clear line and exit code 2 (never a traceback);
fds and mappings are released on every path; a guest that never exits is bounded; bad input to
kvm-replay is refused with the simulator's own message."""

import errno
import gc
import json
import os
import subprocess
import sys

import pytest

from ringenv.cli import main
from ringenv.realkvm import ioctl as k
from ringenv.realkvm import replay as kreplay
from ringenv.realkvm import x86
from ringenv.realkvm.arch import WriteProgram
from ringenv.realkvm.guest import Guest, unavailable_reason

NO_KVM = unavailable_reason()
needs_kvm = pytest.mark.skipif(NO_KVM is not None, reason=str(NO_KVM))
pytestmark = pytest.mark.kvm

TRACE = {"slot_pages": 64, "ring_entries": 256, "reap_scope": "self",
         "vcpus": [{"writes": list(range(40)), "syncs": [9]}]}
COMMANDS = (["kvm-replay", "TRACE"], ["validate"], ["calibrate"])


def _simulator():
    try:
        from ringenv.replay import replay_trace  # noqa: F401
    except ImportError:
        return False
    return True


def cli(capsys, *argv):
    """Run ``ringenv ARGV`` in-process: (exit code, stderr lines)."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.strip().splitlines()


@pytest.fixture
def trace_file(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(TRACE))
    return str(path)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def kvm_maps() -> int:
    with open("/proc/self/maps") as f:
        return sum("kvm" in line for line in f)


@pytest.fixture
def no_leaks():
    """The test must leave as many fds and KVM mappings as it found."""
    gc.collect()
    fds, maps = len(open_fds()), kvm_maps()
    yield
    gc.collect()
    assert (len(open_fds()), kvm_maps()) == (fds, maps)


def _expect_unavailable(capsys, trace_file, *needles):
    for argv in COMMANDS:
        argv = [trace_file if a == "TRACE" else a for a in argv]
        if argv[0] == "validate" and not _simulator():
            continue
        code, err = cli(capsys, *argv)
        assert code == 2 and len(err) == 1, (argv, err)
        assert err[0].startswith(f"ringenv {argv[0]}: ")
        for needle in needles:
            assert needle in err[0], (argv, err)


# --- /dev/kvm unusable: these run on any machine ---

def test_missing_device(monkeypatch, capsys, tmp_path, trace_file):
    missing = str(tmp_path / "no-kvm")
    monkeypatch.setenv(k.KVM_DEV_ENV, missing)
    assert missing in unavailable_reason() and "does not exist" in unavailable_reason()
    if NO_KVM is None or "does not exist" in NO_KVM:
        _expect_unavailable(capsys, trace_file, missing, "does not exist", "kvm module")


def test_missing_device_real_executable(tmp_path, trace_file):
    env = dict(os.environ, RINGENV_KVM_DEV=str(tmp_path / "no-kvm"))
    proc = subprocess.run([sys.executable, "-m", "ringenv", "kvm-replay", trace_file],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr


def test_no_permission(monkeypatch, capsys, trace_file):
    real_open = os.open
    dev = k.kvm_device_path()

    def refuse(path, *a, **kw):
        if path == dev:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, *a, **kw)

    monkeypatch.setattr(k.os, "open", refuse)
    with pytest.raises(k.KvmUnavailable, match="no permission to open .*group"):
        k.KvmSystem()
    _expect_unavailable(capsys, trace_file, "no permission", "kvm")


def test_not_a_kvm_device(monkeypatch, capsys, trace_file):
    monkeypatch.setenv(k.KVM_DEV_ENV, "/dev/null")
    _expect_unavailable(capsys, trace_file, "/dev/null is not a KVM device", "RINGENV_KVM_DEV")


# --- capabilities and sizes: need the real KVM ---

@needs_kvm
def test_api_version_mismatch(monkeypatch, capsys, trace_file, no_leaks):
    real_ioctl = k.ioctl
    monkeypatch.setattr(k, "ioctl", lambda fd, req, arg=0: 11 if req == k.KVM_GET_API_VERSION
                        else real_ioctl(fd, req, arg))
    with pytest.raises(k.KvmUnavailable, match="API version 11, this tool needs 12"):
        k.KvmSystem()
    _expect_unavailable(capsys, trace_file, "API version 11")


@needs_kvm
def test_host_without_dirty_ring(monkeypatch, capsys, trace_file, no_leaks):
    real = k.RealVm.check_extension
    rings = (k.KVM_CAP_DIRTY_LOG_RING, k.KVM_CAP_DIRTY_LOG_RING_ACQ_REL)
    monkeypatch.setattr(k.RealVm, "check_extension",
                        lambda self, cap: 0 if cap in rings else real(self, cap))
    code, err = cli(capsys, "kvm-replay", trace_file)
    assert code == 2 and len(err) == 1 and "lacks KVM_CAP_DIRTY_LOG_RING" in err[0]


@needs_kvm
def test_with_bitmap_the_host_lacks(capsys, tmp_path, no_leaks):
    with k.KvmSystem() as kvm:
        if kvm.check_extension(k.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP):
            pytest.skip("this host supports WITH_BITMAP")
    path = tmp_path / "t.json"
    path.write_text(json.dumps(dict(TRACE, with_bitmap=True)))
    code, err = cli(capsys, "kvm-replay", str(path))
    # the simulator's message for the same trace on an x86 profile, KVM's errno and the accepted value
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("ringenv kvm-replay: trace.with_bitmap: true is refused by KVM_ENABLE_CAP on this host")
    assert "EINVAL" in err[0] and err[0].endswith("accepted there: false")


@needs_kvm
@pytest.mark.parametrize("entries,name", [(128, "EINVAL"), (384, "EINVAL"), (131072, "E2BIG")])
def test_ring_size_the_host_refuses(capsys, trace_file, entries, name, no_leaks):
    code, err = cli(capsys, "kvm-replay", trace_file, "--ring-entries", str(entries))
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"ringenv kvm-replay: ring_entries (--ring-entries): {entries} entries")
    assert name in err[0] and "accepted: 256, 512" in err[0]


# --- bad input: the simulator's message, exit 2 (no KVM needed: checked before /dev/kvm) ---

BAD = {
    "not-json": "{\"slot_pages\": 4,",
    "a-list": "[1, 2]",
    "slot-pages-0": json.dumps(dict(TRACE, slot_pages=0)),
    "slot-pages-bool": json.dumps(dict(TRACE, slot_pages=True)),
    "ring-entries-str": json.dumps(dict(TRACE, ring_entries="256")),
    "ring-entries-negative": json.dumps(dict(TRACE, ring_entries=-256)),
    "reap-scope": json.dumps(dict(TRACE, reap_scope="some")),
    "missing-key": json.dumps({k_: v for k_, v in TRACE.items() if k_ != "reap_scope"}),
    "unknown-key": json.dumps(dict(TRACE, extra=1)),
    "with-bitmap-int": json.dumps(dict(TRACE, with_bitmap=1)),
    "vcpus-empty": json.dumps(dict(TRACE, vcpus=[])),
    "vcpu-not-object": json.dumps(dict(TRACE, vcpus=[[1, 2]])),
    "write-outside": json.dumps(dict(TRACE, vcpus=[{"writes": [64]}])),
    "write-float": json.dumps(dict(TRACE, vcpus=[{"writes": [1.5]}])),
    "sync-not-an-index": json.dumps(dict(TRACE, vcpus=[{"writes": [1], "syncs": [1]}])),
}


@pytest.mark.skipif(not _simulator(), reason="ringenv.replay not importable")
@pytest.mark.parametrize("case", [*BAD, "no-such-file"])
def test_bad_input_gives_the_simulators_error(case, tmp_path, capsys):
    path = tmp_path / f"{case}.json"
    if case in BAD:
        path.write_text(BAD[case])
    sim_code, sim_err = cli(capsys, "replay", str(path), "--profile", "x86-nopml")
    real_code, real_err = cli(capsys, "kvm-replay", str(path))
    assert sim_code == real_code == 2 and len(real_err) == 1
    assert real_err[0].removeprefix("ringenv kvm-replay: ") == \
        sim_err[0].removeprefix("ringenv replay: ")


def test_bad_input_on_stdin(monkeypatch, capsys):
    import io
    monkeypatch.setattr(sys, "stdin", io.StringIO("{nope"))
    code, err = cli(capsys, "kvm-replay", "-")
    assert code == 2 and len(err) == 1 and "not valid JSON" in err[0]


@pytest.mark.parametrize("bad,field", [({"reads": [2]}, "reads"), ({"reads": "0"}, "reads")])
def test_bad_reads_are_refused_by_kvm_replay(bad, field):
    with pytest.raises(ValueError, match=rf"vcpus\[0\]\.{field}"):
        kreplay.kvm_replay_trace(dict(TRACE, vcpus=[{"writes": [1, 2], **bad}]))


def test_populated_must_be_a_bool():
    with pytest.raises(ValueError, match="populated"):
        kreplay.kvm_replay_trace(dict(TRACE, populated="yes"))


# --- resource hygiene and bounded guests ---

@needs_kvm
def test_many_vms_leave_no_fds_or_mappings(no_leaks):
    progs = [WriteProgram(list(range(8)), frozenset([3])), WriteProgram(list(range(8, 16)))]
    for _ in range(40):
        with Guest(progs, 16, ring_entries=256) as g:
            for i in range(2):
                while g.run(i)[0] != "done":
                    g.vcpus[i].harvest()
                    g.vm.reset_dirty_rings()
    for _ in range(20):  # half-built VMs: the error leaves nothing behind
        with pytest.raises(k.RingSizeRefused):
            Guest(progs, 16, ring_entries=128)


@needs_kvm
def test_interrupt_while_building_leaves_nothing(monkeypatch, no_leaks):
    calls = []

    def interrupted(self, system, vcpu, image, index):
        calls.append(index)
        if index == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(x86.X86, "setup_vcpu", interrupted)
    progs = [WriteProgram([1]), WriteProgram([2]), WriteProgram([3])]
    for _ in range(10):
        with pytest.raises(KeyboardInterrupt):
            Guest(progs, 4, ring_entries=256)
    assert calls[:2] == [0, 1]


@needs_kvm
def test_interrupt_during_replay_exits_130_and_releases(monkeypatch, capsys, trace_file,
                                                        no_leaks):
    def interrupted(self, trigger, issuer):
        raise KeyboardInterrupt
    monkeypatch.setattr(kreplay._Collector, "reap", interrupted)
    code, err = cli(capsys, "kvm-replay", trace_file)
    assert code == 130 and err == ["ringenv kvm-replay: interrupted"]


@needs_kvm
def test_guest_that_never_exits_is_bounded(monkeypatch, capsys, trace_file, no_leaks):
    import time
    monkeypatch.setattr(x86, "GUEST_CODE", bytes.fromhex("ebfe"))  # jmp $: spins in CPL3
    trace = dict(TRACE, vcpus=[{"writes": [1]}, {"writes": [2]}])
    t = time.monotonic()
    with pytest.raises(TimeoutError, match="vcpu0, vcpu1 did not finish within 0.5 s"):
        kreplay.kvm_replay_trace(trace, timeout=0.5)
    assert time.monotonic() - t < 10
    code, err = cli(capsys, "kvm-replay", trace_file, "--timeout", "0.3")
    assert code == 1 and len(err) == 1 and "did not finish within 0.3 s" in err[0]


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_kvm_replay_timeout_must_be_a_positive_number(value, capsys):
    from ringenv.cli import main

    with pytest.raises(SystemExit) as e:
        main(["kvm-replay", "trace.json", "--timeout", value])
    assert e.value.code == 2 and "--timeout" in capsys.readouterr().err
