"""Distributed discrete Gaussian noise: exact sampler, dropout-proof shares, headroom.

The reference distribution is computed here without the library: the pmf of N_Z(0, σ²) is
exp(−x²/(2σ²)) normalised over |x| ≤ 40σ + 10 (the rest weighs below e^−800), with σ² the
rational :func:`variance_parameter` the sampler promises to be exact for. The chi-square
survival function is the regularised upper incomplete gamma Q(df/2, x/2), evaluated with
the series / continued fraction of Numerical Recipes §6.2 and checked against closed forms.
All samples come from seeded ``random.Random(seed).randbytes``, so every run is identical.
"""

from __future__ import annotations

import functools
import math
import os
import random
import secrets
from collections.abc import Callable

import msgspec
import numpy as np
import numpy.typing as npt
import pytest
from fedgate_common.secagg.distributed_noise import (
    SHARE_MARGIN,
    aggregate_noise_sigma,
    noise_headroom,
    noise_share_sigma,
    sample_discrete_gaussian,
    sum_of_shares_tau,
    variance_parameter,
)
from fedgate_common.secagg.encoding import EncodingParams, decode_sum, encode_update
from fedgate_common.secagg.keystream import word_dtype

Pmf = dict[int, float]


def seeded(seed: int) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


def discrete_gaussian_pmf(sigma: float) -> Pmf:
    variance = float(variance_parameter(sigma))
    limit = math.ceil(40 * math.sqrt(variance)) + 10
    weights = {x: math.exp(-(x * x) / (2 * variance)) for x in range(-limit, limit + 1)}
    total = math.fsum(weights.values())
    return {x: w / total for x, w in weights.items()}


def pmf_variance(pmf: Pmf) -> float:
    return math.fsum(x * x * p for x, p in pmf.items())


def chi2_sf(statistic: float, df: int) -> float:
    """P(χ²_df ≥ statistic) = Q(df/2, statistic/2)."""
    a, x = df / 2, statistic / 2
    if x <= 0:
        return 1.0
    log_prefactor = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:  # series for P(a, x)
        term = total = 1 / a
        n = 0
        while abs(term) > abs(total) * 1e-16:
            n += 1
            term *= x / (a + n)
            total += term
        return max(0.0, 1.0 - total * math.exp(log_prefactor))
    tiny = 1e-300  # modified Lentz continued fraction for Q(a, x)
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-16:
            break
    return math.exp(log_prefactor) * h


def chi_square_p_value(samples: npt.NDArray[np.int64], pmf: Pmf) -> float:
    """Bins: every x with expected count ≥ 5, the two tails pooled into the outermost bins."""
    n = samples.size
    central = sorted(x for x, p in pmf.items() if n * p >= 5)
    low, high = central[0], central[-1]
    values, counts = np.unique(samples, return_counts=True)
    observed = dict(zip(values.tolist(), counts.tolist(), strict=True))
    expected_bins, observed_bins = [], []
    for x in central:
        if x == low:
            expected = math.fsum(p for y, p in pmf.items() if y <= low)
            seen = sum(c for y, c in observed.items() if y <= low)
        elif x == high:
            expected = math.fsum(p for y, p in pmf.items() if y >= high)
            seen = sum(c for y, c in observed.items() if y >= high)
        else:
            expected, seen = pmf[x], observed.get(x, 0)
        expected_bins.append(n * expected)
        observed_bins.append(seen)
    statistic = math.fsum(
        (o - e) ** 2 / e for o, e in zip(observed_bins, expected_bins, strict=True)
    )
    return chi2_sf(statistic, len(central) - 1)


@functools.cache
def cached_samples(sigma: float, count: int, seed: int) -> npt.NDArray[np.int64]:
    """Shared by several tests; callers must not modify the array."""
    return sample_discrete_gaussian(sigma, count, seeded(seed))


# -- the chi-square helper itself ----------------------------------------------------------


@pytest.mark.parametrize("statistic", [0.1, 1.0, 3.0, 10.0, 40.0])
def test_chi2_sf_matches_closed_forms(statistic: float) -> None:
    assert chi2_sf(statistic, 2) == pytest.approx(math.exp(-statistic / 2), rel=1e-12)
    assert chi2_sf(statistic, 1) == pytest.approx(math.erfc(math.sqrt(statistic / 2)), rel=1e-10)
    # df = 4: Q(2, x/2) = e^(−x/2) (1 + x/2)
    assert chi2_sf(statistic, 4) == pytest.approx(
        math.exp(-statistic / 2) * (1 + statistic / 2), rel=1e-12
    )


def test_chi2_sf_large_df_is_near_median() -> None:
    assert 0.4 < chi2_sf(199.0, 200) < 0.6
    assert chi2_sf(300.0, 200) < 1e-5


# -- goodness of fit -----------------------------------------------------------------------

# (σ, samples, seed): integer, non-integer-rational and small variance parameters.
FIT_CASES = [(3.0, 200_000, 1), (40.0, 50_000, 2), (2.5, 30_000, 3), (0.5, 30_000, 4)]


@pytest.mark.parametrize(("sigma", "count", "seed"), FIT_CASES)
def test_samples_fit_the_exact_discrete_gaussian(sigma: float, count: int, seed: int) -> None:
    samples = cached_samples(sigma, count, seed)
    pmf = discrete_gaussian_pmf(sigma)
    assert chi_square_p_value(samples, pmf) > 1e-3
    variance = pmf_variance(pmf)
    std_error = math.sqrt(variance / count)
    assert abs(float(samples.mean())) < 5 * std_error
    assert float(samples.var()) == pytest.approx(variance, rel=0.03)


def test_chi_square_detects_a_two_percent_variance_error() -> None:
    """The fit test has power: the same samples against σ² off by 2 % are rejected."""
    samples = cached_samples(3.0, 200_000, 1)
    wrong = discrete_gaussian_pmf(3.0 * math.sqrt(1.02))
    assert chi_square_p_value(samples, wrong) < 1e-6


def test_small_sigma_is_discrete_not_a_rounded_continuous_gaussian() -> None:
    """At σ = 0.5 N_Z(0, σ²) has variance 0.215, not 0.25 (nor ≈ 0.33 for N(0, σ²) rounded
    to the nearest integer); the samples must show the discrete one."""
    assert pmf_variance(discrete_gaussian_pmf(0.5)) == pytest.approx(0.21501, abs=1e-5)
    assert float(cached_samples(0.5, 30_000, 4).var()) < 0.23


def test_variance_parameter_rounds_up_to_a_millionth() -> None:
    assert variance_parameter(3.0) == 9
    assert variance_parameter(2.5) * 4 == 25
    for sigma in (0.1, 1 / 3, math.pi, 26.99, 1e4 / 7):
        parameter = variance_parameter(sigma)
        assert parameter >= sigma**2
        assert parameter - sigma**2 <= 1e-6 + 1e-12 * sigma**2
        assert (parameter * 10**6).denominator == 1
    assert variance_parameter(0.0) == 0
    for bad in (-1.0, math.nan, math.inf, 2.0**41):
        with pytest.raises(ValueError, match="sigma"):
            variance_parameter(bad)


# -- randomness ----------------------------------------------------------------------------


def test_same_seed_same_samples_different_seed_different_samples() -> None:
    first = sample_discrete_gaussian(10.0, 2000, seeded(7))
    again = sample_discrete_gaussian(10.0, 2000, seeded(7))
    other = sample_discrete_gaussian(10.0, 2000, seeded(8))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert np.count_nonzero(first == other) < 200  # unrelated, not shifted copies


def test_sampler_reads_no_other_randomness(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_: object) -> bytes:
        raise AssertionError("the sampler must read randomness only from random_bytes")

    monkeypatch.setattr(os, "urandom", forbidden)
    monkeypatch.setattr(secrets, "token_bytes", forbidden)
    monkeypatch.setattr(random, "getrandbits", forbidden)
    requested: list[int] = []
    stream = random.Random(5)

    def counting(length: int) -> bytes:
        requested.append(length)
        return stream.randbytes(length)

    samples = sample_discrete_gaussian(50.0, 3000, counting)
    assert np.array_equal(samples, sample_discrete_gaussian(50.0, 3000, seeded(5)))
    assert requested  # it did draw, and only from here


def test_short_random_bytes_are_refused() -> None:
    with pytest.raises(ValueError, match="returned"):
        sample_discrete_gaussian(3.0, 10, lambda length: bytes(length // 2))


def test_zero_sigma_and_zero_count_need_no_randomness() -> None:
    def never(_: int) -> bytes:
        raise AssertionError("no randomness needed")

    assert np.array_equal(sample_discrete_gaussian(0.0, 5, never), np.zeros(5, dtype=np.int64))
    assert sample_discrete_gaussian(3.0, 0, never).size == 0
    with pytest.raises(ValueError, match="count"):
        sample_discrete_gaussian(3.0, -1, never)


# -- shares and dropout --------------------------------------------------------------------

AGENTS, MIN_INPUTS, TARGET_SIGMA, PER_AGENT = 20, 14, 100.0, 10_000


@functools.cache
def agent_shares() -> npt.NDArray[np.int64]:
    """One row per agent: PER_AGENT independent draws of that agent's share."""
    share = noise_share_sigma(
        target_sigma=TARGET_SIGMA, expected_inputs=AGENTS, min_inputs=MIN_INPUTS
    )
    return np.stack(
        [sample_discrete_gaussian(share, PER_AGENT, seeded(1000 + a)) for a in range(AGENTS)]
    )


def test_any_min_inputs_survivors_carry_the_target_variance() -> None:
    shares = agent_shares()
    chooser = random.Random(3)
    for _ in range(6):
        survivors = chooser.sample(range(AGENTS), MIN_INPUTS)
        total = shares[survivors].sum(axis=0)
        # sampling error of a variance over 10⁴ draws: √(2/10⁴) ≈ 1.4 %
        assert float(total.var()) >= 0.95 * TARGET_SIGMA**2


def test_undisrupted_round_carries_more_noise() -> None:
    total = agent_shares().sum(axis=0)
    expected = AGENTS / MIN_INPUTS * SHARE_MARGIN**2 * TARGET_SIGMA**2
    assert float(total.var()) == pytest.approx(expected, rel=0.05)
    share = noise_share_sigma(
        target_sigma=TARGET_SIGMA, expected_inputs=AGENTS, min_inputs=MIN_INPUTS
    )
    assert aggregate_noise_sigma(share_sigma=share, inputs=AGENTS) == pytest.approx(
        SHARE_MARGIN * TARGET_SIGMA * math.sqrt(AGENTS / MIN_INPUTS)
    )


def test_share_sigma_formula_and_refusals() -> None:
    share = noise_share_sigma(target_sigma=6.0, expected_inputs=9, min_inputs=4)
    assert share == pytest.approx(SHARE_MARGIN * 3.0)
    assert 1.0 <= SHARE_MARGIN <= 1.05
    with pytest.raises(ValueError, match="below min_inputs"):
        noise_share_sigma(target_sigma=6.0, expected_inputs=3, min_inputs=4)
    with pytest.raises(ValueError, match="min_inputs"):
        noise_share_sigma(target_sigma=6.0, expected_inputs=3, min_inputs=0)
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="target_sigma"):
            noise_share_sigma(target_sigma=bad, expected_inputs=9, min_inputs=4)


def test_share_variance_covers_the_target_exactly() -> None:
    """Not only σ_i² but the true variance of N_Z(0, σ_i²) times min_inputs reaches target²."""
    for target, minimum in ((3.0, 14), (100.0, 14), (8.0, 50), (1.0, 1)):
        share = noise_share_sigma(target_sigma=target, expected_inputs=minimum, min_inputs=minimum)
        assert minimum * pmf_variance(discrete_gaussian_pmf(share)) >= target**2


def test_kairouz_tau_is_negligible_from_two_units() -> None:
    assert sum_of_shares_tau(share_sigma=2.0, inputs=10_000) < 1e-12
    assert sum_of_shares_tau(share_sigma=0.5, inputs=20) > 1e-3
    assert sum_of_shares_tau(share_sigma=3.0, inputs=1) == 0.0
    small = sum_of_shares_tau(share_sigma=1.0, inputs=2)
    assert small == pytest.approx(10 * math.exp(-(math.pi**2)))


# -- headroom ------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0, 10.5, 40.0])
@pytest.mark.parametrize("tail", [1e-2, 1e-4, 1e-9])
def test_headroom_bounds_the_exact_tail(sigma: float, tail: float) -> None:
    pmf = discrete_gaussian_pmf(sigma)
    bound = noise_headroom(sigma, tail)
    assert math.fsum(p for x, p in pmf.items() if abs(x) > bound) <= tail
    assert bound <= sigma * math.sqrt(2 * math.log(2 / tail)) + 2  # and not absurdly loose


def test_headroom_holds_empirically() -> None:
    samples = np.abs(cached_samples(3.0, 200_000, 1))
    assert np.count_nonzero(samples > noise_headroom(3.0, 1e-3)) <= 200
    assert int(samples.max()) <= noise_headroom(3.0, 1e-9)
    shares = agent_shares()
    share = noise_share_sigma(
        target_sigma=TARGET_SIGMA, expected_inputs=AGENTS, min_inputs=MIN_INPUTS
    )
    summed = np.abs(shares.sum(axis=0))  # the bound for a sum: σ_i·√n
    assert int(summed.max()) <= noise_headroom(share * math.sqrt(AGENTS), 1e-6)


def test_headroom_is_monotone() -> None:
    sigmas = [0.0, 0.1, 0.5, 1.0, 1.5, 3.0, 10.0, 10.01, 100.0, 1e4, 1e6]
    bounds = [noise_headroom(s) for s in sigmas]
    assert bounds == sorted(bounds)
    assert bounds[0] >= 1
    assert bounds[-1] > bounds[-2] > bounds[-3]
    tails = [noise_headroom(10.0, t) for t in (1e-1, 1e-3, 1e-6, 1e-12)]
    assert tails == sorted(tails)
    for bad in (0.0, 1.0, -1e-9):
        with pytest.raises(ValueError, match="tail"):
            noise_headroom(3.0, bad)


# -- shares added by the encoding ----------------------------------------------------------


def _noisy(bits: int, *, z: float, min_inputs: int, max_inputs: int = 50) -> EncodingParams:
    return EncodingParams(
        word_bits=bits,
        clip_norm=1.0,
        weight_cap=100,
        max_inputs=max_inputs,
        noise_multiplier=z,
        min_inputs=min_inputs,
    )


def test_encoding_refuses_unusable_noise_parameters() -> None:
    for bad in (
        _noisy(32, z=-1.0, min_inputs=3),
        _noisy(32, z=math.nan, min_inputs=3),
        _noisy(32, z=math.inf, min_inputs=3),
        _noisy(32, z=1.0, min_inputs=0),
        _noisy(32, z=1.0, min_inputs=51),
    ):
        with pytest.raises(ValueError, match=r"noise_multiplier|min_inputs"):
            bad.check()
    params = _noisy(32, z=1.5, min_inputs=14)
    params.check()
    assert params.update_share_sigma == pytest.approx(
        noise_share_sigma(target_sigma=1.5 * params.level, expected_inputs=50, min_inputs=14)
    )


@pytest.mark.parametrize("bits", [16, 32])
def test_encoding_adds_the_share_to_the_update_only_and_wraps(bits: int) -> None:
    """A zero update rounds to zero, so its update words are exactly the drawn noise, mod
    2^b; the weight limbs stay exact."""
    dimension, modulus = 400, 2**bits
    params = _noisy(bits, z=0.5, min_inputs=4, max_inputs=4)
    drawn: list[npt.NDArray[np.int64]] = []

    def recording(
        sigma: float, count: int, random_bytes: Callable[[int], bytes]
    ) -> npt.NDArray[np.int64]:
        drawn.append(sample_discrete_gaussian(sigma, count, random_bytes))
        return drawn[-1]

    words = encode_update(np.zeros(dimension), 7, params, seeded(21), noise_sampler=recording)
    plain = encode_update(  # the same input, no noise, weighing weight_cap
        np.zeros(dimension),
        params.weight_cap,
        msgspec.structs.replace(params, noise_multiplier=0.0),
    )
    assert len(drawn) == 1
    assert drawn[0].size == dimension
    assert words.dtype == word_dtype(bits)
    assert np.array_equal(words[:dimension].astype(np.int64), drawn[0] % modulus)
    assert np.array_equal(words[dimension:], plain[dimension:])  # limbs: weight_cap, exact
    assert np.any(drawn[0] < 0)
    assert np.any(words[:dimension] > modulus // 2)  # negative noise wrapped


def test_noised_inputs_decode_to_sum_plus_noise_with_exact_weight() -> None:
    """Encode with shares, sum mod 2^b, decode: the noise is all that separates the result."""
    encoding = _noisy(32, z=0.2, min_inputs=3)
    rng = np.random.default_rng(5)
    updates = [rng.normal(size=300) * 0.01 for _ in range(4)]
    total = np.zeros(encoding.vector_length(300), dtype=np.uint32)
    for index, (update, weight) in enumerate(zip(updates, [100, 60, 100, 25], strict=True)):
        total += encode_update(update, weight, encoding, seeded(100 + index))
    decoded = decode_sum(total, encoding)
    assert decoded.total_weight == 4 * encoding.weight_cap  # every input weighs the cap
    exact = sum(updates)
    residual = decoded.weighted_sum - exact
    share = encoding.update_share_sigma
    expected_std = aggregate_noise_sigma(share_sigma=share, inputs=4) / encoding.scale
    assert float(residual.std()) == pytest.approx(expected_std, rel=0.15)
    assert float(np.abs(residual).max()) <= (noise_headroom(share * 2, 1e-9) + 4) / encoding.scale
