"""A stable-baselines3 actor-critic policy that knows the ring size is chosen once.

The environment takes the ring size from the first action of an episode and ignores the ring-size
component afterwards (``info["ring_size_ignored"]``). A plain MultiDiscrete policy still samples
that component at every step and PPO/A2C push its log-probability up or down with the step's
advantage, which has nothing to do with it: for an episode of ~8 decisions (300-odd 50 ms steps
held 40 at a time), one signal and the rest noise terms on the ring head. :class:`FixedRingPolicy`
masks the ring head once the ring is fixed (observation ``ring_fixed`` = 1): all mass on the ring
in use, log-probability 0, entropy 0, no gradient. The ring head then learns from first steps only;
the interval head from all.

It reads the raw observation (``ring_size``, ``ring_fixed``), so train it without observation
normalisation (``normalize: {norm_obs: false, ...}``). The observation is scaled already (see the
MigrationEnv docstring) except that the dirty rates span decades (an idle guest 0.001 of the
link, a busy one 0.5): :class:`RateFeatures` adds their logarithms, which is what lets the ring
head tell a web server from a database at the first step, and a hot set (re-dirty rate 0.01-0.05
of the link: a big ring harvested rarely saves re-protect faults) from a sweep as fast (re-dirty
rate ~0: the big ring only costs memory). Use it with
``policy: agents.policies.FixedRingPolicy`` in configs/train/ALGO.yaml; ``ring_sizes`` is filled
in by the training program.

``ordinal=True`` (configs/train/ppo.yaml sets it) gives both heads the ordinal parametrisation of
Tang & Agrawal ("Discretizing Continuous Action Space for On-Policy Optimization", AAAI 2020): the
network's K outputs x_j of a head become K logits l_k = sum_{j<=k} log s_j + sum_{j>k} log(1 - s_j),
s_j = sigmoid(x_j). Both actions are ordered (ring entries, harvest interval), and their rewards
change smoothly along the order (a hot set: 16384 < 32768 < 65536 entries harvested every 5 s).
With plain categorical logits a head whose mass sits on one size never tries the next one up once
its entropy is gone: two of three 40k-decision PPO runs put probability 0.90-1.00 on 16384
entries for memcached and redis (oltp-heavy 0.70-0.99), where 65536 entries harvested every 5 s
gain 0.1-0.7 per episode more (README, "Trained PPO against QEMU's default"). With the ordinal
logits, raising one size's probability raises every size beyond the same threshold with it, so
the head moves along the order. The initial policy is uniform either way (x ~ 0).
"""

from __future__ import annotations

import math

import torch as th
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

RATES = [2, 3, 15]  # observation indices of dirty_rate, sampled_rate, redirty_rate (rate / link rate)
RING_SIZE, RING_FIXED = 12, 14  # observation indices (MigrationEnv docstring)


class RateFeatures(BaseFeaturesExtractor):
    """The observation plus (log10(rate + 0.001) + 3) / 3 of each dirty rate and of the re-dirty
    rate: 0 for an idle guest (or none re-dirtied), about 1 at the link rate."""

    def __init__(self, observation_space: spaces.Box):
        super().__init__(observation_space, int(observation_space.shape[0]) + len(RATES))

    def forward(self, obs: th.Tensor) -> th.Tensor:
        obs = obs.float()
        return th.cat([obs, (th.log10(obs[:, RATES].clamp(min=0) + 1e-3) + 3) / 3], dim=1)


def ordinal_logits(x: th.Tensor) -> th.Tensor:
    """Ordinal logits of K outputs ``x`` (last axis): l_k = sum_{j<=k} log s_j + sum_{j>k} log(1 - s_j),
    s = sigmoid(x) (Tang & Agrawal 2020)."""
    up = th.nn.functional.logsigmoid(x).cumsum(-1)
    down = th.nn.functional.logsigmoid(-x)
    return up + down.sum(-1, keepdim=True) - down.cumsum(-1)


class FixedRingPolicy(ActorCriticPolicy):
    def __init__(self, *args, ring_sizes: list[int] | None = None, ordinal: bool = False, **kwargs):
        kwargs.setdefault("features_extractor_class", RateFeatures)
        super().__init__(*args, **kwargs)
        nvec = getattr(self.action_space, "nvec", None)
        if nvec is None or len(nvec) != 2:
            raise ValueError("FixedRingPolicy needs the MultiDiscrete([ring sizes, intervals]) action")
        self.ring_sizes = list(ring_sizes or [1 << k for k in range(8, 8 + int(nvec[0]))])
        if len(self.ring_sizes) != int(nvec[0]):
            raise ValueError(f"ring_sizes {self.ring_sizes}: expected {int(nvec[0])} sizes")
        if not isinstance(ordinal, bool):
            raise ValueError(f"ordinal: {ordinal!r} is not accepted; accepted: true or false")
        self.ordinal = ordinal
        self._heads = [int(n) for n in nvec]
        self.register_buffer("_log2_sizes", th.tensor([math.log2(n) for n in self.ring_sizes], dtype=th.float32),
                             persistent=False)
        self._obs = None

    def _get_constructor_parameters(self) -> dict:
        return {**super()._get_constructor_parameters(), "ring_sizes": self.ring_sizes, "ordinal": self.ordinal}

    def _mask(self, logits: th.Tensor) -> th.Tensor:
        obs = self._obs
        if obs is None:
            return logits
        n = len(self.ring_sizes)
        obs = obs.reshape(len(logits), -1).float()
        fixed = obs[:, RING_FIXED] > 0.5
        idx = (obs[:, RING_SIZE:RING_SIZE + 1] * 16 - self._log2_sizes).abs().argmin(dim=1)
        masked = th.full_like(logits[:, :n], -1e8).scatter(1, idx[:, None], 0.0)
        ring = th.where(fixed[:, None], masked, logits[:, :n])
        return th.cat([ring, logits[:, n:]], dim=1)

    def _logits(self, latent_pi: th.Tensor) -> th.Tensor:
        x = self.action_net(latent_pi)
        if not self.ordinal:
            return x
        return th.cat([ordinal_logits(part) for part in th.split(x, self._heads, dim=1)], dim=1)

    def _get_action_dist_from_latent(self, latent_pi: th.Tensor):
        return self.action_dist.proba_distribution(action_logits=self._mask(self._logits(latent_pi)))

    # the observation is needed where the distribution is built: remember it for that call
    def forward(self, obs, deterministic: bool = False):
        self._obs = obs
        try:
            return super().forward(obs, deterministic)
        finally:
            self._obs = None

    def evaluate_actions(self, obs, actions):
        self._obs = obs
        try:
            return super().evaluate_actions(obs, actions)
        finally:
            self._obs = None

    def get_distribution(self, obs):
        self._obs = obs
        try:
            return super().get_distribution(obs)
        finally:
            self._obs = None
