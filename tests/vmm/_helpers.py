"""Scaled-down scenarios for the VMM tests.

``small(name, memory)`` is :func:`ringenv.config.scale_scenario`: guest memory, link rate and
every workload rate shrink by the same factor, so M/R and D/R (hence the pre-copy dynamics in
simulated seconds) are kept while the simulation does that factor less work.
"""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout

from ringenv.config import load_scenario, scale_scenario

GiB = 1 << 30


def small(name, memory=1 * GiB, **overrides):
    """``scale_scenario`` to ``memory``, with the checkpoint horizon capped at 30 s."""
    horizon = min(load_scenario(name).checkpoint.horizon_s, 30)
    ck = {"horizon_s": horizon, **overrides.pop("checkpoint", {})}
    return scale_scenario(name, memory, checkpoint=ck, **overrides)


def on_pause(run, record):
    """Call ``record()`` each time ``run`` stops the VM (as it starts to, before the vCPUs park)."""
    pause = run.pause_vm

    def spy():
        record()
        return (yield from pause())

    run.pause_vm = spy


def hold_bql(run, hold_ns):
    """Another thread (a reaper, a sync's merge) takes the big lock now and holds it for
    ``hold_ns``. Returns the time it took the lock."""
    def holder():
        yield run.bql
        run.bql.release_at(run.loop.now + hold_ns)
        yield hold_ns

    run.spawn(holder(), run.PRIO_MAIN, "bql-holder")
    run.advance(run.loop.now)
    assert run.bql.held_at(run.loop.now)
    return run.loop.now


def sleep_starts(run):
    """The throttle sleeps the vCPU threads begin from now on, as (vCPU, start): a list the run
    fills as it goes."""
    starts = []
    sleep = run._throttle_sleep

    def spy(i, start, length):
        if length:
            starts.append((i, start))
        return sleep(i, start, length)

    run._throttle_sleep = spy
    return starts


def ended_at(run, steps, until):
    """Run the process steps ``steps`` (a generator, e.g. ``run.pause_vm()``) in a thread of the
    VMM's own and the run up to ``until``. Returns when the steps ended (None: not by then)."""
    out = {}

    def proc():
        yield from steps
        out["t"] = run.loop.now

    run.spawn(proc(), run.PRIO_MAIN, "steps")
    run.advance(until)
    return out.get("t")


def run_cli(*argv):
    """``ringenv ARGV...`` in this process: (exit code, stdout, stderr)."""
    from ringenv.cli import main
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = main(list(argv))
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def nosplit_scenario_file(path, **fields) -> str:
    """Write a scenario YAML at ``path``: arm64-4k with stage-2 block splitting off (the host
    profile written out in full, as a scenario file takes it), every page in 2 MiB blocks, a
    256 MiB 2-vCPU idle guest on 256-entry rings (``fields`` override top-level fields): one
    write dirties 512 pages, more than a ring's reserved entries hold, so the rings overflow."""
    import yaml

    from ringenv.config import load_host_profile

    host = load_host_profile("arm64-4k").model_copy(update={"split_blocks": False}).model_dump()
    host["name"] = "arm64-4k-nosplit"
    scenario = {"name": "nosplit", "host": host, "vm": {"memory": "256MiB", "vcpus": 2, "block_fraction": 1.0},
                "workload": "idle", "ring_entries": 256, "link": {"gbps": 10, "max_bandwidth_mibps": "link"},
                "checkpoint": {"period_s": 1, "storage_mbps": 2000, "horizon_s": 2}, **fields}
    with open(path, "w") as f:
        yaml.safe_dump(scenario, f)
    return str(path)
