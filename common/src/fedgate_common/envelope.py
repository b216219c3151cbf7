"""Signed envelopes: every protocol message travels inside one.

The Ed25519 signature covers ``(domain, version, deployment, cloud, round, stage, sender,
payload)``, so a message cannot be replayed into another round, stage, cloud or deployment,
and a receiver can check who sent it before decoding the payload.
"""

from __future__ import annotations

import msgspec
import nacl.exceptions
import nacl.signing

from fedgate_common.errors import (
    BadSignature,
    EnvelopeMismatch,
    LimitExceeded,
    MalformedMessage,
)
from fedgate_common.identifiers import validate_identifier
from fedgate_common.limits import DEFAULT_LIMITS, Limits
from fedgate_common.messages import ALL_STAGES, PROTOCOL_VERSION, Payload

_SIGNING_DOMAIN = b"fedgate-envelope-v1"


class Envelope(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    version: int
    deployment: str
    cloud: str
    round: int
    stage: str
    sender: str
    payload: bytes
    signature: bytes


def _signed_bytes(
    version: int, deployment: str, cloud: str, round: int, stage: str, sender: str, payload: bytes
) -> bytes:
    return msgspec.msgpack.encode(
        [_SIGNING_DOMAIN, version, deployment, cloud, round, stage, sender, payload]
    )


def seal(
    payload: Payload,
    *,
    signing_key: nacl.signing.SigningKey,
    deployment: str,
    cloud: str,
    sender: str,
) -> bytes:
    """Encode ``payload`` and wrap it in a signed envelope; returns the wire bytes."""
    stage = type(payload).__struct_config__.tag
    assert isinstance(stage, str)  # every payload type is tagged; not input validation
    body = msgspec.msgpack.encode(payload)
    signature = signing_key.sign(
        _signed_bytes(PROTOCOL_VERSION, deployment, cloud, payload.round, stage, sender, body)
    ).signature
    envelope = Envelope(
        PROTOCOL_VERSION, deployment, cloud, payload.round, stage, sender, body, signature
    )
    return msgspec.msgpack.encode(envelope)


_envelope_decoder = msgspec.msgpack.Decoder(Envelope)
_payload_decoder: msgspec.msgpack.Decoder[Payload] = msgspec.msgpack.Decoder(Payload)


def open_envelope(raw: bytes, limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """Decode the outer envelope of untrusted bytes (signature not yet checked)."""
    if len(raw) > limits.max_message_bytes:
        raise LimitExceeded(f"message of {len(raw)} bytes > limit {limits.max_message_bytes}")
    try:
        envelope = _envelope_decoder.decode(raw)
    except (msgspec.DecodeError, ValueError) as exc:  # invalid UTF-8: UnicodeDecodeError
        raise MalformedMessage(f"undecodable envelope: {exc}") from None
    # The sender is checked first: errors carry it into logs and the store.
    try:
        validate_identifier(envelope.sender, what="sender")
        validate_identifier(envelope.deployment, what="deployment")
        validate_identifier(envelope.cloud, what="cloud")
    except ValueError as exc:
        raise MalformedMessage(str(exc)) from None
    if envelope.version != PROTOCOL_VERSION:
        raise MalformedMessage(
            f"unsupported protocol version {envelope.version}", sender=envelope.sender
        )
    if envelope.stage not in ALL_STAGES:
        raise MalformedMessage(f"unknown stage {envelope.stage[:40]!r}", sender=envelope.sender)
    if envelope.round < 0:
        raise MalformedMessage("negative round", sender=envelope.sender)
    return envelope


def verify_envelope(envelope: Envelope, verify_key: nacl.signing.VerifyKey) -> None:
    """Raise :class:`BadSignature` unless ``verify_key`` signed exactly this envelope."""
    signed = _signed_bytes(
        envelope.version,
        envelope.deployment,
        envelope.cloud,
        envelope.round,
        envelope.stage,
        envelope.sender,
        envelope.payload,
    )
    try:
        verify_key.verify(signed, envelope.signature)
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
        raise BadSignature(
            f"signature of {envelope.sender!r} does not verify", sender=envelope.sender
        ) from None


def decode_payload(envelope: Envelope) -> Payload:
    """Decode the payload of a verified envelope and check it matches the envelope header."""
    try:
        payload = _payload_decoder.decode(envelope.payload)
    except (msgspec.DecodeError, ValueError) as exc:
        raise MalformedMessage(
            f"undecodable {envelope.stage!r} payload: {exc}", sender=envelope.sender
        ) from None
    tag = type(payload).__struct_config__.tag
    if tag != envelope.stage or payload.round != envelope.round:
        raise EnvelopeMismatch(
            f"payload ({tag}, round {payload.round}) does not match envelope "
            f"({envelope.stage}, round {envelope.round})",
            sender=envelope.sender,
        )
    return payload
