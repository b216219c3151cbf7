"""`fedgate-agent run`: the driver around :mod:`fedgate_agent.round_logic`.

It owns the broker connection, the state directory and the training thread. Training runs
in a worker thread so the event loop keeps serving the broker while torch works.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections import Counter

import nacl.signing
import numpy as np
import torch
from fedgate_common.arrays import decode_arrays, encode_arrays
from fedgate_common.envelope import seal
from fedgate_common.errors import FedgateError
from fedgate_common.keys import parse_public_key
from fedgate_common.logs import log_event
from fedgate_common.messages import GlobalModel, ModelUpdate
from fedgate_common.topics import (
    coordinator_broadcast_filter,
    model_topic,
    round_topic,
)

from fedgate_agent.config import AgentConfig
from fedgate_agent.errors import TrainingDiverged
from fedgate_agent.model import build_model, weights_of
from fedgate_agent.mqtt_link import InboundMessage, MqttLink
from fedgate_agent.round_logic import (
    AdoptModel,
    AgentRoundLogic,
    RoundEnded,
    TrainForRound,
)
from fedgate_agent.state import (
    load_current_model_message,
    read_status,
    save_model_message,
    write_status,
)
from fedgate_agent.training import LocalDataset, load_local_dataset, train_locally

log = logging.getLogger("fedgate.agent")


class AgentService:
    def __init__(self, *, config: AgentConfig, identity: nacl.signing.SigningKey) -> None:
        self.config = config
        self._identity = identity
        self.status = read_status(config.state_path)
        self.status.agent_id = config.agent_id
        self.status.pid = os.getpid()
        self.logic = AgentRoundLogic(
            agent_id=config.agent_id,
            deployment=config.deployment,
            cloud=config.cloud,
            coordinator_key=parse_public_key(config.coordinator_public_key),
            last_answered_round=self.status.last_answered_round,
        )
        self.link = MqttLink(
            settings=config.broker,
            client_id=f"fedgate-agent-{config.deployment}-{config.cloud}-{config.agent_id}",
            subscriptions=[
                coordinator_broadcast_filter(config.deployment, config.cloud),
                model_topic(config.deployment, config.cloud),
            ],
        )
        self._dataset: LocalDataset | None = None
        self.rejected: Counter[str] = Counter(self.status.rejected)
        self._bytes_up_before = self.status.bytes_up  # cumulative across restarts
        self._restore_model()

    def _fields(self, **extra: object) -> dict[str, object]:
        return {
            "deployment": self.config.deployment,
            "cloud": self.config.cloud,
            "agent": self.config.agent_id,
            **extra,
        }

    def _restore_model(self) -> None:
        """Reload the last model from disk; it is verified like a message from the wire."""
        raw = load_current_model_message(self.config.state_path)
        if raw is None:
            return
        try:
            action = self.logic.on_message(
                model_topic(self.config.deployment, self.config.cloud), raw
            )
        except FedgateError as exc:
            log_event(log, logging.WARNING, "stored model ignored", **self._fields(error=str(exc)))
            return
        if isinstance(action, AdoptModel):
            self.logic.adopt(action.model)

    def _save_status(self, state: str | None = None) -> None:
        if state is not None:
            self.status.state = state
        self.status.rejected = dict(self.rejected)
        self.status.bytes_up = self._bytes_up_before + self.link.bytes_published
        write_status(self.config.state_path, self.status)

    # -- message handling ----------------------------------------------------------------
    async def handle(self, message: InboundMessage) -> None:
        self.status.bytes_down += len(message.payload)
        try:
            action = self.logic.on_message(message.topic, message.payload)
        except FedgateError as exc:
            kind = getattr(exc, "kind", type(exc).__name__)
            self.rejected[kind] += 1
            self.status.last_error = str(exc)
            log_event(
                log,
                logging.WARNING,
                "message rejected",
                **self._fields(kind=kind, topic=message.topic, error=str(exc)),
            )
            self._save_status()
            return
        if isinstance(action, AdoptModel):
            save_model_message(
                self.config.state_path, action.model.round, action.model.digest, action.raw
            )
            self.status.model_round = action.model.round
            self.status.model_digest = action.model.digest
            log_event(
                log,
                logging.INFO,
                "global model stored",
                **self._fields(round=action.model.round, model=action.model.digest[:12]),
            )
            follow_up = self.logic.adopt(action.model)
            self._save_status()
            if follow_up is not None:
                await self.train_and_send(follow_up)
        elif isinstance(action, TrainForRound):
            await self.train_and_send(action)
        elif isinstance(action, RoundEnded):
            log_event(
                log,
                logging.INFO,
                "round ended",
                **self._fields(
                    round=action.end.round,
                    outcome=action.end.outcome,
                    participated=self.config.agent_id in action.end.participants,
                ),
            )

    def _local_dataset(self, model: GlobalModel) -> LocalDataset:
        if self._dataset is None:
            self._dataset = load_local_dataset(self.config.data_path, model.spec)
        return self._dataset

    def _train(self, work: TrainForRound) -> ModelUpdate:
        model_msg = work.model
        base = {
            name: np.asarray(a, dtype=np.float32)
            for name, a in decode_arrays(model_msg.weights).items()
        }
        net = build_model(model_msg.spec, weights=base)
        result = train_locally(
            net, self._local_dataset(model_msg), work.start.plan, seed=self.config.training.seed
        )
        trained = weights_of(net)
        delta = {name: trained[name] - base[name] for name in base}
        if not math.isfinite(result.mean_loss) or not all(
            np.isfinite(d).all() for d in delta.values()
        ):
            raise TrainingDiverged(
                f"round {work.start.round}: training diverged (loss {result.mean_loss}); "
                "the update is not sent"
            )
        return ModelUpdate(
            round=work.start.round,
            base_digest=model_msg.digest,
            delta=encode_arrays(delta),
            num_samples=result.num_samples,
            train_loss=result.mean_loss,
        )

    async def train_and_send(self, work: TrainForRound) -> None:
        number = work.start.round
        log_event(
            log,
            logging.INFO,
            "training",
            **self._fields(
                round=number,
                lr=round(work.start.plan.learning_rate, 6),
                epochs=work.start.plan.local_epochs,
            ),
        )
        self._save_status("training")
        try:
            update = await asyncio.to_thread(self._train, work)
        except FedgateError as exc:  # bad local data, divergence, or a model we cannot use
            self.status.last_error = str(exc)
            log_event(
                log, logging.ERROR, "training failed", **self._fields(round=number, error=str(exc))
            )
            self._save_status("idle")
            return
        # Record the answer before sending: a restart never trains twice for one round.
        self.logic.answered(number)
        self.status.last_answered_round = number
        self._save_status()
        payload = seal(
            update,
            signing_key=self._identity,
            deployment=self.config.deployment,
            cloud=self.config.cloud,
            sender=self.config.agent_id,
        )
        await self.link.publish(
            round_topic(
                self.config.deployment, self.config.cloud, number, "update", self.config.agent_id
            ),
            payload,
        )
        self.status.rounds_trained += 1
        self.status.last_train_loss = update.train_loss
        self.status.last_num_samples = update.num_samples
        log_event(
            log,
            logging.INFO,
            "update sent",
            **self._fields(
                round=number,
                bytes=len(payload),
                samples=update.num_samples,
                train_loss=round(update.train_loss, 5),
            ),
        )
        self._save_status("idle")

    async def run(self) -> None:
        torch.set_num_threads(self.config.training.threads)
        self._save_status("connecting")
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self.link.run())
                await self.link.connected.wait()
                self._save_status("idle")
                while True:
                    await self.handle(await self.link.inbound.get())
        finally:
            self._save_status("stopped")
