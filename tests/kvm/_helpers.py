"""Small drivers shared by the tests of the simulated kernel side (tests/kvm).

They only sequence the public ioctl-shaped API (``Vm``/``Vcpu``) and the userspace harvest
(``RingReader``), the way QEMU would; expected values are always worked by hand in the tests.
"""

from __future__ import annotations

import numpy as np

from ringenv.config import load_host_profile
from ringenv.guest.trace import TraceProgram
from ringenv.kvm import Vm
from ringenv.kvm import uapi as U
from ringenv.kvm.memory import WP
from ringenv.vmm.reap import RingReader

FOREVER = 1 << 62


class Host:
    """One VM with one logging memslot and a TraceProgram guest, driven step by step.

    ``writes[v]`` are page offsets inside the slot, ``syncs[v]`` write indices after which the
    guest exits (MMIO). Nothing runs until :meth:`enter` is called for a vCPU.
    """

    def __init__(self, writes, syncs=None, *, profile="arm64-4k", entries=256, slot_pages=1024,
                 with_bitmap=None, block_fraction=0.0, slot_id=0, base_gfn=0, eager_chunk=None,
                 write_ns=5, fault_ns=0):
        self.vm = vm = Vm(profile)
        p = vm.profile
        self.profile = p
        vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, entries * 16)
        if with_bitmap is None:
            with_bitmap = p.with_bitmap_supported
        if with_bitmap:
            vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
        if eager_chunk is not None:
            vm.enable_cap(U.KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE, eager_chunk)
        self.slot_id = slot_id
        self.base_gfn = base_gfn
        vm.set_user_memory_region(slot_id, U.KVM_MEM_LOG_DIRTY_PAGES, base_gfn * p.page_size,
                                  slot_pages * p.page_size, block_fraction=block_fraction)
        self.slot = vm.slots[0]
        if syncs is None:
            syncs = [[] for _ in writes]
        self.vcpus = [vm.create_vcpu(i) for i in range(len(writes))]
        self.readers = [RingReader(v.ring_gfns) for v in self.vcpus]
        vm.attach_guest(TraceProgram(writes, syncs, base_gfn=base_gfn, write_ns=write_ns, fault_ns=fault_ns))

    # -- KVM_RUN and time ---------------------------------------------------------------------
    def enter(self, i=0):
        """KVM_RUN on vCPU i: the immediate Exit, or None (the vCPU is in the guest)."""
        return self.vcpus[i].run()

    def run(self):
        """Let the guest run until one vCPU exits; returns that Exit."""
        exits = self.vm.run_until(self.vm.now + FOREVER)
        assert len(exits) == 1, exits
        return exits[0]

    def enter_and_run(self, i=0):
        e = self.enter(i)
        return e if e is not None else self.run()

    # -- userspace harvest + reset -------------------------------------------------------------
    def harvest(self, i=0, limit=None):
        """Reap vCPU i's ring (QEMU kvm_dirty_ring_reap_one): offsets in ring order."""
        _, off = self.readers[i].reap(limit)
        return off.astype(int).tolist()

    def harvest_entries(self, i=0, limit=None):
        s, off = self.readers[i].reap(limit)
        return list(zip(s.astype(int).tolist(), off.astype(int).tolist()))

    def reset(self):
        return self.vm.reset_dirty_rings()

    # -- page state ------------------------------------------------------------------------------
    def gpi(self, offset):
        return self.slot.start + offset

    def wp(self, offset):
        return bool(self.vm.state[self.gpi(offset)] & WP)

    def block_mapped(self, offset):
        """Is the page still mapped by a stage-2 block (not split into pages)?"""
        return block_mapped(self.vm, self.gpi(offset))

    def version(self, offset):
        return int(self.vm.version[self.gpi(offset)])

    def ring_offsets(self, i=0, first=None, count=None):
        """Entries [first, first+count) of the ring by free-running index (default: unharvested)."""
        r = self.vcpus[i].ring
        first = r.reset_index if first is None else first
        count = r.used if count is None else count
        pos = (first + np.arange(count)) & (r.size - 1)
        return r.gfns["offset"][pos].astype(int).tolist()


def profile_without_split(name="arm64-4k"):
    return load_host_profile(name).model_copy(update={"split_blocks": False})


def block_mapped(vm, gpi):
    """Whether global page ``gpi`` is still mapped by a block. The simulator keeps one byte per
    block (``Vm.block_map``: 1 = a block; 0 or 2 = a table of pages); older versions kept a
    BLOCK bit in the page state."""
    if hasattr(vm, "block_map"):
        return int(vm.block_map[gpi // vm.block_pages]) == 1
    from ringenv.kvm import memory

    return bool(vm.state[gpi] & memory.BLOCK)


def any_block_mapped(vm, npages):
    return any(block_mapped(vm, g) for g in range(0, npages, vm.block_pages))
