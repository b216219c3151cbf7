"""Site-level DP of one secure round: what one site can change and how much noise hides it.

The unit of privacy is one site (agent): its whole contribution to a round, replaced by a
zero update (zero-out: its noise share stays in the sum; who took part is visible to the
coordinator anyway). Under site-level DP (:mod:`.encoding`) every input weighs
``weight_cap``, so the contribution is the encoded update, the within-clip word (adaptive
clipping) and constant weight limbs. In encoded units:

- update: L2 sensitivity Δ₂ ≤ level + √d. Clipping to ``clip_norm`` and scaling gives norm
  ≤ level; stochastic rounding moves each coordinate by less than 1 (≤ √d in L2); the
  clamp to ±level only shrinks coordinates. The aggregate noise has std ≥ z·level at
  ``min_inputs`` or more inputs (the shares' margin is not counted).
- within-clip word: sensitivity ``count_unit``, aggregate noise std ≥
  ``count_noise · count_unit``.

Each part is a Gaussian mechanism with ρ-zCDP, ρ = Δ²/(2σ²) (Bun–Steinke), and the two
compose by adding ρ. The distributed discrete Gaussian is not exactly Gaussian; Kairouz,
Liu, Steinke (ICML 2021, Theorem 1) add a term in τ (:func:`.sum_of_shares_tau`), which is
folded in here as ρ + τ·(d + Δ₁) with Δ₁ ≤ min(Δ₂², √d·Δ₂), a conservative overstatement
of a term that is below 10⁻¹⁰⁰ for shares of std ≥ 3 units. A round's privacy loss is then
that of one Gaussian mechanism with noise multiplier 1/√(2ρ)
(:func:`effective_noise_multiplier`), which the coordinator composes over rounds.
"""

from __future__ import annotations

import math
import sys

from fedgate_common.messages import TrainingPlan
from fedgate_common.secagg.distributed_noise import sum_of_shares_tau
from fedgate_common.secagg.encoding import EncodingParams


def update_sensitivity(params: EncodingParams, dimension: int) -> float:
    """L2 sensitivity of one site's encoded update (add/remove), in encoded units."""
    return params.level + math.sqrt(dimension)


def _variance_or_zero(std: float) -> float:
    """``std``², or 0 when that is not a positive normal float (no noise, or so little that
    its square underflows: as good as none)."""
    variance = std * std if math.isfinite(std) and std > 0 else 0.0
    return variance if variance >= sys.float_info.min else 0.0


def _update_rho(params: EncodingParams, dimension: int, delta2: float) -> float:
    """ρ of the update words for an input that moves by at most ``delta2`` (encoded units,
    L2), with the distributed discrete Gaussian's τ term; inf without usable noise."""
    sigma = params.noise_multiplier * params.level
    if not params.noisy or _variance_or_zero(sigma) == 0:
        return math.inf
    delta1 = min(delta2**2, math.sqrt(dimension) * delta2)
    tau = sum_of_shares_tau(share_sigma=params.update_share_sigma, inputs=params.max_inputs)
    return delta2**2 / (2 * sigma**2) + tau * (dimension + delta1)


def round_rho(params: EncodingParams, dimension: int) -> float:
    """ρ (zero-concentrated DP) of one round for one site; inf without noise, or with
    noise too small to square (a coordinator may announce any number)."""
    if params.count_within_clip and _variance_or_zero(params.count_noise) == 0:
        return math.inf  # the count is released exactly
    rho = _update_rho(params, dimension, update_sensitivity(params, dimension))
    if params.count_within_clip and math.isfinite(rho):
        count_tau = sum_of_shares_tau(
            share_sigma=params.count_share_sigma, inputs=params.max_inputs
        )
        rho += 1 / (2 * params.count_noise**2) + count_tau * 2 * params.count_unit
    return rho if math.isfinite(rho) else math.inf


# The share of a pooled step's bound set aside for float32 rounding of the clipped
# gradients' sum (record_bound); the step itself is computed exactly (privacy.md §3.7).
ROUNDING_SLACK = 0.01
# The largest batch a pooled step may have: the sum's rounding, about 2⁻²⁴·log₂B of a sum
# of up to B·C, stays below the slack's C/100 up to about 12,000 windows.
MAX_POOLED_BATCH = 10_000


def record_bound(plan: TrainingPlan, clip_norm: float) -> float:
    """How far one record moves the update of a pooled step (one SGD step of the plan's
    learning rate η over the clipped gradients' sum divided by its batch size B, each clipped
    to ``clip_norm`` C): η·C/B, plus :data:`ROUNDING_SLACK` of it for the float32 rounding
    of the gradients' sum. Agents and coordinators size and count pooled noise by it."""
    return plan.learning_rate * clip_norm / plan.batch_size * (1 + ROUNDING_SLACK)


def record_sensitivity(params: EncodingParams, dimension: int, record_bound: float) -> float:
    """L2 sensitivity, in encoded units, of one record whose addition or removal moves the
    agent's update by at most ``record_bound`` (L2, in the update's own units).

    Clipping to ``clip_norm`` (a projection onto a ball) and the clamp move nothing further
    apart; scaling multiplies by ``scale``; stochastic rounding with the same random draws
    moves each coordinate of the difference by less than 1 (≤ √d in L2).
    """
    return params.scale * record_bound + math.sqrt(dimension)


def record_noise_multiplier(params: EncodingParams, dimension: int, record_bound: float) -> float:
    """Record level with the noise pooled in the secure sum (privacy.md §3.7): the noise
    multiplier, relative to one record, of the Gaussian mechanism with this round's ρ.

    0 when the round carries no usable noise, or releases a within-clip count (one record
    can flip it, so adaptive clipping is not allowed with pooled noise).
    """
    if params.count_within_clip or not record_bound > 0 or not math.isfinite(record_bound):
        return 0.0
    rho = _update_rho(params, dimension, record_sensitivity(params, dimension, record_bound))
    return 0.0 if not math.isfinite(rho) or rho <= 0 else 1 / math.sqrt(2 * rho)


def pooled_sum_noise_multiplier(
    params: EncodingParams, dimension: int, record_bound: float, colluders: int = 0
) -> float:
    """The σ per window a pooled round's sum carries with ``colluders`` shares withheld (0
    without noise, or with none left): what the coordinator books (no colluders) and what
    an agent counts (``secagg.assumed_colluders``; its own share alone at ``min_inputs`` − 1)."""
    if params.noise_multiplier <= 0:
        return 0.0
    return surviving_share(params.min_inputs, colluders) * record_noise_multiplier(
        params, dimension, record_bound
    )


def surviving_share(min_inputs: int, colluders: int) -> float:
    """The part of a round's noise (its standard deviation) that ``colluders`` withholding
    their shares leave: the shares are sized so that ``min_inputs`` of them add up to the
    announced noise, so at least ``min_inputs − c`` honest ones remain, √((m − c) / m) of
    it (none when c ≥ m). Multipliers scale by it; the encoding (its level and scale) does
    not change, since every input was encoded at the announced noise."""
    if colluders <= 0:
        return 1.0
    return math.sqrt(max(min_inputs - colluders, 0) / max(min_inputs, 1))


def effective_noise_multiplier(params: EncodingParams, dimension: int) -> float:
    """The noise multiplier of the Gaussian mechanism with the same ρ as this round (0
    when the round releases its sum without noise)."""
    rho = round_rho(params, dimension)
    return 0.0 if math.isinf(rho) else 1 / math.sqrt(2 * rho)
