"""Mask expansion: AES-256-CTR keystream read as little-endian unsigned words.

Each key is used for exactly one stream (keys are derived per round and pair), so the
counter block starts at zero. This is a real stream cipher, not a seeded statistical PRNG.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

WORD_DTYPES: dict[int, np.dtype[np.unsignedinteger]] = {16: np.dtype("<u2"), 32: np.dtype("<u4")}
_ZERO_COUNTER = bytes(16)

Words = npt.NDArray[np.unsignedinteger]


def word_dtype(word_bits: int) -> np.dtype[np.unsignedinteger]:
    try:
        return WORD_DTYPES[word_bits]
    except KeyError:
        raise ValueError(f"word size must be 16 or 32 bits, got {word_bits}") from None


def keystream(key: bytes, length: int) -> bytes:
    """``length`` bytes of AES-256-CTR keystream under ``key`` (32 bytes)."""
    if len(key) != 32:
        raise ValueError("keystream keys are 32 bytes")
    encryptor = Cipher(algorithms.AES(key), modes.CTR(_ZERO_COUNTER)).encryptor()
    return encryptor.update(bytes(length))


def expand_mask(key: bytes, count: int, word_bits: int) -> Words:
    """``count`` pseudo-random words of ``word_bits`` bits (read-only view, no copy)."""
    dtype = word_dtype(word_bits)
    return np.frombuffer(keystream(key, count * dtype.itemsize), dtype=dtype)


def random_unit_floats(
    count: int, random_bytes: Callable[[int], bytes] = secrets.token_bytes
) -> npt.NDArray[np.float64]:
    """``count`` uniform floats in [0, 1): AES-CTR keyed by 32 bytes from ``random_bytes``."""
    words = expand_mask(random_bytes(32), count, 32)
    return words.astype(np.float64) * (1.0 / 2**32)
