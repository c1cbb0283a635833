"""ioctl wrappers: numbers, errors, and that every fd and mapping is released, also on errors."""

import errno
import os

import numpy as np
import pytest

from ringenv.realkvm import ioctl as k
from ringenv.realkvm import x86
from ringenv.realkvm.arch import WriteProgram
from ringenv.realkvm.guest import Guest, unavailable_reason

NO_KVM = unavailable_reason()
needs_kvm = pytest.mark.skipif(NO_KVM is not None, reason=str(NO_KVM))
pytestmark = pytest.mark.kvm


def test_ioctl_numbers_match_the_uapi_header():
    # values of the linux/kvm.h macros on x86_64
    assert k.KVM_CREATE_VM == 0xAE01
    assert k.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert k.KVM_GET_DIRTY_LOG == 0x4010AE42
    assert k.KVM_CLEAR_DIRTY_LOG == 0xC018AEC0
    assert k.KVM_ENABLE_CAP == 0x4068AEA3
    assert k.KVM_RESET_DIRTY_RINGS == 0xAEC7
    assert x86.KVM_GET_SUPPORTED_CPUID == 0xC008AE05
    assert x86.KVM_SET_SREGS == 0x4138AE84 and x86.KVM_SET_REGS == 0x4090AE82
    assert x86.KVM_SET_CPUID2 == 0x4008AE90
    assert k.DIRTY_GFN_DTYPE.itemsize == 16


def test_guest_code_branch_targets():
    """The rel8 branches documented in x86.GUEST_CODE land where the comments say."""
    code = x86.GUEST_CODE

    def target(at):
        return at + 2 + int.from_bytes(code[at + 1:at + 2], "little", signed=True)

    assert len(code) == 0x3C
    assert (code[0x03], target(0x03)) == (0x74, 0x37)  # jz done
    assert (code[0x1F], target(0x1F)) == (0x75, 0x27)  # jnz load
    assert (code[0x25], target(0x25)) == (0xEB, 0x2B)  # jmp next
    assert (code[0x30], target(0x30)) == (0x79, 0x00)  # jns top
    assert (code[0x35], target(0x35)) == (0xEB, 0x00)  # jmp top
    assert (code[0x3A], target(0x3A)) == (0xEB, 0x37)  # jmp done
    assert code[0x21:0x25] == bytes.fromhex("4c89040b") and code[0x27:0x2B] == bytes.fromhex("4c8b140b")  # store, load


def _kvm_fds() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "kvm" in target:
            out.append(target)
    return sorted(out)


def _kvm_maps() -> list[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if "kvm" in line]


@pytest.fixture
def no_leaks():
    fds, maps = _kvm_fds(), _kvm_maps()
    yield
    assert _kvm_fds() == fds
    assert _kvm_maps() == maps


@needs_kvm
def test_context_managers_release_everything(no_leaks):
    with k.KvmSystem() as kvm, kvm.create_vm() as vm:
        vm.enable_dirty_ring(256)
        mem = vm.set_user_memory_region(0, k.KVM_MEM_LOG_DIRTY_PAGES, 0, 16 * k.PAGE_SIZE)
        vcpus = [vm.create_vcpu(i) for i in range(2)]
        assert vcpus[0].ring.shape == (256,) and vcpus[0].ring.dtype == k.DIRTY_GFN_DTYPE
        assert len(_kvm_maps()) >= 4  # kvm_run + ring per vCPU
    assert mem.closed and all(v.fd == -1 and v.ring is None for v in vcpus)
    vm.close()  # idempotent


@needs_kvm
def test_errno_is_the_kernels(no_leaks):
    with k.KvmSystem() as kvm, kvm.create_vm() as vm:
        with pytest.raises(OSError) as exc:
            vm.enable_cap(k.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, 2 << 20)
        assert exc.value.errno == errno.E2BIG and "KVM_ENABLE_CAP" in str(exc.value)
        vm.set_user_memory_region(0, 0, 0, 4 * k.PAGE_SIZE)
        with pytest.raises(OSError) as exc:  # overlaps slot 0
            vm.set_user_memory_region(1, 0, 0, 4 * k.PAGE_SIZE)
        assert exc.value.errno == errno.EEXIST
        assert list(vm.memory) == [0]  # the failed slot's mapping was not kept


@needs_kvm
def test_failed_vcpu_mapping_closes_fd_and_maps(no_leaks, monkeypatch):
    def boom(*a, **kw):
        raise MemoryError("injected")

    with k.KvmSystem() as kvm, kvm.create_vm() as vm:
        vm.enable_dirty_ring(256)
        monkeypatch.setattr(k.np, "frombuffer", boom)  # after both mmaps succeeded
        with pytest.raises(MemoryError):
            vm.create_vcpu(0)
        assert vm.vcpus == []


@needs_kvm
@pytest.mark.parametrize("kwargs", [dict(ring_entries=100),
                                    dict(ring_entries=0, with_bitmap=True)])
def test_failed_guest_setup_releases_everything(no_leaks, kwargs):
    with pytest.raises(OSError) as exc:
        Guest([WriteProgram([0])], 4, **kwargs)
    assert exc.value.errno == errno.EINVAL


@needs_kvm
def test_failure_after_vcpus_exist_releases_everything(no_leaks, monkeypatch):
    calls = []

    def setup(self, system, vcpu, image, index):
        calls.append(index)
        if index == 1:
            raise RuntimeError("injected")
        real_setup(self, system, vcpu, image, index)

    real_setup = x86.X86.setup_vcpu
    monkeypatch.setattr(x86.X86, "setup_vcpu", setup)
    with pytest.raises(RuntimeError):
        Guest([WriteProgram([0]), WriteProgram([1])], 4, ring_entries=256)
    assert calls == [0, 1]


@needs_kvm
def test_harvest_marks_reset_and_reset_returns_count(no_leaks):
    with Guest([WriteProgram([3, 1, 3, 2], frozenset({3}))], 8, ring_entries=256) as g:
        assert g.run(0) == ("sync", 4)
        ring = g.vcpus[0].ring
        assert list(ring["flags"][:3]) == [k.KVM_DIRTY_GFN_F_DIRTY] * 3
        assert g.vcpus[0].harvest() == [(1, 3), (1, 1), (1, 2)]  # slot 1, first-write order
        assert list(ring["flags"][:3]) == [k.KVM_DIRTY_GFN_F_DIRTY | k.KVM_DIRTY_GFN_F_RESET] * 3
        assert g.vm.reset_dirty_rings() == 3
        assert list(ring["flags"][:3]) == [0, 0, 0]
        assert g.vm.reset_dirty_rings() == 0
        assert g.run(0) == ("done", 4)
    assert g.vcpus[0].fd == -1  # closed although the test still holds a view of the ring


@needs_kvm
def test_dirty_bitmap_without_ring(no_leaks):
    with Guest([WriteProgram([5, 70, 5], frozenset({2}))], 100) as g:
        assert g.run(0) == ("sync", 3)
        words = g.vm.get_dirty_log(1)
        assert list(k.dirty_pages(words)) == [5, 70]
        assert not k.dirty_pages(g.vm.get_dirty_log(1)).size  # GET cleared and re-protected
        assert words.dtype == np.uint64


def test_read_stats_parses_a_stats_fd(monkeypatch, tmp_path):
    """read_stats (behind RealVm.stats and RealVcpu.stats) on a stats file laid out as the
    kernel's (struct kvm_stats_header, descriptors with names padded to name_size, the data
    block): every one-value statistic by name; a histogram (several values) is left out."""
    import struct

    name_size = 48
    descs = [("pages_4k", 1, 0), ("halt_wait_hist", 4, 8), ("pages_2m", 1, 40)]
    header = struct.pack("<6I", 0, name_size, len(descs), 24, 64, 64 + len(descs) * (16 + name_size))
    blob = bytearray(header.ljust(64, b"\0"))
    for name, count, offset in descs:
        blob += struct.pack("<IhHII", 0, 0, count, offset, 0) + name.encode().ljust(name_size, b"\0")
    blob += struct.pack("<6Q", 528, 1, 2, 3, 4, 2)
    path = tmp_path / "stats"
    path.write_bytes(bytes(blob))
    calls = []

    def fake_ioctl(fd, request, arg=0):
        calls.append((fd, request))
        return os.open(path, os.O_RDONLY)

    monkeypatch.setattr(k, "ioctl", fake_ioctl)
    assert k.read_stats(7) == {"pages_4k": 528, "pages_2m": 2}
    assert calls == [(7, k.KVM_GET_STATS_FD)]


def test_x86_image_maps_the_data_slot_with_2mib_pages_at_an_offset():
    """build_image with data_offset 1 MiB and data_page_size 2 MiB: the slot starts at DATA_GPA
    + 1 MiB (the guest's rbx and the image's data_gpa), and the PD for GiB 1 maps DATA_GPA on
    by 2 MiB pages (PS set) up to the slot's end (1 + 6 MiB: 4 of them), no 4 KiB page table."""
    prog = WriteProgram(list(range(1536)))
    img = x86.X86().build_image(1536, [prog], data_offset=1 << 20, data_page_size=2 << 20)
    assert img.data_gpa == x86.DATA_GPA + (1 << 20) and img.vcpu_state[0].rbx == img.data_gpa
    words = np.frombuffer(img.code, dtype=np.uint64).reshape(-1, 512)
    pd = int(words[3, 1]) & ~0xFFF  # PDPT entry 1 (GiB 1) -> its PD
    entries = words[pd // 4096]
    assert [int(e) for e in entries[:5]] == [x86.DATA_GPA + i * (2 << 20) | 0xE7 for i in range(4)] + [0]
    with pytest.raises(ValueError, match="data_offset"):
        x86.X86().build_image(16, [prog], data_offset=100)
    with pytest.raises(ValueError, match="data_page_size"):
        x86.X86().build_image(16, [prog], data_page_size=1 << 30)
