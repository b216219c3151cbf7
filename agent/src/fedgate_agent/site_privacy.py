"""Site-level differential privacy as the agent counts it itself (no IO).

The coordinator books each noisy round it unmasks in its ``privacy_ledger`` and stops at
its budget. A deviating coordinator need not: it could run noisy rounds again and again on
one base model and average the noise away, or announce count noise so small that one
round gives away the within-clip bit. So every agent keeps its own count. Each noisy round
whose masked input it sends is one Gaussian mechanism with the effective noise multiplier
that the round's parameters give (:func:`fedgate_common.secagg.site_dp.effective_noise_multiplier`,
the coordinator's own formula), composed by the agent's accountant without amplification
(the agent is chosen, not sampled: q = 1). A round that would take the count past
``privacy.site_max_epsilon`` is refused before the agent advertises its keys.

A round is booked when its masked input leaves, not when the sum is unmasked: from then
on the coordinator can remove the masks without this agent (its neighbours hold the
shares), and the agent cannot tell whether it did. Rounds that abort after that point cost
the agent and not the coordinator's ledger, so the agent's count is at least the
coordinator's for the same rounds, up to the accountant (the agent's PLD is tighter than
the coordinator's RDP).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec
from fedgate_common.messages import SecAggParams
from fedgate_common.model_spec import ModelSpec, parameter_count
from fedgate_common.secagg.participant import encoding_params
from fedgate_common.secagg.site_dp import effective_noise_multiplier, surviving_share

from fedgate_agent.errors import SiteBudgetExhausted
from fedgate_agent.record_privacy import Accountant, RoundSpend, accountant_name, epsilon

UNIT = "site (this agent's whole contribution to a round)"
SAMPLING = "none (the coordinator chooses agents: no amplification)"
DEFAULT_SITE_MAX_EPSILON = 10.0
# Below this noise multiplier one Gaussian mechanism alone costs more than the largest
# budget the configuration allows (ε 100) even at the largest δ it allows (0.01): ε 106
# at 0.08 (PLD). The accountant is not asked: its work grows with 1/σ², and a coordinator
# announcing tiny noise must not make the agent spend seconds and gigabytes on it.
NEGLIGIBLE_NOISE = 0.08


class SiteBudget(msgspec.Struct, frozen=True, kw_only=True):
    """``[privacy] site_max_epsilon``, the δ and accountant it is counted with, and the
    colluding agents assumed (``secagg.assumed_colluders``), whose noise shares are not
    counted on."""

    max_epsilon: float
    delta: float
    accountant: Accountant
    assumed_colluders: int = 0


class SiteLedgerEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One noisy round this agent sent a masked input to."""

    round: int
    base_digest: str  # the model the round trained on (repeats show up here)
    noise_multiplier: float  # z as the coordinator announced it
    effective_noise_multiplier: float  # what the accountant composes (site_dp)
    min_inputs: int  # the fewest inputs the shares were sized for
    assumed_colluders: int = 0  # whose shares were left out of the effective multiplier
    epsilon_round: float
    epsilon_total: float
    delta: float
    accountant: str
    # What the effective multiplier was computed from, so that it can be computed again
    # for more assumed colluders (entries from before these fields: None, 0).
    params: SecAggParams | None = None
    dimension: int = 0


def effective_multiplier(params: SecAggParams, dimension: int, colluders: int) -> float:
    """The Gaussian-equivalent multiplier of a round, as the coordinator computes it, with
    the shares of ``colluders`` left out (both noises, the update's and the count's, keep
    :func:`surviving_share` of their std, so the multiplier does too); a number that cannot
    be computed counts as no noise."""
    noise = params.noise
    kept = surviving_share(noise.min_inputs if noise else 1, colluders)
    try:
        return kept * effective_noise_multiplier(encoding_params(params), dimension)
    except (ArithmeticError, ValueError):
        return 0.0


def counted_multipliers(entries: Sequence[SiteLedgerEntry], colluders: int) -> list[float]:
    """The entries' effective multipliers under ``colluders`` assumed now: an entry booked
    under fewer is computed again (it protected less than it was counted for). Entries
    without their parameters (booked before they were kept) are scaled by the share of the
    noise that survives, √((m − c) / m), the leading term of the same computation."""
    counted = []
    for entry in entries:
        z = entry.effective_noise_multiplier
        if colluders > entry.assumed_colluders:
            params = entry.params
            if params is not None and params.noise is not None and entry.dimension:
                z = min(z, effective_multiplier(params, entry.dimension, colluders))
            else:
                m = max(entry.min_inputs, 1)
                z *= math.sqrt(max(m - colluders, 0) / max(m - entry.assumed_colluders, 1))
        counted.append(z)
    return counted


def site_epsilon(multipliers: Sequence[float], delta: float, accountant: Accountant) -> float:
    """ε at ``delta`` after one Gaussian mechanism (q = 1) per multiplier.

    Gaussian mechanisms of one sensitivity compose exactly into one, with noise multiplier
    (Σ zᵢ⁻²)^(-1/2); the accountant is asked about that one, so the work does not grow with
    the rounds.
    """
    if not multipliers:
        return 0.0
    if min(multipliers) < NEGLIGIBLE_NOISE:
        return math.inf
    combined = math.fsum(z**-2 for z in multipliers) ** -0.5
    if combined < NEGLIGIBLE_NOISE:
        return math.inf
    history = [RoundSpend(round=0, noise_multiplier=combined, sample_rate=1.0, steps=1)]
    return epsilon(history, delta, accountant=accountant)


def plan_site_round(
    booked: Sequence[SiteLedgerEntry],
    *,
    round: int,
    base_digest: str,
    params: SecAggParams,
    spec: ModelSpec,
    budget: SiteBudget,
) -> SiteLedgerEntry | None:
    """The entry this round will book, or ``None`` without site-level noise.

    Raises :class:`SiteBudgetExhausted` when the round would take this agent's site-level
    ε past its budget.
    """
    noise = params.noise
    if noise is None:
        return None
    dimension = parameter_count(spec)
    multiplier = effective_multiplier(params, dimension, budget.assumed_colluders)
    history = counted_multipliers(booked, budget.assumed_colluders)
    after = site_epsilon([*history, multiplier], budget.delta, budget.accountant)
    if after > budget.max_epsilon:
        spent = site_epsilon(history, budget.delta, budget.accountant)  # for the message
        raise SiteBudgetExhausted(
            f"round {round} (site-level noise multiplier {noise.noise_multiplier:g}, "
            f"{multiplier:.4g} effective) would take this agent's site-level ε from "
            f"{spent:.3f} to {after:.3f}, past privacy.site_max_epsilon = "
            f"{budget.max_epsilon} (δ = {budget.delta}); it sends no more noisy inputs"
            + (
                "; noise this small is what a coordinator with privacy.record_level = pooled "
                "announces (sized for one training window): to join its rounds set "
                "privacy.record_noise = pooled and privacy.record_level = on"
                if multiplier < NEGLIGIBLE_NOISE
                and not params.count_within_clip  # pooled coordinators refuse adaptive clipping
                and not math.isinf(spent)
                else ""
            ),
            spent=spent,
            next_round=after,
        )
    return SiteLedgerEntry(
        round=round,
        base_digest=base_digest,
        noise_multiplier=noise.noise_multiplier,
        effective_noise_multiplier=multiplier,
        min_inputs=noise.min_inputs,
        assumed_colluders=budget.assumed_colluders,
        epsilon_round=site_epsilon([multiplier], budget.delta, budget.accountant),
        epsilon_total=after,
        delta=budget.delta,
        accountant=accountant_name(budget.accountant),
        params=params,
        dimension=dimension,
    )
