"""The real-KVM tools against their documented behaviour: cases a second audit found failing
before their fixes. Those that open /dev/kvm skip cleanly where it is missing; those that only
build the x86 guest image (no ioctl) or fake the measurement skip only off x86_64."""

import errno
import os
import platform
import time

import pytest
import yaml

from ringenv.realkvm import calibrate
from ringenv.realkvm import ioctl as k
from ringenv.realkvm import replay as kreplay
from ringenv.realkvm import validate
from ringenv.realkvm.guest import unavailable_reason
from tests.realkvm._cli_helpers import cli, open_fds, write

NO_KVM = unavailable_reason()
needs_kvm = pytest.mark.skipif(NO_KVM is not None, reason=str(NO_KVM))
x86_only = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                              reason="the x86 guest image (the only real-KVM guest so far)")
pytestmark = pytest.mark.kvm

TRACE = {"slot_pages": 64, "ring_entries": 256, "reap_scope": "self",
         "vcpus": [{"writes": list(range(40)), "syncs": [9]}]}
WRAPS = (1 << 28) + 256  # entries: 2^32 + 4096 bytes, read by KVM_ENABLE_CAP as a u32 (4096: 256 entries)


# B1. A ring whose byte size does not fit KVM_ENABLE_CAP's 32-bit size argument: KVM reads the
#     low 32 bits (a 256-entry ring), the tool reported 268435712 entries and mapped 4 GiB.
@needs_kvm
@pytest.mark.parametrize("entries, code", [(WRAPS, errno.EINVAL), (1 << 28, errno.E2BIG), (1 << 17, errno.E2BIG),
                                           (100_000, errno.EINVAL)])
def test_a_ring_size_above_the_caps_maximum_is_refused_up_front(entries, code):
    """Refused as the kernel refuses a too-big size it reads whole: EINVAL if it is no power of
    two (checked first), else E2BIG; 2^28 (+ 256) entries would wrap to 0 (4096) bytes. The last
    two fit 32 bits: the pre-check answers what the kernel answers (tests/realkvm's errno table)."""
    with k.KvmSystem() as kvm, kvm.create_vm() as vm:
        max_entries = vm.check_extension(k.KVM_CAP_DIRTY_LOG_RING_ACQ_REL) // 16
        with pytest.raises(k.RingSizeRefused) as exc:
            vm.enable_dirty_ring(entries)
        assert exc.value.errno == code and exc.value.accepted[-1] == max_entries
        assert errno.errorcode[code] in str(exc.value) and f"{entries} entries" in str(exc.value)
        assert vm.ring_bytes == 0
        vm.enable_dirty_ring(256)  # nothing was enabled: the VM still takes its ring
        assert len(vm.create_vcpu(0).ring) == 256


@needs_kvm
@pytest.mark.parametrize("override", [True, False])
def test_kvm_replay_refuses_a_wrapping_ring_size_naming_the_field(override, tmp_path, capsys):
    if override:
        code, out, err = cli(capsys, "kvm-replay", write(tmp_path, TRACE), "--ring-entries", str(WRAPS))
        field = "ring_entries (--ring-entries)"
    else:
        code, out, err = cli(capsys, "kvm-replay", write(tmp_path, dict(TRACE, ring_entries=WRAPS)))
        field = "trace.ring_entries"
    assert (code, out) == (2, "") and len(err) == 1, (code, out, err)
    assert err[0].startswith(f"ringenv kvm-replay: {field}: {WRAPS} entries"), err
    assert "EINVAL" in err[0] and "accepted: 256, 512," in err[0] and err[0].endswith(", 65536"), err


# B2. The ring enabled after a vCPU, or twice: KVM's EINVAL is about the order, not the size
#     (256 is a size the host takes), so no RingSizeRefused "accepted: ... 256 ..." claim.
@needs_kvm
@pytest.mark.parametrize("case", ["after_vcpu", "twice"])
def test_enabling_an_accepted_ring_size_in_the_wrong_order_is_einval_about_the_order(case):
    with k.KvmSystem() as kvm, kvm.create_vm() as vm:
        if case == "after_vcpu":
            vm.create_vcpu(0)
        else:
            vm.enable_dirty_ring(256)
        with pytest.raises(OSError) as exc:
            vm.enable_dirty_ring(256)
    assert not isinstance(exc.value, k.KvmUnavailable), exc.value  # (RingSizeRefused is one)
    assert exc.value.errno == errno.EINVAL
    msg = str(exc.value)
    assert "KVM_ENABLE_CAP" in msg and "before" in msg and "vCPU" in msg, msg
    assert ("a vCPU exists" if case == "after_vcpu" else "already enabled") in msg, msg


@needs_kvm
def test_get_dirty_log_of_a_slot_never_created_is_the_kernels_errno():
    """KVM_GET_DIRTY_LOG of a slot id with no memslot: ENOENT (an id past KVM_USER_MEM_SLOTS:
    EINVAL; a VM with the ring and no bitmap: ENXIO), as OSError like every ioctl failure."""
    with k.KvmSystem() as kvm:
        with kvm.create_vm() as vm:
            with pytest.raises(OSError) as exc:
                vm.get_dirty_log(5)
            assert exc.value.errno == errno.ENOENT and "KVM_GET_DIRTY_LOG" in str(exc.value)
            with pytest.raises(OSError) as exc:
                vm.get_dirty_log(40000)
            assert exc.value.errno == errno.EINVAL
        with kvm.create_vm() as vm:
            vm.enable_dirty_ring(256)
            with pytest.raises(OSError) as exc:
                vm.get_dirty_log(5)
            assert exc.value.errno == errno.ENXIO


# B3. "Too big" named the slot range when the write tables were what did not fit, and did not
#     say that --faults doubles the range. (Only the image is built: no /dev/kvm needed.)
@x86_only
def test_write_tables_too_large_for_the_guest_name_the_tables_and_the_limit():
    from ringenv.config import ConfigError

    trace = {"slot_pages": 100_000_000, "ring_entries": 256, "reap_scope": "self",
             "vcpus": [{"writes": list(range(1_000_000))}]}
    with pytest.raises(ConfigError) as exc:
        kreplay.kvm_replay_trace(trace)
    msg = str(exc.value)
    assert msg.startswith("trace.vcpus[].writes: ") and "write/read tables" in msg, msg
    assert "1000000 accesses" in msg and "196608 pages" in msg and "0x30000000" in msg, msg
    assert "trace.slot_pages" not in msg, msg


@x86_only
def test_a_slot_range_too_large_names_the_range_and_the_limit():
    from ringenv.config import ConfigError

    with pytest.raises(ConfigError) as exc:
        kreplay.kvm_replay_trace(dict(TRACE, slot_pages=10 ** 9))
    msg = str(exc.value)
    assert msg.startswith("trace.slot_pages + trace.unmapped_pages: ") and "slot range" in msg, msg
    assert "1000000000 pages" in msg and "at most" in msg and "--faults" not in msg, msg


@x86_only
def test_a_range_too_large_only_with_faults_says_faults_doubles_it():
    """60M pages fit the guest's layout; with --faults the warm-up aims the programs slot_pages
    further, so the guest maps 120M pages: that no longer fits, and the message must say why."""
    from ringenv.config import ConfigError

    with pytest.raises(ConfigError) as exc:
        kreplay.kvm_replay_trace(dict(TRACE, slot_pages=60_000_000), faults=True)
    msg = str(exc.value)
    assert msg.startswith("trace.slot_pages + trace.unmapped_pages"), msg
    assert "--faults" in msg and "doubl" in msg and "120000000 pages" in msg and "at most" in msg, msg


# B4. --timeout did not bound the --faults warm-up (24 s with --timeout 1, exit 0).
WARM_WRITES = 200_000  # each warm-up access is an MMIO exit (~60 us nested): ~12 s of warm-up


@needs_kvm
def test_a_warm_up_vcpu_made_after_the_timeout_fired_is_stopped_too(monkeypatch):
    """The warm-up's timer kicks the warm-up vCPUs that exist when it fires: one created after
    that (here made slow to create, as on a loaded host) must not run its whole warm-up
    (~12 s) before the timeout is noticed."""
    real = k.RealVm.create_vcpu

    def slow(self, vcpu_id):
        time.sleep(0.5)  # longer than the timeout: the timer fires with no warm-up vCPU yet
        return real(self, vcpu_id)

    monkeypatch.setattr(k.RealVm, "create_vcpu", slow)
    trace = dict(TRACE, vcpus=[{"writes": [i % 64 for i in range(WARM_WRITES)]}])
    with pytest.raises(TimeoutError, match=r"warm-up \(vCPU 0 of 1\) did not finish within 0\.3 s"):
        kreplay.kvm_replay_trace(trace, timeout=0.3, faults=True)


@needs_kvm
def test_timeout_bounds_the_faults_warm_up(tmp_path, capsys):
    trace = dict(TRACE, vcpus=[{"writes": [i % 64 for i in range(WARM_WRITES)]}])
    fds = open_fds()
    with pytest.raises(TimeoutError) as exc:
        kreplay.kvm_replay_trace(trace, timeout=0.3, faults=True)
    # stopped by the timer part way (not a warm-up left to finish, then found to have taken too
    # long): a wall-time bound would also count building the 200000-write guest on a loaded host
    assert "warm-up (vCPU 0 of 1) did not finish within 0.3 s" in str(exc.value), exc.value
    assert open_fds() == fds  # every VM, vCPU and mapping released
    code, out, err = cli(capsys, "kvm-replay", write(tmp_path, trace), "--faults", "--timeout", "0.3")
    assert (code, out) == (1, "") and len(err) == 1 and "0.3 s" in err[0], (code, err)


# B5. `calibrate --out /proc/x.yaml` measured for 11 s, then failed with a bare
#     "[Errno 2] ... '/proc/x.yaml'" (exit 1) and the profile was lost.
FAKE = {key: 1000.0 for key in calibrate.FALLBACK_KEYS}


@x86_only
def test_calibrate_out_that_cannot_be_written_is_refused_before_measuring(monkeypatch, capsys):
    def measure():
        raise AssertionError("measured before checking --out")

    monkeypatch.setattr(calibrate, "measure", measure)
    code, out, err = cli(capsys, "calibrate", "--out", "/proc/ringenv-audit.yaml")
    assert (code, out) == (2, "") and len(err) == 1, (code, out, err)
    assert err[0].startswith("ringenv calibrate: --out '/proc/ringenv-audit.yaml': "), err
    assert not os.path.exists("/proc/ringenv-audit.yaml")


@x86_only
def test_calibrate_out_checked_without_touching_an_existing_file(monkeypatch, tmp_path, capsys):
    out = tmp_path / "host.yaml"
    out.write_text("old\n")
    monkeypatch.setattr(calibrate, "measure", lambda: FAKE)
    code, stdout, err = cli(capsys, "calibrate", "--out", str(out))
    assert code == 0 and out.read_text() == stdout and os.listdir(tmp_path) == ["host.yaml"], err


@x86_only
def test_calibrate_out_failing_at_the_end_prints_the_profile_and_names_out(monkeypatch, tmp_path, capsys):
    out = tmp_path / "gone" / "host.yaml"
    out.parent.mkdir()

    def measure():
        out.parent.rmdir()  # the directory disappears while measuring
        return FAKE

    monkeypatch.setattr(calibrate, "measure", measure)
    code, stdout, err = cli(capsys, "calibrate", "--out", str(out))
    assert code == 1 and len(err) == 1, (code, err)
    assert err[0].startswith(f"ringenv calibrate: --out {str(out)!r}: "), err
    assert "standard output" in err[0], err
    assert yaml.safe_load(stdout)["costs"]["wp_fault_ns"] == 1000


# Taste: validate exited 1 ("a difference") when every trace was skipped.
@needs_kvm
def test_validate_with_every_trace_skipped_cannot_run_exit_2(monkeypatch, capsys):
    try:
        from ringenv.config import ConfigError
        validate.simulator()
    except ImportError as exc:
        pytest.skip(f"simulator not importable: {exc}")

    def refusing(trace, **kw):
        raise ConfigError("trace.ring_entries: 256 entries (4096 bytes) is refused by KVM_ENABLE_CAP")

    monkeypatch.setattr(validate, "builtin_traces", lambda: {"seq-256": TRACE})
    monkeypatch.setattr(validate, "kvm_replay_trace", refusing)
    code, out, err = cli(capsys, "validate")
    assert code == 2, (code, out, err)
    assert "skipped: trace.ring_entries" in out
    assert err and err[-1].startswith("ringenv validate: ") and "no trace" in err[-1], err
