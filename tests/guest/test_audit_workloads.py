"""Workload configs and scale_scenario against their documented behaviour (cases an audit found
failing before their fixes): a config validates again from its own dump, so a scenario with an
inline workload takes overrides; scale_scenario keeps D/R where it says it does."""

from __future__ import annotations

import numpy as np
import pytest

from ringenv.config import ConfigError, load_scenario, load_workload, scale_scenario
from ringenv.vmm.dirtyrate import sample_dirty_rate
from ringenv.vmm.migration import MigrationRun

INLINE_UNIFORM = {"name": "mine", "regions": [{"fraction": 0.5, "rate_mbps": 100}]}


# load_scenario: "A scenario by name, path, mapping or object, with keyword overrides of its
# fields". A dump holds zipf_s=1.0 (the default) in every region: it must validate again.

def test_a_valid_workload_config_validates_again_from_its_dump():
    cfg = load_workload("oltp")  # uniform and scan regions
    again = load_workload(cfg.model_dump())
    assert again.regions == cfg.regions


def test_a_scenario_with_an_inline_workload_takes_keyword_overrides():
    cfg = load_scenario("default", workload=INLINE_UNIFORM)
    again = load_scenario(cfg, seed=3)
    assert again.seed == 3 and again.workload_config.regions[0].pattern == "uniform"


def test_scale_scenario_and_a_session_accept_a_scenario_with_an_inline_workload():
    cfg = load_scenario("default", workload=INLINE_UNIFORM)
    small = scale_scenario(cfg, "1GiB")  # README: pass scale_scenario(...) as scenario=
    assert small.vm.memory == 1 << 30
    run = MigrationRun(small, seed=1)  # Session(scenario, seed=...) re-loads the scenario with the seed
    assert run.cfg.seed == 1
    run.close()


# scale_scenario: D/R "within a few % where the guest has CPU time to spare and no Zipf region";
# it moves by the documented amounts for Zipf regions and fault-bound guests. The rate is the
# pre-migration sample (distinct pages over 1 s), seeds 0 and 1.
def _scaled_rate_ratio(workload):
    small = scale_scenario("default", "1GiB")
    f = small.vm.memory / load_scenario("default").vm.memory
    full = np.mean([sample_dirty_rate("default", workload=workload, seed=s)[0] for s in (0, 1)])
    scaled = np.mean([sample_dirty_rate(small, workload=workload, seed=s)[0] for s in (0, 1)])
    return scaled / f / full


@pytest.mark.parametrize("workload", ["oltp", "oltp-heavy", "uniform-800", "idle", "jvm-gc", "bursty"])
def test_scale_scenario_keeps_the_dirty_rate_relative_to_the_link(workload):
    assert _scaled_rate_ratio(workload) == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("workload, ratio", [("memcached", 1.18), ("web", 1.11), ("analytics", 1.18),
                                             ("bulk-load", 1.10), ("stream-scan", 1.07)])
def test_scale_scenario_moves_zipf_and_fault_bound_rates_as_documented(workload, ratio):
    assert _scaled_rate_ratio(workload) == pytest.approx(ratio, abs=0.02)


def test_a_zipf_exponent_on_another_pattern_is_still_refused():
    with pytest.raises(ConfigError, match="zipf_s: 1.2 is given for pattern 'uniform'"):
        load_workload({"name": "w", "regions": [{"fraction": 0.5, "rate_mbps": 10, "zipf_s": 1.2}]})
