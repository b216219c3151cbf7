"""Consensus messages on the wire: signed envelopes ↔ the core's values.

A vote or proposal travels as a signed envelope (``fedgate_common.envelope``) whose
``cloud`` and ``sender`` are the signing coordinator's cloud id and whose ``round`` is the
height. The core's opaque ``signature`` is that whole envelope, so a commit certificate is
simply the precommit envelopes, checkable by anyone who holds the manifest's keys.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
import nacl.signing

from fedgate_common.consensus.types import (
    NIL,
    CommitCertificate,
    Proposal,
    SignedProposal,
    SignedVote,
    Vote,
)
from fedgate_common.envelope import Envelope, decode_payload, open_envelope, seal, verify_envelope
from fedgate_common.errors import (
    CertificateInvalid,
    EnvelopeMismatch,
    MalformedMessage,
    ProtocolError,
    UnknownSender,
)
from fedgate_common.limits import DEFAULT_LIMITS, Limits
from fedgate_common.messages import (
    Certificate,
    CloudAggregate,
    ConsensusProposal,
    ConsensusVote,
    GlobalModel,
)

_aggregates = msgspec.msgpack.Decoder(tuple[bytes, ...])
_DIGEST_LENGTH = 64  # a value is a model digest: SHA-256, lower-case hex
# Heights and consensus rounds as the coordinators' stores keep them (SQL INTEGER).
MAX_HEIGHT = 2**31 - 1


def seal_vote(vote: Vote, *, deployment: str, signing_key: nacl.signing.SigningKey) -> SignedVote:
    payload = ConsensusVote(
        round=vote.height, consensus_round=vote.round, step=vote.step, value=vote.value
    )
    raw = seal(
        payload, signing_key=signing_key, deployment=deployment, cloud=vote.voter, sender=vote.voter
    )
    return SignedVote(vote=vote, signature=raw)


def proposal_content(aggregates: tuple[bytes, ...]) -> bytes:
    """The core's opaque proposal content: the signed aggregate envelopes, in order."""
    return msgspec.msgpack.encode(aggregates)


def content_aggregates(content: bytes) -> tuple[bytes, ...]:
    try:
        return _aggregates.decode(content)
    except msgspec.DecodeError as exc:
        raise MalformedMessage(f"proposal content is not a list of aggregates: {exc}") from None


def seal_proposal(
    proposal: Proposal, *, deployment: str, signing_key: nacl.signing.SigningKey
) -> SignedProposal:
    payload = ConsensusProposal(
        round=proposal.height,
        consensus_round=proposal.round,
        value=proposal.value,
        valid_round=proposal.valid_round,
        aggregates=content_aggregates(proposal.content),
    )
    raw = seal(
        payload,
        signing_key=signing_key,
        deployment=deployment,
        cloud=proposal.proposer,
        sender=proposal.proposer,
    )
    return SignedProposal(proposal=proposal, signature=raw)


def open_signed(
    raw: bytes,
    *,
    deployment: str,
    keys: Mapping[str, nacl.signing.VerifyKey],
    limits: Limits = DEFAULT_LIMITS,
) -> tuple[Envelope, ConsensusVote | ConsensusProposal | CloudAggregate | GlobalModel]:
    """Open a federation message from a coordinator listed in ``keys``; typed errors only."""
    envelope = open_envelope(raw, limits)
    if envelope.deployment != deployment:
        raise EnvelopeMismatch(
            f"message for deployment {envelope.deployment!r}, expected {deployment!r}",
            sender=envelope.sender,
        )
    if envelope.cloud != envelope.sender:
        raise EnvelopeMismatch(
            f"coordinator {envelope.sender!r} signed for cloud {envelope.cloud!r}",
            sender=envelope.sender,
        )
    key = keys.get(envelope.sender)
    if key is None:
        raise UnknownSender(
            f"{envelope.sender!r} is not a coordinator of the federation manifest",
            sender=envelope.sender,
        )
    verify_envelope(envelope, key)
    payload = decode_payload(envelope)
    if not isinstance(payload, ConsensusVote | ConsensusProposal | CloudAggregate | GlobalModel):
        raise MalformedMessage(
            f"{envelope.stage!r} is not a federation message", sender=envelope.sender
        )
    return envelope, payload


def open_vote(
    raw: bytes, *, deployment: str, keys: Mapping[str, nacl.signing.VerifyKey]
) -> SignedVote:
    envelope, payload = open_signed(raw, deployment=deployment, keys=keys)
    if not isinstance(payload, ConsensusVote):
        raise MalformedMessage(f"expected a vote, got {envelope.stage!r}", sender=envelope.sender)
    _check_value(payload.value, envelope.sender, allow_nil=True)
    _check_numbers(envelope.sender, height=payload.round, round=payload.consensus_round)
    vote = Vote(
        height=payload.round,
        round=payload.consensus_round,
        step=payload.step,
        value=payload.value,
        voter=envelope.sender,
    )
    return SignedVote(vote=vote, signature=raw)


def open_proposal(
    raw: bytes, *, deployment: str, keys: Mapping[str, nacl.signing.VerifyKey]
) -> SignedProposal:
    envelope, payload = open_signed(raw, deployment=deployment, keys=keys)
    if not isinstance(payload, ConsensusProposal):
        raise MalformedMessage(
            f"expected a proposal, got {envelope.stage!r}", sender=envelope.sender
        )
    _check_value(payload.value, envelope.sender, allow_nil=False)
    _check_numbers(
        envelope.sender,
        height=payload.round,
        round=payload.consensus_round,
        valid_round=payload.valid_round,
    )
    proposal = Proposal(
        height=payload.round,
        round=payload.consensus_round,
        value=payload.value,
        valid_round=payload.valid_round,
        proposer=envelope.sender,
        content=proposal_content(payload.aggregates),
    )
    return SignedProposal(proposal=proposal, signature=raw)


def certificate_to_wire(certificate: CommitCertificate) -> Certificate:
    return Certificate(
        consensus_round=certificate.round,
        precommits=tuple(v.signature for v in certificate.precommits),
    )


def verify_certificate(
    *,
    height: int,
    value: str,
    certificate: Certificate,
    deployment: str,
    keys: Mapping[str, nacl.signing.VerifyKey],
    quorum: int,
) -> CommitCertificate:
    """Check that ``certificate`` holds precommits for ``value`` at (``height``, its round)
    correctly signed by at least ``quorum`` distinct coordinators of ``keys``.

    Returns the certificate as the core's value; raises :class:`CertificateInvalid`.
    Precommits from unknown senders or for anything else are errors, not ignored: a
    certificate is assembled by an honest coordinator from exactly the votes it counted.
    """
    if len(certificate.precommits) > len(keys):
        raise CertificateInvalid(
            f"certificate has {len(certificate.precommits)} precommits, the federation "
            f"has {len(keys)} coordinators"
        )
    signers: list[SignedVote] = []
    seen: set[str] = set()
    for raw in certificate.precommits:
        try:
            signed = open_vote(raw, deployment=deployment, keys=keys)
        except ProtocolError as exc:
            raise CertificateInvalid(f"precommit does not verify: {exc}") from None
        vote = signed.vote
        expected = (height, certificate.consensus_round, "precommit", value)
        if (vote.height, vote.round, vote.step, vote.value) != expected:
            raise CertificateInvalid(
                f"{vote.voter!r} signed {vote.step} {vote.value[:12] or 'nil'} at height "
                f"{vote.height} round {vote.round}; the certificate needs precommits for "
                f"{value[:12]} at height {height} round {certificate.consensus_round}"
            )
        if vote.voter in seen:
            raise CertificateInvalid(f"two precommits from {vote.voter!r}")
        seen.add(vote.voter)
        signers.append(signed)
    if len(signers) < quorum:
        raise CertificateInvalid(
            f"certificate has {len(signers)} precommits; the quorum is {quorum}"
        )
    return CommitCertificate(
        height=height, round=certificate.consensus_round, value=value, precommits=tuple(signers)
    )


def graph_seed_material(model: GlobalModel) -> bytes:
    """What the base model contributes to the SecAgg neighbour-graph seed (DESIGN.md §4
    step 2): the 64 ASCII bytes of its digest.

    Only a decided (certified) or genesis model reaches an agent, and its digest is fixed
    by the decision. The certificate's bytes are not used: any quorum subset of the
    precommits, in any order, is a valid certificate, which would let a coordinator try
    many graphs for the same model.
    """
    return model.digest.encode()


def _check_value(value: str, sender: str, *, allow_nil: bool) -> None:
    if value == NIL and allow_nil:
        return
    if len(value) != _DIGEST_LENGTH or not all(c in "0123456789abcdef" for c in value):
        raise MalformedMessage(
            f"value is not a model digest ({_DIGEST_LENGTH} lower-case hex digits)", sender=sender
        )


def _check_numbers(sender: str, *, height: int, round: int, valid_round: int = -1) -> None:
    if not (
        0 <= height <= MAX_HEIGHT and 0 <= round <= MAX_HEIGHT and -1 <= valid_round <= MAX_HEIGHT
    ):
        raise MalformedMessage(
            f"height {height}, consensus round {round} or valid round {valid_round} is "
            f"outside 0..{MAX_HEIGHT}",
            sender=sender,
        )
