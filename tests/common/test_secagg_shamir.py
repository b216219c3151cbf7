"""Shamir sharing: every t-subset reconstructs, t−1 shares say nothing, bad input is refused."""

from __future__ import annotations

import random
from collections.abc import Sequence
from itertools import combinations

import pytest
from fedgate_common.errors import MalformedMessage
from fedgate_common.secagg.shamir import (
    PRIME,
    SECRET_BYTES,
    SHARE_BYTES,
    Share,
    reconstruct_secret,
    split_secret,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st

SECRETS = st.binary(min_size=SECRET_BYTES, max_size=SECRET_BYTES)
SEEDS = st.integers(min_value=0, max_value=2**64)


@st.composite
def sharings(draw: st.DrawFn, min_threshold: int = 1) -> tuple[bytes, int, list[int], int]:
    """(secret, threshold, distinct non-zero xs, seed for the coefficients)."""
    n = draw(st.integers(min_value=max(min_threshold, 1), max_value=7))
    threshold = draw(st.integers(min_value=min_threshold, max_value=n))
    small = st.integers(min_value=1, max_value=64)
    anywhere = st.integers(min_value=1, max_value=PRIME - 1)
    xs = draw(st.lists(st.one_of(small, anywhere), min_size=n, max_size=n, unique=True))
    return draw(SECRETS), threshold, xs, draw(SEEDS)


def _poly_mul_linear(poly: list[int], root: int) -> list[int]:
    """poly(x) · (x − root), coefficients lowest degree first, mod PRIME."""
    out = [0] * (len(poly) + 1)
    for i, c in enumerate(poly):
        out[i] = (out[i] - c * root) % PRIME
        out[i + 1] = (out[i + 1] + c) % PRIME
    return out


def interpolate(points: Sequence[tuple[int, int]]) -> list[int]:
    """Coefficients (lowest first) of the unique polynomial of degree < len(points)."""
    result = [0] * len(points)
    for i, (x_i, y_i) in enumerate(points):
        basis, denominator = [1], 1
        for j, (x_j, _) in enumerate(points):
            if j != i:
                basis = _poly_mul_linear(basis, x_j)
                denominator = denominator * (x_i - x_j) % PRIME
        factor = y_i * pow(denominator, -1, PRIME) % PRIME
        for k, c in enumerate(basis):
            result[k] = (result[k] + c * factor) % PRIME
    return result


def evaluate(coefficients: Sequence[int], x: int) -> int:
    y = 0
    for c in reversed(coefficients):
        y = (y * x + c) % PRIME
    return y


def _value(share: Share) -> int:
    return int.from_bytes(share.y, "big")


@settings(max_examples=60, deadline=None)
@given(sharings())
def test_every_threshold_subset_reconstructs(case: tuple[bytes, int, list[int], int]) -> None:
    secret, threshold, xs, seed = case
    shares = split_secret(
        secret, threshold=threshold, xs=xs, random_bytes=random.Random(seed).randbytes
    )
    assert [s.x for s in shares] == xs
    assert all(len(s.y) == SHARE_BYTES and _value(s) < PRIME for s in shares)
    for size in range(threshold, len(shares) + 1):
        for subset in combinations(shares, size):
            assert reconstruct_secret(subset, threshold=threshold) == secret
            assert reconstruct_secret(subset[::-1], threshold=threshold) == secret


@settings(max_examples=60, deadline=None)
@given(sharings(min_threshold=2), SECRETS)
@example((bytes(32), 2, [1, PRIME - 1], 0), bytes(32))  # x = PRIME - 1 taken: no room above
def test_fewer_than_threshold_shares_fit_every_secret(
    case: tuple[bytes, int, list[int], int], other: bytes
) -> None:
    """t−1 shares plus any candidate secret lie on one polynomial of degree ≤ t−1.

    So t−1 shares are consistent with ``other`` exactly as with the real secret: there is
    a valid sharing of ``other`` that agrees with them, and the library itself, given those
    t−1 real shares and one point of that polynomial, returns ``other``.
    """
    secret, threshold, xs, seed = case
    shares = split_secret(
        secret, threshold=threshold, xs=xs, random_bytes=random.Random(seed).randbytes
    )
    known = shares[: threshold - 1]
    points = [(0, int.from_bytes(other, "big"))] + [(s.x, _value(s)) for s in known]
    forged = interpolate(points)
    assert len(forged) == threshold  # degree ≤ t − 1: a legitimate sharing polynomial
    assert evaluate(forged, 0) == int.from_bytes(other, "big")
    for share in known:
        assert evaluate(forged, share.x) == _value(share)
    fresh_x = next(x for x in range(1, len(xs) + 2) if x not in xs)  # 0 < x < PRIME, unused
    extra = Share(x=fresh_x, y=evaluate(forged, fresh_x).to_bytes(SHARE_BYTES, "big"))
    assert reconstruct_secret([*known, extra], threshold=threshold) == other


@settings(max_examples=60, deadline=None)
@given(sharings(min_threshold=1), st.integers(min_value=1, max_value=PRIME - 1), st.data())
def test_one_wrong_share_never_gives_the_secret(
    case: tuple[bytes, int, list[int], int], delta: int, data: st.DataObject
) -> None:
    """t−1 true shares plus one altered point: the result moves by δ·L(0) ≠ 0."""
    secret, threshold, xs, seed = case
    shares = split_secret(
        secret, threshold=threshold, xs=xs, random_bytes=random.Random(seed).randbytes
    )
    subset = data.draw(st.permutations(shares))[:threshold]
    wrong = data.draw(st.integers(min_value=0, max_value=threshold - 1))
    altered = Share(
        x=subset[wrong].x, y=((_value(subset[wrong]) + delta) % PRIME).to_bytes(SHARE_BYTES, "big")
    )
    tampered = [*subset[:wrong], altered, *subset[wrong + 1 :]]
    try:
        result = reconstruct_secret(tampered, threshold=threshold)
    except MalformedMessage:
        return  # the result did not even fit in 32 bytes: refused, also not the secret
    assert result != secret


def test_one_share_of_threshold_one_is_the_secret() -> None:
    secret = bytes(range(32))
    shares = split_secret(secret, threshold=1, xs=[5, 9])
    assert all(_value(s) == int.from_bytes(secret, "big") for s in shares)


def test_coefficients_come_from_the_given_randomness() -> None:
    secret = bytes(32)
    first = split_secret(secret, threshold=3, xs=[1, 2, 3], random_bytes=random.Random(1).randbytes)
    again = split_secret(secret, threshold=3, xs=[1, 2, 3], random_bytes=random.Random(1).randbytes)
    other = split_secret(secret, threshold=3, xs=[1, 2, 3], random_bytes=random.Random(2).randbytes)
    assert first == again
    assert first != other


def test_field_elements_are_drawn_by_rejection() -> None:
    """A draw ≥ PRIME (all ones in 521 bits) is rejected, never reduced (which would bias)."""
    draws = [b"\xff" * SHARE_BYTES, (7).to_bytes(SHARE_BYTES, "big")]

    def scripted(count: int) -> bytes:
        assert count == SHARE_BYTES
        return draws.pop(0)

    secret = bytes(31) + b"\x01"
    shares = split_secret(secret, threshold=2, xs=[1, 2], random_bytes=scripted)
    assert not draws
    assert [_value(s) for s in shares] == [1 + 7, 1 + 14]  # f(x) = 1 + 7x


@pytest.mark.parametrize(
    ("secret", "threshold", "xs"),
    [
        (bytes(31), 1, [1]),
        (bytes(33), 1, [1]),
        (bytes(32), 0, [1, 2]),
        (bytes(32), 3, [1, 2]),
        (bytes(32), 2, [1, 1]),
        (bytes(32), 1, [0]),
        (bytes(32), 1, [PRIME]),
        (bytes(32), 1, [-1]),
    ],
)
def test_split_refuses_impossible_requests(secret: bytes, threshold: int, xs: list[int]) -> None:
    with pytest.raises(ValueError, match=r"secret|threshold|x-coordinates"):
        split_secret(secret, threshold=threshold, xs=xs)


GOOD = split_secret(bytes(range(32)), threshold=3, xs=[1, 2, 3, 4])


@pytest.mark.parametrize(
    "shares",
    [
        GOOD[:2],
        [GOOD[0], GOOD[0], GOOD[1]],
        [Share(x=0, y=GOOD[0].y), GOOD[1], GOOD[2]],
        [Share(x=PRIME + 1, y=GOOD[0].y), GOOD[1], GOOD[2]],
        [Share(x=1, y=GOOD[0].y[1:]), GOOD[1], GOOD[2]],
        [Share(x=1, y=GOOD[0].y + b"\x00"), GOOD[1], GOOD[2]],
        [Share(x=1, y=PRIME.to_bytes(SHARE_BYTES, "big")), GOOD[1], GOOD[2]],
        [Share(x=1, y=b"\xff" * SHARE_BYTES), GOOD[1], GOOD[2]],
    ],
    ids=[
        "too-few",
        "duplicate-x",
        "zero-x",
        "x-outside-field",
        "short-y",
        "long-y",
        "y-equals-prime",
        "y-above-prime",
    ],
)
def test_reconstruct_refuses_bad_shares(shares: list[Share]) -> None:
    with pytest.raises(MalformedMessage):
        reconstruct_secret(shares, threshold=3)


def test_reconstruct_uses_the_first_threshold_shares() -> None:
    secret = bytes(range(32))
    shares = split_secret(secret, threshold=2, xs=[1, 2, 3])
    junk = Share(x=3, y=(1).to_bytes(SHARE_BYTES, "big"))
    assert reconstruct_secret([*shares[:2], junk], threshold=2) == secret


# Regression: with threshold=0 reconstruction would interpolate over no points and return
# the all-zero secret; with threshold=-1 it would use all shares but the last (list[:-1]).
@pytest.mark.parametrize("threshold", [0, -1])
def test_reconstruct_refuses_thresholds_below_one(threshold: int) -> None:
    with pytest.raises((ValueError, MalformedMessage)):
        reconstruct_secret(GOOD, threshold=threshold)


def test_one_corrupted_share_does_not_block_reconstruction_when_more_than_t_arrive() -> None:
    """The coordinator checks each rebuilt secret against its commitment and tries other
    t-subsets, so one lying holder cannot abort a round on its own."""
    from fedgate_common.secagg.aggregator import _reconstruct_checked
    from fedgate_common.secagg.context import sha256

    secret = bytes(range(32))
    shares = split_secret(secret, threshold=3, xs=[1, 2, 3, 4, 5])
    for bad in range(5):
        corrupted = list(shares)
        corrupted[bad] = Share(x=shares[bad].x, y=(1).to_bytes(66, "big"))
        found = _reconstruct_checked(corrupted, 3, lambda s: sha256(s) == sha256(secret))
        assert found == secret
    only_t = [Share(x=1, y=(1).to_bytes(66, "big")), *shares[1:3]]
    assert _reconstruct_checked(only_t, 3, lambda s: sha256(s) == sha256(secret)) is None
