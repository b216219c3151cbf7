"""Site-level DP inside secure aggregation: noise before masking, room for it, dropouts.

Rounds run in process (:func:`run_local_round`), so the sum the coordinator decodes is the
one an MQTT round would release. Zero updates make the released sum pure noise, whose
spread is then measured against the target the shares were sized for.
"""

from __future__ import annotations

import math
import random

import msgspec
import numpy as np
import pytest
from fedgate_common.errors import NoiseTooLow
from fedgate_common.messages import SecAggParams, SiteNoise
from fedgate_common.secagg.aggregator import Aborted, Unmasked
from fedgate_common.secagg.distributed_noise import noise_headroom
from fedgate_common.secagg.encoding import (
    HEADROOM_TAIL,
    EncodingParams,
    decode_sum,
    encode_update,
)
from fedgate_common.secagg.graph import default_degree, default_threshold, effective_degree
from fedgate_common.secagg.local_round import run_local_round
from fedgate_common.secagg.participant import check_params, encoding_params
from fedgate_common.secagg.site_dp import (
    effective_noise_multiplier,
    pooled_sum_noise_multiplier,
    record_noise_multiplier,
    round_rho,
    surviving_share,
)
from hypothesis import given, settings
from hypothesis import strategies as st

DIMENSION = 1500
CLIP = 2.0


def noisy_params(
    n: int, *, z: float, min_inputs: int, count: bool = False, count_noise: float = 0.0
) -> SecAggParams:
    degree = default_degree(n)
    return SecAggParams(
        word_bits=32,
        clip_norm=CLIP,
        weight_cap=100,
        max_inputs=n,
        degree=degree,
        threshold=default_threshold(effective_degree(n, degree)),
        noise=SiteNoise(noise_multiplier=z, min_inputs=min_inputs, count_noise=count_noise),
        count_within_clip=count,
    )


def encoded_zeros(params: SecAggParams, n: int, seed: int) -> dict[str, np.ndarray]:
    rng = random.Random(seed)
    encoding = encoding_params(params)
    return {
        f"agent-{i:02d}": encode_update(np.zeros(DIMENSION), 7, encoding, rng.randbytes)
        for i in range(n)
    }


@given(
    bits=st.sampled_from([16, 32]),
    max_inputs=st.integers(1, 200),
    z=st.floats(0.05, 20.0),
    min_fraction=st.floats(0.1, 1.0),
)
@settings(max_examples=60, deadline=None)
def test_level_leaves_room_for_the_noise_and_is_the_largest_that_does(
    bits: int, max_inputs: int, z: float, min_fraction: float
) -> None:
    min_inputs = max(1, int(max_inputs * min_fraction))
    params = EncodingParams(
        word_bits=bits,
        clip_norm=1.0,
        weight_cap=10,
        max_inputs=max_inputs,
        noise_multiplier=z,
        min_inputs=min_inputs,
    )
    room = 2 ** (bits - 1) - 1

    def needed(level: int) -> int:
        share = 1.01 * z * level / math.sqrt(min_inputs)
        return max_inputs * level + noise_headroom(share * math.sqrt(max_inputs), HEADROOM_TAIL)

    level = params.level
    if level >= 1:
        assert needed(level) <= room
    assert needed(level + 1) > room
    # Noise costs levels exactly when the noiseless level leaves too little room for it: the
    # room left under the noiseless level (room mod max_inputs) may already hold it.
    plain = EncodingParams(word_bits=bits, clip_norm=1.0, weight_cap=10, max_inputs=max_inputs)
    assert level <= plain.level
    assert (level < plain.level) == (needed(plain.level) > room)


def test_released_sum_carries_the_target_noise_with_the_worst_tolerated_dropout() -> None:
    n, min_inputs, z = 9, 6, 1.5
    params = noisy_params(n, z=z, min_inputs=min_inputs)
    encoded = encoded_zeros(params, n, seed=3)
    dropped = {"agent-00", "agent-04", "agent-07"}  # down to exactly min_inputs
    result = run_local_round(
        encoded, params, dropouts={"masked": dropped}, random_bytes=random.Random(4).randbytes
    )
    assert isinstance(result.outcome, Unmasked), result.outcome
    assert len(result.outcome.survivors) == min_inputs
    noise = result.outcome.decoded.weighted_sum
    target = z * CLIP  # the aggregate std in update units at min_inputs survivors
    measured = float(np.std(noise))
    # 1500 coordinates: the sample std is within ±6 % of the truth with overwhelming odds.
    assert measured >= 0.94 * target * 1.01
    assert measured <= 1.06 * target * 1.01
    assert abs(float(np.mean(noise))) < 4 * target / math.sqrt(DIMENSION)


def test_a_round_with_fewer_survivors_than_the_noise_was_sized_for_aborts() -> None:
    n, min_inputs = 9, 7
    params = noisy_params(n, z=1.0, min_inputs=min_inputs)
    encoded = encoded_zeros(params, n, seed=5)
    result = run_local_round(
        encoded,
        params,
        dropouts={"masked": {"agent-01", "agent-02", "agent-03"}},
        random_bytes=random.Random(6).randbytes,
    )
    assert isinstance(result.outcome, Aborted)
    assert result.outcome.stage == "masked"
    assert "7 needed" in result.outcome.reason


def test_every_input_weighs_weight_cap_under_site_level_dp() -> None:
    params = encoding_params(noisy_params(4, z=1.0, min_inputs=3))
    rng = random.Random(7)
    words = [
        encode_update(np.ones(50) * 0.01, samples, params, rng.randbytes) for samples in (1, 5)
    ]
    total = (words[0].astype(np.uint64) + words[1]).astype(np.uint32)
    assert decode_sum(total, params).total_weight == 2 * params.weight_cap


def test_within_clip_count_is_exact_without_noise_and_close_with_it() -> None:
    n = 12
    rng = np.random.default_rng(8)
    updates = [rng.normal(size=DIMENSION) * (0.1 if i < 5 else 0.01) for i in range(n)]
    within = sum(1 for u in updates if np.linalg.norm(u) <= CLIP)
    assert 0 < within < n
    for count_noise, tolerance in ((0.0, 1e-12), (0.5, 3.0)):
        params = encoding_params(
            noisy_params(n, z=1.0, min_inputs=8, count=True, count_noise=count_noise)
        )
        randomness = random.Random(9)
        total = np.sum(
            [encode_update(u, 1, params, randomness.randbytes).astype(np.uint64) for u in updates],
            axis=0,
        )
        decoded = decode_sum((total % 2**32).astype(np.uint32), params)
        assert decoded.within_clip is not None
        assert abs(decoded.within_clip - within) <= tolerance


@given(st.integers(0, 2**32 - 1), st.floats(0.1, 50.0))
@settings(max_examples=40, deadline=None)
def test_one_sites_encoded_update_stays_within_the_accounted_sensitivity(
    seed: int, magnitude: float
) -> None:
    params = EncodingParams(word_bits=16, clip_norm=1.0, weight_cap=10, max_inputs=5)
    update = np.random.default_rng(seed).normal(size=400) * magnitude
    words = encode_update(update, 10, params, random.Random(seed).randbytes)
    values = words[:400].astype(np.int64)
    values = np.where(values >= 2**15, values - 2**16, values)
    assert np.linalg.norm(values) <= params.level + math.sqrt(400)


def test_effective_multiplier_is_below_z_and_near_it_with_fine_quantization() -> None:
    fine = encoding_params(noisy_params(6, z=2.0, min_inputs=4))
    coarse = EncodingParams(
        word_bits=16, clip_norm=1.0, weight_cap=10, max_inputs=6, noise_multiplier=2.0, min_inputs=4
    )
    assert 0.9999 * 2.0 < effective_noise_multiplier(fine, 24_000) < 2.0
    assert effective_noise_multiplier(coarse, 24_000) < 0.95 * 2.0  # rounding costs privacy
    assert math.isinf(
        round_rho(EncodingParams(word_bits=32, clip_norm=1.0, weight_cap=1, max_inputs=3), 10)
    )
    exact_count = encoding_params(noisy_params(6, z=2.0, min_inputs=4, count=True))
    assert effective_noise_multiplier(exact_count, 100) == 0.0  # the count is released exactly


def test_agents_refuse_noise_below_their_floor_and_survivor_sets_below_min_inputs() -> None:
    params = noisy_params(6, z=0.5, min_inputs=4)
    check_params(params, selected=6, min_threshold=2, min_noise_multiplier=0.5)
    with pytest.raises(NoiseTooLow):
        check_params(params, selected=6, min_threshold=2, min_noise_multiplier=0.8)
    plain = msgspec.structs.replace(params, noise=None)
    with pytest.raises(NoiseTooLow):
        check_params(plain, selected=6, min_threshold=2, min_noise_multiplier=0.1)
    with pytest.raises(NoiseTooLow):
        check_params(noisy_params(6, z=1.0, min_inputs=4, count=True), selected=6, min_threshold=2)
    # The encoding cannot dilute the nominal noise: 16-bit words, or inputs sized for more
    # agents than selected (a security review measured z 0.27 for a nominal 3).
    for diluted in (
        msgspec.structs.replace(params, word_bits=16),
        msgspec.structs.replace(params, max_inputs=1000),
    ):
        with pytest.raises(NoiseTooLow):
            check_params(diluted, selected=6, min_threshold=2, min_noise_multiplier=0.5)


@pytest.mark.parametrize(
    ("z", "count_noise"), [(1e-300, 0.0), (1e-170, 0.0), (1.0, 1e-300), (1.0, 1e-170)]
)
def test_noise_too_small_to_square_counts_as_none_instead_of_failing(
    z: float, count_noise: float
) -> None:
    """A coordinator may announce any positive number; ρ of a noise whose square underflows
    is infinite (no noise), not a ZeroDivisionError in every agent."""
    params = noisy_params(6, z=z, min_inputs=4, count=count_noise > 0, count_noise=count_noise)
    assert math.isinf(round_rho(encoding_params(params), DIMENSION))
    assert effective_noise_multiplier(encoding_params(params), DIMENSION) == 0.0


def test_colluders_withholding_shares_leave_the_square_root_of_the_honest_share() -> None:
    """Shares sized for 4 inputs: 1 colluder leaves √(3/4) of the noise, 4 or more leave
    none, and the pooled σ per window scales by exactly that: every input was encoded at the
    announced noise (its level), so withholding shares never makes the sum's σ larger, also
    with 16-bit words and a large z, where the level depends on z most."""
    assert surviving_share(4, 0) == 1.0
    assert surviving_share(4, 1) == pytest.approx(math.sqrt(3 / 4))
    assert surviving_share(4, 4) == surviving_share(4, 9) == 0.0
    bound = 0.01
    for word_bits, z in ((32, 2.0), (16, 5.0), (16, 50.0)):
        params = EncodingParams(
            word_bits=word_bits,
            clip_norm=CLIP,
            weight_cap=1,
            max_inputs=8,
            noise_multiplier=z,
            min_inputs=4,
        )
        full = pooled_sum_noise_multiplier(params, DIMENSION, bound)
        assert full == record_noise_multiplier(params, DIMENSION, bound) > 0
        fewer = pooled_sum_noise_multiplier(params, DIMENSION, bound, colluders=1)
        assert fewer == pytest.approx(full * math.sqrt(3 / 4))
        assert fewer < full
        assert pooled_sum_noise_multiplier(params, DIMENSION, bound, colluders=4) == 0.0
    silent = msgspec.structs.replace(params, noise_multiplier=0.0)
    assert pooled_sum_noise_multiplier(silent, DIMENSION, bound) == 0.0
