"""x86-64 guest for the real-KVM cross-check: 64-bit long mode, CPL3, own 4-level tables.

Only this mode runs natively on the project's (nested, PVM-based) hosts; 32-bit and CPL0
guests are emulated and push an entry per write, which breaks the ring (real-kvm-host.md).

Guest-physical (= guest-virtual, identity mapped) layout:

    0x0000_0000  code slot, not dirty-logged, mapped with 2 MiB pages:
                 page 1 code, 2 PML4, 3 PDPT, 4 PD for GiB 0, then PDs and 4K page
                 tables for the data slot, one stack page per vCPU, the write tables
    0x3000_0000  unbacked: +0 sync MMIO, +8 done MMIO (one 2 MiB mapping)
    0x4000_0000  data slot, dirty-logged, mapped with 4 KiB pages (user, writable); the
                 unmapped pages right after it are mapped by the guest's tables too, but by
                 no memslot: a store there is an MMIO exit. (``build_image`` can also put the
                 slot further up, and map it with 2 MiB pages: the stage-2 block checks.)

All page-table entries have A and D preset, so the CPU never writes to the tables.
"""

from __future__ import annotations

import ctypes
import errno
import functools
from typing import Sequence

import numpy as np

from ringenv.realkvm.arch import GuestImage, GuestTooLarge, WriteProgram
from ringenv.realkvm.ioctl import IOCTL_NAMES, KVMIO, PAGE_SIZE, _IOR, _IOW, _IOWR, ioctl

# --- x86 structs and ioctls (asm/kvm.h) ---
class kvm_regs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split())]


class kvm_segment(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint32),
                ("selector", ctypes.c_uint16)] + [
        (name, ctypes.c_uint8) for name in
        "type present dpl db s l g avl unusable padding".split()]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16),
                ("padding", ctypes.c_uint16 * 3)]


class kvm_sregs(ctypes.Structure):
    _fields_ = [(name, kvm_segment) for name in "cs ds es fs gs ss tr ldt".split()] + [
        ("gdt", kvm_dtable), ("idt", kvm_dtable)] + [
        (name, ctypes.c_uint64) for name in "cr0 cr2 cr3 cr4 cr8 efer apic_base".split()] + [
        ("interrupt_bitmap", ctypes.c_uint64 * 4)]


CPUID_ENTRY_SIZE = 40  # struct kvm_cpuid_entry2
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, 8)  # struct kvm_cpuid2 header: nent, padding
KVM_GET_REGS = _IOR(KVMIO, 0x81, ctypes.sizeof(kvm_regs))
KVM_SET_REGS = _IOW(KVMIO, 0x82, ctypes.sizeof(kvm_regs))
KVM_GET_SREGS = _IOR(KVMIO, 0x83, ctypes.sizeof(kvm_sregs))
KVM_SET_SREGS = _IOW(KVMIO, 0x84, ctypes.sizeof(kvm_sregs))
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, 8)
IOCTL_NAMES.update({v: k for k, v in list(globals().items()) if k.startswith("KVM_")})

# --- the guest program ---
# Registers at entry: rsi = this vCPU's table of u32 entries (bits 0-29 page offset, bit 30
# "a load, not a store", bit 31 "sync after this access"), r9 = number of entries, rbx = data
# slot base, rdx = sync MMIO address, rdi = done MMIO address, r8 = 0 (accesses done).
GUEST_CODE = bytes.fromhex("".join([
    "4d85c9",          # 00 top:  test r9, r9            ; entries left?
    "7432",            # 03       jz   done (+0x32 -> 37)
    "8b06",            # 05       mov  eax, [rsi]        ; load the entry
    "4883c604",        # 07       add  rsi, 4
    "89c1",            # 0b       mov  ecx, eax
    "81e1ffffff3f",    # 0d       and  ecx, 0x3fffffff   ; page offset
    "48c1e10c",        # 13       shl  rcx, 12           ; * 4096
    "49ffc0",          # 17       inc  r8                ; accesses done, this one included
    "a900000040",      # 1a       test eax, 0x40000000   ; bit 30 = a load?
    "7506",            # 1f       jnz  load (+6 -> 27)
    "4c89040b",        # 21       mov  [rbx+rcx], r8     ; THE STORE into the data slot
    "eb04",            # 25       jmp  next (+4 -> 2b)
    "4c8b140b",        # 27 load: mov  r10, [rbx+rcx]    ; THE LOAD from the data slot
    "49ffc9",          # 2b next: dec  r9
    "85c0",            # 2e       test eax, eax          ; bit 31 = sync point?
    "79ce",            # 30       jns  top (-0x32 -> 00)
    "448902",          # 32       mov  [rdx], r8d        ; MMIO write: sync exit
    "ebc9",            # 35       jmp  top (-0x37 -> 00)
    "448907",          # 37 done: mov  [rdi], r8d        ; MMIO write: done exit
    "ebfb",            # 3a       jmp  done
]))

CODE_GPA = 0
DATA_GPA = 1 << 30
MMIO_GPA = 0x3000_0000
SYNC_GPA, DONE_GPA = MMIO_GPA, MMIO_GPA + 8
SYNC_FLAG = 1 << 31
LOAD_FLAG = 1 << 30

_PAGE_CODE, _PAGE_PML4, _PAGE_PDPT, _PAGE_PD0 = 1, 2, 3, 4
# Page-table entry bits: present, writable, user, accessed, dirty, 2 MiB page.
_P, _RW, _US, _A, _D, _PS = 0x1, 0x2, 0x4, 0x20, 0x40, 0x80
_TABLE = _P | _RW | _US | _A
_LEAF = _TABLE | _D
_HUGE = _LEAF | _PS
_HUGE_SIZE = 2 << 20

# Mode set-up (real-kvm-host.md): long mode, paging, user segments.
EFER = 0xD01               # SCE | LME | LMA | NXE
CR0 = 0x80050033           # PG | AM | WP | NE | ET | MP | PE
CR4_PAE = 0x20
USER_CS, USER_DS = 0x33, 0x2B


def _pages(nbytes: int) -> int:
    return max(1, -(-nbytes // PAGE_SIZE))


def _tables(programs: Sequence[WriteProgram], pages: int) -> list[np.ndarray]:
    tables = []
    for i, prog in enumerate(programs):
        table = np.asarray(prog.writes, dtype=np.int64)
        if table.size and (table.min() < 0 or table.max() >= min(pages, LOAD_FLAG)):
            bad = int(table[(table < 0) | (table >= min(pages, LOAD_FLAG))][0])
            raise ValueError(f"program {i}: write offset {bad} outside 0..{min(pages, LOAD_FLAG) - 1} (the slot and "
                             "unmapped pages; bits 30 and 31 of an entry mark a load and a sync)")
        flags = np.zeros(table.size, dtype=np.uint32)
        for name, indices, flag in (("sync", prog.syncs, SYNC_FLAG), ("read", prog.reads, LOAD_FLAG)):
            at = np.asarray(sorted(indices), dtype=np.int64)
            if at.size and (at[0] < 0 or at[-1] >= table.size):
                raise ValueError(f"{name} indices must be write indices")
            flags[at] |= flag
        table = table.astype(np.uint32) | flags
        tables.append(table)
    return tables


def _max_span(room: int, data_page_size: int) -> int:
    """The most pages from DATA_GPA the guest's own tables can map with ``room`` pages for its
    page directories and page tables (one page directory per GiB, 511 at most)."""
    if data_page_size != PAGE_SIZE:  # 2 MiB leaves in the page directories
        return max(0, min(room, 511)) * 512 * 512
    n_pt = max(0, min(room * 512 // 513, 511 * 512))
    while n_pt and n_pt + -(-n_pt // 512) > room:
        n_pt -= 1
    return n_pt * 512


class X86:
    """x86-64 implementation of ``ringenv.realkvm.arch.Arch``."""

    name = "x86_64"

    @functools.cached_property
    def has_pml(self) -> bool:
        """PML (Intel VMX page-modification logging) is on: 512 more reserved ring entries."""
        try:
            with open("/sys/module/kvm_intel/parameters/pml") as f:
                return f.read().strip() in ("Y", "1")
        except OSError:
            return False

    @property
    def extra_reserved_entries(self) -> int:
        return 512 if self.has_pml else 0

    def profile_name(self) -> str:
        return "x86-pml" if self.has_pml else "x86-nopml"

    def build_image(self, data_pages: int, programs: Sequence[WriteProgram],
                    unmapped_pages: int = 0, *, data_offset: int = 0,
                    data_page_size: int = PAGE_SIZE) -> GuestImage:
        """See ``Arch.build_image``. The data slot starts ``data_offset`` bytes past DATA_GPA
        (a multiple of the page, below 1 GiB), and the guest maps it (from DATA_GPA on) with
        pages of ``data_page_size``: 4 KiB (user page tables in the code slot) or 2 MiB (PDEs
        with PS set; the memory between DATA_GPA and the slot is mapped too, and in no memslot).
        A host that shadows the guest's page tables (shadow paging: kvm_pvm, or any x86 host
        without EPT/NPT) never maps a guest page by a larger leaf than the guest's own page
        (FNAME(page_fault) caps the level at the guest walk's), so a stage-2 block needs 2 MiB
        here; with EPT/NPT the guest's page size does not matter."""
        if data_pages < 1 or unmapped_pages < 0:
            raise ValueError("data_pages must be >= 1, unmapped_pages >= 0")
        if data_offset % PAGE_SIZE or not 0 <= data_offset < DATA_GPA:
            raise ValueError(f"data_offset must be a multiple of {PAGE_SIZE} in [0, {DATA_GPA:#x})")
        if data_page_size not in (PAGE_SIZE, _HUGE_SIZE):
            raise ValueError(f"data_page_size must be {PAGE_SIZE} or {_HUGE_SIZE}")
        mapped = data_pages + unmapped_pages  # pages the guest's own tables map
        span = data_offset // PAGE_SIZE + mapped  # pages from DATA_GPA to the last one mapped
        n_leaf = span if data_page_size == PAGE_SIZE else -(-span // 512)  # leaf entries
        n_pt = -(-n_leaf // 512) if data_page_size == PAGE_SIZE else 0
        n_pd = -(-(n_pt or n_leaf) // 512)
        limit = MMIO_GPA // PAGE_SIZE  # pages of the code slot: it ends below the MMIO page
        if n_pd > 511:  # (before the tables: no offset in such a range fits their 30 bits)
            most = _max_span(limit, data_page_size) - data_offset // PAGE_SIZE
            raise GuestTooLarge(f"the slot range is too large: {mapped} pages (data and unmapped) span more than the "
                                f"511 GiB the fixed x86 guest layout maps; at most {most} pages of range", part="range")
        tables = _tables(programs, mapped)
        first_pd = _PAGE_PD0 + 1
        first_pt = first_pd + n_pd
        first_stack = first_pt + n_pt
        table_pages, page = [], first_stack + len(programs)
        for table in tables:
            table_pages.append(page)
            page += _pages(table.nbytes)
        code_bytes = -(-page * PAGE_SIZE // _HUGE_SIZE) * _HUGE_SIZE
        fixed, n_table = first_pd + len(programs), page - first_stack - len(programs)  # code, top tables, stacks
        most = max(0, _max_span(limit - fixed - n_table, data_page_size) - data_offset // PAGE_SIZE)
        # the range is what is too large if it does not fit even beside the smallest tables (a
        # page per program), the tables otherwise
        least_tables = len(programs)
        range_alone = mapped <= _max_span(limit - fixed - least_tables, data_page_size) - data_offset // PAGE_SIZE
        if fixed + n_pd + n_pt > limit or (code_bytes > MMIO_GPA and not range_alone):
            raise GuestTooLarge(
                f"the slot range is too large: {mapped} pages (data and unmapped) need {n_pd + n_pt} pages of "
                f"guest page tables; the fixed x86 guest layout maps at most {most} pages of range (below 512 "
                f"GiB, and its page tables must fit with code and stacks ({fixed} pages) and write/read tables "
                f"({n_table}) in the {limit} pages below the MMIO page at {MMIO_GPA:#x})", part="range")
        if code_bytes > MMIO_GPA:
            room = limit - fixed - n_pd - n_pt
            raise GuestTooLarge(
                f"the write/read tables are too large: the {sum(t.size for t in tables)} accesses of the "
                f"{len(programs)} vCPU programs need {n_table} pages (4 bytes an access); with the page tables "
                f"of the {mapped}-page slot range ({n_pd + n_pt} pages), code and stacks ({fixed}) that is "
                f"{page} pages, more than the {limit} pages below the MMIO page at {MMIO_GPA:#x}: room for "
                f"{room} pages of tables (at most {room * PAGE_SIZE // 4} accesses) with this slot range",
                part="tables")

        mem = np.zeros(code_bytes // 8, dtype=np.uint64)
        words = mem.reshape(-1, PAGE_SIZE // 8)  # one row per page
        u8 = mem.view(np.uint8)
        u8[_PAGE_CODE * PAGE_SIZE:][:len(GUEST_CODE)] = np.frombuffer(GUEST_CODE, np.uint8)
        words[_PAGE_PML4, 0] = _PAGE_PDPT * PAGE_SIZE | _TABLE
        words[_PAGE_PDPT, 0] = _PAGE_PD0 * PAGE_SIZE | _TABLE
        words[_PAGE_PDPT, 1:1 + n_pd] = np.arange(first_pd, first_pd + n_pd) * PAGE_SIZE | _TABLE
        huge = np.arange(code_bytes // _HUGE_SIZE, dtype=np.uint64)
        words[_PAGE_PD0, :huge.size] = huge * _HUGE_SIZE | _HUGE
        words[_PAGE_PD0, MMIO_GPA // _HUGE_SIZE] = MMIO_GPA | _HUGE
        pd_flat = words[first_pd:first_pd + n_pd].reshape(-1)
        if n_pt:
            pd_flat[:n_pt] = np.arange(first_pt, first_pt + n_pt, dtype=np.uint64) * PAGE_SIZE | _TABLE
            pt_flat = words[first_pt:first_pt + n_pt].reshape(-1)
            pt_flat[:span] = DATA_GPA + np.arange(span, dtype=np.uint64) * PAGE_SIZE | _LEAF
        else:
            pd_flat[:n_leaf] = DATA_GPA + np.arange(n_leaf, dtype=np.uint64) * _HUGE_SIZE | _HUGE
        data_gpa = DATA_GPA + data_offset
        states = []
        for i, (table, tpage) in enumerate(zip(tables, table_pages)):
            u8[tpage * PAGE_SIZE:][:table.nbytes] = table.view(np.uint8)
            states.append(kvm_regs(
                rip=CODE_GPA + _PAGE_CODE * PAGE_SIZE, rflags=0x2,
                rsp=CODE_GPA + (first_stack + i + 1) * PAGE_SIZE,
                rsi=CODE_GPA + tpage * PAGE_SIZE, r9=table.size,
                rbx=data_gpa, rdx=SYNC_GPA, rdi=DONE_GPA, r8=0))
        return GuestImage(code_gpa=CODE_GPA, code=mem.tobytes(), data_gpa=data_gpa,
                          data_pages=data_pages, sync_gpa=SYNC_GPA, done_gpa=DONE_GPA,
                          vcpu_state=states)

    def setup_vcpu(self, system, vcpu, image: GuestImage, index: int) -> None:
        """KVM_SET_CPUID2 (supported CPUID), KVM_SET_SREGS (long mode, CPL3), KVM_SET_REGS."""
        ioctl(vcpu.fd, KVM_SET_CPUID2, supported_cpuid(system.fd))
        sregs = kvm_sregs()
        ioctl(vcpu.fd, KVM_GET_SREGS, sregs)
        code = dict(base=0, limit=0xFFFFFFFF, selector=USER_CS, type=11, present=1, dpl=3,
                    db=0, s=1, l=1, g=1)
        data = dict(code, selector=USER_DS, type=3, db=1, l=0)
        sregs.cs = kvm_segment(**code)
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(sregs, name, kvm_segment(**data))
        sregs.cr0, sregs.cr3 = CR0, image.code_gpa + _PAGE_PML4 * PAGE_SIZE
        sregs.cr4, sregs.efer = CR4_PAE, EFER
        ioctl(vcpu.fd, KVM_SET_SREGS, sregs)
        ioctl(vcpu.fd, KVM_SET_REGS, image.vcpu_state[index])


_supported_cpuid: bytes | None = None


def supported_cpuid(system_fd: int) -> bytearray:
    """KVM_GET_SUPPORTED_CPUID as a struct kvm_cpuid2 buffer, ready for KVM_SET_CPUID2."""
    global _supported_cpuid
    nent = 64
    while _supported_cpuid is None:
        buf = bytearray(8 + nent * CPUID_ENTRY_SIZE)
        buf[0:4] = nent.to_bytes(4, "little")
        try:
            ioctl(system_fd, KVM_GET_SUPPORTED_CPUID, buf)
            _supported_cpuid = bytes(buf)
        except OSError as exc:
            if exc.errno != errno.E2BIG:
                raise
            nent *= 2
    return bytearray(_supported_cpuid)
