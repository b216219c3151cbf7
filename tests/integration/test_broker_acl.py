"""The ACL test matrix: a real Mosquitto started with what `broker-config` wrote.

One broker for the module. Agents ``site-1`` (A) and ``site-2`` (B) are enrolled, ``site-3``
was enrolled, got its certificate, and was revoked. Every client logs in with a
certificate from the generated ``clients/`` directories, as a gateway would.

"Refused" for a publish means the broker drops it silently (MQTT 3.1.1 has no way to say
so): the test publishes the forbidden message, then an allowed marker on the same
connection, and checks that the observer got the marker and nothing before it. For a
subscription it means nothing arrives: the observer (the coordinator credential, which
reads everything of the cloud) sees the message first, then publishes a marker the
subscriber may read; Mosquitto delivers in order, so the marker arriving alone proves the
message was withheld.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.signing
import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from fedgate_agent.broker_key_cli import certificate_request, load_or_make_key
from fedgate_agent.config import BrokerConfig
from fedgate_agent.mqtt_link import MqttLink as AgentLink
from fedgate_common.keys import public_key_text
from fedgate_common.tasks import cancel_until_done
from fedgate_common.topics import agent_inbound_filter, coordinator_broadcast_filter, round_topic
from fedgate_coordinator.broker_config import BrokerAuthority
from fedgate_coordinator.cli import main
from fedgate_coordinator.mqtt_link import MqttLink as CoordinatorLink
from fedgate_coordinator.mqtt_link import MqttSettings
from paho.mqtt.enums import CallbackAPIVersion

from tests.mosquitto_support import MOSQUITTO
from tests.net_support import free_port, wait_for_port

D, C = "plant-a", "cloud-1"
P = f"fedgate/{D}/{C}"
FED = f"fedgate/{D}/federation/{C}"
WAIT_S = 5.0


def cli(state: Path, *args: str) -> str:
    result = CliRunner().invoke(main, ["--state-dir", str(state), *args])
    assert result.exit_code == 0, result.output
    return result.output


@dataclass
class Broker:
    port: int
    out: Path
    plan: dict[str, Any]
    process: subprocess.Popen[bytes]
    log: Path
    state: Path
    arguments: list[str]


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    root = tmp_path_factory.mktemp("broker-acl")
    state, out = root / "coord", root / "broker"
    cli(state, "init", "--cloud", C, "--deployment", D)
    for agent in ("site-1", "site-2", "site-3"):
        key = public_key_text(nacl.signing.SigningKey.generate().verify_key)
        cli(state, "enroll", agent, key)
    port = free_port()
    common = ["--out", str(out), "--port", str(port), "--bind", "127.0.0.1"]
    common += ["--persistence-dir", str(root / "persist"), "--broker-user", getpass.getuser()]
    common += ["--peer", "cloud-2", "--reader", "scada", "--max-agents", "10"]
    cli(state, "broker-config", *common)
    cli(state, "revoke", "site-3")
    report = json.loads(cli(state, "broker-config", *common, "--json"))
    assert report["revoked_certificates"] == 1
    log = root / "mosquitto.log"
    process = subprocess.Popen(
        [MOSQUITTO, "-c", str(out / "mosquitto.conf")],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    wait_for_port(port, process=process, timeout=10, log=log)
    try:
        yield Broker(
            port=port,
            out=out,
            plan=report["sizes"],
            process=process,
            log=log,
            state=state,
            arguments=common,
        )
    finally:
        process.terminate()
        process.wait(timeout=10)


@dataclass
class Client:
    """A paho client logged in with one generated certificate; records what it receives."""

    name: str
    client: mqtt.Client
    received: list[tuple[str, bytes]] = field(default_factory=list)
    disconnected: threading.Event = field(default_factory=threading.Event)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.received.append((message.topic, bytes(message.payload)))
            self.cond.notify_all()

    def wait_for(self, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        """Everything received up to and including (topic, payload); fails after WAIT_S."""
        with self.cond:
            ok = self.cond.wait_for(lambda: (topic, payload) in self.received, WAIT_S)
            assert ok, f"{self.name} did not receive {topic}"
            return self.received[: self.received.index((topic, payload)) + 1]

    def subscribe(self, topic_filter: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *_a: done.set()
        self.client.subscribe(topic_filter, qos=1)
        assert done.wait(WAIT_S)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(WAIT_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def credentials(out: Path, user: str) -> Path:
    return out / "clients" / user.replace(":", "-")


@contextlib.contextmanager
def connected(
    broker: Broker, user: str, *subscriptions: str, client_id: str = ""
) -> Iterator[Client]:
    directory = credentials(broker.out, user)
    paho = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id or f"acl-test-{user.replace(':', '-')}",
    )
    paho.tls_set(
        ca_certs=str(directory / "ca.pem"),
        certfile=str(directory / "client.pem"),
        keyfile=str(directory / "client.key"),
    )
    client = Client(name=user, client=paho)
    ready = threading.Event()
    paho.on_message = client.on_message
    paho.on_connect = lambda _c, _u, _f, reason, _p: ready.set() if not reason.is_failure else None
    paho.on_disconnect = lambda *_a: client.disconnected.set()
    paho.connect("127.0.0.1", broker.port, keepalive=10)
    paho.loop_start()
    try:
        assert ready.wait(WAIT_S), f"{user} could not connect"
        for topic_filter in subscriptions:
            client.subscribe(topic_filter)
        yield client
    finally:
        client.close()


# -- the matrix ---------------------------------------------------------------------------
# (who, action, topic, expected): publish rows are observed by the coordinator credential
# (or, for coordinator/peer rows, by a subscriber with read rights).

PUBLISH_MATRIX = [
    ("site-1", f"{P}/round/7/keys/site-1", "allowed"),
    ("site-1", f"{P}/round/7/masked/site-1", "allowed"),
    ("site-1", f"{P}/site/site-1/predictions", "allowed"),
    ("site-1", f"{P}/site/site-1/alerts/high", "allowed"),
    ("site-1", f"{P}/round/7/masked/site-2", "refused"),
    ("site-1", f"{P}/round/7/keys/site-2", "refused"),
    ("site-1", f"{P}/site/site-2/predictions", "refused"),
    ("site-1", f"{P}/round/7/deliver/site-2", "refused"),
    ("site-1", f"{P}/round/7/deliver/site-1", "refused"),
    ("site-1", f"{P}/round/7/start", "refused"),
    ("site-1", f"{P}/round/7/roster", "refused"),
    ("site-1", f"{P}/model", "refused"),
    ("site-1", f"{FED}/aggregate", "refused"),
    ("site-1", f"fedgate/{D}/cloud-2/round/7/keys/site-1", "refused"),
    ("peer:cloud-2", f"{FED}/vote", "refused"),
    ("peer:cloud-2", f"{P}/round/7/keys/site-1", "refused"),
    ("reader:scada", f"{P}/site/site-1/predictions", "refused"),
]


@pytest.mark.parametrize(("who", "topic", "expected"), PUBLISH_MATRIX)
def test_publish_matrix(broker: Broker, who: str, topic: str, expected: str) -> None:
    marker_topic = f"{P}/round/7/keys/site-1" if who == "site-1" else f"{P}/site/site-1/x"
    with (
        connected(broker, f"coordinator:{C}", f"{P}/#", f"{FED}/#", f"fedgate/{D}/#") as observer,
        connected(broker, who) as sender,
    ):
        payload = f"{who} -> {topic}".encode()
        sender.publish(topic, payload)
        if who == "site-1":
            sender.publish(marker_topic, b"marker " + payload)
            seen = observer.wait_for(marker_topic, b"marker " + payload)
        else:  # peers and readers may publish nothing: the marker comes from site-1
            with connected(broker, "site-1") as agent:
                # the sender's publish was acknowledged, so the broker has handled it
                agent.publish(marker_topic, b"marker " + payload)
                seen = observer.wait_for(marker_topic, b"marker " + payload)
        delivered = (topic, payload) in seen
        assert delivered == (expected == "allowed"), (who, topic, seen)


READ_MATRIX = [
    # (reader, its subscription, publisher, topic, expected)
    ("site-1", f"{P}/round/+/+", f"coordinator:{C}", f"{P}/round/8/roster", "allowed"),
    ("site-1", f"{P}/round/+/+", f"coordinator:{C}", f"{P}/round/8/start", "allowed"),
    (
        "site-1",
        f"{P}/round/+/deliver/site-1",
        f"coordinator:{C}",
        f"{P}/round/8/deliver/site-1",
        "allowed",
    ),
    ("site-1", f"{P}/model", f"coordinator:{C}", f"{P}/model", "allowed"),
    (
        "site-1",
        f"{P}/round/+/deliver/site-2",
        f"coordinator:{C}",
        f"{P}/round/8/deliver/site-2",
        "refused",
    ),
    ("site-1", f"{P}/round/+/+/+", "site-2", f"{P}/round/8/masked/site-2", "refused"),
    ("site-1", f"{P}/round/+/keys/site-2", "site-2", f"{P}/round/8/keys/site-2", "refused"),
    ("site-1", "#", "site-2", f"{P}/round/8/masked/site-2", "refused"),
    ("site-1", f"{P}/site/#", "site-2", f"{P}/site/site-2/predictions", "refused"),
    ("site-1", f"{FED}/#", f"coordinator:{C}", f"{FED}/aggregate", "refused"),
    ("peer:cloud-2", f"{FED}/#", f"coordinator:{C}", f"{FED}/aggregate", "allowed"),
    ("peer:cloud-2", "#", f"coordinator:{C}", f"{P}/round/8/roster", "refused"),
    ("peer:cloud-2", "#", "site-2", f"{P}/round/8/masked/site-2", "refused"),
    ("reader:scada", f"{P}/site/#", "site-2", f"{P}/site/site-2/predictions", "allowed"),
    ("reader:scada", "#", "site-2", f"{P}/round/8/masked/site-2", "refused"),
    ("reader:scada", "#", f"coordinator:{C}", f"{P}/model", "refused"),
]

# A topic each reader may read, for the marker that proves the order of delivery.
MARKER = {
    "site-1": f"{P}/round/9/end",
    "peer:cloud-2": f"{FED}/proposal",
    "reader:scada": f"{P}/site/site-3/predictions",
}


@pytest.mark.parametrize(("reader", "subscription", "publisher", "topic", "expected"), READ_MATRIX)
def test_read_matrix(
    broker: Broker, reader: str, subscription: str, publisher: str, topic: str, expected: str
) -> None:
    coordinator = f"coordinator:{C}"
    marker = MARKER[reader]
    subscriptions = [subscription] if subscription == "#" else [subscription, marker]
    with (
        connected(broker, coordinator, f"fedgate/{D}/#") as observer,
        connected(broker, reader, *subscriptions) as subscriber,
        contextlib.ExitStack() as stack,
    ):
        sender = (
            observer
            if publisher == coordinator
            else stack.enter_context(connected(broker, publisher))
        )
        payload = f"{publisher} -> {topic}".encode()
        sender.publish(topic, payload, retain=False)
        observer.wait_for(topic, payload)  # the broker has routed it to every subscriber
        observer.publish(marker, b"marker " + payload)
        seen = subscriber.wait_for(marker, b"marker " + payload)
        assert ((topic, payload) in seen) == (expected == "allowed"), (reader, topic, seen)


# -- who may not connect ----------------------------------------------------------------


def mqtt_connect_packet(client_id: str) -> bytes:
    """An MQTT 3.1.1 CONNECT without user name or password."""
    body = b"\x00\x04MQTT\x04\x02\x00\x0a" + len(client_id).to_bytes(2, "big") + client_id.encode()
    return bytes([0x10, len(body)]) + body


def connack_received(port: int, *, context: ssl.SSLContext | None) -> bool:
    """True if the broker answers a CONNECT with a CONNACK that accepts it."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as raw:
        try:
            if context is None:
                sock: socket.socket = raw
            else:
                sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
            sock.sendall(mqtt_connect_packet("acl-test-intruder"))
            answer = sock.recv(4)
        except (ssl.SSLError, ConnectionError, TimeoutError):
            return False
        return len(answer) == 4 and answer[0] == 0x20 and answer[3] == 0


def tls_context(broker: Broker, cert_dir: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(broker.out / "ca.pem"))
    if cert_dir is not None:
        context.load_cert_chain(cert_dir / "client.pem", cert_dir / "client.key")
    return context


def test_connection_matrix(broker: Broker, tmp_path: Path) -> None:
    # The positive control: the same raw CONNECT with site-1's certificate is accepted.
    site1 = credentials(broker.out, "site-1")
    assert connack_received(broker.port, context=tls_context(broker, site1))
    # Anonymous: TLS without a client certificate.
    assert not connack_received(broker.port, context=tls_context(broker, None))
    # A certificate for "site-1" from another CA (a second broker-config elsewhere).
    other = BrokerAuthority(tmp_path / "other", deployment=D, cloud=C)
    other.load_or_create()
    forged = other.issue_client(tmp_path / "other", "site-1", rotate=False)
    assert not connack_received(broker.port, context=tls_context(broker, Path(forged.directory)))
    # The revoked agent's certificate, listed in the CRL.
    revoked = credentials(broker.out, "site-3")
    assert (revoked / "client.pem").exists()
    assert not connack_received(broker.port, context=tls_context(broker, revoked))
    # Plaintext MQTT on the TLS port.
    assert not connack_received(broker.port, context=None)
    # No other listener: exactly one configured, and the broker opened no other socket
    # (a listener option above the first "listener" line would open a default one).
    conf = (broker.out / "mosquitto.conf").read_text()
    listeners = [line for line in conf.splitlines() if line.startswith("listener ")]
    assert listeners == [f"listener {broker.port} 127.0.0.1"]
    opened = re.findall(r"Opening \S+ listen socket on port (\d+)", broker.log.read_text())
    assert opened == [str(broker.port)]
    assert "allow_anonymous false" in conf
    assert "require_certificate true" in conf


def test_oversize_messages_are_dropped(broker: Broker) -> None:
    limit = broker.plan["message_size_limit"]
    packet_limit = broker.plan["max_packet_size"]
    topic = f"{P}/round/10/masked/site-1"
    with connected(broker, f"coordinator:{C}", f"{P}/#") as observer:
        with connected(broker, "site-1") as agent:
            at_limit = b"a" * limit
            agent.publish(topic, at_limit)
            assert observer.wait_for(topic, at_limit)[-1][1] == at_limit
            agent.client.publish(topic, b"b" * (limit + 1), qos=1)
            agent.client.publish(topic, b"c" * (packet_limit + 1), qos=1)
        with connected(broker, "site-1") as agent:
            agent.publish(topic, b"marker")
            seen = observer.wait_for(topic, b"marker")
    sizes = [len(payload) for t, payload in seen if t == topic]
    assert sizes == [limit, len(b"marker")]


# -- the real links log in with the generated credentials ---------------------------------


async def test_coordinator_and_agent_links_use_the_generated_credentials(broker: Broker) -> None:
    """coordinator.toml [broker] as `broker-config` printed it, and the agent's [broker]
    with its clients/<agent id>/ files: a round message goes up, a broadcast comes down."""
    own = credentials(broker.out, f"coordinator:{C}")
    coordinator = CoordinatorLink(
        settings=MqttSettings(
            host="127.0.0.1",
            port=broker.port,
            client_id="acl-test-coordinator-link",
            tls_ca_file=str(own / "ca.pem"),
            tls_cert_file=str(own / "client.pem"),
            tls_key_file=str(own / "client.key"),
        ),
        subscriptions=[agent_inbound_filter(D, C)],
    )
    site = credentials(broker.out, "site-2")
    agent = AgentLink(
        settings=BrokerConfig(
            host="127.0.0.1",
            port=broker.port,
            tls_ca_file=str(site / "ca.pem"),
            tls_cert_file=str(site / "client.pem"),
            tls_key_file=str(site / "client.key"),
        ),
        client_id="acl-test-agent-link",
        subscriptions=[coordinator_broadcast_filter(D, C)],
    )
    tasks = [asyncio.create_task(coordinator.run()), asyncio.create_task(agent.run())]
    try:
        await asyncio.wait_for(coordinator.connected.wait(), WAIT_S)
        await asyncio.wait_for(agent.connected.wait(), WAIT_S)
        up = round_topic(D, C, 11, "keys", "site-2")
        await agent.publish(up, b"up")
        received = await asyncio.wait_for(coordinator.inbound.get(), WAIT_S)
        assert (received.topic, received.payload) == (up, b"up")
        down = round_topic(D, C, 11, "roster")
        await coordinator.publish(down, b"down")
        received_down = await asyncio.wait_for(agent.inbound.get(), WAIT_S)
        assert (received_down.topic, received_down.payload) == (down, b"down")
    finally:
        await cancel_until_done(tasks)


def test_an_agent_cannot_take_over_another_clients_session(broker: Broker) -> None:
    """Mosquitto closes the older of two connections with one client id; the client id is
    the certificate's name here, so an agent using the coordinator's id takes over nothing."""
    coordinator_id = f"fedgate-coordinator-{D}-{C}"
    with connected(broker, f"coordinator:{C}", f"{P}/#", client_id=coordinator_id) as victim:
        with connected(broker, "site-1", client_id=coordinator_id) as intruder:
            intruder.publish(f"{P}/round/12/keys/site-1", b"still there?")
            assert victim.wait_for(f"{P}/round/12/keys/site-1", b"still there?")
        assert not victim.disconnected.is_set()


def test_a_reissued_certificate_dies_at_the_next_reload(broker: Broker, tmp_path: Path) -> None:
    """`broker-config --reissue site-2` revokes the old certificate; Mosquitto reloads the
    CRL on SIGHUP (systemctl reload), and the gateway's old files stop working."""
    old = tmp_path / "old-site-2"
    shutil.copytree(credentials(broker.out, "site-2"), old)
    assert connack_received(broker.port, context=tls_context(broker, old))
    cli(broker.state, "broker-config", *broker.arguments, "--reissue", "site-2")
    broker.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + WAIT_S
    while connack_received(broker.port, context=tls_context(broker, old)):
        assert time.monotonic() < deadline, "the old certificate still works"
        time.sleep(0.05)
    new = credentials(broker.out, "site-2")
    assert connack_received(broker.port, context=tls_context(broker, new))


def test_a_key_made_on_the_gateway_logs_in_and_its_rotation_revokes_the_old(
    broker: Broker, tmp_path: Path
) -> None:
    """`fedgate-agent broker-key` makes the key on the gateway; `enroll --broker-csr` signs
    its request, so no key is written on the coordinator's side. A new key's request
    replaces the certificate and revokes the old one at the next reload."""
    identity = public_key_text(nacl.signing.SigningKey.generate().verify_key)
    enroll = ["enroll", "site-4", identity, "--broker-out", str(broker.out), "--json"]
    # A request for another name is refused before anything is stored.
    key, _ = load_or_make_key(tmp_path / "gw.key", new=False)
    (tmp_path / "other.csr").write_bytes(certificate_request(key, "site-9"))
    refused = CliRunner().invoke(
        main,
        ["--state-dir", str(broker.state), *enroll, "--broker-csr", str(tmp_path / "other.csr")],
    )
    assert refused.exit_code == 3, refused.output
    assert "is for ['site-9'], not ['site-4']" in refused.output
    assert not credentials(broker.out, "site-4").exists()

    (tmp_path / "first.csr").write_bytes(certificate_request(key, "site-4"))
    first = json.loads(cli(broker.state, *enroll, "--broker-csr", str(tmp_path / "first.csr")))
    issued = credentials(broker.out, "site-4")
    assert first["broker_key_on_gateway"] is True
    assert first["revoked_serial"] is None
    assert sorted(p.name for p in issued.iterdir()) == ["ca.pem", "client.pem"]
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(issued / "client.pem", old / "client.pem")
    shutil.copy(tmp_path / "gw.key", old / "client.key")
    assert connack_received(broker.port, context=tls_context(broker, old))
    # The same request again keeps the certificate.
    again = json.loads(cli(broker.state, *enroll, "--broker-csr", str(tmp_path / "first.csr")))
    assert again["broker_login"]["issued"] is False

    new_key, made = load_or_make_key(tmp_path / "gw.key", new=True)
    assert made
    (tmp_path / "second.csr").write_bytes(certificate_request(new_key, "site-4"))
    second = json.loads(cli(broker.state, *enroll, "--broker-csr", str(tmp_path / "second.csr")))
    assert second["revoked_serial"] == first["broker_login"]["serial"]
    new = tmp_path / "new"
    new.mkdir()
    shutil.copy(issued / "client.pem", new / "client.pem")
    shutil.copy(tmp_path / "gw.key", new / "client.key")
    broker.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + WAIT_S
    while connack_received(broker.port, context=tls_context(broker, old)):
        assert time.monotonic() < deadline, "the replaced certificate still works"
        time.sleep(0.05)
    assert connack_received(broker.port, context=tls_context(broker, new))
    # broker-config later keeps the certificate whose key is on the gateway.
    cli(broker.state, "broker-config", *broker.arguments)
    assert (issued / "client.pem").read_bytes() == (new / "client.pem").read_bytes()
    assert not (issued / "client.key").exists()
