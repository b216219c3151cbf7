"""`fedgate-coordinator serve`: the driver around the IO-free round logic.

It owns the broker connection, the timers and the store; the decisions live in
:mod:`fedgate_coordinator.rounds` and :mod:`fedgate_coordinator.intake`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Mapping

import msgspec
import nacl.signing
import numpy as np
import numpy.typing as npt
from fedgate_common.digests import GENESIS_PARENT
from fedgate_common.envelope import seal
from fedgate_common.errors import ProtocolError, WrongRound
from fedgate_common.keys import InvalidKey, parse_public_key
from fedgate_common.limits import DEFAULT_LIMITS, Limits
from fedgate_common.logs import log_event
from fedgate_common.messages import GlobalModel, Payload, RoundEnd
from fedgate_common.model_spec import initial_weights
from fedgate_common.topics import agent_inbound_filter, model_topic, round_topic

from fedgate_coordinator.config import CoordinatorConfig
from fedgate_coordinator.intake import open_agent_message
from fedgate_coordinator.mqtt_link import InboundMessage, MqttLink
from fedgate_coordinator.rounds import Contribution, RoundCompleted, RoundInProgress
from fedgate_coordinator.store import ModelRecord, ParticipantRecord, Store

log = logging.getLogger("fedgate.coordinator")

RESTART_REASON = "coordinator restarted while the round was running"
STOP_REASON = "coordinator stopped while the round was running"


class ServeSummary(msgspec.Struct, kw_only=True):
    rounds_completed: int = 0
    rounds_aborted: int = 0
    rejected: dict[str, int] = msgspec.field(default_factory=dict)


def recover_interrupted_rounds(store: Store) -> list[int]:
    """Abort rounds left ``running`` by a crash; their numbers are never reused."""
    interrupted = store.running_rounds()
    for number in interrupted:
        store.abort_round(round=number, reason=RESTART_REASON)
        store.record_event("round_recovered", round=number, detail=RESTART_REASON)
    return interrupted


def ensure_genesis(store: Store, config: CoordinatorConfig) -> ModelRecord:
    """Return the head of the model chain, creating the genesis model on first start."""
    head = store.head_model()
    if head is not None:
        return head
    rng = np.random.default_rng(secrets.randbits(128))
    genesis = ModelRecord.from_weights(
        round=0,
        parent_digest=GENESIS_PARENT,
        spec=config.model,
        weights=initial_weights(config.model, rng),
    )
    store.add_model(genesis)
    return genesis


class CoordinatorService:
    def __init__(
        self,
        *,
        config: CoordinatorConfig,
        store: Store,
        signing_key: nacl.signing.SigningKey,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.config = config
        self.store = store
        self._key = signing_key
        self._limits = limits
        settings = config.broker
        if not settings.client_id:
            settings = msgspec.structs.replace(
                settings, client_id=f"fedgate-coordinator-{config.deployment}-{config.cloud}"
            )
        self.link = MqttLink(
            settings=settings, subscriptions=[agent_inbound_filter(config.deployment, config.cloud)]
        )
        self.current: RoundInProgress | None = None
        self._all_in = asyncio.Event()
        self._agent_keys: dict[str, nacl.signing.VerifyKey] = {}
        self.summary = ServeSummary()

    # -- wire helpers -------------------------------------------------------------------
    def _seal(self, payload: Payload) -> bytes:
        return seal(
            payload,
            signing_key=self._key,
            deployment=self.config.deployment,
            cloud=self.config.cloud,
            sender=self.config.cloud,
        )

    def _fields(self, **extra: object) -> dict[str, object]:
        return {"deployment": self.config.deployment, "cloud": self.config.cloud, **extra}

    def _global_model_message(self, model: ModelRecord) -> bytes:
        return self._seal(
            GlobalModel(
                round=model.round,
                digest=model.digest,
                parent_digest=model.parent_digest,
                spec=model.decode_spec(),
                weights=model.decode_wire_weights(),
            )
        )

    # -- inbound ------------------------------------------------------------------------
    def _agent_key(self, agent_id: str) -> nacl.signing.VerifyKey | None:
        key = self._agent_keys.get(agent_id)
        if key is None:
            record = self.store.get_agent(agent_id)
            if record is None or record.status != "active":
                return None
            try:
                key = parse_public_key(record.public_key)
            except InvalidKey:
                return None
            self._agent_keys[agent_id] = key
        return key

    def handle_inbound(self, message: InboundMessage) -> None:
        """Check one message and give it to the running round; reject and count otherwise."""
        try:
            checked = open_agent_message(
                message.topic,
                message.payload,
                deployment=self.config.deployment,
                cloud=self.config.cloud,
                agent_key=self._agent_key,
                limits=self._limits,
            )
            current = self.current
            if current is None:
                raise WrongRound(
                    f"no round is running (update for round {checked.update.round})",
                    sender=checked.sender,
                )
            current.accept(checked.sender, checked.update, bytes_up=checked.size)
        except ProtocolError as exc:
            self._reject(exc, message.topic)
            return
        self.store.touch_agent(checked.sender)
        log_event(
            log,
            logging.INFO,
            "update accepted",
            **self._fields(
                round=current.round,
                agent=checked.sender,
                bytes=checked.size,
                received=current.received,
                selected=len(current.selected),
            ),
        )
        if current.all_in:
            self._all_in.set()

    def _reject(self, exc: ProtocolError, topic: str) -> None:
        self.summary.rejected[exc.kind] = self.summary.rejected.get(exc.kind, 0) + 1
        current = self.current
        round_number = current.round if current is not None else None
        detail = f"{exc} (topic {topic[:200]})"
        self.store.record_event(exc.kind, detail=detail, round=round_number, agent_id=exc.sender)
        log_event(
            log,
            logging.WARNING,
            "message rejected",
            **self._fields(
                kind=exc.kind, agent=exc.sender or "-", round=round_number, error=str(exc)
            ),
        )

    async def _intake_loop(self) -> None:
        while True:
            message = await self.link.inbound.get()
            self.handle_inbound(message)

    # -- rounds -------------------------------------------------------------------------
    async def _selected_agents(self) -> list[str]:
        """Active enrolled agents; waits until there are at least ``min_participants``."""
        needed = self.config.rounds.min_participants
        while True:
            agents = sorted(a.agent_id for a in self.store.list_agents() if a.status == "active")
            if len(agents) >= needed:
                return agents
            log_event(
                log,
                logging.WARNING,
                "waiting for enrolled agents",
                **self._fields(enrolled=len(agents), needed=needed),
            )
            await asyncio.sleep(5)

    async def run_round(self) -> RoundCompleted | None:
        """Run one round end to end; returns the result when it completed."""
        selected = await self._selected_agents()
        head = self.store.head_model()
        assert head is not None  # ensure_genesis ran before the first round
        number = self.store.next_round_number()
        current = RoundInProgress(
            round=number,
            base_digest=head.digest,
            base_weights=_float32(head.decode_weights()),
            spec=head.decode_spec(),
            selected=selected,
            settings=self.config.rounds,
            limits=self._limits,
        )
        self.store.begin_round(
            round=number,
            base_digest=head.digest,
            selected=len(selected),
            min_participants=self.config.rounds.min_participants,
        )
        self._all_in = asyncio.Event()
        self._agent_keys.clear()  # enrollments and revocations take effect each round
        self.current = current
        start_topic = self._round_topic(number, "start")
        closed = False
        try:
            start = self._seal(current.start_message())
            await self.link.publish(start_topic, start, retain=True)
            log_event(
                log,
                logging.INFO,
                "round started",
                **self._fields(round=number, selected=len(selected), base=head.digest[:12]),
            )
            try:
                await asyncio.wait_for(self._all_in.wait(), self.config.rounds.update_timeout_s)
            except TimeoutError:
                log_event(
                    log,
                    logging.WARNING,
                    "update deadline passed",
                    **self._fields(round=number, received=current.received, selected=len(selected)),
                )
            result = current.close()
            self.current = None
            participants = [_participant(c) for c in result.contributions]
            if isinstance(result, RoundCompleted):
                model = ModelRecord.from_weights(
                    round=number,
                    parent_digest=head.digest,
                    spec=head.decode_spec(),
                    weights=result.weights,
                )
                model_message = self._global_model_message(model)
                end = self._seal(
                    RoundEnd(
                        round=number,
                        outcome="completed",
                        reason="",
                        participants=tuple(p.agent_id for p in participants),
                        model_digest=model.digest,
                    )
                )
                self.store.complete_round(
                    round=number,
                    participants=participants,
                    model=model,
                    mean_train_loss=result.mean_train_loss,
                    bytes_down_per_agent=len(start) + len(model_message) + len(end),
                )
                closed = True
                await self.link.publish(
                    model_topic(self.config.deployment, self.config.cloud),
                    model_message,
                    retain=True,
                )
                self.summary.rounds_completed += 1
                log_event(
                    log,
                    logging.INFO,
                    "round completed",
                    **self._fields(
                        round=number,
                        participants=len(participants),
                        model=model.digest[:12],
                        train_loss=round(result.mean_train_loss, 5),
                    ),
                )
            else:
                end = self._seal(
                    RoundEnd(
                        round=number,
                        outcome="aborted",
                        reason=result.reason,
                        participants=tuple(p.agent_id for p in participants),
                        model_digest="",
                    )
                )
                self.store.abort_round(
                    round=number, reason=result.reason, participants=participants
                )
                closed = True
                self.summary.rounds_aborted += 1
                log_event(
                    log,
                    logging.WARNING,
                    "round aborted",
                    **self._fields(round=number, reason=result.reason),
                )
            await self.link.publish(self._round_topic(number, "end"), end)
            await self.link.publish(start_topic, b"", retain=True)
            return result if isinstance(result, RoundCompleted) else None
        finally:
            self.current = None
            if not closed:
                self.store.abort_round(round=number, reason=STOP_REASON)

    async def _announce_recovered(self, numbers: list[int]) -> None:
        """Tell agents the interrupted rounds ended; clear every start a past run left retained.

        A crash leaves its rounds ``running`` (recovered, announced here); a SIGTERM leaves
        the last round aborted in the store but its start possibly still retained.
        """
        last = self.store.next_round_number() - 1
        for number in sorted(set(numbers) | ({last} if last >= 1 else set())):
            await self.link.publish(self._round_topic(number, "start"), b"", retain=True)
        for number in numbers:
            end = RoundEnd(
                round=number,
                outcome="aborted",
                reason=RESTART_REASON,
                participants=(),
                model_digest="",
            )
            await self.link.publish(self._round_topic(number, "end"), self._seal(end))

    def _round_topic(self, number: int, stage: str) -> str:
        return round_topic(self.config.deployment, self.config.cloud, number, stage)

    async def run(self, *, max_rounds: int | None = None) -> ServeSummary:
        """Recover, connect, publish the head model, then run rounds until ``max_rounds``."""
        recovered = recover_interrupted_rounds(self.store)
        for number in recovered:
            log_event(
                log,
                logging.WARNING,
                "aborted round interrupted by a restart",
                **self._fields(round=number),
            )
        head = ensure_genesis(self.store, self.config)
        async with asyncio.TaskGroup() as group:
            link_task = group.create_task(self.link.run())
            intake_task = group.create_task(self._intake_loop())
            await self.link.connected.wait()
            await self._announce_recovered(recovered)
            await self.link.publish(
                model_topic(self.config.deployment, self.config.cloud),
                self._global_model_message(head),
                retain=True,
            )
            started = 0
            while max_rounds is None or started < max_rounds:
                started += 1
                await self.run_round()
                if self.config.rounds.pause_between_rounds_s:
                    await asyncio.sleep(self.config.rounds.pause_between_rounds_s)
            intake_task.cancel()
            link_task.cancel()
        return self.summary


def _float32(weights: Mapping[str, npt.NDArray[np.generic]]) -> dict[str, npt.NDArray[np.float32]]:
    return {name: np.asarray(value, dtype=np.float32) for name, value in weights.items()}


def _participant(contribution: Contribution) -> ParticipantRecord:
    return ParticipantRecord(
        agent_id=contribution.agent_id,
        num_samples=contribution.num_samples,
        train_loss=contribution.train_loss,
        bytes_up=contribution.bytes_up,
    )


__all__ = ["CoordinatorService", "ServeSummary", "ensure_genesis", "recover_interrupted_rounds"]
