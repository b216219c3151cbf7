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


class RoundStart(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="start"
):
    """Coordinator → agents: train on the model ``base_digest`` and send an update."""

    round: int
    base_digest: str
    selected: tuple[str, ...]
    plan: TrainingPlan
    update_timeout_s: float
    min_participants: int


class ModelUpdate(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="update"
):
    """Agent → coordinator: ``delta`` = locally trained weights minus the base model."""

    round: int
    base_digest: str
    delta: tuple[WireArray, ...]
    num_samples: int
    train_loss: float


class GlobalModel(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="model"
):
    """Coordinator → agents: a global model in the hash chain (round 0 = genesis)."""

    round: int
    digest: str
    parent_digest: str
    spec: ModelSpec
    weights: tuple[WireArray, ...]


RoundOutcome = Literal["completed", "aborted"]


class RoundEnd(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag="end"):
    """Coordinator → agents: how a round ended."""

    round: int
    outcome: RoundOutcome
    reason: str
    participants: tuple[str, ...]
    model_digest: str


Payload = RoundStart | ModelUpdate | GlobalModel | RoundEnd
STAGES: frozenset[str] = frozenset({"start", "update", "model", "end"})
