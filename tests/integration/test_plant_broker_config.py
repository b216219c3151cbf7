"""``fedgate-bridge plant-broker-config`` on a real Mosquitto: each bridge writes only its own
prefix, the agent reads and writes nothing, strangers are refused, and a backlog beyond
Mosquitto's default queue of 1,000 reaches an agent that was away."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest
from click.testing import CliRunner
from fedgate_bridge.cli import main
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.mosquitto_support import HAVE_MOSQUITTO, MOSQUITTO_PASSWD, mosquitto
from tests.net_support import free_port

PASSWORDS = {"bridge-line-3": "pw-3", "bridge-line-4": "pw-4", "agent-site-1": "pw-agent"}

pytestmark = pytest.mark.skipif(not HAVE_MOSQUITTO, reason="needs mosquitto and mosquitto_passwd")


def generate(directory: Path, *extra: str) -> tuple[Path, int, int]:
    """Run the command with its files' paths under ``directory``; returns the config to
    start Mosquitto with and the agent and bridge ports."""
    agent_port, bridge_port = free_port(), free_port()
    result = CliRunner().invoke(
        main,
        [
            "plant-broker-config",
            "--out",
            str(directory),
            "--bridge",
            "bridge-line-3=plant/line-3",
            "--bridge",
            "bridge-line-4=plant/line-4",
            "--agent-listener",
            f"127.0.0.1:{agent_port}",
            "--bridge-listener",
            f"127.0.0.1:{bridge_port}",
            "--etc-dir",
            str(directory),
            "--persistence-dir",
            str(directory),
            *extra,
        ],
    )
    assert result.exit_code == 0, result.output
    users = ["bridge-line-3", "bridge-line-4"] + (["agent-site-1"] if extra else [])
    for index, user in enumerate(users):
        create = ["-c"] if index == 0 else []
        subprocess.run(
            [
                MOSQUITTO_PASSWD,
                *create,
                "-b",
                str(directory / "plant.passwd"),
                user,
                PASSWORDS[user],
            ],
            check=True,
            capture_output=True,
        )
    conf = directory / "mosquitto.conf"
    # Started as root, Mosquitto would switch to user "mosquitto", who cannot read tmp_path.
    conf.write_text(f"user {getpass.getuser()}\n" + (directory / "fedgate-plant.conf").read_text())
    return conf, agent_port, bridge_port


@contextlib.asynccontextmanager
async def client(
    port: int,
    name: str,
    username: str | None = None,
    *,
    password: str | None = None,
    persistent: bool = False,
) -> AsyncIterator[aiomqtt.Client]:
    # Bridges speak MQTT 3.1.1 (a denied publish is acknowledged and dropped); the agent's
    # ingest speaks MQTT 5 with a persistent session.
    session: dict[str, object] = (
        {
            "protocol": aiomqtt.ProtocolVersion.V5,
            "clean_start": False,
            "properties": _session_properties(),
        }
        if persistent
        else {"protocol": aiomqtt.ProtocolVersion.V311}
    )
    async with aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=name,
        username=username,
        password=password if password is not None else PASSWORDS.get(username or ""),
        timeout=5,
        **session,  # type: ignore[arg-type]
    ) as connected:
        yield connected


def _session_properties() -> object:
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 3600
    return properties


async def received(subscriber: aiomqtt.Client, count: int, seconds: float = 10) -> list[str]:
    topics: list[str] = []

    async def take() -> None:
        async for message in subscriber.messages:
            topics.append(str(message.topic))
            if len(topics) == count:
                return

    await asyncio.wait_for(take(), seconds)
    return topics


async def denied(port: int, username: str | None, topic: str) -> None:
    """Publish where ``username`` may not. Mosquitto 2.0.11 with ``max_queued_messages 0``
    closes the connection (without it, it acknowledges and drops): either way nothing may
    arrive."""
    with contextlib.suppress(aiomqtt.MqttError):
        async with client(port, f"denied-{username}", username) as connection:
            await connection.publish(topic, b"forged", qos=1)
            await asyncio.sleep(0.2)


async def test_bridges_write_their_own_prefix_only_and_the_agent_only_reads(
    tmp_path: Path,
) -> None:
    conf, agent_port, bridge_port = generate(tmp_path)
    with mosquitto(conf, [agent_port, bridge_port]):
        async with client(agent_port, "agent") as agent:
            await agent.subscribe("plant/#", qos=1)
            # Denied publishes first: had any got through, it would be among the first two
            # messages the agent receives.
            await denied(bridge_port, "bridge-line-3", "plant/line-4/plc/XMEAS_1")
            await denied(bridge_port, "bridge-line-3", "plant/other")
            await denied(agent_port, None, "plant/line-3/plc/XMEAS_1")
            async with (
                client(bridge_port, "b3", "bridge-line-3") as line3,
                client(bridge_port, "b4", "bridge-line-4") as line4,
            ):
                await line3.publish("plant/line-3/plc/XMEAS_1", b"1", qos=1)
                await line4.publish("plant/line-4/plc/XMEAS_2", b"2", qos=1)
                topics = await received(agent, 2)
                assert sorted(topics) == ["plant/line-3/plc/XMEAS_1", "plant/line-4/plc/XMEAS_2"]
                # A bridge reads nothing, not even its own prefix.
                await line3.subscribe("plant/#", qos=1)
                await line4.publish("plant/line-4/plc/XMEAS_2", b"3", qos=1)
                assert await received(agent, 1) == ["plant/line-4/plc/XMEAS_2"]
                with pytest.raises(TimeoutError):
                    await received(line3, 1, seconds=1)
        for username, password in ((None, None), ("bridge-line-3", "wrong")):
            with pytest.raises(aiomqtt.MqttError):
                async with client(bridge_port, "stranger", username, password=password):
                    pass


async def test_a_backlog_beyond_mosquittos_default_queue_reaches_an_agent_that_was_away(
    tmp_path: Path,
) -> None:
    """Mosquitto's default ``max_queued_messages 1000`` would drop 500 of these."""
    conf, agent_port, bridge_port = generate(tmp_path)
    with mosquitto(conf, [agent_port, bridge_port]):
        async with client(agent_port, "agent", persistent=True) as agent:
            await agent.subscribe("plant/#", qos=1)
        async with client(bridge_port, "b3", "bridge-line-3") as line3:
            for number in range(1500):
                await line3.publish(f"plant/line-3/plc/T{number}", b"1", qos=1)
        async with client(agent_port, "agent", persistent=True) as agent:
            topics = await received(agent, 1500, seconds=30)
    assert len(set(topics)) == 1500


async def test_with_an_agent_user_the_agent_listener_refuses_anonymous_clients(
    tmp_path: Path,
) -> None:
    conf, agent_port, bridge_port = generate(tmp_path, "--agent-user", "agent-site-1")
    with mosquitto(conf, [agent_port, bridge_port]):
        with pytest.raises(aiomqtt.MqttError):
            async with client(agent_port, "anonymous"):
                pass
        async with client(agent_port, "agent", "agent-site-1") as agent:
            await agent.subscribe("plant/#", qos=1)
            async with client(bridge_port, "b3", "bridge-line-3") as line3:
                await line3.publish("plant/line-3/plc/XMEAS_1", b"1", qos=1)
                assert await received(agent, 1) == ["plant/line-3/plc/XMEAS_1"]
            # The agent's user can log in where the bridges do (one password file), but
            # may write nothing there.
            await denied(bridge_port, "agent-site-1", "plant/line-3/plc/XMEAS_1")
            async with client(bridge_port, "b3", "bridge-line-3") as line3:
                await line3.publish("plant/line-3/plc/XMEAS_9", b"1", qos=1)
            assert await received(agent, 1) == ["plant/line-3/plc/XMEAS_9"]
