"""``python -m ringenv replay FILE`` as a subprocess: the JSON contract of ringenv/replay.py on
a hand-worked trace, and clean errors (ConfigError -> exit 2, KVM errno -> exit 1, no
traceback, the message naming the bad field)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def ringenv(*args, cwd=ROOT):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "ringenv", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def write(tmp_path, obj, name="trace.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


GOOD = {"slot_pages": 1024, "ring_entries": 256, "reap_scope": "all",
        "vcpus": [{"writes": list(range(300)) + [5], "syncs": [300]}]}


def test_replay_prints_the_contract_json(tmp_path):
    """arm64-4k, ring 256 (soft 192), 300 distinct pages then page 5 again with a sync after it:
    full exit at the 192nd push: batch [0..191], reset 192; the retried store 191 pushes first,
    then 192..299 and 5 (re-protected by the reset) = 110 entries, then the sync after write
    index 300 (page 5): batch [191..299, 5], reset 110; nothing left at the end (final reset 0,
    no batch recorded because it is empty). The vCPU's exits, in order: full, sync, done. Its
    faults: each page's first write (300), the store re-executed after the full exit and the
    write of page 5 after the reset re-protected them (2)."""
    r = ringenv("replay", write(tmp_path, GOOD))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"profile", "ring_entries", "soft_limit", "resets", "vcpus", "faults"}
    assert (out["profile"], out["ring_entries"], out["soft_limit"]) == ("arm64-4k", 256, 192)
    assert out["resets"] == [192, 110, 0]
    assert len(out["vcpus"]) == 1
    v = out["vcpus"][0]
    assert set(v) == {"full_exits", "lost", "resets", "batches", "exits", "faults"}
    assert (v["full_exits"], v["lost"], v["resets"]) == (1, 0, [192, 110])
    assert v["faults"] == out["faults"] == 302
    assert v["exits"] == ["full", "sync", "done"]
    assert v["batches"] == [{"trigger": "full", "offsets": list(range(192))},
                            {"trigger": "sync", "offsets": list(range(191, 300)) + [5]}]


def test_replay_profile_and_ring_override(tmp_path):
    """--profile x86-nopml --ring-entries 512 (soft 512 - 64 = 448): 300 distinct pages push
    300 entries (< 448, no full exit); the second write to page 5 finds it still writable (no
    reset in between): the sync harvests exactly [0..299]; the final reset finds nothing."""
    r = ringenv("replay", write(tmp_path, GOOD), "--profile", "x86-nopml", "--ring-entries", "512")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["profile"], out["ring_entries"], out["soft_limit"]) == ("x86-nopml", 512, 448)
    assert out["vcpus"][0]["batches"] == [{"trigger": "sync", "offsets": list(range(300))}]
    assert out["resets"] == [300, 0]


def test_a_write_past_the_slot_is_an_mmio_exit_with_no_harvest(tmp_path):
    """``unmapped_pages`` 16 lets the trace write offsets 64..79, past the end of the 64-page
    slot, where no memslot maps: such a store exits as KVM_EXIT_MMIO ("mmio"), pushes nothing
    and userspace re-enters at once (no harvest, no reset). Writes 1, 2, 70 (sync after it), 3,
    79: MMIO exit, then the sync at re-entry (batch [1, 2], reset 2), then 3, the MMIO exit of
    79, done; the final harvest [3]."""
    trace = {"slot_pages": 64, "unmapped_pages": 16, "ring_entries": 256, "reap_scope": "all",
             "vcpus": [{"writes": [1, 2, 70, 3, 79], "syncs": [2]}]}
    r = ringenv("replay", write(tmp_path, trace))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    v = out["vcpus"][0]
    assert v["exits"] == ["mmio", "sync", "mmio", "done"]
    assert v["batches"] == [{"trigger": "sync", "offsets": [1, 2]}, {"trigger": "final", "offsets": [3]}]
    assert out["resets"] == [2, 1] and v["resets"] == [2] and v["full_exits"] == 0


CONFIG_ERRORS = [
    # (trace mutation, text that must appear in the message)
    ({"colour": "red"}, ["unknown key", "colour"]),
    ({"vcpus": [{"writes": [1, 1024]}]}, ["trace.vcpus[0].writes", "1024"]),
    ({"vcpus": [{"writes": [-1]}]}, ["trace.vcpus[0].writes", "-1"]),
    ({"unmapped_pages": 8, "vcpus": [{"writes": [1, 1032]}]}, ["trace.vcpus[0].writes", "1032", "0..1031"]),
    ({"unmapped_pages": -1}, ["trace.unmapped_pages", "-1"]),
    ({"unmapped_pages": True}, ["trace.unmapped_pages", "True"]),
    ({"reap_scope": "mine"}, ["trace.reap_scope", "mine"]),
    ({"slot_pages": 0}, ["trace.slot_pages"]),
    ({"vcpus": [{"writes": [1], "syncs": [3]}]}, ["trace.vcpus[0].syncs"]),
    ({"vcpus": [{"writes": [1], "reads": [3]}]}, ["trace.vcpus[0]"]),
]


@pytest.mark.parametrize("mutation,needles", CONFIG_ERRORS)
def test_bad_trace_is_a_config_error_exit_2(tmp_path, mutation, needles):
    trace = {**GOOD, **mutation}
    r = ringenv("replay", write(tmp_path, trace))
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    assert r.stdout == ""
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def test_missing_key_names_it(tmp_path):
    trace = {k: v for k, v in GOOD.items() if k != "ring_entries"}
    r = ringenv("replay", write(tmp_path, trace))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "ring_entries" in r.stderr


def test_not_json_and_missing_file_exit_2(tmp_path):
    r = ringenv("replay", write(tmp_path, "{not json"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "JSON" in r.stderr
    r = ringenv("replay", tmp_path / "nope.json")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "nope.json" in r.stderr


@pytest.mark.parametrize("entries,errno_name", [
    (100, "EINVAL"),      # 1600 bytes: not a power of two (s2)
    (128, "EINVAL"),      # 2048 bytes < PAGE_SIZE 4096 on arm64-4k (s2)
    (131072, "E2BIG"),    # 2 MiB > 65536 * 16 (s2)
])
def test_ring_size_not_accepted_names_the_field_and_the_errno(tmp_path, entries, errno_name):
    """The ring size reaches KVM_ENABLE_CAP, which fails with the kernel's errno (s2). The trace
    is bad input: exit 2, the field named (trace.ring_entries), KVM's errno and the accepted
    sizes in the message, no traceback."""
    r = ringenv("replay", write(tmp_path, {**GOOD, "ring_entries": entries}))
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    assert errno_name in r.stderr
    assert "trace.ring_entries" in r.stderr and "accepted: 256, 512" in r.stderr
    assert r.stdout == ""


def test_a_refused_ring_entries_override_names_the_flag(tmp_path):
    """--ring-entries replaces the trace's ring_entries: a size KVM refuses is blamed on it."""
    r = ringenv("replay", write(tmp_path, GOOD), "--ring-entries", 100)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--ring-entries" in r.stderr and "trace.ring_entries" not in r.stderr and "EINVAL" in r.stderr


def test_ring_size_fine_on_one_profile_rejected_on_another(tmp_path):
    """256 entries = 4096 B is accepted on arm64-4k but below 576 * 16 = 9216 B on x86-pml."""
    r = ringenv("replay", write(tmp_path, GOOD), "--profile", "x86-pml")
    assert r.returncode == 2 and "EINVAL" in r.stderr and "Traceback" not in r.stderr
    assert "accepted: 1024, 2048" in r.stderr


def test_unknown_profile_exit_2(tmp_path):
    r = ringenv("replay", write(tmp_path, GOOD), "--profile", "sparc-8k")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "sparc-8k" in r.stderr


def test_timing_dependent_names_what_makes_a_real_run_vary():
    from ringenv.replay import timing_dependent

    def trace(scope, *vcpus):
        return {"slot_pages": 64, "reap_scope": scope, "vcpus": list(vcpus)}

    assert timing_dependent(trace("all", {"writes": [1, 2]})) is None
    assert timing_dependent(trace("self", {"writes": [1, 2]}, {"writes": [3]})) is None
    assert "shared pages" in timing_dependent(trace("self", {"writes": [1, 2]}, {"writes": [2]}))
    assert "reap_scope 'all'" in timing_dependent(trace("all", {"writes": [1]}, {"writes": [3]}))
    # a read of fresh memory logs nothing, nor does an access past the slot (MMIO): no shared logged page
    assert timing_dependent(trace("self", {"writes": [5, 1], "reads": [0]}, {"writes": [5]})) is None
    assert timing_dependent(trace("self", {"writes": [64, 1]}, {"writes": [64, 2]})) is None
    # with populated memory a read maps a writable page, which x86 (the real KVM here) logs: a page
    # two vCPUs touch, read or written, is logged by whichever thread gets there first
    populated = {**trace("self", {"writes": [5, 1], "reads": [0]}, {"writes": [5]}), "populated": True}
    assert "shared pages" in timing_dependent(populated) and "populated" in timing_dependent(populated)
    reads_only = {**trace("self", {"writes": [3], "reads": [0]}, {"writes": [3], "reads": [0]}), "populated": True}
    assert "shared pages" in timing_dependent(reads_only)
    disjoint = {**trace("self", {"writes": [3], "reads": [0]}, {"writes": [4]}), "populated": True}
    assert timing_dependent(disjoint) is None


def test_with_bitmap_on_a_host_without_it_names_the_field(tmp_path):
    r = ringenv("replay", write(tmp_path, {**GOOD, "with_bitmap": True}), "--profile", "x86-nopml")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "trace.with_bitmap: true is refused" in r.stderr and "EINVAL" in r.stderr


WRAPS = (1 << 28) + 256  # entries: 2^32 + 4096 bytes, which KVM_ENABLE_CAP's u32 size reads as 4096


@pytest.mark.parametrize("override, entries, code", [(True, WRAPS, "EINVAL"), (False, WRAPS, "EINVAL"),
                                                     (False, 1 << 28, "E2BIG")])
def test_ring_entries_whose_bytes_do_not_fit_32_bits_are_refused(tmp_path, override, entries, code):
    """KVM_ENABLE_CAP reads the ring size as a u32: 2^28 + 256 entries would be enabled as a
    256-entry ring while the report said 268435712 (soft limit 192). Refused as too big (EINVAL
    if no power of two, as KVM checks that first), the field named and the accepted sizes
    listed, as for any size KVM refuses."""
    if override:
        r = ringenv("replay", write(tmp_path, GOOD), "--ring-entries", entries)
        field = "ring_entries (--ring-entries)"
    else:
        r = ringenv("replay", write(tmp_path, {**GOOD, "ring_entries": entries}))
        field = "trace.ring_entries"
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith(f"ringenv replay: {field}: {entries} entries ({entries * 16} bytes)"), r.stderr
    assert code in r.stderr and "32-bit" in r.stderr
    assert "accepted: 256, 512," in r.stderr and r.stderr.rstrip().endswith(", 65536")


def test_a_directory_as_trace_is_named_a_directory(tmp_path):
    r = ringenv("replay", tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "is a directory" in r.stderr and "no such file" not in r.stderr, r.stderr


def test_a_trace_not_utf8_says_json_only(tmp_path):
    p = tmp_path / "t.json"
    p.write_bytes(b'{"slot_pages": 1\xff}')
    r = ringenv("replay", p)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "not UTF-8" in r.stderr and "accepted: a UTF-8 JSON file" in r.stderr and "YAML" not in r.stderr, r.stderr
