"""Mask expansion (AES-256-CTR known answers) and pairwise masks that cancel in the sum."""

from __future__ import annotations

import random
from itertools import combinations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from fedgate_common.secagg.context import RoundContext
from fedgate_common.secagg.keystream import (
    expand_mask,
    keystream,
    random_unit_floats,
    word_dtype,
)
from fedgate_common.secagg.mask_keys import pairwise_mask_key, pairwise_sign, self_mask_key
from fedgate_common.secagg.participant import public_bytes
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

WORD_BITS = (16, 32)
CONTEXT = RoundContext(deployment="plant-1", cloud="line-a", round=3, roster_digest=b"d" * 32)
# AES-256 encryption of the all-zero block under the all-zero key (FIPS-197 style KAT; this
# is also the first keystream block of CTR mode with a zero counter block).
ZERO_KEY_FIRST_BLOCK = bytes.fromhex("dc95c078a2408989ad48a21492842087")

IDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)


def aes_ctr_by_blocks(key: bytes, length: int) -> bytes:
    """CTR written out by hand: E_k(0), E_k(1), … with a 128-bit big-endian counter (ECB)."""
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    blocks = -(-length // 16)
    counters = b"".join(i.to_bytes(16, "big") for i in range(blocks))
    return (encryptor.update(counters) + encryptor.finalize())[:length]


def test_zero_key_known_answer() -> None:
    assert keystream(bytes(32), 16) == ZERO_KEY_FIRST_BLOCK
    words16 = expand_mask(bytes(32), 8, 16)
    words32 = expand_mask(bytes(32), 4, 32)
    assert words16.dtype == np.dtype("<u2")
    assert words32.dtype == np.dtype("<u4")
    assert int(words16[0]) == 0x95DC  # little-endian words of dc 95 c0 78 …
    assert int(words32[0]) == 0x78C095DC
    assert int(words32[3]) == 0x87208492
    assert words16.tobytes() == words32.tobytes() == ZERO_KEY_FIRST_BLOCK


@settings(max_examples=40, deadline=None)
@given(
    st.binary(min_size=32, max_size=32),
    st.integers(min_value=0, max_value=5000),
    st.sampled_from(WORD_BITS),
)
def test_expand_mask_is_aes_256_ctr_from_counter_zero(key: bytes, count: int, bits: int) -> None:
    words = expand_mask(key, count, bits)
    width = bits // 8
    expected = aes_ctr_by_blocks(key, count * width)
    assert words.shape == (count,)
    assert words.tobytes() == expected
    for i in (0, count // 2, count - 1) if count else ():
        assert int(words[i]) == int.from_bytes(expected[i * width : (i + 1) * width], "little")


def test_counter_carries_across_bytes() -> None:
    """Past block 256 the counter's second-lowest byte changes: still plain CTR."""
    key = bytes(range(32))
    length = 16 * 300
    assert keystream(key, length) == aes_ctr_by_blocks(key, length)


def test_prefixes_agree_and_keys_differ() -> None:
    key = bytes(range(32))
    long = expand_mask(key, 100, 32)
    np.testing.assert_array_equal(expand_mask(key, 10, 32), long[:10])
    other = bytes([1]) + key[1:]
    assert not np.array_equal(expand_mask(other, 100, 32), long)


@pytest.mark.parametrize("bits", [0, 8, 24, 64])
def test_word_sizes_other_than_16_and_32_are_refused(bits: int) -> None:
    with pytest.raises(ValueError, match="16 or 32"):
        word_dtype(bits)
    with pytest.raises(ValueError, match="16 or 32"):
        expand_mask(bytes(32), 4, bits)


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_keystream_keys_are_256_bit(length: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        keystream(bytes(length), 16)


def test_random_unit_floats_use_the_given_randomness() -> None:
    values = random_unit_floats(1000, random.Random(3).randbytes)
    again = random_unit_floats(1000, random.Random(3).randbytes)
    np.testing.assert_array_equal(values, again)
    assert values.min() >= 0.0
    assert values.max() < 1.0
    assert 0.4 < float(values.mean()) < 0.6


def _x25519(rng: random.Random) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(rng.randbytes(32))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(IDS, min_size=2, max_size=6, unique=True),
    st.integers(min_value=0, max_value=2**32),
    st.integers(min_value=1, max_value=300),
    st.sampled_from(WORD_BITS),
)
def test_pairwise_masks_cancel(ids: list[str], seed: int, count: int, bits: int) -> None:
    """Σ_i Σ_{j≠i} sign(i, j) · PRG(k_ij) ≡ 0 (mod 2^b): each pair adds once, subtracts once."""
    rng = random.Random(seed)
    keys = {agent: _x25519(rng) for agent in ids}
    total = np.zeros(count, dtype=word_dtype(bits))
    for own in ids:
        for peer in ids:
            if peer == own:
                continue
            key = pairwise_mask_key(keys[own], public_bytes(keys[peer]), CONTEXT, own, peer)
            if pairwise_sign(own, peer) > 0:
                total += expand_mask(key, count, bits)
            else:
                total -= expand_mask(key, count, bits)
    assert not total.any()
    for a, b in combinations(ids, 2):
        assert pairwise_sign(a, b) == -pairwise_sign(b, a)
        key_ab = pairwise_mask_key(keys[a], public_bytes(keys[b]), CONTEXT, a, b)
        assert key_ab == pairwise_mask_key(keys[b], public_bytes(keys[a]), CONTEXT, b, a)
        assert expand_mask(key_ab, count, bits).any() or count < 4  # a real, non-zero mask


def test_pairwise_keys_are_bound_to_round_and_pair() -> None:
    rng = random.Random(9)
    a, b = _x25519(rng), _x25519(rng)
    base = pairwise_mask_key(a, public_bytes(b), CONTEXT, "agent-a", "agent-b")
    variants = [
        pairwise_mask_key(a, public_bytes(b), CONTEXT, "agent-a", "agent-c"),
        pairwise_mask_key(a, public_bytes(b), CONTEXT, "agent-x", "agent-b"),
        pairwise_mask_key(a, public_bytes(b), replace(CONTEXT, round=4), "agent-a", "agent-b"),
        pairwise_mask_key(
            a, public_bytes(b), replace(CONTEXT, roster_digest=b"e" * 32), "agent-a", "agent-b"
        ),
        pairwise_mask_key(
            a, public_bytes(b), replace(CONTEXT, cloud="line-b"), "agent-a", "agent-b"
        ),
    ]
    assert len({base, *variants}) == 1 + len(variants)
    assert len(base) == 32


def test_self_mask_keys_are_bound_to_owner_and_round() -> None:
    seed = bytes(range(32))
    base = self_mask_key(seed, CONTEXT, "agent-a")
    assert len(base) == 32
    assert base == self_mask_key(seed, CONTEXT, "agent-a")
    assert base != self_mask_key(seed, CONTEXT, "agent-b")
    assert base != self_mask_key(seed, replace(CONTEXT, round=4), "agent-a")
    assert base != self_mask_key(seed, replace(CONTEXT, deployment="plant-2"), "agent-a")
    assert base != seed
