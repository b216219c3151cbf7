"""Sealed shares: round trip, and any change to bytes or binding is ShareRejected."""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from fedgate_common.errors import MalformedMessage, ShareRejected
from fedgate_common.secagg.context import RoundContext
from fedgate_common.secagg.participant import public_bytes
from fedgate_common.secagg.share_box import NONCE_BYTES, open_share, seal_share
from hypothesis import given, settings
from hypothesis import strategies as st

CONTEXT = RoundContext(deployment="plant-1", cloud="line-a", round=7, roster_digest=b"r" * 32)
SENDER, RECEIVER = "agent-01", "agent-02"

# (where the tampering happens, the changed keyword arguments of open_share)
BINDING_CHANGES: list[tuple[str, dict[str, Any]]] = [
    ("sender", {"sender": "agent-03"}),
    ("receiver", {"receiver": "agent-03"}),
    ("swapped", {"sender": RECEIVER, "receiver": SENDER}),
    ("round", {"context": msgspec.structs.replace(CONTEXT, round=8)}),
    ("roster", {"context": msgspec.structs.replace(CONTEXT, roster_digest=b"s" * 32)}),
    ("deployment", {"context": msgspec.structs.replace(CONTEXT, deployment="plant-2")}),
    ("cloud", {"context": msgspec.structs.replace(CONTEXT, cloud="line-b")}),
]


def _keys(seed: int) -> tuple[X25519PrivateKey, X25519PrivateKey]:
    rng = random.Random(seed)
    return (
        X25519PrivateKey.from_private_bytes(rng.randbytes(32)),
        X25519PrivateKey.from_private_bytes(rng.randbytes(32)),
    )


def _seal(plaintext: bytes, sender: X25519PrivateKey, receiver: X25519PrivateKey) -> bytes:
    return seal_share(
        plaintext,
        private=sender,
        peer_public=public_bytes(receiver),
        context=CONTEXT,
        sender=SENDER,
        receiver=RECEIVER,
    )


def _open(
    sealed: bytes, sender_key: X25519PrivateKey, receiver_key: X25519PrivateKey, **changes: Any
) -> bytes:
    arguments: dict[str, Any] = {
        "private": receiver_key,
        "peer_public": public_bytes(sender_key),
        "context": CONTEXT,
        "sender": SENDER,
        "receiver": RECEIVER,
    }
    arguments.update(changes)
    return open_share(sealed, **arguments)


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=2**32))
def test_round_trip(plaintext: bytes, seed: int) -> None:
    sender, receiver = _keys(seed)
    sealed = _seal(plaintext, sender, receiver)
    assert len(sealed) == NONCE_BYTES + len(plaintext) + 16
    assert _open(sealed, sender, receiver) == plaintext


@settings(max_examples=60, deadline=None)
@given(
    st.binary(min_size=1, max_size=200),
    st.integers(min_value=0, max_value=2**32),
    st.data(),
)
def test_flipping_any_bit_is_rejected(plaintext: bytes, seed: int, data: st.DataObject) -> None:
    sender, receiver = _keys(seed)
    sealed = bytearray(_seal(plaintext, sender, receiver))
    index = data.draw(st.integers(min_value=0, max_value=len(sealed) - 1), label="index")
    flip = data.draw(st.integers(min_value=1, max_value=255), label="xor")
    sealed[index] ^= flip
    with pytest.raises(ShareRejected):
        _open(bytes(sealed), sender, receiver)


@settings(max_examples=30, deadline=None)
@given(st.binary(max_size=100), st.integers(min_value=0, max_value=2**32), st.data())
def test_truncation_and_extension_are_rejected(
    plaintext: bytes, seed: int, data: st.DataObject
) -> None:
    sender, receiver = _keys(seed)
    sealed = _seal(plaintext, sender, receiver)
    cut = data.draw(st.integers(min_value=0, max_value=len(sealed) - 1), label="cut")
    with pytest.raises(ShareRejected):
        _open(sealed[:cut], sender, receiver)
    with pytest.raises(ShareRejected):
        _open(sealed + data.draw(st.binary(min_size=1, max_size=8)), sender, receiver)


@pytest.mark.parametrize(
    "changes", [c for _, c in BINDING_CHANGES], ids=[name for name, _ in BINDING_CHANGES]
)
def test_changed_binding_is_rejected(changes: dict[str, Any]) -> None:
    sender, receiver = _keys(1)
    sealed = _seal(b"share", sender, receiver)
    assert _open(sealed, sender, receiver) == b"share"  # control: the unchanged binding opens
    with pytest.raises(ShareRejected) as refused:
        _open(sealed, sender, receiver, **changes)
    assert refused.value.kind == "share_rejected"


def test_only_the_receiver_opens_it() -> None:
    sender, receiver = _keys(2)
    third, _ = _keys(3)
    sealed = _seal(b"share", sender, receiver)
    with pytest.raises(ShareRejected):
        _open(sealed, sender, receiver, private=third)
    with pytest.raises(ShareRejected):  # the right receiver, but another claimed sender key
        _open(sealed, sender, receiver, peer_public=public_bytes(third))


def test_rejection_names_the_sender() -> None:
    sender, receiver = _keys(4)
    with pytest.raises(ShareRejected) as refused:
        _open(bytes(NONCE_BYTES + 16), sender, receiver)
    assert refused.value.sender == SENDER


def test_nonce_is_fresh_randomness() -> None:
    sender, receiver = _keys(5)
    first, second = _seal(b"share", sender, receiver), _seal(b"share", sender, receiver)
    assert first[:NONCE_BYTES] != second[:NONCE_BYTES]
    assert first[NONCE_BYTES:] != second[NONCE_BYTES:]


def test_low_order_peer_key_is_malformed() -> None:
    sender, _ = _keys(6)
    with pytest.raises(MalformedMessage):
        seal_share(
            b"share",
            private=sender,
            peer_public=bytes(32),  # the identity point: X25519 output would be all zero
            context=CONTEXT,
            sender=SENDER,
            receiver=RECEIVER,
        )
