"""packaging/mosquitto-federation.conf on a real Mosquitto: peer coordinators read this
cloud's federation topics and write nothing, anonymous peers and this cloud's agents stay
out, and the anonymous read-only form admits today's coordinator link (no credentials).

The file is used as shipped; only listener ports and addresses and file paths are moved
to free loopback ports and a temporary directory."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import re
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest
from fedgate_common.backoff import Backoff
from fedgate_common.tasks import cancel_until_done
from fedgate_common.topics import federation_filter, federation_topic
from fedgate_coordinator.mqtt_link import MqttLink, MqttSettings

from tests.mosquitto_support import HAVE_MOSQUITTO, MOSQUITTO_PASSWD, mosquitto
from tests.net_support import free_port

CONF = Path(__file__).resolve().parents[2] / "packaging" / "mosquitto-federation.conf"
DEPLOYMENT, CLOUD = "plant-a", "cloud-1"
FEDERATION = federation_filter(DEPLOYMENT, CLOUD)
FEDGATE_ALL = f"fedgate/{DEPLOYMENT}/#"
PASSWORD = "peer-secret"

pytestmark = pytest.mark.skipif(not HAVE_MOSQUITTO, reason="needs mosquitto and mosquitto_passwd")


def acl_lines(text: str, name: str) -> str:
    prefix = f"#{name} "
    return "".join(
        line[len(prefix) :] + "\n" for line in text.splitlines() if line.startswith(prefix)
    )


def adapt(directory: Path, *, anonymous_peers: bool) -> tuple[Path, list[int]]:
    """The shipped file with free ports and paths under ``directory``; returns the config
    and the ports of listeners 1 (coordinator), 2 (agents), 3 (peers)."""
    text = CONF.read_text()
    ports: list[int] = []

    def move(_: re.Match[str]) -> str:
        ports.append(free_port())
        return f"listener {ports[-1]} 127.0.0.1"

    conf = re.sub(r"^listener \d+ \S+$", move, text, flags=re.MULTILINE)
    conf = conf.replace("/etc/mosquitto/", f"{directory}/")
    conf = conf.replace("/var/lib/mosquitto/", f"{directory}/")
    peers_acl = acl_lines(text, "peers.acl")
    if anonymous_peers:  # the documented form for coordinators without credentials
        assert conf.count("allow_anonymous false") == 1
        conf = conf.replace("allow_anonymous false", "allow_anonymous true")
        peers_acl = peers_acl.replace("#topic read", "topic read", 1)
    (directory / "fedgate-agents.acl").write_text(acl_lines(text, "agents.acl"))
    (directory / "fedgate-peers.acl").write_text(peers_acl)
    subprocess.run(
        [
            MOSQUITTO_PASSWD,
            "-c",
            "-b",
            str(directory / "fedgate-peers.passwd"),
            "cloud-2",
            PASSWORD,
        ],
        check=True,
        capture_output=True,
    )
    path = directory / "mosquitto.conf"
    # Started as root, Mosquitto would switch to user "mosquitto", who cannot read tmp_path.
    path.write_text(f"user {getpass.getuser()}\n{conf}")
    assert len(ports) == 3
    return path, ports


@contextlib.asynccontextmanager
async def client(
    port: int, name: str, username: str | None = None
) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=name,
        username=username,
        password=PASSWORD if username else None,
        protocol=aiomqtt.ProtocolVersion.V5,
        timeout=5,
    ) as connected:
        yield connected


async def next_payload(subscriber: aiomqtt.Client) -> bytes:
    message = await asyncio.wait_for(anext(aiter(subscriber.messages)), 5)
    assert isinstance(message.payload, bytes)
    return message.payload


def topic(stage: str) -> str:
    return federation_topic(DEPLOYMENT, CLOUD, stage)


async def test_peers_read_the_federation_topics_only_and_only_the_coordinator_writes(
    tmp_path: Path,
) -> None:
    conf, (own, agents, peers) = adapt(tmp_path, anonymous_peers=False)
    with mosquitto(conf, [own, agents, peers]):
        async with (
            client(own, "coordinator") as coordinator,
            client(peers, "cloud-2", username="cloud-2") as peer,
            client(agents, "agent") as agent,
        ):
            await coordinator.publish(topic("aggregate"), b"aggregate", qos=1, retain=True)
            await peer.subscribe(FEDERATION, qos=1)
            assert await next_payload(peer) == b"aggregate"  # retained, readable by a peer
            await coordinator.subscribe(FEDERATION, qos=1)
            assert await next_payload(coordinator) == b"aggregate"

            # Neither a peer nor an agent can write there: after their publishes were
            # acknowledged, the coordinator's marker is the next message subscribers see.
            await peer.publish(topic("vote"), b"forged by a peer", qos=1)
            await agent.publish(topic("vote"), b"forged by an agent", qos=1)
            await agent.publish(topic("model") + "/7", b"forged model", qos=1, retain=True)
            await coordinator.publish(topic("vote"), b"marker", qos=1)
            assert await next_payload(coordinator) == b"marker"
            assert await next_payload(peer) == b"marker"

            # A peer reads nothing outside the federation prefix and writes nowhere.
            await peer.subscribe(f"fedgate/{DEPLOYMENT}/{CLOUD}/#", qos=1)
            await agent.subscribe(f"fedgate/{DEPLOYMENT}/{CLOUD}/round/+/+/+", qos=1)
            await peer.publish(f"fedgate/{DEPLOYMENT}/{CLOUD}/round/1/update/x", b"no", qos=1)
            await coordinator.publish(
                f"fedgate/{DEPLOYMENT}/{CLOUD}/round/1/start", b"start", qos=1
            )
            await agent.publish(f"fedgate/{DEPLOYMENT}/{CLOUD}/round/1/update/a", b"up", qos=1)
            await coordinator.publish(topic("vote"), b"marker 2", qos=1)
            assert await next_payload(peer) == b"marker 2"
            assert await next_payload(agent) == b"up"  # the agents' listener still works

        # Anonymous clients and wrong passwords are refused on the peer listener.
        with pytest.raises(aiomqtt.MqttError):
            async with client(peers, "anonymous"):
                pass
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(
                "127.0.0.1", peers, username="cloud-2", password="wrong", timeout=5
            ):
                pass

        # The coordinator's peer link without credentials is refused; with the password
        # file of [federation.peers.cloud-1] it reads the federation topics.
        link = peer_link(peers)
        task = asyncio.create_task(link.run())
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(link.connected.wait(), 2)
        finally:
            await cancel_until_done([task])
        password_file = tmp_path / "peer-cloud-1.pass"
        password_file.write_text(PASSWORD + "\n")
        link = peer_link(peers, username="cloud-2", password_file=str(password_file))
        task = asyncio.create_task(link.run())
        try:
            message = await asyncio.wait_for(link.inbound.get(), 10)
            assert (message.topic, message.payload) == (topic("aggregate"), b"aggregate")
        finally:
            await cancel_until_done([task])


async def test_the_anonymous_read_only_form_admits_todays_coordinator_link(
    tmp_path: Path,
) -> None:
    conf, ports = adapt(tmp_path, anonymous_peers=True)
    own, _, peers = ports
    with mosquitto(conf, ports):
        async with client(own, "coordinator") as coordinator:
            await coordinator.publish(topic("aggregate"), b"aggregate", qos=1, retain=True)
            link = peer_link(peers)
            task = asyncio.create_task(link.run())
            try:
                message = await asyncio.wait_for(link.inbound.get(), 10)
                assert (message.topic, message.payload) == (topic("aggregate"), b"aggregate")
                async with client(peers, "anonymous") as anonymous:
                    await coordinator.subscribe(FEDGATE_ALL, qos=1)
                    assert await next_payload(coordinator) == b"aggregate"
                    await anonymous.publish(topic("vote"), b"forged", qos=1)
                    await anonymous.subscribe(f"fedgate/{DEPLOYMENT}/{CLOUD}/#", qos=1)
                    await coordinator.publish(
                        f"fedgate/{DEPLOYMENT}/{CLOUD}/round/1/start", b"start", qos=1
                    )
                    await coordinator.publish(topic("vote"), b"marker", qos=1)
                    assert await next_payload(coordinator) == b"start"
                    assert await next_payload(coordinator) == b"marker"
                    await anonymous.subscribe(FEDERATION, qos=1)
                    assert await next_payload(anonymous) == b"aggregate"  # not "start"
            finally:
                await cancel_until_done([task])


def peer_link(port: int, *, username: str = "", password_file: str = "") -> MqttLink:
    """cloud-2's coordinator link to this broker, built as FederationNode builds it."""
    return MqttLink(
        settings=MqttSettings(
            host="127.0.0.1",
            port=port,
            client_id=f"fedgate-coordinator-{DEPLOYMENT}-cloud-2-peer-{CLOUD}",
            username=username,
            password_file=password_file,
        ),
        subscriptions=[FEDERATION],
        backoff=Backoff(initial_s=0.05, max_s=0.5),
    )
