"""Stage-2 fault counts on the real KVM against the simulator: the vCPU statistic pf_fixed
(KVM_GET_STATS_FD on the vCPU fd: faults KVM fixed, a write-protect fault or a translation fault
that mapped a page) against the simulated vCPU's ``stats.faults``.

A real guest accesses the pages of a data memslot of 1536 pages (6 MiB, 4 KiB host pages),
dirty-logged (with a ring) or not, its memory fresh or written by userspace first
(``populated``), by stores or by loads then stores. The guest's code, page tables and write
table live in another memslot, which would fault too: a warm-up vCPU of the same VM first runs
the same program aimed just past the data slot, where no memslot is (each access an MMIO exit,
which KVM emulates: no pf_fixed), and maps the code slot as the counted vCPU will touch it
(``Guest(warm_up=...)``); as a check, the warm-up's own data-slot share is nothing. Measured on
this project's host (x86, shadow paging), see docs/reference/real-kvm-host.md:

- every access to a page not mapped yet faults once, logged or not, load or store;
- a load of fresh memory maps the zero page read-only: the store after it faults again;
- in a slot that is not dirty-logged the x86 shadow MMU maps, at each fault, the other pages
  of the faulting page's aligned group of 8 whose host pages exist (pte prefetch): 192 faults
  for 1536 pages written by userspace first, 1536 for fresh memory (no host page to map);
- a dirty-logged slot never prefetches (nothing would log the pages).

Skipped where /dev/kvm is missing or the vCPU statistics have no pf_fixed.
"""

from __future__ import annotations

import pytest

from ringenv.realkvm import ioctl as k
from ringenv.realkvm.arch import WriteProgram
from ringenv.realkvm.guest import Guest, unavailable_reason
from tests.kvm._fault_cases import CASES, PAGES

NO_KVM = unavailable_reason()
pytestmark = [pytest.mark.kvm, pytest.mark.skipif(NO_KVM is not None, reason=str(NO_KVM))]

RING_ENTRIES = 4096  # soft limit 4032: no case pushes that many


def _real(accesses, loads, logged, populated, *, twin=False) -> int:
    """pf_fixed of the real vCPU over the run, after a warm-up vCPU ran the same program past
    the data slot (``twin``: this vCPU's accesses go there too)."""
    def prog(shift):
        return WriteProgram([a + shift for a in accesses], frozenset(), frozenset(loads))

    with Guest([prog(PAGES if twin else 0)], PAGES, ring_entries=RING_ENTRIES, log_dirty=logged,
               unmapped_pages=PAGES, populated=populated, warm_up=[prog(PAGES)]) as g:
        before = g.vcpus[0].stats().get("pf_fixed")
        if before is None:
            pytest.skip("this host's vCPU statistics have no pf_fixed (KVM_GET_STATS_FD on the vCPU fd)")
        while (event := g.run(0))[0] != "done":
            assert event[0] == "mmio", event  # (the twin's accesses; no ring gets full)
        return g.vcpus[0].stats()["pf_fixed"] - before


def _sim(accesses, loads, logged, populated) -> int:
    """The simulator's side: the same slot (fresh or populated, nothing mapped yet, no huge
    page), the same accesses, on this host's profile."""
    from ringenv.guest.trace import TraceProgram
    from ringenv.kvm import Vm
    from ringenv.kvm import uapi as U
    from ringenv.realkvm.arch import host_arch
    from ringenv.realkvm.x86 import DATA_GPA

    profile = host_arch().profile_name()
    vm = Vm(profile)
    cap = U.KVM_CAP_DIRTY_LOG_RING if vm.profile.arch == "x86" else U.KVM_CAP_DIRTY_LOG_RING_ACQ_REL
    vm.enable_cap(cap, RING_ENTRIES * 16)
    vm.set_user_memory_region(1, U.KVM_MEM_LOG_DIRTY_PAGES if logged else 0, DATA_GPA, PAGES * k.PAGE_SIZE,
                              block_fraction=0.0, mapped_fraction=0.0, populated=populated)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([accesses], [[]], reads=[sorted(loads)], base_gfn=DATA_GPA // k.PAGE_SIZE))
    while (exit_ := v.run() or vm.run_until(vm.now + (1 << 50))[0]).kind != "done":
        raise AssertionError(exit_)
    return v.stats.faults


@pytest.mark.parametrize("case", list(CASES))
def test_fault_counts_are_the_real_kvms(case):
    assert _real(*CASES[case], twin=True) == 0  # the warm-up took the code slot's faults
    assert _real(*CASES[case]) == _sim(*CASES[case])


def test_the_measured_counts():
    """The figures the module docstring states, on this host (the simulator's too, above)."""
    if _sim(*CASES["not-logged-populated-stores"]) != PAGES // 8:
        pytest.skip("this host does not prefetch (not the x86 shadow MMU)")
    counts = {name: _real(*c) for name, c in CASES.items()}
    assert counts == {
        "not-logged-populated-stores": PAGES // 8, "not-logged-populated-every-3rd": PAGES // 8,
        "not-logged-fresh-stores": PAGES, "not-logged-populated-loads-then-stores": PAGES // 8,
        "not-logged-fresh-loads-then-stores": 2 * PAGES, "logged-populated-stores": PAGES,
        "logged-fresh-loads-then-stores": 2 * PAGES, "logged-populated-loads-then-stores": PAGES}


def test_a_warm_up_must_match_the_programs():
    prog = WriteProgram([0, 1], frozenset(), frozenset())
    with pytest.raises(ValueError, match="warm_up"):
        Guest([prog], 16, unmapped_pages=16, warm_up=[WriteProgram([16], frozenset(), frozenset())])
    with pytest.raises(ValueError, match="warm_up"):
        Guest([prog, prog], 16, unmapped_pages=16, warm_up=[WriteProgram([16, 17], frozenset(), frozenset())])
