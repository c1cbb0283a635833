"""The real-KVM tooling at its edges (an audit of 2026-12-03): what the host refuses is a
ConfigError naming the trace field with the errno; the timeout bounds the guest, not building
it; fds are closed once; a host without the dirty ring is "unavailable", so tests skip."""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time

import pytest

from ringenv.config import ConfigError
from ringenv.realkvm import guest as guest_mod
from ringenv.realkvm import ioctl as k
from ringenv.realkvm import replay as kreplay
from ringenv.realkvm.arch import GuestTooLarge, WriteProgram
from ringenv.realkvm.guest import Guest, unavailable_reason
from ringenv.realkvm.x86 import X86

NO_KVM = unavailable_reason()
needs_kvm = pytest.mark.skipif(NO_KVM is not None, reason=str(NO_KVM))
pytestmark = pytest.mark.kvm

TRACE = {"slot_pages": 64, "ring_entries": 256, "reap_scope": "self",
         "vcpus": [{"writes": [1, 2, 3], "syncs": [1]}, {"writes": [10, 11]}]}


def test_a_range_too_large_is_blamed_on_the_range_not_the_tables():
    """100463104 pages is the most the x86 guest layout maps with one vCPU's one access: one
    page more is the range's fault (the tables are one page); the error says so."""
    with pytest.raises(GuestTooLarge) as e:
        X86().build_image(100463105, [WriteProgram([0], frozenset(), frozenset())])
    assert e.value.part == "range" and "maps at most 100463104 pages of range" in str(e.value)
    # past 511 GiB the range is refused before any table is built (offsets up to 2^30 and more)
    with pytest.raises(GuestTooLarge) as e:
        X86().build_image(1 << 30, [WriteProgram([(1 << 30) + 5], frozenset(), frozenset())], unmapped_pages=10)
    assert e.value.part == "range" and "511 GiB" in str(e.value)


@needs_kvm
def test_the_timeout_bounds_the_guest_not_building_it(monkeypatch):
    """Building the guest (page tables, a populated slot) took longer than the timeout: the
    replay still runs (it used to race the deadline and blame the guest)."""
    real = Guest.__init__

    def slow(self, *args, **kwargs):
        real(self, *args, **kwargs)
        time.sleep(1.5)

    monkeypatch.setattr(Guest, "__init__", slow)
    out = kreplay.kvm_replay_trace(TRACE, timeout=1.0)
    assert [v["exits"] for v in out["vcpus"]] == [["sync", "done"], ["done"]]


@needs_kvm
def test_a_populated_slot_larger_than_the_available_memory_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(kreplay, "_available_bytes", lambda: 64 * 4096 - 1)
    with pytest.raises(ConfigError) as e:
        kreplay.kvm_replay_trace(dict(TRACE, populated=True))
    assert str(e.value).startswith("trace.populated: true writes every page of the 64-page slot (262144 bytes), "
                                   "more than the 262143 bytes")
    assert str(e.value).endswith("accepted: false, or a smaller trace.slot_pages")
    assert kreplay.kvm_replay_trace(TRACE)["resets"]  # not populated: runs


@needs_kvm
@pytest.mark.parametrize("faults, refused_from, which", [
    (False, 1, "vCPU 1 of 2"),  # the second program vCPU
    (True, 1, "warm-up vCPU 1 of 2"),  # a warm-up vCPU (was a raw errno, exit 1)
    (True, 3, "vCPU 1 of 2"),  # the programs' after the two warm-up ones
])
def test_vcpus_the_host_refuses_name_the_field_the_doubling_and_the_maximum(monkeypatch, faults, refused_from,
                                                                          which):
    real = k.RealVm.create_vcpu

    def create(self, vcpu_id):
        if vcpu_id >= refused_from:
            raise OSError(errno.EINVAL, "KVM_CREATE_VCPU: Invalid argument")
        return real(self, vcpu_id)

    monkeypatch.setattr(k.RealVm, "create_vcpu", create)
    with pytest.raises(ConfigError) as e:
        kreplay.kvm_replay_trace(TRACE, faults=faults)
    msg = str(e.value)
    assert msg.startswith("trace.vcpus: 2 vCPUs is refused by KVM_CREATE_VCPU on this host") and which in msg
    assert ("--faults doubles them (a warm-up vCPU per program): 4 in all" in msg) == faults
    assert "EINVAL" in msg and "; accepted: at most " in msg and "vCPUs in a VM (KVM_CAP_MAX_VCPUS)" in msg


@needs_kvm
def test_a_slot_the_host_cannot_back_names_slot_pages(monkeypatch):
    """mmap ENOMEM (overcommit disabled, an RLIMIT_AS) for the data slot: a ConfigError, not a
    bare '[Errno 12]' with exit 1."""
    real = mmap.mmap

    def refusing(fd, length, *args, **kwargs):
        if fd == -1 and length == TRACE["slot_pages"] * k.PAGE_SIZE:
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        return real(fd, length, *args, **kwargs)

    monkeypatch.setattr(k.mmap, "mmap", refusing)
    with pytest.raises(ConfigError) as e:
        kreplay.kvm_replay_trace(TRACE)
    assert str(e.value).startswith("trace.slot_pages: 64 pages cannot be backed on this host: ")
    assert "262144-byte memory of memslot 1 could not be mapped" in str(e.value)


@needs_kvm
def test_a_kvm_without_the_dirty_ring_is_unavailable_so_tests_skip(monkeypatch):
    monkeypatch.setattr(k.RealVm, "check_extension", lambda self, cap: 0)
    why = unavailable_reason()
    assert why and "no dirty ring" in why and "KVM_CAP_DIRTY_LOG_RING" in why


@needs_kvm
def test_the_plain_ring_is_used_where_the_acq_rel_cap_reports_0(monkeypatch):
    """x86 kernels 5.11-6.0 have KVM_CAP_DIRTY_LOG_RING (192) only: the ring is enabled by it."""
    real = k.RealVm.check_extension
    monkeypatch.setattr(k.RealVm, "check_extension",
                        lambda self, cap: 0 if cap == k.KVM_CAP_DIRTY_LOG_RING_ACQ_REL else real(self, cap))
    enabled = []
    real_enable = k.RealVm.enable_cap
    monkeypatch.setattr(k.RealVm, "enable_cap", lambda self, cap, *a: enabled.append(cap) or real_enable(self, cap, *a))
    with k.KvmSystem() as system, system.create_vm() as vm:
        assert vm.enable_dirty_ring(256) == k.KVM_CAP_DIRTY_LOG_RING
    assert enabled == [k.KVM_CAP_DIRTY_LOG_RING]


@needs_kvm
def test_a_vcpu_whose_setup_fails_has_its_fd_closed_once(monkeypatch):
    closed = []
    real_close = os.close
    monkeypatch.setattr(k.os, "close", lambda fd: closed.append(fd) or real_close(fd))
    real_mmap = mmap.mmap

    def failing(fd, length, *args, **kwargs):
        if fd != -1:  # kvm_run's mapping of the vCPU fd
            raise OSError(errno.ENOMEM, "no kvm_run for you")
        return real_mmap(fd, length, *args, **kwargs)

    with k.KvmSystem() as system, system.create_vm() as vm:
        monkeypatch.setattr(k.mmap, "mmap", failing)
        with pytest.raises(OSError, match="no kvm_run for you"):
            vm.create_vcpu(0)
        monkeypatch.setattr(k.mmap, "mmap", real_mmap)
        assert len(closed) == 1 and not vm.vcpus  # (a second close could hit another thread's new fd)


@needs_kvm
def test_a_kick_between_the_check_and_kvm_run_stops_the_vcpu():
    """kick() sets kvm_run.immediate_exit: a kick that lands after run() checked ``kicked`` and
    before KVM_RUN makes KVM_RUN return at once (EINTR), and run() raises VcpuKicked; without
    it the vCPU would enter the guest (here an unset-up vCPU, which exits with some reason)."""
    with k.KvmSystem() as system, system.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        real_ioctl = k.ioctl

        def racing(fd, request, *args):
            if request == k.KVM_RUN and not vcpu.kicked:
                vcpu.kick()  # the race: after the check, before the ioctl
            return real_ioctl(fd, request, *args)

        k.ioctl = racing
        try:
            with pytest.raises(k.VcpuKicked):
                vcpu.run()
        finally:
            k.ioctl = real_ioctl


@needs_kvm
def test_short_bitmaps_and_ringless_harvests_are_clear_errors():
    with k.KvmSystem() as system, system.create_vm() as vm:
        with pytest.raises(ValueError, match=r"bitmap: 1 uint64 words hold 64 bits, fewer than num_pages 4096; "
                                             r"accepted: at least 64 words"):
            vm.clear_dirty_log(0, 0, 4096, k.np.zeros(1, dtype=k.np.uint64))
        vcpu = vm.create_vcpu(0)
        with pytest.raises(ValueError, match="vCPU 0: no dirty ring to harvest"):
            vcpu.harvest()


@needs_kvm
def test_a_huge_warm_up_timeout_is_no_thread_traceback(monkeypatch):
    errors = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    out = kreplay.kvm_replay_trace(TRACE, timeout=1e20, faults=True)
    assert not errors and out["faults"] >= 0


def test_the_guest_module_names_the_caps_it_checks():
    assert guest_mod.KVM_CAP_DIRTY_LOG_RING == 192 and guest_mod.KVM_CAP_DIRTY_LOG_RING_ACQ_REL == 223
    assert k.KVM_CAP_MAX_VCPUS == 66  # linux/kvm.h
