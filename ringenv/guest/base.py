"""What a guest program gives the simulated host: batches of writes in simulated time.

The host (:class:`ringenv.kvm.Vm`) asks the guest for the writes of its running vCPUs in a time
window, applies them in order until something makes a vCPU leave the guest (its ring is
soft-full, a sync point, the end of the program), and tells the guest how far it got. Anything
the guest proposed beyond that point is withdrawn and proposed again later (a trace) or
re-sampled (a workload model: first writes to clean pages are memoryless, so dropping the
sampled future and drawing it again from the new state is exact in distribution).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

#: ``WriteBatch.exit_after`` codes: what the vCPU does right after this write retires.
EXIT_NONE = 0
EXIT_SYNC = 1  # an MMIO write to an unbacked address: the guest asks userspace to sync
EXIT_DONE = 2  # the program is over: the vCPU exits (MMIO) and is not run again

NO_WRITE = -1  # gfn of an event that is only an exit (no memory write)


@dataclass(slots=True)
class WriteBatch:
    """Writes of the running vCPUs, ordered by (time, vCPU, program order); with ``order``, the
    columns are in sampling order and the events in that order are their entries at
    ``order`` (the host gathers them as it walks; :meth:`ordered` gives the batch gathered).

    ``complete_until`` is the end of the window the batch covers: it holds every write of every
    running vCPU with ``t < complete_until`` and nothing later.
    """

    t: np.ndarray  # int64 ns
    vcpu: np.ndarray  # int32 vCPU index
    gfn: np.ndarray  # int64 guest frame number (base pages of the host), or NO_WRITE
    exit_after: np.ndarray | None  # int8 EXIT_* codes, or None for no exits at all
    complete_until: int
    read: np.ndarray | None = None  # int8, 1 where the access is a read (None: all writes)
    # candidate first writes (a workload model): a write to a page that is not clean is
    # invisible to KVM and the host skips it
    first_touch: bool = False
    order: np.ndarray | None = None  # int64 positions of the events in order (None: as stored)
    # the guest times its accesses after each fault's service time (a trace): the host ends the
    # window after every access that faulted, and the guest proposes the rest again
    fault_cut: bool = False

    def __len__(self) -> int:
        return len(self.t)

    def ordered(self) -> WriteBatch:
        """The batch with its columns in event order (itself if they are)."""
        o = self.order
        if o is None:
            return self
        return WriteBatch(self.t[o], self.vcpu[o], self.gfn[o], None if self.exit_after is None else self.exit_after[o],
                          self.complete_until, None if self.read is None else self.read[o], self.first_touch,
                          fault_cut=self.fault_cut)

    @staticmethod
    def empty(until: int) -> WriteBatch:
        z = np.zeros(0, dtype=np.int64)
        return WriteBatch(z, z.astype(np.int32), z, None, until)


class GuestProgram(ABC):
    """A guest: trace replay or a seeded workload model."""

    nr_vcpus: int

    def attach(self, vm) -> None:
        """Called when the VM starts running; ``vm`` gives page size, slots and the seed."""

    @abstractmethod
    def next_writes(self, now: int, until: int, running: np.ndarray) -> WriteBatch:
        """The writes of the vCPUs with ``running[v]`` in ``[now, until)``, or in a shorter
        window ``[now, complete_until)`` where the guest's behaviour changes (a workload's phase
        ends): the host then asks again from there. ``running`` is the host's own array: read
        it, copy it to keep it."""

    @abstractmethod
    def consumed(self, n: int, t_cut: int, faults_per_vcpu: np.ndarray, retried: np.ndarray,
                 written: int) -> None:
        """The first ``n`` events of the last batch happened; simulated time is now ``t_cut``.
        ``retried[v]`` is True if vCPU v's last consumed write faulted and filled its ring: that
        store has not retired and the host re-executes it at re-entry. ``written`` counts the
        consumed writes that found their page clean (for a workload model: the real first writes)."""

    def resumed(self, vcpu: int, now: int) -> None:
        """vCPU ``vcpu`` re-entered the guest at ``now`` after being out."""

    def window(self, now: int, until: int, running: np.ndarray, room: np.ndarray) -> WriteBatch:
        """The writes of the running vCPUs from ``now`` to a window end of the guest's choosing
        in (now, until], the batch's ``complete_until``: by default :meth:`horizon`'s end,
        then :meth:`next_writes`. The batch may leave its columns unordered and give their
        ``order`` (see :class:`WriteBatch`)."""
        end = min(until, max(now + 1, self.horizon(now, until, running, room)))
        batch = self.next_writes(now, end, running)
        batch.complete_until = min(batch.complete_until, end)
        return batch

    def horizon(self, now: int, until: int, running: np.ndarray, room: np.ndarray) -> int:
        """A window end in (now, until] worth sampling: ``room[v]`` pushes are left before vCPU
        v's ring is soft-full. The default asks for the whole window."""
        return until
