"""kill -9 of a serving coordinator in the middle of a round, then a restart.

The coordinator runs as a real process (`fedgate-coordinator serve`) on a SQLite file,
talking to the machine's Mosquitto; two test agents answer over MQTT.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple

import aiomqtt
import msgspec
import nacl.signing
import numpy as np
import pytest
from fedgate_common.arrays import encode_arrays
from fedgate_common.envelope import decode_payload, open_envelope, seal
from fedgate_common.keys import public_key_text
from fedgate_common.messages import ModelUpdate, RoundStart
from fedgate_common.model_spec import ModelSpec, parameter_shapes
from fedgate_common.topics import coordinator_broadcast_filter, model_topic, round_topic
from fedgate_coordinator.store import Store

BIN = Path(sys.executable).parent
SPEC = ModelSpec(n_features=3, window=8, n_classes=2, channels=4)
CLOUD = "cloud-1"
AGENTS = ("site-a", "site-b")


def cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "fedgate-coordinator"), "--state-dir", str(state), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


class ScriptedAgents:
    def __init__(self, deployment: str, keys: dict[str, nacl.signing.SigningKey]) -> None:
        self.deployment = deployment
        self.keys = keys

    async def next_start(self, client: aiomqtt.Client) -> RoundStart:
        async for message in client.messages:
            if not isinstance(message.payload, bytes) or not message.payload:
                continue
            payload = decode_payload(open_envelope(message.payload))
            if isinstance(payload, RoundStart):
                return payload
        raise AssertionError("subscription ended")

    async def answer(
        self, client: aiomqtt.Client, start: RoundStart, agents: tuple[str, ...]
    ) -> None:
        rng = np.random.default_rng(start.round)
        for agent in agents:
            delta = {
                n: rng.normal(0, 0.01, s).astype(np.float32) for n, s in parameter_shapes(SPEC)
            }
            update = ModelUpdate(
                round=start.round,
                base_digest=start.base_digest,
                delta=encode_arrays(delta),
                num_samples=5,
                train_loss=0.7,
            )
            payload = seal(
                update,
                signing_key=self.keys[agent],
                deployment=self.deployment,
                cloud=CLOUD,
                sender=agent,
            )
            await client.publish(
                round_topic(self.deployment, CLOUD, start.round, "update", agent), payload, qos=1
            )


def serve(state: Path, rounds: int, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            str(BIN / "fedgate-coordinator"),
            "--state-dir",
            str(state),
            "serve",
            "--rounds",
            str(rounds),
        ],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


class Prepared(NamedTuple):
    deployment: str
    state: Path
    db_url: str
    agents: ScriptedAgents
    log: Path


def prepare(tmp_path: Path, prefix: str) -> Prepared:
    """A coordinator `init`-ed for plaintext rounds of both agents, which are enrolled."""
    deployment = f"{prefix}-{secrets.token_hex(4)}"
    state = tmp_path / "coordinator"
    spec_file = tmp_path / "spec.json"
    spec_file.write_bytes(msgspec.json.encode(SPEC))
    init = cli(
        state,
        "init",
        "--cloud",
        CLOUD,
        "--deployment",
        deployment,
        "--min-participants",
        "2",
        "--update-timeout",
        "60",
        "--model-spec",
        str(spec_file),
        "--aggregation",
        "plaintext",  # the simulated agents answer with plain updates
        "--json",
    )
    assert init.returncode == 0, init.stderr
    keys = {agent: nacl.signing.SigningKey.generate() for agent in AGENTS}
    for agent, key in keys.items():
        assert cli(state, "enroll", agent, public_key_text(key.verify_key)).returncode == 0
    db_url = str(json.loads(init.stdout)["database_url"])
    return Prepared(
        deployment, state, db_url, ScriptedAgents(deployment, keys), tmp_path / "coordinator.log"
    )


@contextlib.asynccontextmanager
async def watching(deployment: str) -> AsyncIterator[aiomqtt.Client]:
    """A client of the machine's broker, subscribed to what the coordinator broadcasts."""
    async with aiomqtt.Client("127.0.0.1", 1883, protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe(coordinator_broadcast_filter(deployment, CLOUD), qos=1)
        yield client


@pytest.mark.slow
async def test_kill_9_mid_round_then_restart_keeps_history_and_runs_next_round(
    tmp_path: Path,
) -> None:
    deployment, state, db_url, agents, log = prepare(tmp_path, "crash")
    async with watching(deployment) as client:
        first = serve(state, 5, log)
        try:
            start1 = await asyncio.wait_for(agents.next_start(client), 30)
            await agents.answer(client, start1, AGENTS)
            start2 = await asyncio.wait_for(agents.next_start(client), 30)
            assert start2.round == start1.round + 1
            await agents.answer(client, start2, AGENTS[:1])  # one of two: round stays open
            await asyncio.sleep(1.0)
            first.send_signal(signal.SIGKILL)
            assert first.wait(timeout=10) == -signal.SIGKILL
        finally:
            if first.poll() is None:
                first.kill()

        with Store.open(db_url, migrate=False) as store:
            rounds = {r.round: r.status for r in store.list_rounds()}
            assert rounds == {start1.round: "completed", start2.round: "running"}
            assert store.verify_chain() == 2  # genesis + round 1: nothing half-recorded
            assert store.participants(start2.round) == []

        # Height 2 is still decided after the restart (without this cloud's aborted round:
        # an empty aggregate), then round 3 runs: two heights.
        second = serve(state, 2, log)
        try:
            start3 = await asyncio.wait_for(agents.next_start(client), 30)
            while start3.round == start2.round:  # a retained start left by the killed process
                start3 = await asyncio.wait_for(agents.next_start(client), 30)
            assert start3.round == start2.round + 1, "a round number is never reused"
            await agents.answer(client, start3, AGENTS)
            assert await asyncio.to_thread(second.wait, 60) == 0, log.read_text()[-3000:]
        finally:
            if second.poll() is None:
                second.kill()
        await client.publish(model_topic(deployment, CLOUD), b"", qos=1, retain=True)

    with Store.open(db_url, migrate=False) as store:
        records = {r.round: r for r in store.list_rounds()}
        assert [records[n].status for n in sorted(records)] == ["completed", "aborted", "completed"]
        assert "restarted" in (records[start2.round].abort_reason or "")
        assert store.verify_chain() == 4
        models = {m.round: m for m in store.list_models()}
        assert models[start2.round].parent_digest == models[start1.round].digest
        assert models[start3.round].parent_digest == models[start2.round].digest
        assert store.decision(start2.round) is not None  # certified like every height
        assert store.event_counts().get("round_recovered") == 1
    status = cli(state, "status", "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["rounds"] == {"completed": 2, "aborted": 1, "running": 0}


async def test_a_second_serve_on_the_same_state_directory_is_refused(tmp_path: Path) -> None:
    """Started by hand beside the running unit, a second `serve` used to share the broker
    session, reject the first one's messages and abort its round as if it had crashed."""
    deployment, state, db_url, agents, log = prepare(tmp_path, "twice")
    async with watching(deployment) as client:
        first = serve(state, 1, log)
        try:
            start = await asyncio.wait_for(agents.next_start(client), 30)
            second = await asyncio.to_thread(cli, state, "serve", "--rounds", "1")
            assert second.returncode == 4, second.stderr
            assert f"already running on {state} (pid {first.pid};" in second.stderr
            assert first.poll() is None
            await agents.answer(client, start, AGENTS)
            assert await asyncio.to_thread(first.wait, 60) == 0, log.read_text()[-3000:]
        finally:
            if first.poll() is None:
                first.kill()
        await client.publish(model_topic(deployment, CLOUD), b"", qos=1, retain=True)
    with Store.open(db_url, migrate=False) as store:
        assert [r.status for r in store.list_rounds()] == ["completed"]
        assert store.event_counts().get("round_recovered") is None
