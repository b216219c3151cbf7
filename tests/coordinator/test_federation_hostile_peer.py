"""One faulty cloud, with its real key, against a coordinator's consensus driver.

Every message here is correctly signed by a member of the federation, so signature checks do
not stop it. What must hold: a value or number the store cannot keep is refused on arrival
(it used to stop every honest coordinator, at every restart while it stayed retained);
votes and proposals the core will never look at are not stored (bounded disk); aggregates
are bounded in size and checked for the model's arrays before they are held (bounded
memory); and a known value re-proposed with other content is checked again, not taken on
trust. The node keeps deciding throughout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import nacl.signing
import numpy as np
import pytest
from fedgate_common.arrays import encode_arrays
from fedgate_common.consensus.tendermint import ScheduleTimeout, Timeout
from fedgate_common.consensus.types import Proposal, Vote
from fedgate_common.consensus.wire import (
    MAX_HEIGHT,
    open_proposal,
    open_vote,
    proposal_content,
    seal_proposal,
    seal_vote,
)
from fedgate_common.envelope import seal
from fedgate_common.errors import LimitExceeded, MalformedMessage
from fedgate_common.messages import CloudAggregate, ConsensusProposal, ConsensusVote, Payload
from fedgate_common.topics import federation_topic
from fedgate_coordinator.federation import FederationNode, _Input, max_aggregate_bytes
from fedgate_coordinator.mqtt_link import InboundMessage, MqttLink, MqttSettings
from fedgate_coordinator.store import ModelRecord, Store

from tests.coordinator.test_federation_driver import SPEC, aggregate, c1_of_four, eventually
from tests.federation_support import federation_manifest

CLOUDS = ("c1", "c2", "c3", "c4")


@dataclass
class Peer:
    """c1's driver deciding height 1, and the keys of every cloud."""

    deployment: str
    node: FederationNode
    store: Store
    genesis: ModelRecord
    keys: dict[str, nacl.signing.SigningKey]

    async def deliver(self, cloud: str, stage: str, raw: bytes) -> None:
        topic = federation_topic(self.deployment, cloud, stage)
        await self.node.handle_peer_message(cloud, InboundMessage(topic, raw))

    def signed(self, payload: Payload, cloud: str = "c4") -> bytes:
        return seal(
            payload,
            signing_key=self.keys[cloud],
            deployment=self.deployment,
            cloud=cloud,
            sender=cloud,
        )


@pytest.fixture
async def peer(tmp_path: Path) -> AsyncIterator[Peer]:
    four = c1_of_four(tmp_path, "hostile")
    node, genesis = four.node, four.genesis
    tasks = [asyncio.create_task(four.link.run()), asyncio.create_task(node.run())]
    deciding = asyncio.create_task(node.decide(1, genesis, aggregate(1, genesis, 1)))
    started = Peer(four.deployment, node, four.store, genesis, four.keys)
    try:
        for index, cloud in enumerate(("c2", "c3"), start=2):
            await started.deliver(
                cloud, "aggregate", started.signed(aggregate(1, genesis, index), cloud)
            )
        await eventually(lambda: node.consensus_state().height == 1)
        yield started
    finally:
        deciding.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(deciding, *tasks, return_exceptions=True)
        four.store.close()


@pytest.mark.parametrize(
    "payload",
    [
        ConsensusVote(round=2, consensus_round=0, step="prevote", value="ab"),
        ConsensusVote(round=2, consensus_round=0, step="prevote", value="ab" * 40),
        ConsensusVote(round=2**63, consensus_round=0, step="prevote", value="ab" * 32),
        ConsensusVote(round=2, consensus_round=2**64 - 1, step="precommit", value=""),
        ConsensusVote(round=MAX_HEIGHT + 1, consensus_round=0, step="prevote", value=""),
    ],
    ids=["short-value", "long-value", "height-2^63", "round-2^64-1", "height-past-2^31"],
)
def test_votes_the_store_could_not_keep_are_malformed(payload: ConsensusVote) -> None:
    key = nacl.signing.SigningKey.generate()
    raw = seal(payload, signing_key=key, deployment="plant", cloud="c4", sender="c4")
    with pytest.raises(MalformedMessage):
        open_vote(raw, deployment="plant", keys={"c4": key.verify_key})


def test_proposals_the_store_could_not_keep_are_malformed() -> None:
    key = nacl.signing.SigningKey.generate()
    for payload in (
        ConsensusProposal(round=2, consensus_round=0, value="abc", valid_round=-1, aggregates=()),
        ConsensusProposal(
            round=2, consensus_round=0, value="ab" * 32, valid_round=2**40, aggregates=()
        ),
    ):
        raw = seal(payload, signing_key=key, deployment="plant", cloud="c4", sender="c4")
        with pytest.raises(MalformedMessage):
            open_proposal(raw, deployment="plant", keys={"c4": key.verify_key})


async def test_a_short_value_vote_is_rejected_and_the_node_keeps_running(peer: Peer) -> None:
    raw = peer.signed(ConsensusVote(round=1, consensus_round=0, step="prevote", value="ab"))
    with pytest.raises(MalformedMessage):
        await peer.deliver("c4", "vote", raw)
    # An honest vote after it is still stored and counted: the driver's loop is alive.
    vote = Vote(height=1, round=0, step="prevote", value="cd" * 32, voter="c2")
    await peer.deliver(
        "c2",
        "vote",
        seal_vote(vote, deployment=peer.deployment, signing_key=peer.keys["c2"]).signature,
    )
    await eventually(lambda: any(v.voter == "c2" for v in peer.store.votes(height=1)))


async def test_votes_and_proposals_the_core_drops_are_not_stored(peer: Peer) -> None:
    far = [
        Vote(height=10**9 + i, round=0, step="prevote", value="ab" * 32, voter="c4")
        for i in range(50)
    ] + [Vote(height=1, round=10**6, step="precommit", value="", voter="c4")]
    for vote in far:
        raw = seal_vote(vote, deployment=peer.deployment, signing_key=peer.keys["c4"]).signature
        await peer.deliver("c4", "vote", raw)
    # Proposals at height 1 round 0 from c4, which is not proposer(1, 0) = c2.
    for value in ("ab" * 32, "cd" * 32):
        proposal = Proposal(
            height=1,
            round=0,
            value=value,
            valid_round=-1,
            proposer="c4",
            content=proposal_content(()),
        )
        raw = seal_proposal(
            proposal, deployment=peer.deployment, signing_key=peer.keys["c4"]
        ).signature
        await peer.deliver("c4", "proposal", raw)
    # A vote the core does look at, last: once it is stored, everything before was handled.
    kept = Vote(height=1, round=0, step="prevote", value="ef" * 32, voter="c4")
    await peer.deliver(
        "c4",
        "vote",
        seal_vote(kept, deployment=peer.deployment, signing_key=peer.keys["c4"]).signature,
    )
    await eventually(lambda: any(v.value == "ef" * 32 for v in peer.store.votes()))

    stored = [(v.height, v.round, v.step, v.voter) for v in peer.store.votes() if v.voter == "c4"]
    assert stored == [(1, 0, "prevote", "c4")]
    assert peer.store.evidence() == []


async def test_aggregates_are_bounded_and_checked_before_they_are_held(peer: Peer) -> None:
    limit = max_aggregate_bytes(SPEC)
    oversized = CloudAggregate(
        round=2,
        base_digest=peer.genesis.digest,
        participants=3,
        delta=encode_arrays({"junk": np.zeros(limit // 4 + 1, np.float32)}),
    )
    with pytest.raises(LimitExceeded):
        await peer.deliver("c4", "aggregate", peer.signed(oversized))
    wrong_arrays = msgspec.structs.replace(
        oversized, delta=encode_arrays({"junk": np.zeros(10, np.float32)})
    )
    with pytest.raises(MalformedMessage, match="model spec's arrays"):
        await peer.deliver("c4", "aggregate", peer.signed(wrong_arrays))
    far = msgspec.structs.replace(aggregate(10**6, peer.genesis, 4), round=10**6)
    await peer.deliver("c4", "aggregate", peer.signed(far))
    assert peer.node.rejected.get("ignored_aggregate") == 1
    assert 2 not in peer.node._aggregates
    assert 10**6 not in peer.node._aggregates
    proposal = ConsensusProposal(
        round=1, consensus_round=0, value="ab" * 32, valid_round=-1, aggregates=(b"x" * limit,) * 5
    )
    with pytest.raises(LimitExceeded):
        await peer.deliver("c4", "proposal", peer.signed(proposal))


async def test_a_known_value_with_other_content_is_checked_again(peer: Peer) -> None:
    """A faulty proposer re-proposes an honest value without its aggregates: the value's
    earlier check does not vouch for this content, which alone could not rebuild it."""
    node = peer.node
    await eventually(lambda: len(node._aggregates.get(1, {})) == 3)
    content = proposal_content(tuple(node._aggregates[1][c] for c in ("c1", "c2", "c3")))
    value = node._model_from_content(1, content).digest
    honest = Proposal(
        height=1, round=1, value=value, valid_round=-1, proposer="c3", content=content
    )
    junk = Proposal(
        height=1, round=1, value=value, valid_round=-1, proposer="c3", content=proposal_content(())
    )

    assert node._is_valid(honest)
    assert not node._is_valid(junk)
    assert node._contents[value] == content


async def test_a_timeout_that_finds_the_input_queue_full_is_not_lost(tmp_path: Path) -> None:
    """A flood fills the core's input queue when a step's timer fires: the timeout is
    offered again until there is room (dropped, it could leave a height hanging)."""
    keys = {c: nacl.signing.SigningKey.generate() for c in CLOUDS}
    manifest = federation_manifest(deployment="flood", keys=keys, spec=SPEC)
    with Store.open(f"sqlite:///{tmp_path / 'c.db'}") as store:
        node = FederationNode(
            deployment="flood",
            cloud="c1",
            manifest=manifest,
            signing_key=keys["c1"],
            store=store,
            own_link=MqttLink(settings=MqttSettings(client_id="flood-c1"), subscriptions=[]),
            state_dir=tmp_path,
        )
        queue = node._inputs
        while not queue.full():
            queue.put_nowait(_Input("vote", None))
        node._schedule(ScheduleTimeout(step="propose", height=1, round=0, seconds=0.0))
        await asyncio.sleep(0.3)  # fired at least once into the full queue
        while not queue.empty():
            assert queue.get_nowait().kind == "vote"
        await asyncio.sleep(0.3)
        offered = queue.get_nowait()
        assert offered.kind == "timeout"
        assert offered.item == Timeout(step="propose", height=1, round=0)


async def test_an_equivocators_flood_stores_two_messages_per_slot(peer: Peer) -> None:
    """Many different prevotes from one cloud for one (height, round): the first is counted,
    the first conflicting one is the evidence, the rest are not stored (disk bounded)."""
    for index in range(50):
        vote = Vote(height=1, round=0, step="prevote", value=f"{index:064x}", voter="c4")
        raw = seal_vote(vote, deployment=peer.deployment, signing_key=peer.keys["c4"]).signature
        await peer.deliver("c4", "vote", raw)
    await eventually(lambda: peer.node.rejected.get("not_stored", 0) == 48)
    stored = [v for v in peer.store.votes(height=1) if v.voter == "c4"]
    assert len(stored) == 2
    assert len(peer.store.evidence()) == 1
    assert peer.node.status().step != "catch-up"  # the core runs height 1: no catch-up shown


async def test_an_aggregate_with_its_arrays_in_another_order_is_held(peer: Peer) -> None:
    """The cloud's own intake and the aggregation take arrays by name: a peer must too, or
    one agent sending its arrays reordered would get its cloud's aggregate refused."""
    honest = aggregate(1, peer.genesis, 4)
    reordered = msgspec.structs.replace(honest, delta=tuple(reversed(honest.delta)))
    await peer.deliver("c4", "aggregate", peer.signed(reordered))
    assert "c4" in peer.node._aggregates[1]
    doubled = msgspec.structs.replace(honest, delta=(*honest.delta, honest.delta[0]))
    with pytest.raises(MalformedMessage, match="model spec's arrays"):
        await peer.deliver("c4", "aggregate", peer.signed(doubled))


async def test_a_resent_proposal_does_not_crowd_out_the_evidence(peer: Peer) -> None:
    """Gossip re-sends a proposal every few seconds: copies of the first must not use up the
    room kept for a conflicting second one, which is the equivocation evidence."""
    deployment, key = peer.deployment, peer.keys["c3"]

    def proposal(value: str) -> bytes:
        signed = Proposal(
            height=1,
            round=1,
            value=value,
            valid_round=-1,
            proposer="c3",  # proposer(1, 1)
            content=proposal_content(()),
        )
        return seal_proposal(signed, deployment=deployment, signing_key=key).signature

    for raw in (proposal("ab" * 32), proposal("ab" * 32), proposal("ab" * 32)):
        await peer.deliver("c3", "proposal", raw)
    await peer.deliver("c3", "proposal", proposal("cd" * 32))
    await eventually(lambda: len(peer.store.evidence()) == 1)
    [evidence] = peer.store.evidence()
    assert (evidence.voter, evidence.step) == ("c3", "proposal")
    assert peer.node.rejected.get("not_stored", 0) == 0
