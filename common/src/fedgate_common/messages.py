"""Protocol payloads (version 1). Each is the payload of one signed envelope.

The ``tag`` of a payload is its *stage*; the envelope's ``stage`` must equal it.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from fedgate_common.arrays import WireArray
from fedgate_common.model_spec import ModelSpec

PROTOCOL_VERSION = 1


class TrainingPlan(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Local training settings chosen by the coordinator for one round."""

    learning_rate: float
    momentum: float = 0.9
    local_epochs: int = 5
    batch_size: int = 32


class SiteNoise(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Site-level DP noise of a secure round (docs/privacy.md, site level).

    Every agent adds its share of discrete Gaussian noise to its encoded input before
    masking, sized so that any ``min_inputs`` or more inputs carry aggregate noise of std
    ``noise_multiplier * clip_norm`` on the update and ``count_noise`` on the count of
    inputs within the clip norm (adaptive clipping; 0 without it). The round aborts, and
    agents refuse to unmask, with fewer than ``min_inputs`` inputs.
    """

    noise_multiplier: float
    min_inputs: int
    count_noise: float = 0.0


class SecAggParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How this round's updates are encoded and masked (docs/protocol.md, secure aggregation).

    ``degree`` is the requested number of neighbours (fewer when the roster is small);
    ``threshold`` is t, the number of shares that reconstruct a secret, out of the agent
    and its neighbours. ``max_inputs`` bounds how many inputs are summed, so encoded
    inputs are sized to never wrap. With ``noise`` every input carries its share of the
    site-level DP noise; with ``count_within_clip`` it also carries one word that is 1 when
    its update was within ``clip_norm`` before clipping (adaptive clipping).
    """

    word_bits: int
    clip_norm: float
    weight_cap: int
    max_inputs: int
    degree: int
    threshold: int
    noise: SiteNoise | None = None
    count_within_clip: bool = False


class RoundStart(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="start"
):
    """Coordinator → agents: train on the model ``base_digest`` and send an update.

    With ``secagg`` set the update travels masked (stages ``keys`` … ``reveal``);
    without it, in plaintext as one ``update`` message.
    """

    round: int
    base_digest: str
    selected: tuple[str, ...]
    plan: TrainingPlan
    update_timeout_s: float
    min_participants: int
    secagg: SecAggParams | None = None


# -- secure aggregation: agent → coordinator ----------------------------------------------


class AdvertiseKeys(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="keys"
):
    """Agent → coordinator: fresh X25519 public keys for this round, signed by the
    envelope. ``seed_commitment`` = SHA-256 of the agent's self-mask seed, checked when
    the seed is reconstructed. ``start_digest`` names the :class:`RoundStart` the agent
    answers (:func:`fedgate_common.secagg.context.start_digest`): agents refuse a roster
    whose members answered another start, so a coordinator cannot give two agents of one
    sum different plans or noise."""

    round: int
    base_digest: str
    start_digest: bytes
    share_key: bytes
    mask_key: bytes
    seed_commitment: bytes


class SealedShare(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """Shares of ``owner``'s secrets for ``holder``, encrypted so only ``holder`` opens them."""

    owner: str
    holder: str
    sealed: bytes


class ShareBundle(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="shares"
):
    """Agent → coordinator: one sealed share per holder (each neighbour and itself)."""

    round: int
    roster_digest: bytes
    shares: tuple[SealedShare, ...]


class RecordPrivacyReport(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the sending agent's record-level accountant says after the round it trained.

    Self-reported, for the coordinator's privacy ledger: ``epsilon_round`` is ε of this
    round's DP-SGD alone, ``epsilon_total`` of every round in the agent's ``privacy.json``
    so far, both at ``delta``, against the agent's ``target_epsilon``. ``noise_multiplier``
    (σ) and ``max_grad_norm`` (C) are its DP-SGD settings. The sampling rate and steps are
    left out: with the plan they would tell the coordinator the site's number of windows.
    """

    epsilon_round: float
    epsilon_total: float
    target_epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    accountant: str


class MaskedInput(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    omit_defaults=True,
    tag="masked",
):
    """Agent → coordinator: encoded update plus masks, mod 2^b (uint16 or uint32 words).

    ``record_privacy`` is present when the agent trained with record-level DP (and reports
    it); omitted otherwise, so such inputs encode as they did before it existed.
    """

    round: int
    roster_digest: bytes
    words: WireArray
    record_privacy: RecordPrivacyReport | None = None


class SurvivorConfirmation(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="confirm"
):
    """Agent → coordinator (forwarded to agents): the envelope signature over this is the
    agent's statement "the round's survivor set is exactly ``survivors``"."""

    round: int
    roster_digest: bytes
    survivors: tuple[str, ...]


class RevealedShare(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    owner: str
    x: int
    y: bytes


class Reveal(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="reveal"):
    """Agent → coordinator: self-seed shares of survivors, mask-key shares of dropouts."""

    round: int
    roster_digest: bytes
    seed_shares: tuple[RevealedShare, ...]
    mask_key_shares: tuple[RevealedShare, ...]


# -- secure aggregation: coordinator → agents ---------------------------------------------


class RosterEntry(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """An agent's identity key and its signed ``keys`` envelope, forwarded unchanged."""

    agent_id: str
    identity_key: bytes
    keys_envelope: bytes


class KeyRoster(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="roster"
):
    round: int
    entries: tuple[RosterEntry, ...]


class ShareDelivery(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="deliver"
):
    """Coordinator → one agent: the sealed shares other agents made for it."""

    round: int
    roster_digest: bytes
    shares: tuple[SealedShare, ...]


class SurvivorCheck(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="check"
):
    """Coordinator → agents: the agents whose masked inputs it holds (U3)."""

    round: int
    roster_digest: bytes
    survivors: tuple[str, ...]


class UnmaskRequest(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="unmask"
):
    """Coordinator → agents: reveal for ``survivors`` and ``dropped``; ``confirmations`` are
    the signed ``confirm`` envelopes that vouch for ``survivors``."""

    round: int
    roster_digest: bytes
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    confirmations: tuple[bytes, ...]


class ModelUpdate(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    omit_defaults=True,
    tag="update",
):
    """Agent → coordinator: ``delta`` = locally trained weights minus the base model.

    ``record_privacy`` as in :class:`MaskedInput`.
    """

    round: int
    base_digest: str
    delta: tuple[WireArray, ...]
    num_samples: int
    train_loss: float
    record_privacy: RecordPrivacyReport | None = None


class Certificate(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The commit certificate of a global model: signed ``vote`` envelopes (precommits for
    the model's digest at height = the model's round, consensus round ``consensus_round``)
    from at least a quorum of the federation manifest's coordinators."""

    consensus_round: int
    precommits: tuple[bytes, ...]


class GlobalModel(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="model"
):
    """A global model in the hash chain (round 0 = genesis).

    Every model after genesis carries the ``certificate`` by which the coordinators of all
    clouds decided it; the genesis model is named by digest in the federation manifest.
    """

    round: int
    digest: str
    parent_digest: str
    spec: ModelSpec
    weights: tuple[WireArray, ...]
    certificate: Certificate | None = None


# -- cross-cloud consensus: coordinator → coordinators ------------------------------------


class CloudAggregate(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="aggregate"
):
    """A cloud's result for federated round ``round`` on the model ``base_digest``: the mean
    update of its ``participants`` agents (all zeros and 0 participants when its round
    aborted). Signed by the cloud's coordinator; proposals carry it unchanged."""

    round: int
    base_digest: str
    participants: int
    delta: tuple[WireArray, ...]


class ConsensusProposal(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="proposal"
):
    """Tendermint PROPOSAL for height ``round``: the global model ``value`` (its digest),
    computed by the manifest's cross-cloud rule from ``aggregates`` (signed ``aggregate``
    envelopes of distinct clouds, at least a quorum of them)."""

    round: int
    consensus_round: int
    value: str
    valid_round: int
    aggregates: tuple[bytes, ...]


class ConsensusVote(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="vote"
):
    """Tendermint PREVOTE or PRECOMMIT for height ``round``; ``value`` "" is nil."""

    round: int
    consensus_round: int
    step: Literal["prevote", "precommit"]
    value: str


RoundOutcome = Literal["completed", "aborted"]


class RoundEnd(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="end"):
    """Coordinator → agents: how a round ended."""

    round: int
    outcome: RoundOutcome
    reason: str
    participants: tuple[str, ...]
    model_digest: str


Payload = (
    RoundStart
    | ModelUpdate
    | GlobalModel
    | RoundEnd
    | AdvertiseKeys
    | ShareBundle
    | MaskedInput
    | SurvivorConfirmation
    | Reveal
    | KeyRoster
    | ShareDelivery
    | SurvivorCheck
    | UnmaskRequest
    | CloudAggregate
    | ConsensusProposal
    | ConsensusVote
)
AGENT_STAGES: frozenset[str] = frozenset(
    {"update", "keys", "shares", "masked", "confirm", "reveal"}
)
COORDINATOR_STAGES: frozenset[str] = frozenset(
    {"start", "model", "end", "roster", "deliver", "check", "unmask"}
)
STAGES: frozenset[str] = AGENT_STAGES | COORDINATOR_STAGES
"""Stages of a round inside one cloud (the ones round topics name)."""
FEDERATION_STAGES: frozenset[str] = frozenset({"aggregate", "proposal", "vote"})
"""Stages between the coordinators of the federation (``model`` also travels there)."""
ALL_STAGES: frozenset[str] = STAGES | FEDERATION_STAGES
