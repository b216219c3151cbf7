"""Poisson-sampled Gaussian steps accounted by Google dp-accounting's privacy-loss
distribution (PLD) accountant (no IO).

One arithmetic for both sides of record-level DP: agents count their DP-SGD steps with it
and size σ for their budget (privacy.md §3), coordinators size and count the noise pooled
in each secure sum with it (§3.7), on the same grid: an agent that samples, clips and
assumes colluders as its coordinator planned counts a round as the coordinator does.

A history is a mapping ``(σ, q) → steps``: rounds with the same σ and sampling rate q
compose as one self-composed event, so each distinct pair is evaluated once.

Needs dp-accounting (``fedgate-common[accounting]``), imported where used: it takes ~2 s
to import, which every command line call would pay.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dp_accounting.dp_event import DpEvent
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

NAME = "pld (dp_accounting.pld.PLDAccountant)"
# The PLD's loss grid. 1e-3 gives the same σ as 1e-4 to four digits on the demo's plan, at
# a tenth of the time (a σ search takes ~0.5 s instead of ~3 s); the estimate stays
# pessimistic (an upper bound on ε) either way.
DISCRETISATION = 1e-3
# σ is searched to this absolute precision (0.02 % of the demo's σ).
SIGMA_TOLERANCE = 1e-3

History = Mapping[tuple[float, float], int]


class NoNoiseFits(ValueError):
    """No σ up to the search's ceiling keeps the steps within the target ε."""


def _event(history: History) -> DpEvent:
    import dp_accounting

    return dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)),
                steps,
            )
            for (sigma, rate), steps in history.items()
        ]
    )


def _accountant() -> PLDAccountant:
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    return PLDAccountant(value_discretization_interval=DISCRETISATION)


def epsilon(history: History, delta: float) -> float:
    """ε at ``delta`` after every step of ``history``: 0 for none, infinite when a step
    with steps > 0 has σ ≤ 0 (no noise)."""
    counted = {key: steps for key, steps in history.items() if steps > 0}
    if not counted:
        return 0.0
    if any(sigma <= 0 for sigma, _ in counted):
        return math.inf
    accountant = _accountant()
    accountant.compose(_event(counted))
    return float(accountant.get_epsilon(delta))


class Running:
    """A count that grows one step at a time: composing a step costs one PLD convolution
    (~30 ms), where :func:`epsilon` over a history of n distinct σ costs n of them. ε of
    the steps so far at ``delta``; :meth:`plus` tries one more without committing it."""

    def __init__(self, delta: float) -> None:
        self.delta = delta
        self.steps = 0
        self._unbounded = False  # a step without noise: ε is infinite from then on
        self._accountant = _accountant()

    def compose(self, sigma: float, rate: float, steps: int = 1) -> float:
        """Add ``steps`` steps of σ at sampling rate ``rate``; ε of all of them."""
        if steps > 0:
            self.steps += steps
            if sigma <= 0:
                self._unbounded = True
            elif not self._unbounded:
                self._accountant.compose(_event({(sigma, rate): steps}))
        return self.epsilon()

    def epsilon(self) -> float:
        if self._unbounded:
            return math.inf
        if self.steps == 0:
            return 0.0
        return float(self._accountant.get_epsilon(self.delta))

    def plus(self, sigma: float, rate: float, steps: int = 1) -> Running:
        """A copy with ``steps`` more steps of σ at ``rate`` (this count unchanged)."""
        grown = copy.deepcopy(self)
        grown.compose(sigma, rate, steps)
        return grown


def noise_multiplier(
    target: float, delta: float, rate: float, steps: int, *, floor: float, ceiling: float
) -> float:
    """The smallest σ (to :data:`SIGMA_TOLERANCE`) whose ``steps`` Poisson-sampled steps at
    ``rate`` stay within ``target`` at ``delta``; it never overshoots (dp-accounting's
    calibration checks the side it returns).

    ``floor`` when even that much noise is more than the budget needs (below it the PLD
    grows large and slow: σ = 0.5 at q = 0.38 over 80 steps takes 2 s, σ = 0.13 more);
    :class:`NoNoiseFits` when ``ceiling`` is not enough. The bracket is found by doubling
    or halving from σ = 1, so no σ below half the answer is ever evaluated.
    """
    from dp_accounting.mechanism_calibration import (
        ExplicitBracketInterval,
        calibrate_dp_mechanism,
    )

    def spent(sigma: float) -> float:
        return epsilon({(sigma, rate): steps}, delta)

    sigma = min(max(1.0, floor), ceiling)
    if spent(sigma) > target:
        while True:
            if sigma >= ceiling:
                raise NoNoiseFits(
                    f"no noise multiplier up to {ceiling:g} keeps {steps} steps at sampling "
                    f"rate {rate:g} within ε = {target:g}"
                )
            wider = min(2 * sigma, ceiling)
            if spent(wider) <= target:
                lower, upper = sigma, wider
                break
            sigma = wider
    else:
        while True:
            if sigma <= floor:
                return floor
            narrower = max(sigma / 2, floor)
            if spent(narrower) > target:
                lower, upper = narrower, sigma
                break
            sigma = narrower
    return float(
        calibrate_dp_mechanism(
            _accountant,
            lambda sigma: _event({(sigma, rate): steps}),
            target,
            delta,
            ExplicitBracketInterval(lower, upper),
            tol=SIGMA_TOLERANCE,
        )
    )
