"""The IO-free round state machine: acceptance rules, weighting, abort conditions."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fedgate_common.arrays import encode_arrays
from fedgate_common.errors import LimitExceeded, MalformedMessage, ReplayedMessage, UnknownSender
from fedgate_common.messages import ModelUpdate
from fedgate_common.model_spec import ModelSpec, initial_weights, parameter_shapes
from fedgate_coordinator.rounds import RoundAborted, RoundCompleted, RoundInProgress, RoundSettings

SPEC = ModelSpec(n_features=3, window=8, n_classes=2, channels=4)
BASE = "ab" * 32


def new_round(**settings: Any) -> RoundInProgress:
    base = initial_weights(SPEC, np.random.default_rng(0))
    return RoundInProgress(
        round=3,
        base_digest=BASE,
        base_weights=base,
        spec=SPEC,
        selected=["a", "b", "c"],
        settings=RoundSettings(min_participants=2, **settings),
    )


def update(value: float, num_samples: int = 10, base: str = BASE) -> ModelUpdate:
    delta = {n: np.full(s, value, np.float32) for n, s in parameter_shapes(SPEC)}
    return ModelUpdate(
        round=3,
        base_digest=base,
        delta=encode_arrays(delta),
        num_samples=num_samples,
        train_loss=1.0,
    )


def test_weighted_mean_of_deltas_is_applied_to_the_base() -> None:
    current = new_round()
    current.accept("a", update(1.0, num_samples=10), bytes_up=1)
    current.accept("b", update(4.0, num_samples=30), bytes_up=1)
    result = current.close()
    assert isinstance(result, RoundCompleted)
    base = initial_weights(SPEC, np.random.default_rng(0))
    np.testing.assert_allclose(result.weights["head.bias"], base["head.bias"] + 3.25, rtol=1e-6)


def test_claimed_sample_counts_are_capped() -> None:
    current = new_round(max_weight=20)
    current.accept("a", update(1.0, num_samples=20), bytes_up=1)
    current.accept("b", update(4.0, num_samples=10**9), bytes_up=1)  # claims a huge data set
    result = current.close()
    assert isinstance(result, RoundCompleted)
    base = initial_weights(SPEC, np.random.default_rng(0))
    np.testing.assert_allclose(result.weights["conv1.bias"], base["conv1.bias"] + 2.5, rtol=1e-6)


def test_update_above_the_norm_bound_is_refused() -> None:
    current = new_round(max_update_norm=10.0)
    with pytest.raises(LimitExceeded):
        current.accept("a", update(1.0), bytes_up=1)
    current.accept("a", update(0.001), bytes_up=1)  # the agent can still answer correctly


def test_too_few_answers_abort_and_release_nothing() -> None:
    current = new_round()
    current.accept("a", update(1.0), bytes_up=1)
    result = current.close()
    assert isinstance(result, RoundAborted)
    assert "1 of 3" in result.reason
    assert not hasattr(result, "weights")


def test_aggregate_overflow_aborts_instead_of_storing_inf() -> None:
    """Defence in depth: finite inputs can still overflow float32 when added to a base."""
    base = {n: np.full(s, 3e38, np.float32) for n, s in parameter_shapes(SPEC)}
    current = RoundInProgress(
        round=3,
        base_digest=BASE,
        base_weights=base,
        spec=SPEC,
        selected=["a", "b"],
        settings=RoundSettings(min_participants=2, max_update_norm=float("inf")),
    )
    current.accept("a", update(3e38), bytes_up=1)
    current.accept("b", update(3e38), bytes_up=1)
    result = current.close()
    assert isinstance(result, RoundAborted)
    assert "not finite" in result.reason


def test_selection_replay_base_and_late_updates() -> None:
    current = new_round()
    with pytest.raises(UnknownSender):
        current.accept("z", update(1.0), bytes_up=1)
    with pytest.raises(MalformedMessage):
        current.accept("a", update(1.0, base="cd" * 32), bytes_up=1)
    current.accept("a", update(1.0), bytes_up=1)
    with pytest.raises(ReplayedMessage):
        current.accept("a", update(1.0), bytes_up=1)
    assert current.received == 1
    assert not current.all_in


def test_learning_rate_decays_per_round() -> None:
    settings = RoundSettings(learning_rate=0.1, lr_decay=0.5)
    assert settings.plan_for(1).learning_rate == pytest.approx(0.1)
    assert settings.plan_for(3).learning_rate == pytest.approx(0.025)
