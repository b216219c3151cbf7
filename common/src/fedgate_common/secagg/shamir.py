"""Shamir threshold sharing of 32-byte secrets over GF(p), p = 2**521 - 1 (a Mersenne prime).

Any ``threshold`` shares reconstruct the secret; fewer are consistent with every secret.
Coefficients come from the caller's CSPRNG (``secrets.token_bytes`` by default) and are
drawn by rejection sampling, so they are uniform in the field.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence

import msgspec

from fedgate_common.errors import MalformedMessage

PRIME = 2**521 - 1
SECRET_BYTES = 32
SHARE_BYTES = 66  # ceil(521 / 8)

RandomBytes = Callable[[int], bytes]


class Share(msgspec.Struct, frozen=True, array_like=True):
    """The point ``(x, y)`` of the sharing polynomial; ``x`` is never 0."""

    x: int
    y: bytes


def _random_field_element(random_bytes: RandomBytes) -> int:
    while True:
        value = int.from_bytes(random_bytes(SHARE_BYTES), "big") & ((1 << 521) - 1)
        if value < PRIME:
            return value


def split_secret(
    secret: bytes,
    *,
    threshold: int,
    xs: Sequence[int],
    random_bytes: RandomBytes = secrets.token_bytes,
) -> list[Share]:
    """Split ``secret`` into one share per ``x`` in ``xs``; any ``threshold`` reconstruct it."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secret must have {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} impossible with {len(xs)} shares")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share x-coordinates must be distinct and non-zero")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [_random_field_element(random_bytes) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        y = 0
        for coefficient in reversed(coefficients):  # Horner
            y = (y * x + coefficient) % PRIME
        shares.append(Share(x=x, y=y.to_bytes(SHARE_BYTES, "big")))
    return shares


def reconstruct_secret(shares: Sequence[Share], *, threshold: int) -> bytes:
    """Lagrange-interpolate the secret from the first ``threshold`` shares.

    Raises :class:`MalformedMessage` for too few or duplicate shares, or a share whose
    value is outside the field, or when the result is not a 32-byte secret (a sign of
    corrupted shares).
    """
    if threshold < 1:
        raise MalformedMessage(f"threshold {threshold} is below 1")
    points = list(shares)[:threshold]
    if len(points) < threshold:
        raise MalformedMessage(f"{len(points)} shares, {threshold} needed")
    xs = [share.x for share in points]
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise MalformedMessage("shares must have distinct, non-zero x-coordinates")
    ys = []
    for share in points:
        if len(share.y) != SHARE_BYTES:
            raise MalformedMessage(f"share value has {len(share.y)} bytes, not {SHARE_BYTES}")
        y = int.from_bytes(share.y, "big")
        if y >= PRIME:
            raise MalformedMessage("share value outside the field")
        ys.append(y)
    secret = 0
    for i, (x_i, y_i) in enumerate(zip(xs, ys, strict=True)):
        numerator, denominator = 1, 1
        for j, x_j in enumerate(xs):
            if j != i:
                numerator = numerator * x_j % PRIME
                denominator = denominator * (x_j - x_i) % PRIME
        secret = (secret + y_i * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise MalformedMessage("shares do not reconstruct a 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")
