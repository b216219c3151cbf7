"""Where each simulated tag lives: tag order, Modbus addresses, OPC-UA node ids, bridge config.

The order is fixed and documented because PLC integrators, the bridge configuration and the
agent's feature vector all depend on it. It is the classic Braatz TEP data layout plus one
label tag::

    index  tag         holding registers   meaning
    0..40  XMEAS_1..41   0,2,...,80        the 41 published measurements
    41..51 XMV_1..11    82,84,...,102      manipulated variables 1..11 (controller outputs, %)
    52     FAULT        104                lowest active IDV number, 0 = normal operation

Every tag is a float32 in two holding registers, high word first (``word_order = "big"``,
the Modbus convention), at ``address = 2 * index``: all 53 tags fit one 106-register read.
``FAULT`` is also input register 0 as a uint16, and discrete input 0 is ``FAULT != 0``.
Nothing is writable. XMV 12 (agitator speed) is constant in the base case and left out, as
in the published data sets.

On OPC-UA every tag is a Double variable ``ns=<idx>;s=<TAG>`` under the object ``Plant`` of
namespace :data:`OPCUA_NAMESPACE_URI` (``idx`` is 2 on a fresh server).

This module imports nothing from tep-studio, so a bridge configuration can be written (and
this map read) without the ``sim`` extra.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "FAULT_DISCRETE_INPUT",
    "FAULT_INPUT_REGISTER",
    "FAULT_TAG",
    "FEATURE_TAGS",
    "HOLDING_REGISTER_COUNT",
    "MEASUREMENT_TAGS",
    "MV_TAGS",
    "OPCUA_NAMESPACE_URI",
    "OPCUA_OBJECT_NAME",
    "TAGS",
    "TAG_UNITS",
    "HoldingSlot",
    "bridge_config_for",
    "float32_registers",
    "holding_image",
    "holding_slots",
    "opcua_endpoint",
    "opcua_node_id",
    "register_map_document",
]

MEASUREMENT_TAGS: tuple[str, ...] = tuple(f"XMEAS_{i}" for i in range(1, 42))
MV_TAGS: tuple[str, ...] = tuple(f"XMV_{i}" for i in range(1, 12))
#: The 52 features of the Braatz layout, in the agent's input order.
FEATURE_TAGS: tuple[str, ...] = MEASUREMENT_TAGS + MV_TAGS
FAULT_TAG = "FAULT"
#: Every tag the simulator serves, in register order.
TAGS: tuple[str, ...] = (*FEATURE_TAGS, FAULT_TAG)

#: Registers per float32 tag.
REGISTERS_PER_TAG = 2
HOLDING_REGISTER_COUNT = REGISTERS_PER_TAG * len(TAGS)
FAULT_INPUT_REGISTER = 0
FAULT_DISCRETE_INPUT = 0

OPCUA_NAMESPACE_URI = "urn:fedgate:sim:tep"
OPCUA_OBJECT_NAME = "Plant"

# Engineering units as tep-studio names them (tests check they still agree).
_MEASUREMENT_UNITS = (
    *("kscmh", "kg/h", "kg/h", "kscmh", "kscmh", "kscmh"),  # XMEAS 1-6: feeds, recycle
    *("kPa gauge", "%", "degC", "kscmh", "degC", "%", "kPa gauge"),  # 7-13: reactor, separator
    *("m3/h", "%", "kPa gauge", "m3/h", "degC", "kg/h", "kW", "degC", "degC"),  # 14-22
    *(["mol %"] * 19),  # XMEAS 23-41: analyser compositions
)
TAG_UNITS: dict[str, str] = {
    **dict(zip(MEASUREMENT_TAGS, _MEASUREMENT_UNITS, strict=True)),
    **dict.fromkeys(MV_TAGS, "%"),
    FAULT_TAG: "",
}


@dataclass(frozen=True, slots=True)
class HoldingSlot:
    """One tag's place in the holding registers (always float32, high word first)."""

    tag: str
    address: int
    unit: str


def holding_slots() -> tuple[HoldingSlot, ...]:
    """Every tag with its holding-register address, in register order."""
    return tuple(
        HoldingSlot(tag=tag, address=REGISTERS_PER_TAG * index, unit=TAG_UNITS[tag])
        for index, tag in enumerate(TAGS)
    )


def float32_registers(value: float) -> tuple[int, int]:
    """``value`` as IEEE-754 float32 in two 16-bit registers, high word first."""
    high, low = struct.unpack(">HH", struct.pack(">f", value))
    return int(high), int(low)


def holding_image(values: Sequence[float]) -> list[int]:
    """All holding registers for ``values`` (one per tag, in :data:`TAGS` order)."""
    if len(values) != len(TAGS):
        raise ValueError(f"expected {len(TAGS)} values (one per tag), got {len(values)}")
    image: list[int] = []
    for value in values:
        image.extend(float32_registers(value))
    return image


def opcua_node_id(tag: str, namespace_index: int) -> str:
    """The node id string of ``tag``: ``ns=<idx>;s=<TAG>``."""
    return f"ns={namespace_index};s={tag}"


def opcua_endpoint(host: str, port: int) -> str:
    """The ``opc.tcp://`` endpoint URL of a simulator listening on ``host:port``."""
    return f"opc.tcp://{_url_host(host)}:{port}"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def register_map_document(*, namespace_index: int) -> dict[str, object]:
    """The register map as plain data (what ``simulate --json`` prints)."""
    return {
        "tags": list(TAGS),
        "modbus": {
            "unit": 1,
            "holding_float32_big_word_order": [
                {"tag": slot.tag, "address": slot.address, "unit": slot.unit}
                for slot in holding_slots()
            ],
            "holding_register_count": HOLDING_REGISTER_COUNT,
            "fault_input_register_uint16": FAULT_INPUT_REGISTER,
            "fault_active_discrete_input": FAULT_DISCRETE_INPUT,
        },
        "opcua": {
            "namespace_uri": OPCUA_NAMESPACE_URI,
            "namespace_index": namespace_index,
            "object": OPCUA_OBJECT_NAME,
            "nodes": {tag: opcua_node_id(tag, namespace_index) for tag in TAGS},
        },
    }


def _toml_string(text: str) -> str:
    # A JSON string literal is a valid TOML basic string for everything json.dumps emits.
    return json.dumps(text, ensure_ascii=False)


def _client_id_for(topic_prefix: str) -> str:
    # Several simulated sites run on one host: the default "fedgate-bridge-<hostname>"
    # would make their bridges kick each other off the broker.
    safe = "".join(c if c.isalnum() or c in "_.-" else "-" for c in topic_prefix)
    return f"fedgate-bridge-{safe}"[:128]


def bridge_config_for(
    *,
    host: str = "127.0.0.1",
    modbus_port: int = 0,
    opcua_port: int = 0,
    opcua_namespace_index: int = 2,
    topic_prefix: str = "plant/site-1",
    state_dir: str = "/var/lib/fedgate-bridge",
    broker_host: str = "127.0.0.1",
    broker_port: int = 1883,
    poll_interval_s: float = 1.0,
    modbus_source: str = "sim-modbus",
    opcua_source: str = "sim-opcua",
    log_level: str = "info",
) -> str:
    """A complete fedgate-bridge TOML configuration that bridges this simulator.

    One ``[[modbus]]`` source when ``modbus_port`` is non-zero, one ``[[opcua]]`` source
    when ``opcua_port`` is non-zero (each carries every tag, so with both the broker sees
    every reading twice, under ``<topic_prefix>/<source>/<tag>``). ``poll_interval_s``
    should be one sample period in wall seconds so each sample is read once.
    """
    if not modbus_port and not opcua_port:
        raise ValueError("a bridge configuration needs the Modbus or the OPC-UA port")
    lines = [
        "# fedgate-bridge configuration for `fedgate-bridge simulate --plant tep`.",
        f"state_dir = {_toml_string(state_dir)}",
        f"topic_prefix = {_toml_string(topic_prefix)}",
        f"log_level = {_toml_string(log_level)}",
        "",
        "[broker]",
        f"host = {_toml_string(broker_host)}",
        f"port = {int(broker_port)}",
        f"client_id = {_toml_string(_client_id_for(topic_prefix))}",
        'username = ""',
        'password_file = ""',
        "keepalive_s = 30",
        "max_inflight = 100",
        "",
        "[outbox]",
        "max_messages = 1000000",
        'policy = "drop_oldest"',
    ]
    if modbus_port:
        lines += _modbus_section(modbus_source, host, modbus_port, poll_interval_s)
    if opcua_port:
        lines += _opcua_section(
            opcua_source, opcua_endpoint(host, opcua_port), opcua_namespace_index, poll_interval_s
        )
    return "\n".join(lines) + "\n"


def _modbus_section(name: str, host: str, port: int, poll_interval_s: float) -> list[str]:
    lines = [
        "",
        "[[modbus]]",
        f"name = {_toml_string(name)}",
        'transport = "tcp"',
        f"host = {_toml_string(host)}",
        f"port = {int(port)}",
        'serial_port = ""',
        "baudrate = 19200",
        'parity = "N"',
        "stopbits = 1",
        "bytesize = 8",
        "unit = 1",
        f"poll_interval_s = {float(poll_interval_s)!r}",
        f"timeout_s = {max(1.0, float(poll_interval_s))!r}",
    ]
    for slot in holding_slots():
        lines += [
            "",
            "  [[modbus.registers]]",
            f"  tag = {_toml_string(slot.tag)}",
            f"  address = {slot.address}",
            '  kind = "holding"',
            '  type = "float32"',
            '  word_order = "big"',
            "  scale = 1.0",
            "  offset = 0.0",
            f"  unit = {_toml_string(slot.unit)}",
        ]
    return lines


def _opcua_section(
    name: str, endpoint: str, namespace_index: int, poll_interval_s: float
) -> list[str]:
    lines = [
        "",
        "[[opcua]]",
        f"name = {_toml_string(name)}",
        f"endpoint = {_toml_string(endpoint)}",
        'mode = "subscribe"',
        f"poll_interval_s = {float(poll_interval_s)!r}",
        'username = ""',
        'password_file = ""',
    ]
    for tag in TAGS:
        lines += [
            "",
            "  [[opcua.nodes]]",
            f"  tag = {_toml_string(tag)}",
            f"  node_id = {_toml_string(opcua_node_id(tag, namespace_index))}",
            f"  unit = {_toml_string(TAG_UNITS[tag])}",
        ]
    return lines
