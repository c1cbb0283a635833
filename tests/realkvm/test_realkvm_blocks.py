"""Stage-2 huge mappings on the real KVM against the simulator: where blocks go, and how dirty
logging takes them apart.

A real guest writes every 4 KiB page of a data memslot backed by transparent huge pages; the
VM's binary statistics (KVM_GET_STATS_FD on the VM fd: pages_4k, pages_2m, the leaf mappings of
each size in KVM's MMU now) then say how KVM mapped it. The simulator (``ringenv.kvm.Vm`` on
this host's profile, the same slot, the same writes, ``block_fraction=1.0``) predicts the same
counts with ``Memslot.leaf_mappings``: the tests assert that the real counts are the
simulator's.

- KVM maps a 2 MiB guest-physical block by one leaf only if the block lies wholly inside the
  memslot (x86 kvm_alloc_memslot_metadata disallows large pages in a slot's partial first and
  last large-page frames; arm64 fault_supports_stage2_huge_mapping): a slot at 1 MiB maps its
  partial head and tail by 4 KiB pages and the whole blocks inside by 2 MiB leaves.
- The userspace address must be congruent to the guest-physical one modulo the block, or no
  block is mapped anywhere in the slot. The simulator has no userspace address: it assumes the
  memory behind a slot aligned as the slot was at its creation (QEMU maps guest RAM so). The
  skewed cases check the real kernel behaviour that assumption rests on; the simulator predicts
  them by creating the slot where its memory's alignment puts it and moving it (KVM_MR_MOVE)
  to the real guest-physical address, which leaves the memory misaligned there as well.
- On this host (kvm_pvm: shadow paging, tdp_mmu=N) the guest must map its memory with 2 MiB
  pages itself: the shadow MMU never maps a guest page by a larger leaf than the guest's own
  (checked below too). The data slot is therefore mapped by the guest with 2 MiB pages.

Accounting: the guest's code, page tables, stack and write table live in another memslot (not
backed by huge pages), whose pages add 4 KiB mappings (the faulting pages and, as the x86
shadow MMU prefetches neighbours in a slot that is not dirty-logged, their aligned groups of 8).
The data slot's share is the VM's count minus that of a twin VM: the same guest with the same
number of writes, all aimed just past the data slot where no memslot is (each an MMIO exit, so
it maps nothing there but touches the same code-slot pages).

Skipped where /dev/kvm is missing, transparent huge pages are disabled, the VM statistics have
no pages_2m (not x86), the simulator is not importable, or the host did not back the slot by
huge pages (AnonHugePages of /proc/self/smaps, checked before each run).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ringenv.realkvm import ioctl as k
from ringenv.realkvm.arch import WriteProgram
from ringenv.realkvm.guest import DATA_SLOT, Guest, unavailable_reason

NO_KVM = unavailable_reason()
pytestmark = [pytest.mark.kvm, pytest.mark.skipif(NO_KVM is not None, reason=str(NO_KVM))]

PAGE = k.PAGE_SIZE
MiB = 1 << 20
HUGE = k.HUGE_PAGE_SIZE
LOG = k.KVM_MEM_LOG_DIRTY_PAGES
RING_ENTRIES = 4096  # soft limit 4032: no phase below pushes that many
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_unavailable() -> str | None:
    try:
        mode = THP_ENABLED.read_text()
    except OSError:
        return "no transparent huge pages on this host (no /sys/kernel/mm/transparent_hugepage)"
    if "[never]" in mode:
        return f"transparent huge pages are disabled on this host ({THP_ENABLED}: {mode.strip()})"
    return None


@pytest.fixture(scope="module")
def sim():
    """A new simulated VM on the profile of this host (the x86 host profile here)."""
    reason = _thp_unavailable()
    if reason:
        pytest.skip(reason)
    with k.KvmSystem() as system, system.create_vm() as vm:
        if "pages_2m" not in vm.stats():
            pytest.skip("this host's VM statistics have no pages_2m (KVM_GET_STATS_FD on the VM fd)")
    try:
        from ringenv.kvm import Vm
        from ringenv.realkvm.arch import host_arch
    except ImportError as exc:
        pytest.skip(f"simulator not importable: {exc}")
    profile = host_arch().profile_name()
    return lambda: Vm(profile)


class Read(int):
    """A page offset in a phase that the guest reads (a load), not writes."""


def _program(phases: list[list[int]], shift: int = 0) -> WriteProgram:
    """One vCPU's program: the phases' accesses end to end (offset by ``shift`` pages; a
    ``Read`` is a load, the others stores), a sync after every phase but the last (whose end
    is the done exit)."""
    writes, syncs, reads = [], [], []
    for i, phase in enumerate(phases):
        reads += [len(writes) + j for j, w in enumerate(phase) if isinstance(w, Read)]
        writes += [w + shift for w in phase]
        if i < len(phases) - 1:
            syncs.append(len(writes) - 1)
    return WriteProgram(writes, frozenset(syncs), frozenset(reads))


def _real(offset: int, pages: int, phases: list[list[int]], flags: list[int | None], *,
          skew: int = 0, twin: bool = False, guest_page: int = HUGE) -> list[tuple[int, int, int]]:
    """Run ``phases`` on the real KVM with the data slot (``pages`` pages, no logging at first,
    backed by huge pages, its userspace address ``skew`` bytes off congruence) ``offset`` bytes
    past the guest's data base. After each phase: harvest and reset the ring, then read the
    VM's (pages_4k, pages_2m, entries harvested), then set the slot's flags to ``flags[i]``
    (None: leave them) and read (pages_4k, pages_2m, 0) again. ``twin``: every write goes
    ``pages`` pages further, past the slot, where no memslot is."""
    out = []
    with Guest([_program(phases, pages if twin else 0)], pages, ring_entries=RING_ENTRIES, log_dirty=False,
               unmapped_pages=pages if twin else 0, data_offset=offset, data_page_size=guest_page,
               huge_pages=True, hva_skew=skew) as g:
        ua = g.vm.userspace_addr(DATA_SLOT)
        want = -(-(ua + pages * PAGE) // HUGE) * HUGE - ua // HUGE * HUGE
        backed = g.vm.huge_backed(DATA_SLOT)
        if backed < want:
            pytest.skip(f"the host backed {backed >> 20} of the slot's {want >> 20} MiB of huge pages "
                        "(AnonHugePages in /proc/self/smaps): memory too fragmented for THP?")

        def read(harvested):
            s = g.vm.stats()
            out.append((s["pages_4k"], s["pages_2m"], harvested))

        for i, after in enumerate(flags):
            while (event := g.run(0))[0] == "mmio":
                pass
            assert event[0] == ("done" if i == len(phases) - 1 else "sync"), event
            harvested = g.vcpus[0].harvest()
            assert g.vm.reset_dirty_rings() == len(harvested)
            read(len(harvested))
            if after is not None:
                g.vm.set_memory_flags(DATA_SLOT, after)
                read(0)
    return out


def _real_slot(offset, pages, phases, flags, **kw) -> list[tuple[int, int, int]]:
    """The data slot's share of ``_real``: the VM's counts minus its twin's."""
    vm, twin = _real(offset, pages, phases, flags, **kw), _real(offset, pages, phases, flags, twin=True, **kw)
    assert not any(t[1] for t in twin), "the twin guest has a huge mapping outside the data slot"
    return [(a[0] - b[0], a[1] - b[1], a[2]) for a, b in zip(vm, twin)]


def _sim(sim, offset: int, pages: int, phases: list[list[int]], flags: list[int | None], *,
         skew: int = 0) -> list[tuple[int, int, int]]:
    """The simulator's side of ``_real_slot``: the same slot (all of its memory untouched, every
    block a huge page), the same writes and flag changes; ``Memslot.leaf_mappings`` and the
    entries harvested at each point. A skew creates the slot where its memory's alignment
    puts it and moves it to its guest-physical address (the simulator keeps the alignment a
    slot had at its creation)."""
    from ringenv.guest.trace import TraceProgram
    from ringenv.realkvm.x86 import DATA_GPA
    from ringenv.vmm.reap import RingReader

    vm = sim()
    vm.enable_cap(k.KVM_CAP_DIRTY_LOG_RING, RING_ENTRIES * 16)
    base, size = DATA_GPA + offset, pages * PAGE
    if skew % HUGE:
        vm.set_user_memory_region(DATA_SLOT, 0, base + (1 << 32) + skew, size, block_fraction=1.0,
                                  mapped_fraction=0.0)
        vm.set_user_memory_region(DATA_SLOT, 0, base, size)  # KVM_MR_MOVE
    else:
        vm.set_user_memory_region(DATA_SLOT, 0, base, size, block_fraction=1.0, mapped_fraction=0.0)
    prog = _program(phases)
    vcpu = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([list(prog.writes)], [sorted(prog.syncs)], reads=[sorted(prog.reads)],
                                 base_gfn=base // PAGE))
    reader, out = RingReader(vcpu.ring_gfns), []
    slot = vm.memslot(DATA_SLOT)
    for i, after in enumerate(flags):
        exit_ = vcpu.run() or vm.run_until(vm.now + (1 << 50))[0]
        assert exit_.kind == ("done" if i == len(phases) - 1 else "sync"), exit_
        harvested = len(reader.reap()[1])
        assert vm.reset_dirty_rings() == harvested
        out.append((*slot.leaf_mappings(), harvested))
        if after is not None:
            vm.set_user_memory_region(DATA_SLOT, after, base, size)
            out.append((*slot.leaf_mappings(), 0))
    return out


# ------------------------------------------------------------------------- where blocks go
CASES = {
    # name: (slot offset past the data base, slot size, userspace skew), expected (pages_4k, pages_2m)
    "aligned-3-blocks": ((0, 6 * MiB, 0), (0, 3)),
    "at-1MiB-head-4-MiB-tail": ((1 * MiB, 6 * MiB, 0), (512, 2)),
    "hva-skewed-1MiB": ((0, 6 * MiB, 1 * MiB), (1536, 0)),
    "at-1MiB-hva-skewed-4KiB": ((1 * MiB, 6 * MiB, PAGE), (1536, 0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_blocks_where_the_simulator_puts_them(sim, case):
    """The guest writes every page of the slot once (no dirty logging). (a) a slot on a block
    boundary, 3 blocks: three 2 MiB leaves; (b) a slot at 1 MiB of 1 + 4 + 1 MiB: its partial
    head and tail by 256 + 256 pages, the 2 whole blocks inside by 2 MiB leaves; (c) the
    userspace address off congruence with the guest-physical one by 1 MiB, or by one page in a
    slot at 1 MiB: no 2 MiB leaf at all, every page by a 4 KiB one (the real kernel's rule the
    simulator's congruence assumption rests on). The real counts are the simulator's."""
    (offset, size, skew), expected = CASES[case]
    pages = size // PAGE
    phases, flags = [list(range(pages))], [None]
    real = _real_slot(offset, pages, phases, flags, skew=skew)
    model = _sim(sim, offset, pages, phases, flags, skew=skew)
    assert real == model == [(*expected, 0)]


def test_a_shadow_paging_host_maps_no_larger_than_the_guests_own_page(sim):
    """With shadow paging (tdp_mmu=N: this project's kvm_pvm host) KVM builds its mappings
    from the guest's page tables, and FNAME(page_fault) caps the leaf at the guest's own page
    size: a guest mapping the aligned, huge-page-backed slot with 4 KiB pages gets 4 KiB leaves
    only (with EPT/NPT the guest's page size would not matter; the simulator models that, and
    its block_fraction on a shadow-paging host is the share of memory both backed by huge
    pages and mapped huge by the guest)."""
    tdp = Path("/sys/module/kvm/parameters/tdp_mmu")
    if not tdp.is_file() or tdp.read_text().strip() not in ("N", "0"):
        pytest.skip("not a shadow-paging host (kvm tdp_mmu is on or unknown)")
    pages = 6 * MiB // PAGE
    assert _real_slot(0, pages, [list(range(pages))], [None], guest_page=PAGE) == [(pages, 0, 0)]


# ------------------------------------------------------------------------- dirty logging
@pytest.mark.parametrize("offset", [0, 1 * MiB])
def test_dirty_logging_splits_on_write_and_logging_off_collapses(sim, offset):
    """A 6 MiB slot, at a block boundary (3 blocks) or at 1 MiB (2 blocks, 512 head and tail
    pages), written whole without logging, then: logging on (KVM_MEM_LOG_DIRTY_PAGES, dirty
    ring); one write per 512 pages (offsets 10, 522, 1034); every page; logging off; every page
    again. On this host (shadow MMU, no eager split: eager_page_split acts only with the TDP
    MMU) enabling logging write-protects the huge leaves and keeps them; the first write in a
    block drops its 2 MiB leaf and maps that one page (the block's other pages stay unmapped
    until written: the simulator's split leaves them unmapped too, fault.SPLIT_EMPTY); a full
    pass maps every page by 4 KiB; logging off zaps the 4 KiB leaves of huge-page-backed blocks
    (kvm_rmap_zap_collapsible_sptes) and the next pass maps them by 2 MiB again. The entries
    harvested and the counts after each step are the simulator's."""
    pages = 6 * MiB // PAGE
    every = list(range(pages))
    phases = [every, list(range(10, pages, 512)), every, every]
    flags = [LOG, None, 0, None]
    real = _real_slot(offset, pages, phases, flags)
    model = _sim(sim, offset, pages, phases, flags)
    assert real == model
    edge = 0 if offset == 0 else 512  # the partial head and tail, mapped by pages throughout
    blocks = 3 if offset == 0 else 2
    touched = len(phases[1]) - (1 if offset else 0)  # offset 10 lies in the head at 1 MiB
    assert model == [(edge, blocks, 0), (edge, blocks, 0),  # written whole; logging on keeps the leaves
                     (edge + touched, 0, len(phases[1])),  # one write per block split it
                     (pages, 0, pages),  # every page: all 4 KiB, all logged
                     (edge, 0, 0),  # logging off: the split blocks' pages zapped
                     (edge, blocks, 0)]  # the next pass maps them huge again, logs nothing


def test_reads_log_the_pages_a_split_on_write_left_unmapped(sim):
    """The slot written whole without logging (the host's huge pages are written, writable),
    logging on, then: a read of page 11 (its block still a write-protected 2 MiB leaf: no fault,
    nothing logged); a write to page 10 (splits block 0, mapping page 10 only); reads of 11 and
    20 (block 0, unmapped since the split) and 600 and 1030 (blocks 1 and 2, huge leaves). The
    shadow MMU maps each unmapped page at its read fault, writable as the host page is, and
    make_spte marks it dirty: 11 and 20 are logged, as writes would be; the reads under huge
    leaves are not. The counts and the entries are the simulator's (fault.READLOG)."""
    pages = 6 * MiB // PAGE
    phases = [list(range(pages)), [Read(11)], [10], [Read(11), Read(20), Read(600), Read(1030)]]
    flags = [LOG, None, None, None]
    real = _real_slot(0, pages, phases, flags)
    model = _sim(sim, 0, pages, phases, flags)
    assert real == model
    assert model == [(0, 3, 0), (0, 3, 0), (0, 3, 0), (1, 2, 1), (3, 2, 2)]
