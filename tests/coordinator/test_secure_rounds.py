"""What the coordinator does with an unmasked sum (bounds it before using it), its clip norm
and its site-level privacy plan."""

from __future__ import annotations

import math

import msgspec
import numpy as np
from fedgate_common.messages import SecAggParams
from fedgate_common.secagg.aggregator import Unmasked
from fedgate_common.secagg.encoding import EncodingParams, encode_update
from fedgate_common.secagg.local_round import run_local_round
from fedgate_common.secagg.participant import encoding_params
from fedgate_common.secagg.site_dp import effective_noise_multiplier
from fedgate_coordinator.secure_rounds import (
    SecAggSettings,
    input_bound_violation,
    secagg_problems,
    with_site_noise,
)
from fedgate_coordinator.site_privacy import (
    SitePrivacySettings,
    check_budget,
    epsilon,
    plan_noise_multiplier,
)

SETTINGS = SecAggSettings(clip_norm=2.0, weight_cap=100)
D = 200


def _round(
    poisoned: dict[str, np.ndarray] | None = None, *, params: SecAggParams | None = None
) -> Unmasked:
    params = params or SETTINGS.params_for(6)
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


def test_noisy_honest_sums_pass_the_bounds_and_unclipped_inputs_still_abort() -> None:
    """The bound allows for the noise, so it catches only inputs that stand out of it
    (here one input of norm √D · clip_norm against noise of norm ~0.25 √D · clip_norm)."""
    settings = msgspec.structs.replace(SETTINGS, word_bits=32)
    params = with_site_noise(
        settings.params_for(6), noise_multiplier=0.2, min_inputs=4, count_noise=0.0
    )
    assert input_bound_violation(_round(params=params), params) == ""
    encoding = encoding_params(params)
    words = np.zeros(encoding.vector_length(D), dtype=np.uint32)
    words[:D] = encoding.level
    words[D:] = encode_update(np.zeros(D), 80, encoding)[D:]
    assert "not clipped" in input_bound_violation(_round({"gw-0": words}, params=params), params)


def test_an_understated_weight_aborts_under_site_level_dp() -> None:
    settings = msgspec.structs.replace(SETTINGS, word_bits=32)
    params = with_site_noise(
        settings.params_for(6), noise_multiplier=1.0, min_inputs=4, count_noise=0.0
    )
    encoding = encoding_params(params)
    words = encode_update(np.zeros(D), 80, encoding)
    words[D:] = 0  # weight 0: this input would pull the mean towards others' updates
    assert "not 6 survivors" in input_bound_violation(
        _round({"gw-0": words}, params=params), params
    )


def test_adaptive_clipping_moves_the_clip_norm_towards_the_quantile() -> None:
    settings = SecAggSettings(adaptive_clip=True, clip_quantile=0.5, clip_learning_rate=0.2)
    assert settings.params_for(6).count_within_clip
    assert settings.next_clip_norm(1.0, 0.5) == 1.0
    assert settings.next_clip_norm(1.0, 1.0) == math.exp(-0.1)  # all within: shrink
    assert settings.next_clip_norm(1.0, 0.0) == math.exp(0.1)  # none within: grow
    assert settings.next_clip_norm(1.0, 7.0) == math.exp(-0.1)  # noise pushed it past 1
    assert settings.count_noise_for(40) == 2.0
    assert secagg_problems(msgspec.structs.replace(settings, clip_quantile=1.0))


def test_planned_noise_keeps_the_planned_rounds_within_the_target() -> None:
    settings = SitePrivacySettings(site_level="on", target_epsilon=4.0, planned_rounds=10)
    base = msgspec.structs.replace(SETTINGS, word_bits=32).params_for(6)

    def encoding_for(z: float) -> EncodingParams:
        return encoding_params(
            with_site_noise(base, noise_multiplier=z, min_inputs=4, count_noise=0.0)
        )

    z = plan_noise_multiplier(settings, encoding_for, 24_000)
    spent = epsilon([effective_noise_multiplier(encoding_for(z), 24_000)] * 10, 1e-5)
    below = epsilon([effective_noise_multiplier(encoding_for(z / 1.01), 24_000)] * 10, 1e-5)
    assert spent <= 4.0 < below
    check = check_budget(settings, [z] * 10, z)
    assert not check.allows_next
    assert check_budget(settings, [z] * 9, z).allows_next


def test_epsilon_matches_the_gaussian_mechanism_in_closed_form() -> None:
    """One Gaussian mechanism with z = 1: the optimal (ε, δ) curve (Balle & Wang 2018)
    gives ε ≈ 4.22 at δ = 1e-5; RDP is looser, but not by much, and never below it."""
    value = epsilon([1.0], 1e-5)
    assert 4.22 <= value <= 5.0
    assert epsilon([], 1e-5) == 0.0
    assert math.isinf(epsilon([0.0], 1e-5))
