"""Mask expansion: AES-256-CTR keystream read as little-endian unsigned words.

Each key is used for exactly one stream (keys are derived per round and pair), so the
counter block starts at zero. This is a real stream cipher, not a seeded statistical PRNG.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

WORD_DTYPES: dict[int, np.dtype[np.unsignedinteger]] = {16: np.dtype("<u2"), 32: np.dtype("<u4")}
_ZERO_COUNTER = bytes(16)
_BLOCK = 16  # update_into needs room for one block beyond the data

Words = npt.NDArray[np.unsignedinteger]


def word_dtype(word_bits: int) -> np.dtype[np.unsignedinteger]:
    try:
        return WORD_DTYPES[word_bits]
    except KeyError:
        raise ValueError(f"word size must be 16 or 32 bits, got {word_bits}") from None


def _encryptor(key: bytes) -> CipherContext:
    if len(key) != 32:
        raise ValueError("keystream keys are 32 bytes")
    return Cipher(algorithms.AES(key), modes.CTR(_ZERO_COUNTER)).encryptor()


def keystream(key: bytes, length: int) -> bytes:
    """``length`` bytes of AES-256-CTR keystream under ``key`` (32 bytes)."""
    out = bytearray(length + _BLOCK - 1)
    _encryptor(key).update_into(bytes(length), out)
    return bytes(out[:length])


def expand_mask(key: bytes, count: int, word_bits: int) -> Words:
    """``count`` pseudo-random words of ``word_bits`` bits (a fresh array)."""
    dtype = word_dtype(word_bits)
    length = count * dtype.itemsize
    out = bytearray(length + _BLOCK - 1)
    _encryptor(key).update_into(bytes(length), out)
    return np.frombuffer(out, dtype=dtype, count=count)


class MaskExpander:
    """Adds and subtracts masks of one length in place, reusing its buffers.

    Encrypting a zero buffer into a preallocated output (``update_into``) runs at the
    cipher's speed; allocating a new keystream per mask costs several times more.
    """

    def __init__(self, count: int, word_bits: int) -> None:
        self.count = count
        self.dtype = word_dtype(word_bits)
        length = count * self.dtype.itemsize
        self._zeros = bytes(length)
        self._out = bytearray(length + _BLOCK - 1)
        self._view = np.frombuffer(self._out, dtype=self.dtype, count=count)

    def _expand(self, key: bytes) -> Words:
        _encryptor(key).update_into(self._zeros, self._out)
        return self._view

    def add(self, words: Words, key: bytes) -> None:
        np.add(words, self._expand(key), out=words)

    def subtract(self, words: Words, key: bytes) -> None:
        np.subtract(words, self._expand(key), out=words)


def random_unit_floats(
    count: int, random_bytes: Callable[[int], bytes] = secrets.token_bytes
) -> npt.NDArray[np.float64]:
    """``count`` uniform floats in [0, 1): AES-CTR keyed by 32 bytes from ``random_bytes``."""
    floats = expand_mask(random_bytes(32), count, 32).astype(np.float64)
    floats *= 1.0 / 2**32
    return floats
