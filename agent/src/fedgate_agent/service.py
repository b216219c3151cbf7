"""`fedgate-agent run`: the driver around :mod:`fedgate_agent.round_logic`.

It owns the broker connection, the state directory and the training thread. Training runs
in a worker thread so the event loop keeps serving the broker while torch works.

Scoring (``[scoring]``): every global model the agent adopts is exported to ONNX in a child
process (:func:`~fedgate_agent.onnx_export.export_in_subprocess`, waited for by a worker
thread; one export at a time, the newest model wins) and swapped into
:class:`~fedgate_agent.scoring.LiveScorer` by one reference assignment. With a data path, a
task scores the window ending at each grid point of ``[windows]`` and publishes the
prediction, and alert changes, to MQTT.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sqlite3
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import aiomqtt
import msgspec
import nacl.signing
import numpy as np
import numpy.typing as npt
import torch
from fedgate_common.arrays import decode_arrays, encode_arrays
from fedgate_common.envelope import seal
from fedgate_common.errors import FedgateError, MalformedMessage, ReplayedMessage, WrongRound
from fedgate_common.keys import parse_public_key
from fedgate_common.logs import log_event
from fedgate_common.messages import (
    GlobalModel,
    KeyRoster,
    ModelUpdate,
    Payload,
    RecordPrivacyReport,
    ShareDelivery,
    SurvivorCheck,
)
from fedgate_common.model_spec import flatten_parameters, parameter_count
from fedgate_common.secagg.participant import Participant
from fedgate_common.tasks import BackgroundTasks
from fedgate_common.topics import (
    coordinator_broadcast_filter,
    coordinator_direct_filter,
    model_topic,
    round_topic,
)

from fedgate_agent.config import AgentConfig
from fedgate_agent.data_path import DataPath
from fedgate_agent.data_settings import window_spec
from fedgate_agent.errors import (
    ConfigError,
    PlanRejected,
    PrivacyBudgetExhausted,
    SiteBudgetExhausted,
    StillTraining,
    TrainingDiverged,
)
from fedgate_agent.federation_trust import load_trust, read_pinned
from fedgate_agent.ingest.errors import IngestError
from fedgate_agent.ingest.windows import WindowSpec
from fedgate_agent.model import build_model, weights_of
from fedgate_agent.mqtt_link import InboundMessage, MqttLink
from fedgate_agent.onnx_export import (
    ExportedModel,
    export_in_subprocess,
    onnx_path,
    parity_windows,
    save_exported_model,
)
from fedgate_agent.pooled_noise import pooled_round
from fedgate_agent.privacy_ledger import (
    LedgerEntry,
    LedgerUnwritable,
    PrivacyLedger,
    SigmaPlan,
    check_not_behind,
    read_ledger,
    write_ledger,
)
from fedgate_agent.record_privacy import (
    MAX_PLANNED_STEPS,
    MAX_STEPS_PER_ROUND,
    SEEDED_DP_WARNING,
    RecordPrivacySettings,
    RoundSpend,
    accountant_name,
    as_accountant,
    epsilon,
    noise_multiplier_for,
    sample_rate,
    steps_per_round,
)
from fedgate_agent.round_logic import (
    AdoptModel,
    AgentRoundLogic,
    RoundEnded,
    SecAggStep,
    TrainForRound,
)
from fedgate_agent.scoring import (
    AlertRule,
    AlertTracker,
    LiveScorer,
    Prediction,
    ScoringModel,
    alerts_topic,
    latest_grid_point,
    load_scoring_model,
    predictions_topic,
    window_ending_at,
)
from fedgate_agent.site_privacy import (
    NEGLIGIBLE_NOISE,
    SiteBudget,
    SiteLedgerEntry,
    effective_multiplier,
    plan_site_round,
)
from fedgate_agent.state import (
    ScoringStatus,
    read_pinned_peers,
    read_status,
    save_model_message,
    stored_model_messages,
    write_pinned_peers,
    write_status,
)
from fedgate_agent.training import LocalDataset, check_plan, load_local_dataset, train_locally

if TYPE_CHECKING:
    from fedgate_agent.private_training import PrivateTrainResult

log = logging.getLogger("fedgate.agent")


def round_seed(seed: int | None, round: int) -> int | None:
    """The training seed of one round: ``training.seed`` mixed with the round number, so a
    seeded agent is reproducible yet does not replay the same batches (and, with DP, the
    same noise) every round. ``None`` (production) stays ``None``: fresh OS randomness."""
    return None if seed is None else (seed * 1_000_003 + round) % 2**63


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
            trust=load_trust(config.state_path, config.manifest_digest),
            last_answered_round=self.status.last_answered_round,
            min_model_round=self.status.model_round or 0,
            allow_plaintext=config.secagg.plaintext_rounds == "allow",
        )
        self.link = MqttLink(
            settings=config.broker,
            client_id=f"fedgate-agent-{config.deployment}-{config.cloud}-{config.agent_id}",
            subscriptions=[
                coordinator_broadcast_filter(config.deployment, config.cloud),
                coordinator_direct_filter(config.deployment, config.cloud, config.agent_id),
                model_topic(config.deployment, config.cloud),
            ],
        )
        self._dataset: LocalDataset | None = None
        # Live data: the buffer and its sources (None: training reads the .npz file only).
        self.data_path = (
            DataPath(config)
            if config.training.source == "buffer" or config.mqtt_source or config.opcua_source
            else None
        )
        self.secure: Participant | None = None  # this round's secure-aggregation state
        self._secure_work: TrainForRound | None = None  # the round ``secure`` belongs to
        # This round's flattened update, its windows, and the record-level privacy report
        # to send with it, until the shares are delivered and it can be masked.
        self._masked_update: (
            tuple[npt.NDArray[np.float64], int, RecordPrivacyReport | None] | None
        ) = None
        # Pooled noise: the round's record-level spend, booked when its masked input leaves
        # (_send_masked) rather than after training; set by _train (a worker thread).
        self._unbooked: tuple[RoundSpend, PrivateTrainResult] | None = None
        self._training: asyncio.Task[None] | None = None
        self._stopping_cleanly = False
        # privacy.json is read, checked and rewritten in worker threads: one at a time.
        self._ledger_lock = threading.Lock()
        privacy = config.privacy
        self._record_privacy = (
            RecordPrivacySettings(
                target_epsilon=privacy.target_epsilon,
                delta=privacy.delta,
                max_grad_norm=privacy.max_grad_norm,
                planned_rounds=privacy.planned_rounds,
                accountant=as_accountant(privacy.accountant),
            )
            if privacy.record_level == "on"
            else None
        )
        self._pending_spend: RoundSpend | None = None
        # Pooled record-level noise: one clipped step a round, noised by the secure sum.
        self._pooled = self._record_privacy is not None and privacy.record_noise == "pooled"
        self._site_budget = SiteBudget(
            max_epsilon=privacy.site_max_epsilon,
            delta=privacy.delta,
            accountant=as_accountant(privacy.accountant),
            assumed_colluders=config.secagg.assumed_colluders,
        )
        self.status.site_privacy_budget = privacy.site_max_epsilon
        if self._record_privacy is not None:
            # Exhausted stays exhausted across a restart unless the budget was raised or δ
            # changed; then "on" until the next round is trained or refused.
            before = self.status
            still_spent = (
                before.privacy == "budget exhausted"
                and before.privacy_budget is not None
                and privacy.target_epsilon <= before.privacy_budget
                and before.privacy_delta == privacy.delta
            )
            self.status.privacy_budget = privacy.target_epsilon
            self.status.privacy_delta = privacy.delta
            self.status.privacy = "budget exhausted" if still_spent else "on"
        else:
            self.status.privacy = "off"
        self.rejected: Counter[str] = Counter(self.status.rejected)
        self._bytes_up_before = self.status.bytes_up  # cumulative across restarts
        self._status_unwritable = False  # the last status.json write failed (logged once)
        self._init_scoring()
        self._restore_model()

    def _fields(self, **extra: object) -> dict[str, object]:
        return {
            "deployment": self.config.deployment,
            "cloud": self.config.cloud,
            "agent": self.config.agent_id,
            **extra,
        }

    def _restore_model(self) -> None:
        """Reload the newest kept model that verifies like a message from the wire: the
        newest numbered copy (``current.fgm`` can lag it when the disk filled between the
        two writes), or an older one, or ``current.fgm``, when the newer are damaged."""
        topic = model_topic(self.config.deployment, self.config.cloud)
        for name, raw in stored_model_messages(self.config.state_path):
            try:
                if not raw:
                    raise MalformedMessage("the file is empty")
                action = self.logic.on_message(topic, raw)  # verifies; adopts nothing yet
            except FedgateError as exc:
                log_event(
                    log,
                    logging.WARNING,
                    "stored model ignored",
                    **self._fields(file=name, error=str(exc)),
                )
                continue
            if isinstance(action, AdoptModel):  # the newest that verifies
                self.logic.adopt(action.model, raw)
                self.status.model_round = action.model.round
                self.status.model_digest = action.model.digest
                return

    def _save_status(self, state: str | None = None) -> None:
        if state is not None:
            self.status.state = state
        self.status.rejected = dict(self.rejected)
        if self.data_path is not None:
            self.status.ingest = self.data_path.status
        self.status.bytes_up = self._bytes_up_before + self.link.bytes_published
        try:
            write_status(self.config.state_path, self.status)
        except OSError as exc:  # a full disk: the agent goes on; `status` shows it stale
            if not self._status_unwritable:
                log_event(log, logging.ERROR, "status not written", **self._fields(error=str(exc)))
            self._status_unwritable = True
        else:
            self._status_unwritable = False

    # -- message handling ----------------------------------------------------------------
    def _count_rejection(self, exc: FedgateError, what: str, **fields: object) -> None:
        kind = getattr(exc, "kind", type(exc).__name__)
        self.rejected[kind] += 1
        self.status.last_error = str(exc)
        log_event(log, logging.WARNING, what, **self._fields(kind=kind, error=str(exc), **fields))
        self._save_status()

    async def handle(self, message: InboundMessage) -> None:
        self.status.bytes_down += len(message.payload)
        try:
            action = self.logic.on_message(message.topic, message.payload)
        except FedgateError as exc:
            self._count_rejection(exc, "message rejected", topic=message.topic)
            return
        if isinstance(action, AdoptModel):
            try:
                save_model_message(
                    self.config.state_path, action.model.round, action.model.digest, action.raw
                )
            except OSError as exc:  # a full disk: use the model from memory, say so
                self.status.last_error = f"model of round {action.model.round} not saved: {exc}"
                log_event(
                    log,
                    logging.ERROR,
                    "global model not saved; used from memory",
                    **self._fields(round=action.model.round, error=str(exc)),
                )
            self.status.model_round = action.model.round
            self.status.model_digest = action.model.digest
            log_event(
                log,
                logging.INFO,
                "global model stored",
                **self._fields(round=action.model.round, model=action.model.digest[:12]),
            )
            follow_up = self.logic.adopt(action.model, action.raw)
            self._request_export(action.model)
            self._save_status()
            if follow_up is not None:
                await self.begin_round(follow_up)
        elif isinstance(action, TrainForRound):
            await self.begin_round(action)
        elif isinstance(action, SecAggStep):
            await self.secure_step(action)
        elif isinstance(action, RoundEnded):
            if self.secure is not None and self.secure.round == action.end.round:
                self.secure, self._masked_update = None, None  # secrets of the round go
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

    async def _send(self, payload: Payload, agent_topic_stage: str) -> int:
        raw = seal(
            payload,
            signing_key=self._identity,
            deployment=self.config.deployment,
            cloud=self.config.cloud,
            sender=self.config.agent_id,
        )
        await self.link.publish(
            round_topic(
                self.config.deployment,
                self.config.cloud,
                payload.round,
                agent_topic_stage,
                self.config.agent_id,
            ),
            raw,
        )
        return len(raw)

    def _privacy_spend(self, work: TrainForRound) -> RoundSpend | None:
        """The DP-SGD spend of training this round, refused past the budget (None: DP off)."""
        settings = self._record_privacy
        if settings is None:
            return None
        plan = work.start.plan
        check_plan(plan)  # a plan σ cannot be planned for is refused, not a crash
        dataset = self._local_dataset(work.model)
        with self._ledger_lock:
            ledger = self._read_ledger()
        if settings.delta >= 1 / max(len(dataset), 1):
            log_event(
                log,
                logging.WARNING,
                "delta not below 1/n",
                **self._fields(delta=settings.delta, windows=len(dataset)),
            )
        if self._pooled:
            spend = pooled_round(
                work.start.secagg,
                plan,
                windows=len(dataset),
                max_grad_norm=settings.max_grad_norm,
                dimension=parameter_count(work.model.spec),
                assumed_colluders=self.config.secagg.assumed_colluders,
            ).spend(work.start.round)
            return self._within_budget(settings, ledger, spend)
        rate = sample_rate(len(dataset), plan.batch_size)
        steps = steps_per_round(len(dataset), plan.batch_size, plan.local_epochs)
        if steps > MAX_STEPS_PER_ROUND:
            raise PlanRejected(
                f"the plan takes {steps} DP-SGD steps per round ({plan.local_epochs} epoch(s) "
                f"of {len(dataset)} windows in batches of {plan.batch_size}); at most "
                f"{MAX_STEPS_PER_ROUND} are accepted with record-level DP"
            )
        if ledger.noise_multiplier is None and steps * settings.planned_rounds > MAX_PLANNED_STEPS:
            raise PlanRejected(
                f"sizing σ for {settings.planned_rounds} rounds of {steps} DP-SGD steps "
                f"({steps * settings.planned_rounds} in all) would take minutes; at most "
                f"{MAX_PLANNED_STEPS} are planned for: lower privacy.planned_rounds, or ask for "
                "a larger batch_size or fewer local_epochs"
            )
        sigma = ledger.noise_multiplier or noise_multiplier_for(
            settings, sample_rate=rate, steps=steps
        )
        spend = RoundSpend(
            round=work.start.round, noise_multiplier=sigma, sample_rate=rate, steps=steps
        )
        return self._within_budget(settings, ledger, spend)

    def _within_budget(
        self, settings: RecordPrivacySettings, ledger: PrivacyLedger, spend: RoundSpend
    ) -> RoundSpend:
        """``spend``, or :class:`PrivacyBudgetExhausted` when it takes ε past the budget
        (pooled rounds counted with the colluders assumed now)."""
        history = ledger.counted(self.config.secagg.assumed_colluders)
        after = epsilon([*history, spend], settings.delta, accountant=settings.accountant)
        if after > settings.target_epsilon:
            raise PrivacyBudgetExhausted(
                f"round {spend.round} would take record-level ε from "
                f"{ledger.epsilon_total:.3f} to {after:.3f}, past the budget "
                f"{settings.target_epsilon} (δ = {settings.delta}); this agent trains no more",
                spent=ledger.epsilon_total,
                next_round=after,
            )
        return spend

    def _record_spend(
        self, spend: RoundSpend, trained: PrivateTrainResult
    ) -> RecordPrivacyReport | None:
        """Add the round to privacy.json before its update leaves the gateway; return the
        report for the coordinator's ledger (``None`` with ``privacy.report_epsilon = "off"``)."""
        settings = self._record_privacy
        assert settings is not None
        with self._ledger_lock:
            return self._add_to_ledger(settings, spend, trained)

    def _read_ledger(self) -> PrivacyLedger:
        """privacy.json, refused when it holds less than this agent last reported."""
        ledger = read_ledger(self.config.state_path)
        check_not_behind(ledger, self.status, self.config.state_path)
        return ledger

    def _add_to_ledger(
        self, settings: RecordPrivacySettings, spend: RoundSpend, trained: PrivateTrainResult
    ) -> RecordPrivacyReport | None:
        ledger = self._read_ledger()
        if self._pooled:  # the noise is the secure sum's, as counted before training
            actual = msgspec.structs.replace(
                spend, sample_rate=trained.sample_rate, steps=trained.steps
            )
        else:
            actual = RoundSpend(
                round=spend.round,
                noise_multiplier=trained.noise_multiplier,
                sample_rate=trained.sample_rate,
                steps=trained.steps,
            )
            if ledger.noise_multiplier is None:  # σ is fixed now: keep what it was sized for
                ledger.sized_for = SigmaPlan(
                    rounds=settings.planned_rounds,
                    steps=spend.steps,
                    sample_rate=spend.sample_rate,
                )
            ledger.noise_multiplier = trained.noise_multiplier
        entry = LedgerEntry(
            spend=actual,
            epsilon_round=epsilon([actual], settings.delta, accountant=settings.accountant),
            epsilon_total=epsilon(
                [*ledger.counted(self.config.secagg.assumed_colluders), actual],
                settings.delta,
                accountant=settings.accountant,
            ),
            delta=settings.delta,
            max_grad_norm=settings.max_grad_norm,
            num_samples=trained.result.num_samples,
            accountant=accountant_name(settings.accountant),
        )
        ledger.entries.append(entry)
        write_ledger(self.config.state_path, ledger)
        self.status.privacy_epsilon = ledger.epsilon_total
        self.status.privacy_rounds = len(ledger.entries)
        if self.config.privacy.report_epsilon != "on":
            return None
        return RecordPrivacyReport(
            epsilon_round=entry.epsilon_round,
            epsilon_total=entry.epsilon_total,
            target_epsilon=settings.target_epsilon,
            delta=settings.delta,
            noise_multiplier=actual.noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            accountant=entry.accountant,
        )

    def _plan_site_round(self, work: TrainForRound) -> None:
        """Refuse a noisy round past this agent's own site-level budget (no-op when it is
        not counted at site level, :meth:`_counted_at_site_level`: the ledger is not even
        read); read-only."""
        if not self._counted_at_site_level(work):
            return
        with self._ledger_lock:
            ledger = self._read_ledger()
        self._site_entry(ledger, work)

    def _counted_at_site_level(self, work: TrainForRound) -> bool:
        """Whether a round's noise is counted against ``privacy.site_max_epsilon``: every
        noisy round with local record-level noise; with pooled noise only a round whose
        site-level multiplier is not negligible (its coordinator runs site-level DP too).
        Pooled-only shares are sized for one window; one round of them alone would cost a
        site-level ε past any budget, so they carry no site-level guarantee to count."""
        secagg = work.start.secagg
        if secagg is None or secagg.noise is None:
            return False
        if not self._pooled:
            return True
        multiplier = effective_multiplier(
            secagg,
            parameter_count(work.model.spec),
            self.config.secagg.assumed_colluders,
        )
        return multiplier >= NEGLIGIBLE_NOISE

    def _site_entry(self, ledger: PrivacyLedger, work: TrainForRound) -> SiteLedgerEntry | None:
        secagg = work.start.secagg
        if secagg is None:
            return None
        return plan_site_round(
            ledger.site_entries,
            round=work.start.round,
            base_digest=work.start.base_digest,
            params=secagg,
            spec=work.model.spec,
            budget=self._site_budget,
        )

    def _book_site_round(self, work: TrainForRound) -> None:
        """Add a noisy round to privacy.json before its masked input leaves (planned again
        from the ledger as it is now; refused past the budget)."""
        if not self._counted_at_site_level(work):
            return
        with self._ledger_lock:
            ledger = self._read_ledger()
            entry = self._site_entry(ledger, work)
            if entry is None:
                return
            ledger.site_entries.append(entry)
            write_ledger(self.config.state_path, ledger)
        self.status.site_privacy = "on"
        self.status.site_privacy_epsilon = entry.epsilon_total
        self.status.site_privacy_rounds = len(ledger.site_entries)

    async def _refresh_windows(self, model: GlobalModel) -> None:
        """With ``training.source = "buffer"``, cut this round's windows from the buffer as it
        is now (live data keeps arriving between rounds), in a worker thread."""
        data_path = self.data_path
        if data_path is None or self.config.training.source != "buffer":
            return
        self._dataset = await asyncio.to_thread(data_path.training_dataset, model.spec)

    async def begin_round(self, work: TrainForRound) -> None:
        """Join the round: with secure aggregation advertise keys first, then train."""
        number = work.start.round
        if self._training is not None and not self._training.done():
            # The coordinator moved on while this agent trains for the round before; that
            # round's update is void, but its training still ends (and books its spend) in a
            # worker thread. Joining now would draw on the budget twice at once.
            self.logic.answered(number)
            self.status.last_answered_round = number
            busy = StillTraining(f"round {number} started while an earlier round still trains")
            self._count_rejection(busy, "round not joined", round=number)
            return
        try:
            await self._refresh_windows(work.model)
            # In a worker thread: the first DP round searches σ (about a second with the
            # PLD accountant), and the loop must keep serving MQTT meanwhile.
            spend = await asyncio.to_thread(self._privacy_spend, work)
        except FedgateError as exc:  # budget spent, ledger unreadable, or no usable data
            self.logic.answered(number)
            self.status.last_answered_round = number
            if isinstance(exc, PrivacyBudgetExhausted):
                self.status.privacy = "budget exhausted"
            self._count_rejection(exc, "round not joined", round=number)
            return
        self._pending_spend = spend
        if work.start.secagg is not None:
            try:
                participant = Participant(
                    agent_id=self.config.agent_id,
                    deployment=self.config.deployment,
                    cloud=self.config.cloud,
                    start=work.start,
                    base_certificate=work.certificate,
                    pinned_identities=read_pinned_peers(self.config.state_path),
                    min_threshold=self.config.secagg.min_threshold,
                    min_noise_multiplier=self.config.privacy.site_min_noise_multiplier,
                    assumed_colluders=self.config.secagg.assumed_colluders,
                )
                await asyncio.to_thread(self._plan_site_round, work)
            except FedgateError as exc:
                self.logic.answered(number)  # refused for good: a restart does not retry
                self.status.last_answered_round = number
                if isinstance(exc, SiteBudgetExhausted):
                    self.status.site_privacy = "budget exhausted"
                self._count_rejection(exc, "secure aggregation refused", round=number)
                return
            self._secure_work = work
            self.secure, self._masked_update = participant, None
            await self._send(participant.advertise_keys(), "keys")
        # Record the answer before training: a restart never joins one round twice.
        self.logic.answered(number)
        self.status.last_answered_round = number
        self._save_status()
        self._training = asyncio.create_task(self.train_and_send(work))

    async def secure_step(self, step: SecAggStep) -> None:
        participant = self.secure
        message = step.message
        if participant is None or participant.round != message.round:
            return  # a round this agent is not in, or has left after a refusal
        try:
            if isinstance(message, KeyRoster):
                bundle = participant.on_roster(message)
                write_pinned_peers(self.config.state_path, participant.pinned_identities)
                await self._send(bundle, "shares")
            elif isinstance(message, ShareDelivery):
                participant.on_delivery(message)
                await self._send_masked()
            elif isinstance(message, SurvivorCheck):
                await self._send(participant.on_check(message), "confirm")
            else:
                reveal = participant.on_unmask(message)
                self.secure = None  # nothing more to send for this round
                await self._send(reveal, "reveal")
        except (WrongRound, ReplayedMessage) as exc:  # e.g. a QoS 1 redelivery: keep going
            self._count_rejection(exc, "message ignored", round=message.round)
            return
        except FedgateError as exc:
            self.secure, self._masked_update = None, None  # refuse: reveal nothing more
            self._count_rejection(
                exc, "secure aggregation refused", round=message.round, stage=type(message).__name__
            )
            return
        log_event(
            log,
            logging.DEBUG,
            "secure aggregation step",
            **self._fields(round=message.round, stage=type(message).__name__),
        )

    async def _send_masked(self) -> None:
        """Send the masked input once training is done and the shares are delivered."""
        participant, pending = self.secure, self._masked_update
        if participant is None or pending is None or not participant.ready_to_mask:
            return
        self._masked_update = None  # taken: a second caller while this one books finds none
        flat, num_samples, report = pending
        unbooked, self._unbooked = self._unbooked, None
        work = self._secure_work
        try:
            # Masked first: a round whose masks cannot be made (a peer's unusable key) is
            # refused before its noise is booked against the budget.
            masked = participant.mask_input(participant.encode(flat, num_samples))
            if work is None or work.start.round != participant.round:
                # Fail closed: a masked input leaves only after its round is booked.
                raise LedgerUnwritable(f"round {participant.round} has no start to book it by")
            if self._pooled:
                if unbooked is None or unbooked[0].round != participant.round:
                    raise LedgerUnwritable(
                        f"round {participant.round}: its pooled record-level spend is missing"
                    )
                report = await asyncio.to_thread(self._record_spend, *unbooked)
            await asyncio.to_thread(self._book_site_round, work)
        except FedgateError as exc:  # past the budget after all, the ledger is gone, or no mask
            self.secure = None
            if isinstance(exc, SiteBudgetExhausted):
                self.status.site_privacy = "budget exhausted"
            self._count_rejection(exc, "secure aggregation refused", round=participant.round)
            return
        self._save_status()  # the count, for the rollback check (privacy_ledger)
        if self.secure is not participant:
            return  # the round was left, or the next one began, while it was booked
        if report is not None:
            masked = msgspec.structs.replace(masked, record_privacy=report)
        size = await self._send(masked, "masked")
        log_event(
            log,
            logging.INFO,
            "masked update sent",
            **self._fields(round=participant.round, bytes=size, words=masked.words.shape[0]),
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
        seed = round_seed(self.config.training.seed, work.start.round)
        spend, settings = self._pending_spend, self._record_privacy
        report = None
        if spend is not None and settings is not None:
            # Here, not at the top: an agent without record-level DP never loads Opacus.
            from fedgate_agent.private_training import train_locally_private

            private = train_locally_private(
                net,
                self._local_dataset(model_msg),
                work.start.plan,
                # Pooled: no noise here; the masked input carries this agent's share.
                noise_multiplier=0.0 if self._pooled else spend.noise_multiplier,
                max_grad_norm=settings.max_grad_norm,
                seed=seed,
                one_step=self._pooled,
            )
            if self._pooled:
                # Booked when the masked input leaves (_send_masked): the update carries no
                # noise of its own, and a round that ends before (keys or shares stage)
                # released nothing of it. Local noise is booked now, before the update exists.
                self._unbooked = (spend, private)
            else:
                report = self._record_spend(spend, private)
            result = private.result
            exact = private.step
        else:
            result = train_locally(net, self._local_dataset(model_msg), work.start.plan, seed=seed)
            exact = None
        # Pooled noise: the step itself, not (stepped − base) weights, whose float32 rounding
        # depends on the weights and would move the update by more than one window may.
        delta: dict[str, npt.NDArray[np.floating[Any]]] = (
            dict(exact)
            if exact is not None
            else {name: value - base[name] for name, value in weights_of(net).items()}
        )
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
            record_privacy=report,
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
                secure=work.start.secagg is not None,
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
        self.status.rounds_trained += 1
        self.status.last_train_loss = update.train_loss
        self.status.last_num_samples = update.num_samples
        if work.start.secagg is not None:
            if self.secure is None or self.secure.round != number:
                self._save_status("idle")
                return  # the round was left (refusal or its end) while training
            # float64 as it came (the pooled step), float32 otherwise: encoding starts from it
            delta = {
                name: np.asarray(value, dtype=np.float64)
                for name, value in decode_arrays(update.delta).items()
            }
            self._masked_update = (
                flatten_parameters(delta, work.model.spec),
                update.num_samples,
                update.record_privacy,
            )
            await self._send_masked()
        else:
            size = await self._send(update, "update")
            log_event(
                log,
                logging.INFO,
                "update sent",
                **self._fields(
                    round=number,
                    bytes=size,
                    samples=update.num_samples,
                    train_loss=round(update.train_loss, 5),
                ),
            )
        self._save_status("idle")

    # -- scoring -------------------------------------------------------------------------
    def _init_scoring(self) -> None:
        scoring = self.config.scoring
        self.scorer = LiveScorer()
        # "auto": on when a data path exists (live windows to score), else off
        self._export_on = scoring.enabled == "on" or (
            scoring.enabled == "auto" and self.data_path is not None
        )
        self._export_wanted: GlobalModel | None = None
        self._export_signal = asyncio.Event()
        self._alerts = AlertTracker(
            AlertRule(
                threshold=scoring.alert_threshold,
                classes=frozenset(int(c) for c in scoring.alert_classes),
            ),
            raise_after=scoring.alert_raise_after,
            clear_after=scoring.alert_clear_after,
        )
        config = self.config
        self._predictions_topic = scoring.topic or predictions_topic(
            config.deployment, config.cloud, config.agent_id
        )
        self._alerts_topic = scoring.alert_topic or alerts_topic(
            config.deployment, config.cloud, config.agent_id
        )
        self._live_spec = self._live_window_spec() if self._export_on else None
        self.status.scoring = ScoringStatus(
            state="waiting for a model" if self._export_on else "off",
            live=self._live_spec is not None,
        )

    def _live_window_spec(self) -> WindowSpec | None:
        """The live windows to score, or None without a data path.

        ``enabled = "on"`` turns a [windows] that does not fit the model into a
        :class:`ConfigError` at start; ``"auto"`` logs it and scores nothing live.
        """
        if self.data_path is None:
            if self.config.scoring.enabled == "on":
                log_event(
                    log,
                    logging.INFO,
                    "scoring on but no data path: models are exported, no live windows scored",
                    **self._fields(),
                )
            return None
        signed = read_pinned(self.config.state_path)
        if signed is None:  # load_trust has refused to start already; kept for clarity
            return None
        try:
            return window_spec(self.config, signed.manifest.model_spec)
        except (ConfigError, IngestError) as exc:
            if self.config.scoring.enabled == "on":
                raise ConfigError(
                    f'scoring.enabled = "on" but live windows cannot be cut: {exc}'
                ) from None
            log_event(
                log,
                logging.WARNING,
                "live scoring off: [windows] does not fit the model",
                **self._fields(error=str(exc)),
            )
            return None

    def _request_export(self, model: GlobalModel) -> None:
        """Export ``model`` for scoring soon (a newer request replaces a waiting one)."""
        if not self._export_on:
            return
        self._export_wanted = model
        self._export_signal.set()

    def _resume_scoring_model(self) -> None:
        """At start: reuse ``models/current.onnx`` if it is the current model's, else export."""
        current = self.logic.current_model
        if not self._export_on or current is None:
            return
        try:
            stored = load_scoring_model(onnx_path(self.config.state_path), require_digest=True)
        except FedgateError:
            stored = None  # absent, damaged or unusable: exported again below
        if stored is not None and stored.model_digest == current.digest:
            self._put_in_use(stored, export_seconds=None)
            return
        self._request_export(current)

    def _export(self, model: GlobalModel) -> tuple[ExportedModel, ScoringModel]:
        """Export, check parity, write ``current.onnx`` and load it (worker thread)."""
        weights = {
            name: np.asarray(a, dtype=np.float32)
            for name, a in decode_arrays(model.weights).items()
        }
        dataset = self._dataset
        real = dataset.x if dataset is not None and len(dataset) else None
        exported = export_in_subprocess(
            model.spec,
            weights,
            digest=model.digest,
            round=model.round,
            windows=parity_windows(model.spec, real),
            threads=self.config.training.threads,
        )
        try:
            save_exported_model(self.config.state_path, exported)
        except OSError as exc:  # disk full, permissions: score from memory, say so
            log_event(log, logging.ERROR, "ONNX model not saved", **self._fields(error=str(exc)))
        return exported, ScoringModel.from_onnx(exported.onnx)

    async def _export_loop(self) -> None:
        while True:
            await self._export_signal.wait()
            self._export_signal.clear()
            model, self._export_wanted = self._export_wanted, None
            if model is None:
                continue
            if self.scorer.model is None:
                self.status.scoring.state = "exporting"
            try:
                exported, loaded = await asyncio.to_thread(self._export, model)
            except Exception as exc:  # no export failure may end the agent: it scores on
                self._scoring_error(exc, "model export failed", round=model.round)
                if self.scorer.model is None:
                    self.status.scoring.state = "waiting for a model"
                self._save_status()
                continue
            self.status.scoring.exports += 1
            log_event(
                log,
                logging.INFO,
                "model exported to ONNX",
                **self._fields(
                    round=model.round,
                    model=model.digest[:12],
                    opset=exported.opset,
                    parity_max_abs_diff=f"{exported.parity_max_abs_diff:.3g}",
                    parity_windows=exported.parity_windows,
                    seconds=round(exported.seconds, 2),
                ),
            )
            self._put_in_use(loaded, export_seconds=exported.seconds)
            self._save_status()

    def _put_in_use(self, model: ScoringModel, *, export_seconds: float | None) -> None:
        previous = self.scorer.swap(model)  # the swap: one reference assignment
        status = self.status.scoring
        if previous is not None:
            status.swaps += 1
        status.state = "scoring"
        status.model_digest = model.model_digest
        status.model_round = model.model_round
        status.onnx_opset = model.opset
        status.parity_max_abs_diff = model.parity_max_abs_diff
        status.parity_tolerance = model.parity_tolerance
        status.export_seconds = None if export_seconds is None else round(export_seconds, 3)
        log_event(
            log,
            logging.INFO,
            "scoring model in use",
            **self._fields(
                round=model.model_round,
                model=model.model_digest[:12],
                previous=None if previous is None else previous.model_digest[:12],
            ),
        )

    def _scoring_error(self, exc: Exception, what: str, **fields: object) -> None:
        kind = getattr(exc, "kind", type(exc).__name__)
        status = self.status.scoring
        status.errors[kind] = status.errors.get(kind, 0) + 1
        repeated = status.last_error == str(exc)  # e.g. every window: warn once, count all
        status.last_error = str(exc)
        level = logging.DEBUG if repeated else logging.WARNING
        log_event(log, level, what, **self._fields(kind=kind, error=str(exc), **fields))

    def _score_at(self, spec: WindowSpec, end: float) -> Prediction | None:
        """The prediction for the window ending at ``end`` (worker thread); None if incomplete."""
        assert self.data_path is not None
        window = window_ending_at(self.data_path.buffer, spec, end)
        if window is None:
            return None
        return self.scorer.score(
            window[np.newaxis], window_ends=[end], normal_class=self.config.scoring.normal_class
        )[0]

    async def _score_live(self, spec: WindowSpec) -> None:
        """Score the window ending at each grid point once, ``settle_s`` after it."""
        scoring = self.config.scoring
        period = spec.period_s
        last_end: float | None = None
        while True:
            end = latest_grid_point(time.time() - scoring.settle_s, period)
            if end != last_end and self.scorer.model is not None:
                last_end = end
                await self._score_window(spec, end)
            # Next: the configured interval, or the next grid point plus settle_s.
            delay = scoring.interval_s or end + period + scoring.settle_s - time.time()
            await asyncio.sleep(max(delay, 0.001))

    async def _score_window(self, spec: WindowSpec, end: float) -> None:
        status = self.status.scoring
        try:
            prediction = await asyncio.to_thread(self._score_at, spec, end)
        except (FedgateError, sqlite3.Error) as exc:
            self._scoring_error(exc, "scoring failed", window_end=end)
            return
        if prediction is None:
            status.windows_incomplete += 1
            return
        status.windows_scored += 1
        status.last_window_end = end
        status.last_prediction = {
            "predicted_class": prediction.predicted_class,
            "probability": prediction.probability,
            "anomaly_score": prediction.anomaly_score,
            "model_digest": prediction.model_digest,
        }
        await self._publish_scoring(self._predictions_topic, msgspec.json.encode(prediction))
        alert = self._alerts.observe(prediction)
        if alert is None:
            return
        status.alerts_raised = self._alerts.raised
        status.alert_active = self._alerts.active
        log_event(
            log,
            logging.WARNING if self._alerts.active else logging.INFO,
            f"alert {alert.state}",
            **self._fields(
                reasons=",".join(alert.reasons) or "-",
                predicted_class=alert.predicted_class,
                anomaly_score=alert.anomaly_score,
                window_end=end,
                model=alert.model_digest[:12],
            ),
        )
        await self._publish_scoring(self._alerts_topic, msgspec.json.encode(alert), retain=True)
        self._save_status()

    async def _publish_scoring(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish a prediction or alert unless the broker is unreachable (then count it)."""
        if not self.link.connected.is_set():
            self.status.scoring.not_published += 1
            return
        try:
            await self.link.publish(topic, payload, retain=retain)
        except aiomqtt.MqttError as exc:
            self.status.scoring.not_published += 1
            self._scoring_error(exc, "prediction not published", topic=topic)

    async def run(self) -> None:
        torch.set_num_threads(self.config.training.threads)
        self._save_status("connecting")
        if self.config.reproducible_noise:
            log_event(log, logging.WARNING, SEEDED_DP_WARNING, **self._fields())
        try:
            async with BackgroundTasks() as background:
                if self.data_path is not None:
                    background.create_task(self.data_path.run(on_status=self._save_status))
                if self._export_on:
                    self._resume_scoring_model()
                    background.create_task(self._export_loop())
                if self._live_spec is not None:
                    background.create_task(self._score_live(self._live_spec))
                background.create_task(self.link.run())
                await self.link.connected.wait()
                self._save_status("idle")
                while True:
                    await self.handle(await self.link.inbound.get())
        except (asyncio.CancelledError, KeyboardInterrupt):
            self._stopping_cleanly = True  # SIGTERM, SIGINT: the service was asked to stop
            raise
        except BaseException as exc:
            # A crash keeps the state it happened in, so that `status` reports an end
            # without a clean stop (and monitoring sees a crash loop), with the reason.
            self.status.last_error = f"agent failed: {_what_failed(exc)}"
            raise
        finally:
            if self._training is not None:
                self._training.cancel()
            self._save_status("stopped" if self._stopping_cleanly else None)
            if self.data_path is not None:
                self.data_path.close()


def _what_failed(exc: BaseException) -> str:
    """The errors inside ``exc`` (the task group's sub-exceptions, not the group itself)."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_what_failed(inner) for inner in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"
