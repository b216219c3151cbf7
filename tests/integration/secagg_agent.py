"""A gateway's secure-aggregation side over its own MQTT connection, for integration tests:
the :class:`Participant` core the real agent runs, without torch training."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from dataclasses import dataclass, field

import aiomqtt
import nacl.signing
import numpy as np
from fedgate_common.consensus.wire import graph_seed_material
from fedgate_common.envelope import decode_payload, open_envelope, seal
from fedgate_common.messages import (
    GlobalModel,
    KeyRoster,
    Payload,
    RoundStart,
    ShareDelivery,
    SurvivorCheck,
    UnmaskRequest,
)
from fedgate_common.secagg.keystream import Words
from fedgate_common.secagg.participant import Participant
from fedgate_common.tasks import cancel_until_done
from fedgate_common.topics import (
    coordinator_broadcast_filter,
    coordinator_direct_filter,
    model_topic,
    round_topic,
)


@dataclass
class SimulatedAgent:
    """Answers every stage of each round it is selected for. ``drop_after_shares``: the
    gateway loses power after sending its shares; ``drop_after_masked``: after sending its
    masked input. ``flood_from_round``: from that round on,
    after each protocol message it sends ``flood_factor`` more on the same topic (replays of
    that message and junk bytes, alternately), from a second connection."""

    agent_id: str
    deployment: str
    cloud: str
    key: nacl.signing.SigningKey
    update: np.ndarray
    num_samples: int
    host: str = "127.0.0.1"
    port: int = 1883
    drop_after_shares: bool = False
    drop_after_masked: bool = False
    flood_from_round: int | None = None
    flood_factor: int = 0
    encoded: Words | None = None
    participant: Participant | None = None
    certificate: bytes = b""
    sent: list[str] = field(default_factory=list)
    flooded: int = 0
    _floods: asyncio.Queue[tuple[str, bytes]] = field(default_factory=asyncio.Queue)

    def seal(self, payload: Payload) -> bytes:
        return seal(
            payload,
            signing_key=self.key,
            deployment=self.deployment,
            cloud=self.cloud,
            sender=self.agent_id,
        )

    async def send(self, client: aiomqtt.Client, payload: Payload) -> None:
        stage = type(payload).__struct_config__.tag
        assert isinstance(stage, str)
        topic = round_topic(self.deployment, self.cloud, payload.round, stage, self.agent_id)
        raw = self.seal(payload)
        await client.publish(topic, raw, qos=1)
        self.sent.append(stage)
        if self.flood_from_round is not None and payload.round >= self.flood_from_round:
            self._floods.put_nowait((topic, raw))

    async def _flood(self, client: aiomqtt.Client) -> None:
        """After each protocol message, ``flood_factor`` more on its topic: replays and junk
        bytes, alternately. QoS 0, the cheapest flood to send, on a connection of its own:
        the flood does not hold back the gateway's next protocol message, so the round
        measures the coordinator, not the flooder's publishing."""
        while True:
            topic, raw = await self._floods.get()
            for index in range(self.flood_factor):
                junk = index % 2 == 1
                await client.publish(topic, secrets.token_bytes(64) if junk else raw, qos=0)
                self.flooded += 1

    async def run(self, ready: asyncio.Event) -> None:
        async with contextlib.AsyncExitStack() as stack:
            if self.flood_from_round is not None:
                flood_client = await stack.enter_async_context(
                    aiomqtt.Client(self.host, self.port, identifier=f"{self.agent_id}-flood")
                )
                flooding = asyncio.create_task(self._flood(flood_client))
                stack.push_async_callback(cancel_until_done, [flooding])
            client = await stack.enter_async_context(aiomqtt.Client(self.host, self.port))
            await client.subscribe(coordinator_broadcast_filter(self.deployment, self.cloud), qos=1)
            await client.subscribe(
                coordinator_direct_filter(self.deployment, self.cloud, self.agent_id), qos=1
            )
            await client.subscribe(model_topic(self.deployment, self.cloud), qos=1)
            ready.set()
            async for message in client.messages:
                raw = bytes(message.payload) if isinstance(message.payload, bytes) else b""
                if raw and not await self.on_message(client, raw):
                    return

    async def on_message(self, client: aiomqtt.Client, raw: bytes) -> bool:
        """Answer one coordinator message; False when the gateway goes away."""
        payload = decode_payload(open_envelope(raw))
        if isinstance(payload, GlobalModel):
            self.certificate = graph_seed_material(payload)  # next round's base
        elif isinstance(payload, RoundStart):
            self.participant = Participant(
                agent_id=self.agent_id,
                deployment=self.deployment,
                cloud=self.cloud,
                start=payload,
                base_certificate=self.certificate,
                pinned_identities={},
            )
            self.encoded = self.participant.encode(self.update, self.num_samples)
            await self.send(client, self.participant.advertise_keys())
        elif self.participant is None:
            pass
        elif isinstance(payload, KeyRoster):
            await self.send(client, self.participant.on_roster(payload))
            if self.drop_after_shares:
                return False  # the gateway loses power mid-round
        elif isinstance(payload, ShareDelivery):
            self.participant.on_delivery(payload)
            assert self.encoded is not None
            await self.send(client, self.participant.mask_input(self.encoded))
            if self.drop_after_masked:
                return False
        elif isinstance(payload, SurvivorCheck):
            await self.send(client, self.participant.on_check(payload))
        elif isinstance(payload, UnmaskRequest):
            await self.send(client, self.participant.on_unmask(payload))
            self.participant = None  # ready for the next round
        return True
