"""Tests from a mutation run over session 34's changes (87 hand-written mutants: 60 killed as the
suite stood, 0 equivalent; each test here kills one or more of the 27 survivors, ids in the
comments): trace reading and checking in ringenv.replay and TraceProgram at their bounds, the
recycler's clear, the benchmarks' best-of and every-run rows, calibrate's fallback clamp and
--out probe, the real-KVM replay's timeout share, vCPU maximum, MemAvailable and fd ownership,
and the x86 layout's range-or-tables blame at its boundaries. (I4 and X5 are also killed by the
suite: by the real calibration and by the range-blame test.)"""

from __future__ import annotations

import pytest

from ringenv.config import ConfigError
from ringenv.replay import MAX_TRACE_PAGES, replay_trace, validate_trace


def trace(**kw) -> dict:
    t = {"slot_pages": 16, "ring_entries": 256, "reap_scope": "all", "vcpus": [{"writes": [3]}]}
    t.update(kw)
    return t


def test_the_largest_slot_and_range_a_trace_may_name_are_accepted():  # R2 R4
    validate_trace(trace(slot_pages=MAX_TRACE_PAGES))
    validate_trace(trace(unmapped_pages=MAX_TRACE_PAGES - 16))
    with pytest.raises(ConfigError, match=r"trace.unmapped_pages: 1099511627761 is not accepted"):
        validate_trace(trace(unmapped_pages=MAX_TRACE_PAGES - 15))


def test_a_slot_already_past_the_profiles_range_accepts_no_unmapped_pages_not_a_negative_count():  # R11
    """arm64-4k (the default profile) has 2^28 guest-physical pages: a slot of 2^28 + 16 pages
    leaves room for none after it, so the accepted range is 0..0, not 0..-16."""
    limit = 1 << 28
    with pytest.raises(ConfigError) as e:
        replay_trace(trace(slot_pages=limit + 16, unmapped_pages=1))
    assert str(e.value).endswith("accepted: 0..0"), str(e.value)


def test_a_replay_whose_vcpus_neither_exit_nor_finish_is_an_error_not_a_short_result(monkeypatch):  # R12
    from ringenv.kvm.vm import Vm
    monkeypatch.setattr(Vm, "run_until", lambda self, t: [])
    with pytest.raises(RuntimeError, match=r"replay stalled: vCPUs \[0\] neither exited nor finished"):
        replay_trace(trace())


def test_a_path_that_exists_but_cannot_be_read_is_a_config_error():  # R15
    """A unix socket exists (not 'no such file') and open() fails with ENXIO: a ConfigError
    naming the path, not an OSError traceback (root reads any file, so no chmod here)."""
    import os
    import socket
    import tempfile

    from ringenv.replay import load_trace
    d = tempfile.mkdtemp(prefix="s34")  # (short: a socket path holds at most 107 bytes)
    path = os.path.join(d, "t.sock")
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(path)
        with pytest.raises(ConfigError, match=r"TRACE: '.*t\.sock' cannot be read \(.+\); expected a readable JSON"):
            load_trace(path)
    finally:
        s.close()
        os.unlink(path)
        os.rmdir(d)


def test_the_duplicate_key_named_is_the_repeated_one_not_the_objects_first(tmp_path):  # R21
    from ringenv.replay import load_trace
    p = tmp_path / "t.json"
    p.write_text('{"slot_pages": 16, "ring_entries": 256, "vcpus": [], "vcpus": []}')
    with pytest.raises(ConfigError, match=r"^TRACE t.json: key 'vcpus' is given twice in one object; each key once$"):
        load_trace(p)


def test_trace_program_refuses_a_read_index_one_past_the_writes():  # T4
    from ringenv.guest.trace import TraceProgram
    with pytest.raises(ValueError, match=r"^reads\[0\]\[0\]: 3 is out of range; accepted: 0\.\.2$"):
        TraceProgram([[1, 2, 3]], [[]], reads=[[3]])
    assert TraceProgram([[1, 2, 3]], [[]], reads=[[2]]).nr_vcpus == 1


def test_trace_program_refuses_a_nested_list_instead_of_flattening_it():  # T5
    from ringenv.guest.trace import TraceProgram
    with pytest.raises(ValueError, match=r"^writes\[0\]: expected a flat list of integers, got shape \(2, 2\)$"):
        TraceProgram([[[1, 2], [3, 4]]], [[]])


def test_trace_program_names_a_bool_before_a_float_as_the_first_bad_element():  # T9
    from ringenv.guest.trace import TraceProgram
    with pytest.raises(ValueError, match=r"^syncs\[0\]\[0\]: True is not an integer$"):
        TraceProgram([[1, 2]], [[True, 1.5]])


def test_best_ppo_run_keeps_the_fastest_run_each_on_a_new_env(monkeypatch):  # B3
    import benchmarks.env_speed as env_speed
    runs = iter([(10.0, 1.0, 1.0), (30.0, 2.0, 2.0), (20.0, 3.0, 3.0)])
    envs = []
    monkeypatch.setattr(env_speed, "ppo_run", lambda env: next(runs))
    assert env_speed.best_ppo_run(lambda: envs.append(1) or len(envs), 3) == (30.0, 2.0, 2.0)
    assert len(envs) == 3


class _Stop(Exception):
    pass


def test_the_random_policy_row_is_the_best_of_random_runs(monkeypatch):  # B4
    import benchmarks.env_speed as env_speed
    calls = []

    def random_policy(env, episodes=6):
        calls.append(episodes)
        return (100.0 * len(calls), 0.0)

    def ppo_run(env, timesteps=None):
        raise _Stop  # (main's PPO runs are not this test's)

    monkeypatch.setattr(env_speed, "random_policy", random_policy)
    monkeypatch.setattr(env_speed, "ppo_run", ppo_run)
    monkeypatch.setattr(env_speed, "RANDOM_RUNS", 4)
    with pytest.raises(_Stop):
        env_speed.main()
    assert calls == [1, 6, 6, 6, 6]  # a one-episode warm-up, then RANDOM_RUNS measured runs


def test_each_memory_row_runs_in_a_spawned_process_of_its_own(monkeypatch):  # B8
    import benchmarks.memory as memory
    used = {}

    class Pool:
        def __init__(self, n, mp_context=None):
            used.update(n=n, method=mp_context.get_start_method())

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, *args, **kwargs):
            used.update(fn=fn, args=args, kwargs=kwargs)
            from concurrent.futures import Future
            f = Future()
            f.set_result((1.0, 2.0, []))
            return f

    monkeypatch.setattr(memory, "ProcessPoolExecutor", Pool)
    monkeypatch.setattr(memory, "growth", lambda *a, **k: pytest.fail("growth ran in the test's own process"))
    assert memory.growth_alone("ringenv/Migration-v0", 3, collect=False) == (1.0, 2.0, [])
    assert used["n"] == 1 and used["method"] == "spawn"
    assert used["args"] == ("ringenv/Migration-v0", 3) and used["kwargs"] == {"collect": False}


def _kvm_reason():
    from ringenv.realkvm.guest import unavailable_reason
    return unavailable_reason()


needs_kvm = pytest.mark.skipif(_kvm_reason() is not None, reason=str(_kvm_reason()))


@needs_kvm
def test_a_bitmap_of_exactly_num_pages_bits_is_passed_to_kvm(monkeypatch):  # I4 (also the calibrate test)
    import numpy as np

    from ringenv.realkvm import ioctl as k
    calls = []
    with k.KvmSystem() as system, system.create_vm() as vm:
        real = k.ioctl
        monkeypatch.setattr(k, "ioctl", lambda fd, req, *a: calls.append(req) if req == k.KVM_CLEAR_DIRTY_LOG
                            else real(fd, req, *a))
        vm.clear_dirty_log(0, 0, 64, np.zeros(1, dtype=np.uint64))  # 64 bits hold 64 pages
        vm.clear_dirty_log(0, 0, 65, np.zeros(2, dtype=np.uint64))
        with pytest.raises(ValueError, match=r"bitmap: 1 uint64 words hold 64 bits, fewer than num_pages 65"):
            vm.clear_dirty_log(0, 0, 65, np.zeros(1, dtype=np.uint64))
    assert calls == [k.KVM_CLEAR_DIRTY_LOG] * 2


def test_recycler_clear_keeps_no_array_and_leaves_those_in_use_alone():  # A1
    import numpy as np

    from ringenv.arrays import Recycler
    r = Recycler(min_bytes=0)
    a = r.zeros(1000, np.uint32)
    a[:] = 7
    unheld = r.zeros(500, np.uint32)
    del unheld
    assert r.kept_bytes == 6000
    r.clear()
    assert r.kept_bytes == 0 and (a == 7).all()  # the user's array stays as it was
    b = r.zeros(500, np.uint32)  # a new one: the dropped array is not handed out again
    assert r.kept_bytes == 2000 and not b.any()


KTRACE = {"slot_pages": 64, "ring_entries": 256, "reap_scope": "self",
          "vcpus": [{"writes": [1, 2, 3], "syncs": [1]}, {"writes": [10, 11]}]}


@needs_kvm
def test_the_run_gets_only_what_the_warm_up_left_of_the_timeout(monkeypatch):  # Q6 G2
    """A warm-up that took longer than --timeout (here made slow after it finished) leaves the
    run no time: a TimeoutError before the run starts, whether or not so short a run would have
    finished (it raced the deadline before, and a fast run passed), not a second full timeout."""
    import time

    from ringenv.realkvm import replay as kreplay
    from ringenv.realkvm.guest import Guest
    real = Guest._warm_up

    def slow(self, *args, **kwargs):
        real(self, *args, **kwargs)
        time.sleep(1.2)

    monkeypatch.setattr(Guest, "_warm_up", slow)
    with pytest.raises(TimeoutError, match=r"warm-up took \S+ s, all of the 1 s timeout: nothing left") as e:
        kreplay.kvm_replay_trace(KTRACE, timeout=1.0, faults=True)
    assert float(str(e.value).split()[4]) >= 1.2  # (1.2 s and more: "2" or "2.01" on a loaded host)


@needs_kvm
def test_the_vcpu_maximum_named_is_the_hosts(monkeypatch):  # Q3
    from ringenv.realkvm import ioctl as k
    from ringenv.realkvm import replay as kreplay
    with k.KvmSystem() as system:
        most = system.check_extension(k.KVM_CAP_MAX_VCPUS)
    real = k.RealVm.create_vcpu

    def create(self, vcpu_id):
        if vcpu_id >= 1:
            raise OSError(22, "KVM_CREATE_VCPU: Invalid argument")
        return real(self, vcpu_id)

    monkeypatch.setattr(k.RealVm, "create_vcpu", create)
    with pytest.raises(ConfigError) as e:
        kreplay.kvm_replay_trace(KTRACE)
    assert str(e.value).endswith(f"; accepted: at most {most} vCPUs in a VM (KVM_CAP_MAX_VCPUS)"), str(e.value)


def test_available_memory_is_memavailable_in_kib_and_unknown_is_very_large(monkeypatch):  # Q7
    import io

    from ringenv.realkvm import replay as kreplay
    monkeypatch.setattr(kreplay, "open", lambda path: io.StringIO("MemTotal:  9999 kB\nMemAvailable:    2048 kB\n"),
                        raising=False)
    assert kreplay._available_bytes() == 2048 * 1024

    def refused(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(kreplay, "open", refused, raising=False)
    assert kreplay._available_bytes() == 1 << 62


def test_the_fallback_profile_without_ringenv_config_writes_a_negative_measurement_as_0(monkeypatch):  # K4
    import sys

    import yaml

    from ringenv.realkvm import calibrate
    measured = {key: 1000.4 for key in calibrate.FALLBACK_KEYS}
    key = sorted(calibrate.FALLBACK_KEYS)[0]
    measured[key] = -5.0
    monkeypatch.setitem(sys.modules, "ringenv.config", None)  # (the import then raises ImportError)
    costs = yaml.safe_load(calibrate.profile_yaml(measured))["costs"]
    assert costs[key] == 0 and all(v == 1000 for k, v in costs.items() if k != key), costs


def test_the_walk_row_reports_the_events_the_walk_consumed_not_the_batch_length(monkeypatch):  # B7
    import benchmarks.host as host
    import ringenv.kvm.fault as fault

    def walk(*args):
        return (7,)

    walk.py_func = walk
    vm, vcpus, _, readers = host.build(4)
    # every kernel the measured run (0.5 s) takes compiled with the real walk first: with a cold
    # cache, one first typed after the patch finds a Python function as its walk and fails
    host.simulate(vm, vcpus, readers, 0.5)
    monkeypatch.setattr(fault, "walk_writes", walk)  # (compiled kernels keep the walk they were typed with)
    ratio, events = host.compiled_vs_python(repeats=1)
    assert events == 7 and ratio > 0


def test_bytes_per_page_traces_what_the_run_holds_after_emptying_the_recycler_and_closes_it(monkeypatch):  # B10 B12
    import numpy as np

    import benchmarks.vmm_speed as vmm_speed
    events = []

    class Run:
        def __init__(self, scenario, seed):
            self.scenario, self.npages = scenario, 1000

        def advance(self, ns):
            if self.scenario == "measured":
                self.held = np.ones(1_000_000, dtype=np.uint8)

        def close(self):
            events.append(("close", self.scenario))

    class Recycler:
        def clear(self):
            events.append("clear")

    monkeypatch.setattr(vmm_speed, "MigrationRun", Run)
    monkeypatch.setattr(vmm_speed, "RECYCLER", Recycler())
    b, pages = vmm_speed.bytes_per_page("measured", seconds=0.1)
    assert pages == 1000 and 1000 <= b < 1100, b
    assert events == ["clear", ("close", "measured")]


def _prog(writes):
    from ringenv.realkvm.arch import WriteProgram
    return WriteProgram(writes, frozenset(), frozenset())


def test_x86_a_range_just_past_511_gib_is_the_511_gib_error():  # X1
    """511 GiB of 4 KiB pages is 511 page directories (133955584 pages): one page more needs a
    512th, which the layout has no room for; it is refused by that rule, before any table."""
    from ringenv.realkvm.arch import GuestTooLarge
    from ringenv.realkvm.x86 import X86
    with pytest.raises(GuestTooLarge) as e:
        X86().build_image(511 * 512 * 512 + 1, [_prog([0])])
    assert e.value.part == "range" and "span more than the 511 GiB the fixed x86 guest layout maps" in str(e.value)


def test_x86_names_the_offending_write_offset_and_its_program():  # X2
    from ringenv.realkvm.x86 import X86
    with pytest.raises(ValueError, match=r"^program 1: write offset 70 outside 0\.\.63 "):
        X86().build_image(64, [_prog([1, 2]), _prog([3, 70, 5])])


def test_x86_at_the_most_range_large_tables_are_the_tables_fault_one_page_more_the_ranges():  # X3 X5
    """100463104 pages is the most range that fits beside a one-page write table: there, 3000
    writes (3 pages of table) are the tables' fault; one page of range more, the range's."""
    from ringenv.realkvm.arch import GuestTooLarge
    from ringenv.realkvm.x86 import X86
    big = _prog(list(range(3000)))
    with pytest.raises(GuestTooLarge) as e:
        X86().build_image(100463104, [big])
    assert e.value.part == "tables" and "the write/read tables are too large" in str(e.value)
    with pytest.raises(GuestTooLarge) as e:
        X86().build_image(100463105, [big])
    assert e.value.part == "range" and "the slot range is too large" in str(e.value)


def test_calibrate_out_of_an_existing_file_in_a_directory_it_cannot_create_in_is_refused(monkeypatch, tmp_path):  # K8
    """The profile is written by renaming a temporary file in --out's directory: an existing,
    writable --out is refused up front when that directory takes no new file (root ignores
    permission bits, so TemporaryFile is made to fail as it would there)."""
    import errno

    from ringenv.realkvm import calibrate
    out = tmp_path / "host.yaml"
    out.write_text("old profile\n")

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(calibrate.tempfile, "TemporaryFile", refused)
    with pytest.raises(ValueError, match=r"--out '.*host\.yaml': cannot be written \(Permission denied\)"):
        calibrate.check_out(str(out))
    assert out.read_text() == "old profile\n"


@needs_kvm
def test_a_vcpu_fd_no_vcpu_took_is_closed_by_create_vcpu(monkeypatch):  # I3
    """An interrupt between KVM_CREATE_VCPU and the vCPU object holding the fd (here its
    __init__ raising before it sets ``fd``): create_vcpu closes the fd itself, once."""
    import os

    from ringenv.realkvm import ioctl as k
    closed = []
    real_close = os.close
    monkeypatch.setattr(k.os, "close", lambda fd: closed.append(fd) or real_close(fd))

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    with k.KvmSystem() as system, system.create_vm() as vm:
        monkeypatch.setattr(k.RealVcpu, "__init__", interrupted)
        with pytest.raises(KeyboardInterrupt):
            vm.create_vcpu(0)
        assert len(closed) == 1 and not vm.vcpus
        with pytest.raises(OSError):
            os.fstat(closed[0])  # (closed: no other fd opened since)
