"""Hand-worked push / full-exit / harvest / reset sequences on one 256-entry ring
(reference s3 producer, s4 the exit, s5 harvest, s6 reset; measured facts of s11 and
real-kvm-host.md "Ring behaviour observed").

arm64-4k, ring 4096 bytes = 256 entries, reserved 64 -> soft_limit 192. The guest is a
TraceProgram writing distinct pages unless said otherwise; every first write to a page after
logging was enabled (or after a reset re-protected it) is one fault = one push (s7).
"""

from __future__ import annotations

import pytest

from ringenv.config import load_host_profile
from ringenv.kvm import uapi as U
from ringenv.replay import replay_trace

from ._helpers import Host

DIRTY, RESET = U.KVM_DIRTY_GFN_F_DIRTY, U.KVM_DIRTY_GFN_F_RESET
FULL = U.KVM_EXIT_DIRTY_RING_FULL


def first_full_exit(n_writes=300, **kw):
    h = Host([list(range(n_writes))], **kw)
    assert h.enter() is None  # ring empty: the vCPU enters the guest
    e = h.run()
    return h, e


# ------------------------------------------------------------------------------ soft-full exit
def test_full_exit_holds_exactly_soft_limit_entries():
    """s3/s4/s11: pushes 0..191 -> the 192nd push makes used = 192 >= soft_limit, SOFT_FULL is
    raised, the entry check right after that fault exits with KVM_EXIT_DIRTY_RING_FULL.
    Ring: entries 0..191 = pages 0..191, all DIRTY; entries 192..255 untouched (flags 0)."""
    h, e = first_full_exit()
    r = h.vcpus[0].ring
    assert (e.reason, e.kind, e.vcpu) == (FULL, "full", 0)
    assert (r.size, r.soft_limit) == (256, 192)
    assert r.used == 192 and r.dirty_index == 192 and r.reset_index == 0
    assert h.ring_offsets() == list(range(192))
    assert (h.vcpus[0].ring_gfns["flags"][:192] == DIRTY).all()
    assert (h.vcpus[0].ring_gfns["flags"][192:] == 0).all()
    assert h.vcpus[0].stats.pushes == 192 and r.lost == 0


def test_vcpu_totals_sum_the_vcpus_counters():
    """Vm.vcpu_totals: ring-full exits, kernel ns and overflows, summed over the vCPUs; two
    vCPUs each fill their ring once (one full exit each)."""
    h = Host([list(range(300)), list(range(300, 600))])
    for i in range(2):
        assert h.enter(i) is None
    h.run()
    h.run()
    vs = h.vcpus
    assert [v.stats.full_exits for v in vs] == [1, 1]
    assert h.vm.vcpu_totals() == (2, sum(v.stats.fault_ns for v in vs), 0)
    assert h.vm.vcpu_totals()[1] > 0


def test_store_that_filled_the_ring_has_not_retired_at_the_exit():
    """s4: the fault completed (entry pushed, page made writable) but the store did not retire:
    pages 0..190 hold version 1, page 191 still version 0, page 192 untouched."""
    h, _ = first_full_exit()
    assert [h.version(p) for p in (0, 190, 191, 192)] == [1, 1, 0, 0]
    assert not h.wp(191)  # relaxed by the fault
    assert h.wp(192)


def test_kvm_run_again_without_reset_exits_31_at_once_with_no_progress():
    """s4/s11: SOFT_FULL pending and the ring still soft-full -> re-armed, KVM_RUN returns
    exit 31 immediately, no guest progress (no push, no retired store, no time)."""
    h, e = first_full_exit()
    r = h.vcpus[0].ring
    before = (r.dirty_index, r.reset_index, h.vm.version.copy(), h.vm.now)
    for _ in range(3):
        again = h.enter()
        assert again is not None and again.reason == FULL
        assert not h.vcpus[0].in_guest
    assert (r.dirty_index, r.reset_index, h.vm.now) == (before[0], before[1], before[3])
    assert (h.vm.version == before[2]).all()


def test_harvest_without_reset_is_not_enough_to_reenter():
    """s4: the vCPU stays out until userspace harvested AND reset: marking RESET alone does not
    move reset_index, used stays 192."""
    h, _ = first_full_exit()
    assert len(h.harvest()) == 192
    assert h.vcpus[0].ring.used == 192
    e = h.enter()
    assert e is not None and e.reason == FULL


def test_reset_returns_the_number_harvested():
    """s5/s6: harvest 192 entries, KVM_RESET_DIRTY_RINGS returns 192 (QEMU asserts equality);
    reset_index moves to 192, used = 0; a second reset finds nothing: 0."""
    h, _ = first_full_exit()
    assert h.harvest() == list(range(192))
    assert h.reset() == 192
    r = h.vcpus[0].ring
    assert (r.reset_index, r.dirty_index, r.used) == (192, 192, 0)
    assert h.reset() == 0
    assert h.vm.stats.entries_reset == 192


def test_partial_harvest_of_32_lets_the_vcpu_run_exactly_32_more_pushes():
    """s11: harvest 32 (pages 0..31), reset -> 32, used = 160. Re-entry: the retried store to
    page 191 does not fault (page 191 is among the unharvested entries, still writable) and
    retires. Pages 192..223 push 32 entries -> used 192 -> full exit again.
    dirty_index 224; the new entries are 192..223; page 191 was pushed once in total."""
    h, _ = first_full_exit()
    assert h.harvest(limit=32) == list(range(32))
    assert h.reset() == 32
    r = h.vcpus[0].ring
    assert r.used == 160
    assert h.enter() is None  # no longer soft-full: the request is dropped, the vCPU enters
    e = h.run()
    assert e.reason == FULL
    assert r.dirty_index == 224 and r.used == 192
    assert h.ring_offsets(first=192, count=32) == list(range(192, 224))
    assert h.vcpus[0].stats.pushes == 224
    assert h.version(191) == 1 and h.version(222) == 1 and h.version(223) == 0
    # the next harvest is the 160 left plus the 32 new ones, in ring order
    assert h.harvest() == list(range(32, 224))


def test_store_that_filled_the_ring_is_pushed_again_after_full_harvest_and_reset():
    """s4/s11: after harvesting all 192 and resetting, page 191 is write-protected again; the
    store re-executes, faults and pushes 191 first. Next full exit: 191..382 (192 entries),
    page 191 retired exactly once (version 1), page 382 is now the pending store."""
    h, _ = first_full_exit(n_writes=400)
    h.harvest()
    assert h.reset() == 192
    assert h.wp(191)
    assert h.enter() is None
    e = h.run()
    assert e.reason == FULL
    assert h.harvest() == list(range(191, 383))
    assert h.version(191) == 1 and h.version(381) == 1 and h.version(382) == 0


def test_free_running_indices_wrap_around_the_ring():
    """s3: entries are written at dirty_index & (size-1). 600 distinct pages, full harvest at
    each exit: batches [0..191], [191..382], [382..573], then the rest [573..599] at the end
    (each full batch starts with the retried store of the previous one). Positions wrap past
    256; dirty_index = 192 * 3 + 27 = 603."""
    h = Host([list(range(600))])
    batches = []
    e = h.enter_and_run()
    while e.kind == "full":
        batches.append(h.harvest())
        h.reset()
        e = h.enter_and_run()
    assert e.kind == "done"
    batches.append(h.harvest())
    assert h.reset() == 27
    assert batches == [list(range(0, 192)), list(range(191, 383)), list(range(382, 574)), list(range(573, 600))]
    assert h.vcpus[0].ring.dirty_index == 603
    assert h.vcpus[0].ring.lost == 0


# ------------------------------------------------------------------------------ de-duplication
def test_page_written_twice_between_harvests_appears_once_then_again_after_reset():
    """s3 ("write protection de-duplicates") / real-kvm-host.md: writes 5, 6, 5, 7 | sync | 5.
    Sync harvest: [5, 6, 7] (5 once although written twice), reset -> 3. The write to 5 after
    the reset faults again: final harvest [5]. Versions: page 5 written 3 times."""
    h = Host([[5, 6, 5, 7, 5]], [[3]])
    e = h.enter_and_run()
    assert e.kind == "sync"
    assert h.harvest() == [5, 6, 7]
    assert h.version(5) == 2
    assert h.reset() == 3
    assert h.enter_and_run().kind == "done"
    assert h.harvest() == [5]
    assert h.reset() == 1
    assert h.version(5) == 3 and h.version(6) == 1 and h.version(7) == 1
    assert h.vcpus[0].stats.pushes == 4


def test_harvest_order_is_first_write_order():
    """real-kvm-host.md: pages come out in first-write order: 9, 3, 9, 1, 3, 7 -> [9, 3, 1, 7]."""
    h = Host([[9, 3, 9, 1, 3, 7]])
    assert h.enter_and_run().kind == "done"
    assert h.harvest() == [9, 3, 1, 7]


# ------------------------------------------------------------------------------ flags lifecycle
def test_entry_flags_lifecycle_0_dirty_dirty_reset_0():
    """s1/s5/s6: 0 -push-> DIRTY -harvest-> DIRTY|RESET -reset-> 0."""
    h = Host([[1, 2, 3]], [[2]])
    g = h.vcpus[0].ring_gfns
    assert (g["flags"] == 0).all()
    assert h.enter_and_run().kind == "sync"
    assert g["flags"][:4].tolist() == [DIRTY, DIRTY, DIRTY, 0]
    h.harvest(limit=2)
    assert g["flags"][:4].tolist() == [DIRTY | RESET, DIRTY | RESET, DIRTY, 0]
    # the kernel resets only entries with RESET set, from reset_index on
    assert h.reset() == 2
    assert g["flags"][:4].tolist() == [0, 0, DIRTY, 0]
    h.harvest()
    assert g["flags"][:4].tolist() == [0, 0, DIRTY | RESET, 0]
    assert h.reset() == 1
    assert g["flags"][:4].tolist() == [0, 0, 0, 0]
    assert h.vcpus[0].ring.reset_index == 3


def test_userspace_never_skips_an_entry():
    """s5: harvest stops at the first entry whose flags are not DIRTY (e.g. not yet published)
    and resumes there later."""
    h = Host([[10, 11, 12, 13]], [[3]])
    assert h.enter_and_run().kind == "sync"
    g = h.vcpus[0].ring_gfns
    g["flags"][1] = 0  # entry 1 "not yet published"
    assert h.harvest() == [10]
    assert h.readers[0].fetch == 1
    assert h.harvest() == []  # still blocked at entry 1, 12 and 13 are not taken
    g["flags"][1] = DIRTY
    assert h.harvest() == [11, 12, 13]
    assert h.reset() == 4


def test_reset_stops_at_the_first_entry_without_reset():
    """s6: from reset_index, WHILE the entry has RESET set. Entries 0 and 2 marked RESET by
    hand, entry 1 not: the reset returns 1 and leaves entry 2 marked for a later reset."""
    h = Host([[10, 11, 12]], [[2]])
    assert h.enter_and_run().kind == "sync"
    g = h.vcpus[0].ring_gfns
    g["flags"][0] |= RESET
    g["flags"][2] |= RESET
    assert h.reset() == 1
    assert g["flags"][:3].tolist() == [0, DIRTY, DIRTY | RESET]
    assert h.vcpus[0].ring.reset_index == 1
    g["flags"][1] |= RESET
    assert h.reset() == 2
    assert h.vcpus[0].ring.reset_index == 3


def test_reset_follows_the_reset_flag_past_dirty_index():
    """kvm_dirty_ring_reset loops while the entry at reset_index has RESET; it never compares
    with dirty_index. One entry pushed (page 1) and harvested; buggy userspace also marks the
    never-pushed entry 1 RESET: the reset counts both, reset_index (2) passes dirty_index (1)
    and the u32 used wraps to 2^32 - 1: soft-full and full. The zeroed entry (slot 0,
    offset 0) coalesces with (0, 1) into one re-protect call. No request is pending, so the
    vCPU enters; its next push finds the ring full (the kernel's WARN: counted as lost),
    lands in entry 1 and brings used to 0: no request, no exit. Userspace harvests that entry
    (its fetch index is 1), but the reset starts at 2 and finds nothing: entry 1 stays
    DIRTY|RESET behind reset_index."""
    h = Host([[1, 5]], [[0]])
    assert h.enter_and_run().kind == "sync"
    g = h.vcpus[0].ring_gfns
    assert h.harvest() == [1]
    g["flags"][1] = RESET
    calls = h.vm.stats.reprotect_calls
    assert h.reset() == 2
    r = h.vcpus[0].ring
    assert (r.reset_index, r.dirty_index, r.used) == (2, 1, (1 << 32) - 1)
    assert r.soft_full() and r.full()
    assert g["flags"][:2].tolist() == [0, 0]
    assert h.vm.stats.reprotect_calls == calls + 1
    assert h.wp(0) and h.wp(1)
    assert h.enter_and_run().kind == "done"
    assert (r.lost, r.dirty_index, r.used, h.version(5)) == (1, 2, 0, 1)
    assert h.harvest() == [5]
    assert h.reset() == 0
    assert g["flags"][1] == DIRTY | RESET


def test_reset_two_past_dirty_index_leaves_the_vcpu_exiting_full():
    """As above with entries 1 and 2 marked: reset 3, used = 2^32 - 2. The next push makes it
    2^32 - 1 >= soft limit: SOFT_FULL, exit 31 before the store retires; KVM_RUN exits 31 again
    at once (the u32 used stays 2^32 - 1 until a push or a reset moves it)."""
    h = Host([[1, 5]], [[0]])
    assert h.enter_and_run().kind == "sync"
    g = h.vcpus[0].ring_gfns
    g["flags"][0] |= RESET
    g["flags"][1:3] = RESET
    assert h.reset() == 3
    r = h.vcpus[0].ring
    assert r.used == (1 << 32) - 2
    assert h.enter_and_run().reason == FULL
    assert (r.lost, r.used, h.version(5)) == (1, (1 << 32) - 1, 0)
    assert h.enter().reason == FULL


def test_reset_of_a_ring_marked_all_over_stops_after_one_lap():
    """kvm_dirty_ring_reset sets each entry it resets to 0, so with every entry marked RESET
    one call resets each entry once: the whole ring (256), bounded as the kernel is; a second
    call finds entry 0 clear and resets nothing."""
    h = Host([[1]])
    assert h.enter_and_run().kind == "done"
    g = h.vcpus[0].ring_gfns
    g["flags"][:] = RESET
    assert h.reset() == 256
    r = h.vcpus[0].ring
    assert (r.reset_index, r.dirty_index) == (256, 1)
    assert not g["flags"].any()
    assert h.reset() == 0


# ------------------------------------------------------------------------------ the sync after a retried store
def test_sync_after_the_store_that_filled_the_ring_still_happens():
    """s4 + the trace contract (ringenv/replay.py: the guest exits after each sync index): the
    store at write index 191 fills the ring (full exit, store not retired); after the reset it
    re-executes, faults and pushes 191 again, RETIRES, and then the guest's sync MMIO exit must
    follow. Expected harvests: full [0..191], sync [191], final [192..199]; resets 192, 1, 8."""
    out = replay_trace({"slot_pages": 1024, "ring_entries": 256, "reap_scope": "all",
                        "vcpus": [{"writes": list(range(200)), "syncs": [191]}]})
    v = out["vcpus"][0]
    assert [(b["trigger"], b["offsets"]) for b in v["batches"]] == [
        ("full", list(range(192))), ("sync", [191]), ("final", list(range(192, 200)))]
    assert out["resets"] == [192, 1, 8]


# ------------------------------------------------------------------------------ through replay_trace
def test_replay_300_writes_one_full_exit():
    """Contract of ringenv/replay.py on the sequence above: 300 distinct pages, ring 256:
    full [0..191] (reset 192), then 191 re-pushed + 192..299 = 109 entries at the end."""
    out = replay_trace({"slot_pages": 1024, "ring_entries": 256, "reap_scope": "all",
                        "vcpus": [{"writes": list(range(300)), "syncs": []}]})
    assert out["profile"] == "arm64-4k"
    assert (out["ring_entries"], out["soft_limit"]) == (256, 192)
    assert out["resets"] == [192, 109]
    v = out["vcpus"][0]
    assert (v["full_exits"], v["lost"], v["resets"]) == (1, 0, [192])
    assert v["batches"] == [{"trigger": "full", "offsets": list(range(192))},
                            {"trigger": "final", "offsets": list(range(191, 300))}]


def test_replay_exactly_soft_limit_writes():
    """192 distinct pages: the LAST write fills the ring -> full [0..191]; after the reset the
    store re-executes and pushes 191 again: final [191]; resets [192, 1]."""
    out = replay_trace({"slot_pages": 512, "ring_entries": 256, "reap_scope": "all",
                        "vcpus": [{"writes": list(range(192))}]})
    assert out["resets"] == [192, 1]
    assert [b["offsets"] for b in out["vcpus"][0]["batches"]] == [list(range(192)), [191]]


def test_replay_191_writes_never_exit_full():
    """191 pushes stay below the soft limit 192: no full exit, one final batch."""
    out = replay_trace({"slot_pages": 512, "ring_entries": 256, "reap_scope": "all",
                        "vcpus": [{"writes": list(range(191))}]})
    assert out["resets"] == [191]
    assert out["vcpus"][0]["full_exits"] == 0


def test_replay_scope_all_drains_the_other_vcpus_ring():
    """s9/real-kvm-host.md: a full exit on one vCPU that reaps ALL rings drains the others too.
    Two vCPUs on disjoint pages; the first full exit harvests vCPU 0's 192 entries and whatever
    vCPU 1 had pushed; that reset returns the sum. Every full exit's own batch is 192."""
    out = replay_trace({"slot_pages": 2048, "ring_entries": 256, "reap_scope": "all",
                        "vcpus": [{"writes": list(range(0, 500))}, {"writes": list(range(1024, 1524))}]})
    v0, v1 = out["vcpus"]
    assert v0["full_exits"] + v1["full_exits"] >= 2
    first = [b for v in (v0, v1) for b in v["batches"][:1]]
    assert out["resets"][0] == sum(len(b["offsets"]) for b in first)
    assert all(b["trigger"] == "full" for b in first)
    assert sorted(len(b["offsets"]) for b in first)[-1] == 192
    # nothing lost: every written page was harvested at least once
    seen = {o for v in (v0, v1) for b in v["batches"] for o in b["offsets"]}
    assert seen == set(range(0, 500)) | set(range(1024, 1524))
    assert v0["lost"] == v1["lost"] == 0


@pytest.mark.parametrize("scope", ["all", "self"])
def test_replay_every_full_exit_batch_is_soft_limit(scope):
    """real-kvm-host.md: every KVM_EXIT_DIRTY_RING_FULL found the ring holding exactly its
    soft limit, also with several vCPUs. With scope "self" each full exit harvests only the
    exiting vCPU's ring, so each 'full' batch of a vCPU is exactly 192."""
    out = replay_trace({"slot_pages": 4096, "ring_entries": 256, "reap_scope": scope,
                        "vcpus": [{"writes": list(range(k * 1000, k * 1000 + 700))} for k in range(3)]})
    for v in out["vcpus"]:
        fulls = [b for b in v["batches"] if b["trigger"] == "full"]
        if scope == "self":
            assert len(fulls) == v["full_exits"] == 3  # 700 pages (+ retries): 192 x 3 = 576 < 703
            assert all(len(b["offsets"]) == 192 for b in fulls)
        assert v["lost"] == 0


# ------------------------------------------------------------------------------ soft limit 0
def test_a_ring_of_exactly_the_reserved_entries_exits_at_every_push_and_then_never_reenters():
    """s2: KVM refuses a ring below reserved * 16 bytes, so one of exactly reserved entries is
    accepted and its soft limit is 0. A custom arm64-4k host with arch_dirty_log_size 192 reserves
    64 + 192 = 256 entries: a 256-entry ring (4096 bytes, PAGE_SIZE). Worked by hand:
    - KVM_RUN: no request is pending (requests are raised by pushes), the vCPU enters;
    - the first store faults, the push makes used 1 >= 0: SOFT_FULL, the exit holds one entry;
    - harvest 1, reset returns 1: used 0, but 0 >= 0 is still soft-full, so every later KVM_RUN
      re-arms the request and exits at once (kvm_dirty_ring_check_request), page 1 never written.
    The simulator used to stop on an assertion when the vCPU was created."""
    prof = load_host_profile("arm64-4k").model_copy(update={"name": "rsvd256", "arch_dirty_log_size": 192})
    assert prof.reserved_entries == 256
    h = Host([[0, 1, 2]], profile=prof, entries=256)
    r = h.vcpus[0].ring
    assert (r.size, r.soft_limit) == (256, 0)
    assert h.enter() is None
    e = h.run()
    assert (e.reason, e.kind) == (FULL, "full") and r.used == 1 and r.dirty_index == 1
    assert h.harvest() == [0] and h.reset() == 1 and r.used == 0
    for n in range(2, 5):
        e = h.enter()
        assert e is not None and (e.reason, e.kind) == (FULL, "full")
        assert h.vcpus[0].stats.full_exits == n and not h.vcpus[0].in_guest
    assert r.dirty_index == 1 and r.lost == 0 and h.vcpus[0].stats.pushes == 1
