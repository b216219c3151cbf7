"""Values the consensus core reasons about (IO-free; no signing, no encoding).

A ``signature`` here is opaque proof of origin supplied by the driver: the coordinator's
driver puts the signed wire envelope there and checks it before a message reaches the core;
the simulation uses unforgeable tokens. The core never inspects it.

Heights are federated rounds; ``round`` is Tendermint's consensus round within a height.
``value`` is the digest of the proposed global model; ``NIL`` (empty) votes for nothing.
"""

from __future__ import annotations

from typing import Literal

import msgspec

NIL = ""
Step = Literal["prevote", "precommit"]
TimeoutStep = Literal["propose", "prevote", "precommit"]


class Vote(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    height: int
    round: int
    step: Step
    value: str  # NIL for a nil vote
    voter: str


class SignedVote(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    vote: Vote
    signature: bytes


class Proposal(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``content`` is what validity is judged on (the driver: the signed per-cloud
    aggregates); ``value`` must be what the content yields (the global model digest)."""

    height: int
    round: int
    value: str
    valid_round: int  # -1 when the proposer has no valid value from an earlier round
    proposer: str
    content: bytes


class SignedProposal(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    proposal: Proposal
    signature: bytes


class CommitCertificate(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A quorum of precommits for ``value`` at (``height``, ``round``), from distinct clouds."""

    height: int
    round: int
    value: str
    precommits: tuple[SignedVote, ...]
