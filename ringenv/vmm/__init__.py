"""Userspace, as QEMU does it: ring harvesting, collectors, throttles, migration, checkpointing.

Entry points: :class:`MigrationRun` and :class:`CheckpointRun` (steppable runs of a scenario,
``advance(until_ns)`` / ``run()`` / ``metrics()``), :func:`make_run` (either, by the scenario's
``kind``), :class:`Metrics` (the record they report)."""

from .metrics import Metrics


def make_run(scenario=None, *, seed=None, **overrides):
    """A :class:`MigrationRun` or :class:`CheckpointRun` of ``scenario`` (by its ``kind``)."""
    from ..config import load_scenario

    cfg = load_scenario(scenario, **({"seed": seed} if seed is not None else {}), **overrides)
    if cfg.kind == "checkpoint":
        from .checkpoint import CheckpointRun

        return CheckpointRun(cfg)
    from .migration import MigrationRun

    return MigrationRun(cfg)


def __getattr__(name):
    if name == "MigrationRun":
        from .migration import MigrationRun

        return MigrationRun
    if name == "CheckpointRun":
        from .checkpoint import CheckpointRun

        return CheckpointRun
    if name == "Session":
        from .session import Session

        return Session
    raise AttributeError(name)


__all__ = ["CheckpointRun", "Metrics", "MigrationRun", "Session", "make_run"]
