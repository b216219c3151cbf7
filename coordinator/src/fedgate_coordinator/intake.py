"""Checks every message from an agent before the round logic sees it (IO-free).

Order matters: cheap structural checks first, the signature before the payload is
decoded, so unauthenticated bytes never reach the array decoder.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import nacl.signing
from fedgate_common.envelope import decode_payload, open_envelope, verify_envelope
from fedgate_common.errors import EnvelopeMismatch, MalformedMessage, UnknownSender
from fedgate_common.limits import DEFAULT_LIMITS, Limits
from fedgate_common.messages import AGENT_STAGES, Payload
from fedgate_common.topics import parse_round_topic


class AgentMessage(msgspec.Struct, frozen=True, kw_only=True):
    sender: str
    payload: Payload
    raw: bytes
    identity_key: bytes

    @property
    def size(self) -> int:
        return len(self.raw)


def open_agent_message(
    topic: str,
    raw: bytes,
    *,
    deployment: str,
    cloud: str,
    agent_key: Callable[[str], nacl.signing.VerifyKey | None],
    limits: Limits = DEFAULT_LIMITS,
) -> AgentMessage:
    """Return the verified agent message in ``raw``; raise a ProtocolError subclass otherwise."""
    where = parse_round_topic(topic)
    envelope = open_envelope(raw, limits)
    if (envelope.deployment, envelope.cloud) != (deployment, cloud):
        raise EnvelopeMismatch(
            f"message for {envelope.deployment}/{envelope.cloud}, this is {deployment}/{cloud}",
            sender=envelope.sender,
        )
    header = (where.deployment, where.cloud, where.round, where.stage, where.agent)
    if header != (
        envelope.deployment,
        envelope.cloud,
        envelope.round,
        envelope.stage,
        envelope.sender,
    ):
        raise EnvelopeMismatch(
            f"envelope header does not match topic {topic!r}", sender=envelope.sender
        )
    key = agent_key(envelope.sender)
    if key is None:
        raise UnknownSender(f"agent {envelope.sender!r} is not enrolled", sender=envelope.sender)
    verify_envelope(envelope, key)
    payload = decode_payload(envelope)
    if envelope.stage not in AGENT_STAGES:
        raise MalformedMessage(
            f"agents may not send {envelope.stage!r} messages", sender=envelope.sender
        )
    return AgentMessage(sender=envelope.sender, payload=payload, raw=raw, identity_key=bytes(key))
