"""The reconnecting MQTT link against real brokers on free loopback ports:
an MQTT 3.1.1-only embedded broker (amqtt) and a private Mosquitto that is restarted."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fedgate_common.backoff import Backoff
from fedgate_common.tasks import cancel_until_done
from fedgate_coordinator.mqtt_link import InboundMessage, MqttLink, MqttSettings

from tests.net_support import free_port, wait_for_port

AMQTT_BROKER = """
import asyncio, sys
from amqtt.broker import Broker

async def main() -> None:
    broker = Broker({"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{sys.argv[1]}"}},
                     "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                                 {"allow_anonymous": True}}})
    await broker.start()
    await asyncio.Event().wait()

asyncio.run(main())
"""
MOSQUITTO = "/usr/sbin/mosquitto"


@contextlib.contextmanager
def broker(command: list[str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, process=process)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=10)


def mosquitto_command(tmp_path: Path, port: int) -> list[str]:
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    return [MOSQUITTO, "-c", str(conf)]


async def round_trip(link: MqttLink, topic: str, payload: bytes) -> InboundMessage:
    await link.publish(topic, payload)
    return await asyncio.wait_for(link.inbound.get(), 10)


def new_link(port: int) -> MqttLink:
    return MqttLink(
        settings=MqttSettings(port=port, client_id=f"link-test-{port}"),
        subscriptions=["fedgate/t/c/round/+/+/+"],
        backoff=Backoff(initial_s=0.05, max_s=0.5),
    )


async def test_auto_protocol_falls_back_to_mqtt_311() -> None:
    port = free_port()
    with broker([sys.executable, "-c", AMQTT_BROKER, str(port)], port):
        link = new_link(port)
        task = asyncio.create_task(link.run())
        try:
            await asyncio.wait_for(link.connected.wait(), 15)
            assert link._use_v5 is False  # the broker refused MQTT 5
            message = await round_trip(link, "fedgate/t/c/round/1/update/a", b"hello")
            assert message == InboundMessage("fedgate/t/c/round/1/update/a", b"hello")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="needs the mosquitto binary")
async def test_link_reconnects_after_the_broker_restarts(tmp_path: Path) -> None:
    port = free_port()
    command = mosquitto_command(tmp_path, port)
    link = new_link(port)
    task = asyncio.create_task(link.run())
    try:
        with broker(command, port):
            await asyncio.wait_for(link.connected.wait(), 15)
            assert link._use_v5 is True
            first = await round_trip(link, "fedgate/t/c/round/1/update/a", b"before")
            assert first.payload == b"before"
        # broker gone: the link notices and keeps trying with backoff
        await asyncio.wait_for(_until_disconnected(link), 15)
        with broker(command, port):
            await asyncio.wait_for(link.connected.wait(), 15)
            second = await round_trip(link, "fedgate/t/c/round/2/update/a", b"after")
            assert second.payload == b"after"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _until_disconnected(link: MqttLink) -> None:
    while link.connected.is_set():  # noqa: ASYNC110 - the link exposes no "lost" event
        await asyncio.sleep(0.05)


HONEST = [f"fedgate/t/c/round/9/keys/site-{n}" for n in range(20)]


async def flood_then_honest(
    tmp_path: Path, link: MqttLink, port: int, flood_topic: str, count: int
) -> list[str]:
    """``count`` QoS 0 messages on ``flood_topic`` that nobody reads yet, then one message
    on each of :data:`HONEST`; returns the topics the link delivered, in order."""
    lines = tmp_path / "flood.txt"
    lines.write_text("junk\n" * count)
    received: list[str] = []
    with broker(mosquitto_command(tmp_path, port), port):
        task = asyncio.create_task(link.run())
        try:
            await asyncio.wait_for(link.connected.wait(), 15)
            with lines.open("rb") as flood:
                publisher = await asyncio.create_subprocess_exec(
                    "mosquitto_pub",
                    "-p",
                    str(port),
                    "-q",
                    "0",
                    "-t",
                    flood_topic,
                    "-l",
                    stdin=flood,
                )
                assert await asyncio.wait_for(publisher.wait(), 60) == 0
            for topic in HONEST:
                await link.publish(topic, b"real")
            with contextlib.suppress(TimeoutError):
                while True:
                    received.append((await asyncio.wait_for(link.inbound.get(), 2)).topic)
        finally:
            await cancel_until_done([task])
    return received


@pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="needs the mosquitto binary")
@pytest.mark.parametrize("admit", [True, False], ids=["admit-at-receive", "no-admit-control"])
async def test_a_flood_refused_at_receive_cannot_crowd_out_later_messages(
    tmp_path: Path, admit: bool
) -> None:
    """A flood the consumer is not reading (the coordinator busy with a stage) that the
    ``admit`` hook refuses is dropped as it arrives, so the honest messages behind it all
    get through. The control shows why the hook runs before the queues: without it, the
    flood fills the link's queue and aiomqtt's, and aiomqtt discards what comes next."""
    port = free_port()
    flood_topic = "fedgate/t/c/round/9/keys/flooder"
    link = MqttLink(
        settings=MqttSettings(port=port, client_id=f"flood-test-{port}", queue_size=200),
        subscriptions=["fedgate/t/c/round/+/+/+"],
        admit=(lambda topic, _full: topic != flood_topic) if admit else None,
    )
    received = await flood_then_honest(tmp_path, link, port, flood_topic, 5_000)
    arrived = [t for t in received if t in HONEST]
    if admit:
        assert received == HONEST
    else:
        assert flood_topic in received
        assert len(arrived) < len(HONEST)  # crowded out


@pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="needs the mosquitto binary")
async def test_a_full_queue_still_takes_what_admit_must_take(tmp_path: Path) -> None:
    """Messages the hook admits fill the queue while nobody reads it (many senders, each
    within its budget). With the queue full the hook is told so and lets only the honest
    messages in: none is discarded, and the queue stays at its size but for them."""
    port = free_port()
    refused_when_full: list[str] = []

    def admit(topic: str, full: bool) -> bool:
        if full and topic not in HONEST:
            refused_when_full.append(topic)
            return False
        return True

    link = MqttLink(
        settings=MqttSettings(port=port, client_id=f"full-test-{port}", queue_size=100),
        subscriptions=["fedgate/t/c/round/+/+/+"],
        admit=admit,
    )
    received = await flood_then_honest(tmp_path, link, port, "fedgate/t/c/round/9/keys/many", 2_000)
    assert [t for t in received if t in HONEST] == HONEST
    assert refused_when_full  # the flood did fill the queue
    # Bounded: the link's queue, aiomqtt's, and the one message the loop between them holds.
    assert len(received) <= 2 * 100 + 1 + len(HONEST)
