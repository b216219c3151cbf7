"""Record-level differential privacy: the accountant's arithmetic (no IO).

The unit of privacy is one training window. DP-SGD (Poisson sampling, per-window clipping,
Gaussian noise) is accounted with Opacus's RDP accountant; a round adds
``(noise_multiplier, sample_rate, steps)`` to the history, and ε at ``delta`` is computed
over the whole history, so composition across rounds is the accountant's, not ours.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

ACCOUNTANT = "rdp (opacus.accountants.RDPAccountant)"
SAMPLING = "poisson"
UNIT = "record (one training window)"


class RecordPrivacySettings(msgspec.Struct, frozen=True, kw_only=True):
    """``[privacy]`` of agent.toml, record level."""

    target_epsilon: float
    delta: float
    max_grad_norm: float
    planned_rounds: int


class RoundSpend(msgspec.Struct, frozen=True, kw_only=True):
    """What one round of DP-SGD adds to the accountant's history."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int


def sample_rate(num_samples: int, batch_size: int) -> float:
    """Poisson sampling rate giving ``batch_size`` windows per step on average."""
    return min(1.0, batch_size / max(num_samples, 1))


def steps_per_round(num_samples: int, batch_size: int, local_epochs: int) -> int:
    """Steps of one round as Opacus's Poisson loader takes them: int(1 / q) per epoch."""
    return local_epochs * max(1, int(1 / sample_rate(num_samples, batch_size)))


def epsilon(history: Sequence[RoundSpend], delta: float) -> float:
    """ε at ``delta`` after every round in ``history`` (0 for an empty history)."""
    if not history:
        return 0.0
    # RDP composes by adding per step, so rounds with the same (σ, q) merge into one entry
    # with their steps summed: the same ε, one RDP evaluation instead of one per round.
    steps: dict[tuple[float, float], int] = {}
    for h in history:
        key = (h.noise_multiplier, h.sample_rate)
        steps[key] = steps.get(key, 0) + h.steps
    from opacus.accountants import RDPAccountant  # here: opacus takes ~4 s to import

    accountant = RDPAccountant()
    accountant.history = [(sigma, rate, n) for (sigma, rate), n in steps.items()]
    return float(accountant.get_epsilon(delta=delta))


def noise_multiplier_for(
    settings: RecordPrivacySettings, *, sample_rate: float, steps: int
) -> float:
    """The smallest σ whose ``planned_rounds`` rounds of ``steps`` stay within the target.

    Opacus searches σ so that ε(σ) ≤ target (it never overshoots; tested).
    """
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=settings.target_epsilon,
            target_delta=settings.delta,
            sample_rate=sample_rate,
            steps=steps * settings.planned_rounds,
            accountant="rdp",
            epsilon_tolerance=0.01,
        )
    )
