"""Text forms of Ed25519 keys (what operators copy between machines)."""

from __future__ import annotations

import nacl.exceptions
import nacl.signing

from fedgate_common.errors import FedgateError

_PREFIX = "ed25519:"


class InvalidKey(FedgateError, ValueError):
    """A key in text form could not be parsed."""


def public_key_text(key: nacl.signing.VerifyKey) -> str:
    return _PREFIX + bytes(key).hex()


def parse_public_key(text: str) -> nacl.signing.VerifyKey:
    """Parse ``ed25519:<64 hex digits>`` (the prefix is optional) into a key that a
    signing key can have: :class:`InvalidKey` for anything else."""
    raw = text.strip().removeprefix(_PREFIX)
    try:
        data = bytes.fromhex(raw)
    except ValueError:
        raise InvalidKey(
            f"public key {text!r} is not hex; expected ed25519:<64 hex digits>"
        ) from None
    if len(data) != 32:
        raise InvalidKey(f"public key has {len(data)} bytes; Ed25519 public keys have 32")
    key = nacl.signing.VerifyKey(data)
    try:
        # libsodium refuses small-order points (the all-zero encoding, the identity, the
        # other low-order points) and anything outside the prime-order group: keys that
        # no signing key has, some of which accept forged signatures.
        key.to_curve25519_public_key()
    except nacl.exceptions.RuntimeError:
        raise InvalidKey(
            f"public key {text!r} is not an Ed25519 public key (a small-order point or not "
            "a point of the curve's prime-order group); copy the key again from "
            "`fedgate-agent init` or `fedgate-coordinator status`"
        ) from None
    return key


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
