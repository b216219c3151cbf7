"""The consensus driver: Tendermint's core over MQTT between the coordinators of all clouds.

Topology (docs/decisions/0024): each coordinator publishes federation messages only on its
own cloud's broker, under ``fedgate/<deployment>/federation/<cloud>/…``, and subscribes to
that prefix on every peer's broker (endpoints from the manifest). Brokers are not bridged
and not trusted: every message is a signed envelope checked against the manifest's keys.

Per height (= federated round) the driver

1. publishes this cloud's signed aggregate (retained), collects the peers';
2. runs the core; as proposer it proposes once it holds every cloud's aggregate, or a
   quorum of them after ``aggregate_wait_s``; validity recomputes the global model from the
   proposal's signed aggregates with the manifest's rule and compares digests;
3. writes the core's state to the journal before anything it signed leaves;
4. on decision stores the votes, the decision and its certificate, and publishes the
   certified model (retained, per height) so that lagging peers catch up from it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import aiomqtt
import msgspec
import nacl.signing
import numpy as np
import numpy.typing as npt
from fedgate_common.arrays import decode_arrays
from fedgate_common.consensus.manifest import SignedManifest, quorum, verify_keys
from fedgate_common.consensus.quorum import faults_tolerated
from fedgate_common.consensus.tendermint import (
    Action,
    Broadcast,
    ConsensusCore,
    ConsensusState,
    Decided,
    Evidence,
    Persist,
    Relay,
    RequestValue,
    ScheduleTimeout,
    Timeout,
    Timeouts,
)
from fedgate_common.consensus.types import (
    CommitCertificate,
    Proposal,
    SignedProposal,
    SignedVote,
    Vote,
)
from fedgate_common.consensus.wire import (
    certificate_to_wire,
    content_aggregates,
    open_proposal,
    open_signed,
    open_vote,
    proposal_content,
    seal_proposal,
    seal_vote,
    verify_certificate,
)
from fedgate_common.envelope import open_envelope, seal
from fedgate_common.errors import FedgateError, LimitExceeded, MalformedMessage, ProtocolError
from fedgate_common.logs import log_event
from fedgate_common.messages import Certificate, CloudAggregate, GlobalModel
from fedgate_common.model_spec import ModelSpec, parameter_count, parameter_shapes
from fedgate_common.tasks import BackgroundTasks
from fedgate_common.topics import federation_filter, federation_topic, parse_federation_topic

from fedgate_coordinator.aggregation import apply_delta, as_float32, with_momentum
from fedgate_coordinator.config import PeerBroker
from fedgate_coordinator.consensus_journal import read_journal, write_journal
from fedgate_coordinator.cross_cloud import (
    CloudContribution,
    aggregate_problem,
    combine,
    delta_norm,
)
from fedgate_coordinator.errors import ConfigError, StoreError
from fedgate_coordinator.mqtt_link import InboundMessage, MqttLink, MqttSettings
from fedgate_coordinator.store import (
    AggregateRecord,
    DecisionRecord,
    EvidenceRecord,
    ModelRecord,
    Store,
    VoteRecord,
)

log = logging.getLogger("fedgate.coordinator.federation")

KEEP_MODELS = 32  # retained certified models per cloud, for peers that fall behind
AGGREGATE_HEIGHTS = 16  # peers' aggregates held for at most this many heights ahead
# A timeout that finds the core's input queue full is offered again this much later: a lost
# timeout could leave a height waiting for a step that never ends.
TIMEOUT_RETRY_S = 0.1
# A signed aggregate's bytes: at most 8 per model parameter (float64) plus names, shapes
# and the envelope. Larger ones are refused on arrival, before anything is held.
AGGREGATE_OVERHEAD = 64 * 1024


def max_aggregate_bytes(spec: ModelSpec) -> int:
    """The largest signed aggregate (or proposal, per aggregate it carries) accepted."""
    return 8 * parameter_count(spec) + AGGREGATE_OVERHEAD


GOSSIP_S = 3.0  # re-send own messages of the undecided height this often
STATUS_NAME = "federation-status.json"


class DecidedModel(msgspec.Struct, frozen=True, kw_only=True):
    """A decided global model; ``combined`` are the clouds whose aggregates it holds
    (``None`` when this coordinator never saw the decided proposal)."""

    model: ModelRecord
    certificate: Certificate
    signers: tuple[str, ...]
    consensus_round: int
    combined: tuple[str, ...] | None = None


class PeerStatus(msgspec.Struct, kw_only=True):
    cloud: str
    broker: str
    connected: bool = False  # set from the link when the status is written
    last_seen: float | None = None  # unix time of its last valid message


class FederationStatus(msgspec.Struct, kw_only=True):
    """What ``fedgate-coordinator status`` shows about consensus (written every few s)."""

    updated: float
    height: int
    round: int
    step: str
    clouds: int
    quorum: int
    faults_tolerated: int
    peers: list[PeerStatus]
    rejected: dict[str, int]


class _Input(msgspec.Struct, frozen=True):
    kind: Literal["proposal", "vote", "timeout", "value", "certificate"]
    item: object


def global_model_message(
    model: ModelRecord,
    certificate: Certificate | None,
    *,
    signing_key: nacl.signing.SigningKey,
    deployment: str,
    cloud: str,
) -> bytes:
    return seal(
        GlobalModel(
            round=model.round,
            digest=model.digest,
            parent_digest=model.parent_digest,
            spec=model.decode_spec(),
            weights=model.decode_wire_weights(),
            certificate=certificate,
        ),
        signing_key=signing_key,
        deployment=deployment,
        cloud=cloud,
        sender=cloud,
    )


class FederationNode:
    """One coordinator's part in cross-cloud consensus (see the module docstring)."""

    def __init__(
        self,
        *,
        deployment: str,
        cloud: str,
        manifest: SignedManifest,
        signing_key: nacl.signing.SigningKey,
        store: Store,
        own_link: MqttLink,
        state_dir: Path,
        peer_logins: Mapping[str, PeerBroker] | None = None,
    ) -> None:
        self.deployment = deployment
        self.cloud = cloud
        self.manifest = manifest.manifest
        self._key = signing_key
        self.store = store
        self.own_link = own_link
        self.state_dir = state_dir
        self.clouds = tuple(c.cloud for c in self.manifest.clouds)
        self.keys = verify_keys(self.manifest)
        self.quorum = quorum(self.manifest)
        self.params = self.manifest.consensus
        self.spec: ModelSpec = self.manifest.model_spec
        self.peer_links: dict[str, MqttLink] = {}
        self.peers: dict[str, PeerStatus] = {}
        for entry in self.manifest.clouds:
            if entry.cloud == cloud:
                continue
            host, _, port = entry.broker.rpartition(":")
            login = (peer_logins or {}).get(entry.cloud, PeerBroker())
            if entry.tls and not login.tls_ca_file:
                raise ConfigError(
                    f"the manifest says cloud {entry.cloud}'s broker speaks TLS: set "
                    f"federation.peers.{entry.cloud}.tls_ca_file in coordinator.toml"
                )
            self.peer_links[entry.cloud] = MqttLink(
                settings=MqttSettings(
                    host=host,
                    port=int(port),
                    client_id=f"fedgate-coordinator-{deployment}-{cloud}-peer-{entry.cloud}",
                    username=login.username,
                    password_file=login.password_file,
                    tls_ca_file=login.tls_ca_file,
                    tls_cert_file=login.tls_cert_file,
                    tls_key_file=login.tls_key_file,
                ),
                subscriptions=[federation_filter(deployment, entry.cloud)],
            )
            self.peers[entry.cloud] = PeerStatus(cloud=entry.cloud, broker=entry.broker)
        self.rejected: dict[str, int] = {}
        self._inputs: asyncio.Queue[_Input] = asyncio.Queue(maxsize=10_000)
        self._core = ConsensusCore(
            me=cloud,
            validators=self.clouds,
            sign_vote=self._sign_vote,
            sign_proposal=self._sign_proposal,
            is_valid=self._is_valid,
            timeouts=Timeouts(
                propose_s=self.params.timeout_propose_s,
                prevote_s=self.params.timeout_prevote_s,
                precommit_s=self.params.timeout_precommit_s,
                delta_s=self.params.timeout_delta_s,
            ),
            state=read_journal(state_dir),
        )
        self._resumed = self._core.state.height > 0
        # The height at hand: its base model; per height the aggregates (cloud → signed bytes).
        self._base: ModelRecord | None = None
        head = store.head_model()
        self._height = 0 if head is None else head.round + 1  # the height being decided
        if self._core.state.height > self._height:
            log_event(
                log,
                logging.WARNING,
                "consensus journal ahead of the store",
                cloud=cloud,
                journal_height=self._core.state.height,
                store_height=self._height,
                hint="the store is older than consensus-state.msgpack (restored from an "
                "older copy?); the heights between come only as peers' certified models: "
                "operations.md section 9",
            )
        self._aggregates: dict[int, dict[str, bytes]] = {}
        # sha256 of a signed aggregate + height → its checked contribution, or why it is refused
        self._checked: dict[bytes, CloudContribution | FedgateError | ValueError] = {}
        self._last_aggregate: dict[str, int] = {}  # cloud → highest height of its aggregates
        self._first_height = 0  # the first height this process decides
        self._candidates: dict[str, ModelRecord] = {}  # value digest → recomputed model
        self._contents: dict[str, bytes] = {}  # value digest → the proposal content it is from
        self._decided: dict[int, DecidedModel] = {}
        # (height, round, step, sender) → the values stored for it (at most 2)
        self._kept_per_slot: dict[tuple[int, int, str, str], set[str]] = {}
        self._caught_up_to: int | None = None  # a height adopted from peers, while the core lags
        self._decision_waiters: dict[int, asyncio.Future[DecidedModel]] = {}
        self._value_task: asyncio.Task[None] | None = None

    # -- signing callbacks (pure, for the core) -------------------------------------------
    def _sign_vote(self, vote: Vote) -> SignedVote:
        return seal_vote(vote, deployment=self.deployment, signing_key=self._key)

    def _sign_proposal(self, proposal: Proposal) -> SignedProposal:
        return seal_proposal(proposal, deployment=self.deployment, signing_key=self._key)

    # -- validity ---------------------------------------------------------------------------
    def _is_valid(self, proposal: Proposal) -> bool:
        """valid(v) of Algorithm 1: the proposal's signed aggregates yield its digest.

        A refused proposal is recorded as an ``invalid_proposal`` event naming its
        proposer (the signed proposal itself is in the ``votes`` table).
        """
        if proposal.value in self._candidates and proposal.content == self._contents.get(
            proposal.value
        ):  # the same value from the same aggregates: checked already
            return self._candidates[proposal.value].round == proposal.height
        try:
            model = self._model_from_content(proposal.height, proposal.content)
            if model.digest != proposal.value:
                raise MalformedMessage("its digest does not match what its aggregates give")
        except (FedgateError, ValueError) as exc:
            self._count("invalid_proposal")
            detail = (
                f"federation: proposal of {proposal.proposer} at height {proposal.height} "
                f"round {proposal.round} refused: {exc}"
            )
            self.store.record_event("invalid_proposal", detail=detail, round=proposal.height)
            log_event(
                log,
                logging.WARNING,
                "proposal invalid",
                **self._fields(height=proposal.height, proposer=proposal.proposer, reason=str(exc)),
            )
            return False
        self._candidates[model.digest] = model
        self._contents[model.digest] = proposal.content
        return True

    def _model_from_content(self, height: int, content: bytes) -> ModelRecord:
        base = self._base
        if base is None or height != self._height:
            raise MalformedMessage(f"no base model for height {height} here yet")
        raws = content_aggregates(content)
        if len(raws) < self.quorum:
            raise MalformedMessage(f"{len(raws)} aggregates; the quorum is {self.quorum}")
        contributions = [self._contribution(height, raw) for raw in raws]
        if len({c.cloud for c in contributions}) != len(contributions):
            raise MalformedMessage("two aggregates from one cloud")
        delta = combine(
            self.params.rule,
            contributions,
            weight_cap=self.params.cloud_weight_cap,
            spec=self.spec,
            faults=faults_tolerated(len(self.clouds)),
        )
        base_weights = as_float32(base.decode_weights())
        beta = self.manifest.momentum
        if beta and base.parent_digest:
            parent = self.store.get_model(base.parent_digest)
            if parent is None:
                raise MalformedMessage(
                    f"no model {base.parent_digest[:12]} here to take the server momentum from"
                )
            delta = with_momentum(delta, base_weights, as_float32(parent.decode_weights()), beta)
        weights = apply_delta(base_weights, delta)
        return ModelRecord.from_weights(
            round=height, parent_digest=base.digest, spec=self.spec, weights=weights
        )

    def _contribution(self, height: int, raw: bytes) -> CloudContribution:
        """The checked contribution of a signed aggregate; each is checked once, and a
        refused one raises the same error again."""
        key = _check_key(height, raw)
        checked = self._checked.get(key)
        if checked is None:
            try:
                checked = self._check_contribution(height, raw)
            except (FedgateError, ValueError) as exc:
                checked = exc
            self._checked[key] = checked
        if isinstance(checked, CloudContribution):
            return checked
        raise checked

    def own_aggregate_problem(
        self, delta: Mapping[str, npt.NDArray[np.float32]], participants: int
    ) -> str | None:
        """Why this cloud's own mean update could not enter a proposal (the manifest's
        rules, as every cloud checks them: e.g. site-level noise pushing its norm past
        ``max_update_norm``), or ``None``. Checked before it is offered: a refused own
        aggregate would leave a cloud alone waiting for a quorum forever."""
        contribution = CloudContribution(
            cloud=self.cloud, participants=participants, delta=dict(delta)
        )
        return aggregate_problem(
            contribution,
            spec=self.spec,
            max_update_norm=self.params.max_update_norm,
            weight_cap=self.params.cloud_weight_cap,
        )

    def _check_contribution(self, height: int, raw: bytes) -> CloudContribution:
        envelope, payload = open_signed(raw, deployment=self.deployment, keys=self.keys)
        if not isinstance(payload, CloudAggregate):
            raise MalformedMessage("not an aggregate", sender=envelope.sender)
        base = self._base
        if payload.round != height or base is None or payload.base_digest != base.digest:
            raise MalformedMessage(
                f"aggregate of {envelope.sender} is for round {payload.round} on "
                f"{payload.base_digest[:12]}, not height {height}",
                sender=envelope.sender,
            )
        contribution = CloudContribution(
            cloud=envelope.sender,
            participants=payload.participants,
            delta=as_float32(decode_arrays(payload.delta)),
        )
        problem = aggregate_problem(
            contribution,
            spec=self.spec,
            max_update_norm=self.params.max_update_norm,
            weight_cap=self.params.cloud_weight_cap,
        )
        if problem is not None:
            raise MalformedMessage(
                f"aggregate of {envelope.sender}: {problem}", sender=envelope.sender
            )
        return contribution

    # -- the height API the service calls --------------------------------------------------
    def known_decision(self, height: int) -> DecidedModel | None:
        """A certified model for ``height`` learnt from a peer (catch-up), if any."""
        return self._decided.get(height)

    async def decide(
        self, height: int, base: ModelRecord, aggregate: CloudAggregate | None
    ) -> DecidedModel:
        """Run consensus for ``height`` on ``base``; this cloud contributes ``aggregate``."""
        if height in self._decided:
            return self._decided[height]
        self._base = base
        self._height = height
        self._checked.clear()
        self._candidates.clear()
        self._contents.clear()
        for old in [h for h in self._aggregates if h < height]:
            del self._aggregates[old]
        for slot in [k for k in self._kept_per_slot if k[0] < height]:
            del self._kept_per_slot[slot]
        # Registered before the first await: a peer's certified model for this height that
        # arrives while the aggregate is published must find someone to hand it to.
        waiter = self._decision_waiters.get(height)
        if waiter is None:
            waiter = asyncio.get_running_loop().create_future()
            self._decision_waiters[height] = waiter
        if aggregate is not None:
            raw = seal(
                aggregate,
                signing_key=self._key,
                deployment=self.deployment,
                cloud=self.cloud,
                sender=self.cloud,
            )
            self._aggregates.setdefault(height, {})[self.cloud] = raw
            self._record_aggregate(height, self.cloud, raw, aggregate)
            await self.own_link.publish(
                federation_topic(self.deployment, self.cloud, "aggregate"), raw, retain=True
            )
        state = self._core.state
        if self._resumed and state.height == height:
            self._resumed = False
            await self._apply(self._core.resume())
            decided = state.certificate
            if (
                decided is not None
                and decided.height == height
                and state.valid_value == decided.value
            ):  # crashed after deciding, before storing: the value is at hand
                self._finish(height, decided, self._model_from_content(height, state.valid_content))
        elif state.height < height:
            self._resumed = False
            collect: asyncio.Future[None] = asyncio.ensure_future(self._collect_aggregates(height))
            pending: list[asyncio.Future[Any]] = [collect, waiter]
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():
                self._caught_up_to = None
                await self._apply(self._core.start_height(height))
                log_event(
                    log,
                    logging.INFO,
                    "consensus height started",
                    **self._fields(height=height, aggregates=len(self._usable_aggregates(height))),
                )
            else:
                collect.cancel()
        return await waiter

    async def _collect_aggregates(self, height: int) -> None:
        """Wait for every cloud's aggregate, or a quorum and ``aggregate_wait_s`` more, so
        that the proposer has a value when the height starts (fewer nil rounds).

        Only clouds heard from at the previous height (their aggregate came, even late) are
        waited for; others are still taken if they come in time. So one crashed
        coordinator does not cost every height ``aggregate_wait_s``, and a slow one is
        waited for again as soon as it is back.
        """
        quorum_since: float | None = None
        self._first_height = self._first_height or height
        expected = {
            cloud
            for cloud in self.clouds
            if cloud == self.cloud
            or self._last_aggregate.get(cloud, -1) >= height - 1
            or (cloud not in self._last_aggregate and height == self._first_height)
        }
        while True:
            usable = set(self._usable_aggregates(height))
            if usable >= expected and len(usable) >= self.quorum:
                break
            if len(usable) >= self.quorum:
                quorum_since = quorum_since or time.monotonic()
                if time.monotonic() - quorum_since >= self.params.aggregate_wait_s:
                    break
            await asyncio.sleep(0.1)

    # -- driver loops ----------------------------------------------------------------------
    async def run(self) -> None:
        """Peer links, intake, the core's input queue and gossip; runs until cancelled."""
        try:
            async with BackgroundTasks() as background:
                for cloud, link in self.peer_links.items():
                    background.create_task(link.run())
                    background.create_task(self._peer_intake(cloud, link))
                background.create_task(self._feed_core())
                background.create_task(self._gossip())
                await asyncio.Event().wait()  # until cancelled
        finally:
            self._write_status()

    async def _peer_intake(self, cloud: str, link: MqttLink) -> None:
        while True:
            message = await link.inbound.get()
            try:
                await self.handle_peer_message(cloud, message)
            except ProtocolError as exc:
                self._reject(exc, message.topic)
            except (FedgateError, ValueError) as exc:  # e.g. a model that does not fit
                self._reject(MalformedMessage(str(exc), sender=cloud), message.topic)

    async def handle_peer_message(self, cloud: str, message: InboundMessage) -> None:
        if not message.payload:
            return  # a cleared retained message
        _, topic_cloud, stage = parse_federation_topic(message.topic)
        if topic_cloud != cloud:
            raise MalformedMessage(f"{message.topic!r} arrived from the broker of {cloud}")
        if stage == "vote":
            vote = open_vote(message.payload, deployment=self.deployment, keys=self.keys)
            self._seen(cloud)  # peers relay each other's votes; the voter signed it
            await self._inputs.put(_Input("vote", vote))
        elif stage == "proposal":
            limit = len(self.clouds) * max_aggregate_bytes(self.spec)
            if len(message.payload) > limit:
                raise LimitExceeded(
                    f"proposal of {len(message.payload)} bytes; at most {limit} "
                    f"({len(self.clouds)} aggregates of this model)",
                    sender=cloud,
                )
            proposal = open_proposal(message.payload, deployment=self.deployment, keys=self.keys)
            self._seen(proposal.proposal.proposer)
            await self._inputs.put(_Input("proposal", proposal))
        elif stage == "aggregate":
            if len(message.payload) > max_aggregate_bytes(self.spec):
                raise LimitExceeded(
                    f"aggregate of {len(message.payload)} bytes; at most "
                    f"{max_aggregate_bytes(self.spec)} for this model",
                    sender=cloud,
                )
            envelope, payload = open_signed(
                message.payload, deployment=self.deployment, keys=self.keys
            )
            if not isinstance(payload, CloudAggregate) or envelope.sender != cloud:
                raise MalformedMessage(f"not {cloud}'s aggregate on {message.topic!r}")
            self._seen(cloud)
            if not self._height - 1 <= payload.round <= self._height + AGGREGATE_HEIGHTS:
                self._count("ignored_aggregate")
                return  # far from the height at hand: never held (bounded memory)
            shapes = {a.name: tuple(a.shape) for a in payload.delta}
            if len(shapes) != len(payload.delta) or shapes != dict(parameter_shapes(self.spec)):
                raise MalformedMessage(
                    f"aggregate of {cloud} for height {payload.round} does not have the "
                    "model spec's arrays",
                    sender=cloud,
                )
            last = self._last_aggregate.get(cloud, -1)
            self._last_aggregate[cloud] = max(last, payload.round)
            self._aggregates.setdefault(payload.round, {})[cloud] = message.payload
            self._record_aggregate(payload.round, cloud, message.payload, payload)
        else:
            await self._on_peer_model(message.payload)

    async def _on_peer_model(self, raw: bytes) -> None:
        envelope, payload = open_signed(raw, deployment=self.deployment, keys=self.keys)
        if not isinstance(payload, GlobalModel) or payload.certificate is None:
            raise MalformedMessage("a federation model needs a certificate", sender=envelope.sender)
        self._seen(envelope.sender)
        height = payload.round
        if height < self._height or height in self._decided:
            return
        certificate = verify_certificate(
            height=height,
            value=payload.digest,
            certificate=payload.certificate,
            deployment=self.deployment,
            keys=self.keys,
            quorum=self.quorum,
        )
        model = ModelRecord.from_weights(
            round=height,
            parent_digest=payload.parent_digest,
            spec=payload.spec,
            weights=decode_arrays(payload.weights),
        )
        if model.digest != payload.digest:
            raise MalformedMessage("certified model's content does not match its digest")
        if height == self._height:
            # Before decide() names the base, it is the store's head: the retained models a
            # restarted coordinator receives first must not be refused for want of a base.
            base = self._base or self.store.head_model()
            if base is None or model.parent_digest != base.digest:
                raise MalformedMessage("certified model is not a child of this height's base")
        self._candidates.setdefault(model.digest, model)
        if height == self._height and self._core.state.height == height:
            await self._inputs.put(_Input("certificate", certificate))  # stop voting
        elif height > self._core.state.height:  # adopted without the core: status says so
            self._caught_up_to = max(self._caught_up_to or 0, height)
        self._finish(height, certificate, model)  # later heights: kept for catch-up

    async def _feed_core(self) -> None:
        while True:
            item = await self._inputs.get()
            core = self._core
            if item.kind == "vote":
                assert isinstance(item.item, SignedVote)
                vote = item.item.vote
                if core.keeps(vote.height, vote.round):
                    self._keep_peer_message(item.item)
                actions = core.on_vote(item.item)
            elif item.kind == "proposal":
                assert isinstance(item.item, SignedProposal)
                proposal = item.item.proposal
                if core.keeps(proposal.height, proposal.round) and proposal.proposer == (
                    core.proposer(proposal.height, proposal.round)
                ):
                    self._keep_peer_message(item.item)
                actions = core.on_proposal(item.item)
            elif item.kind == "timeout":
                assert isinstance(item.item, Timeout)
                actions = core.on_timeout(item.item)
            elif item.kind == "certificate":
                assert isinstance(item.item, CommitCertificate)
                actions = core.on_certificate(item.item)
            else:
                assert isinstance(item.item, tuple)
                height, round_, value, content = item.item
                actions = core.on_value(height, round_, value, content)
            await self._apply(actions)

    def _keep_peer_message(self, signed: SignedVote | SignedProposal) -> None:
        """Store a peer's vote or proposal (only those the core looks at, and per voter and
        step the first two: the one counted and the first conflicting one, the evidence);
        a store that refuses one is logged, and the core still counts it."""
        slot: tuple[int, int, str, str]
        if isinstance(signed, SignedVote):
            v = signed.vote
            slot, value = (v.height, v.round, v.step, v.voter), v.value
        else:
            p = signed.proposal
            slot, value = (p.height, p.round, "proposal", p.proposer), p.value
        values = self._kept_per_slot.setdefault(slot, set())
        if value not in values and len(values) >= 2:
            # An equivocator's third and later values: two are the proof already. (Copies
            # of a stored one, as gossip re-sends them, cost nothing: the store keeps one.)
            self._count("not_stored")
            return
        values.add(value)
        try:
            if isinstance(signed, SignedVote):
                self._record_vote(signed, own=False)
            else:
                self._record_proposal(signed, own=False)
        except StoreError as exc:
            self._count("not_stored")
            log_event(log, logging.ERROR, "federation message not stored", error=str(exc))

    async def _gossip(self) -> None:
        while True:
            await asyncio.sleep(GOSSIP_S)
            self._write_status()
            state = self._core.state
            if state.height == self._height and self._height not in self._decided:
                await self._apply(self._core.rebroadcast())  # not while collecting the next

    # -- actions ---------------------------------------------------------------------------
    async def _apply(self, actions: Sequence[Action]) -> None:
        for action in actions:
            if isinstance(action, Persist):
                write_journal(self.state_dir, action.state)
            elif isinstance(action, Broadcast):
                await self._broadcast(action.message)
            elif isinstance(action, Relay):  # a peer's vote that justifies our valid value
                await self._broadcast(action)
            elif isinstance(action, ScheduleTimeout):
                self._schedule(action)
            elif isinstance(action, RequestValue):
                self._start_value(action.height, action.round)
            elif isinstance(action, Decided):
                self._on_decided(action)
            elif isinstance(action, Evidence):
                self._record_evidence(action)

    async def _broadcast(self, message: object) -> None:
        try:
            await self._publish_signed(message)
        except aiomqtt.MqttError as exc:  # gossip sends it again; the journal has it
            log_event(log, logging.WARNING, "federation publish failed", error=str(exc))

    async def _publish_signed(self, message: object) -> None:
        if isinstance(message, Relay):
            topic = federation_topic(self.deployment, self.cloud, "vote")
            await self.own_link.publish(topic, message.message.signature)
        elif isinstance(message, SignedVote):
            self._record_vote(message, own=True)
            topic = federation_topic(self.deployment, self.cloud, "vote")
            await self.own_link.publish(topic, message.signature)
        elif isinstance(message, SignedProposal):
            self._record_proposal(message, own=True)
            topic = federation_topic(self.deployment, self.cloud, "proposal")
            await self.own_link.publish(topic, message.signature)
        # A CommitCertificate travels inside the certified model (published on decision).

    def _schedule(self, action: ScheduleTimeout) -> None:
        loop = asyncio.get_running_loop()

        def fire() -> None:
            try:
                self._inputs.put_nowait(_Input("timeout", action.timeout))
            except asyncio.QueueFull:  # a flood of peer messages: try again, never drop it
                log_event(log, logging.WARNING, "consensus input queue full", **self._fields())
                loop.call_later(TIMEOUT_RETRY_S, fire)

        loop.call_later(action.seconds, fire)

    def _start_value(self, height: int, round_: int) -> None:
        if self._value_task is not None and not self._value_task.done():
            self._value_task.cancel()
        self._value_task = asyncio.get_running_loop().create_task(
            self._provide_value(height, round_)
        )

    async def _provide_value(self, height: int, round_: int) -> None:
        """getValue(): the usable aggregates at hand, once they are at least a quorum."""
        while True:
            usable = self._usable_aggregates(height)
            if len(usable) >= self.quorum:
                break
            await asyncio.sleep(0.1)
        content = proposal_content(tuple(usable[c] for c in sorted(usable)))
        model = self._model_from_content(height, content)
        self._candidates[model.digest] = model
        self._contents[model.digest] = content
        await self._inputs.put(_Input("value", (height, round_, model.digest, content)))

    def _usable_aggregates(self, height: int) -> dict[str, bytes]:
        usable: dict[str, bytes] = {}
        for cloud, raw in self._aggregates.get(height, {}).items():
            first_look = _check_key(height, raw) not in self._checked
            try:
                self._contribution(height, raw)
            except (FedgateError, ValueError) as exc:
                if first_look:  # counted, stored and logged once per aggregate
                    self._count("invalid_aggregate")
                    self.store.record_event(
                        "invalid_aggregate", detail=f"federation: {exc}", round=height
                    )
                    log_event(
                        log,
                        logging.WARNING,
                        "aggregate refused",
                        **self._fields(height=height, sender=cloud, reason=str(exc)),
                    )
                continue
            usable[cloud] = raw
        return usable

    def _on_decided(self, action: Decided) -> None:
        model = self._candidates.get(action.value)
        if model is None and action.content is not None:
            model = self._model_from_content(action.height, action.content)
        if model is None:
            log_event(
                log,
                logging.WARNING,
                "decided without the model; waiting for a peer's certified copy",
                **self._fields(height=action.height),
            )
            return
        self._finish(action.height, action.certificate, model)

    def _finish(self, height: int, certificate: CommitCertificate, model: ModelRecord) -> None:
        """Hand the decided model to whoever waits for ``height`` (the service)."""
        if height in self._decided:
            return
        self._decided[height] = DecidedModel(
            model=model,
            certificate=certificate_to_wire(certificate),
            signers=tuple(v.vote.voter for v in certificate.precommits),
            consensus_round=certificate.round,
            combined=self._combined(height, model.digest),
        )
        for old in [h for h in self._decided if h < height - KEEP_MODELS]:
            del self._decided[old]
        waiter = self._decision_waiters.pop(height, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(self._decided[height])

    def _combined(self, height: int, value: str) -> tuple[str, ...] | None:
        """Whose aggregates the decided value holds: from the proposal content this node
        validated, else from a signed proposal for it in the votes table."""
        content = self._contents.get(value)
        if content is None:
            for record in self.store.votes(height=height):
                if record.step == "proposal" and record.value == value:
                    try:
                        content = open_proposal(
                            record.envelope, deployment=self.deployment, keys=self.keys
                        ).proposal.content
                    except ProtocolError:
                        continue
                    break
        if content is None:
            return None
        try:
            return tuple(sorted(_sender(raw) for raw in content_aggregates(content)))
        except ProtocolError:
            return None

    def record_decision(self, decided: DecidedModel) -> None:
        """Keep the decision and its certificate (idempotent). The service calls it before it
        stores the decided model: a crash between the two then leaves a decision whose model
        is fetched again, never a model in the chain without its decision."""
        model = decided.model
        self.store.record_decision(
            DecisionRecord(
                height=model.round,
                round=decided.consensus_round,
                value=model.digest,
                signers=decided.signers,
                certificate=msgspec.msgpack.encode(decided.certificate),
            )
        )

    async def publish_decision(self, decided: DecidedModel) -> None:
        """Store the decision (if not yet) and publish the certified model for peers
        (retained)."""
        model = decided.model
        self.record_decision(decided)
        raw = global_model_message(
            model,
            decided.certificate,
            signing_key=self._key,
            deployment=self.deployment,
            cloud=self.cloud,
        )
        await self.own_link.publish(
            federation_topic(self.deployment, self.cloud, "model", model.round), raw, retain=True
        )
        old = model.round - KEEP_MODELS
        if old >= 1:
            topic = federation_topic(self.deployment, self.cloud, "model", old)
            await self.own_link.publish(topic, b"", retain=True)
        self._write_status()
        log_event(
            log,
            logging.INFO,
            "global model decided",
            **self._fields(
                height=model.round,
                round=decided.consensus_round,
                model=model.digest[:12],
                signers=",".join(decided.signers),
            ),
        )

    # -- bookkeeping -----------------------------------------------------------------------
    def _fields(self, **extra: object) -> dict[str, object]:
        return {"deployment": self.deployment, "cloud": self.cloud, **extra}

    def _count(self, kind: str) -> None:
        self.rejected[kind] = self.rejected.get(kind, 0) + 1

    def _reject(self, exc: ProtocolError, topic: str) -> None:
        self._count(exc.kind)
        try:
            self.store.record_event(
                exc.kind, detail=f"federation: {exc} (topic {topic[:200]!r})", agent_id=exc.sender
            )
        except StoreError as failure:  # bookkeeping of bad input must not stop the service
            log_event(log, logging.ERROR, "rejection not recorded", error=str(failure))
        log_event(
            log,
            logging.WARNING,
            "federation message rejected",
            **self._fields(kind=exc.kind, sender=exc.sender or "-", error=str(exc)),
        )

    def _seen(self, cloud: str) -> None:
        peer = self.peers.get(cloud)
        if peer is not None:
            peer.last_seen = time.time()

    def _record_vote(self, signed: SignedVote, *, own: bool) -> None:
        vote = signed.vote
        self.store.record_vote(
            VoteRecord(
                height=vote.height,
                round=vote.round,
                step=vote.step,
                voter=vote.voter,
                value=vote.value,
                own=own,
                envelope=signed.signature,
            )
        )

    def _record_proposal(self, signed: SignedProposal, *, own: bool) -> None:
        """Store a signed proposal; a second, different one of the same proposer for the
        same (height, round) is equivocation and is kept as evidence with the first."""
        proposal = signed.proposal
        for earlier in self.store.votes(height=proposal.height):
            if (
                earlier.step == "proposal"
                and earlier.round == proposal.round
                and earlier.voter == proposal.proposer
                and earlier.value != proposal.value
            ):
                self._keep_evidence(
                    EvidenceRecord(
                        voter=proposal.proposer,
                        height=proposal.height,
                        round=proposal.round,
                        step="proposal",
                        first_value=earlier.value,
                        second_value=proposal.value,
                        first_envelope=earlier.envelope,
                        second_envelope=signed.signature,
                    )
                )
                break
        self.store.record_vote(
            VoteRecord(
                height=proposal.height,
                round=proposal.round,
                step="proposal",
                voter=proposal.proposer,
                value=proposal.value,
                own=own,
                envelope=signed.signature,
            )
        )

    def _record_aggregate(
        self, height: int, cloud: str, raw: bytes, aggregate: CloudAggregate
    ) -> None:
        try:
            norm = delta_norm(decode_arrays(aggregate.delta, require_finite=False))
        except FedgateError:
            norm = float("nan")
        self.store.record_cloud_aggregate(
            AggregateRecord(
                height=height,
                cloud=cloud,
                base_digest=aggregate.base_digest,
                participants=aggregate.participants,
                norm=norm if np.isfinite(norm) else -1.0,
                digest=hashlib.sha256(raw).hexdigest(),
            )
        )

    def _record_evidence(self, action: Evidence) -> None:
        first, second = action.first, action.second
        self._keep_evidence(
            EvidenceRecord(
                voter=first.vote.voter,
                height=first.vote.height,
                round=first.vote.round,
                step=first.vote.step,
                first_value=first.vote.value,
                second_value=second.vote.value,
                first_envelope=first.signature,
                second_envelope=second.signature,
            )
        )

    def _keep_evidence(self, evidence: EvidenceRecord) -> None:
        if not self.store.record_evidence(evidence):
            return  # this pair is known already
        self.store.record_event(
            "equivocation",
            detail=(
                f"{evidence.voter} signed two {evidence.step}s at height {evidence.height} "
                f"round {evidence.round}"
            ),
            round=evidence.height,
        )
        log_event(
            log,
            logging.ERROR,
            "conflicting signed messages: evidence recorded",
            **self._fields(voter=evidence.voter, height=evidence.height, step=evidence.step),
        )

    def status(self) -> FederationStatus:
        for cloud, link in self.peer_links.items():
            self.peers[cloud].connected = link.connected.is_set()
        state = self._core.state
        # Heights adopted from peers' certified models (catch-up) never reach the core: the
        # last one adopted is the height at hand until the core starts the next.
        adopted = self._caught_up_to or 0
        caught_up = adopted > state.height
        return FederationStatus(
            updated=time.time(),
            height=adopted if caught_up else state.height,
            round=0 if caught_up else state.round,
            step="catch-up" if caught_up else str(state.step),
            clouds=len(self.clouds),
            quorum=self.quorum,
            faults_tolerated=faults_tolerated(len(self.clouds)),
            peers=list(self.peers.values()),
            rejected=dict(self.rejected),
        )

    def _write_status(self) -> None:
        path = self.state_dir / STATUS_NAME
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(msgspec.json.encode(self.status()))
        tmp.replace(path)

    def consensus_state(self) -> ConsensusState:
        return self._core.state


def _sender(raw: bytes) -> str:
    return open_envelope(raw).sender


def _check_key(height: int, raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest() + height.to_bytes(8, "big")
