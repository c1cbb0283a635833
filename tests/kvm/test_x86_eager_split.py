"""x86 eager page splitting (the kvm module parameter ``eager_page_split``, default Y since
Linux 5.19; it acts only with the TDP MMU: kvm_mmu_slot_try_split_huge_pages and
kvm_mmu_try_split_huge_pages return at once without it).

- Enabling dirty logging without KVM_DIRTY_LOG_INITIALLY_SET: kvm_mmu_slot_apply_flags splits
  the slot's huge mappings in the ioctl (kvm_mmu_slot_try_split_huge_pages), before
  write-protecting them; the split needs no TLB flush of its own (the write-protection's flush
  covers it). A vCPU's first write then costs a plain fault, no split.
- With manual protect and INITIALLY_SET, nothing is split when logging is enabled;
  KVM_CLEAR_DIRTY_LOG (kvm_arch_mmu_enable_log_dirty_pt_masked) splits the huge pages of each
  mask's span (kvm_mmu_try_split_huge_pages) before write-protecting.
- Splitting never logs anything.
"""

from __future__ import annotations

import pytest
import yaml

from ringenv.config import CONFIG_DIR, ConfigError, HostProfile, load_host_profile
from ringenv.guest.trace import TraceProgram
from ringenv.kvm import Vm
from ringenv.kvm import uapi as U
from ringenv.kvm.memory import UNMAPPED, WP

from ._helpers import any_block_mapped, block_mapped

LOG = U.KVM_MEM_LOG_DIRTY_PAGES
FOREVER = 1 << 62
ALL = (1 << 64) - 1  # a bitmap word with every bit set


def _run(vm, v):
    e = v.run()
    return e if e is not None else vm.run_until(FOREVER)[0]


# ---------------------------------------------------------------------------- the host profile field
def test_the_profiles_carry_the_module_parameters():
    """x86 profiles: eager_page_split is the kernel default (Y). x86-pml is an Intel host with
    EPT: the TDP MMU is on (its default). x86-nopml is this project's host, measured: kvm
    parameters eager_page_split=Y, tdp_mmu=N. arm64 has neither (its control is
    KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE)."""
    for name in ("x86-pml", "x86-nopml"):
        assert load_host_profile(name).eager_page_split is True
    assert load_host_profile("x86-pml").tdp_mmu is True
    assert load_host_profile("x86-nopml").tdp_mmu is False
    for name in ("arm64-4k", "arm64-16k", "arm64-64k"):
        p = load_host_profile(name)
        assert p.eager_page_split is False and p.tdp_mmu is False


@pytest.mark.parametrize("field", ["eager_page_split", "tdp_mmu"])
def test_an_x86_module_parameter_on_arm64_is_a_config_error(field):
    data = yaml.safe_load((CONFIG_DIR / "hosts" / "arm64-4k.yaml").read_text())
    HostProfile.parse({**data, field: False}, where="host profile h.yaml")  # false: allowed
    with pytest.raises(ConfigError) as ei:
        HostProfile.parse({**data, field: True}, where="host profile h.yaml")
    msg = str(ei.value)
    assert f"  {field}: " in msg and "x86" in msg and "arm64" in msg


# ---------------------------------------------------------------------------- enabling logging
def _slot_then_logging(profile, nblocks=4, **kw):
    """A VM with a ring (or none: ``entries=0``), one vCPU and a slot of ``nblocks`` 2 MiB
    blocks backed by huge pages, created without logging; logging is then turned on."""
    entries = kw.pop("entries", 1024)
    vm = Vm(profile)
    if entries:
        vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING, entries * 16)
    vm.set_user_memory_region(0, 0, 0, nblocks * 512 * 4096, block_fraction=1.0, **kw)
    v = vm.create_vcpu(0)
    flushes, kernel = vm.stats.tlb_flushes, vm.stats.kernel_ns
    vm.set_user_memory_region(0, LOG, 0, nblocks * 512 * 4096)
    return vm, v, flushes, kernel


@pytest.mark.parametrize("entries", [1024, 0])
def test_enabling_logging_splits_every_huge_mapping_in_the_ioctl(entries):
    """x86-pml (eager_page_split, TDP MMU), 4 blocks: the ioctl splits all 4 (counted, their
    time charged to the ioctl), write-protects the slot with one TLB flush and logs nothing.
    The vCPU's first write then costs one plain fault (PML: the logged write), no split."""
    vm, v, flushes, kernel = _slot_then_logging("x86-pml", entries=entries)
    c, n = vm.profile.costs, 4 * 512
    assert vm.stats.splits == 4 and not any_block_mapped(vm, n)
    assert vm.stats.tlb_flushes == flushes + 1
    assert vm.last_ioctl_ns == int(c.protect_page_ns * n) + vm._tlbi_ns + 4 * c.split_ns
    assert vm.stats.kernel_ns == kernel + vm.last_ioctl_ns
    if entries:
        assert v.ring.dirty_index == 0
    else:
        assert not vm.slots[0].dirty_bitmap.any()
    vm.attach_guest(TraceProgram([[10, 600]], [[]]))
    assert _run(vm, v).kind == "done"
    assert (v.stats.faults, v.stats.splits, vm.stats.splits) == (2, 0, 4)
    assert v.stats.fault_ns < vm._write_costs[1]  # no split's time in the guest's
    if entries:
        assert v.ring.gfns["offset"][:2].tolist() == [10, 600] and v.stats.pushes == 2
    else:
        assert int(vm.slots[0].dirty_bitmap[0]) == 1 << 10 and int(vm.slots[0].dirty_bitmap[9]) == 1 << (600 - 576)


def test_without_the_tdp_mmu_huge_pages_split_lazily():
    """x86-nopml (this host: tdp_mmu=N): kvm_mmu_slot_try_split_huge_pages does nothing; the
    first write in a block splits it in the vCPU's fault."""
    vm, v, flushes, _ = _slot_then_logging("x86-nopml", entries=256)
    assert vm.stats.splits == 0 and block_mapped(vm, 0) and vm.stats.tlb_flushes == flushes + 1
    vm.attach_guest(TraceProgram([[10]], [[]]))
    assert _run(vm, v).kind == "done"
    assert (v.stats.splits, vm.stats.splits) == (1, 1)


@pytest.mark.parametrize("tdp_mmu", [False, True])
def test_a_split_on_write_maps_the_other_pages_only_with_the_tdp_mmu(tdp_mmu):
    """Four THP-backed blocks, logging on, no eager split; writes 10 and 600 split blocks 0
    and 1. The shadow MMU (tdp_mmu=N) drops the huge spte and maps the faulting page only
    (link_shadow_page -> drop_large_spte): the VM's leaves are the 2 pages written and the 2
    blocks left (pages_4k 2, pages_2m 2, as measured on the real kvm_pvm host,
    tests/realkvm/test_realkvm_blocks.py). The TDP MMU splits the huge spte into a full table of
    write-protected 4K children (tdp_mmu_split_huge_page): 1024 pages. Either way a later write
    to another page of a split block (11) faults once and is logged once."""
    p = load_host_profile("x86-nopml").model_copy(
        update={"tdp_mmu": tdp_mmu, "eager_page_split": False, "name": "x86-nopml-tdp" if tdp_mmu else "x86-nopml"})
    vm, v, _, _ = _slot_then_logging(p, entries=256)
    assert vm.leaf_mappings() == (0, 4)
    vm.attach_guest(TraceProgram([[10, 600, 11]], [[1]]))
    assert _run(vm, v).kind == "sync"
    assert vm.leaf_mappings() == ((1024, 2) if tdp_mmu else (2, 2))
    s = vm.memslot(0)
    assert ((s.state[:1024] & UNMAPPED) != 0).sum() == (0 if tdp_mmu else 1022)
    protected = (s.state[:1024] & WP) != 0
    assert not protected[[10, 600]].any() and protected.sum() == 1022  # the others still fault when written
    assert _run(vm, v).kind == "done"
    assert (v.stats.faults, v.stats.pushes, vm.stats.splits) == (3, 3, 2)
    assert v.ring.gfns["offset"][:3].tolist() == [10, 600, 11]
    assert vm.leaf_mappings() == ((1024, 2) if tdp_mmu else (3, 2))


def test_eager_page_split_off_splits_lazily():
    """kvm.eager_page_split=N: enabling logging splits nothing; the first write in a block
    splits that block (in the vCPU's fault, charged to it), the other blocks stay."""
    p = load_host_profile("x86-pml").model_copy(update={"eager_page_split": False, "name": "x86-pml-lazy"})
    vm, v, _, _ = _slot_then_logging(p)
    assert vm.stats.splits == 0 and block_mapped(vm, 0) and block_mapped(vm, 512)
    vm.attach_guest(TraceProgram([[10]], [[]]))
    kernel = int(vm.vcpu_kernel_ns()[0])
    assert _run(vm, v).kind == "done"
    assert (v.stats.splits, vm.stats.splits) == (1, 1)
    assert not block_mapped(vm, 0) and block_mapped(vm, 512)
    assert int(vm.vcpu_kernel_ns()[0]) - kernel >= p.costs.split_ns


def test_memory_not_mapped_yet_has_nothing_to_split():
    """Untouched memory (no stage-2 mapping) is not split; the write that maps it under logging
    maps one page (no split either)."""
    vm, v, _, _ = _slot_then_logging("x86-pml", mapped_fraction=0.0)
    assert vm.stats.splits == 0
    vm.attach_guest(TraceProgram([[10]], [[]]))
    assert _run(vm, v).kind == "done"
    assert (v.stats.splits, v.stats.pushes) == (0, 1)


# ---------------------------------------------------------------------------- manual protect + INITIALLY_SET
def _initially_set_vm(profile):
    """A VM on ``profile`` with MANUAL_PROTECT | INITIALLY_SET, a 1024-page slot of 2 MiB huge
    mappings and one vCPU, logging turned on (which protects and splits nothing).
    Returns (vm, vcpu)."""
    vm = Vm(profile)
    vm.enable_cap(U.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                  U.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | U.KVM_DIRTY_LOG_INITIALLY_SET)
    vm.set_user_memory_region(0, 0, 0, 1024 * 4096, block_fraction=1.0)
    v = vm.create_vcpu(0)
    vm.set_user_memory_region(0, LOG, 0, 1024 * 4096)
    return vm, v


def test_initially_set_splits_at_clear_dirty_log():
    """Bitmap mode with MANUAL_PROTECT | INITIALLY_SET: enabling logging splits and protects
    nothing. CLEAR_DIRTY_LOG of pages 64..127 (all bits) splits block 0 (the span's huge page)
    in the ioctl and write-protects exactly those pages: a write to 100 costs one plain fault
    (no split) and sets its bit; a write to 200 (still set in the bitmap, writable) costs
    nothing; block 1 is still a huge mapping."""
    vm, v = _initially_set_vm("x86-pml")
    assert vm.stats.splits == 0 and block_mapped(vm, 0) and vm.last_ioctl_ns == 0
    c = vm.profile.costs
    vm.clear_dirty_log(0, 64, 64, [ALL])
    assert vm.stats.splits == 1 and not block_mapped(vm, 0) and block_mapped(vm, 512)
    assert vm.last_ioctl_ns == (int(c.get_dirty_log_page_ns * 64) + int(c.clear_dirty_log_page_ns * 64)
                                + vm._tlbi_ns + c.split_ns)
    vm.attach_guest(TraceProgram([[100, 200]], [[]]))
    assert _run(vm, v).kind == "done"
    assert (v.stats.faults, v.stats.splits, vm.stats.splits) == (1, 0, 1)
    bm = vm.get_dirty_log(0)
    assert int(bm[1]) == 1 << (100 - 64)


def test_initially_set_without_the_tdp_mmu_does_not_split_at_clear():
    vm, _ = _initially_set_vm("x86-nopml")
    vm.clear_dirty_log(0, 64, 64, [ALL])
    assert vm.stats.splits == 0 and block_mapped(vm, 0)


# ------------------------------------------------------------------------- INITIALLY_SET: the huge mappings at the ends
# x86 kvm_arch_mmu_enable_log_dirty_pt_masked, with manual protect and INITIALLY_SET
# (kvm_dirty_log_manual_protect_and_init_set), also write-protects the huge mapping (2M level and
# up) of the first and of the last gfn of the mask (kvm_mmu_slot_gfn_write_protect(...,
# PG_LEVEL_2M)), after the eager split where there is one (TDP MMU): a huge mapping left there
# must fault, so that the page is logged at 4K. The 4K part touches only 4K mappings.

def test_x86_clear_with_initially_set_write_protects_the_huge_mapping_at_the_ends():
    """x86-nopml (shadow MMU: no split at CLEAR), bitmap mode, two 2 MiB huge mappings. CLEAR of
    pages 64..127 write-protects the mask's pages and the whole huge mapping of block 0 (one
    spte more: 65 pages' worth of re-protect work); block 1 is untouched. The guest then
    writes 200 (block 0, not in the mask: its huge mapping is write-protected, so it faults,
    splits the block and logs 200), 100 (in the mask: faults, logs) and 600 (block 1,
    writable: nothing)."""
    vm, v = _initially_set_vm("x86-nopml")
    assert not (vm.state & 1).any()
    vm.clear_dirty_log(0, 64, 64, [ALL])
    c = vm.profile.costs
    assert (vm.state[:512] & 1).all() and not (vm.state[512:] & 1).any()
    assert block_mapped(vm, 0) and vm.stats.splits == 0
    assert vm.last_ioctl_ns == int(c.get_dirty_log_page_ns * 64) + int(c.clear_dirty_log_page_ns * 65) + vm._tlbi_ns
    vm.attach_guest(TraceProgram([[200, 100, 600]], [[]]))
    assert _run(vm, v).kind == "done"
    assert (v.stats.faults, v.stats.splits) == (2, 1)
    assert not block_mapped(vm, 0) and block_mapped(vm, 512)
    bm = vm.get_dirty_log(0)
    assert int(bm[1]) == 1 << (100 - 64) and int(bm[3]) == ALL


def test_x86_ring_reset_with_initially_set_write_protects_the_huge_mapping_too():
    """The ring reset calls the same function (kvm_reset_dirty_gfn). x86-nopml, a ring, manual
    protect + INITIALLY_SET, untouched memory: the write to 10 maps a 4K page and pushes it.
    Logging off zaps block 0's 4K mappings (kvm_rmap_zap_collapsible_sptes); the write to 20
    maps the huge page again (writable). Logging on again (INITIALLY_SET: nothing protected).
    The reset of the entry for 10 write-protects page 10's huge mapping: the writes 30 and 10
    both fault (the first splits the block: the only split, the first write having mapped a 4K
    page where nothing was mapped) and are pushed."""
    vm = Vm("x86-nopml")
    vm.enable_cap(U.KVM_CAP_DIRTY_LOG_RING, 256 * 16)
    vm.enable_cap(U.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                  U.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | U.KVM_DIRTY_LOG_INITIALLY_SET)
    vm.set_user_memory_region(0, LOG, 0, 1024 * 4096, block_fraction=1.0, mapped_fraction=0.0)
    v = vm.create_vcpu(0)
    vm.attach_guest(TraceProgram([[10, 20, 30, 10]], [[0, 1]]))
    from ringenv.vmm.reap import RingReader
    reader = RingReader(v.ring_gfns)
    assert _run(vm, v).kind == "sync"
    assert reader.reap()[1].tolist() == [10]
    vm.set_user_memory_region(0, 0, 0, 1024 * 4096)
    assert _run(vm, v).kind == "sync" and block_mapped(vm, 20)
    vm.set_user_memory_region(0, LOG, 0, 1024 * 4096)
    assert block_mapped(vm, 0) and not (vm.state[:512] & 1).any()
    assert vm.reset_dirty_rings() == 1
    assert (vm.state[:512] & 1).all() and block_mapped(vm, 0)
    faults = v.stats.faults
    assert _run(vm, v).kind == "done"
    assert reader.reap()[1].tolist() == [30, 10]
    assert v.stats.faults == faults + 2 and vm.stats.splits == 1 and not block_mapped(vm, 0)


@pytest.mark.parametrize("tdp_mmu", [False, True])
def test_reads_in_a_block_split_on_write_log_only_with_the_shadow_mmu(tdp_mmu):
    """Four THP-backed blocks mapped (the memory written) before logging; logging on, no eager
    split. Write 10 splits block 0; then reads of 11 and 20 (block 0) and 600 (block 1, still a
    huge mapping). The shadow MMU left 11 and 20 unmapped: each read is a fault, and the host
    page being writable, make_spte maps it writable and marks it dirty: both are pushed (as
    measured on this project's host, tests/realkvm/test_realkvm_blocks.py). The TDP MMU's full
    table maps them read-only already: the reads do not fault, nothing more is pushed. Block
    1's huge mapping is only write-protected: its read does not fault either way."""
    p = load_host_profile("x86-nopml").model_copy(
        update={"tdp_mmu": tdp_mmu, "eager_page_split": False, "name": "x86-nopml-tdp" if tdp_mmu else "x86-nopml"})
    vm, v, _, _ = _slot_then_logging(p, entries=256)
    vm.attach_guest(TraceProgram([[10, 11, 20, 600]], [[0]], reads=[[1, 2, 3]]))
    assert _run(vm, v).kind == "sync"
    assert _run(vm, v).kind == "done"
    logged = [10] if tdp_mmu else [10, 11, 20]
    assert v.ring.gfns["offset"][: v.ring.dirty_index].tolist() == logged
    assert (v.stats.faults, vm.stats.splits) == (len(logged), 1)
    assert vm.leaf_mappings() == ((512, 3) if tdp_mmu else (3, 3))
    assert vm.version[[10, 11, 20, 600]].tolist() == [1, 0, 0, 0]
