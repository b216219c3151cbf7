"""Per-neighbour encryption of Shamir shares: X25519 → HKDF-SHA256 → ChaCha20-Poly1305.

The AEAD key and associated data name deployment, cloud, round, roster, sender and
receiver, so a share cannot be opened by anyone else, moved to another round or roster
view, or changed without detection.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedgate_common.errors import MalformedMessage, ShareRejected
from fedgate_common.secagg.context import RoundContext

_PURPOSE = b"fedgate-secagg-share-v1"
NONCE_BYTES = 12


def check_x25519_public_key(key: bytes, *, sender: str | None = None, what: str = "key") -> None:
    """Refuse a key no exchange can use (wrong length, or of low order: every exchange with
    it gives zero), before anyone relies on it: at intake, and in a roster."""
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(key))
    except ValueError as exc:
        raise MalformedMessage(f"unusable X25519 {what}: {exc}", sender=sender) from None


def x25519_shared_secret(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """Raw X25519; a low-order peer key (all-zero result) is refused."""
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise MalformedMessage(f"unusable X25519 public key: {exc}") from None


def _box(private: X25519PrivateKey, peer_public: bytes, info: bytes) -> ChaCha20Poly1305:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(
        x25519_shared_secret(private, peer_public)
    )
    return ChaCha20Poly1305(key)


def seal_share(
    plaintext: bytes,
    *,
    private: X25519PrivateKey,
    peer_public: bytes,
    context: RoundContext,
    sender: str,
    receiver: str,
    random_bytes: Callable[[int], bytes] = secrets.token_bytes,
) -> bytes:
    """Return ``nonce ‖ ciphertext`` of ``plaintext`` for ``receiver``."""
    binding = context.label(_PURPOSE, sender, receiver)
    nonce = random_bytes(NONCE_BYTES)
    return nonce + _box(private, peer_public, binding).encrypt(nonce, plaintext, binding)


def open_share(
    sealed: bytes,
    *,
    private: X25519PrivateKey,
    peer_public: bytes,
    context: RoundContext,
    sender: str,
    receiver: str,
) -> bytes:
    """Decrypt a share from ``sender``; raise :class:`ShareRejected` otherwise."""
    if len(sealed) < NONCE_BYTES + 16:
        raise ShareRejected(f"sealed share of {len(sealed)} bytes is too short")
    binding = context.label(_PURPOSE, sender, receiver)
    try:
        return _box(private, peer_public, binding).decrypt(
            sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], binding
        )
    except InvalidTag:
        raise ShareRejected(
            f"share from {sender!r} does not open for {receiver!r} in round {context.round}",
            sender=sender,
        ) from None
