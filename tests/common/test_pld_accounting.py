"""The PLD arithmetic agents and coordinators share (fedgate_common.pld_accounting)."""

from __future__ import annotations

import math

import pytest
from fedgate_common import pld_accounting
from fedgate_common.pld_accounting import NoNoiseFits, Running, epsilon, noise_multiplier

DELTA = 1e-5


def test_epsilon_of_nothing_is_zero_and_of_a_step_without_noise_infinite() -> None:
    assert epsilon({}, DELTA) == 0.0
    assert epsilon({(2.0, 0.5): 0}, DELTA) == 0.0  # no steps taken: nothing spent
    assert epsilon({(2.0, 0.5): 3, (0.0, 0.5): 1}, DELTA) == math.inf
    assert 0 < epsilon({(2.0, 0.5): 3}, DELTA) < epsilon({(2.0, 0.5): 4}, DELTA)


@pytest.mark.parametrize(
    ("target", "rate", "steps"), [(3.0, 0.745, 40), (1.0, 0.05, 200), (8.0, 1.0, 20)]
)
def test_the_sigma_never_overshoots_and_is_the_smallest_to_the_tolerance(
    target: float, rate: float, steps: int
) -> None:
    sigma = noise_multiplier(target, DELTA, rate, steps, floor=1e-3, ceiling=1e4)

    assert epsilon({(sigma, rate): steps}, DELTA) <= target
    smaller = sigma - 2 * pld_accounting.SIGMA_TOLERANCE
    assert epsilon({(smaller, rate): steps}, DELTA) > target


def test_a_budget_that_needs_less_noise_than_the_floor_gets_the_floor() -> None:
    assert noise_multiplier(100.0, DELTA, 0.1, 1, floor=0.3, ceiling=1e4) == 0.3
    assert noise_multiplier(3.0, DELTA, 0.7, 0, floor=0.3, ceiling=1e4) == 0.3  # no steps


def test_a_budget_no_noise_up_to_the_ceiling_meets_is_refused() -> None:
    with pytest.raises(NoNoiseFits, match="no noise multiplier up to 8 keeps 400 steps"):
        noise_multiplier(0.1, DELTA, 1.0, 400, floor=0.3, ceiling=8.0)
    assert issubclass(NoNoiseFits, ValueError)  # callers that caught ValueError still do


def test_a_running_count_equals_the_whole_history_counted_at_once() -> None:
    """Rounds of a decaying learning rate carry a different σ each: composed one at a
    time they give what the history composed at once gives."""
    sigmas = [6.0 * 1.02**round for round in range(12)]
    count = Running(DELTA)
    totals = [count.compose(sigma, 0.7) for sigma in sigmas]

    assert totals == sorted(totals)
    assert count.steps == 12
    assert count.epsilon() == pytest.approx(
        epsilon({(sigma, 0.7): 1 for sigma in sigmas}, DELTA), rel=1e-6
    )


def test_plus_tries_a_step_without_committing_it() -> None:
    count = Running(DELTA)
    assert count.epsilon() == 0.0
    count.compose(4.0, 0.5, 10)
    before = count.epsilon()

    tried = count.plus(4.0, 0.5)

    assert tried.epsilon() == pytest.approx(epsilon({(4.0, 0.5): 11}, DELTA), rel=1e-6)
    assert tried.epsilon() > before
    assert count.epsilon() == before
    assert count.steps == 10
    assert count.plus(0.0, 0.5).epsilon() == math.inf  # a step without noise
    assert count.plus(0.0, 0.5, 0).epsilon() == before  # no step at all
