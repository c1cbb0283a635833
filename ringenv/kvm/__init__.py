"""The kernel side of the simulated host, as KVM does it (see docs/reference/kvm-dirty-ring.md).

Nothing here knows about migration or Gymnasium."""

from .ring import DirtyRing, coalesce_reprotect
from .uapi import KvmError, SigBus, UnbackedMapping, kvm_dirty_gfn
from .vm import Exit, Vcpu, Vm

__all__ = ["DirtyRing", "Exit", "KvmError", "SigBus", "UnbackedMapping", "Vcpu", "Vm", "coalesce_reprotect",
           "kvm_dirty_gfn"]
