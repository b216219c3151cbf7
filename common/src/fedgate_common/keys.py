"""Text forms of Ed25519 keys (what operators copy between machines)."""

from __future__ import annotations

import nacl.signing

from fedgate_common.errors import FedgateError

_PREFIX = "ed25519:"


class InvalidKey(FedgateError, ValueError):
    """A key in text form could not be parsed."""


def public_key_text(key: nacl.signing.VerifyKey) -> str:
    return _PREFIX + bytes(key).hex()


def parse_public_key(text: str) -> nacl.signing.VerifyKey:
    """Parse ``ed25519:<64 hex digits>`` (the prefix is optional)."""
    raw = text.strip().removeprefix(_PREFIX)
    try:
        data = bytes.fromhex(raw)
    except ValueError:
        raise InvalidKey(
            f"public key {text!r} is not hex; expected ed25519:<64 hex digits>"
        ) from None
    if len(data) != 32:
        raise InvalidKey(f"public key has {len(data)} bytes; Ed25519 public keys have 32")
    return nacl.signing.VerifyKey(data)


def signing_key_text(key: nacl.signing.SigningKey) -> str:
    return _PREFIX + bytes(key).hex()


def parse_signing_key(text: str) -> nacl.signing.SigningKey:
    raw = text.strip().removeprefix(_PREFIX)
    try:
        data = bytes.fromhex(raw)
    except ValueError:
        raise InvalidKey("private key file is not hex; expected ed25519:<64 hex digits>") from None
    if len(data) != 32:
        raise InvalidKey(f"private key has {len(data)} bytes; expected a 32-byte seed")
    return nacl.signing.SigningKey(data)
