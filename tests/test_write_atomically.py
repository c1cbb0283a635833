"""ringenv.config.write_atomically, the one atomic file write (calibrate's profile, the agents'
args.json, CSVs, meta.json, saved models and their statistics): whole or not at all, an existing
file's mode kept, a link's target written, nothing left behind on failure."""

from __future__ import annotations

import os

import pytest

from ringenv.config import write_atomically


def test_writes_the_text_exactly(tmp_path):
    f = tmp_path / "out.csv"
    write_atomically(f, "a,b\r\n1,é\r\n")  # line ends as given (csv writes \r\n), UTF-8
    assert f.read_bytes() == "a,b\r\n1,é\r\n".encode("utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]


def test_writes_bytes_exactly(tmp_path):
    """Bytes (a saved model, pickled statistics) are written as they are."""
    f = tmp_path / "model.zip"
    blob = bytes(range(256)) * 3 + b"\r\n\n"
    write_atomically(f, blob)
    assert f.read_bytes() == blob
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.zip"]


def test_a_new_file_gets_the_umask_s_mode_an_existing_one_keeps_its_own(tmp_path):
    umask = os.umask(0o027)
    try:
        write_atomically(tmp_path / "new", "x")
    finally:
        os.umask(umask)
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o640
    old = tmp_path / "old"
    old.write_text("before")
    old.chmod(0o600)
    write_atomically(old, "after")
    assert old.read_text() == "after" and old.stat().st_mode & 0o777 == 0o600


def test_a_link_is_kept_and_its_target_written(tmp_path):
    target = tmp_path / "target.yaml"
    target.write_text("old")
    link = tmp_path / "link.yaml"
    link.symlink_to(target)
    write_atomically(link, "new")
    assert link.is_symlink() and target.read_text() == "new"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    f = tmp_path / "args.json"
    f.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        write_atomically(f, "half written \ud800")  # a lone surrogate cannot be encoded: fails mid-write
    assert f.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["args.json"]
