"""Tests from a mutation run over session 35's changes (45 hand-written mutants: 32 killed as the
suite stood; each test here kills one of the survivors, ids in the comments; G2, the timer's
kick-then-set window, has a test of its own added later; E2, E5 and E6,
Ctrl-C, the upper --workers bound and the pool's size in evaluate, are cases of
tests/agents/test_agent_units.py's cancel test): ring_entries 0 with the bitmap collector, what
meta.json's model digest covers, the agents' results written atomically, calibrate's per-run
bound, demo's significant digits, the MADV_NOHUGEPAGE advice of a slot without huge pages, and
the guest released when the warm-up took the whole timeout."""

from __future__ import annotations

import os
import time
import types

import pytest

from ringenv.config import ConfigError, load_scenario

def _kvm_reason():
    from ringenv.realkvm.guest import unavailable_reason
    return unavailable_reason()


needs_kvm = pytest.mark.skipif(_kvm_reason() is not None, reason=str(_kvm_reason()))


def test_ring_entries_0_with_the_bitmap_collector_is_refused():  # C4
    with pytest.raises(ConfigError, match=r"ring_entries: 0; accepted: more than 0 \(not used by collector bitmap\)"):
        load_scenario("default", collector="bitmap", ring_entries=0)


def test_the_model_digest_covers_the_statistics_and_the_run_record(tmp_path):  # D3
    from agents.evaluate import _model_digest
    (tmp_path / "best_model.zip").write_bytes(b"model")
    (tmp_path / "best_model_vecnormalize.pkl").write_bytes(b"stats")
    (tmp_path / "args.json").write_text("{}")
    d0 = _model_digest(str(tmp_path))
    (tmp_path / "best_model_vecnormalize.pkl").write_bytes(b"stats2")
    d1 = _model_digest(str(tmp_path))
    (tmp_path / "args.json").write_text('{"seed": 1}')
    d2 = _model_digest(str(tmp_path))
    assert len({d0, d1, d2}) == 3


def test_the_results_and_the_run_record_are_written_atomically(monkeypatch, tmp_path):  # A1 A2 A3
    import agents.evaluate as ev
    import agents.train as tr
    from ringenv.config import write_atomically
    seen = []

    def spy(path, text):
        seen.append(os.path.basename(path))
        write_atomically(path, text)

    monkeypatch.setattr(ev, "write_atomically", spy)
    monkeypatch.setattr(tr, "write_atomically", spy)
    rec = {"spec": "qemu", "workload": "idle", "seed": 1, "reward": 1.0}
    ev.write_results(tmp_path / "out", [rec], [{"policy": "qemu", "reward": 1.0}], {"x": 1})
    tr._write_record(tmp_path, {"finished": True})
    assert sorted(seen) == ["args.json", "episodes.csv", "meta.json", "summary.csv"]


def test_calibrate_bounds_a_run_generously(monkeypatch):  # K1
    from ringenv.realkvm import calibrate
    got = []

    class T:

        def __init__(self, interval, fn):
            got.append(interval)
        daemon = False

        def start(self): pass

        def cancel(self): pass

    monkeypatch.setattr(calibrate.threading, "Timer", T)
    guest = types.SimpleNamespace(run=lambda i: ("sync", None), kick_all=lambda: None)
    calibrate._run_to(guest, "sync")
    assert got and got[0] >= 60  # a nested, loaded host takes over 10 s for one run


def test_demo_wall_s_keeps_3_significant_digits(monkeypatch):  # K3
    from ringenv import demo
    clock = iter([100.0, 100.000123456])
    monkeypatch.setattr(demo, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    out = demo.host_demo(seconds=0.05, nr_vcpus=1, mem_gib=1)
    assert out["wall_s"] == pytest.approx(0.000123, rel=1e-9)


@needs_kvm
def test_a_slot_without_huge_pages_is_madvised_nohugepage():  # K2
    from ringenv.realkvm import ioctl as k
    with k.KvmSystem() as kvm, kvm.create_vm() as vm:
        mem = vm.set_user_memory_region(0, 0, 0, 512 * k.PAGE_SIZE)
        addr = k.address_of(mem)
        flags = None
        with open("/proc/self/smaps") as f:
            cur = None
            for line in f:
                head = line.split()[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    cur = lo <= addr < hi
                elif cur and line.startswith("VmFlags:"):
                    flags = line.split()[1:]
        assert flags is not None and "nh" in flags, flags


#: a two-vCPU trace for the /dev/kvm replays
KTRACE = {"slot_pages": 64, "ring_entries": 256, "reap_scope": "self",
          "vcpus": [{"writes": [1, 2, 3], "syncs": [1]}, {"writes": [10, 11]}]}


@needs_kvm
def test_a_warm_up_that_took_all_the_timeout_releases_the_guest(monkeypatch):  # R3
    from ringenv.realkvm import replay as kreplay
    from ringenv.realkvm.guest import Guest
    real = Guest._warm_up


    def slow(self, *a, **kw):
        real(self, *a, **kw)
        time.sleep(1.2)

    monkeypatch.setattr(Guest, "_warm_up", slow)
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(TimeoutError, match="nothing left") as e:
        kreplay.kvm_replay_trace(KTRACE, timeout=1.0, faults=True)
    # e keeps the traceback (and a guest it did not close) alive: only a closed guest is released
    assert len(os.listdir("/proc/self/fd")) == fds, e.value


@needs_kvm
def test_a_vcpu_made_while_the_warm_up_timer_fires_is_kicked(monkeypatch):  # G2
    """The timer sets ``expired`` before it reads the warm-up vCPUs to kick: a vCPU added
    between the two is either in the list it reads or sees ``expired`` set and kicks itself.
    Here the timer fires before the first vCPU exists and its ``set`` is held until the
    creating thread has checked ``expired``: with set-then-kick the timer's list then holds
    vCPU 0 and the warm-up stops at vCPU 0; kick-then-set read an empty list, vCPU 0 ran
    unkicked, and the timeout only caught vCPU 1."""
    import threading
    import types

    from ringenv.realkvm import guest as guest_mod
    from ringenv.realkvm import ioctl as k
    from ringenv.realkvm import replay as kreplay
    entered, checked = threading.Event(), threading.Event()

    class Held(threading.Event):
        def __init__(self):
            super().__init__()
            self.creator = threading.get_ident()

        def set(self):
            entered.set()
            checked.wait(10)
            super().set()

        def is_set(self):
            was = super().is_set()
            if threading.get_ident() == self.creator:
                checked.set()
            return was

    monkeypatch.setattr(guest_mod, "threading", types.SimpleNamespace(
        Event=Held, Timer=threading.Timer, TIMEOUT_MAX=threading.TIMEOUT_MAX))
    real = k.RealVm.create_vcpu

    def create(self, vcpu_id):
        assert entered.wait(10), "the warm-up timer did not fire"
        return real(self, vcpu_id)

    monkeypatch.setattr(k.RealVm, "create_vcpu", create)
    with pytest.raises(TimeoutError, match=r"warm-up \(vCPU 0 of 2\) did not finish"):
        kreplay.kvm_replay_trace(KTRACE, timeout=0.001, faults=True)
    assert checked.is_set()
