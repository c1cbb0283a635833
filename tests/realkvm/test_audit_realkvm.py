"""The real-KVM tools against their documented behaviour, cases an audit found failing before
their fixes; they skip cleanly where /dev/kvm is missing."""

import errno

import pytest

from ringenv.realkvm import ioctl as k
from ringenv.realkvm import replay as kreplay
from ringenv.realkvm import x86
from ringenv.realkvm.guest import Guest, GuestError, unavailable_reason
from tests.realkvm._cli_helpers import cli, open_fds, write

NO_KVM = unavailable_reason()
pytestmark = [pytest.mark.kvm, pytest.mark.skipif(NO_KVM is not None, reason=str(NO_KVM))]

TRACE = {"slot_pages": 64, "ring_entries": 256, "reap_scope": "self",
         "vcpus": [{"writes": list(range(40)), "syncs": [9]}]}


# 1. More vCPUs than the host's KVM takes: the simulator refuses the trace naming trace.vcpus
#    (exit 2); kvm-replay fails with the raw ioctl errno and exit 1.
def test_vcpu_count_the_host_refuses_is_a_bad_input_naming_trace_vcpus(tmp_path, capsys):
    with k.KvmSystem() as kvm:
        max_vcpus = kvm.check_extension(66) or 1024  # KVM_CAP_MAX_VCPUS
    if max_vcpus > 4096:
        pytest.skip(f"this host takes {max_vcpus} vCPUs: too many threads for a quick test")
    path = write(tmp_path, dict(TRACE, vcpus=[{"writes": []}] * (max_vcpus + 1)))
    fds = open_fds()
    code, out, err = cli(capsys, "kvm-replay", path)
    assert open_fds() == fds
    assert (code, out) == (2, "") and len(err) == 1, (code, err)
    assert err[0].startswith("ringenv kvm-replay: trace.vcpus: "), err


# 2a. A slot larger than the host can back: the simulator runs the trace; kvm-replay gives
#     "[Errno 12] Cannot allocate memory" and exit 1, not naming trace.slot_pages.
def test_slot_larger_than_host_memory_runs_or_names_slot_pages(tmp_path, capsys):
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    pages = 2 * (info["MemTotal"] + info.get("SwapTotal", 0)) * 1024 // k.PAGE_SIZE
    if pages >= 50_000_000:  # keep the guest's page tables (pages / 512 pages) small
        pytest.skip("this host has too much memory for a quick test")
    path = write(tmp_path, dict(TRACE, slot_pages=pages))
    code, _, err = cli(capsys, "kvm-replay", path)
    assert code == 0 or (code == 2 and len(err) == 1 and "slot_pages" in err[0]), (code, err)


# 2b. A slot or unmapped range past the x86 guest's fixed layout (the simulator takes both):
#     "guest too large for the fixed x86 layout" names neither field.
@pytest.mark.parametrize("field", ["slot_pages", "unmapped_pages"])
def test_size_beyond_the_guest_layout_names_the_field(field, tmp_path, capsys):
    path = write(tmp_path, dict(TRACE, **{field: 10 ** 9}))
    code, _, err = cli(capsys, "kvm-replay", path)
    assert code == 2 and len(err) == 1, (code, err)
    assert f"trace.{field}" in err[0], err


# 3. On x86 with PML (README: "1024 entries at least") the refusal lists 256 and 512 as
#    accepted, the very size it refuses; the simulator's x86-pml says "accepted: 1024, ...".
#    The host's kernel rule is emulated: KVM_ENABLE_CAP refuses rings below (64 + 512) x 16 bytes.
def test_ring_size_refused_on_a_pml_host_lists_only_sizes_it_accepts(monkeypatch):
    from ringenv.config import ConfigError

    monkeypatch.setattr(x86.X86, "has_pml", True)
    real = k.RealVm.enable_cap

    def pml_kernel(self, cap, *args, flags=0):
        rings = (k.KVM_CAP_DIRTY_LOG_RING, k.KVM_CAP_DIRTY_LOG_RING_ACQ_REL)
        if cap in rings and args and args[0] < (64 + 512) * 16:
            raise OSError(errno.EINVAL, "KVM_ENABLE_CAP: Invalid argument")
        return real(self, cap, *args, flags=flags)

    monkeypatch.setattr(k.RealVm, "enable_cap", pml_kernel)
    with pytest.raises(ConfigError) as exc:
        kreplay.kvm_replay_trace(TRACE)
    msg = str(exc.value)
    assert "256 entries" in msg and "accepted: " in msg
    accepted = [int(s) for s in msg.split("accepted: ", 1)[1].split(", ")]
    assert 256 not in accepted and 512 not in accepted and accepted[0] == 1024, msg


# 4. `calibrate --out` into a missing directory: measures first, then fails with exit 1 and
#    the measured profile is not printed either (lost).
def test_calibrate_out_into_a_missing_directory_is_a_bad_input(tmp_path, capsys):
    out = tmp_path / "missing" / "host.yaml"
    code, stdout, err = cli(capsys, "calibrate", "--out", str(out))
    assert len(err) == 1 and str(out) in err[0], err
    assert code == 2, (code, err)


def _replay_with_vcpu1_failing(monkeypatch, passes: int, timeout: float) -> list[int]:
    """Replay a 2-vCPU trace whose vCPU 1 fails at once (an unexpected exit) while vCPU 0 writes
    ``passes`` x 65536 pages; the GuestError must be what is raised. Returns the vCPUs that were
    kicked out of KVM_RUN (stopped before their done exit), not a wall time: building the guest
    of so long a trace takes seconds of its own on a loaded host."""
    real_run = Guest.run
    kicked = []

    def run(self, index):
        if index == 1:
            raise GuestError("vCPU 1: unexpected exit_reason 8 detail []")
        try:
            return real_run(self, index)
        except k.VcpuKicked:
            kicked.append(index)
            raise

    monkeypatch.setattr(Guest, "run", run)
    trace = {"slot_pages": 65536 + 16, "ring_entries": 256, "reap_scope": "self",
             "vcpus": [{"writes": list(range(65536)) * passes}, {"writes": [65536]}]}
    with pytest.raises(GuestError, match="vCPU 1: unexpected"):
        kreplay.kvm_replay_trace(trace, timeout=timeout)
    return kicked


# 5. One vCPU's failure (an unexpected exit) does not stop the others, and when they outlast
#    --timeout the error reported is a timeout of another vCPU ("guest never exited?"): the
#    failure that was collected is dropped.
def test_a_vcpu_failure_is_reported_not_masked_by_a_timeout(monkeypatch):
    assert _replay_with_vcpu1_failing(monkeypatch, 16, timeout=0.5) == [0]  # ~3 s of writes: stopped


def test_a_vcpu_failure_ends_the_replay_at_once_not_when_the_other_vcpus_finish(monkeypatch):
    """kvm_replay_trace waits for all vCPU threads "but stops at a vCPU's failure": with vCPU 0
    ~9 s of writes from its end and no deadline in sight, vCPU 0 is kicked out, not waited for to
    its done exit. Mutant killed: the wait loop not stopping at an error (vCPU 0 then finishes
    and nothing is kicked)."""
    assert _replay_with_vcpu1_failing(monkeypatch, 48, timeout=3600) == [0]
