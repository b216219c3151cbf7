"""Bad input reaching a serving coordinator through the real broker (127.0.0.1:1883).

Each case publishes one kind of bad message during a round, then the honest updates. The
coordinator must reject the bad message with the right typed error, count it in the events
table, and still complete the round with the honest agents.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import msgspec
import nacl.signing
import numpy as np
import pytest
from fedgate_common.arrays import WireArray, encode_arrays
from fedgate_common.consensus.manifest import ConsensusParams
from fedgate_common.envelope import Envelope, decode_payload, open_envelope, seal
from fedgate_common.keys import public_key_text
from fedgate_common.messages import GlobalModel, ModelUpdate, RecordPrivacyReport, RoundStart
from fedgate_common.model_spec import ModelSpec, parameter_shapes
from fedgate_common.topics import model_topic, round_topic
from fedgate_coordinator.config import CoordinatorConfig
from fedgate_coordinator.mqtt_link import MqttSettings
from fedgate_coordinator.rounds import RoundSettings
from fedgate_coordinator.secure_rounds import SecAggSettings
from fedgate_coordinator.service import STOP_REASON, CoordinatorService, ServeSummary
from fedgate_coordinator.store import RECORD_UNIT, Store

from tests.coordinator.conftest import fresh_postgres_schema
from tests.federation_support import one_cloud

BROKER = MqttSettings(host="127.0.0.1", port=1883)
SPEC = ModelSpec(n_features=3, window=8, n_classes=2, channels=4)
CLOUD = "cloud-1"


@dataclass
class Harness:
    deployment: str
    store: Store
    client: aiomqtt.Client
    keys: dict[str, nacl.signing.SigningKey]
    start: RoundStart
    serving: asyncio.Task[ServeSummary]
    service: CoordinatorService

    def update(
        self,
        *,
        round: int | None = None,
        delta: tuple[WireArray, ...] | None = None,
        num_samples: int = 10,
        record_privacy: RecordPrivacyReport | None = None,
    ) -> ModelUpdate:
        zeros = {name: np.zeros(shape, np.float32) for name, shape in parameter_shapes(SPEC)}
        return ModelUpdate(
            round=self.start.round if round is None else round,
            base_digest=self.start.base_digest,
            delta=encode_arrays(zeros) if delta is None else delta,
            num_samples=num_samples,
            train_loss=0.5,
            record_privacy=record_privacy,
        )

    def sealed(
        self, update: ModelUpdate, *, sender: str, key: nacl.signing.SigningKey | None = None
    ) -> bytes:
        return seal(
            update,
            signing_key=key or self.keys[sender],
            deployment=self.deployment,
            cloud=CLOUD,
            sender=sender,
        )

    async def send(self, payload: bytes, *, sender: str, round: int | None = None) -> None:
        number = self.start.round if round is None else round
        topic = round_topic(self.deployment, CLOUD, number, "update", sender)
        await self.client.publish(topic, payload, qos=1)

    async def send_honest_updates(self) -> ServeSummary:
        for agent in ("site-a", "site-b"):
            await self.send(self.sealed(self.update(), sender=agent), sender=agent)
        return await asyncio.wait_for(self.serving, 30)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running(tmp_path, f"sqlite:///{tmp_path / 'c.db'}") as started:
        yield started


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, database_url: str, consensus: ConsensusParams | None = None
) -> AsyncIterator[Harness]:
    """A coordinator serving one plaintext round with two enrolled agents."""
    deployment = f"test-{secrets.token_hex(4)}"
    config = CoordinatorConfig(
        deployment=deployment,
        cloud=CLOUD,
        database_url=database_url,
        broker=BROKER,
        rounds=RoundSettings(min_participants=2, update_timeout_s=20),
        secagg=SecAggSettings(aggregation="plaintext"),  # these attacks target plain updates
        model=SPEC,
    )
    store = Store.open(config.database_url)
    keys = {name: nacl.signing.SigningKey.generate() for name in ("site-a", "site-b")}
    for name, key in keys.items():
        store.enroll_agent(name, public_key_text(key.verify_key))
    federated = one_cloud(config, tmp_path, consensus)
    service = CoordinatorService(config=config, store=store, **federated)
    async with aiomqtt.Client(
        BROKER.host, BROKER.port, protocol=aiomqtt.ProtocolVersion.V5
    ) as client:
        await client.subscribe(round_topic(deployment, CLOUD, 1, "start"), qos=1)
        await client.subscribe(model_topic(deployment, CLOUD), qos=1)
        serving = asyncio.create_task(service.run(max_rounds=1))
        start = await asyncio.wait_for(_first_start(client), 20)
        yield Harness(deployment, store, client, keys, start, serving, service)
        if not serving.done():
            serving.cancel()
            with pytest.raises(asyncio.CancelledError):
                await serving
        await client.publish(model_topic(deployment, CLOUD), b"", qos=1, retain=True)
    store.close()


async def _first_start(client: aiomqtt.Client) -> RoundStart:
    async for message in client.messages:
        assert isinstance(message.payload, bytes)
        if not message.payload:
            continue
        payload = decode_payload(open_envelope(message.payload))
        if isinstance(payload, GlobalModel):
            continue
        assert isinstance(payload, RoundStart)
        return payload
    raise AssertionError("no round start")


def _assert_rejected_once(harness: Harness, summary: ServeSummary, kind: str) -> None:
    assert summary.rounds_completed == 1, "the honest round must still complete"
    assert harness.store.event_counts().get(kind) == 1
    assert summary.rejected == {kind: 1}
    round_record = harness.store.list_rounds()[0]
    assert round_record.status == "completed"
    assert sorted(p.agent_id for p in harness.store.participants(round_record.round)) == [
        "site-a",
        "site-b",
    ]


BadInput = Callable[[Harness], Awaitable[None]]


def hostile_envelope(h: Harness, *, version: int, stage: str, sender: str) -> bytes:
    """An envelope nobody signed, with a sender no agent could have."""
    envelope = Envelope(version, h.deployment, CLOUD, h.start.round, stage, sender, b"", b"")
    return msgspec.msgpack.encode(envelope)


async def _malformed_bytes(h: Harness) -> None:
    await h.send(b"\x93\x01not msgpack at all", sender="site-a")


async def _oversized_array(h: Harness) -> None:
    huge = WireArray(name="conv1.weight", dtype="<f4", shape=(10**6, 10**6), data=b"\0" * 16)
    await h.send(h.sealed(h.update(delta=(huge,)), sender="site-a"), sender="site-a")


async def _bad_signature(h: Harness) -> None:
    forged = h.sealed(h.update(), sender="site-a", key=nacl.signing.SigningKey.generate())
    await h.send(forged, sender="site-a")


async def _unknown_agent(h: Harness) -> None:
    intruder = nacl.signing.SigningKey.generate()
    await h.send(h.sealed(h.update(), sender="intruder", key=intruder), sender="intruder")


async def _replayed_message(h: Harness) -> None:
    first = h.sealed(h.update(num_samples=7), sender="site-a")
    await h.send(first, sender="site-a")
    await h.send(first, sender="site-a")  # the exact bytes again


async def _past_round(h: Harness) -> None:
    old = h.start.round - 1
    await h.send(h.sealed(h.update(round=old), sender="site-a"), sender="site-a", round=old)


async def _future_round(h: Harness) -> None:
    later = h.start.round + 1
    await h.send(h.sealed(h.update(round=later), sender="site-a"), sender="site-a", round=later)


async def _nan_in_update(h: Harness) -> None:
    weights = {name: np.zeros(shape, np.float32) for name, shape in parameter_shapes(SPEC)}
    weights["head.bias"][0] = np.nan
    await h.send(h.sealed(h.update(delta=encode_arrays(weights)), sender="site-a"), sender="site-a")


async def _inf_in_update(h: Harness) -> None:
    weights = {name: np.zeros(shape, np.float32) for name, shape in parameter_shapes(SPEC)}
    weights["conv2.weight"][0, 0, 0] = np.inf
    await h.send(h.sealed(h.update(delta=encode_arrays(weights)), sender="site-b"), sender="site-b")


def report(**changes: float | str) -> RecordPrivacyReport:
    """A record-level privacy report as an agent's accountant writes it."""
    honest = RecordPrivacyReport(
        epsilon_round=0.25,
        epsilon_total=0.25,
        target_epsilon=3.0,
        delta=1e-5,
        noise_multiplier=3.9,
        max_grad_norm=1.0,
        accountant="rdp (opacus.accountants.RDPAccountant)",
    )
    return msgspec.structs.replace(honest, **changes)


async def _nan_in_privacy_report(h: Harness) -> None:
    update = h.update(record_privacy=report(epsilon_total=math.nan))
    await h.send(h.sealed(update, sender="site-a"), sender="site-a")


async def _impossible_privacy_report(h: Harness) -> None:
    update = h.update(record_privacy=report(epsilon_round=2.0, epsilon_total=1.0, delta=1.5))
    await h.send(h.sealed(update, sender="site-a"), sender="site-a")


@pytest.mark.parametrize(
    ("bad_input", "kind"),
    [
        (_malformed_bytes, "malformed"),
        (_oversized_array, "limit_exceeded"),
        (_bad_signature, "bad_signature"),
        (_unknown_agent, "unknown_sender"),
        (_past_round, "wrong_round"),
        (_future_round, "wrong_round"),
        (_nan_in_update, "non_finite"),
        (_inf_in_update, "non_finite"),
        (_nan_in_privacy_report, "non_finite"),
        (_impossible_privacy_report, "malformed"),
    ],
    ids=[
        "malformed",
        "oversized",
        "bad-signature",
        "unknown-agent",
        "past-round",
        "future-round",
        "nan",
        "inf",
        "nan-in-privacy-report",
        "impossible-privacy-report",
    ],
)
async def test_bad_input_is_rejected_counted_and_the_round_completes(
    harness: Harness, bad_input: BadInput, kind: str
) -> None:
    await bad_input(harness)
    summary = await harness.send_honest_updates()
    _assert_rejected_once(harness, summary, kind)


async def test_replayed_update_is_rejected_and_the_first_one_counts(harness: Harness) -> None:
    await _replayed_message(harness)
    await harness.send(harness.sealed(harness.update(), sender="site-b"), sender="site-b")
    summary = await asyncio.wait_for(harness.serving, 30)
    _assert_rejected_once(harness, summary, "replay")
    samples = {p.agent_id: p.num_samples for p in harness.store.participants(1)}
    assert samples == {"site-a": 7, "site-b": 10}


async def test_update_replayed_into_another_round_fails_the_signature(harness: Harness) -> None:
    """The signature binds the round: moving a signed update to another round's topic with
    a rewritten envelope round is caught before its payload is decoded."""
    signed = harness.sealed(harness.update(), sender="site-a")
    envelope = open_envelope(signed)
    moved = msgspec.structs.replace(envelope, round=envelope.round + 5)
    await harness.send(msgspec.msgpack.encode(moved), sender="site-a", round=envelope.round + 5)
    summary = await harness.send_honest_updates()
    _assert_rejected_once(harness, summary, "bad_signature")


async def test_privacy_reports_are_booked_per_agent_once(harness: Harness) -> None:
    """Each agent's record-level report lands in privacy_ledger with its update; a replay
    of the same signed update is rejected and books nothing twice."""
    first = harness.sealed(
        harness.update(record_privacy=report(epsilon_total=0.75)), sender="site-a"
    )
    await harness.send(first, sender="site-a")
    await harness.send(first, sender="site-a")
    second = harness.update(record_privacy=report(noise_multiplier=2.5, max_grad_norm=4.0))
    await harness.send(harness.sealed(second, sender="site-b"), sender="site-b")
    summary = await asyncio.wait_for(harness.serving, 30)

    _assert_rejected_once(harness, summary, "replay")
    rows = harness.store.privacy_ledger(RECORD_UNIT)
    assert [(r.round, r.agent, r.epsilon_total) for r in rows] == [
        (harness.start.round, "site-a", 0.75),
        (harness.start.round, "site-b", 0.25),
    ]
    assert (rows[1].noise_multiplier, rows[1].clip_norm, rows[1].delta) == (2.5, 4.0, 1e-5)
    assert rows[1].target_epsilon == 3.0
    assert harness.store.privacy_ledger("site") == []


async def test_a_round_cut_short_by_a_stop_is_aborted_and_counted(harness: Harness) -> None:
    """serve stopped (SIGTERM) while a round waits for updates: the round is recorded as
    aborted, and the closing summary counts it."""
    harness.serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await harness.serving
    record = harness.store.get_round(harness.start.round)
    assert record is not None
    assert record.status == "aborted"
    assert record.abort_reason == STOP_REASON
    assert harness.service.summary.rounds_aborted == 1
    assert harness.service.summary.rounds_completed == 0


async def test_an_aggregate_the_manifest_refuses_aborts_the_round_and_the_height_goes_on(
    tmp_path: Path,
) -> None:
    """This cloud's mean update breaks the manifest's norm bound (as site-level noise can):
    every cloud would refuse it, this one too, so a cloud alone used to wait for a quorum
    forever. The round is aborted, the height decided without it, and serve goes on."""
    bound = ConsensusParams(max_update_norm=1.0)
    url = f"sqlite:///{tmp_path / 'coordinator.db'}"
    async with running(tmp_path, url, consensus=bound) as h:
        large = {name: np.full(shape, 3.0, np.float32) for name, shape in parameter_shapes(SPEC)}
        for agent in ("site-a", "site-b"):
            update = h.update(delta=encode_arrays(large))
            await h.send(h.sealed(update, sender=agent), sender=agent)
        summary = await asyncio.wait_for(h.serving, 30)

        assert (summary.rounds_completed, summary.rounds_aborted) == (0, 1)
        record = h.store.get_round(h.start.round)
        assert record is not None
        assert record.status == "aborted"
        assert "breaks the federation manifest's rules (delta norm" in (record.abort_reason or "")
        assert h.store.event_counts().get("invalid_aggregate") == 1
        models = h.store.list_models()
        assert [m.round for m in models] == [0, 1]
        genesis, decided = (h.store.get_model(m.digest) for m in models)
        assert genesis is not None
        assert decided is not None
        for name, weights in decided.decode_weights().items():
            np.testing.assert_array_equal(weights, genesis.decode_weights()[name])


@pytest.mark.parametrize(
    ("version", "stage"), [(2, "update"), (1, "no-such-stage")], ids=["version", "stage"]
)
async def test_a_hostile_sender_is_refused_before_it_reaches_postgres(
    tmp_path: Path, postgres_database: str, version: int, stage: str
) -> None:
    """A NUL in the sender of an envelope with another flaw: PostgreSQL cannot store it,
    and storing it once stopped the coordinator. The sender is checked first now."""
    with fresh_postgres_schema(postgres_database) as url:
        async with running(tmp_path, url) as h:
            await h.send(
                hostile_envelope(h, version=version, stage=stage, sender="x\x00y"), sender="site-a"
            )
            summary = await h.send_honest_updates()
            _assert_rejected_once(h, summary, "malformed")
            (event,) = [e for e in h.store.list_events() if e.kind == "malformed"]
            assert event.agent_id is None
            assert "invalid sender 'x\\x00y'" in event.detail
