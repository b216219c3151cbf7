"""Coordinator-side rate limiting per agent identity.

The round test runs the real coordinator service against a private Mosquitto with six
agents (the SecAgg protocol core each real agent runs, without torch). Round 1 is quiet;
in round 2 one agent floods at ten times its normal rate (and, in the second case, 400
times): after each of its protocol messages it sends that many more on its own topics
(replays of the message it just sent, and junk bytes). The other agents' round must
complete as round 1 did: every stage closed because every agent was in (no deadline
passed), everybody in the sum, about as fast; the drops are counted for the flooder alone.
The limiter's own rules are checked without IO below.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

import nacl.signing
import numpy as np
import pytest
from fedgate_common.keys import public_key_text
from fedgate_common.model_spec import ModelSpec, parameter_count
from fedgate_common.tasks import cancel_until_done
from fedgate_coordinator.config import CoordinatorConfig
from fedgate_coordinator.mqtt_link import MqttSettings
from fedgate_coordinator.rate_limit import Admission, RateLimiter, RateLimitSettings
from fedgate_coordinator.rounds import RoundSettings
from fedgate_coordinator.secure_rounds import SecAggSettings
from fedgate_coordinator.service import INTAKE_STATUS_NAME, CoordinatorService
from fedgate_coordinator.store import Store

from tests.bridge.bridge_support import mosquitto
from tests.federation_support import one_cloud
from tests.integration.secagg_agent import SimulatedAgent

SPEC = ModelSpec(n_features=3, window=8, n_classes=2, channels=4)
CLOUD = "c1"
FLOOD_FACTOR = 10
STAGE_TIMEOUT_S = 20.0  # a stage that waited for its deadline would show in the timing
IN_TRANSIT = 200  # flood messages sent (QoS 0) that the coordinator had not read when it stopped


@pytest.mark.slow
@pytest.mark.parametrize("flood_factor", [FLOOD_FACTOR, 40 * FLOOD_FACTOR])
async def test_a_flooding_agent_does_not_change_the_others_round(
    tmp_path: Path, flood_factor: int
) -> None:
    deployment = f"flood-{secrets.token_hex(4)}"
    with mosquitto(tmp_path / "broker") as broker:
        config = CoordinatorConfig(
            deployment=deployment,
            cloud=CLOUD,
            database_url=f"sqlite:///{tmp_path / 'c.db'}",
            broker=MqttSettings(host="127.0.0.1", port=broker.port),
            rounds=RoundSettings(min_participants=2, update_timeout_s=STAGE_TIMEOUT_S),
            secagg=SecAggSettings(stage_timeout_s=STAGE_TIMEOUT_S, clip_norm=5.0),
            model=SPEC,
        )
        rng = np.random.default_rng(5)
        gateways = [
            SimulatedAgent(
                agent_id=f"gw-{index}",
                deployment=deployment,
                cloud=CLOUD,
                port=broker.port,
                key=nacl.signing.SigningKey.generate(),
                update=rng.normal(0, 0.05, parameter_count(SPEC)),
                num_samples=100,
                flood_from_round=2 if index == 0 else None,
                flood_factor=flood_factor,
            )
            for index in range(6)
        ]
        flooder = gateways[0]
        store = Store.open(config.database_url)
        for gateway in gateways:
            store.enroll_agent(gateway.agent_id, public_key_text(gateway.key.verify_key))
        state_dir = tmp_path / "state"
        service = CoordinatorService(config=config, store=store, **one_cloud(config, state_dir))
        readiness = [asyncio.Event() for _ in gateways]
        tasks = [asyncio.create_task(g.run(r)) for g, r in zip(gateways, readiness, strict=True)]
        try:
            await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readiness)), 20)
            summary = await asyncio.wait_for(service.run(max_rounds=2), 60)
            flooded_at_stop = flooder.flooded
        finally:
            # Not cancel() once: a publish loop can swallow it (fedgate_common.tasks).
            await cancel_until_done(tasks)

        assert summary.rounds_completed == 2, summary
        # The flood runs beside the protocol (its own connection, QoS 0): a burst after each of
        # the flooder's five protocol messages of round 2. More than the limiter's burst went
        # out while the round ran, so it had to drop some (checked below); the later bursts
        # may still be going out when the round ends (at 400x: 1,503 of 2,000 in CI, 348
        # under 3 CPU hogs).
        assert config.rate_limit.burst < flooded_at_stop <= 5 * flood_factor, flooded_at_stop
        everybody = {g.agent_id for g in gateways}
        seconds = {}
        for number in (1, 2):
            record = store.get_round(number)
            assert record is not None
            assert record.status == "completed"
            assert {p.agent_id for p in store.participants(number)} == everybody
            stages = store.stages(number)
            assert [(s.stage, s.received) for s in stages] == [
                (s.stage, len(everybody)) for s in stages
            ]
            seconds[number] = sum(s.seconds for s in stages)
        print(
            f"{flood_factor}x flood: quiet round {seconds[1]:.2f} s, flooded round "
            f"{seconds[2]:.2f} s, dropped from {flooder.agent_id}: "
            f"{service_drops(state_dir)} of the {flooded_at_stop} extra messages sent while it ran"
        )
        # Same timing class: no stage waited for its deadline, and the flooded round took
        # about as long as the quiet one; the flooder, its broker traffic and the coordinator
        # share this process's CPU, so up to 3x. The flood goes out beside the flooder's
        # protocol messages, not before them: when it held them back, round 2 measured the
        # flooder's own publishing (1.5 s of 1.8 s on a slow machine). What the limiter buys
        # shows in the drop counts below and in test_mqtt_link's crowd-out test (without it,
        # here: no drops, each flood message examined, round 2 0.94 s against 0.44 s).
        assert seconds[2] < STAGE_TIMEOUT_S / 4, seconds
        assert seconds[2] <= 3 * seconds[1] + 0.5, seconds
        # Drops: the flooder's alone, and every message beyond its budget.
        assert set(summary.rate_limited) == {flooder.agent_id}, summary.rate_limited
        burst = config.rate_limit.burst
        dropped = summary.rate_limited[flooder.agent_id]
        assert flooded_at_stop - burst - IN_TRANSIT <= dropped <= flooded_at_stop, dropped
        events = store.list_events(limit=500)
        limited = [e for e in events if e.kind == "rate_limited"]
        assert limited
        assert {e.agent_id for e in limited} == {flooder.agent_id}
        honest = everybody - {flooder.agent_id}
        assert not [e for e in events if e.agent_id in honest], events
        status = json.loads((state_dir / INTAKE_STATUS_NAME).read_text())
        assert status["rate_limited"] == summary.rate_limited
        store.close()


def service_drops(state_dir: Path) -> int:
    status = json.loads((state_dir / INTAKE_STATUS_NAME).read_text())
    return sum(int(v) for v in status["rate_limited"].values())


# -- the limiter's rules, without IO ------------------------------------------------------

T = "fedgate/d/c/round"


def test_expected_messages_pass_once_per_stage_and_the_rest_spends_the_budget() -> None:
    limiter = RateLimiter(RateLimitSettings(burst=3, extra_per_s=1.0))
    limiter.start_round(4, ["a", "b"])
    assert limiter.admit(f"{T}/4/keys/a", 0.0) is Admission.EXPECTED
    assert limiter.admit(f"{T}/4/shares/a", 0.0) is Admission.EXPECTED
    # a's second keys message, another round, a non-selected sender: extra
    assert [limiter.admit(f"{T}/4/keys/a", 0.0) for _ in range(4)] == [
        Admission.EXTRA,
        Admission.EXTRA,
        Admission.EXTRA,
        Admission.DROPPED,
    ]
    assert limiter.admit(f"{T}/5/keys/b", 0.0) is Admission.EXTRA
    assert limiter.admit(f"{T}/4/keys/b", 0.0) is Admission.EXPECTED  # b's own pass intact
    assert limiter.admit(f"{T}/4/masked/a", 0.0) is Admission.EXPECTED  # a's next stage too
    assert limiter.admit(f"{T}/4/keys/a", 0.5) is Admission.DROPPED
    assert limiter.admit(f"{T}/4/keys/a", 1.0) is Admission.EXTRA  # refilled: 1 per s
    assert limiter.dropped == {"a": 2}
    limiter.start_round(5, ["a"])
    assert limiter.admit(f"{T}/5/keys/a", 1.0) is Admission.EXPECTED


def test_with_the_queue_full_only_expected_messages_pass() -> None:
    limiter = RateLimiter(RateLimitSettings(burst=3, extra_per_s=1.0))
    limiter.start_round(4, {"a", "b"})
    assert limiter.admit(f"{T}/4/keys/a", 0.0, room=False) is Admission.EXPECTED
    assert limiter.admit(f"{T}/4/keys/a", 0.0, room=False) is Admission.DROPPED  # a 2nd: extra
    assert limiter.admit(f"{T}/4/keys/x", 0.0, room=False) is Admission.DROPPED
    assert limiter.dropped == {"a": 1, "x": 1}  # counted and reported like the rate limit
    assert limiter.admit(f"{T}/4/keys/x", 0.0) is Admission.EXTRA  # its budget was not spent


def test_unknown_senders_share_one_bucket_beyond_max_identities() -> None:
    limiter = RateLimiter(RateLimitSettings(burst=2, extra_per_s=0.001, max_identities=3))
    limiter.start_round(1, [])
    for name in ("x1", "x2", "x3", "x4", "x5", "x6"):
        limiter.admit(f"{T}/1/keys/{name}", 0.0)
    # x1-x3 have their own bucket; x4 and x5 spend the shared one's two tokens
    assert limiter.identities == 3 + 1
    assert limiter.dropped == {"*": 1}  # x6
    assert limiter.admit(f"{T}/1/keys/x7", 0.0) is Admission.DROPPED
    assert limiter.admit("fedgate/d/c/round/1", 0.0) is Admission.DROPPED  # no sender level


def test_senders_that_cannot_be_agent_ids_share_one_bucket() -> None:
    limiter = RateLimiter(RateLimitSettings(burst=1, extra_per_s=0.001))
    limiter.start_round(1, ["a"])
    assert limiter.admit(f"{T}/1/keys/{'x' * 65}", 0.0) is Admission.EXTRA
    assert limiter.admit(f"{T}/1/keys/{'y' * 5000}", 0.0) is Admission.DROPPED
    assert limiter.admit(f"{T}/1/keys", 0.0) is Admission.DROPPED
    assert limiter.dropped == {"-": 2}
    assert limiter.admit(f"{T}/1/keys/a", 0.0) is Admission.EXPECTED


def test_reports_are_rate_limited_too() -> None:
    limiter = RateLimiter(RateLimitSettings(burst=1, extra_per_s=0.001, report_every_s=10.0))
    for now in (0.0, 0.1, 0.2):
        limiter.admit(f"{T}/1/keys/a", now)
    assert limiter.due_reports(0.2) == [("a", 2)]
    limiter.admit(f"{T}/1/keys/a", 1.0)
    assert limiter.due_reports(1.0) == []
    assert limiter.due_reports(10.3) == [("a", 1)]
