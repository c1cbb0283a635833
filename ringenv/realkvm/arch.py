"""What an architecture module must provide to run write programs on the real KVM.

The guest is the same on every architecture: it performs a list of page accesses in order
(a store, or a load where the program marks one as a read), exits to userspace with an MMIO
write to ``image.sync_gpa`` after each access marked as a sync point (data = number of
accesses done so far), and finally writes to ``image.done_gpa``. A page offset at or past the
data slot's end (up to ``unmapped_pages`` more) is an address no memslot maps: the guest's
page tables map it all the same, so the access is an MMIO exit.
Only the machine code, the guest page tables and the vCPU register set-up differ.

``x86.X86`` implements this for x86-64 (the host this project validates on today). An arm64
module would implement the same protocol: ``setup_vcpu`` with KVM_ARM_PREFERRED_TARGET +
KVM_ARM_VCPU_INIT and KVM_SET_ONE_REG for PC, SP and argument registers, and the dirty ring
enabled with ACQ_REL plus WITH_BITMAP (arm64 offers no plain DIRTY_LOG_RING).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence


@dataclass(frozen=True)
class WriteProgram:
    """One vCPU's program: page offsets (from the data slot's start) in order, the indices of
    those accesses after which the guest exits (sync), and of those that are loads, not
    stores (reads)."""

    writes: Sequence[int]
    syncs: frozenset[int] = frozenset()
    reads: frozenset[int] = frozenset()


class GuestTooLarge(ValueError):
    """The guest does not fit the architecture's fixed guest layout; ``part`` says what is too
    large: "range" (the slot range, the data and unmapped pages the guest's page tables map) or
    "tables" (the vCPUs' write/read tables, the programs' accesses); the message gives the
    sizes and the limit."""

    def __init__(self, message: str, part: str = "range"):
        super().__init__(message)
        self.part = part


@dataclass
class GuestImage:
    """Guest memory layout and contents, produced by ``Arch.build_image``.

    The code slot (at ``code_gpa``, not dirty-logged) holds code, page tables, stacks and the
    write tables; ``code`` is its full initial contents. The data slot (``data_pages`` pages at
    ``data_gpa``) is the dirty-logged one. ``sync_gpa``/``done_gpa`` are unbacked (MMIO).
    """

    code_gpa: int
    code: bytes
    data_gpa: int
    data_pages: int
    sync_gpa: int
    done_gpa: int
    vcpu_state: list[Any] = field(default_factory=list)  # arch-specific, one per program


class Arch(Protocol):
    name: str
    #: extra ring entries the kernel reserves on top of the 64 (x86 with PML: 512)
    extra_reserved_entries: int

    def build_image(self, data_pages: int, programs: Sequence[WriteProgram],
                    unmapped_pages: int = 0, *, data_offset: int = 0,
                    data_page_size: int = 4096) -> GuestImage:
        """Lay out code, page tables (the data slot and ``unmapped_pages`` pages past it) and
        per-vCPU write tables. The data slot starts ``data_offset`` bytes past the
        architecture's data base (a guest-physical block boundary), and the guest's own tables
        map it with pages of ``data_page_size`` (the base page, or a 2 MiB block)."""

    def setup_vcpu(self, system, vcpu, image: GuestImage, index: int) -> None:
        """Put ``vcpu`` at the start of program ``index`` (registers, mode, CPUID...)."""

    def profile_name(self) -> str:
        """Name of the simulator host profile matching this host (e.g. "x86-nopml")."""


def host_arch() -> Arch:
    """The Arch for the machine we run on."""
    machine = platform.machine()
    if machine in ("x86_64", "AMD64"):
        from ringenv.realkvm.x86 import X86
        return X86()
    raise NotImplementedError(
        f"no real-KVM guest for {machine!r} yet: add a module implementing "
        "ringenv.realkvm.arch.Arch (arm64: KVM_ARM_VCPU_INIT, KVM_SET_ONE_REG)")
