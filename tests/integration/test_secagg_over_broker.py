"""Secure aggregation through the real Mosquitto: the coordinator service and its agents.

Each agent is a :class:`Participant` behind its own MQTT connection (the protocol core the
real agent runs, without torch training). Six of the 20 stop after sending their shares,
mid-round. The global model the coordinator publishes must equal the base model plus the
mean computed in this process from the survivors' encoded inputs, bit for bit; bad input
injected along the way is refused, counted, and does not stop the round.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import nacl.signing
import numpy as np
import numpy.typing as npt
import pytest
from fedgate_common.arrays import encode_array
from fedgate_common.keys import public_key_text
from fedgate_common.messages import (
    MaskedInput,
    SurvivorConfirmation,
)
from fedgate_common.model_spec import ModelSpec, parameter_count, split_parameters
from fedgate_common.secagg.encoding import decode_sum
from fedgate_common.secagg.participant import encoding_params
from fedgate_common.tasks import cancel_until_done
from fedgate_common.topics import (
    model_topic,
    round_topic,
)
from fedgate_coordinator.aggregation import apply_delta
from fedgate_coordinator.config import CoordinatorConfig, validate
from fedgate_coordinator.mqtt_link import MqttSettings
from fedgate_coordinator.rounds import RoundSettings
from fedgate_coordinator.secure_rounds import SecAggSettings
from fedgate_coordinator.service import CoordinatorService
from fedgate_coordinator.site_privacy import (
    SitePrivacySettings,
    epsilon,
    pooled_epsilon,
    pooled_record_sigma,
)
from fedgate_coordinator.store import POOLED_UNIT, Store

from tests.federation_support import one_cloud
from tests.integration.secagg_agent import SimulatedAgent

BROKER = MqttSettings(host="127.0.0.1", port=1883)
SPEC = ModelSpec(n_features=3, window=8, n_classes=2, channels=4)
CLOUD = "c1"
AGENTS = 20
DROPPED = 6  # 30 %: gone after sending shares, before their masked input


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(400):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("condition not met within 20 s")


async def _inject_bad_input(deployment: str, agents: list[SimulatedAgent]) -> None:
    """A replayed keys message, a confirmation out of stage and a masked input of the wrong
    length, each from an enrolled agent, once the agents have advertised their keys."""
    sender = agents[-1]
    await _until(lambda: "keys" in sender.sent and sender.participant is not None)
    assert sender.participant is not None
    async with aiomqtt.Client(BROKER.host, BROKER.port) as client:
        keys = sender.participant.advertise_keys()
        topic = round_topic(deployment, CLOUD, keys.round, "keys", sender.agent_id)
        await client.publish(topic, sender.seal(keys), qos=1)
        early = SurvivorConfirmation(round=keys.round, roster_digest=b"x" * 32, survivors=())
        topic = round_topic(deployment, CLOUD, keys.round, "confirm", sender.agent_id)
        await client.publish(topic, sender.seal(early), qos=1)
        survivor = next(a for a in agents if not a.drop_after_shares)
        await _until(lambda: "masked" in survivor.sent)
        short = MaskedInput(
            round=keys.round,
            roster_digest=b"y" * 32,
            words=encode_array("masked", np.zeros(3, dtype=np.uint16)),
        )
        dropped = next(a for a in agents if a.drop_after_shares)
        topic = round_topic(deployment, CLOUD, keys.round, "masked", dropped.agent_id)
        await client.publish(topic, dropped.seal(short), qos=1)


@pytest.mark.slow
async def test_twenty_agents_thirty_percent_dropped_equal_the_in_process_sum(
    tmp_path: Path,
) -> None:
    deployment = f"secagg-{secrets.token_hex(4)}"
    config = CoordinatorConfig(
        deployment=deployment,
        cloud=CLOUD,
        database_url=f"sqlite:///{tmp_path / 'c.db'}",
        broker=BROKER,
        rounds=RoundSettings(min_participants=2, update_timeout_s=4.0),
        # A complete graph (19 neighbours): g = 20 holders, t = 14, so 6 dropouts leave every
        # secret exactly t holders. The default degree (13) tolerates fewer per group.
        secagg=SecAggSettings(stage_timeout_s=10.0, weight_cap=500, clip_norm=5.0, degree=19),
        model=SPEC,
    )
    rng = np.random.default_rng(11)
    dimension = parameter_count(SPEC)
    agents = [
        SimulatedAgent(
            agent_id=f"gw-{index:02d}",
            deployment=deployment,
            key=nacl.signing.SigningKey.generate(),
            update=rng.normal(0, 0.05, dimension),
            num_samples=int(rng.integers(100, 800)),
            drop_after_shares=index % 3 == 0 and index < 3 * DROPPED,
            cloud=CLOUD,
        )
        for index in range(AGENTS)
    ]
    assert sum(a.drop_after_shares for a in agents) == DROPPED
    store = Store.open(config.database_url)
    for agent in agents:
        store.enroll_agent(agent.agent_id, public_key_text(agent.key.verify_key))
    service = CoordinatorService(config=config, store=store, **one_cloud(config, tmp_path))
    try:
        readiness = [asyncio.Event() for _ in agents]
        agent_tasks = [
            asyncio.create_task(agent.run(ready))
            for agent, ready in zip(agents, readiness, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readiness)), 20)
        injector = asyncio.create_task(_inject_bad_input(deployment, agents))
        summary = await asyncio.wait_for(service.run(max_rounds=1), 90)
        await asyncio.wait_for(injector, 5)
        await cancel_until_done(agent_tasks)

        assert summary.rounds_completed == 1, summary
        # Which refusal each injected message meets depends on the stage it reaches the
        # coordinator in (a duplicate keys message after the keys stage is a wrong_round).
        assert sum(summary.rejected.values()) == 3, summary.rejected
        assert set(summary.rejected) <= {"replay", "wrong_round", "unknown_sender", "malformed"}
        assert sum(store.event_counts().get(kind, 0) for kind in summary.rejected) == 3
        record = store.list_rounds()[-1]
        assert record.status == "completed"
        assert record.aggregation == "secagg"
        survivors = [a for a in agents if not a.drop_after_shares]
        assert record.participants == len(survivors)
        stages = {s.stage: s for s in store.stages(record.round)}
        assert (stages["keys"].received, stages["shares"].received) == (AGENTS, AGENTS)
        assert stages["masked"].received == AGENTS - DROPPED
        assert stages["masked"].expected - stages["masked"].received == DROPPED
        assert stages["reveal"].received == AGENTS - DROPPED

        # The same computation in this process, from the survivors' encoded inputs.
        head = store.head_model()
        assert head is not None
        assert head.round == record.round
        base_model = store.get_model(head.parent_digest)
        assert base_model is not None
        assert base_model.round == 0
        params = config.secagg.params_for(AGENTS)
        total = np.zeros_like(survivors[0].encoded)
        for agent in survivors:
            assert agent.encoded is not None
            total += agent.encoded
        decoded = decode_sum(total, encoding_params(params))
        assert decoded.total_weight == sum(min(a.num_samples, 500) for a in survivors)
        delta = split_parameters(decoded.mean_update(params.weight_cap), SPEC)
        base = {
            name: np.asarray(value, dtype=np.float32)
            for name, value in base_model.decode_weights().items()
        }
        expected = apply_delta(base, delta)
        published = head.decode_weights()
        for name, value in expected.items():
            assert np.array_equal(np.asarray(published[name]), value), name
        # ...and close to the plain weighted mean of the survivors' clipped updates.
        plain = sum(a.num_samples * a.update for a in survivors) / sum(
            a.num_samples for a in survivors
        )
        flat = np.concatenate([np.ravel(delta[name]) for name in delta])
        assert float(np.max(np.abs(flat - plain))) < 0.01
    finally:
        async with aiomqtt.Client(BROKER.host, BROKER.port) as client:
            await client.publish(model_topic(deployment, CLOUD), b"", qos=1, retain=True)
        store.close()


async def _two_rounds_then_a_stop(
    config: CoordinatorConfig, agents: list[SimulatedAgent], tmp_path: Path
) -> tuple[Store, str]:
    """``agents`` enrolled and answering over the broker; ``serve`` asked for three rounds
    completes two and stops at a budget (one ``privacy_budget_spent`` event), and a
    restarted coordinator on the same store starts none. The store (closed, on disk) and
    the first run's reason for stopping."""
    assert validate(config) == []
    store = Store.open(config.database_url)
    for agent in agents:
        store.enroll_agent(agent.agent_id, public_key_text(agent.key.verify_key))
    try:
        readiness = [asyncio.Event() for _ in agents]
        tasks = [asyncio.create_task(a.run(r)) for a, r in zip(agents, readiness, strict=True)]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readiness)), 20)
        federation = one_cloud(config, tmp_path)
        service = CoordinatorService(config=config, store=store, **federation)
        summary = await asyncio.wait_for(service.run(max_rounds=3), 120)
        assert summary.rounds_completed == 2, summary
        assert store.event_counts().get("privacy_budget_spent") == 1

        restarted = CoordinatorService(config=config, store=store, **federation)
        again = await asyncio.wait_for(restarted.run(max_rounds=1), 30)
        assert again.rounds_completed == 0
        assert again.stopped.split(":")[0] == summary.stopped.split(":")[0]
        assert len(store.list_rounds()) == 2
        await cancel_until_done(tasks)
    finally:
        async with aiomqtt.Client(BROKER.host, BROKER.port) as client:
            await client.publish(model_topic(config.deployment, CLOUD), b"", qos=1, retain=True)
        store.close()
    return Store.open(config.database_url), summary.stopped


def _agents(deployment: str, updates: list[npt.NDArray[np.float64]]) -> list[SimulatedAgent]:
    return [
        SimulatedAgent(
            agent_id=f"gw-{index}",
            deployment=deployment,
            key=nacl.signing.SigningKey.generate(),
            update=update,
            num_samples=100 + index,
            cloud=CLOUD,
        )
        for index, update in enumerate(updates)
    ]


async def test_site_level_dp_rounds_are_booked_and_stop_at_the_budget(tmp_path: Path) -> None:
    """Six agents, site-level DP planned for two rounds, adaptive clipping: two rounds
    release noisy sums, each booked in privacy_ledger; the third is never started, and a
    restarted coordinator on the same store does not start one either."""
    deployment = f"sitedp-{secrets.token_hex(4)}"
    config = CoordinatorConfig(
        deployment=deployment,
        cloud=CLOUD,
        database_url=f"sqlite:///{tmp_path / 'c.db'}",
        broker=BROKER,
        rounds=RoundSettings(min_participants=4, update_timeout_s=4.0),
        secagg=SecAggSettings(
            stage_timeout_s=10.0,
            weight_cap=500,
            clip_norm=1.0,
            word_bits=32,
            adaptive_clip=True,
            clip_count_noise=2.0,
        ),
        privacy=SitePrivacySettings(site_level="on", target_epsilon=8.0, planned_rounds=2),
        model=SPEC,
    )
    rng = np.random.default_rng(12)
    dimension = parameter_count(SPEC)
    # 4 within C = 1
    updates = [rng.normal(0, 0.02 if index < 4 else 1.0, dimension) for index in range(6)]

    store, stopped = await _two_rounds_then_a_stop(config, _agents(deployment, updates), tmp_path)

    with store:
        assert stopped.startswith("site-level privacy budget")
        ledger = store.privacy_ledger(unit="site")
        assert [e.round for e in ledger] == [1, 2]
        assert all(e.inputs == 6 and e.min_inputs == 4 for e in ledger)
        assert 0 < ledger[0].epsilon_total < ledger[1].epsilon_total <= 8.0
        z = ledger[0].effective_noise_multiplier
        assert ledger[1].epsilon_total == pytest.approx(epsilon([z, z], 1e-5))
        assert ledger[0].noise_multiplier == ledger[1].noise_multiplier > 1.0
        # Adaptive clipping: round 2 used the clip norm round 1's count pointed to.
        first, second = store.get_round(1), store.get_round(2)
        assert first is not None
        assert second is not None
        assert first.clip_norm == 1.0
        assert first.within_clip is not None
        assert second.clip_norm == pytest.approx(
            config.secagg.next_clip_norm(1.0, first.within_clip)
        )


async def test_pooled_record_level_rounds_are_booked_and_stop_at_the_budget(
    tmp_path: Path,
) -> None:
    """Pooled record-level noise planned for two rounds of ε 3 (no site-level DP): each
    released round is booked as unit ``pooled`` with the σ per window it carried, the
    third would pass the record-level budget so it is never started, and a restarted
    coordinator on the same store does not start one either."""
    deployment = f"pooled-{secrets.token_hex(4)}"
    config = CoordinatorConfig(
        deployment=deployment,
        cloud=CLOUD,
        database_url=f"sqlite:///{tmp_path / 'c.db'}",
        broker=BROKER,
        rounds=RoundSettings(
            min_participants=4, update_timeout_s=4.0, local_epochs=1, batch_size=100
        ),
        secagg=SecAggSettings(stage_timeout_s=10.0, weight_cap=500, clip_norm=1.0, word_bits=32),
        privacy=SitePrivacySettings(
            record_level="pooled", record_epsilon=3.0, record_sample_rate=0.5, planned_rounds=2
        ),
        model=SPEC,
    )
    rng = np.random.default_rng(13)
    updates = [rng.normal(0, 0.02, parameter_count(SPEC)) for _ in range(5)]

    store, stopped = await _two_rounds_then_a_stop(config, _agents(deployment, updates), tmp_path)

    with store:
        assert stopped.startswith("record-level (noise pooled) privacy budget")
        assert store.privacy_ledger(unit="site") == []  # no site-level guarantee to book
        booked = store.privacy_ledger(unit=POOLED_UNIT)
        assert [(e.round, e.inputs, e.agent) for e in booked] == [(1, 5, ""), (2, 5, "")]
        target = pooled_record_sigma(3.0, 1e-5, 0.5, 2)
        sigmas = [e.effective_noise_multiplier for e in booked]
        assert all(target <= sigma <= target * 1.01 for sigma in sigmas)
        assert booked[1].epsilon_total == pytest.approx(pooled_epsilon(config.privacy, sigmas))
        assert 0 < booked[0].epsilon_total < booked[1].epsilon_total <= 3.0
        assert booked[0].epsilon_round == pytest.approx(booked[0].epsilon_total)
        assert all(e.target_epsilon == 3.0 for e in booked)
        assert all(e.clip_norm == 1.0 for e in booked)


async def test_a_pooled_round_that_aborts_after_masked_inputs_is_booked_as_the_agents_count_it(
    tmp_path: Path,
) -> None:
    """Six agents, four needed; three lose power right after sending their masked inputs, so
    round 1 aborts before anything is unmasked. Its agents counted it when their inputs left
    (they cannot know the sum was never released), so the coordinator books it too, with the
    six inputs that arrived: its count stops when theirs does. Round 2 aborts at the keys
    stage (three agents left): no input left anyone, nothing is booked."""
    deployment = f"pooled-abort-{secrets.token_hex(4)}"
    config = CoordinatorConfig(
        deployment=deployment,
        cloud=CLOUD,
        database_url=f"sqlite:///{tmp_path / 'c.db'}",
        broker=BROKER,
        rounds=RoundSettings(
            min_participants=4, update_timeout_s=4.0, local_epochs=1, batch_size=100
        ),
        secagg=SecAggSettings(stage_timeout_s=4.0, weight_cap=500, clip_norm=1.0, word_bits=32),
        privacy=SitePrivacySettings(
            record_level="pooled", record_epsilon=3.0, record_sample_rate=0.5, planned_rounds=4
        ),
        model=SPEC,
    )
    assert validate(config) == []
    rng = np.random.default_rng(17)
    agents = _agents(deployment, [rng.normal(0, 0.02, parameter_count(SPEC)) for _ in range(6)])
    for agent in agents[:3]:
        agent.drop_after_masked = True
    store = Store.open(config.database_url)
    for agent in agents:
        store.enroll_agent(agent.agent_id, public_key_text(agent.key.verify_key))
    try:
        readiness = [asyncio.Event() for _ in agents]
        tasks = [asyncio.create_task(a.run(r)) for a, r in zip(agents, readiness, strict=True)]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readiness)), 20)
        service = CoordinatorService(config=config, store=store, **one_cloud(config, tmp_path))
        summary = await asyncio.wait_for(service.run(max_rounds=2), 120)
        assert (summary.rounds_completed, summary.rounds_aborted) == (0, 2)
        assert [agent.sent.count("masked") for agent in agents] == [1] * 6
        booked = store.privacy_ledger(unit=POOLED_UNIT)
        assert [(e.round, e.inputs) for e in booked] == [(1, 6)]
        assert booked[0].epsilon_total == pytest.approx(
            pooled_epsilon(config.privacy, [booked[0].effective_noise_multiplier])
        )
        assert booked[0].effective_noise_multiplier >= pooled_record_sigma(3.0, 1e-5, 0.5, 4)
        await cancel_until_done(tasks)
    finally:
        async with aiomqtt.Client(BROKER.host, BROKER.port) as client:
            await client.publish(model_topic(deployment, CLOUD), b"", qos=1, retain=True)
        store.close()
