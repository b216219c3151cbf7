"""What the agent does with each message from its coordinator (IO-free).

:meth:`AgentRoundLogic.on_message` takes a topic and untrusted bytes and returns what the
driver must do next: adopt a new global model, train for a round, or nothing. Every
refusal is a typed exception; the driver counts and logs it and goes on.
"""

from __future__ import annotations

import msgspec
import nacl.signing
from fedgate_common.consensus.wire import graph_seed_material
from fedgate_common.digests import model_digest
from fedgate_common.envelope import Envelope, decode_payload, open_envelope, verify_envelope
from fedgate_common.errors import (
    EnvelopeMismatch,
    MalformedMessage,
    PlaintextRefused,
    ReplayedMessage,
    WrongRound,
)
from fedgate_common.limits import DEFAULT_LIMITS, Limits
from fedgate_common.messages import (
    GlobalModel,
    KeyRoster,
    RoundEnd,
    RoundStart,
    ShareDelivery,
    SurvivorCheck,
    UnmaskRequest,
)
from fedgate_common.model_spec import ModelSpec
from fedgate_common.topics import model_topic, parse_round_topic

from fedgate_agent.errors import ModelRejected
from fedgate_agent.federation_trust import FederationTrust


class AdoptModel(msgspec.Struct, frozen=True):
    model: GlobalModel
    raw: bytes


class TrainForRound(msgspec.Struct, frozen=True):
    start: RoundStart
    model: GlobalModel
    certificate: bytes  # the base model's commit certificate, as seeds the SecAgg graph


class RoundEnded(msgspec.Struct, frozen=True):
    end: RoundEnd


class SecAggStep(msgspec.Struct, frozen=True):
    """A verified coordinator message for the running secure-aggregation round."""

    message: KeyRoster | ShareDelivery | SurvivorCheck | UnmaskRequest


Action = AdoptModel | TrainForRound | RoundEnded | SecAggStep


class AgentRoundLogic:
    """State: the current model, the last round answered, a start waiting for its model."""

    def __init__(
        self,
        *,
        agent_id: str,
        deployment: str,
        cloud: str,
        coordinator_key: nacl.signing.VerifyKey,
        trust: FederationTrust,
        last_answered_round: int = 0,
        min_model_round: int = 0,
        current_model: GlobalModel | None = None,
        allow_plaintext: bool = False,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.agent_id = agent_id
        self.deployment = deployment
        self.cloud = cloud
        self._coordinator_key = coordinator_key
        self._trust = trust
        self.last_answered_round = last_answered_round
        # The newest round this agent ever adopted (status.json): with its kept models lost,
        # an older certified model replayed on the model topic is still refused.
        self.min_model_round = min_model_round
        self.current_model = current_model
        self.current_certificate = b""
        self.allow_plaintext = allow_plaintext
        self.pending_start: RoundStart | None = None
        self._limits = limits
        self._model_topic = model_topic(deployment, cloud)

    def _open(self, raw: bytes) -> Envelope:
        envelope = open_envelope(raw, self._limits)
        if (envelope.deployment, envelope.cloud, envelope.sender) != (
            self.deployment,
            self.cloud,
            self.cloud,
        ):
            raise EnvelopeMismatch(
                f"message from {envelope.deployment}/{envelope.cloud}/{envelope.sender}, "
                f"expected the coordinator of {self.deployment}/{self.cloud}",
                sender=envelope.sender,
            )
        verify_envelope(envelope, self._coordinator_key)
        return envelope

    def on_message(self, topic: str, raw: bytes) -> Action | None:
        if not raw:
            return None  # a cleared retained message
        if topic == self._model_topic:
            envelope = self._open(raw)
            payload = decode_payload(envelope)
            if not isinstance(payload, GlobalModel):
                raise MalformedMessage(f"{envelope.stage!r} message on the model topic")
            return self._on_model(payload, raw)
        where = parse_round_topic(topic)
        envelope = self._open(raw)
        if (where.round, where.stage) != (envelope.round, envelope.stage):
            raise EnvelopeMismatch(f"envelope header does not match topic {topic!r}")
        if where.agent is not None and where.agent != self.agent_id:
            raise EnvelopeMismatch(f"message for {where.agent!r} reached {self.agent_id!r}")
        payload = decode_payload(envelope)
        if isinstance(payload, RoundStart):
            return self._on_start(payload)
        if isinstance(payload, RoundEnd):
            return RoundEnded(payload)
        if isinstance(payload, ShareDelivery) and where.agent == self.agent_id:
            return SecAggStep(payload)
        if isinstance(payload, KeyRoster | SurvivorCheck | UnmaskRequest) and where.agent is None:
            return SecAggStep(payload)
        raise MalformedMessage(f"unexpected {envelope.stage!r} message on {topic!r}")

    def _on_model(self, model: GlobalModel, raw: bytes) -> Action | None:
        verify_global_model(model)
        self._trust.check_model(model)
        if self.current_model is not None and model.round <= self.current_model.round:
            return None  # the same or an older model (retained redelivery)
        if model.round < self.min_model_round:
            raise ReplayedMessage(
                f"model of round {model.round} is older than round {self.min_model_round}, "
                "the newest this agent adopted (after a coordinator store was restored from "
                "an older backup: fedgate-agent forget-rounds)"
            )
        return AdoptModel(model, raw)

    def adopt(self, model: GlobalModel, raw: bytes) -> TrainForRound | None:
        """Make ``model`` current; returns the round to train if a start was waiting for it.

        ``raw`` is the model's signed message (kept by the driver); the model's commit
        certificate seeds the secure-aggregation neighbour graph.
        """
        self.current_model = model
        self.current_certificate = graph_seed_material(model)
        pending, self.pending_start = self.pending_start, None
        if (
            pending is not None
            and pending.base_digest == model.digest
            and pending.round == model.round + 1  # else refused when it comes again
        ):
            return TrainForRound(pending, model, self.current_certificate)
        return None

    def _on_start(self, start: RoundStart) -> TrainForRound | None:
        if self.agent_id not in start.selected:
            return None
        if start.round == self.last_answered_round:
            return None  # the retained start of the round just answered, seen again
        if start.round < self.last_answered_round:
            raise ReplayedMessage(
                f"round {start.round} announced again; this agent already answered up to "
                f"round {self.last_answered_round}"
            )
        if start.secagg is None and not self.allow_plaintext:
            raise PlaintextRefused(
                f"round {start.round} has no secure aggregation; this agent sends updates only "
                "masked (secagg.plaintext_rounds = refuse)"
            )
        model = self.current_model
        if model is None or model.digest != start.base_digest:
            self.pending_start = start  # its base model is on its way (retained topic)
            return None
        self._check_height(start, model)
        return TrainForRound(start, model, self.current_certificate)

    @staticmethod
    def _check_height(start: RoundStart, model: GlobalModel) -> None:
        """Round r trains on the model decided at height r − 1 and no other: a coordinator
        may not skip round numbers (each would be another try at the neighbour graph)."""
        if start.round != model.round + 1:
            raise WrongRound(
                f"round {start.round} announced on the model of round {model.round}; "
                f"the next round on it is {model.round + 1}"
            )

    def answered(self, round: int) -> None:
        self.last_answered_round = max(self.last_answered_round, round)


def verify_global_model(model: GlobalModel) -> ModelSpec:
    """Recompute the model's digest from its content; the certificate (that the federation
    decided this digest) is checked by :meth:`FederationTrust.check_model`."""
    expected = model_digest(
        parent_digest=model.parent_digest, round=model.round, spec=model.spec, weights=model.weights
    )
    if expected != model.digest:
        raise ModelRejected(f"model of round {model.round}: digest does not match its content")
    return model.spec
