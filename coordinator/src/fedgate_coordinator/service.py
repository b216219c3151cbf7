"""`fedgate-coordinator serve`: the driver around the IO-free round logic.

It owns the broker connection, the timers and the store; the decisions live in
:mod:`fedgate_coordinator.rounds` and :mod:`fedgate_coordinator.intake`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import msgspec
import nacl.signing
import numpy as np
from fedgate_common import pld_accounting
from fedgate_common.arrays import encode_arrays
from fedgate_common.consensus.manifest import Manifest, SignedManifest
from fedgate_common.consensus.quorum import tolerance_text
from fedgate_common.consensus.wire import graph_seed_material
from fedgate_common.envelope import decode_payload, open_envelope, seal
from fedgate_common.errors import (
    FedgateError,
    GenesisWeightsInvalid,
    ManifestInvalid,
    ProtocolError,
    WrongRound,
)
from fedgate_common.keys import InvalidKey, parse_public_key
from fedgate_common.limits import DEFAULT_LIMITS, Limits
from fedgate_common.logs import log_event
from fedgate_common.messages import (
    COORDINATOR_STAGES,
    Certificate,
    CloudAggregate,
    GlobalModel,
    ModelUpdate,
    Payload,
    RoundEnd,
    RoundStart,
    SecAggParams,
)
from fedgate_common.model_spec import ModelSpec, parameter_count
from fedgate_common.secagg.aggregator import STAGE_ORDER, Aborted, Aggregator, Unmasked
from fedgate_common.secagg.context import start_digest
from fedgate_common.secagg.graph import effective_degree
from fedgate_common.secagg.site_dp import record_bound
from fedgate_common.tasks import BackgroundTasks
from fedgate_common.topics import agent_inbound_filter, model_topic, round_topic

from fedgate_coordinator.aggregation import apply_delta, as_float32
from fedgate_coordinator.config import CoordinatorConfig
from fedgate_coordinator.errors import ConfigError, StoreError
from fedgate_coordinator.federation import DecidedModel, FederationNode, global_model_message
from fedgate_coordinator.genesis import (
    GENESIS_WEIGHTS_NAME,
    federation_genesis,
    installed_genesis_weights,
)
from fedgate_coordinator.intake import open_agent_message
from fedgate_coordinator.mqtt_link import InboundMessage, MqttLink
from fedgate_coordinator.rate_limit import MALFORMED, OVERFLOW, Admission, RateLimiter
from fedgate_coordinator.record_privacy_reports import decrease_detail, record_privacy_entry
from fedgate_coordinator.rounds import (
    Contribution,
    RoundAborted,
    RoundCompleted,
    RoundInProgress,
    RoundResult,
    round_start,
)
from fedgate_coordinator.secure_rounds import input_bound_violation, mean_delta
from fedgate_coordinator.site_privacy import (
    ACCOUNTANT,
    BudgetCheck,
    check_budget,
    check_pooled_budget,
    epsilon,
    federation_size_warning,
    pooled_accountant,
    pooled_count,
    pooled_epsilon,
    pooled_round_sigma,
    round_effective_multiplier,
    round_params,
)
from fedgate_coordinator.store import (
    POOLED_UNIT,
    RECORD_UNIT,
    ModelRecord,
    ParticipantRecord,
    PrivacyLedgerEntry,
    Store,
)

log = logging.getLogger("fedgate.coordinator")

RESTART_REASON = "coordinator restarted while the round was running"
INTAKE_STATUS_NAME = "intake-status.json"
STOP_REASON = "coordinator stopped while the round was running"


class ServeSummary(msgspec.Struct, kw_only=True):
    rounds_completed: int = 0
    rounds_aborted: int = 0
    rejected: dict[str, int] = msgspec.field(default_factory=dict)
    rate_limited: dict[str, int] = msgspec.field(default_factory=dict)  # dropped, per sender
    stopped: str = ""  # why the coordinator stopped scheduling rounds, "" if it did not


def recover_interrupted_rounds(store: Store) -> list[int]:
    """Abort rounds left ``running`` by a crash; their numbers are never reused."""
    interrupted = store.running_rounds()
    for number in interrupted:
        store.abort_round(round=number, reason=RESTART_REASON)
        store.record_event("round_recovered", round=number, detail=RESTART_REASON)
    return interrupted


def refuse_foreign_genesis(genesis: str | None, manifest: Manifest) -> None:
    """A store whose chain starts from another genesis than the federation's belongs to
    another coordinator (a ``database_url`` pointing at the wrong database): ConfigError.
    ``genesis`` None (no chain yet) is fine."""
    if genesis is not None and genesis != manifest.genesis_digest:
        raise ConfigError(
            f"the store holds a model chain grown from genesis {genesis[:16]}..., not this "
            f"federation's genesis {manifest.genesis_digest[:16]}...: it is another "
            "coordinator's store; check database_url in coordinator.toml"
        )


def ensure_genesis(
    store: Store, config: CoordinatorConfig, manifest: Manifest, state_dir: Path
) -> ModelRecord:
    """Return the head of the model chain, creating the genesis model on first start.

    Every cloud derives the same genesis from the manifest's model spec and seed, or, for
    a pre-trained genesis, reads the weights file kept in ``state_dir``; its digest must be
    the one the manifest names. A store whose chain starts from another genesis belongs to
    another coordinator (a ``database_url`` pointing at the wrong database): ConfigError.
    """
    head = store.head_model()
    if head is not None:
        refuse_foreign_genesis(store.history_marks()[0], manifest)
        return head
    if manifest.model_spec != config.model:
        raise ConfigError(
            "the federation manifest's model spec differs from coordinator.toml [model]; "
            "use the manifest's"
        )
    try:
        weights = (
            installed_genesis_weights(state_dir) if manifest.genesis_source == "weights" else None
        )
        genesis = federation_genesis(manifest, weights)
    except (ManifestInvalid, GenesisWeightsInvalid) as exc:
        raise ConfigError(
            f"cannot create the genesis model: {exc}",
            problems=[
                f"cannot create the genesis model: {exc}",
                f"install the federation's genesis weights: fedgate-coordinator federation "
                f"install <manifest> --genesis-weights FILE (kept as {GENESIS_WEIGHTS_NAME})",
            ]
            if manifest.genesis_source == "weights"
            else None,
        ) from None
    store.add_model(genesis)
    return genesis


class CoordinatorService:
    def __init__(
        self,
        *,
        config: CoordinatorConfig,
        store: Store,
        signing_key: nacl.signing.SigningKey,
        manifest: SignedManifest,
        state_dir: Path,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.config = config
        self.manifest = manifest
        self.store = store
        self._key = signing_key
        self._limits = limits
        settings = config.broker
        if not settings.client_id:
            settings = msgspec.structs.replace(
                settings, client_id=f"fedgate-coordinator-{config.deployment}-{config.cloud}"
            )
        self.link = MqttLink(
            settings=settings,
            subscriptions=[agent_inbound_filter(config.deployment, config.cloud)],
            admit=self.admit_topic,
        )
        self.current: RoundInProgress | Aggregator | None = None
        self._all_in = asyncio.Event()
        self._bytes_up: dict[str, int] = {}
        self._bytes_down_per_agent = 0
        self._agent_keys: dict[str, nacl.signing.VerifyKey] = {}
        # Pooled record-level noise: the running count of the released rounds, read from
        # the store at first use and grown as rounds are booked (privacy.md 3.7).
        self._pooled_running: pld_accounting.Running | None = None
        self.rate_limiter = RateLimiter(config.rate_limit)
        self.summary = ServeSummary(rate_limited=self.rate_limiter.dropped)
        self._state_dir = state_dir
        self._intake_status_at = 0.0
        self.federation = FederationNode(
            deployment=config.deployment,
            cloud=config.cloud,
            manifest=manifest,
            signing_key=signing_key,
            store=store,
            own_link=self.link,
            state_dir=state_dir,
            peer_logins=config.federation.peers,
        )

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
        """The model as agents receive it: with its commit certificate from the store."""
        decision = self.store.decision(model.round) if model.round > 0 else None
        certificate = (
            msgspec.msgpack.decode(decision.certificate, type=Certificate)
            if decision is not None
            else None
        )
        return global_model_message(
            model,
            certificate,
            signing_key=self._key,
            deployment=self.config.deployment,
            cloud=self.config.cloud,
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

    def admit_topic(self, topic: str, queue_full: bool = False) -> bool:
        """The rate limit, by topic alone: run by the link on each message as it arrives,
        before it is queued, so a flood is dropped at receive speed (decision 0040). With
        the queue full only a selected agent's expected message gets in."""
        if _published_by_coordinator(topic):
            return False  # our own directed messages (share deliveries) come back to us
        current = self.current
        if current is None:
            self.rate_limiter.start_round(None)
        else:
            self.rate_limiter.start_round(current.round, current.selected)
        now = time.monotonic()
        if self.rate_limiter.admit(topic, now, room=not queue_full) is Admission.DROPPED:
            self._report_rate_limited(now)
            return False
        if self.rate_limiter.pending:  # the tail of a flood, reported when due
            self._report_rate_limited(now)
        return True

    def handle_inbound(self, message: InboundMessage) -> None:
        """Check one admitted message and give it to the running round; reject and count
        otherwise."""
        try:
            checked = open_agent_message(
                message.topic,
                message.payload,
                deployment=self.config.deployment,
                cloud=self.config.cloud,
                agent_key=self._agent_key,
                limits=self._limits,
            )
            # A report no accountant could have written rejects the message before the
            # round sees it; a good one is booked once the round has accepted the message.
            report = record_privacy_entry(checked.sender, checked.payload)
            current = self.current
            if current is None:
                raise WrongRound(
                    f"no round is running ({checked.payload.__struct_config__.tag} message "
                    f"for round {checked.payload.round})",
                    sender=checked.sender,
                )
            if isinstance(current, RoundInProgress):
                if not isinstance(checked.payload, ModelUpdate):
                    raise WrongRound(
                        f"round {current.round} takes plaintext updates, not "
                        f"{checked.payload.__struct_config__.tag!r} messages",
                        sender=checked.sender,
                    )
                current.accept(checked.sender, checked.payload, bytes_up=checked.size)
            else:
                current.add(
                    checked.sender,
                    checked.payload,
                    raw=checked.raw,
                    identity_key=checked.identity_key,
                )
        except ProtocolError as exc:
            self._reject(exc, message.topic)
            return
        if report is not None:
            self._book_record_privacy(report)
        try:
            self.store.touch_agent(checked.sender)
        except StoreError as failure:  # last_seen is bookkeeping: the message still counts
            log_event(log, logging.ERROR, "last seen not recorded", error=str(failure))
        self._bytes_up[checked.sender] = self._bytes_up.get(checked.sender, 0) + checked.size
        log_event(
            log,
            logging.DEBUG if isinstance(current, Aggregator) else logging.INFO,
            "message accepted",
            **self._fields(
                round=current.round,
                agent=checked.sender,
                stage=checked.payload.__struct_config__.tag,
                bytes=checked.size,
            ),
        )
        if current.all_in:
            self._all_in.set()

    def _book_record_privacy(self, entry: PrivacyLedgerEntry) -> None:
        """Keep an agent's record-level report in the privacy ledger. The input it came with
        is in the round already, so a ledger that refuses the row (a second report for the
        round) is logged, not fatal. A run's ε below the agent's previous report is flagged
        (an event, once per fall)."""
        try:
            previous = self.store.latest_privacy_entry(RECORD_UNIT, entry.agent)
            self.store.record_privacy(entry)
        except FedgateError as exc:
            log_event(
                log,
                logging.WARNING,
                "record privacy report not kept",
                **self._fields(round=entry.round, agent=entry.agent, error=str(exc)),
            )
            return
        log_event(
            log,
            logging.INFO,
            "record privacy reported",
            **self._fields(
                round=entry.round,
                agent=entry.agent,
                epsilon_round=round(entry.epsilon_round, 4),
                epsilon_total=round(entry.epsilon_total, 4),
                target_epsilon=entry.target_epsilon,
            ),
        )
        detail = decrease_detail(previous, entry)
        if detail:
            self._record_event_safely(
                "record_epsilon_decreased", detail=detail, round=entry.round, agent=entry.agent
            )
            log_event(
                log,
                logging.WARNING,
                "record privacy report below an earlier one",
                **self._fields(round=entry.round, agent=entry.agent, detail=detail),
            )

    def _record_event_safely(
        self, kind: str, *, detail: str, round: int | None, agent: str | None
    ) -> None:
        """Keep an event; a store that fails is logged, not raised: bookkeeping of bad
        input or of a report must not stop the service."""
        try:
            self.store.record_event(kind, detail=detail, round=round, agent_id=agent)
        except StoreError as failure:
            log_event(log, logging.ERROR, "event not recorded", kind=kind, error=str(failure))

    def _reject(self, exc: ProtocolError, topic: str) -> None:
        self.summary.rejected[exc.kind] = self.summary.rejected.get(exc.kind, 0) + 1
        current = self.current
        round_number = current.round if current is not None else None
        detail = f"{exc} (topic {topic[:200]!r})"
        self._record_event_safely(exc.kind, detail=detail, round=round_number, agent=exc.sender)
        log_event(
            log,
            logging.WARNING,
            "message rejected",
            **self._fields(
                kind=exc.kind, agent=exc.sender or "-", round=round_number, error=str(exc)
            ),
        )

    def _report_rate_limited(self, now: float) -> None:
        """Log and record drops: a sender's first at once, then one summary per
        ``rate_limit.report_every_s``; refresh the status file at most once a second."""
        for sender, count in self.rate_limiter.due_reports(now):
            agent = None if sender in (OVERFLOW, MALFORMED) else sender
            detail = (
                f"{count} message(s) from {sender!r} over its rate limit dropped unexamined "
                f"({self.rate_limiter.dropped.get(sender, 0)} in total)"
            )
            current = self.current
            self._record_event_safely(
                "rate_limited",
                detail=detail,
                round=current.round if current is not None else None,
                agent=agent,
            )
            log_event(
                log,
                logging.WARNING,
                "rate limit: messages dropped",
                **self._fields(agent=sender, dropped=count),
            )
        if now - self._intake_status_at >= 1.0:
            self.write_intake_status()
            self._intake_status_at = now

    def write_intake_status(self) -> None:
        """``intake-status.json`` in the state directory, read by ``status``."""
        data = {
            "updated": time.time(),
            "rate_limited": dict(self.rate_limiter.dropped),
            "rate_limit_identities": self.rate_limiter.identities,
        }
        path = self._state_dir / INTAKE_STATUS_NAME
        try:
            fd, tmp = tempfile.mkstemp(dir=self._state_dir, prefix=".intake-status.")
            with os.fdopen(fd, "w") as handle:
                json.dump(data, handle)
            os.replace(tmp, path)
        except OSError as exc:
            log_event(log, logging.WARNING, "cannot write intake status", error=str(exc))

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
        """Run one height: this cloud's round, then consensus on the global model.

        Returns the local result when this cloud's round completed. Every height ends with
        a certified model, also when this cloud's round aborted (it then contributes an
        empty aggregate) or when the federation decided it without us (catch-up).
        """
        head = self.store.head_model()
        assert head is not None  # ensure_genesis ran before the first round
        number = head.round + 1
        known = self.federation.known_decision(number)
        if known is not None:
            await self._adopt_decision(known, local=None, participants=[])
            return None
        result: RoundResult | None = None
        participants: list[ParticipantRecord] = []
        if self.store.get_round(number) is None:
            result = await self._local_round(number, head)
            if result is None:
                return None  # privacy budget spent
            participants = [_participant(c) for c in result.contributions]
        if isinstance(result, RoundCompleted):
            result = self._within_federation_rules(result)
        aggregate = self._aggregate(number, head, result)
        decided = await self.federation.decide(number, head, aggregate)
        await self._adopt_decision(decided, local=result, participants=participants)
        return result if isinstance(result, RoundCompleted) else None

    def _within_federation_rules(self, result: RoundCompleted) -> RoundResult:
        """``result``, or its round aborted when its mean update breaks the manifest's
        rules (its norm above ``max_update_norm``: site-level noise can do that). Every
        cloud would refuse it, this one too; the cloud contributes an empty aggregate
        instead and the height goes on. What the round's agents spent stays spent."""
        problem = self.federation.own_aggregate_problem(result.delta, len(result.contributions))
        if problem is None:
            return result
        reason = (
            f"this cloud's aggregate breaks the federation manifest's rules ({problem}); "
            "raise consensus.max_update_norm in a new manifest version, or lower the noise"
        )
        self.store.record_event("invalid_aggregate", detail=f"own: {reason}", round=result.round)
        log_event(
            log,
            logging.WARNING,
            "own aggregate refused; round aborted",
            **self._fields(round=result.round, reason=problem),
        )
        return RoundAborted(round=result.round, reason=reason, contributions=result.contributions)

    def _aggregate(
        self, number: int, head: ModelRecord, result: RoundResult | None
    ) -> CloudAggregate:
        """This cloud's signed contribution: the mean update, or nothing (0 participants)."""
        if isinstance(result, RoundCompleted):
            delta = result.delta
            participants = len(result.contributions)
        else:
            base = as_float32(head.decode_weights())
            delta = {name: np.zeros_like(value) for name, value in base.items()}
            participants = 0
        return CloudAggregate(
            round=number,
            base_digest=head.digest,
            participants=participants,
            delta=encode_arrays(delta),
        )

    async def _adopt_decision(
        self,
        decided: DecidedModel,
        *,
        local: RoundResult | None,
        participants: list[ParticipantRecord],
    ) -> None:
        """Store the certified model (closing this cloud's round) and publish it to agents.

        A round whose aggregate the decided model does not hold (it came too late for the
        proposal, or was refused) is recorded as aborted: its agents' updates are not in
        the model, whatever they spent.
        """
        model = decided.model
        number = model.round
        self.federation.record_decision(decided)  # before the model: never one without it
        if (
            isinstance(local, RoundCompleted)
            and decided.combined is not None
            and self.config.cloud not in decided.combined
        ):
            local = RoundAborted(
                round=number,
                reason="this cloud's aggregate is not in the decided model (too late or refused)",
                contributions=local.contributions,
            )
        message = global_model_message(
            model,
            decided.certificate,
            signing_key=self._key,
            deployment=self.config.deployment,
            cloud=self.config.cloud,
        )
        if isinstance(local, RoundCompleted):
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
                mean_train_loss=local.mean_train_loss,
                bytes_down_per_agent=self._bytes_down_per_agent + len(message) + len(end),
            )
            self.summary.rounds_completed += 1
        else:
            if isinstance(local, RoundAborted):
                self.store.abort_round(round=number, reason=local.reason, participants=participants)
                self.summary.rounds_aborted += 1
            self.store.add_model(model)
            end = self._seal(
                RoundEnd(
                    round=number,
                    outcome="aborted",
                    reason=local.reason if isinstance(local, RoundAborted) else "not run here",
                    participants=tuple(p.agent_id for p in participants),
                    model_digest=model.digest,
                )
            )
        await self.federation.publish_decision(decided)
        await self.link.publish(
            model_topic(self.config.deployment, self.config.cloud), message, retain=True
        )
        if local is not None:
            await self.link.publish(self._round_topic(number, "end"), end)
            await self.link.publish(self._round_topic(number, "start"), b"", retain=True)
        if isinstance(local, RoundCompleted):
            log_event(
                log,
                logging.INFO,
                "round completed",
                **self._fields(
                    round=number,
                    participants=len(participants),
                    model=model.digest[:12],
                    signers=",".join(decided.signers),
                    train_loss=(
                        round(local.mean_train_loss, 5)
                        if local.mean_train_loss is not None
                        else "-"
                    ),
                ),
            )
        else:
            log_event(
                log,
                logging.WARNING,
                "round closed without this cloud's update",
                **self._fields(
                    round=number,
                    reason=local.reason if isinstance(local, RoundAborted) else "catch-up",
                    model=model.digest[:12],
                ),
            )

    async def _local_round(self, number: int, head: ModelRecord) -> RoundResult | None:
        """This cloud's part of height ``number``; ``None`` when the privacy budget stops it."""
        selected = await self._selected_agents()
        secure = self.config.secagg.aggregation == "secagg"
        params = self._secure_params(len(selected), head.decode_spec(), number) if secure else None
        if params is not None and not self._within_budgets(number, params, head.decode_spec()):
            return None
        self.store.begin_round(
            round=number,
            base_digest=head.digest,
            selected=len(selected),
            min_participants=self.config.rounds.min_participants,
            aggregation=self.config.secagg.aggregation,
            threshold=params.threshold if params else None,
            graph_degree=effective_degree(len(selected), params.degree) if params else None,
            word_bits=params.word_bits if params else None,
        )
        self._agent_keys.clear()  # enrollments and revocations take effect each round
        self._bytes_up = {}
        start_topic = self._round_topic(number, "start")
        closed = False
        try:
            start = self._seal(
                round_start(
                    round=number,
                    base_digest=head.digest,
                    selected=selected,
                    settings=self.config.rounds,
                    secagg=params,
                )
            )
            # The start as the agents decode it, for the digest their keys name: a value
            # built here as an int where the struct says float would hash differently.
            announced = decode_payload(open_envelope(start))
            assert isinstance(announced, RoundStart)
            await self.link.publish(start_topic, start, retain=True)
            log_event(
                log,
                logging.INFO,
                "round started",
                **self._fields(
                    round=number,
                    selected=len(selected),
                    base=head.digest[:12],
                    aggregation=self.config.secagg.aggregation,
                    threshold=params.threshold if params else "-",
                ),
            )
            if params is None:
                result = await self._plaintext_round(number, head, selected, len(start))
            else:
                result = await self._secure_round(head, announced, len(start))
            closed = True
            await self.link.publish(start_topic, b"", retain=True)
            return result
        finally:
            self.current = None
            if not closed:
                self.store.abort_round(round=number, reason=STOP_REASON)
                self.summary.rounds_aborted += 1

    async def _wait_for_stage(self, seconds: float) -> None:
        current = self.current
        assert current is not None
        if current.all_in:
            return
        self._all_in = asyncio.Event()
        try:
            await asyncio.wait_for(self._all_in.wait(), seconds)
        except TimeoutError:
            log_event(
                log, logging.WARNING, "stage deadline passed", **self._fields(round=current.round)
            )

    async def _plaintext_round(
        self, number: int, head: ModelRecord, selected: list[str], start_bytes: int
    ) -> RoundResult:
        current = RoundInProgress(
            round=number,
            base_digest=head.digest,
            base_weights=as_float32(head.decode_weights()),
            spec=head.decode_spec(),
            selected=selected,
            settings=self.config.rounds,
            limits=self._limits,
        )
        self.current = current
        began = time.monotonic()
        await self._wait_for_stage(self.config.rounds.update_timeout_s)
        result = current.close()
        self.store.record_stage(
            round=number,
            stage="update",
            expected=len(selected),
            received=current.received,
            bytes_in=sum(self._bytes_up.values()),
            bytes_out=start_bytes * len(selected),
            seconds=time.monotonic() - began,
        )
        self._bytes_down_per_agent = start_bytes
        return result

    def _within_budgets(self, number: int, params: SecAggParams, spec: ModelSpec) -> bool:
        """Would round ``number`` with ``params`` keep the site-level budget, and with pooled
        record-level noise the record-level one? If not, stop scheduling (and say why)."""
        privacy = self.config.privacy
        if params.noise is None:
            return True
        dimension = parameter_count(spec)
        if privacy.enabled:
            site = check_budget(
                privacy, self._released_multipliers(), round_effective_multiplier(params, dimension)
            )
            if not site.allows_next:
                self._stop_for_budget(number, "site-level", site)
                return False
        if privacy.pooled:
            sigma = pooled_round_sigma(params, dimension, self._record_bound(number))
            record = check_pooled_budget(privacy, self._pooled(), sigma)
            if not record.allows_next:
                self._stop_for_budget(number, "record-level (noise pooled)", record)
                return False
        return True

    def _record_bound(self, number: int) -> float:
        """η·C/B of round ``number``'s plan: how far one window moves a pooled update."""
        return record_bound(
            self.config.rounds.plan_for(number), self.config.privacy.record_clip_norm
        )

    def _secure_params(self, selected: int, spec: ModelSpec, number: int) -> SecAggParams:
        """This round's SecAgg parameters: adaptive clip norm, site-level noise, and the
        noise pooled record-level DP needs for round ``number``'s plan."""
        return round_params(
            self.config.secagg,
            self.config.privacy,
            selected=selected,
            min_participants=self.config.rounds.min_participants,
            clip_norm=self._clip_norm(),
            dimension=parameter_count(spec),
            record_bound=self._record_bound(number),
        )

    def _warn_if_too_small(self, spec: ModelSpec) -> None:
        if self.config.secagg.aggregation != "secagg":
            return
        agents = sum(1 for a in self.store.list_agents() if a.status == "active")
        warning = federation_size_warning(
            self.config.secagg,
            self.config.privacy,
            agents=agents,
            min_participants=self.config.rounds.min_participants,
            dimension=parameter_count(spec),
        )
        if warning:
            log_event(log, logging.WARNING, warning, **self._fields(agents=agents))
        if self.config.privacy.pooled and agents > 0:
            # Size round 1's pooled noise now: a budget no noise can meet is a ConfigError
            # at start (exit 3), not a crash at the first round.
            self._secure_params(agents, spec, 1)

    def _clip_norm(self) -> float:
        """The configured clip norm, or with adaptive clipping the one the last measured
        round points to (kept in the rounds table, so it survives restarts)."""
        secagg = self.config.secagg
        if not secagg.adaptive_clip:
            return secagg.clip_norm
        for record in reversed(self.store.list_rounds()):
            if record.clip_norm is not None and record.within_clip is not None:
                return secagg.next_clip_norm(record.clip_norm, record.within_clip)
        return secagg.clip_norm

    def _released_multipliers(self) -> list[float]:
        return [e.effective_noise_multiplier for e in self.store.privacy_ledger(unit="site")]

    def _pooled(self) -> pld_accounting.Running:
        """The running count of every pooled round this cloud released."""
        if self._pooled_running is None:
            sigmas = [e.effective_noise_multiplier for e in self.store.privacy_ledger(POOLED_UNIT)]
            self._pooled_running = pooled_count(self.config.privacy, sigmas)
        return self._pooled_running

    def _stop_for_budget(self, number: int, level: str, budget: BudgetCheck) -> None:
        detail = (
            f"{level} privacy budget: ε spent {budget.spent:.3f}, round {number} would reach "
            f"{budget.after:.3f} > target {budget.target:g}"
        )
        self.summary.stopped = detail
        self.store.record_event("privacy_budget_spent", round=number, detail=detail)
        log_event(
            log,
            logging.WARNING,
            "privacy budget spent; no more rounds",
            **self._fields(
                round=number,
                budget=level,
                epsilon_spent=round(budget.spent, 4),
                target=budget.target,
            ),
        )

    def _record_release(self, number: int, params: SecAggParams, outcome: Unmasked) -> None:
        """Book a released sum: its privacy cost, then its clip-norm measurement (which the
        next round's clip follows: never from a sum whose cost is not booked)."""
        inputs = len(outcome.survivors)
        within = outcome.decoded.within_clip
        noise = params.noise
        dimension = outcome.decoded.weighted_sum.size
        if noise is not None and self.config.privacy.enabled:
            self._record_site_release(number, params, inputs, dimension)
        # Pooled record-level noise alone gives no site-level guarantee worth booking: such
        # a round counts as unrecorded at site level, as one without noise.
        if noise is not None and self.config.privacy.pooled:
            self._record_pooled_release(number, params, inputs, dimension)
        self.store.set_round_clip(
            number,
            clip_norm=params.clip_norm,
            within_clip=None if within is None else within / max(inputs, 1),
        )

    def _record_site_release(
        self, number: int, params: SecAggParams, inputs: int, dimension: int
    ) -> None:
        """Book what a released round cost at site level (its effective multiplier)."""
        noise = params.noise
        assert noise is not None
        effective = round_effective_multiplier(params, dimension)
        released = self._released_multipliers()
        privacy = self.config.privacy
        self.store.record_privacy(
            PrivacyLedgerEntry(
                round=number,
                unit="site",
                accountant=ACCOUNTANT,
                delta=privacy.delta,
                noise_multiplier=noise.noise_multiplier,
                effective_noise_multiplier=effective,
                clip_norm=params.clip_norm,
                count_noise=noise.count_noise,
                min_inputs=noise.min_inputs,
                inputs=inputs,
                epsilon_round=epsilon([effective], privacy.delta),
                epsilon_total=epsilon([*released, effective], privacy.delta),
                target_epsilon=privacy.target_epsilon,
            )
        )

    def _record_pooled_release(
        self, number: int, params: SecAggParams, inputs: int, dimension: int
    ) -> None:
        """Book what a pooled round cost one window of a site that took part: one released,
        or one aborted after masked inputs arrived (its agents booked it)."""
        assert params.noise is not None
        privacy = self.config.privacy
        sigma = pooled_round_sigma(params, dimension, self._record_bound(number))
        grown = self._pooled().plus(sigma, privacy.record_sample_rate)
        self.store.record_privacy(
            PrivacyLedgerEntry(
                round=number,
                unit=POOLED_UNIT,
                accountant=pooled_accountant(privacy),
                delta=privacy.delta,
                noise_multiplier=params.noise.noise_multiplier,
                effective_noise_multiplier=sigma,
                clip_norm=privacy.record_clip_norm,
                count_noise=0.0,
                min_inputs=params.noise.min_inputs,
                inputs=inputs,
                epsilon_round=pooled_epsilon(privacy, [sigma]),
                epsilon_total=grown.epsilon(),
                target_epsilon=privacy.record_epsilon,
            )
        )
        self._pooled_running = grown  # booked: the count grows

    async def _secure_round(
        self, head: ModelRecord, announced: RoundStart, start_bytes: int
    ) -> RoundResult:
        """Drive the five SecAgg+ stages; only the decoded sum leaves the aggregator."""
        number, selected, params = announced.round, list(announced.selected), announced.secagg
        assert params is not None  # a secure round's start carries its parameters
        spec = head.decode_spec()
        head_message = open_envelope(self._global_model_message(head))
        payload = decode_payload(head_message)
        assert isinstance(payload, GlobalModel)
        certificate = graph_seed_material(payload)
        aggregator = Aggregator(
            deployment=self.config.deployment,
            cloud=self.config.cloud,
            round=number,
            base_digest=head.digest,
            start_digest=start_digest(announced),
            base_certificate=certificate,
            selected=selected,
            params=params,
            dimension=parameter_count(spec),
            min_participants=self.config.rounds.min_participants,
            limits=self._limits,
        )
        self.current = aggregator
        down = {agent: start_bytes for agent in selected}
        stage_out = start_bytes * len(selected)
        outcome: Unmasked | Aborted | None = None
        for stage in STAGE_ORDER:
            began = time.monotonic()
            timeout = (
                self.config.rounds.update_timeout_s
                if stage == "masked"
                else self.config.secagg.stage_timeout_s
            )
            await self._wait_for_stage(timeout)
            record = aggregator.records[stage]
            try:
                produced = aggregator.close()
            except (FedgateError, ValueError, ArithmeticError) as exc:  # never the service
                produced = Aborted(stage=stage, reason=f"the {stage} stage failed: {exc}")
                log_event(
                    log,
                    logging.ERROR,
                    "secure round failed",
                    **self._fields(round=number, stage=stage, error=str(exc)),
                )
            if isinstance(produced, Unmasked):
                # The coordinator has seen the sum: booked before anything else is written
                # or sent; a ledger that cannot take it stops serve (outside the try above).
                self._record_release(number, params, produced)
            sent = 0
            if isinstance(produced, Unmasked | Aborted):
                outcome = produced
            elif isinstance(produced, dict):
                for agent, delivery in produced.items():
                    raw = self._seal(delivery)
                    await self.link.publish(self._round_topic(number, "deliver", agent), raw)
                    down[agent] = down.get(agent, 0) + len(raw)
                    sent += len(raw)
            else:
                raw = self._seal(produced)
                tag = produced.__struct_config__.tag
                assert isinstance(tag, str)
                await self.link.publish(self._round_topic(number, tag), raw)
                for agent in aggregator.expected:
                    down[agent] = down.get(agent, 0) + len(raw)
                sent = len(raw) * len(aggregator.expected)
            self.store.record_stage(
                round=number,
                stage=stage,
                expected=record.expected,
                received=record.received,
                bytes_in=record.bytes_in,
                bytes_out=stage_out,
                seconds=time.monotonic() - began,
            )
            stage_out = sent
            log_event(
                log,
                logging.INFO,
                "stage closed",
                **self._fields(
                    round=number, stage=stage, received=record.received, expected=record.expected
                ),
            )
            if outcome is not None:
                break
        masked = aggregator.records.get("masked")
        pooled = self.config.privacy.pooled and params.noise is not None
        if pooled and isinstance(outcome, Aborted) and masked is not None and masked.received:
            # Nothing was released, but the agents booked the round when their masked
            # inputs left (they cannot know it was never unmasked): counted as they count
            # it, so that this coordinator stops when they do.
            self._record_pooled_release(number, params, masked.received, parameter_count(spec))
        survivors = outcome.survivors if isinstance(outcome, Unmasked) else ()
        self._bytes_down_per_agent = max(down.values(), default=0)
        contributions = tuple(
            Contribution(
                agent_id=agent,
                num_samples=None,
                train_loss=None,
                bytes_up=self._bytes_up.get(agent, 0),
            )
            for agent in survivors
        )
        if not isinstance(outcome, Unmasked):
            reason = outcome.reason if outcome is not None else "round ended without a result"
            where = outcome.stage if outcome is not None else "-"
            return RoundAborted(
                round=number, reason=f"{reason} (stage {where})", contributions=contributions
            )
        bound = input_bound_violation(outcome, params)
        if bound:
            return RoundAborted(round=number, reason=bound, contributions=contributions)
        delta = mean_delta(outcome, params, spec)
        weights = apply_delta(as_float32(head.decode_weights()), delta)
        if not all(np.isfinite(w).all() for w in weights.values()):
            return RoundAborted(
                round=number,
                reason="the aggregated model is not finite; nothing is released",
                contributions=contributions,
            )
        return RoundCompleted(
            round=number,
            contributions=contributions,
            delta=delta,
            weights=weights,
            mean_train_loss=None,
        )

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

    def _head_round(self) -> int:
        head = self.store.head_model()
        return 0 if head is None else head.round

    def _round_topic(self, number: int, stage: str, agent: str | None = None) -> str:
        return round_topic(self.config.deployment, self.config.cloud, number, stage, agent)

    async def run(
        self, *, max_rounds: int | None = None, until_height: int | None = None
    ) -> ServeSummary:
        """Recover, connect, publish the head model, then run rounds until ``max_rounds``
        rounds ran or the model of ``until_height`` is decided."""
        # First: a store of another deployment is refused before anything is written to it.
        head = ensure_genesis(self.store, self.config, self.manifest.manifest, self._state_dir)
        recovered = recover_interrupted_rounds(self.store)
        for number in recovered:
            log_event(
                log,
                logging.WARNING,
                "aborted round interrupted by a restart",
                **self._fields(round=number),
            )
        self._warn_if_too_small(head.decode_spec())
        log_event(
            log,
            logging.INFO,
            "federation",
            **self._fields(
                tolerance=tolerance_text(len(self.manifest.manifest.clouds)),
                clouds=",".join(c.cloud for c in self.manifest.manifest.clouds),
            ),
        )
        async with BackgroundTasks() as background:
            background.create_task(self.link.run())
            background.create_task(self._intake_loop())
            background.create_task(self.federation.run())
            await self.link.connected.wait()
            await self._announce_recovered(recovered)
            await self.link.publish(
                model_topic(self.config.deployment, self.config.cloud),
                self._global_model_message(head),
                retain=True,
            )
            started = 0
            while (max_rounds is None or started < max_rounds) and not self.summary.stopped:
                if until_height is not None and self._head_round() >= until_height:
                    break
                started += 1
                await self.run_round()
                if self.config.rounds.pause_between_rounds_s:
                    await asyncio.sleep(self.config.rounds.pause_between_rounds_s)
        self._report_rate_limited(time.monotonic() + self.config.rate_limit.report_every_s)
        self.write_intake_status()
        return self.summary


def _published_by_coordinator(topic: str) -> bool:
    """Directed coordinator messages share the agent topic pattern; recognise them."""
    parts = topic.split("/")
    return len(parts) == 7 and parts[5] in COORDINATOR_STAGES


def _participant(contribution: Contribution) -> ParticipantRecord:
    return ParticipantRecord(
        agent_id=contribution.agent_id,
        num_samples=contribution.num_samples,
        train_loss=contribution.train_loss,
        bytes_up=contribution.bytes_up,
        # Under secure aggregation the row records who is in the sum: the masked stage.
        stage="update" if contribution.num_samples is not None else "masked",
    )


__all__ = [
    "CoordinatorService",
    "ServeSummary",
    "ensure_genesis",
    "recover_interrupted_rounds",
    "refuse_foreign_genesis",
]
