"""kvm_replay_trace on the real KVM: the built-in traces against the reference semantics
(docs/reference/kvm-dirty-ring.md, real-kvm-host.md) and, when importable, the simulator."""

from collections import Counter

import pytest

from ringenv.realkvm.guest import unavailable_reason
from ringenv.realkvm.replay import kvm_replay_trace
from ringenv.realkvm.traces import builtin_traces
from ringenv.realkvm.validate import compare

NO_KVM = unavailable_reason()
pytestmark = [pytest.mark.kvm, pytest.mark.skipif(NO_KVM is not None, reason=str(NO_KVM))]

TRACES = builtin_traces()
_real: dict[str, dict] = {}


def real(name: str) -> dict:
    """The real replay of a built-in trace, with its data-slot fault count."""
    if name not in _real:
        _real[name] = kvm_replay_trace(TRACES[name], faults=True)
    return _real[name]


def model(trace: dict, soft_limit: int) -> list[dict]:
    """Per-vCPU expectation for a native guest on x86 reaping only its own ring: a page pushes
    on its first write after a reset; the push reaching the soft limit exits before the store
    retires, so after harvest + reset that store pushes its page again. A read of a page the
    guest has not touched yet maps it: read-only in fresh memory (nothing pushed), writable and
    pushed in ``populated`` memory (x86 make_spte); the read retried after a full exit finds
    its page mapped (write-protected by the reset) and pushes nothing. A read of a mapped page
    does nothing."""
    out = []
    mapped = trace["slot_pages"]  # a write at or past it goes where no memslot maps: MMIO, no push
    read_logs = trace.get("populated", False)
    for prog in trace["vcpus"]:
        ring, syncs, reads = [], set(prog["syncs"]), set(prog.get("reads", []))
        touched: set[int] = set()
        protected = {w for w in prog["writes"] if w < mapped}
        v = {"full_exits": 0, "resets": [], "batches": [], "final": 0}

        def reap(trigger):
            if ring:
                v["batches"].append({"trigger": trigger, "offsets": list(ring)})
            if trigger == "final":
                v["final"] = len(ring)
            else:
                v["resets"].append(len(ring))
            protected.update(ring)
            ring.clear()

        for i, page in enumerate(prog["writes"]):
            if i in reads:
                if page < mapped and page not in touched:
                    touched.add(page)
                    if read_logs and page in protected:
                        protected.discard(page)
                        ring.append(page)
                        if len(ring) >= soft_limit:
                            v["full_exits"] += 1
                            reap("full")  # re-protects it, mapped: the retried read does not fault
                if i in syncs:
                    reap("sync")
                continue
            touched.add(page)
            while page in protected:
                protected.discard(page)
                ring.append(page)
                if len(ring) >= soft_limit:
                    v["full_exits"] += 1
                    reap("full")  # re-protects the page: the retried store pushes it again
            if i in syncs:
                reap("sync")
        reap("final")
        out.append(v)
    return out


@pytest.mark.parametrize("name", TRACES)
def test_builtin_trace_follows_the_reference(name):
    trace, out = TRACES[name], real(name)
    soft = out["soft_limit"]
    assert out["ring_entries"] == trace["ring_entries"] and soft == trace["ring_entries"] - 64
    assert out["profile"] in ("x86-nopml", "x86-pml")
    total = 0
    for v in out["vcpus"]:
        assert v["lost"] == 0
        full = [b for b in v["batches"] if b["trigger"] == "full"]
        assert len(full) == v["full_exits"]
        assert all(len(b["offsets"]) == soft for b in full)  # exits at exactly the soft limit
        for b in v["batches"]:
            assert b["offsets"] and len(set(b["offsets"])) == len(b["offsets"])  # no page twice
        retried_read = any(v_.get("reads") for v_ in trace["vcpus"])  # (the model below checks those)
        for b, nxt in zip(v["batches"], v["batches"][1:]):
            if b["trigger"] == "full" and not retried_read:  # the retried store pushes its re-protected page first
                assert nxt["offsets"][0] == b["offsets"][-1]
        issued = sum(len(b["offsets"]) for b in v["batches"] if b["trigger"] != "final")
        assert sum(v["resets"]) == issued  # "self": each reset returned what was harvested
        total += sum(len(b["offsets"]) for b in v["batches"])
    assert sum(out["resets"]) == total
    # the per-vCPU lists interleave into the top-level one; the final reset comes last
    assert Counter(out["resets"][:-1]) == Counter(r for v in out["vcpus"] for r in v["resets"])

    expect = model(trace, soft)
    for v, e in zip(out["vcpus"], expect):
        assert (v["full_exits"], v["resets"], v["batches"]) == \
            (e["full_exits"], e["resets"], e["batches"])
    assert out["resets"][-1] == sum(e["final"] for e in expect)


def test_ring_entries_override_and_json_shape():
    trace = TRACES["seq-256"]
    out = kvm_replay_trace(trace, ring_entries=512)
    assert (out["ring_entries"], out["soft_limit"]) == (512, 448)
    assert [b["trigger"] for b in out["vcpus"][0]["batches"]] == ["full", "full", "final"]
    assert set(out) == {"profile", "ring_entries", "soft_limit", "resets", "vcpus"}
    assert set(out["vcpus"][0]) == {"full_exits", "lost", "resets", "batches", "exits"}
    assert out["vcpus"][0]["exits"] == ["full", "full", "done"]
    # with the fault counts: each page's first write faults, and so does the store re-executed
    # after each full exit (the reset re-protected its page); the warm-up vCPUs took the code
    # slot's faults
    counted = kvm_replay_trace(trace, ring_entries=512, faults=True)
    assert counted["faults"] == counted["vcpus"][0]["faults"] == \
        len(set(trace["vcpus"][0]["writes"])) + out["vcpus"][0]["full_exits"]
    assert {k: v for k, v in counted.items() if k not in ("faults", "vcpus")} == \
        {k: v for k, v in out.items() if k != "vcpus"}
    assert [{k: x for k, x in v.items() if k != "faults"} for v in counted["vcpus"]] == out["vcpus"]


def test_a_write_to_an_unbacked_address_is_an_mmio_exit_and_the_guest_goes_on():
    """The real kernel: a store to a guest-physical address no memslot maps (the data slot's
    end and beyond) exits with KVM_EXIT_MMIO; the store completes as MMIO (nothing pushed)
    and the next KVM_RUN goes on after it. Every such write of the trace is one "mmio" exit,
    in program order among the full and sync exits, and its page is in no batch."""
    trace = TRACES["unmapped-256"]
    out = real("unmapped-256")
    v, prog = out["vcpus"][0], trace["vcpus"][0]
    past = [w for w in prog["writes"] if w >= trace["slot_pages"]]
    assert past and v["exits"].count("mmio") == len(past)
    assert v["exits"][-1] == "done" and v["exits"].count("sync") == len(prog["syncs"])
    assert v["exits"].count("full") == v["full_exits"] >= 1
    assert all(o < trace["slot_pages"] for b in v["batches"] for o in b["offsets"])


def test_reap_all_conserves_entries():
    """With "all" the split between rings depends on thread timing; the totals do not."""
    trace = dict(TRACES["4vcpu-seq-256"], reap_scope="all")
    out = kvm_replay_trace(trace)
    offsets = [o for v in out["vcpus"] for b in v["batches"] for o in b["offsets"]]
    assert sum(out["resets"]) == len(offsets)
    assert set(offsets) == {w for v in trace["vcpus"] for w in v["writes"]}
    assert len(out["resets"]) == sum(len(v["resets"]) for v in out["vcpus"]) + 1


def test_with_bitmap_is_refused_where_unsupported():
    from ringenv.realkvm.ioctl import KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, KvmSystem

    with KvmSystem() as kvm:
        if kvm.check_extension(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP):
            pytest.skip("this host supports WITH_BITMAP")
    from ringenv.config import ConfigError

    with pytest.raises(ConfigError, match=r"^trace.with_bitmap: true is refused by KVM_ENABLE_CAP on this host .*"
                                          r"EINVAL.*WITH_BITMAP.*; accepted there: false$"):
        kvm_replay_trace(dict(TRACES["sync-at-0"], with_bitmap=True))


@pytest.mark.parametrize("bad", [
    {"slot_pages": 0}, {"reap_scope": "some"}, {"vcpus": []},
    {"vcpus": [{"writes": [16]}]}, {"vcpus": [{"writes": [1], "syncs": [1]}]},
    {"unmapped_pages": 4, "vcpus": [{"writes": [20]}]}, {"unmapped_pages": -1},
])
def test_bad_traces_are_refused(bad):
    with pytest.raises(ValueError, match="trace"):
        kvm_replay_trace(dict(TRACES["sync-at-0"], **bad))


def _simulator():
    try:
        from ringenv.replay import replay_trace
    except ImportError:
        return None
    return replay_trace


@pytest.mark.skipif(_simulator() is None, reason="ringenv.replay.replay_trace not importable")
@pytest.mark.parametrize("name", TRACES)
def test_simulator_is_identical(name):
    from ringenv.realkvm.arch import host_arch

    out = real(name)
    sim = _simulator()(TRACES[name], profile=host_arch().profile_name())
    assert compare(out, sim) is None
    assert out["faults"] == sim["faults"] > 0  # (compared above; stated)


READS = {"slot_pages": 1024, "ring_entries": 256, "reap_scope": "self",
         "vcpus": [{"writes": [5, 6, 6, 7, 8, 8], "syncs": [3], "reads": [0, 1, 4]}]}


@pytest.mark.parametrize("populated,first", [(False, [6, 7]), (True, [5, 6, 7])])
def test_reads_are_loads_and_log_only_a_writable_host_page(populated, first):
    """The guest loads from the pages ``reads`` names. Fresh memory (the host's zero page): a
    read fault maps it read-only and logs nothing; the write to 6 then faults and pushes. With
    the memory written by userspace first (``populated``), x86 maps the read fault writable and
    logs it (make_spte -> mark_page_dirty_in_slot): reads 5 and 6 push, the write to 6 finds
    its page writable. After the sync's reset, the read of 8 (never touched by the guest)
    behaves the same way, and the write to 8 pushes only if the read did not. The simulator
    gives the same."""
    from ringenv.realkvm.arch import host_arch

    if host_arch().name != "x86_64":
        pytest.skip("expected values are x86's (arm64 maps a read fault read-only while logging)")
    trace = dict(READS, populated=populated)
    out = kvm_replay_trace(trace)
    batches = [(b["trigger"], b["offsets"]) for b in out["vcpus"][0]["batches"]]
    assert batches == [("sync", first), ("final", [8])]
    sim = _simulator()
    if sim is not None:
        assert compare(out, sim(trace, profile=host_arch().profile_name())) is None
