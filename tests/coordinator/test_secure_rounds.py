"""What the coordinator does with an unmasked sum: bounds it before using it."""

from __future__ import annotations

import numpy as np
from fedgate_common.secagg.aggregator import Unmasked
from fedgate_common.secagg.encoding import encode_update
from fedgate_common.secagg.local_round import run_local_round
from fedgate_common.secagg.participant import encoding_params
from fedgate_coordinator.secure_rounds import SecAggSettings, input_bound_violation

SETTINGS = SecAggSettings(clip_norm=2.0, weight_cap=100)
D = 200


def _round(poisoned: dict[str, np.ndarray] | None = None) -> Unmasked:
    params = SETTINGS.params_for(6)
    encoding = encoding_params(params)
    rng = np.random.default_rng(3)
    encoded = {f"gw-{i}": encode_update(rng.normal(0, 1.0, D), 80, encoding) for i in range(6)}
    encoded.update(poisoned or {})
    outcome = run_local_round(encoded, params, dimension=D).outcome
    assert isinstance(outcome, Unmasked)
    return outcome


def test_honest_sums_pass_the_bounds() -> None:
    """Updates of norm ~14 are clipped to 2 by the agents: within n * clip_norm."""
    assert input_bound_violation(_round(), SETTINGS.params_for(6)) == ""


def test_an_unclipped_input_aborts_instead_of_poisoning() -> None:
    params = SETTINGS.params_for(6)
    encoding = encoding_params(params)
    words = np.zeros(encoding.vector_length(D), dtype=np.uint16)
    words[:D] = encoding.level  # every coordinate at the bound: norm sqrt(D) * clip_norm
    words[D:] = encode_update(np.zeros(D), 80, encoding)[D:]
    reason = input_bound_violation(_round({"gw-0": words}), params)
    assert "an input was not clipped" in reason


def test_a_claimed_weight_above_the_cap_aborts() -> None:
    params = SETTINGS.params_for(6)
    encoding = encoding_params(params)
    words = encode_update(np.zeros(D), 80, encoding)
    words[D:] = encoding.limb_base - 1  # limbs claiming far more than weight_cap
    reason = input_bound_violation(_round({"gw-0": words}), params)
    assert "exceeds" in reason
    assert "weight_cap" in reason
