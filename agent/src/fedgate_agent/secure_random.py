"""Random numbers for DP-SGD from a CSPRNG: the ChaCha20 keystream.

torch's generators are not cryptographically secure, and Opacus's CSPRNG mode needs
``torchcsprng``, which does not exist for torch 2.13 (decision 0043). A
:class:`ChaCha20Stream` reads ChaCha20's keystream (pyca/cryptography, hence OpenSSL)
under a 256-bit key from the OS and turns it into what DP-SGD draws:

- uniform floats in the open interval (0, 1): the top 53 bits ``k`` of each
  little-endian 64-bit word give ``k · 2⁻⁵³``, and ``k = 0`` is drawn again, so the
  values are uniform on ``{1, …, 2⁵³ − 1} · 2⁻⁵³``, a grid symmetric about ½;
- Bernoulli masks (``uniform < rate``), for Poisson subsampling;
- standard normals, the inverse normal CDF (``torch.special.ndtri``, float64) of those
  uniforms: N(0, 1) cut off at ±8.21, beyond which lies 2⁻⁵³ of its mass on each side.

Every draw takes one slice of the keystream; no two draws share bytes. Nothing here does
IO apart from asking the OS for the key (``secrets``); tests may pass a key instead.
"""

from __future__ import annotations

import math
import secrets

import numpy as np
import numpy.typing as npt
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms

__all__ = ["KEY_BYTES", "ChaCha20Stream"]

KEY_BYTES = 32
_BLOCK_BYTES = 64
_WORD_BYTES = 8
_MANTISSA_BITS = 53


class ChaCha20Stream:
    """Uniforms, Bernoulli masks and standard normals from ChaCha20's keystream.

    Without ``key`` the key is 32 fresh bytes from :func:`secrets.token_bytes`, which is
    what every use outside tests wants. A given key must never serve two streams that
    both matter: the same key gives the same numbers.
    """

    # The block counter is 32 bits (RFC 7539); a stream moves to the next nonce before
    # the counter could wrap, so no (key, nonce, counter) is ever used twice.
    bytes_per_nonce = _BLOCK_BYTES << 32

    def __init__(self, key: bytes | None = None) -> None:
        if key is None:
            key = secrets.token_bytes(KEY_BYTES)
        if len(key) != KEY_BYTES:
            raise ValueError(f"a ChaCha20 key has {KEY_BYTES} bytes, not {len(key)}")
        self._key = key
        self._nonce = 0
        self._used = 0
        self._encryptor = self._keystream_for(0)

    def _keystream_for(self, nonce: int) -> CipherContext:
        # cryptography's 16-byte ChaCha20 "nonce" is the 4-byte little-endian block
        # counter followed by the 12-byte nonce.
        counter_and_nonce = bytes(4) + nonce.to_bytes(12, "little")
        cipher = Cipher(algorithms.ChaCha20(self._key, counter_and_nonce), mode=None)
        return cipher.encryptor()

    def keystream(self, size: int) -> bytes:
        """The next ``size`` bytes of keystream."""
        if not 0 <= size <= self.bytes_per_nonce:
            raise ValueError(f"cannot draw {size} keystream bytes at once")
        if self._used + size > self.bytes_per_nonce:
            self._nonce += 1
            self._used = 0
            self._encryptor = self._keystream_for(self._nonce)
        self._used += size
        return self._encryptor.update(bytes(size))

    def _unit_floats(self, n: int) -> npt.NDArray[np.float64]:
        """``k · 2⁻⁵³`` for 53-bit ``k`` from ``n`` fresh words: uniform on [0, 1)."""
        words = np.frombuffer(self.keystream(n * _WORD_BYTES), dtype="<u8")
        top = words >> np.uint64(64 - _MANTISSA_BITS)
        return top.astype(np.float64) * 2.0**-_MANTISSA_BITS

    def uniform(self, n: int) -> npt.NDArray[np.float64]:
        """``n`` floats uniform on ``{1, …, 2⁵³ − 1} · 2⁻⁵³``, inside the open interval (0, 1)."""
        values = self._unit_floats(n)
        zeros = np.flatnonzero(values == 0.0)
        while zeros.size:  # chance 2⁻⁵³ each; redrawn, not nudged, so the grid stays uniform
            values[zeros] = self._unit_floats(zeros.size)
            zeros = zeros[values[zeros] == 0.0]
        return values

    def bernoulli_mask(self, n: int, rate: float) -> npt.NDArray[np.bool_]:
        """``n`` independent draws that are ``True`` with probability ``rate``."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"a probability lies in [0, 1], not {rate}")
        mask: npt.NDArray[np.bool_] = self.uniform(n) < rate
        return mask

    def standard_normal(
        self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """A tensor of ``shape`` of independent N(0, 1) draws, computed in float64."""
        normals: torch.Tensor = torch.special.ndtri(
            torch.from_numpy(self.uniform(math.prod(shape)))
        )
        return normals.reshape(shape).to(dtype)
