"""Fixed-point encoding of weighted updates into unsigned words that add without wrapping.

``encode_update``: clip the update to L2 norm ``clip_norm``, scale it by ``w / weight_cap``
(``w`` = the agent's sample count, capped), multiply by ``scale``, round stochastically
(unbiased) with CSPRNG randomness, and wrap into Z_{2^b}. The capped weight follows as a few
base-B digits ("limbs"). ``scale`` and B are chosen so that the sum of ``max_inputs``
encoded inputs never wraps: every coordinate of an input is at most ``clip_norm`` in
magnitude, so it encodes to at most ``level`` = floor((2^(b-1) - 1) / max_inputs).

**Site-level DP** (``noise_multiplier`` > 0): after rounding, the agent adds its share of
discrete Gaussian noise (:mod:`.distributed_noise`) in the integer domain, before masking,
so the sum carries noise of std ≥ ``noise_multiplier · level`` whenever at least
``min_inputs`` inputs are summed. ``level`` then also leaves room for the noise of up to
``max_inputs`` shares: ``max_inputs · level + noise_headroom`` fits in 2^(b-1) - 1 except
with probability ``HEADROOM_TAIL`` per coordinate. Every input weighs ``weight_cap``: the
sample count is not sent, so it cannot leak outside the guarantee.

**Adaptive clipping** (``count_within_clip``): one more word, ``count_unit`` when the
update's norm was at most ``clip_norm`` before clipping, else 0, with its own noise share
under site-level DP (aggregate std ``count_noise · count_unit``).
"""

from __future__ import annotations

import functools
import math
import secrets
from collections.abc import Callable

import msgspec
import numpy as np
import numpy.typing as npt

from fedgate_common.secagg.distributed_noise import (
    SHARE_MARGIN,
    noise_headroom,
    sample_discrete_gaussian,
    share_sigma,
)
from fedgate_common.secagg.keystream import Words, random_unit_floats, word_dtype

HEADROOM_TAIL = 1e-12
MIN_CLIP_NORM = 1e-9  # a clip below it is refused (its scale could overflow a float)
"""Per-coordinate probability that the summed noise exceeds the room left for it."""


class EncodingParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    word_bits: int
    clip_norm: float
    weight_cap: int
    max_inputs: int
    noise_multiplier: float = 0.0  # site-level DP: aggregate noise std / clip_norm
    count_noise: float = 0.0  # site-level DP: aggregate noise std on the within-clip count
    min_inputs: int = 1  # the fewest inputs a round sums; noise shares are sized for it
    count_within_clip: bool = False

    def check(self) -> None:
        word_dtype(self.word_bits)
        if not (self.clip_norm >= MIN_CLIP_NORM and np.isfinite(self.clip_norm)):
            # Below it level / clip_norm can overflow: every coordinate would encode as ±inf
            # cast to an integer, whatever the update, and out of the sensitivity's bound.
            raise ValueError(f"clip_norm must be a number of at least {MIN_CLIP_NORM:g}")
        if self.weight_cap < 1:
            raise ValueError("weight_cap must be at least 1")
        if not 1 <= self.max_inputs <= (2 ** (self.word_bits - 1) - 1) // 2:
            raise ValueError(
                f"max_inputs {self.max_inputs} leaves no room in {self.word_bits} bits"
            )
        for name in ("noise_multiplier", "count_noise"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value <= 1e6):
                raise ValueError(f"{name} must be in [0, 1e6], got {value}")
        if not 1 <= self.min_inputs <= self.max_inputs:
            raise ValueError(f"min_inputs {self.min_inputs} outside 1..{self.max_inputs}")
        if self.level < 1:
            raise ValueError(
                f"noise multiplier {self.noise_multiplier} leaves no room in {self.word_bits} "
                "bits for the update; use 32-bit words"
            )
        if self.count_within_clip and self.count_unit < 1:
            raise ValueError(f"count noise {self.count_noise} leaves no room for the count")

    @property
    def noisy(self) -> bool:
        return self.noise_multiplier > 0

    @property
    def level(self) -> int:
        """Largest magnitude one encoded coordinate can have."""
        return _level(self.word_bits, self.max_inputs, self.noise_multiplier, self.min_inputs)

    @property
    def scale(self) -> float:
        return self.level / self.clip_norm

    @property
    def update_share_sigma(self) -> float:
        """Each agent's noise share on an update coordinate, in encoded units."""
        return share_sigma(self.noise_multiplier * self.level, self.min_inputs)

    @property
    def count_unit(self) -> int:
        """Encoded units of one input within the clip norm on the within-clip word: sized
        like ``level``, with the count noise's headroom, so the count's noise is many units
        wide (the distributed noise is then as good as Gaussian) and the sum cannot wrap."""
        return _level(self.word_bits, self.max_inputs, self.count_noise, self.min_inputs)

    @property
    def count_share_sigma(self) -> float:
        """Each agent's noise share on the within-clip word, in encoded units."""
        return share_sigma(self.count_noise * self.count_unit, self.min_inputs)

    @property
    def limb_base(self) -> int:
        return int((2**self.word_bits - 1) // self.max_inputs + 1)

    @property
    def weight_limbs(self) -> int:
        limbs, capacity = 1, self.limb_base
        while capacity <= self.weight_cap:
            limbs, capacity = limbs + 1, capacity * self.limb_base
        return limbs

    @property
    def count_words(self) -> int:
        return 1 if self.count_within_clip else 0

    def vector_length(self, dimension: int) -> int:
        return dimension + self.count_words + self.weight_limbs


@functools.lru_cache(maxsize=256)
def _level(word_bits: int, max_inputs: int, noise_multiplier: float, min_inputs: int) -> int:
    """The largest level L with max_inputs·L + headroom(noise of max_inputs shares) ≤ 2^(b-1)-1.

    Each share has std SHARE_MARGIN·z·L/√min_inputs, so the summed noise of max_inputs
    shares is (that · √max_inputs)-subgaussian; its headroom grows linearly in L.
    """
    room = 2 ** (word_bits - 1) - 1
    if noise_multiplier <= 0:
        return int(room // max_inputs)

    def needed(level: int) -> int:
        share = share_sigma(noise_multiplier * level, min_inputs)
        return max_inputs * level + noise_headroom(share * math.sqrt(max_inputs), HEADROOM_TAIL)

    per_level = max_inputs + SHARE_MARGIN * noise_multiplier * math.sqrt(
        max_inputs / min_inputs
    ) * math.sqrt(2 * math.log(2 / HEADROOM_TAIL))
    level = int(room // per_level) + 1
    while level > 0 and needed(level) > room:
        level -= 1
    return level


def l2_norm(values: npt.NDArray[np.float64]) -> float:
    """The L2 norm; refuses NaN/Inf and does not overflow for huge finite values."""
    norm = float(np.sqrt(np.dot(values, values)))
    if np.isfinite(norm):
        return norm
    if not np.isfinite(values).all():
        raise ValueError("update contains NaN or Inf")
    largest = float(np.max(np.abs(values)))  # finite values whose squares overflow
    scaled = values / largest
    return largest * float(np.sqrt(np.dot(scaled, scaled)))


def clip_factor(values: npt.NDArray[np.float64], clip_norm: float) -> float:
    """The factor that brings ``values`` to L2 norm at most ``clip_norm`` (1 if within)."""
    norm = l2_norm(values)
    return clip_norm / norm if norm > clip_norm else 1.0


def clip_to_norm(update: npt.NDArray[np.floating], clip_norm: float) -> npt.NDArray[np.float64]:
    values = np.array(update, dtype=np.float64)
    values *= clip_factor(values, clip_norm)
    return values


def stochastic_round(
    values: npt.NDArray[np.float64],
    random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    *,
    overwrite: bool = False,
) -> npt.NDArray[np.int64]:
    """Round each value down or up with probabilities that make the result unbiased.

    floor(x + u) with u uniform in [0, 1) is floor(x) + 1 with probability frac(x). u has 32
    random bits, so this is exact while |x| < 2**20; beyond, float64 rounding of x + u adds
    a bias below 2**-31 of one step.

    With ``overwrite`` the work happens in ``values`` itself (no copy of the vector; the
    caller's array then holds floor(x + u) as floats).
    """
    noisy = values if overwrite else values.copy()
    noisy += random_unit_floats(values.size, random_bytes)
    return np.floor(noisy, out=noisy).astype(np.int64)


NoiseSampler = Callable[[float, int, Callable[[int], bytes]], npt.NDArray[np.int64]]
"""(σ, count, random_bytes) → count integer noise draws; the product always uses the exact
discrete Gaussian sampler, benchmarks may pass a faster stand-in."""


def encode_update(
    update: npt.NDArray[np.floating],
    num_samples: int,
    params: EncodingParams,
    random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    *,
    noise_sampler: NoiseSampler = sample_discrete_gaussian,
) -> Words:
    """The words one agent contributes: encoded weighted update (noised under site-level
    DP), the within-clip word (adaptive clipping), then weight limbs."""
    if update.ndim != 1:
        raise ValueError("encode a flat update vector")
    values = np.array(update, dtype=np.float64)  # a private copy, scaled in place
    # Under site-level DP every input weighs weight_cap: the count is not sent.
    weight = params.weight_cap if params.noisy else min(max(num_samples, 0), params.weight_cap)
    factor = clip_factor(values, params.clip_norm)
    # Clip, weight and scale in one pass over the vector.
    values *= factor * (weight / params.weight_cap) * params.scale
    # After clipping |x| <= level mathematically; float rounding of x + u in stochastic
    # rounding can still land on level + 1 for large levels, so the integers are clamped,
    # which keeps the no-wrap bound.
    integers = stochastic_round(values, random_bytes, overwrite=True)
    np.clip(integers, -params.level, params.level, out=integers)
    if params.noisy:
        integers += noise_sampler(params.update_share_sigma, update.size, random_bytes)
    words = np.empty(params.vector_length(update.size), dtype=word_dtype(params.word_bits))
    np.copyto(words[: update.size], integers, casting="unsafe")  # wraps mod 2^b
    tail = update.size
    if params.count_within_clip:
        count = params.count_unit if factor == 1.0 else 0
        if params.count_noise:
            count += int(noise_sampler(params.count_share_sigma, 1, random_bytes)[0])
        words[tail] = count % 2**params.word_bits
        tail += 1
    for index in range(params.weight_limbs):
        weight, words[tail + index] = divmod(weight, params.limb_base)
    return words


def _signed(words: Words, modulus: int) -> npt.NDArray[np.int64]:
    values = words.astype(np.int64)
    return np.where(values >= modulus // 2, values - modulus, values)


class DecodedSum(msgspec.Struct, frozen=True, kw_only=True):
    weighted_sum: npt.NDArray[np.float64]  # sum of (w_i / weight_cap) * clipped update_i
    total_weight: int
    within_clip: float | None = None  # inputs within clip_norm (+ noise under site-level DP)

    def mean_update(self, weight_cap: int) -> npt.NDArray[np.float64]:
        """The weighted mean of the clipped updates: Σ w_i u_i / Σ w_i."""
        if self.total_weight <= 0:
            raise ValueError("total weight is zero; there is no mean")
        return self.weighted_sum * (weight_cap / self.total_weight)


def decode_sum(words: Words, params: EncodingParams) -> DecodedSum:
    """Decode the (unmasked) sum of at most ``max_inputs`` encoded inputs."""
    dimension = words.size - params.weight_limbs - params.count_words
    if dimension < 0:
        raise ValueError("vector shorter than its weight limbs")
    modulus = 2**params.word_bits
    body = _signed(words[:dimension], modulus)
    within = None
    if params.count_words:
        count = int(_signed(words[dimension : dimension + 1], modulus)[0])
        within = count / params.count_unit
    total, place = 0, 1
    for digit in words[dimension + params.count_words :]:
        total += int(digit) * place
        place *= params.limb_base
    return DecodedSum(weighted_sum=body / params.scale, total_weight=total, within_clip=within)
