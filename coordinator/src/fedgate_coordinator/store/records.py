"""Immutable values that go into and come out of the :class:`~.store.Store`.

Callers never see SQLAlchemy rows: every read returns one of these frozen dataclasses, so a
record can be passed around (or across threads) after its session is closed.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import msgspec
import numpy as np
import numpy.typing as npt
from fedgate_common.arrays import WireArray, decode_arrays, encode_arrays
from fedgate_common.digests import model_digest
from fedgate_common.model_spec import ModelSpec

__all__ = [
    "AgentRecord",
    "AgentStatus",
    "EventRecord",
    "ModelRecord",
    "ModelSummary",
    "ParticipantRecord",
    "RoundRecord",
    "RoundStatus",
]


class AgentStatus(enum.StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"


class RoundStatus(enum.StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    ABORTED = "aborted"


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
    """One training round; the nullable fields are set when it completes or aborts."""

    round: int
    status: RoundStatus
    base_digest: str
    model_digest: str | None
    started_at: datetime
    ended_at: datetime | None
    selected: int
    min_participants: int
    participants: int | None
    abort_reason: str | None
    mean_train_loss: float | None
    bytes_down_per_agent: int | None


@dataclass(frozen=True, slots=True)
class ParticipantRecord:
    """What one agent contributed to a round at one protocol stage (metadata only)."""

    agent_id: str
    num_samples: int
    train_loss: float
    bytes_up: int
    stage: str = "update"
    received_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class EventRecord:
    """A notable event, e.g. a rejected message; ``kind`` is the counter label."""

    id: int
    at: datetime
    kind: str
    round: int | None
    agent_id: str | None
    detail: str
