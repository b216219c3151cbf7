"""Site-level DP FedAvg: the coordinator's round parameters and the agents' encoding, in
one process, as a :data:`~bench.privacy.federation.Aggregator`.

Each round, exactly as the coordinator and agents do it:

- :func:`round_params` (the coordinator's): ``word_bits``-bit words (32 by default), the
  clip norm (adaptive or fixed), noise shares sized for ``min_inputs`` =
  max(t, min_participants) inputs, and the noise multiplier z planned so that
  ``planned_rounds`` such rounds spend at most the target ε (dp-accounting RDP of the
  effective multiplier);
- every site's delta is flattened and encoded with :func:`encode_update` (clip, under
  noise every site weighs ``weight_cap``, stochastic rounding, its noise share, the
  within-clip word);
- the words are summed mod 2^word_bits and decoded; the mean update is the coordinator's.

Not the product: no masking (the masks cancel exactly in the sum, which
``tests/common/test_secagg_exactness.py`` checks bit for bit) and, unless
``exact_noise``, the noise sampler: the product draws each share from the exact discrete
Gaussian (:func:`sample_discrete_gaussian`, ~10⁵ draws/s in pure Python), the benchmark by
default from a rounded continuous Gaussian of the same σ (:func:`rounded_gaussian`). The
shares here have σ of 10⁵–10⁷ encoded units, where the two distributions are practically
indistinguishable; ε is the accountant's for the exact mechanism either way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from fedgate_common.model_spec import ModelSpec, split_parameters
from fedgate_common.secagg.aggregator import fewest_inputs
from fedgate_common.secagg.distributed_noise import sample_discrete_gaussian
from fedgate_common.secagg.encoding import NoiseSampler, decode_sum, encode_update
from fedgate_common.secagg.keystream import word_dtype
from fedgate_common.secagg.participant import encoding_params
from fedgate_coordinator.secure_rounds import SecAggSettings
from fedgate_coordinator.site_privacy import (
    SitePrivacySettings,
    epsilon,
    round_effective_multiplier,
    round_params,
)

from bench.privacy.federation import RoundContext, SiteUpdate, Weights

WEIGHT_CAP = 2000  # every site weighs the same under site-level DP


def rounded_gaussian(rng: np.random.Generator) -> NoiseSampler:
    """A fast stand-in for the discrete Gaussian: round(N(0, σ²)), from ``rng``."""

    def sample(
        sigma: float, count: int, random_bytes: Callable[[int], bytes]
    ) -> npt.NDArray[np.int64]:
        del random_bytes
        return np.rint(rng.normal(0.0, sigma, count)).astype(np.int64)

    return sample


@dataclass(frozen=True)
class SiteDp:
    """Site-level DP of a run. ``target_epsilon`` None: clip and encode, but no noise (ε = ∞).

    ``word_bits`` and ``weight_cap`` are the coordinator's ``[secagg]`` settings; with
    ``target_epsilon`` None and the product's defaults (:class:`SecAggSettings`) this is
    plain secure aggregation as ``make demo`` runs it: every delta clipped to ``clip_norm``,
    weighted by its windows (up to ``weight_cap``), quantised to ``word_bits``-bit words.
    """

    target_epsilon: float | None
    clip_norm: float
    adaptive_clip: bool = False
    min_participants: int = 1
    delta: float = 1e-5
    exact_noise: bool = False
    word_bits: int = 32
    weight_cap: int = WEIGHT_CAP


@dataclass
class SiteDpAggregator:
    """The aggregation hook of :func:`~bench.privacy.federation.run_fedavg` with site-level
    DP; after the run it holds the effective multipliers, ε and clip norms per round."""

    dp: SiteDp
    spec: ModelSpec
    rounds: int
    effective: list[float] = field(default_factory=list)
    noise_multipliers: list[float] = field(default_factory=list)
    clip_norms: list[float] = field(default_factory=list)
    within_fraction: list[float] = field(default_factory=list)

    @property
    def secagg(self) -> SecAggSettings:
        return SecAggSettings(
            word_bits=self.dp.word_bits,
            clip_norm=self.dp.clip_norm,
            weight_cap=self.dp.weight_cap,
            adaptive_clip=self.dp.adaptive_clip,
        )

    @property
    def privacy(self) -> SitePrivacySettings:
        return SitePrivacySettings(
            site_level="off" if self.dp.target_epsilon is None else "on",
            target_epsilon=self.dp.target_epsilon or 1.0,
            delta=self.dp.delta,
            planned_rounds=self.rounds,
        )

    @property
    def epsilon(self) -> float:
        if self.dp.target_epsilon is None:
            return math.inf
        return epsilon(self.effective, self.dp.delta)

    def _clip_norm(self) -> float:
        if not (self.dp.adaptive_clip and self.clip_norms):
            return self.dp.clip_norm
        return self.secagg.next_clip_norm(self.clip_norms[-1], self.within_fraction[-1])

    def __call__(self, updates: Sequence[SiteUpdate], context: RoundContext) -> Weights | None:
        names = list(context.global_weights)
        dimension = sum(context.global_weights[n].size for n in names)
        params = round_params(
            self.secagg,
            self.privacy,
            selected=context.n_sites,
            min_participants=self.dp.min_participants,
            clip_norm=self._clip_norm(),
            dimension=dimension,
        )
        if len(updates) < fewest_inputs(params, self.dp.min_participants):
            return None  # the aggregator aborts; nothing is released
        encoding = encoding_params(params)
        seed_bytes = np.random.default_rng(context.rng.integers(2**63))
        sampler: NoiseSampler = (
            sample_discrete_gaussian if self.dp.exact_noise else rounded_gaussian(context.rng)
        )
        total = np.zeros(encoding.vector_length(dimension), dtype=np.uint64)
        for update in updates:
            flat = np.concatenate([np.ravel(update.delta[n]) for n in names]).astype(np.float64)
            total += encode_update(
                flat,
                update.num_samples,
                encoding,
                lambda size: seed_bytes.bytes(size),
                noise_sampler=sampler,
            )
        words = (total % 2**encoding.word_bits).astype(word_dtype(encoding.word_bits))
        decoded = decode_sum(words, encoding)
        self.clip_norms.append(params.clip_norm)
        if decoded.within_clip is not None:
            self.within_fraction.append(decoded.within_clip / len(updates))
        if params.noise is not None:
            self.noise_multipliers.append(params.noise.noise_multiplier)
            self.effective.append(round_effective_multiplier(params, dimension))
        return split_parameters(decoded.mean_update(params.weight_cap), self.spec)
