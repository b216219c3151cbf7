"""Fixed-point encoding: the decoded sum is close to the exact weighted sum and cannot wrap.

Error bound used below: each input's coordinate is stochastically rounded once, moving it by
less than one unit of 1/scale, so for N inputs every decoded coordinate is within N/scale
of Σ (w_i / weight_cap) · clip(u_i) (plus float rounding, far below 1/scale). With
scale = level / clip_norm and level = ⌊(2^(b−1) − 1) / max_inputs⌋ that is about
N · max_inputs · clip_norm / 2^(b−1). The total weight travels as integer limbs: exact.
"""

from __future__ import annotations

import math
import random

import numpy as np
import numpy.typing as npt
import pytest
from fedgate_common.secagg.encoding import (
    DecodedSum,
    EncodingParams,
    clip_to_norm,
    decode_sum,
    encode_update,
    stochastic_round,
)
from fedgate_common.secagg.keystream import Words, expand_mask, word_dtype
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

WORD_BITS = (16, 32)


def max_inputs_for(bits: int) -> int:
    return int((2 ** (bits - 1) - 1) // 2)


def exact_clip(update: npt.NDArray[np.float64], clip_norm: float) -> npt.NDArray[np.float64]:
    """Clip computed without the library, in extended precision where it matters."""
    norm = float(np.linalg.norm(update.astype(np.longdouble)))
    return update * min(1.0, clip_norm / norm) if norm > 0 else update


def wrapping_sum(encodings: list[Words], bits: int) -> Words:
    total = np.zeros(encodings[0].size, dtype=word_dtype(bits))
    for words in encodings:
        total += words  # unsigned arithmetic wraps mod 2^b, as on the aggregator
    return total


@st.composite
def encoding_cases(
    draw: st.DrawFn,
) -> tuple[EncodingParams, list[npt.NDArray[np.float64]], list[int], int]:
    bits = draw(st.sampled_from(WORD_BITS))
    count = draw(st.integers(min_value=1, max_value=12))
    max_inputs = draw(
        st.one_of(
            st.just(count),
            st.integers(min_value=count, max_value=max(count, min(5000, max_inputs_for(bits)))),
        )
    )
    params = EncodingParams(
        word_bits=bits,
        clip_norm=draw(st.floats(min_value=1e-3, max_value=1e3)),
        weight_cap=draw(st.integers(min_value=1, max_value=10**7)),
        max_inputs=max_inputs,
    )
    dimension = draw(st.integers(min_value=1, max_value=40))
    element = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False)
    updates = [
        np.array(draw(st.lists(element, min_size=dimension, max_size=dimension)), dtype=np.float64)
        for _ in range(count)
    ]
    weights = draw(
        st.lists(
            st.integers(min_value=-5, max_value=2 * params.weight_cap),
            min_size=count,
            max_size=count,
        )
    )
    return params, updates, weights, draw(st.integers(min_value=0, max_value=2**32))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(encoding_cases())
def test_decoded_sum_is_within_n_over_scale(
    case: tuple[EncodingParams, list[npt.NDArray[np.float64]], list[int], int],
) -> None:
    params, updates, weights, seed = case
    params.check()
    rng = random.Random(seed)
    encodings = [
        encode_update(u, w, params, rng.randbytes) for u, w in zip(updates, weights, strict=True)
    ]
    for words in encodings:
        assert words.dtype == word_dtype(params.word_bits)
        assert words.shape == (params.vector_length(updates[0].size),)
    decoded = decode_sum(wrapping_sum(encodings, params.word_bits), params)
    capped = [min(max(w, 0), params.weight_cap) for w in weights]
    exact = sum(
        (w / params.weight_cap) * exact_clip(u, params.clip_norm)
        for u, w in zip(updates, capped, strict=True)
    )
    count = len(updates)
    bound = count / params.scale
    slack = 1e-9 * (bound + count * params.clip_norm)
    assert decoded.total_weight == sum(capped)
    assert decoded.weighted_sum.shape == updates[0].shape
    assert np.max(np.abs(decoded.weighted_sum - exact)) <= bound + slack


@settings(max_examples=80, deadline=None)
@given(
    bits=st.sampled_from(WORD_BITS),
    extreme=st.booleans(),
    max_inputs=st.integers(min_value=1, max_value=3000),
    clip_norm=st.floats(min_value=1e-3, max_value=1e4),
    weight_cap=st.integers(min_value=1, max_value=2**40),
    dimension=st.integers(min_value=1, max_value=8),
    data=st.data(),
)
def test_worst_case_inputs_cannot_wrap(
    bits: int,
    extreme: bool,
    max_inputs: int,
    clip_norm: float,
    weight_cap: int,
    dimension: int,
    data: st.DataObject,
) -> None:
    """Every one of max_inputs inputs at the clip bound, same sign, maximum weight.

    All mass on one coordinate puts it at ±clip_norm, the largest a clipped coordinate
    can be; encoding must not exceed ±level there, so the sum stays inside (−2^(b−1), 2^(b−1))
    and the total weight limbs inside [0, 2^b). With ``extreme`` the word budget is used up
    completely (max_inputs = (2^(b−1) − 1) // 2, the largest value params accept); the sum of
    that many inputs is formed as max_inputs · x with Python integers, which is what adding
    copies mod 2^b gives.
    """
    n = max_inputs_for(bits) if extreme else max_inputs
    params = EncodingParams(
        word_bits=bits, clip_norm=clip_norm, weight_cap=weight_cap, max_inputs=n
    )
    params.check()
    axis = data.draw(st.integers(min_value=0, max_value=dimension - 1), label="axis")
    sign = data.draw(st.sampled_from([1.0, -1.0]), label="sign")
    overshoot = data.draw(st.floats(min_value=1.0, max_value=1e6), label="overshoot")
    update = np.zeros(dimension)
    update[axis] = sign * clip_norm * overshoot
    rng = random.Random(data.draw(st.integers(min_value=0, max_value=2**32), label="seed"))
    modulus = 2**bits
    copies = n if extreme or n > 200 else 0
    if copies:
        one = encode_update(update, weight_cap * 3, params, rng.randbytes).astype(np.int64)
        signed = np.where(one >= modulus // 2, one - modulus, one)[:dimension]
        assert abs(int(signed[axis])) <= params.level
        total = np.array([(copies * int(w)) % modulus for w in one], dtype=np.int64)
        total_words = total.astype(word_dtype(bits))
    else:
        encodings = [encode_update(update, weight_cap, params, rng.randbytes) for _ in range(n)]
        total_words = wrapping_sum(encodings, bits)
    decoded = decode_sum(total_words, params)
    expected = np.zeros(dimension)
    expected[axis] = sign * n * clip_norm
    assert decoded.total_weight == n * weight_cap
    assert np.sign(decoded.weighted_sum[axis]) == sign  # a wrap would flip the sign
    bound = n / params.scale * (1 + 1e-9)
    assert np.max(np.abs(decoded.weighted_sum - expected)) <= bound
    assert abs(decoded.weighted_sum[axis]) <= n * clip_norm * (1 + 1e-12)


def test_more_inputs_than_sized_for_do_wrap() -> None:
    """Control for the test above: its sign check does catch a wrap."""
    params = EncodingParams(word_bits=16, clip_norm=1.0, weight_cap=1, max_inputs=1)
    one = encode_update(np.array([1.0]), 1, params)
    decoded = decode_sum(wrapping_sum([one, one], 16), params)
    assert decoded.weighted_sum[0] < 0


def test_stochastic_rounding_is_unbiased() -> None:
    values = np.full(20000, 0.3) + (np.arange(20000) % 5).astype(np.float64)
    rounded = stochastic_round(values, random.Random(11).randbytes)
    assert set(np.unique(rounded - np.floor(values))) <= {0, 1}
    assert abs(float(np.mean(rounded - values))) < 0.02


def test_integers_round_to_themselves() -> None:
    values = np.array([-3.0, -1.0, 0.0, 2.0, 7.0])
    np.testing.assert_array_equal(stochastic_round(values), values.astype(np.int64))


def test_weight_limbs_known_answer() -> None:
    params = EncodingParams(word_bits=16, clip_norm=1.0, weight_cap=100, max_inputs=1000)
    assert params.limb_base == 66  # ⌊65535 / 1000⌋ + 1
    assert params.weight_limbs == 2
    words = encode_update(np.zeros(3), 100, params)
    assert words.tolist() == [0, 0, 0, 100 % 66, 100 // 66]
    assert decode_sum(words, params).total_weight == 100


def test_level_and_scale_known_answer() -> None:
    params = EncodingParams(word_bits=32, clip_norm=2.0, weight_cap=10, max_inputs=100)
    assert params.level == (2**31 - 1) // 100
    assert params.scale == params.level / 2.0
    assert params.vector_length(5) == 5 + params.weight_limbs


def test_negative_and_excess_sample_counts_are_capped() -> None:
    params = EncodingParams(word_bits=16, clip_norm=1.0, weight_cap=10, max_inputs=4)
    assert decode_sum(encode_update(np.ones(2), -3, params), params).total_weight == 0
    assert decode_sum(encode_update(np.ones(2), 99, params), params).total_weight == 10


def test_clip_keeps_direction() -> None:
    clipped = clip_to_norm(np.array([3.0, 4.0]), 1.0)
    np.testing.assert_allclose(clipped, [0.6, 0.8])
    np.testing.assert_array_equal(clip_to_norm(np.array([0.3, 0.4]), 1.0), [0.3, 0.4])


def test_mean_update() -> None:
    decoded = DecodedSum(weighted_sum=np.array([2.0, -1.0]), total_weight=4)
    np.testing.assert_allclose(decoded.mean_update(10), [5.0, -2.5])
    with pytest.raises(ValueError, match="zero"):
        DecodedSum(weighted_sum=np.zeros(2), total_weight=0).mean_update(10)


@pytest.mark.parametrize(
    "update",
    [np.zeros((2, 2)), np.array([1.0, np.nan]), np.array([np.inf, 0.0])],
    ids=["2-d", "nan", "inf"],
)
def test_encode_refuses_bad_updates(update: npt.NDArray[np.float64]) -> None:
    params = EncodingParams(word_bits=16, clip_norm=1.0, weight_cap=10, max_inputs=4)
    with pytest.raises(ValueError, match=r"flat|NaN"):
        encode_update(update, 1, params)


@pytest.mark.parametrize(
    ("bits", "clip_norm", "weight_cap", "max_inputs"),
    [
        (8, 1.0, 1, 1),
        (64, 1.0, 1, 1),
        (16, 0.0, 1, 1),
        (16, -1.0, 1, 1),
        (16, float("inf"), 1, 1),
        (16, float("nan"), 1, 1),
        (16, 1.0, 0, 1),
        (16, 1.0, 1, 0),
        (16, 1.0, 1, max_inputs_for(16) + 1),
        (32, 1.0, 1, max_inputs_for(32) + 1),
    ],
)
def test_unusable_params_are_refused(
    bits: int, clip_norm: float, weight_cap: int, max_inputs: int
) -> None:
    params = EncodingParams(
        word_bits=bits, clip_norm=clip_norm, weight_cap=weight_cap, max_inputs=max_inputs
    )
    with pytest.raises(ValueError, match=r"word size|clip_norm|weight_cap|max_inputs"):
        params.check()


def test_decode_refuses_vectors_shorter_than_the_limbs() -> None:
    params = EncodingParams(word_bits=16, clip_norm=1.0, weight_cap=10**6, max_inputs=4)
    assert params.weight_limbs >= 2
    with pytest.raises(ValueError, match="shorter"):
        decode_sum(np.zeros(params.weight_limbs - 1, dtype=np.uint16), params)


# A 32-byte key whose AES-256-CTR keystream starts with the 32-bit word 4294967187
# (≥ 2^32 − 1024): as the stochastic-rounding randomness it gives u = word / 2^32 ≈ 1 − 2^-25.
# Found by search; pinned so the worst case below is deterministic.
U_NEAR_ONE_KEY = (2323681).to_bytes(32, "big")


def test_rounding_noise_near_one_cannot_push_past_level() -> None:
    """One input at +clip with the largest level there is (32-bit words, max_inputs = 1).

    Encoding must stay within ±level whatever the rounding randomness; here u is within
    2^-22 of 1, where level + u rounds to level + 1 in float64 (level = 2^31 − 1 needs 31
    of the 53 mantissa bits).
    """
    # Regression: clipping to ±level *before* adding u and flooring is not enough, since
    # float64(level) + u == level + 1 for such u when level > 2^21 (32-bit words with
    # max_inputs ≤ 1023); the coordinate then becomes 2^31 and wraps to −2^31, so a single
    # input at +clip would decode as −clip. The integers are clamped after rounding.
    assert int(expand_mask(U_NEAR_ONE_KEY, 1, 32)[0]) >= 2**32 - 1024
    params = EncodingParams(word_bits=32, clip_norm=1.0, weight_cap=1, max_inputs=1)
    words = encode_update(np.array([1.0]), 1, params, lambda _: U_NEAR_ONE_KEY)
    assert int(words[0]) <= params.level
    decoded = decode_sum(words, params)
    assert decoded.weighted_sum[0] > 0
    assert decoded.total_weight == 1


# Regression: sqrt(dot(v, v)) overflows to inf for finite coordinates above ~1.3e154; an
# update that large must still be clipped to clip_norm in its own direction (DESIGN §4),
# neither encoded as zero nor refused as non-finite.
def test_huge_finite_updates_are_clipped() -> None:
    params = EncodingParams(word_bits=16, clip_norm=1.0, weight_cap=1, max_inputs=1)
    with np.errstate(over="ignore"):
        words = encode_update(np.array([1e200, 1.0]), 1, params)
    decoded = decode_sum(words, params)
    np.testing.assert_allclose(decoded.weighted_sum, [1.0, 0.0], atol=1 / params.scale)


@pytest.mark.parametrize("clip_norm", [1e-320, 1e-10, 0.0, -1.0, math.inf, math.nan])
def test_a_clip_too_small_to_scale_by_is_refused(clip_norm: float) -> None:
    """level / 1e-320 overflows to inf: every coordinate would encode as an infinity cast
    to an integer, whatever the update (saturating to ±level on some CPUs: its signs, at
    full level, far outside the sensitivity the noise is sized for)."""
    params = EncodingParams(word_bits=32, clip_norm=clip_norm, weight_cap=10, max_inputs=100)
    with pytest.raises(ValueError, match="clip_norm must be a number of at least 1e-09"):
        params.check()
    EncodingParams(word_bits=32, clip_norm=1e-9, weight_cap=10, max_inputs=100).check()
