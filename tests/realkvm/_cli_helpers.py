"""Helpers of the real-KVM tool tests: the CLI in-process, a trace file, the open descriptors."""

import gc
import json
import os

from ringenv.cli import main


def cli(capsys, *argv):
    """``ringenv ARGV`` in-process: (exit code, stdout, stderr lines)."""
    code = main(list(argv))
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    return code, cap.out, cap.err.strip().splitlines()


def write(tmp_path, trace, name="t.json"):
    """``trace`` as JSON in ``tmp_path``; its path."""
    path = tmp_path / name
    path.write_text(json.dumps(trace))
    return str(path)


def open_fds() -> int:
    """This process's open file descriptors (after a collection: closed objects release theirs)."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))
