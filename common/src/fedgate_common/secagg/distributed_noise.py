"""Distributed discrete Gaussian noise for site-level DP under secure aggregation (DESIGN §6).

Each agent adds its share of integer noise to its encoded update *before* masking
(Kairouz, Liu, Steinke, ICML 2021, "The Distributed Discrete Gaussian Mechanism"), so the
coordinator only ever unmasks a sum that already carries the aggregate noise.

**Sampler.** :func:`sample_discrete_gaussian` draws exactly from N_Z(0, σ²), the
distribution on the integers with P(x) ∝ exp(−x²/(2σ²)), with the rejection sampler of
Canonne, Kamath, Steinke (NeurIPS 2020, "The Discrete Gaussian for Differential Privacy",
Algorithm 3 on top of their Algorithms 1 and 2): candidates from the discrete Laplace with
scale t = ⌊σ⌋ + 1, each accepted with probability exp(−(|y| − σ²/t)² / (2σ²)). Every
Bernoulli(exp(−γ)) is decided with integer arithmetic on the exact rational γ = n/d, and
every uniform integer is drawn from ``random_bytes`` by rejection (no modulo bias), so no
floating point and no other randomness enters. The only approximation is the parameter:
σ² is rounded *up* to a multiple of 10⁻⁶ (:func:`variance_parameter`); the sampler is exact
for that rational variance parameter, which is never below the requested one.

Cost: pure Python, a few dozen small-integer operations per sample, nearly independent of σ
(the numbers grow only logarithmically). Measured with ``secrets.token_bytes`` on a 2-core
development VM (CPython 3.11): about 10⁵ samples/s for σ from 3 to 10⁶, so ~1 s of one core
per 10⁵ coordinates per round.

**Shares and dropout.** With ``min_inputs`` the fewest inputs a round may sum before it
aborts, every agent adds N_Z(0, σ_i²) with σ_i = margin · target / √min_inputs
(:func:`noise_share_sigma`). Independent variances add, so any ``k ≥ min_inputs`` survivors
carry variance ≥ k · Var(N_Z(0, σ_i²)) ≥ target². The sum of discrete Gaussians is not
itself a discrete Gaussian; Kairouz et al. (Proposition 14) bound the extra Rényi
divergence by a term in τ = 10 · Σ_{k=1}^{n−1} exp(−2π²σ_i² · k/(k+1))
(:func:`sum_of_shares_tau`), which is below 10⁻¹⁵ · n for σ_i ≥ 2 encoded units and must
be passed to the accountant when it is not negligible. ``SHARE_MARGIN`` covers the other
small gap: Var(N_Z(0, σ²)) is slightly below σ² (by less than 10⁻⁶ relative for σ ≥ 1).

**Units and headroom.** Noise is added in the encoded integer domain (one unit = one
quantization step, 1/scale in update units), by :func:`.encoding.encode_update`, to the
update coordinates (and the within-clip word), never to the weight limbs, mod 2^b. Only
the *sum* must not wrap: with at most ``max_inputs`` inputs the summed noise is
(σ_i·√max_inputs)-subgaussian, so :func:`noise_headroom` of that σ bounds it per
coordinate except with probability ``tail``; the encoding's ``level`` reserves that much
of the signed range on top of ``max_inputs · level``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import numpy.typing as npt

SHARE_MARGIN = 1.01
"""Each share's σ is this much above target/√min_inputs (2 % more variance): covers the
discrete Gaussian's variance deficit and float rounding of σ, at 1 % utility cost."""

VARIANCE_RESOLUTION = 10**6
"""σ² is rounded up to a multiple of 1/VARIANCE_RESOLUTION before sampling."""

_MAX_SIGMA = 2.0**40  # far beyond any word size; keeps every sample inside int64
_CHUNK_BYTES = 4096  # random_bytes is called for this many bytes at a time


def variance_parameter(sigma: float) -> Fraction:
    """The exact rational σ² the sampler uses: σ² rounded up to a multiple of 10⁻⁶."""
    if not (math.isfinite(sigma) and 0 <= sigma <= _MAX_SIGMA):
        raise ValueError(f"sigma must be a finite number in [0, 2**40], got {sigma}")
    exact = Fraction(sigma) ** 2  # the float σ is an exact dyadic rational
    return Fraction(math.ceil(exact * VARIANCE_RESOLUTION), VARIANCE_RESOLUTION)


class _UniformSource:
    """Uniform integers from ``random_bytes``, by rejection, read in chunks."""

    __slots__ = ("_buffer", "_position", "_random_bytes")

    def __init__(self, random_bytes: Callable[[int], bytes]) -> None:
        self._random_bytes = random_bytes
        self._buffer = b""
        self._position = 0

    def _refill(self, needed: int) -> None:
        length = max(_CHUNK_BYTES, needed)
        fresh = self._random_bytes(length)
        if len(fresh) != length:
            raise ValueError(f"random_bytes({length}) returned {len(fresh)} bytes")
        self._buffer = self._buffer[self._position :] + fresh
        self._position = 0

    def below(self, bound: int) -> int:
        """Uniform in [0, bound): draw bit_length(bound − 1) bits until one is < bound."""
        if bound == 1:
            return 0
        bits = (bound - 1).bit_length()
        size, mask = (bits + 7) >> 3, (1 << bits) - 1
        while True:
            end = self._position + size
            if end > len(self._buffer):
                self._refill(size)
                end = size
            value = int.from_bytes(self._buffer[self._position : end], "little") & mask
            self._position = end
            if value < bound:
                return value

    def bernoulli_exp_fraction(self, numerator: int, denominator: int) -> bool:
        """Bernoulli(exp(−γ)) for γ = numerator/denominator in [0, 1] (CKS Algorithm 1).

        Draw A_k ~ Bernoulli(γ/k) for k = 1, 2, … until one is 0; the number of draws is
        odd with probability exp(−γ). Bernoulli(n/m) is "uniform below m is below n".
        """
        k = 1
        while self.below(denominator * k) < numerator:
            k += 1
        return k & 1 == 1

    def bernoulli_exp(self, numerator: int, denominator: int) -> bool:
        """Bernoulli(exp(−γ)) for any rational γ ≥ 0: ⌊γ⌋ draws of exp(−1), then the rest."""
        whole, rest = divmod(numerator, denominator)
        for _ in range(whole):
            if not self.bernoulli_exp_fraction(1, 1):
                return False
        return self.bernoulli_exp_fraction(rest, denominator)

    def discrete_laplace(self, scale: int) -> int:
        """P(z) ∝ exp(−|z| / scale) on the integers (CKS Algorithm 2 with s = 1, t = scale).

        |z| = U + scale·V with U uniform below ``scale`` kept with probability exp(−U/scale)
        and V geometric (successes of Bernoulli(exp(−1))); a negative zero is rejected so
        that zero is not counted twice.
        """
        while True:
            low = self.below(scale)
            if not self.bernoulli_exp_fraction(low, scale):
                continue
            high = 0
            while self.bernoulli_exp_fraction(1, 1):
                high += 1
            magnitude = low + scale * high
            negative = self.below(2) == 1
            if negative and magnitude == 0:
                continue
            return -magnitude if negative else magnitude


def sample_discrete_gaussian(
    sigma: float, count: int, random_bytes: Callable[[int], bytes]
) -> npt.NDArray[np.int64]:
    """``count`` independent draws from N_Z(0, σ²), σ² = :func:`variance_parameter` (sigma).

    CKS Algorithm 3: with σ² = p/q and t = ⌊σ⌋ + 1, draw y from the discrete Laplace of
    scale t and accept it with probability exp(−γ), γ = (|y| − σ²/t)² / (2σ²)
    = (|y|·q·t − p)² / (2·p·q·t²), an exact rational. All randomness is read from
    ``random_bytes`` (``secrets.token_bytes`` in production; seeded only in tests).
    """
    if count < 0:
        raise ValueError("count must not be negative")
    variance = variance_parameter(sigma)
    samples = np.zeros(count, dtype=np.int64)
    if variance == 0 or count == 0:
        return samples
    p, q = variance.numerator, variance.denominator
    t = math.isqrt(p // q) + 1  # ⌊√(p/q)⌋ = ⌊√⌊p/q⌋⌋
    qt, denominator = q * t, 2 * p * q * t * t
    source = _UniformSource(random_bytes)
    for index in range(count):
        while True:
            candidate = source.discrete_laplace(t)
            if source.bernoulli_exp((abs(candidate) * qt - p) ** 2, denominator):
                samples[index] = candidate
                break
    return samples


def _check_sigma(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value}")


def share_sigma(target_sigma: float, min_inputs: int) -> float:
    """σ_i = SHARE_MARGIN · target_sigma / √min_inputs, unchecked (see
    :func:`noise_share_sigma` for the checked form)."""
    return target_sigma * SHARE_MARGIN / math.sqrt(min_inputs)


def noise_share_sigma(*, target_sigma: float, expected_inputs: int, min_inputs: int) -> float:
    """σ_i for each agent: any ``min_inputs`` or more shares sum to variance ≥ target_sigma².

    σ_i = SHARE_MARGIN · target_sigma / √min_inputs, in the unit of ``target_sigma``.
    ``expected_inputs`` (the selected agents) must be at least ``min_inputs``; a round with
    all of them carries :func:`aggregate_noise_sigma` (σ_i, expected_inputs), i.e.
    √(expected_inputs / min_inputs) times the target: the price of tolerating dropout.
    """
    _check_sigma("target_sigma", target_sigma)
    if min_inputs < 1:
        raise ValueError("min_inputs must be at least 1")
    if expected_inputs < min_inputs:
        raise ValueError(f"expected_inputs {expected_inputs} is below min_inputs {min_inputs}")
    return share_sigma(target_sigma, min_inputs)


def aggregate_noise_sigma(*, share_sigma: float, inputs: int) -> float:
    """The std of the noise in a sum of ``inputs`` shares of std ``share_sigma``."""
    if inputs < 0:
        raise ValueError("inputs must not be negative")
    return share_sigma * math.sqrt(inputs)


def sum_of_shares_tau(*, share_sigma: float, inputs: int) -> float:
    """Kairouz–Liu–Steinke τ for the sum of ``inputs`` shares N_Z(0, share_sigma²).

    τ = 10 · Σ_{k=1}^{n−1} exp(−2π²σ_i² · k/(k+1)), in encoded units (Theorem 1 /
    Proposition 14 of the ICML 2021 paper): the Rényi-DP bound of the distributed discrete
    Gaussian exceeds the continuous one by at most τ·d at every order (d the dimension).
    """
    _check_sigma("share_sigma", share_sigma)
    return 10.0 * math.fsum(
        math.exp(-2.0 * math.pi**2 * share_sigma**2 * k / (k + 1)) for k in range(1, inputs)
    )


def noise_headroom(sigma_share: float, tail: float = 1e-9) -> int:
    """B with P(|X| > B) ≤ ``tail`` for X ~ N_Z(0, σ²), and for any σ-subgaussian X.

    N_Z(0, σ²) is σ-subgaussian (CKS 2020, Corollary 9), so P(|X| ≥ B) ≤ 2·exp(−B²/(2σ²));
    B = ⌈σ·√(2·ln(2/tail))⌉, at least 1. A sum of independent shares is subgaussian with
    σ² the sum of the shares' σ², so ``noise_headroom(σ_i·√n)`` bounds the summed noise.
    Uses the rounded-up variance parameter, so the bound covers what the sampler draws.
    """
    if not 0 < tail < 1:
        raise ValueError("tail must be in (0, 1)")
    variance = float(variance_parameter(sigma_share))
    if variance == 0:
        return 1
    bound = max(1, math.ceil(math.sqrt(2.0 * variance * math.log(2.0 / tail))))
    while 2.0 * math.exp(-(bound**2) / (2.0 * variance)) > tail:  # float rounding above
        bound += 1
    return bound
