"""The KVM uAPI the simulator speaks: constants, ``struct kvm_dirty_gfn`` and KVM's errors.

Values are those of Linux ``include/uapi/linux/kvm.h`` (docs/reference/kvm-dirty-ring.md s1).
"""

from __future__ import annotations

import errno as _errno

import numpy as np

# struct kvm_dirty_gfn { __u32 flags; __u32 slot; __u64 offset; }  -- 16 bytes, little endian
kvm_dirty_gfn = np.dtype([("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])
assert kvm_dirty_gfn.itemsize == 16

KVM_DIRTY_GFN_F_DIRTY = 1 << 0
KVM_DIRTY_GFN_F_RESET = 1 << 1
KVM_DIRTY_GFN_F_MASK = 0x3

KVM_DIRTY_RING_RSVD_ENTRIES = 64
KVM_DIRTY_RING_MAX_ENTRIES = 65536
KVM_DIRTY_LOG_PAGE_OFFSET = 64

KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_READONLY_MEM = 81
KVM_CAP_MULTI_ADDRESS_SPACE = 118
KVM_CAP_MAX_VCPU_ID = 128
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223
KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP = 225
KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE = 228
KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES = 229

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

KVM_EXIT_MMIO = 6
KVM_EXIT_INTR = 10
KVM_EXIT_DIRTY_RING_FULL = 31

_IOC_NONE = 0
_KVMIO = 0xAE


def _IO(type_: int, nr: int) -> int:
    return (_IOC_NONE << 30) | (type_ << 8) | nr


KVM_RESET_DIRTY_RINGS = _IO(_KVMIO, 0xC7)
assert KVM_RESET_DIRTY_RINGS == 0xAEC7


class KvmError(OSError):
    """What a failing KVM ioctl returns: ``errno`` is the kernel's (EINVAL, E2BIG, ENXIO, ...)
    and the message names the rule that failed."""

    def __init__(self, err: int, message: str):
        super().__init__(err, f"{_errno.errorcode.get(err, err)}: {message}")
        self.rule = message

    @property
    def errno_name(self) -> str:
        return _errno.errorcode.get(self.errno, str(self.errno))


def einval(message: str) -> KvmError:
    return KvmError(_errno.EINVAL, message)


class SigBus(Exception):
    """A process touched a mapping with nothing behind it: the kernel sends SIGBUS (no errno)."""


class UnbackedMapping:
    """A mapping the kernel granted with no page behind it (KVM_DIRTY_LOG_PAGE_OFFSET of a vCPU
    without a dirty ring): any access, read or write, is SIGBUS, raised as :class:`SigBus`."""

    def __init__(self, what: str):
        self.what = what

    def _bus(self, *_):
        raise SigBus(f"SIGBUS: access to {self.what}")

    __getitem__ = __setitem__ = __array__ = __len__ = __iter__ = _bus
