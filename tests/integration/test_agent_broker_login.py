"""The agent logs in to a locked-down broker: TLS, no anonymous access, a password per user.

One private Mosquitto for the module with a TLS listener only (its certificate from the
coordinator's broker CA, as ``broker-config`` issues it) and a password file made with
``mosquitto_passwd``, so the password login is tested too. The agent's protocol
link (:class:`MqttLink`) and its plant-data ingest (:class:`MqttIngest`) connect with the
``[broker]`` settings; a wrong password or a broker certificate from another CA never gets a
connection; bad settings are configuration errors before any network IO.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
import pytest
from fedgate_agent.broker_login import cloud_login, ingest_login
from fedgate_agent.config import AgentConfig, BrokerConfig, IngestConfig
from fedgate_agent.errors import ConfigError
from fedgate_agent.ingest.buffer import BufferSettings, IngestBuffer
from fedgate_agent.ingest.mqtt_source import MqttIngest, MqttIngestSettings, MqttSubscription
from fedgate_agent.mqtt_link import MqttLink
from fedgate_common.backoff import Backoff
from fedgate_common.tasks import cancel_until_done
from fedgate_coordinator.broker_config import (
    CA_CERT_NAME,
    SERVER_CERT_NAME,
    SERVER_KEY_NAME,
    BrokerAuthority,
)
from paho.mqtt.enums import CallbackAPIVersion

from tests.mosquitto_support import Mosquitto

PASSWD = Path("/usr/bin/mosquitto_passwd")
FAST = Backoff(initial_s=0.05, max_s=0.3)

pytestmark = pytest.mark.skipif(not PASSWD.exists(), reason="needs mosquitto_passwd")


class Locked:
    """Where the module's locked-down broker listens and the files to reach it."""

    def __init__(self, directory: Path) -> None:
        # The broker's certificates as `fedgate-coordinator broker-config` makes them.
        cloud, other = directory / "cloud", directory / "other"
        authorities = [BrokerAuthority(d, deployment="d", cloud=d.name) for d in (cloud, other)]
        for authority in authorities:
            authority.directory.mkdir()
            authority.load_or_create()
        authorities[0].issue_server(cloud, ["127.0.0.1"], rotate=False)
        self.ca_file = cloud / CA_CERT_NAME
        self.other_ca_file = other / CA_CERT_NAME
        cert, key = cloud / SERVER_CERT_NAME, cloud / SERVER_KEY_NAME
        passwords = directory / "passwords"
        for user, password in (("site-1", "s3cret-1"), ("bridge", "s3cret-b")):
            create = () if passwords.exists() else ("-c",)
            subprocess.run(
                [str(PASSWD), *create, "-b", str(passwords), user, password],
                check=True,
                capture_output=True,
            )
        self.password_file = directory / "site-1.password"
        self.password_file.write_text("s3cret-1\n")
        self.wrong_password_file = directory / "wrong.password"
        self.wrong_password_file.write_text("guess\n")
        self.broker = Mosquitto(
            directory / "broker",
            extra=(
                f"cafile {self.ca_file}\ncertfile {cert}\nkeyfile {key}\n"
                f"password_file {passwords}\n"
            ),
        )

    @property
    def port(self) -> int:
        return self.broker.port

    def broker_config(self, **overrides: str) -> BrokerConfig:
        values = {
            "host": "127.0.0.1",
            "port": self.port,
            "username": "site-1",
            "password_file": str(self.password_file),
            "tls_ca_file": str(self.ca_file),
        }
        values.update(overrides)
        return msgspec.convert(values, BrokerConfig)

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish as the bridge user over TLS and wait for the PUBACK."""
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        client.username_pw_set("bridge", "s3cret-b")
        client.tls_set(ca_certs=str(self.ca_file))
        client.connect("127.0.0.1", self.port, keepalive=10)
        client.loop_start()
        try:
            client.publish(topic, payload, qos=1).wait_for_publish(10)
        finally:
            client.disconnect()
            client.loop_stop()


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Locked]:
    setup = Locked(tmp_path_factory.mktemp("locked-broker"))
    setup.broker.start()
    try:
        yield setup
    finally:
        setup.broker.stop()


@contextlib.asynccontextmanager
async def running(coroutine: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    task = asyncio.create_task(coroutine)
    try:
        yield
    finally:
        await cancel_until_done([task])


def agent_config(tmp_path: Path, broker: BrokerConfig, ingest: IngestConfig) -> AgentConfig:
    return msgspec.convert(
        {
            "deployment": "d",
            "cloud": "c",
            "agent_id": "site-1",
            "state_dir": str(tmp_path),
            "coordinator_public_key": "ed25519:" + "00" * 32,
            "broker": msgspec.to_builtins(broker),
            "ingest": msgspec.to_builtins(ingest),
        },
        AgentConfig,
    )


async def test_the_protocol_link_logs_in_with_tls_and_a_password(locked: Locked) -> None:
    link = MqttLink(
        settings=locked.broker_config(),
        client_id="fedgate-agent-d-c-site-1",
        subscriptions=["fedgate/d/c/round/+/start"],
        backoff=FAST,
    )
    async with running(link.run()):
        await asyncio.wait_for(link.connected.wait(), 10)
        await asyncio.to_thread(locked.publish, "fedgate/d/c/round/1/start", b"hello")
        message = await asyncio.wait_for(link.inbound.get(), 10)
    assert message.topic == "fedgate/d/c/round/1/start"
    assert message.payload == b"hello"


def connection_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Why connecting failed: the link's "connection lost" errors and the MQTT client's
    socket errors (a reset shows there before the link's CONNACK timeout).

    Left out: "Event loop is closed" from a socket callback. That is a client of an
    earlier test whose socket is closed by the garbage collector after its test's event
    loop ended; it logs through the same logger, but says nothing about this link."""
    failures = [
        str(getattr(r, "fields", {}).get("error", r.getMessage()))
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("fedgate.agent")
    ]
    return [f for f in failures if "Event loop is closed" not in f]


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        pytest.param({"password_file": "wrong"}, "Not authorized", id="wrong-password"),
        pytest.param({"username": "", "password_file": ""}, "Not authorized", id="anonymous"),
        pytest.param(
            {"tls_ca_file": "other"}, "CERTIFICATE_VERIFY_FAILED", id="broker-cert-from-another-ca"
        ),
        pytest.param(
            {"tls_ca_file": ""}, "Connection reset by peer", id="plain-tcp-to-the-tls-port"
        ),
    ],
)
async def test_a_link_the_broker_or_the_agent_must_refuse_never_connects(
    locked: Locked, overrides: dict[str, str], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    files = {"wrong": str(locked.wrong_password_file), "other": str(locked.other_ca_file)}
    settings = locked.broker_config(**{k: files.get(v, v) for k, v in overrides.items()})
    link = MqttLink(
        settings=settings, client_id="fedgate-agent-d-c-site-1", subscriptions=[], backoff=FAST
    )
    caplog.set_level(logging.WARNING, logger="fedgate.agent")
    async with running(link.run()):
        deadline = asyncio.get_running_loop().time() + 20
        while not (failures := connection_failures(caplog)):
            assert asyncio.get_running_loop().time() < deadline, "no connection attempt failed"
            await asyncio.sleep(0.05)
        assert not link.connected.is_set()
    assert all(reason in failure for failure in failures), failures


async def test_the_ingest_inherits_the_cloud_login_and_stores_over_tls(
    locked: Locked, tmp_path: Path
) -> None:
    config = agent_config(tmp_path, locked.broker_config(), IngestConfig())
    login = ingest_login(config)
    assert login.username == "site-1"
    assert login.password == "s3cret-1"
    assert login.tls is not None
    settings = MqttIngestSettings(
        host="127.0.0.1",
        port=locked.port,
        client_id="fedgate-ingest-d-c-site-1",
        subscriptions=(MqttSubscription("plant/+/+"),),
        username=login.username,
        password=login.password,
        tls=login.tls,
        backoff=FAST,
        keepalive_s=5,
    )
    with IngestBuffer.open(BufferSettings(path=tmp_path / "buffer.db")) as buffer:
        ingest = MqttIngest(settings=settings, buffer=buffer)
        async with running(ingest.run()):
            await asyncio.wait_for(ingest.connected.wait(), 10)
            payload = json.dumps({"ts": time.time(), "value": 4.5, "seq": 0}).encode()
            await asyncio.to_thread(locked.publish, "plant/line1/XMEAS_1", payload)
            deadline = asyncio.get_running_loop().time() + 10
            while ingest.counters.committed < 1:
                assert asyncio.get_running_loop().time() < deadline, "never committed"
                await asyncio.sleep(0.05)
        assert ingest.counters.malformed == {}
    with IngestBuffer.open_read_only(tmp_path / "buffer.db") as stored:
        [tag] = stored.tags()
        _, values = stored.read_series([tag])[tag]
    assert tag.endswith("XMEAS_1")
    assert values.tolist() == [4.5]


def test_its_own_ingest_login_is_used_for_another_broker(locked: Locked, tmp_path: Path) -> None:
    ingest = IngestConfig(mqtt_host="plant-broker.local", mqtt_username="reader")
    login = ingest_login(agent_config(tmp_path, locked.broker_config(), ingest))
    assert login.username == "reader"
    assert login.password is None
    assert login.tls is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tls_ca_file": "/nonexistent/ca.crt"}, "cannot load the CA file /nonexistent/ca.crt"),
        ({"password_file": "/nonexistent/pw"}, "cannot read the [broker] password file"),
        ({"tls_cert_file": "/x.crt"}, "set both tls_cert_file and tls_key_file"),
        ({"tls_ca_file": "", "tls_key_file": "k", "tls_cert_file": "c"}, "needs tls_ca_file"),
    ],
)
def test_bad_login_settings_are_config_errors_before_any_network_io(
    locked: Locked, overrides: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        MqttLink(settings=locked.broker_config(**overrides), client_id="x", subscriptions=[])


def test_the_ca_file_is_what_verifies_the_broker(locked: Locked) -> None:
    login = cloud_login(locked.broker_config())
    assert login.tls is not None
    assert login.tls.verify_mode == ssl.CERT_REQUIRED
    assert login.tls.check_hostname
