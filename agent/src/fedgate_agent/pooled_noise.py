"""Record-level DP with the noise pooled in the secure sum: what a round costs (no IO).

With ``privacy.record_noise = "pooled"`` (docs/privacy.md §3.7) the agent takes one DP-SGD
step a round and adds no noise of its own to it: Poisson sampling at rate B/n (B the
plan's ``batch_size``), every window's gradient clipped to C, the sum divided by B and
multiplied by the learning rate η. One window added or removed moves that update by at
most η·C/B. The noise is the round's distributed discrete Gaussian (:class:`SiteNoise`):
every agent adds its share to its encoded input before masking, so the sum the
coordinator unmasks carries it once. Its noise multiplier relative to one window
(:func:`fedgate_common.secagg.site_dp.record_noise_multiplier`) goes to the same
accountant as local DP-SGD, at this agent's own sampling rate, one step a round.

Two figures, because the guarantee now rests on secure aggregation:

- ``noise_multiplier``: the sum's noise with ``secagg.assumed_colluders`` shares withheld,
  what the budget is checked against;
- ``own_share_noise_multiplier``: this agent's own share alone, what is left when every
  other input of the sum colludes with the coordinator (``fedgate-agent privacy`` shows
  the ε it gives).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
from fedgate_common.messages import SecAggParams, TrainingPlan
from fedgate_common.secagg.participant import encoding_params
from fedgate_common.secagg.site_dp import (
    MAX_POOLED_BATCH,
    pooled_sum_noise_multiplier,
    record_bound,
)

from fedgate_agent.errors import PlanRejected
from fedgate_agent.record_privacy import PooledSource, RoundSpend, sample_rate
from fedgate_agent.site_privacy import NEGLIGIBLE_NOISE


class PooledRound(msgspec.Struct, frozen=True, kw_only=True):
    noise_multiplier: float
    own_share_noise_multiplier: float
    sample_rate: float
    source: PooledSource

    def spend(self, round: int) -> RoundSpend:
        return RoundSpend(
            round=round,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=1,
            own_share_noise_multiplier=self.own_share_noise_multiplier,
            pooled=self.source,
        )


def _sum_noise_multiplier(
    params: SecAggParams, dimension: int, bound: float, colluders: int
) -> float:
    """The sum's noise per window with ``colluders`` shares withheld (0: none left)."""
    return pooled_sum_noise_multiplier(encoding_params(params), dimension, bound, colluders)


def counted_history(history: Sequence[RoundSpend], colluders: int) -> list[RoundSpend]:
    """``history`` as the budget counts it with ``colluders`` assumed now: a pooled round
    booked under fewer is computed again from its parameters (it protected less than it
    was counted for), as site-level entries are (``site_privacy.counted_multipliers``)."""
    counted = []
    for spend in history:
        source = spend.pooled
        if source is not None and colluders > source.assumed_colluders:
            sigma = _sum_noise_multiplier(
                source.params, source.dimension, source.record_bound, colluders
            )
            spend = msgspec.structs.replace(
                spend, noise_multiplier=min(spend.noise_multiplier, sigma)
            )
        counted.append(spend)
    return counted


def pooled_round(
    params: SecAggParams | None,
    plan: TrainingPlan,
    *,
    windows: int,
    max_grad_norm: float,
    dimension: int,
    assumed_colluders: int,
) -> PooledRound:
    """The record-level cost of a pooled round; :class:`PlanRejected` when the round
    cannot carry it (no secure sum with noise, more than one local epoch, adaptive
    clipping's count word, or noise too small to count)."""
    if params is None or params.noise is None:
        raise PlanRejected(
            "privacy.record_noise = pooled needs secure rounds with distributed noise "
            "(the coordinator's privacy.record_level = pooled); this round has none, so the "
            "update would leave without record-level noise"
        )
    if plan.local_epochs != 1:
        raise PlanRejected(
            f"privacy.record_noise = pooled takes one step a round; the plan asks for "
            f"{plan.local_epochs} local epochs"
        )
    if plan.batch_size > MAX_POOLED_BATCH:
        raise PlanRejected(
            f"privacy.record_noise = pooled takes at most {MAX_POOLED_BATCH} windows a step "
            f"(the float32 sum of more clipped gradients can round by more than the 1 % the "
            f"noise is sized for); the plan asks for {plan.batch_size}"
        )
    if params.count_within_clip:
        raise PlanRejected(
            "privacy.record_noise = pooled refuses adaptive clipping's within-clip count: "
            "one window can flip it"
        )
    bound = record_bound(plan, max_grad_norm)
    sums = _sum_noise_multiplier(params, dimension, bound, assumed_colluders)
    own = _sum_noise_multiplier(params, dimension, bound, params.noise.min_inputs - 1)
    if sums < NEGLIGIBLE_NOISE:
        raise PlanRejected(
            f"the round's noise is {sums:.3g} times one window's sensitivity (with "
            f"{assumed_colluders} colluders assumed): too little to count"
        )
    return PooledRound(
        noise_multiplier=sums,
        own_share_noise_multiplier=own,
        sample_rate=sample_rate(windows, plan.batch_size),
        source=PooledSource(
            params=params,
            dimension=dimension,
            record_bound=bound,
            assumed_colluders=assumed_colluders,
        ),
    )
