"""Scaled-down scenarios for the VMM tests.

``small(name, memory)`` is :func:`ringenv.config.scale_scenario`: guest memory, link rate and
every workload rate shrink by the same factor, so M/R and D/R (hence the pre-copy dynamics in
simulated seconds) are kept while the simulation does that factor less work.
"""

from __future__ import annotations

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
