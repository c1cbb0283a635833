"""Trace files a user brings: every malformed one is a one-line ConfigError naming the field (or
the file) and what is accepted; the readable ones are read whatever their path is (a pipe too)."""

from __future__ import annotations

import io
import json
import os
import sys
import threading

import pytest

from ringenv.config import ConfigError
from ringenv.guest.trace import TraceProgram
from ringenv.replay import MAX_TRACE_PAGES, load_trace, replay_trace, validate_trace


def trace(**kw) -> dict:
    t = {"slot_pages": 16, "ring_entries": 256, "reap_scope": "all", "vcpus": [{"writes": [3]}]}
    t.update(kw)
    return t


@pytest.mark.parametrize("kw, message", [
    ({"unmapped_pages": 10**23}, "trace.unmapped_pages: 100000000000000000000000 is not accepted; expected an "
                                 f"integer in 0..{MAX_TRACE_PAGES - 16} "),
    ({"slot_pages": MAX_TRACE_PAGES + 1}, f"trace.slot_pages: {MAX_TRACE_PAGES + 1} is not accepted; expected an "
                                          "integer in 1..2^40"),
    ({"vcpus": [{"writes": [1, 2, 1.5]}]}, "trace.vcpus[0].writes[2]: 1.5 is not an integer page offset"),
    ({"vcpus": [{"writes": [1, True]}]}, "trace.vcpus[0].writes[1]: True is not an integer page offset"),
    ({"vcpus": [{"writes": [1, 2, 99]}]}, "trace.vcpus[0].writes[2]: offset 99 outside the slot (0..15)"),
    ({"vcpus": [{"writes": "1"}]}, "trace.vcpus[0].writes: '1'; expected a list of integer page offsets"),
    ({"vcpus": [{"writes": [], "syncs": 5}]}, "trace.vcpus[0].syncs: 5; expected a list of indices into writes "
                                             "(empty: there are no writes)"),
])
def test_a_bad_field_is_named_with_its_element_and_what_is_accepted(kw, message):
    with pytest.raises(ConfigError) as e:
        validate_trace(trace(**kw))
    assert str(e.value).startswith(message), str(e.value)


def test_an_offset_past_the_profiles_guest_physical_range_is_refused_not_an_mmio_exit():
    """arm64-4k has 40 IPA bits: 2^28 pages. An access past that is no MMIO exit on the real
    host (the guest cannot even form the address), so the trace is refused, naming the field and
    the largest accepted value; just inside, the store is an mmio exit."""
    limit = 1 << 28
    with pytest.raises(ConfigError) as e:
        replay_trace(trace(unmapped_pages=limit, vcpus=[{"writes": [limit + 5]}]))
    assert str(e.value).startswith(f"trace.unmapped_pages: {limit}: the slot and the unmapped pages end at page "
                                   f"{limit + 16}, past the 40-bit guest-physical range of arm64-4k")
    assert str(e.value).endswith(f"accepted: 0..{limit - 16}")
    out = replay_trace(trace(unmapped_pages=limit - 16, vcpus=[{"writes": [limit - 1, 3]}]))
    assert out["vcpus"][0]["exits"] == ["mmio", "done"]
    assert out["vcpus"][0]["batches"] == [{"trigger": "final", "offsets": [3]}]


def test_the_file_is_read_through_any_readable_path_a_pipe_too(tmp_path):
    """`ringenv replay <(zcat t.json.gz)` passes a /dev/fd pipe: not a regular file, still a trace."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    # a daemon: should load_trace refuse the pipe, the writer blocked on it must not hang the run
    writer = threading.Thread(target=lambda: fifo.write_text(json.dumps(trace())), daemon=True)
    writer.start()
    try:
        assert load_trace(fifo) == trace()
    finally:
        writer.join(timeout=10)
    with pytest.raises(ConfigError, match="TRACE: no such file"):
        load_trace(tmp_path / "nosuch.json")


@pytest.mark.parametrize("text, message", [
    ('{"slot_pages": 16, "slot_pages": 32}', "TRACE t.json: key 'slot_pages' is given twice in one object"),
    ('{"vcpus": [{"writes": [1], "writes": [2]}]}', "TRACE t.json: key 'writes' is given twice in one object"),
    ("[" * 100000 + "]" * 100000, "TRACE t.json: JSON nested too deeply to read"),
    ('{"slot_pages": ' + "9" * 5000 + "}", "TRACE t.json: holds an integer of more than 4300 digits"),
])
def test_json_python_would_misread_or_crash_on_is_a_one_line_error(tmp_path, text, message):
    p = tmp_path / "t.json"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_trace(p)
    assert str(e.value).startswith(message), str(e.value)


def test_a_byte_order_mark_is_skipped(tmp_path):
    p = tmp_path / "t.json"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(trace()).encode())
    assert load_trace(p) == trace()


def test_a_closed_standard_input_is_named(monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)
    with pytest.raises(ConfigError, match="TRACE -: standard input is closed"):
        load_trace("-")
    closed = io.StringIO("{}")
    closed.close()
    monkeypatch.setattr(sys, "stdin", closed)
    with pytest.raises(ConfigError, match="TRACE -: standard input is closed"):
        load_trace("-")


@pytest.mark.parametrize("writes, syncs, reads, message", [
    ([[1, 2, 3]], [[3]], None, "syncs[0][0]: 3 is out of range; accepted: 0..2"),
    ([[1, 2, 3]], [[-1]], None, "syncs[0][0]: -1 is out of range; accepted: 0..2"),  # was dropped
    ([[1, 2, 3]], [[0, -3]], None, "syncs[0][1]: -3 is out of range"),  # was a sync after write 0
    ([[1, -1, 3]], [[]], None, "writes[0][1]: -1 is out of range; accepted: >= 0"),  # was the no-write sentinel
    ([[1.7, 2]], [[]], None, "writes[0][0]: 1.7 is not an integer"),  # was page 1
    ([[1, 2, 3]], [[]], [[-3]], "reads[0][0]: -3 is out of range"),  # was write 0 made a read
    ([[1, 2], [4]], [[], [True]], None, "syncs[1][0]: True is not an integer"),
    ([[1, True]], [[]], None, "writes[0][1]: True is not an integer"),  # numpy makes [1, True] ints
    ([[0, 1]], [[0, True]], None, "syncs[0][1]: True is not an integer"),
])
def test_trace_program_refuses_what_it_would_misread(writes, syncs, reads, message):
    """TraceProgram is public (ringenv.guest): its own checks, not only validate_trace's."""
    with pytest.raises(ValueError) as e:
        TraceProgram(writes, syncs, reads=reads)
    assert str(e.value) == message if message.endswith(("0..2", ">= 0")) else str(e.value).startswith(message)


def test_trace_program_offsets_may_reach_below_its_base_to_gfn_0_not_past_it():
    """Offsets count from ``base_gfn``: -1 from 4096 is gfn 4095 (outside a slot at 4096: an
    mmio exit in tests/kvm/test_stage2.py), -4097 would be gfn -1, the no-write sentinel."""
    assert TraceProgram([[-1, -4096]], [[]], base_gfn=4096).gfn[:2].tolist() == [4095, 0]
    with pytest.raises(ValueError, match=r"writes\[0\]\[0\]: -4097 is out of range; accepted: >= -4096"):
        TraceProgram([[-4097]], [[]], base_gfn=4096)
