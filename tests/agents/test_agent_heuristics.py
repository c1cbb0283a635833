"""The heuristic collectors behave as specified on hand-made observations (agents/heuristics.py),
and their action encoding agrees with the environment's own."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import ringenv  # noqa: F401
from agents.common import EnvFacts, parse_overrides
from agents.heuristics import (DEFAULT_SET, FillWatermark, Fixed, RateProportional, heuristic_env_kwargs,
                               is_heuristic, make_heuristic)

from ringenv.env import OBS_FIELDS

SIZES = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
INTERVALS = (10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0)
LINK = 1.25e9  # 10 GbE, bytes/s
FACTS = EnvFacts(ring_sizes=SIZES, intervals_ms=INTERVALS, link_Bps=LINK, page_size=4096, vcpus=8,
                 reserved_entries=64, control_interval_ms=200.0)


def obs(fill_max=0.0, fill_mean=0.0, rate_Bps=0.0, sampled_Bps=0.0, ring=4096, interval_ms=1000.0, fixed=True):
    """An observation as MigrationEnv builds it (only the fields the heuristics read matter)."""
    o = np.zeros(len(OBS_FIELDS), dtype=np.float32)
    o[0], o[1], o[2], o[3] = fill_max, fill_mean, rate_Bps / LINK, sampled_Bps / LINK
    if fixed:
        o[12], o[13], o[14] = np.log2(ring) / 16, np.log10(interval_ms) / 4, 1.0
    return o


def decoded(policy, o):
    action, _ = policy.predict(o)
    return FACTS.decode(action)


def pages_per_vcpu_s_to_Bps(pages: float) -> float:
    return pages * 4096 * 8


def test_qemu_default_is_4096_entries_and_one_second():
    p = make_heuristic("qemu", FACTS)
    for o in (obs(fixed=False), obs(0.9, 0.5, 5e8), obs()):
        assert decoded(p, o) == (4096, 1000.0)


def test_fixed_holds_its_grid_member():
    p = make_heuristic("fixed:65536:5000", FACTS)
    assert decoded(p, obs(fixed=False)) == (65536, 5000.0)
    assert decoded(p, obs(0.99, 0.9, 1e9)) == (65536, 5000.0)
    assert p.name == "fixed 65536/5000ms"


def test_watermark_interval_keeps_the_fullest_ring_under_the_threshold():
    """4096 entries: soft limit 4032. 2000 entries/s per vCPU, skew 1 (fill_max == fill_mean):
    a 0.5 watermark is 2016 entries, reached in 1.008 s: the longest interval <= that is 1000 ms."""
    p = FillWatermark(FACTS, threshold=0.5)
    rate = pages_per_vcpu_s_to_Bps(2000)
    assert decoded(p, obs(0.1, 0.1, rate)) == (4096, 1000.0)
    # a hot vCPU filling twice as fast as the mean: half the time -> 500 ms
    assert decoded(p, obs(0.2, 0.1, rate)) == (4096, 500.0)
    # ten times the rate: 100 ms
    assert decoded(p, obs(0.1, 0.1, 10 * rate)) == (4096, 100.0)
    # the longest interval the prediction allows, for any rate: growth x interval <= threshold
    for pages in (50, 300, 1000, 5000, 20000, 80000):
        ring, ms = decoded(p, obs(0.1, 0.1, pages_per_vcpu_s_to_Bps(pages)))
        growth = pages / 4032
        assert growth * ms / 1000 <= 0.5 or ms == INTERVALS[0]
        longer = [m for m in INTERVALS if m > ms]
        assert not longer or growth * longer[0] / 1000 > 0.5


def test_watermark_idle_guest_gets_the_longest_interval():
    assert decoded(FillWatermark(FACTS), obs(0.0, 0.0, 0.0)) == (4096, 5000.0)


def test_watermark_over_the_threshold_harvests_within_a_control_interval():
    p = FillWatermark(FACTS, threshold=0.5)
    assert decoded(p, obs(0.7, 0.3, pages_per_vcpu_s_to_Bps(10))) == (4096, 200.0)


def test_watermark_bigger_ring_allows_longer_intervals():
    rate = pages_per_vcpu_s_to_Bps(4000)
    small = decoded(FillWatermark(FACTS, ring_entries=4096), obs(0.1, 0.1, rate, ring=4096))
    big = decoded(FillWatermark(FACTS, ring_entries=65536), obs(0.1, 0.1, rate, ring=65536))
    assert big[1] > small[1]


def test_watermark_first_action_uses_the_sampled_rate():
    p = FillWatermark(FACTS, threshold=0.5)
    # the first observation: nothing but the pre-migration sample
    assert decoded(p, obs(sampled_Bps=pages_per_vcpu_s_to_Bps(200), fixed=False)) == (4096, 5000.0)
    assert decoded(p, obs(sampled_Bps=pages_per_vcpu_s_to_Bps(20000), fixed=False))[1] <= 100.0


def test_watermark_auto_ring_grows_with_the_sampled_rate():
    """auto: the smallest ring whose half holds 1 s of the sampled rate x the default skew 1.5."""
    p = FillWatermark(FACTS, threshold=0.5, ring_entries="auto")
    rings = [decoded(p, obs(sampled_Bps=pages_per_vcpu_s_to_Bps(r), fixed=False))[0] for r in (0, 500, 2000, 8000, 1e6)]
    assert rings == sorted(rings)
    assert rings[0] == 256 and rings[-1] == 65536
    # 2000 pages/s x 1.5 = 3000 entries -> 0.5 x soft >= 3000 -> soft >= 6000: 8192 (soft 8128)
    assert rings[2] == 8192
    # later steps keep the ring the environment fixed
    assert decoded(p, obs(0.1, 0.1, 0.0, ring=8192))[0] == 8192


def test_rate_proportional_harvests_every_mib_dirtied():
    p = RateProportional(FACTS, mib=64)
    # 64 MiB at 640 MiB/s: every 100 ms; at 64 MiB/s: every 1000 ms; at 32 MiB/s: 2000 ms
    for mibps, ms in ((640, 100.0), (64, 1000.0), (32, 2000.0)):
        assert decoded(p, obs(rate_Bps=mibps * (1 << 20))) == (4096, ms)
    assert decoded(p, obs(rate_Bps=0.0)) == (4096, 5000.0)
    assert decoded(p, obs(rate_Bps=1e12 / 8)) == (4096, 10.0)  # clipped to the grid
    # the first action uses the pre-migration sample
    assert decoded(p, obs(sampled_Bps=640 * (1 << 20), fixed=False)) == (4096, 100.0)


def test_random_is_seeded_and_valid():
    p = make_heuristic("random", FACTS)
    p.reset(5)
    a = [tuple(p.predict(obs())[0]) for _ in range(50)]
    p.reset(5)
    b = [tuple(p.predict(obs())[0]) for _ in range(50)]
    assert a == b
    assert len(set(a)) > 10
    assert all(0 <= i < len(SIZES) and 0 <= j < len(INTERVALS) for i, j in a)


def test_random_seed_gives_another_stream_per_seed_and_its_own_name():
    """random draws from the episode's seed; random:SEED from both, so random:0 and random:7
    differ on the same episode (and from random), each the same on a rerun."""
    def actions(spec, episode_seed=5):
        p = make_heuristic(spec, FACTS)
        p.reset(episode_seed)
        return p.name, [tuple(p.predict(obs())[0]) for _ in range(30)]

    (n, plain), (n0, r0), (n7, r7) = actions("random"), actions("random:0"), actions("random:7")
    assert (n, n0, n7) == ("random", "random 0", "random 7")
    assert len({tuple(plain), tuple(r0), tuple(r7)}) == 3
    assert actions("random:7") == (n7, r7) and actions("random:7", 6)[1] != r7


def test_a_rate_policy_names_its_ring_when_not_the_default():
    assert make_heuristic("rate:64", FACTS).name == "rate 64MiB"
    assert make_heuristic("rate:64:16384", FACTS).name == "rate 64MiB ring 16384"


def test_a_bad_watermark_threshold_gets_no_ring_hint():
    with pytest.raises(ValueError) as e:
        make_heuristic("watermark:0", FACTS)
    assert "threshold 0.0: expected 0 < threshold <= 1" in str(e.value) and "ENTRIES is 4096" not in str(e.value)


def test_predict_batches_like_a_model():
    p = FillWatermark(FACTS)
    batch = np.stack([obs(0.1, 0.1, pages_per_vcpu_s_to_Bps(r)) for r in (100, 2000, 20000)])
    actions, state = p.predict(batch, state=None, episode_start=np.ones(3, bool), deterministic=True)
    assert actions.shape == (3, 2) and state is None
    assert [FACTS.decode(a)[1] for a in actions] == [5000.0, 1000.0, 100.0]


def test_flattened_actions_for_the_discrete_env():
    facts = EnvFacts(**{**FACTS.__dict__, "flatten": True})
    p = Fixed(facts, 65536, 5000)
    a, _ = p.predict(obs())
    assert int(a) == 8 * 9 + 8 and facts.decode(a) == (65536, 5000.0)


def test_specs_and_errors():
    for spec in DEFAULT_SET:
        assert is_heuristic(spec)
        make_heuristic(spec, FACTS)
    assert heuristic_env_kwargs("bitmap") == {"collector": "bitmap"} and heuristic_env_kwargs("qemu") == {}
    for bad in ("nope", "fixed:4096", "watermark:2", "rate:-1", "fixed:x:1"):
        with pytest.raises(ValueError, match="policy"):
            make_heuristic(bad, FACTS)
    assert not is_heuristic("runs/train/ppo-s0")


def test_facts_from_env_agree_with_the_env_encoding():
    for env_id in ("ringenv/Migration-v0", "ringenv/MigrationDiscrete-v0"):
        env = gym.make(env_id, split="test", vm={"memory": "1GiB", "vcpus": 2})
        facts = EnvFacts.from_env(env)
        assert facts.vcpus == 2 and facts.page_size == 4096 and facts.flatten == (env_id.endswith("Discrete-v0"))
        for n, ms in ((256, 10), (4096, 1000), (65536, 5000), (3000, 70)):
            assert np.array_equal(np.asarray(facts.encode(n, ms)), np.asarray(env.unwrapped.encode_action(n, ms)))
            assert facts.decode(facts.encode(n, ms)) == env.unwrapped.decode_action(env.unwrapped.encode_action(n, ms))
        env.close()


def test_parse_overrides_nests_and_reads_yaml_scalars():
    assert parse_overrides(["vm.memory=1GiB", "vm.vcpus=2", "max_episode_s=60", "reward.scale=0.5"]) == {
        "vm": {"memory": "1GiB", "vcpus": 2}, "max_episode_s": 60, "reward": {"scale": 0.5}}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["vm.vcpus"])


@pytest.mark.parametrize("spec, words", [
    ("fixed:4096:150", ["interval 150 ms", "intervals_ms", "10, 20, 50, 100, 200, 500, 1000, 2000, 5000"]),
    ("fixed:100000:7000", ["ENTRIES 100000", "ring_sizes", "256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536"]),
    ("fixed:3000:1000", ["ENTRIES 3000", "ring_sizes", "256, 512"]),
    ("watermark:0.5:3000", ["ENTRIES 3000", "ring_sizes", "65536"]),
    ("rate:64:5000", ["ENTRIES 5000", "ring_sizes", "65536"]),
])
def test_off_grid_numbers_are_rejected_not_snapped(spec, words):
    """A spec whose ring size or interval is not an action of the environment would run the
    nearest one under the requested label: an error naming the spec, the value and the grid."""
    with pytest.raises(ValueError) as e:
        make_heuristic(spec, FACTS)
    msg = str(e.value)
    assert f"policy {spec!r}" in msg, msg
    for w in words:
        assert w in msg, (w, msg)


def test_a_changed_grid_takes_its_own_members():
    facts = EnvFacts(**{**FACTS.__dict__, "ring_sizes": (1024, 4096, 16384), "intervals_ms": (100.0, 150.0, 1000.0)})
    p = make_heuristic("fixed:4096:150", facts)
    assert facts.decode(p.predict(obs())[0]) == (4096, 150.0) and p.name == "fixed 4096/150ms"
    assert make_heuristic("watermark:0.5:16384", facts).ring_entries == 16384
    with pytest.raises(ValueError, match="1024, 4096, 16384"):
        make_heuristic("fixed:65536:1000", facts)  # on the default grid, not on this one


def test_qemu_default_needs_its_grid_members_bitmap_does_not():
    """qemu's label promises 4096 entries and 1000 ms: a grid without them is an error; the bitmap
    baseline ignores its action, so any grid does."""
    facts = EnvFacts(**{**FACTS.__dict__, "ring_sizes": (1024, 2048), "intervals_ms": (100.0, 500.0)})
    with pytest.raises(ValueError, match=r"policy 'qemu'.*4096.*1024, 2048"):
        make_heuristic("qemu", facts)
    with pytest.raises(ValueError, match=r"policy 'watermark'.*4096.*watermark:THRESHOLD:ENTRIES"):
        make_heuristic("watermark", facts)
    assert make_heuristic("bitmap", facts).name == "bitmap"
    assert make_heuristic("watermark:0.5:1024", facts).ring_entries == 1024


@pytest.mark.parametrize("spec, words", [
    ("fixed:x:1000", ["ENTRIES 'x'", "integer"]),
    ("fixed:4096:soon", ["MS 'soon'", "number"]),
    ("watermark:high", ["THRESHOLD 'high'", "number"]),
    ("rate:64:big", ["ENTRIES 'big'", "integer"]),
    ("random:-1", ["SEED -1", ">= 0"]),
])
def test_malformed_numbers_name_the_part_of_the_spec(spec, words):
    with pytest.raises(ValueError) as e:
        make_heuristic(spec, FACTS)
    for w in [f"policy {spec!r}", *words]:
        assert w in str(e.value), (w, str(e.value))
