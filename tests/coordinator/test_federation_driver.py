"""The consensus driver against a real broker: a coordinator that crashes after writing a
vote to its journal but before sending it never signs a different value after restarting;
votes replayed into another height, round, step or deployment are refused."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import nacl.signing
import numpy as np
import pytest
from fedgate_common.arrays import encode_arrays
from fedgate_common.consensus.manifest import ConsensusParams, SignedManifest
from fedgate_common.consensus.tendermint import ConsensusState
from fedgate_common.consensus.types import Proposal, Vote
from fedgate_common.consensus.wire import open_vote, proposal_content, seal_proposal, seal_vote
from fedgate_common.envelope import Envelope, seal
from fedgate_common.errors import (
    BadSignature,
    BrokerTlsInvalid,
    EnvelopeMismatch,
    MalformedMessage,
    UnknownSender,
)
from fedgate_common.messages import CloudAggregate
from fedgate_common.model_spec import ModelSpec, parameter_shapes
from fedgate_common.topics import federation_topic
from fedgate_coordinator.broker_config import BrokerAuthority
from fedgate_coordinator.config import CoordinatorConfig, FederationSettings, PeerBroker, validate
from fedgate_coordinator.consensus_journal import read_journal, write_journal
from fedgate_coordinator.errors import ConfigError
from fedgate_coordinator.federation import FederationNode, global_model_message
from fedgate_coordinator.genesis import genesis_record
from fedgate_coordinator.mqtt_link import InboundMessage, MqttLink, MqttSettings
from fedgate_coordinator.store import ModelRecord, Store

from tests.federation_support import certificate, federation_manifest

SPEC = ModelSpec(n_features=3, window=8, n_classes=2, channels=4)
DIGEST = "ab" * 32


async def eventually(predicate: Callable[[], bool], seconds: float = 20) -> None:
    for _ in range(int(seconds * 10)):
        if predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not reached in time")


class Crash(Exception):
    """Stands for the process dying (power cut, kill -9) inside a publish."""


def aggregate(height: int, base: ModelRecord, seed: int) -> CloudAggregate:
    rng = np.random.default_rng(seed)
    delta = {n: rng.normal(0, 0.01, s).astype(np.float32) for n, s in parameter_shapes(SPEC)}
    return CloudAggregate(
        round=height, base_digest=base.digest, participants=3, delta=encode_arrays(delta)
    )


async def run_height(
    node: FederationNode, link: MqttLink, base: ModelRecord, agg: CloudAggregate
) -> ModelRecord:
    async with asyncio.TaskGroup() as group:
        group.create_task(link.run())
        group.create_task(node.run())
        decided = await asyncio.wait_for(node.decide(1, base, agg), 30)
        raise _Done(decided.model)
    raise AssertionError("unreachable")


class _Done(Exception):
    def __init__(self, model: ModelRecord) -> None:
        super().__init__()
        self.model = model


async def test_restart_between_signing_and_sending_sends_the_same_vote(tmp_path: Path) -> None:
    deployment = f"restart-{secrets.token_hex(4)}"
    key = nacl.signing.SigningKey.generate()
    manifest = federation_manifest(deployment=deployment, keys={"c1": key}, spec=SPEC)
    store = Store.open(f"sqlite:///{tmp_path / 'c.db'}")
    genesis = genesis_record(SPEC, manifest.manifest.genesis_seed)
    store.add_model(genesis)
    sent: list[bytes] = []

    def node_with(link: MqttLink) -> FederationNode:
        return FederationNode(
            deployment=deployment,
            cloud="c1",
            manifest=manifest,
            signing_key=key,
            store=store,
            own_link=link,
            state_dir=tmp_path,
        )

    class CrashingLink(MqttLink):
        async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
            if topic.endswith("/vote"):
                raise Crash  # the prevote is in the journal, not on the wire
            await super().publish(topic, payload, retain=retain)

    class RecordingLink(MqttLink):
        async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
            if topic.endswith("/vote"):
                sent.append(payload)
            await super().publish(topic, payload, retain=retain)

    settings = MqttSettings(client_id=f"{deployment}-1")
    first = CrashingLink(settings=settings, subscriptions=[])
    with pytest.raises(ExceptionGroup) as crashed:
        await run_height(node_with(first), first, genesis, aggregate(1, genesis, 1))
    assert crashed.group_contains(Crash)
    journal = read_journal(tmp_path)
    assert journal is not None
    # One cloud is its own quorum: prevote and precommit are signed in one step, both
    # journaled before the first publish crashed.
    journaled = {(v.vote.round, v.vote.step): v for v in journal.own_votes}
    prevote = journaled[0, "prevote"]

    # Restarted with a different aggregate at hand: it must not sign a new value.
    second = RecordingLink(settings=MqttSettings(client_id=f"{deployment}-2"), subscriptions=[])
    with pytest.raises(ExceptionGroup) as finished:
        await run_height(node_with(second), second, genesis, aggregate(1, genesis, 2))
    done = finished.value.subgroup(_Done)
    assert done is not None
    model = done.exceptions[0]
    assert isinstance(model, _Done)
    assert model.model.digest == prevote.vote.value  # decided what it had voted for
    votes = [open_vote(raw, deployment=deployment, keys={"c1": key.verify_key}) for raw in sent]
    for signed in votes:  # every vote sent after the restart is the journaled one
        assert signed.signature == journaled[signed.vote.round, signed.vote.step].signature
    assert {(v.vote.round, v.vote.step) for v in votes} >= {(0, "prevote")}
    own = [v for v in store.votes(height=1) if v.own]
    assert len({(v.round, v.step) for v in own}) == len(own)
    store.close()


def test_votes_replayed_elsewhere_are_refused() -> None:
    key = nacl.signing.SigningKey.generate()
    keys = {"c1": key.verify_key}
    vote = Vote(height=3, round=1, step="prevote", value=DIGEST, voter="c1")
    raw = seal_vote(vote, deployment="plant", signing_key=key).signature
    assert open_vote(raw, deployment="plant", keys=keys).vote == vote
    envelope = msgspec.msgpack.decode(raw, type=Envelope)
    # Another height: the envelope's round is the height and is signed.
    moved = msgspec.msgpack.encode(msgspec.structs.replace(envelope, round=4))
    with pytest.raises(BadSignature):
        open_vote(moved, deployment="plant", keys=keys)
    # Another consensus round or step: both sit in the signed payload.
    for change in ({"consensus_round": 2}, {"step": "precommit"}, {"value": "cd" * 32}):
        payload = msgspec.msgpack.decode(envelope.payload)
        payload.update(change)
        forged = msgspec.structs.replace(envelope, payload=msgspec.msgpack.encode(payload))
        with pytest.raises(BadSignature):
            open_vote(msgspec.msgpack.encode(forged), deployment="plant", keys=keys)
    # Another deployment: refused before the signature is even checked.
    with pytest.raises(EnvelopeMismatch):
        open_vote(raw, deployment="other-plant", keys=keys)
    relabelled = msgspec.msgpack.encode(msgspec.structs.replace(envelope, deployment="other"))
    with pytest.raises(BadSignature):
        open_vote(relabelled, deployment="other", keys=keys)
    # A voter that is not in the manifest.
    with pytest.raises(UnknownSender):
        open_vote(raw, deployment="plant", keys={"c2": key.verify_key})


@dataclass
class FourClouds:
    """c1's driver (not started) in a federation of four clouds, with every cloud's key."""

    deployment: str
    keys: dict[str, nacl.signing.SigningKey]
    store: Store
    genesis: ModelRecord
    link: MqttLink
    node: FederationNode


def c1_of_four(tmp_path: Path, label: str) -> FourClouds:
    """A store with the genesis, and c1's node on it; a long propose timeout, so the tests'
    messages decide what happens at height 1."""
    deployment = f"{label}-{secrets.token_hex(4)}"
    keys = {c: nacl.signing.SigningKey.generate() for c in ("c1", "c2", "c3", "c4")}
    manifest = federation_manifest(
        deployment=deployment,
        keys=keys,
        spec=SPEC,
        consensus=ConsensusParams(aggregate_wait_s=0.2, timeout_propose_s=30),
    )
    store = Store.open(f"sqlite:///{tmp_path / 'c.db'}")
    genesis = genesis_record(SPEC, manifest.manifest.genesis_seed)
    store.add_model(genesis)
    link = MqttLink(settings=MqttSettings(client_id=f"{deployment}-c1"), subscriptions=[])
    node = FederationNode(
        deployment=deployment,
        cloud="c1",
        manifest=manifest,
        signing_key=keys["c1"],
        store=store,
        own_link=link,
        state_dir=tmp_path,
    )
    return FourClouds(deployment, keys, store, genesis, link, node)


async def test_conflicting_votes_and_proposals_of_a_peer_are_kept_as_evidence(
    tmp_path: Path,
) -> None:
    four = c1_of_four(tmp_path, "evidence")
    deployment, keys, store, genesis, link, node = (
        four.deployment,
        four.keys,
        four.store,
        four.genesis,
        four.link,
        four.node,
    )
    tasks = [asyncio.create_task(link.run()), asyncio.create_task(node.run())]
    deciding = asyncio.create_task(node.decide(1, genesis, aggregate(1, genesis, 1)))
    try:
        for index, cloud in enumerate(("c2", "c3"), start=2):
            raw = seal(
                aggregate(1, genesis, index),
                signing_key=keys[cloud],
                deployment=deployment,
                cloud=cloud,
                sender=cloud,
            )
            topic = federation_topic(deployment, cloud, "aggregate")
            await node.handle_peer_message(cloud, InboundMessage(topic, raw))
        await eventually(lambda: node.consensus_state().height == 1)  # a quorum of aggregates
        for value in ("ab" * 32, "cd" * 32):
            vote = Vote(height=1, round=0, step="prevote", value=value, voter="c2")
            raw = seal_vote(vote, deployment=deployment, signing_key=keys["c2"]).signature
            topic = federation_topic(deployment, "c2", "vote")
            await node.handle_peer_message("c2", InboundMessage(topic, raw))
        await eventually(lambda: bool(store.evidence()))
        (evidence,) = store.evidence()
        assert (evidence.voter, evidence.height, evidence.round, evidence.step) == (
            "c2",
            1,
            0,
            "prevote",
        )
        assert {evidence.first_value, evidence.second_value} == {"ab" * 32, "cd" * 32}
        # Both signed messages are kept: anyone with the manifest can check the proof.
        for raw in (evidence.first_envelope, evidence.second_envelope):
            assert open_vote(raw, deployment=deployment, keys={"c2": keys["c2"].verify_key})
        assert store.event_counts().get("equivocation") == 1

        # Two different proposals of c2, the proposer of (height 1, round 0): evidence too.
        for value in ("ab" * 32, "cd" * 32):
            proposal = Proposal(
                height=1,
                round=0,
                value=value,
                valid_round=-1,
                proposer="c2",
                content=proposal_content(()),
            )
            raw = seal_proposal(proposal, deployment=deployment, signing_key=keys["c2"]).signature
            topic = federation_topic(deployment, "c2", "proposal")
            await node.handle_peer_message("c2", InboundMessage(topic, raw))
        await eventually(lambda: len(store.evidence()) == 2)
        proposals = [e for e in store.evidence() if e.step == "proposal"]
        assert [(e.voter, e.height, e.round) for e in proposals] == [("c2", 1, 0)]
        assert store.event_counts().get("equivocation") == 2
    finally:
        deciding.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(deciding, *tasks, return_exceptions=True)
        store.close()


def test_peer_logins_are_checked_before_any_connection(tmp_path: Path) -> None:
    keys = {c: nacl.signing.SigningKey.generate() for c in ("c1", "c2")}
    signed = federation_manifest(deployment="plant", keys=keys, spec=SPEC)
    tls_peer = msgspec.structs.replace(signed.manifest.clouds[1], tls=True)
    manifest = msgspec.structs.replace(
        signed,
        manifest=msgspec.structs.replace(
            signed.manifest, clouds=(signed.manifest.clouds[0], tls_peer)
        ),
    )
    store = Store.open("sqlite://")
    link = MqttLink(settings=MqttSettings(), subscriptions=[])
    arguments = {
        "deployment": "plant",
        "cloud": "c1",
        "manifest": manifest,
        "signing_key": keys["c1"],
        "store": store,
        "own_link": link,
        "state_dir": tmp_path,
    }
    with pytest.raises(ConfigError, match=r"federation\.peers\.c2\.tls_ca_file"):
        FederationNode(**arguments)  # type: ignore[arg-type]
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate")
    login = PeerBroker(username="c1", password_file=str(tmp_path / "pw"), tls_ca_file=str(ca))
    with pytest.raises(BrokerTlsInvalid, match="cannot load the CA file"):
        FederationNode(**arguments, peer_logins={"c2": login})  # type: ignore[arg-type]
    authority = BrokerAuthority(tmp_path / "pki", deployment="plant", cloud="c2")
    authority.load_or_create()
    ca.write_bytes((tmp_path / "pki" / "ca.pem").read_bytes())
    node = FederationNode(**arguments, peer_logins={"c2": login})  # type: ignore[arg-type]
    settings = node.peer_links["c2"].settings
    assert (settings.username, settings.tls_ca_file) == ("c1", str(ca))
    store.close()

    config = CoordinatorConfig(
        deployment="plant",
        cloud="c1",
        database_url="sqlite://",
        federation=FederationSettings(peers={"c2": login}),
    )
    problems = validate(config)
    assert problems == [f"federation.peers.c2.password_file={str(tmp_path / 'pw')!r}: no such file"]


@dataclass
class CatchUp:
    """Four clouds; c1's store holds the genesis; c2 sends the certified child at height 1."""

    deployment: str
    keys: dict[str, nacl.signing.SigningKey]
    manifest: SignedManifest
    store: Store
    genesis: ModelRecord
    child: ModelRecord
    certified: InboundMessage

    def node(self, state_dir: Path, link: MqttLink | None = None) -> FederationNode:
        """c1's consensus driver on this store (a link that never connects by default)."""
        return FederationNode(
            deployment=self.deployment,
            cloud="c1",
            manifest=self.manifest,
            signing_key=self.keys["c1"],
            store=self.store,
            own_link=link or MqttLink(settings=MqttSettings(), subscriptions=[]),
            state_dir=state_dir,
        )


def catch_up(tmp_path: Path, name: str, seed: int) -> CatchUp:
    deployment = f"{name}-{secrets.token_hex(4)}"
    keys = {c: nacl.signing.SigningKey.generate() for c in ("c1", "c2", "c3", "c4")}
    manifest = federation_manifest(deployment=deployment, keys=keys, spec=SPEC)
    store = Store.open(f"sqlite:///{tmp_path / 'c.db'}")
    genesis = genesis_record(SPEC, manifest.manifest.genesis_seed)
    store.add_model(genesis)
    rng = np.random.default_rng(seed)
    child = ModelRecord.from_weights(
        round=1,
        parent_digest=genesis.digest,
        spec=SPEC,
        weights={n: rng.normal(0, 1, s).astype(np.float32) for n, s in parameter_shapes(SPEC)},
    )
    cert = certificate(
        deployment=deployment, height=1, digest=child.digest, keys=keys, signers=("c2", "c3", "c4")
    )
    certified = InboundMessage(
        federation_topic(deployment, "c2", "model", 1),
        global_model_message(
            child, cert, signing_key=keys["c2"], deployment=deployment, cloud="c2"
        ),
    )
    return CatchUp(deployment, keys, manifest, store, genesis, child, certified)


async def test_a_restarted_coordinator_adopts_a_peers_certified_model_before_it_decides(
    tmp_path: Path,
) -> None:
    """Retained certified models reach a restarted coordinator as soon as its peer links
    connect, before its round loop calls decide(): the store's head is their base."""
    setup = catch_up(tmp_path, "catch-up", seed=3)
    deployment, keys, store = setup.deployment, setup.keys, setup.store
    child, topic = setup.child, setup.certified.topic
    node = setup.node(tmp_path)
    await node.handle_peer_message("c2", setup.certified)
    decided = node.known_decision(1)
    assert decided is not None
    assert decided.model.digest == child.digest
    assert sorted(decided.signers) == ["c2", "c3", "c4"]
    # A certified model that is not a child of the head is still refused.
    stranger = ModelRecord.from_weights(
        round=1, parent_digest="ef" * 32, spec=SPEC, weights=child.decode_weights()
    )
    other = setup.node(tmp_path)
    cert = certificate(deployment=deployment, height=1, digest=stranger.digest, keys=keys)
    raw = global_model_message(
        stranger, cert, signing_key=keys["c2"], deployment=deployment, cloud="c2"
    )
    with pytest.raises(MalformedMessage, match="not a child"):
        await other.handle_peer_message("c2", InboundMessage(topic, raw))
    store.close()


async def test_a_certified_model_that_arrives_while_the_aggregate_is_published_is_adopted(
    tmp_path: Path,
) -> None:
    """A coordinator that fell behind (stopped, then resumed) calls decide() while its
    peers' certified model for that height is already in flight. If the model arrives
    during the aggregate's publish, decide() returns it; before the fix it started the
    height and then waited for ever (the peers had moved on, nobody would vote)."""
    setup = catch_up(tmp_path, "race", seed=4)
    deployment, store, genesis = setup.deployment, setup.store, setup.genesis
    delivered: list[str] = []

    class PeerModelDuringPublish(MqttLink):
        async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
            await super().publish(topic, payload, retain=retain)
            if topic.endswith("/aggregate"):  # the real broker acknowledged; then the model
                await node.handle_peer_message("c2", setup.certified)
                delivered.append(topic)

    link = PeerModelDuringPublish(
        settings=MqttSettings(client_id=f"{deployment}-c1"), subscriptions=[]
    )
    node = setup.node(tmp_path, link)
    async with asyncio.TaskGroup() as group:
        runner = group.create_task(link.run())
        decided = await asyncio.wait_for(node.decide(1, genesis, aggregate(1, genesis, 1)), 20)
        runner.cancel()
    assert delivered, "the model was not delivered during the publish"
    assert decided.model.digest == setup.child.digest
    assert sorted(decided.signers) == ["c2", "c3", "c4"]
    store.close()


def test_a_journal_ahead_of_its_store_is_logged_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """consensus-state.msgpack at height 5, the store at its genesis (restored from an older
    copy): the node says so when it starts, instead of waiting in silence."""
    key = nacl.signing.SigningKey.generate()
    manifest = federation_manifest(deployment="plant", keys={"c1": key}, spec=SPEC)
    store = Store.open(f"sqlite:///{tmp_path / 'c.db'}")
    store.add_model(genesis_record(SPEC, manifest.manifest.genesis_seed))
    write_journal(tmp_path, ConsensusState(height=5))
    settings = MqttSettings(client_id="plant-c1")
    with caplog.at_level("WARNING", logger="fedgate.coordinator"):
        FederationNode(
            deployment="plant",
            cloud="c1",
            manifest=manifest,
            signing_key=key,
            store=store,
            own_link=MqttLink(settings=settings, subscriptions=[]),
            state_dir=tmp_path,
        )
    store.close()
    message = "consensus journal ahead of the store"
    [record] = [r for r in caplog.records if r.getMessage() == message]
    fields = record.__dict__["fields"]
    assert (fields["journal_height"], fields["store_height"]) == (5, 1)
