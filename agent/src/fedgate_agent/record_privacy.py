"""Record-level differential privacy: the accountant's arithmetic (no IO).

The unit of privacy is one training window. DP-SGD (Poisson sampling, per-window clipping,
Gaussian noise) is accounted by one of two maintained accountants, ``privacy.accountant``:

- ``"pld"`` (default): Google dp-accounting's privacy-loss-distribution accountant, with its
  pessimistic discretisation, so ε is an upper bound; about 7 % less noise than RDP for
  the same ε at the demo's plan (decision 0045);
- ``"rdp"``: Opacus's Rényi accountant, the looser bound every agent used before.

A round adds ``(noise_multiplier, sample_rate, steps)`` to the history, and ε at ``delta``
is computed over the whole history, so composition across rounds is the accountant's, not
ours.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, cast

import msgspec
from fedgate_common import pld_accounting
from fedgate_common.messages import SecAggParams

Accountant = Literal["pld", "rdp"]
ACCOUNTANTS: dict[str, str] = {
    "pld": pld_accounting.NAME,
    "rdp": "rdp (opacus.accountants.RDPAccountant)",
}
DEFAULT_ACCOUNTANT: Accountant = "pld"
RECORD_NOISE_MODES = ("local", "pooled")  # privacy.record_noise (privacy.md §3.7)
SAMPLING = "poisson"
UNIT = "record (one training window)"
# What the agent says when record-level DP runs with ``training.seed`` set (privacy.md §5).
SEEDED_DP_WARNING = (
    "training.seed is set: batches and noise repeat from that seed, so this agent has no "
    "privacy guarantee whatever epsilon it reports (tests and demos only; leave "
    "training.seed empty)"
)


class RecordPrivacySettings(msgspec.Struct, frozen=True, kw_only=True):
    """``[privacy]`` of agent.toml, record level."""

    target_epsilon: float
    delta: float
    max_grad_norm: float
    planned_rounds: int
    accountant: Accountant = DEFAULT_ACCOUNTANT


class PooledSource(msgspec.Struct, frozen=True, kw_only=True):
    """What a pooled round's noise multiplier was computed from (the round's parameters,
    the model's dimension, η·C/B and the colluders assumed), so that it can be computed
    again when more colluders are assumed later."""

    params: SecAggParams
    dimension: int
    record_bound: float
    assumed_colluders: int


class RoundSpend(msgspec.Struct, frozen=True, kw_only=True):
    """What one round of DP-SGD adds to the accountant's history.

    With pooled noise (privacy.md §3.7) ``noise_multiplier`` is the secure sum's, counted
    with ``secagg.assumed_colluders`` withholding their shares, and
    ``own_share_noise_multiplier`` that of this agent's own share alone: what is left if
    every other input of the sum colludes with the coordinator.
    """

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    own_share_noise_multiplier: float | None = None
    pooled: PooledSource | None = None

    @property
    def own_share_only(self) -> RoundSpend:
        """This round as counted with only this agent's own noise."""
        if self.own_share_noise_multiplier is None:
            return self
        return msgspec.structs.replace(
            self,
            noise_multiplier=self.own_share_noise_multiplier,
            own_share_noise_multiplier=None,
            pooled=None,
        )


# DP-SGD steps one round may take: the first round's σ search grows with the steps of the
# whole budget (about a minute for 100,000 per round over 20 rounds at q = 1/1,500 on a
# 2-core x86 host), and a round's noise is added that many times.
MAX_STEPS_PER_ROUND = 100_000
# ... and over the planned rounds, when σ is sized (about 20 s at 2,000,000 there).
MAX_PLANNED_STEPS = 2_000_000


def sample_rate(num_samples: int, batch_size: int) -> float:
    """Poisson sampling rate giving ``batch_size`` windows per step on average."""
    return min(1.0, batch_size / max(num_samples, 1))


def steps_per_round(num_samples: int, batch_size: int, local_epochs: int) -> int:
    """Steps of one round as Opacus's Poisson loader takes them: int(1 / q) per epoch."""
    return local_epochs * max(1, int(1 / sample_rate(num_samples, batch_size)))


def as_accountant(text: str) -> Accountant:
    """``privacy.accountant`` as the :data:`Accountant` it names (ValueError otherwise)."""
    if text not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {text!r}: expected one of {sorted(ACCOUNTANTS)}")
    return cast(Accountant, text)


def accountant_name(accountant: Accountant) -> str:
    """The accountant as the ledger, the CLI and the coordinator's report name it."""
    return ACCOUNTANTS[accountant]


def _merged(history: Sequence[RoundSpend]) -> dict[tuple[float, float], int]:
    """Steps per distinct (σ, q): both accountants compose rounds with the same (σ, q) as
    one run of their summed steps, so each distinct pair is evaluated once."""
    steps: dict[tuple[float, float], int] = {}
    for h in history:
        key = (h.noise_multiplier, h.sample_rate)
        steps[key] = steps.get(key, 0) + h.steps
    return steps


def _rdp_epsilon(steps: dict[tuple[float, float], int], delta: float) -> float:
    from opacus.accountants import RDPAccountant  # here: opacus takes ~4 s to import

    accountant = RDPAccountant()
    accountant.history = [(sigma, rate, n) for (sigma, rate), n in steps.items()]
    return float(accountant.get_epsilon(delta=delta))


def epsilon(history: Sequence[RoundSpend], delta: float, *, accountant: Accountant) -> float:
    """ε at ``delta`` after every round in ``history`` (0 for an empty history; infinite
    when a round added no noise)."""
    if not history:
        return 0.0
    steps = _merged(history)
    if any(sigma <= 0 for sigma, _ in steps):
        return math.inf
    if accountant == "pld":
        return pld_accounting.epsilon(steps, delta)
    return _rdp_epsilon(steps, delta)


def _rdp_noise_multiplier(target: float, delta: float, rate: float, steps: int) -> float:
    """Opacus's search: the σ it returns never overshoots ``target`` (tested)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target,
            target_delta=delta,
            sample_rate=rate,
            steps=steps,
            accountant="rdp",
            epsilon_tolerance=0.01,
        )
    )


_MAX_NOISE_MULTIPLIER = 1e6
_MIN_NOISE_MULTIPLIER = 1e-3


def _pld_noise_multiplier(target: float, delta: float, rate: float, steps: int) -> float:
    """The PLD search shared with the coordinators (:func:`pld_accounting.noise_multiplier`;
    starting from the RDP σ instead cost 8-18 s of Opacus's own search for the demo's plan,
    which made a busy gateway's first round miss its stage deadline)."""
    return pld_accounting.noise_multiplier(
        target, delta, rate, steps, floor=_MIN_NOISE_MULTIPLIER, ceiling=_MAX_NOISE_MULTIPLIER
    )


def noise_multiplier_for(
    settings: RecordPrivacySettings, *, sample_rate: float, steps: int
) -> float:
    """The smallest σ whose ``planned_rounds`` rounds of ``steps`` stay within the target,
    by ``settings.accountant``. Neither search ever overshoots (tested)."""
    total = steps * settings.planned_rounds
    if settings.accountant == "pld":
        return _pld_noise_multiplier(settings.target_epsilon, settings.delta, sample_rate, total)
    return _rdp_noise_multiplier(settings.target_epsilon, settings.delta, sample_rate, total)
