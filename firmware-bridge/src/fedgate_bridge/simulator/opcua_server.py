"""The simulated plant's tags served by an OPC-UA server (asyncua).

Every tag is a Double variable ``ns=<idx>;s=<TAG>`` under the object ``Plant`` of the
namespace ``urn:fedgate:sim:tep``. Each published sample is written with its source
timestamp set to the wall-clock time at which the simulator published that sample, so a
client sees one timestamp per sample, advancing by one sample period / ``speed``.

The server is anonymous and unencrypted: it is a demo and test fixture bound to loopback
by default, not a plant.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC
from types import TracebackType
from typing import Any

from asyncua import ua
from asyncua.server.server import Server
from asyncua.ua.attribute_ids import AttributeIds

from fedgate_bridge.errors import SimulatorError
from fedgate_bridge.simulator.register_map import (
    OPCUA_NAMESPACE_URI,
    OPCUA_OBJECT_NAME,
    TAG_UNITS,
    TAGS,
    opcua_endpoint,
)
from fedgate_bridge.simulator.tep_plant import PlantSample

__all__ = ["PlantOpcUaServer"]

_logger = logging.getLogger(__name__)


class PlantOpcUaServer:
    """An OPC-UA server holding the plant's latest sample.

    Use as ``async with PlantOpcUaServer(host=..., port=..., initial=sample) as server:``;
    :meth:`publish` writes a new sample. ``namespace_index`` and ``endpoint`` are known
    once started.
    """

    def __init__(self, *, host: str, port: int, initial: PlantSample) -> None:
        self.host = host
        self.port = port
        self.endpoint = opcua_endpoint(host, port)
        self._initial = initial
        self._server: Any = None
        self._node_ids: list[Any] = []
        self.namespace_index = -1

    async def start(self) -> None:
        """Build the address space and listen. Raises :class:`SimulatorError`."""
        server = Server()
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("fedgate TEP plant simulator")
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        index = await server.register_namespace(OPCUA_NAMESPACE_URI)
        plant = await server.nodes.objects.add_object(
            ua.NodeId(ua.String(OPCUA_OBJECT_NAME), ua.Int16(index)),
            ua.QualifiedName(OPCUA_OBJECT_NAME, index),
        )
        node_ids = []
        for tag, value in zip(TAGS, self._initial.values, strict=True):
            node = await plant.add_variable(
                ua.NodeId(ua.String(tag), ua.Int16(index)),
                ua.QualifiedName(tag, index),
                ua.Variant(value, ua.VariantType.Double),
            )
            if TAG_UNITS[tag]:
                await node.write_attribute(
                    AttributeIds.Description,
                    ua.DataValue(ua.Variant(ua.LocalizedText(f"unit: {TAG_UNITS[tag]}"))),
                )
            node_ids.append(node.nodeid)
        try:
            await server.start()
        except OSError as exc:
            raise SimulatorError(
                f"cannot serve OPC-UA on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from exc
        self._server = server
        self._node_ids = node_ids
        self.namespace_index = index
        await self.publish(self._initial, wall_time=time.time())

    async def stop(self) -> None:
        """Stop listening (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop()

    async def publish(self, sample: PlantSample, *, wall_time: float) -> None:
        """Write ``sample``'s values, source-stamped ``wall_time`` (Unix seconds)."""
        server = self._server
        if server is None:
            return
        stamp = ua.DateTime.fromtimestamp(wall_time, UTC)
        for node_id, value in zip(self._node_ids, sample.values, strict=True):
            await server.write_attribute_value(
                node_id,
                ua.DataValue(
                    ua.Variant(value, ua.VariantType.Double),
                    SourceTimestamp=stamp,
                    ServerTimestamp=stamp,
                ),
            )

    async def __aenter__(self) -> PlantOpcUaServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
