"""The key roster: every agent's signed round keys, as all parties must see them.

Agents do not take the coordinator's word for a key: each entry carries the agent's own
signed ``keys`` envelope, checked here against the agent's identity key.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
import nacl.signing

from fedgate_common.envelope import decode_payload, open_envelope, verify_envelope
from fedgate_common.errors import (
    BadSignature,
    DuplicateKeys,
    KeySignatureInvalid,
    KeySubstituted,
    MalformedMessage,
    ProtocolError,
    StartMismatch,
)
from fedgate_common.limits import DEFAULT_LIMITS, Limits
from fedgate_common.messages import AdvertiseKeys, KeyRoster, RosterEntry
from fedgate_common.secagg.context import sha256
from fedgate_common.secagg.share_box import check_x25519_public_key

_DIGEST_PURPOSE = b"fedgate-secagg-roster-v1"


class RosterMember(msgspec.Struct, frozen=True, kw_only=True):
    agent_id: str
    identity_key: bytes
    share_key: bytes
    mask_key: bytes
    seed_commitment: bytes
    x: int  # this agent's Shamir x-coordinate: its position in the sorted roster, from 1


class Roster(msgspec.Struct, frozen=True, kw_only=True):
    members: dict[str, RosterMember]
    digest: bytes

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(sorted(self.members))


def make_roster(keys: Mapping[str, tuple[bytes, AdvertiseKeys]]) -> Roster:
    """Build the roster from ``agent id → (identity key, advertised keys)``."""
    members = {}
    for x, agent_id in enumerate(sorted(keys), start=1):
        identity, advertised = keys[agent_id]
        members[agent_id] = RosterMember(
            agent_id=agent_id,
            identity_key=identity,
            share_key=advertised.share_key,
            mask_key=advertised.mask_key,
            seed_commitment=advertised.seed_commitment,
            x=x,
        )
    _refuse_duplicates(members)
    listing = [
        [m.agent_id, m.identity_key, m.share_key, m.mask_key, m.seed_commitment]
        for m in members.values()
    ]
    return Roster(members=members, digest=sha256(_DIGEST_PURPOSE, msgspec.msgpack.encode(listing)))


def _refuse_duplicates(members: Mapping[str, RosterMember]) -> None:
    for field in ("identity_key", "share_key", "mask_key", "seed_commitment"):
        values = [getattr(m, field) for m in members.values()]
        if len(set(values)) != len(values):
            raise DuplicateKeys(f"two roster entries carry the same {field.replace('_', ' ')}")
    for member in members.values():
        if len(member.share_key) != 32 or len(member.mask_key) != 32:
            raise MalformedMessage(
                f"round keys of {member.agent_id!r} are not 32-byte X25519 keys",
                sender=member.agent_id,
            )
        if len(member.seed_commitment) != 32:
            raise MalformedMessage("seed commitments are 32-byte SHA-256 digests")


def verify_roster(
    roster: KeyRoster,
    *,
    deployment: str,
    cloud: str,
    base_digest: str,
    start_digest: bytes,
    selected: tuple[str, ...],
    pinned_identities: Mapping[str, bytes],
    limits: Limits = DEFAULT_LIMITS,
) -> Roster:
    """Check every entry's signature and binding; return the roster an agent may use.

    ``pinned_identities`` holds identity keys seen before; a roster that changes one is
    refused (:class:`KeySubstituted`). Every entry must answer the round start this agent
    answers (``start_digest``), else :class:`StartMismatch`: each agent counts the sum's
    noise from its own start, assuming every other input was made under the same one.
    """
    ids = [entry.agent_id for entry in roster.entries]
    if len(set(ids)) != len(ids):
        raise DuplicateKeys("an agent appears twice in the key roster")
    chosen = set(selected)
    keys: dict[str, tuple[bytes, AdvertiseKeys]] = {}
    for entry in roster.entries:
        if entry.agent_id not in chosen:
            raise MalformedMessage(f"roster lists {entry.agent_id!r}, who was not selected")
        pinned = pinned_identities.get(entry.agent_id)
        if pinned is not None and pinned != entry.identity_key:
            raise KeySubstituted(
                f"roster gives {entry.agent_id!r} an identity key other than the one known"
            )
        keys[entry.agent_id] = (
            entry.identity_key,
            _open_entry(entry, roster, deployment, cloud, limits),
        )
        advertised = keys[entry.agent_id][1]
        if advertised.base_digest != base_digest:
            raise MalformedMessage(f"keys of {entry.agent_id!r} are for another base model")
        if advertised.start_digest != start_digest:
            raise StartMismatch(
                f"keys of {entry.agent_id!r} answer another start of round {roster.round} "
                "(its training plan, selection or secure-aggregation parameters differ from "
                "this agent's)"
            )
        # Refused here, before anything is sealed to them or masked with them: a roster with
        # a key no exchange can use would fail this agent halfway through the round.
        for key, what in ((advertised.share_key, "share key"), (advertised.mask_key, "mask key")):
            check_x25519_public_key(key, what=f"{what} of {entry.agent_id!r}")
    return make_roster(keys)


def _open_entry(
    entry: RosterEntry, roster: KeyRoster, deployment: str, cloud: str, limits: Limits
) -> AdvertiseKeys:
    try:
        envelope = open_envelope(entry.keys_envelope, limits)
        header = (
            envelope.deployment,
            envelope.cloud,
            envelope.round,
            envelope.stage,
            envelope.sender,
        )
        if header != (deployment, cloud, roster.round, "keys", entry.agent_id):
            raise KeySignatureInvalid(
                f"keys envelope of {entry.agent_id!r} is not bound to this round"
            )
        if len(entry.identity_key) != 32:
            raise KeySignatureInvalid(f"identity key of {entry.agent_id!r} is not 32 bytes")
        verify_envelope(envelope, nacl.signing.VerifyKey(entry.identity_key))
        payload = decode_payload(envelope)
    except BadSignature:
        raise KeySignatureInvalid(
            f"round keys of {entry.agent_id!r} are not signed by its identity key"
        ) from None
    except KeySignatureInvalid:
        raise
    except ProtocolError as exc:
        raise KeySignatureInvalid(f"keys entry of {entry.agent_id!r} unusable: {exc}") from None
    if not isinstance(payload, AdvertiseKeys):
        raise KeySignatureInvalid(f"roster entry of {entry.agent_id!r} is not a keys message")
    return payload
