"""Fixed-point encoding of weighted updates into unsigned words that add without wrapping.

``encode_update``: clip the update to L2 norm ``clip_norm``, scale it by ``w / weight_cap``
(``w`` = the agent's sample count, capped), multiply by ``scale``, round stochastically
(unbiased) with CSPRNG randomness, and wrap into Z_{2^b}. The capped weight follows as a few
base-B digits ("limbs"). ``scale`` and B are chosen so that the sum of ``max_inputs``
encoded inputs never wraps: every coordinate of an input is at most ``clip_norm`` in
magnitude, so it encodes to at most ``level`` = floor((2^(b-1) - 1) / max_inputs).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import msgspec
import numpy as np
import numpy.typing as npt

from fedgate_common.secagg.keystream import Words, random_unit_floats, word_dtype


class EncodingParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    word_bits: int
    clip_norm: float
    weight_cap: int
    max_inputs: int

    def check(self) -> None:
        word_dtype(self.word_bits)
        if not (self.clip_norm > 0 and np.isfinite(self.clip_norm)):
            raise ValueError("clip_norm must be a positive number")
        if self.weight_cap < 1:
            raise ValueError("weight_cap must be at least 1")
        if not 1 <= self.max_inputs <= (2 ** (self.word_bits - 1) - 1) // 2:
            raise ValueError(
                f"max_inputs {self.max_inputs} leaves no room in {self.word_bits} bits"
            )

    @property
    def level(self) -> int:
        """Largest magnitude one encoded coordinate can have."""
        return int((2 ** (self.word_bits - 1) - 1) // self.max_inputs)

    @property
    def scale(self) -> float:
        return self.level / self.clip_norm

    @property
    def limb_base(self) -> int:
        return int((2**self.word_bits - 1) // self.max_inputs + 1)

    @property
    def weight_limbs(self) -> int:
        limbs, capacity = 1, self.limb_base
        while capacity <= self.weight_cap:
            limbs, capacity = limbs + 1, capacity * self.limb_base
        return limbs

    def vector_length(self, dimension: int) -> int:
        return dimension + self.weight_limbs


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


def encode_update(
    update: npt.NDArray[np.floating],
    num_samples: int,
    params: EncodingParams,
    random_bytes: Callable[[int], bytes] = secrets.token_bytes,
) -> Words:
    """The words one agent contributes: encoded weighted update, then weight limbs."""
    if update.ndim != 1:
        raise ValueError("encode a flat update vector")
    values = np.array(update, dtype=np.float64)  # a private copy, scaled in place
    weight = min(max(num_samples, 0), params.weight_cap)
    # Clip, weight and scale in one pass over the vector.
    values *= clip_factor(values, params.clip_norm) * (weight / params.weight_cap) * params.scale
    # After clipping |x| <= level mathematically; float rounding of x + u in stochastic
    # rounding can still land on level + 1 for large levels, so the integers are clamped,
    # which keeps the no-wrap bound.
    integers = stochastic_round(values, random_bytes, overwrite=True)
    np.clip(integers, -params.level, params.level, out=integers)
    words = np.empty(params.vector_length(update.size), dtype=word_dtype(params.word_bits))
    np.copyto(words[: update.size], integers, casting="unsafe")  # wraps mod 2^b
    for index in range(params.weight_limbs):
        weight, words[update.size + index] = divmod(weight, params.limb_base)
    return words


class DecodedSum(msgspec.Struct, frozen=True, kw_only=True):
    weighted_sum: npt.NDArray[np.float64]  # sum of (w_i / weight_cap) * clipped update_i
    total_weight: int

    def mean_update(self, weight_cap: int) -> npt.NDArray[np.float64]:
        """The weighted mean of the clipped updates: Σ w_i u_i / Σ w_i."""
        if self.total_weight <= 0:
            raise ValueError("total weight is zero; there is no mean")
        return self.weighted_sum * (weight_cap / self.total_weight)


def decode_sum(words: Words, params: EncodingParams) -> DecodedSum:
    """Decode the (unmasked) sum of at most ``max_inputs`` encoded inputs."""
    dimension = words.size - params.weight_limbs
    if dimension < 0:
        raise ValueError("vector shorter than its weight limbs")
    modulus = 2**params.word_bits
    body = words[:dimension].astype(np.int64)
    body = np.where(body >= modulus // 2, body - modulus, body)
    total, place = 0, 1
    for digit in words[dimension:]:
        total += int(digit) * place
        place *= params.limb_base
    return DecodedSum(weighted_sum=body / params.scale, total_weight=total)
