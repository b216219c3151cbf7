"""Immutable values that go into and come out of the :class:`~.store.Store`.

Callers never see SQLAlchemy rows: every read returns one of these frozen dataclasses, so a
record can be passed around (or across threads) after its session is closed.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

import msgspec
import numpy as np
import numpy.typing as npt
from fedgate_common.arrays import WireArray, decode_arrays, encode_arrays
from fedgate_common.digests import model_digest
from fedgate_common.model_spec import ModelSpec

__all__ = [
    "CONSENSUS_STEPS",
    "NIL_VALUE",
    "PLAINTEXT_STAGE",
    "POOLED_UNIT",
    "RECORD_UNIT",
    "SECAGG_STAGES",
    "SITE_UNIT",
    "AgentRecord",
    "AgentStatus",
    "AggregateRecord",
    "Aggregation",
    "DecisionRecord",
    "EventRecord",
    "EvidenceRecord",
    "ModelRecord",
    "ModelSummary",
    "ParticipantRecord",
    "PrivacyLedgerEntry",
    "RoundRecord",
    "RoundStageRecord",
    "RoundStatus",
    "VoteRecord",
    "stage_order",
]

SECAGG_STAGES = ("keys", "shares", "masked", "confirm", "reveal")
"""The stages of a secure-aggregation round, in protocol order (DESIGN.md section 4)."""

PLAINTEXT_STAGE = "update"
"""The one stage of a plaintext round: every agent sends its signed update."""

SITE_UNIT = "site"
"""Unit of privacy of site-level DP: one agent's whole contribution to a round."""

RECORD_UNIT = "record"
"""Unit of privacy of record-level DP: one training window; rows are per agent, as the
agents report them (:mod:`fedgate_coordinator.record_privacy_reports`)."""

POOLED_UNIT = "pooled"
"""Unit of privacy of record-level DP with the noise pooled in the secure sums (privacy.md
section 3.7): one training window, as the coordinator counts it for a site that took part
in every round it released, at the configured sampling rate; ``agent`` empty."""

CONSENSUS_STEPS = ("proposal", "prevote", "precommit")
"""The signed messages of cross-cloud consensus, in protocol order (DESIGN.md section 5)."""

NIL_VALUE = ""
"""The value of a nil prevote or precommit: a vote for no global model."""


class AgentStatus(enum.StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"


class RoundStatus(enum.StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    ABORTED = "aborted"


class Aggregation(enum.StrEnum):
    """How a round's updates reach the coordinator."""

    PLAINTEXT = "plaintext"
    """Signed updates in the clear, averaged by the coordinator (FedAvg)."""
    SECAGG = "secagg"
    """SecAgg+ masking: the coordinator learns only the sum of the surviving updates."""


def stage_order(stage: str) -> tuple[int, str]:
    """Sort key of a stage name: the SecAgg+ stages in protocol order, then others by name."""
    try:
        return (SECAGG_STAGES.index(stage), "")
    except ValueError:
        return (len(SECAGG_STAGES), stage)


@dataclass(frozen=True, slots=True)
class AgentRecord:
    """An enrolled agent; ``public_key`` is stored exactly as enrolled."""

    agent_id: str
    public_key: str
    enrolled_at: datetime
    last_seen_at: datetime | None
    status: AgentStatus


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """One global model of the hash chain, in its stored (msgpack) form.

    ``spec`` is a msgpack-encoded :class:`ModelSpec`, ``weights`` a msgpack-encoded
    ``tuple[WireArray, ...]``; ``digest`` must equal :func:`model_digest` over them and the
    parent digest (``""`` for the genesis model). ``created_at`` is set by the store.
    """

    digest: str
    parent_digest: str
    round: int
    spec: bytes
    weights: bytes
    num_parameters: int
    created_at: datetime | None = None

    @classmethod
    def from_weights(
        cls,
        *,
        round: int,
        parent_digest: str,
        spec: ModelSpec,
        weights: Mapping[str, npt.NDArray[np.generic]],
    ) -> ModelRecord:
        """Encode ``spec`` and ``weights`` and compute the chain digest."""
        wire = encode_arrays(weights)
        return cls(
            digest=model_digest(parent_digest=parent_digest, round=round, spec=spec, weights=wire),
            parent_digest=parent_digest,
            round=round,
            spec=msgspec.msgpack.encode(spec),
            weights=msgspec.msgpack.encode(wire),
            num_parameters=sum(int(array.size) for array in weights.values()),
        )

    def decode_spec(self) -> ModelSpec:
        """The model architecture (raises msgspec errors if the bytes are not a spec)."""
        return msgspec.msgpack.decode(self.spec, type=ModelSpec)

    def decode_wire_weights(self) -> tuple[WireArray, ...]:
        """The weights as wire arrays, the form the digest covers."""
        return msgspec.msgpack.decode(self.weights, type=tuple[WireArray, ...])

    def decode_weights(self) -> dict[str, npt.NDArray[np.generic]]:
        """The weights as ``name -> array`` (finite values and size limits are checked)."""
        return decode_arrays(self.decode_wire_weights())

    def computed_digest(self) -> str:
        """Recompute the digest from the stored bytes (it should equal ``digest``)."""
        return model_digest(
            parent_digest=self.parent_digest,
            round=self.round,
            spec=self.decode_spec(),
            weights=self.decode_wire_weights(),
        )

    def summary(self) -> ModelSummary:
        """This model without its weights."""
        if self.created_at is None:
            raise ValueError("a model summary needs created_at; read the model from the store")
        return ModelSummary(
            digest=self.digest,
            parent_digest=self.parent_digest,
            round=self.round,
            created_at=self.created_at,
            num_parameters=self.num_parameters,
        )


@dataclass(frozen=True, slots=True)
class ModelSummary:
    """A model of the chain without its spec and weights."""

    digest: str
    parent_digest: str
    round: int
    created_at: datetime
    num_parameters: int


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """One training round.

    ``model_digest``, ``ended_at``, ``participants``, ``abort_reason``, ``mean_train_loss``
    and ``bytes_down_per_agent`` are set when it completes or aborts (``mean_train_loss``
    may stay ``None`` under secure aggregation). ``threshold`` (t of the t-of-n secret
    sharing), ``graph_degree`` (neighbours per agent in the round) and ``word_bits`` (inputs
    are summed modulo 2^word_bits) are set for :attr:`Aggregation.SECAGG` rounds only.
    ``clip_norm`` is the L2 norm every input was clipped to and ``within_clip`` the fraction
    of inputs that were within it (noisy under site-level DP, so it may fall slightly
    outside [0, 1]); both are set by :meth:`.Store.set_round_clip`, ``within_clip`` only
    when the round measured it (adaptive clipping).
    """

    round: int
    status: RoundStatus
    base_digest: str
    model_digest: str | None
    started_at: datetime
    ended_at: datetime | None
    selected: int
    min_participants: int
    aggregation: Aggregation
    threshold: int | None
    graph_degree: int | None
    word_bits: int | None
    participants: int | None
    abort_reason: str | None
    mean_train_loss: float | None
    bytes_down_per_agent: int | None
    clip_norm: float | None = None
    within_clip: float | None = None


@dataclass(frozen=True, slots=True)
class ParticipantRecord:
    """What one agent contributed to a round at one protocol stage (metadata only).

    ``num_samples`` and ``train_loss`` are ``None`` in secure-aggregation rounds, where the
    coordinator never learns them (the store refuses them there); ``bytes_up`` is what the
    agent sent at ``stage``.
    """

    agent_id: str
    num_samples: int | None
    train_loss: float | None
    bytes_up: int
    stage: str = "update"
    received_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class RoundStageRecord:
    """How one protocol stage of a round went, as recorded by :meth:`.Store.record_stage`.

    ``expected`` agents were waited for and ``received`` of them answered in time;
    ``dropped`` (``expected - received``) is computed here, not stored. ``bytes_in`` sums
    what agents sent at this stage, ``bytes_out`` what the coordinator published for it
    (summed over recipients); ``seconds`` is how long the stage took.
    """

    round: int
    stage: str
    expected: int
    received: int
    bytes_in: int
    bytes_out: int
    seconds: float
    recorded_at: datetime
    dropped: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dropped", self.expected - self.received)


@dataclass(frozen=True, slots=True)
class PrivacyLedgerEntry:
    """What one round spent of the privacy budget of one unit, as :meth:`.Store.record_privacy`
    keeps it: one entry per (round, unit, agent). ``unit`` is :data:`SITE_UNIT` for
    site-level DP, with ``agent`` empty (the federation's spend), or :data:`RECORD_UNIT` for
    what ``agent`` reported of its record-level DP-SGD (then ``noise_multiplier`` and
    ``effective_noise_multiplier`` are its σ, ``clip_norm`` its per-window clip, and
    ``count_noise``, ``min_inputs`` and ``inputs`` are 0: they do not apply), or
    :data:`POOLED_UNIT` for the coordinator's own count of pooled record-level noise (then
    ``effective_noise_multiplier`` is the σ per window the released sum carried,
    ``clip_norm`` the per-window clip and ``target_epsilon`` the record-level budget).

    ``accountant`` names how ε was computed; ``delta`` is the δ every ε here is stated at.
    ``noise_multiplier`` is the configured z, ``effective_noise_multiplier`` the one the
    released sum really had (after encoding and rounding), ``clip_norm`` the L2 bound on each
    input and ``count_noise`` the noise on the within-clip count (0 when not counted).
    ``inputs`` were summed; the round needed ``min_inputs``. ``epsilon_round`` is ε of this
    round alone, ``epsilon_total`` of every recorded round up to and including it, against
    ``target_epsilon``. ``recorded_at`` is set by the store when ``None``.
    """

    round: int
    unit: str
    accountant: str
    delta: float
    noise_multiplier: float
    effective_noise_multiplier: float
    clip_norm: float
    count_noise: float
    min_inputs: int
    inputs: int
    epsilon_round: float
    epsilon_total: float
    target_epsilon: float
    recorded_at: datetime | None = None
    agent: str = ""


@dataclass(frozen=True, slots=True)
class EventRecord:
    """A notable event, e.g. a rejected message; ``kind`` is the counter label."""

    id: int
    at: datetime
    kind: str
    round: int | None
    agent_id: str | None
    detail: str


@dataclass(frozen=True, slots=True)
class AggregateRecord:
    """A signed per-cloud aggregate for height ``height``, without its delta.

    ``cloud`` sent it; ``base_digest`` is the global model its round started from;
    ``participants`` agents were averaged (0: the cloud's round aborted); ``norm`` is the
    L2 norm of its delta and ``digest`` the SHA-256 (hex) of the signed aggregate message.
    ``received_at`` is set by the store when ``None``.
    """

    height: int
    cloud: str
    base_digest: str
    participants: int
    norm: float
    digest: str
    received_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class VoteRecord:
    """One signed consensus message: ``step`` is one of :data:`CONSENSUS_STEPS`.

    ``voter`` is the signing cloud, ``value`` the digest voted for (:data:`NIL_VALUE` for a
    nil prevote or precommit; a proposal always names a value), ``round`` the consensus
    round within ``height``. ``own`` is true for a vote this coordinator signed;
    ``envelope`` is the signed message exactly as sent or received. ``received_at`` is set
    by the store when ``None``.
    """

    height: int
    round: int
    step: str
    voter: str
    value: str
    own: bool
    envelope: bytes
    received_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """The global model decided at ``height``: ``value`` is its digest, ``certificate`` the
    encoded commit certificate of consensus round ``round`` and ``signers`` the clouds
    whose precommits it holds (kept sorted: any order may be given). ``decided_at`` is set
    by the store when ``None``.
    """

    height: int
    round: int
    value: str
    signers: tuple[str, ...]
    certificate: bytes
    decided_at: datetime | None = None

    def __post_init__(self) -> None:
        if isinstance(self.signers, str):
            raise TypeError(f"signers is a sequence of cloud ids, not the string {self.signers!r}")
        object.__setattr__(self, "signers", tuple(sorted(self.signers)))


@dataclass(frozen=True, slots=True)
class EvidenceRecord:
    """Two conflicting signed messages of ``voter`` for one (``height``, ``round``,
    ``step``): ``first_envelope`` signs ``first_value``, ``second_envelope``
    ``second_value``.

    The pair is kept in canonical order, ``first_value < second_value`` (the constructor
    swaps values and envelopes together if needed), so one equivocation is one record
    whichever message arrived first. ``detected_at`` is set by the store when ``None``;
    ``id`` is assigned by the store.
    """

    voter: str
    height: int
    round: int
    step: str
    first_value: str
    second_value: str
    first_envelope: bytes
    second_envelope: bytes
    detected_at: datetime | None = None
    id: int | None = None

    def __post_init__(self) -> None:
        if (
            isinstance(self.first_value, str)
            and isinstance(self.second_value, str)
            and self.second_value < self.first_value
        ):
            first = (self.first_value, self.first_envelope)
            object.__setattr__(self, "first_value", self.second_value)
            object.__setattr__(self, "first_envelope", self.second_envelope)
            object.__setattr__(self, "second_value", first[0])
            object.__setattr__(self, "second_envelope", first[1])
