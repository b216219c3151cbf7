"""Counting the signed survivor confirmations the coordinator forwards (the consistency check)."""

from __future__ import annotations

from collections.abc import Sequence

import nacl.signing

from fedgate_common.envelope import decode_payload, open_envelope, verify_envelope
from fedgate_common.errors import ProtocolError
from fedgate_common.limits import DEFAULT_LIMITS, Limits
from fedgate_common.messages import SurvivorConfirmation
from fedgate_common.secagg.context import RoundContext
from fedgate_common.secagg.roster import Roster


def confirmed_by(
    envelopes: Sequence[bytes],
    *,
    roster: Roster,
    context: RoundContext,
    survivors: tuple[str, ...],
    limits: Limits = DEFAULT_LIMITS,
) -> set[str]:
    """Survivors whose valid signature says the survivor set is exactly ``survivors``.

    Envelopes that do not verify, name another round, roster or set, or come from an agent
    outside ``survivors`` are not counted.
    """
    signers: set[str] = set()
    for raw in envelopes:
        try:
            envelope = open_envelope(raw, limits)
            member = roster.members.get(envelope.sender)
            if member is None or envelope.sender not in survivors:
                continue
            header = (envelope.deployment, envelope.cloud, envelope.round, envelope.stage)
            if header != (context.deployment, context.cloud, context.round, "confirm"):
                continue
            verify_envelope(envelope, nacl.signing.VerifyKey(member.identity_key))
            payload = decode_payload(envelope)
        except ProtocolError:
            continue
        if (
            isinstance(payload, SurvivorConfirmation)
            and payload.roster_digest == context.roster_digest
            and payload.survivors == survivors
        ):
            signers.add(envelope.sender)
    return signers
