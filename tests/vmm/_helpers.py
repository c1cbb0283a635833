"""Scaled-down scenarios for the VMM tests.

``small(name, f)`` shrinks guest memory, link rate and every workload rate by the same factor
``f``: M/R and D/R (hence the pre-copy dynamics in simulated seconds) are kept while the
simulation does ``f`` times less work.
"""

from __future__ import annotations

from ringenv.config import load_scenario

GiB = 1 << 30


def small(name, memory=1 * GiB, **overrides):
    cfg = load_scenario(name)
    f = memory / cfg.vm.memory
    link = {"gbps": cfg.link.gbps * f}
    if cfg.link.max_bandwidth_mibps != "link":
        link["max_bandwidth_mibps"] = cfg.link.max_bandwidth_mibps * f
    ck = {"storage_mbps": cfg.checkpoint.storage_mbps * f, "horizon_s": min(cfg.checkpoint.horizon_s, 30)}
    base = {"vm": {"memory": memory}, "rate_scale": cfg.rate_scale * f, "link": link, "checkpoint": ck}
    for k, v in overrides.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return load_scenario(cfg, **base)
