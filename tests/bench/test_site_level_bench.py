"""The site-level benchmark's aggregation is the product's: encoded, noised, decoded."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fedgate_common.model_spec import ModelSpec, parameter_shapes

from bench.privacy.federation import RoundContext, SiteUpdate, weighted_fedavg
from bench.privacy.site_level import SiteDp, SiteDpAggregator
from bench.privacy.site_utility import PLAN_100, PlanChange

SPEC = ModelSpec(n_features=3, window=8, n_classes=2, channels=4)


def updates(n: int, scale: float, seed: int = 0) -> list[SiteUpdate]:
    rng = np.random.default_rng(seed)
    return [
        SiteUpdate(
            site=i,
            delta={
                name: (rng.normal(size=shape) * scale).astype(np.float32)
                for name, shape in parameter_shapes(SPEC)
            },
            num_samples=10 + i,
            train_loss=1.0,
        )
        for i in range(n)
    ]


def context(n: int, round_number: int = 1) -> RoundContext:
    weights = {name: np.zeros(shape, np.float32) for name, shape in parameter_shapes(SPEC)}
    return RoundContext(
        round=round_number,
        rounds=5,
        n_sites=n,
        global_weights=weights,
        rng=np.random.default_rng(round_number),
    )


def flat(weights: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(weights[name]) for name, _ in parameter_shapes(SPEC)])


def test_without_noise_the_aggregate_is_the_weighted_mean_of_clipped_updates() -> None:
    """Site-level DP off: the product's secure aggregation, weights = sample counts."""
    sites = updates(6, scale=1.0)  # norms ~10, clipped to 2
    aggregator = SiteDpAggregator(SiteDp(target_epsilon=None, clip_norm=2.0), SPEC, rounds=5)
    mean = aggregator(sites, context(6))
    assert mean is not None
    expected = np.average(
        [flat(u.delta) * min(1.0, 2.0 / np.linalg.norm(flat(u.delta))) for u in sites],
        axis=0,
        weights=[u.num_samples for u in sites],
    )
    assert np.max(np.abs(flat(mean) - expected)) < 1e-6
    assert math.isinf(aggregator.epsilon)


def test_with_noise_the_budget_is_planned_and_spent_over_the_rounds() -> None:
    aggregator = SiteDpAggregator(
        SiteDp(target_epsilon=4.0, clip_norm=1.0, min_participants=5), SPEC, rounds=5
    )
    for round_number in range(1, 6):
        assert aggregator(updates(6, 0.01, round_number), context(6, round_number)) is not None
    assert 3.9 < aggregator.epsilon <= 4.0
    assert len(set(aggregator.noise_multipliers)) == 1
    # Too few updates for min_participants: the round releases nothing and costs nothing.
    assert aggregator(updates(4, 0.01), context(6)) is None
    assert len(aggregator.effective) == 5


def test_adaptive_clipping_moves_towards_the_median_norm() -> None:
    aggregator = SiteDpAggregator(
        SiteDp(target_epsilon=None, clip_norm=100.0, adaptive_clip=True), SPEC, rounds=30
    )
    for round_number in range(1, 31):
        aggregator(updates(8, 1.0, round_number), context(8, round_number))
    norms = [np.linalg.norm(flat(u.delta)) for u in updates(8, 1.0)]
    assert aggregator.clip_norms[0] == 100.0
    assert aggregator.clip_norms[-1] < 0.5 * 100.0  # all within: it shrinks every round
    assert aggregator.within_fraction[0] == 1.0
    assert min(aggregator.clip_norms) > 0.5 * float(np.median(norms))


@pytest.mark.parametrize(("word_bits", "tolerance"), [(32, 1e-6), (16, 2e-4)])
def test_without_noise_the_secagg_clip_shortens_only_updates_above_it_before_the_weighted_mean(
    word_bits: int, tolerance: float
) -> None:
    """Secure aggregation as make demo runs it (tune_record stage 4): no site-level noise,
    each delta clipped to the clip norm, then the window-weighted mean, to within the
    quantisation of ``word_bits``-bit words."""
    big, small = updates(2, scale=1.0, seed=3)
    small = SiteUpdate(
        site=small.site,
        delta={name: value * np.float32(1e-3) for name, value in small.delta.items()},
        num_samples=small.num_samples,
        train_loss=small.train_loss,
    )
    clip = 0.5
    assert np.linalg.norm(flat(big.delta)) > 10 * clip  # far above the clip
    assert np.linalg.norm(flat(small.delta)) < clip  # within it: left as it is
    # Weight cap 20 for sites of 10 and 11 windows: each update is scaled by its weight over
    # the cap before quantisation, as in make demo (about 1,400 windows against 2,000).
    aggregator = SiteDpAggregator(
        SiteDp(target_epsilon=None, clip_norm=clip, word_bits=word_bits, weight_cap=20),
        SPEC,
        rounds=5,
    )
    mean = aggregator([big, small], context(2))
    assert mean is not None
    assert aggregator.noise_multipliers == []
    clipped_big = flat(big.delta) * (clip / np.linalg.norm(flat(big.delta)))
    expected = (big.num_samples * clipped_big + small.num_samples * flat(small.delta)) / (
        big.num_samples + small.num_samples
    )
    np.testing.assert_allclose(flat(mean), expected, rtol=0, atol=tolerance)
    unclipped = weighted_fedavg([big, small], context(2))
    assert unclipped is not None
    assert np.linalg.norm(flat(unclipped)) > 10 * np.linalg.norm(flat(mean))


def test_the_dp_rows_plan_changes_only_the_fields_given() -> None:
    changed = PlanChange(local_epochs=1, batch_size=32).apply(PLAN_100)
    assert (changed.local_epochs, changed.batch_size) == (1, 32)
    assert changed.learning_rate == PLAN_100.learning_rate
    assert changed.lr_decay == PLAN_100.lr_decay
    assert PLAN_100.local_epochs == 5  # the baselines' plan is left as it was
    assert PlanChange().apply(PLAN_100) == PLAN_100
