"""Bridge configuration: one TOML file, checked completely before any network IO.

Every problem is reported at once, each naming the key (``modbus[0].registers[2].type``),
the bad value and what is allowed, so an operator fixes the file in one pass. Loading reads
only local files: the TOML file and, to check they are readable, the password files.

The file shape (every key, with its default) is ``packaging/bridge.toml.example``; the plant
simulator (``fedgate-bridge simulate --write-bridge-config``) writes the same keys.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import socket
import ssl
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, get_args, get_origin

import msgspec
from fedgate_common.errors import BrokerTlsInvalid
from fedgate_common.hosts import host_problem, url_host_problem
from fedgate_common.mqtt_tls import client_tls_context
from fedgate_common.service_units import SettingPath, load_credentials_into

from fedgate_bridge.errors import ConfigError
from fedgate_bridge.registers import REGISTER_WIDTHS, register_count

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "BridgeConfig",
    "BrokerSettings",
    "ModbusRegister",
    "ModbusSourceConfig",
    "OpcuaNode",
    "OpcuaSourceConfig",
    "OutboxSettings",
    "bad_topic_prefix",
    "client_id_of",
    "credential_names",
    "load_config",
    "parse_config",
    "read_password",
    "source_names",
    "tls_context",
    "tls_problems",
    "validate_config",
]

DEFAULT_CONFIG_PATH = Path("/etc/fedgate/bridge.toml")

LOG_LEVELS: Final = ("debug", "info", "warning", "error")
OUTBOX_POLICIES: Final = ("drop_oldest", "reject_new")
MODBUS_TRANSPORTS: Final = ("tcp", "rtu", "rtu-over-tcp")
REGISTER_KINDS: Final = ("holding", "input", "coil", "discrete")
BIT_KINDS: Final = ("coil", "discrete")
REGISTER_TYPES: Final = tuple(REGISTER_WIDTHS)
WORD_ORDERS: Final = ("big", "little")
PARITIES: Final = ("N", "E", "O")
OPCUA_MODES: Final = ("subscribe", "poll")

PORT_RANGE: Final = (1, 65535)
KEEPALIVE_RANGE: Final = (5, 65535)
INFLIGHT_RANGE: Final = (1, 65535)
ACK_TIMEOUT_RANGE: Final = (1, 3600)
MQTT_PROTOCOLS: Final = ("5", "3.1.1")
OUTBOX_RANGE: Final = (1, 100_000_000)
DEVICE_ID_RANGE: Final = (0, 255)
ADDRESS_RANGE: Final = (0, 65535)
BAUDRATE_RANGE: Final = (300, 4_000_000)
INTERVAL_RANGE: Final = (0.01, 86_400.0)
TIMEOUT_RANGE: Final = (0.01, 60.0)

_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # used with fullmatch: no "\n" at the end
_NAME_TEXT: Final = "1-64 characters from A-Z a-z 0-9 _ . - (no / + # or spaces)"
_INTERVAL_TEXT: Final = f"a number of seconds in [{INTERVAL_RANGE[0]}, {INTERVAL_RANGE[1]:g}]"


class BrokerSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The MQTT broker the bridge publishes to."""

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""  # "" → "fedgate-bridge-<hostname>"
    username: str = ""
    password_file: str = ""  # file holding the password (systemd LoadCredential friendly)
    tls_ca_file: str = ""  # CA of the broker's certificate: turns TLS on
    tls_cert_file: str = ""  # client certificate (with tls_key_file), when the broker asks
    tls_key_file: str = ""
    keepalive_s: int = 30
    max_inflight: int = 100  # QoS 1 messages awaiting PUBACK
    ack_timeout_s: int = 30  # a PUBACK later than this: reconnect and send again
    protocol: str = "5"  # MQTT version: "5" (the broker says why it refuses) | "3.1.1"


class OutboxSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The on-disk buffer that holds readings while the broker is unreachable."""

    max_messages: int = 1_000_000
    policy: str = "drop_oldest"  # | "reject_new"


class ModbusRegister(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One tag of a Modbus device: where it lives and how its registers decode."""

    tag: str
    address: int  # 0-based register / coil address
    kind: str = "holding"  # | "input" | "coil" | "discrete"
    type: str = "uint16"  # int16 | uint16 | int32 | uint32 | float32 | float64 | bool
    word_order: str = "big"  # big: high word first (Modbus convention) | little
    scale: float = 1.0  # value = raw * scale + offset
    offset: float = 0.0
    unit: str = ""  # engineering unit, published as "unit" when not empty


class ModbusSourceConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One Modbus device (TCP, serial RTU, or RTU frames over TCP)."""

    name: str
    transport: str = "tcp"  # | "rtu" | "rtu-over-tcp"
    host: str = "127.0.0.1"
    port: int = 502
    serial_port: str = ""
    baudrate: int = 19200
    parity: str = "N"
    stopbits: int = 1
    bytesize: int = 8
    unit: int = 1  # Modbus device id
    poll_interval_s: float = 1.0
    timeout_s: float = 1.0
    registers: tuple[ModbusRegister, ...] = ()


class OpcuaNode(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One OPC-UA variable published as a tag."""

    tag: str
    node_id: str
    unit: str = ""


class OpcuaSourceConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One OPC-UA server, read by subscription or by polling."""

    name: str
    endpoint: str
    mode: str = "subscribe"  # | "poll"
    poll_interval_s: float = 1.0  # subscribe mode: the publishing interval
    username: str = ""
    password_file: str = ""
    nodes: tuple[OpcuaNode, ...] = ()


class BridgeConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Complete bridge configuration (one TOML file)."""

    topic_prefix: str
    state_dir: str = "/var/lib/fedgate-bridge"
    log_level: str = "info"
    broker: BrokerSettings = msgspec.field(default_factory=BrokerSettings)
    outbox: OutboxSettings = msgspec.field(default_factory=OutboxSettings)
    modbus: tuple[ModbusSourceConfig, ...] = ()
    opcua: tuple[OpcuaSourceConfig, ...] = ()

    @property
    def state_path(self) -> Path:
        """Directory of ``outbox.db`` and ``status.json``."""
        return Path(self.state_dir)

    @property
    def outbox_path(self) -> Path:
        return self.state_path / "outbox.db"

    @property
    def status_path(self) -> Path:
        return self.state_path / "status.json"


def client_id_of(config: BridgeConfig) -> str:
    """The MQTT client id: ``broker.client_id``, or ``fedgate-bridge-<hostname>`` when empty."""
    if config.broker.client_id:
        return config.broker.client_id
    return f"fedgate-bridge-{socket.gethostname().split('.')[0]}"


def source_names(config: BridgeConfig) -> list[str]:
    """Every source name, Modbus first, in file order."""
    return [source.name for source in config.modbus] + [source.name for source in config.opcua]


def read_password(path_text: str) -> str | None:
    """The password stored in ``path_text`` (trailing newline removed); None when unset.

    Raises :class:`ConfigError` if the file cannot be read.
    """
    if not path_text:
        return None
    try:
        return Path(path_text).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read password file {path_text}: {exc}") from None


# --------------------------------------------------------------------------- allowed values

_ALLOWED: Final[dict[str, str]] = {
    "state_dir": "an absolute directory path",
    "topic_prefix": (
        "MQTT topic levels separated by /, without + # or empty levels and without a "
        'leading or trailing / (e.g. "plant/site-1")'
    ),
    "log_level": " | ".join(LOG_LEVELS),
    "broker.host": "a host name or IP address, without scheme or port",
    "broker.port": f"an integer {PORT_RANGE[0]}..{PORT_RANGE[1]}",
    "broker.client_id": '1-128 characters without spaces, or "" for fedgate-bridge-<hostname>',
    "broker.username": 'a user name, or "" for anonymous',
    "broker.password_file": 'a readable file holding the password, or "" for none',
    "broker.tls_ca_file": 'a readable CA certificate file (PEM) turning TLS on, or ""',
    "broker.tls_cert_file": 'a client certificate file (with broker.tls_key_file), or ""',
    "broker.tls_key_file": 'the client certificate\'s key file, or ""',
    "broker.keepalive_s": f"an integer {KEEPALIVE_RANGE[0]}..{KEEPALIVE_RANGE[1]} (seconds)",
    "broker.max_inflight": f"an integer {INFLIGHT_RANGE[0]}..{INFLIGHT_RANGE[1]}",
    "broker.ack_timeout_s": (
        f"an integer {ACK_TIMEOUT_RANGE[0]}..{ACK_TIMEOUT_RANGE[1]} (seconds)"
    ),
    "broker.protocol": " or ".join(repr(p) for p in MQTT_PROTOCOLS),
    "outbox.max_messages": f"an integer {OUTBOX_RANGE[0]}..{OUTBOX_RANGE[1]}",
    "outbox.policy": " | ".join(OUTBOX_POLICIES),
    "modbus.name": _NAME_TEXT + ", unique over all sources",
    "modbus.transport": " | ".join(MODBUS_TRANSPORTS),
    "modbus.host": "a host name or IP address, without scheme or port",
    "modbus.port": f"an integer {PORT_RANGE[0]}..{PORT_RANGE[1]}",
    "modbus.serial_port": 'a serial device such as "/dev/ttyUSB0" (needed for transport "rtu")',
    "modbus.baudrate": f"an integer {BAUDRATE_RANGE[0]}..{BAUDRATE_RANGE[1]}",
    "modbus.parity": " | ".join(PARITIES),
    "modbus.stopbits": "1 | 2",
    "modbus.bytesize": "7 | 8",
    "modbus.unit": f"a Modbus device id {DEVICE_ID_RANGE[0]}..{DEVICE_ID_RANGE[1]}",
    "modbus.poll_interval_s": _INTERVAL_TEXT,
    "modbus.timeout_s": f"a number of seconds in [{TIMEOUT_RANGE[0]}, {TIMEOUT_RANGE[1]:g}]",
    "modbus.registers": "one or more [[modbus.registers]] tables",
    "modbus.registers.tag": _NAME_TEXT + ", unique within the source",
    "modbus.registers.address": (
        f"an integer {ADDRESS_RANGE[0]}..{ADDRESS_RANGE[1]}: the 0-based address, with every "
        "register of the value inside 0..65535"
    ),
    "modbus.registers.kind": " | ".join(REGISTER_KINDS),
    "modbus.registers.type": " | ".join(REGISTER_TYPES) + ' (coil and discrete: "bool")',
    "modbus.registers.word_order": "big (high word first) | little",
    "modbus.registers.scale": "a finite number other than 0",
    "modbus.registers.offset": "a finite number",
    "modbus.registers.unit": "an engineering unit of at most 32 characters, or empty",
    "opcua.name": _NAME_TEXT + ", unique over all sources",
    "opcua.endpoint": 'an OPC-UA endpoint URL "opc.tcp://host:port[/path]"',
    "opcua.mode": " | ".join(OPCUA_MODES),
    "opcua.poll_interval_s": _INTERVAL_TEXT,
    "opcua.username": 'a user name, or "" for anonymous',
    "opcua.password_file": 'a readable file holding the password, or "" for none',
    "opcua.nodes": "one or more [[opcua.nodes]] tables",
    "opcua.nodes.tag": _NAME_TEXT + ", unique within the source",
    "opcua.nodes.node_id": 'an OPC-UA node id such as "ns=2;s=XMEAS_1" or "i=2258"',
    "opcua.nodes.unit": "an engineering unit of at most 32 characters, or empty",
}

# --------------------------------------------------------------------------- shape check


def _describe(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string", dict: "table"}
    names[list] = "array"
    return f"{names.get(type(value), type(value).__name__)} {value!r}"


def _generic(path: str) -> str:
    """``modbus[0].registers[2].type`` → ``modbus.registers.type`` (the key in _ALLOWED)."""
    return re.sub(r"\[\d+\]", "", path)


def _allowed(path: str) -> str:
    return _ALLOWED.get(_generic(path), "see packaging/bridge.toml.example")


def _struct_item(annotation: object) -> type[msgspec.Struct] | None:
    """The struct type of a ``tuple[Struct, ...]`` field, else None."""
    if get_origin(annotation) is tuple:
        args = get_args(annotation)
        if args and isinstance(args[0], type) and issubclass(args[0], msgspec.Struct):
            return args[0]
    return None


def _scalar_ok(annotation: object, value: object) -> bool:
    if isinstance(value, bool):
        return annotation is bool
    if annotation is str:
        return isinstance(value, str)
    if annotation is int:
        return isinstance(value, int)
    if annotation is float:
        return isinstance(value, int | float)
    return False


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _shape_problems(raw: Mapping[str, Any], struct: type[msgspec.Struct], prefix: str) -> list[str]:
    """Unknown keys, wrong types and missing required keys of one table, recursively."""
    problems: list[str] = []
    fields = {field.name: field for field in msgspec.structs.fields(struct)}
    for name, value in raw.items():
        path = _join(prefix, name)
        field = fields.get(name)
        if field is None:
            close = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            where = f"[{prefix}]" if prefix else "the top level"
            problems.append(
                f"unknown key {path!r}{hint} (valid keys in {where}: {', '.join(fields)})"
            )
            continue
        annotation = field.type
        item = _struct_item(annotation)
        if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
            if not isinstance(value, dict):
                problems.append(f"{path} must be a table ([{path}]), got {_describe(value)}")
            else:
                problems.extend(_shape_problems(value, annotation, path))
        elif item is not None:
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                problems.append(
                    f"{path} must be an array of tables ([[{_generic(path)}]]), "
                    f"got {_describe(value)}"
                )
            else:
                for index, entry in enumerate(value):
                    problems.extend(_shape_problems(entry, item, f"{path}[{index}]"))
        elif not _scalar_ok(annotation, value):
            problems.append(f"{path} = {_describe(value)} has the wrong type; use {_allowed(path)}")
    for name, field in fields.items():
        if field.required and name not in raw:
            path = _join(prefix, name)
            problems.append(f"missing required key {path!r}; set it to {_allowed(path)}")
    return problems


def _known_only(raw: Mapping[str, Any], struct: type[msgspec.Struct]) -> dict[str, Any]:
    """``raw`` without its unknown keys, recursively (the same walk as
    :func:`_shape_problems`): what the value checks can still look at when the only shape
    problems are keys nobody reads."""
    fields = {field.name: field for field in msgspec.structs.fields(struct)}
    known: dict[str, Any] = {}
    for name, value in raw.items():
        field = fields.get(name)
        if field is None:
            continue
        annotation = field.type
        item = _struct_item(annotation)
        if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
            known[name] = _known_only(value, annotation) if isinstance(value, dict) else value
        elif item is not None and isinstance(value, list):
            known[name] = [_known_only(v, item) if isinstance(v, dict) else v for v in value]
        else:
            known[name] = value
    return known


# --------------------------------------------------------------------------- semantic checks


def _bad(path: str, value: object, label: str = "") -> str:
    about = f" ({label})" if label else ""
    return f"{path} = {value!r}{about} is not {_allowed(path)}"


def _int_range(path: str, value: int, bounds: tuple[int, int], label: str = "") -> str | None:
    return None if bounds[0] <= value <= bounds[1] else _bad(path, value, label)


def _float_range(
    path: str, value: float, bounds: tuple[float, float], label: str = ""
) -> str | None:
    ok = math.isfinite(value) and bounds[0] <= value <= bounds[1]
    return None if ok else _bad(path, value, label)


def bad_topic_prefix(prefix: str) -> bool:
    """Whether ``prefix`` cannot be the first levels of an MQTT topic name."""
    levels = prefix.split("/")
    return (
        not prefix
        or len(prefix) > 512
        or any(level == "" for level in levels)
        or prefix.startswith("$")  # the broker's own topics; agents may not subscribe to $
        or any(c in prefix for c in "+#")
        or any(c.isspace() or not c.isprintable() for c in prefix)
    )


def _password_problem(path: str, value: str, label: str = "") -> str | None:
    if not value:
        return None
    if not os.path.isabs(value):
        return _bad(path, value, label) + " (use an absolute path)"
    if not os.access(value, os.R_OK) or not os.path.isfile(value):
        return f"{path} = {value!r}{f' ({label})' if label else ''}: the file cannot be read"
    return None


def tls_context(broker: BrokerSettings) -> ssl.SSLContext | None:
    """The TLS context for ``broker`` (None without ``tls_ca_file``): fedgate's client
    policy (:func:`~fedgate_common.mqtt_tls.client_tls_context`). Raises
    :class:`~fedgate_common.errors.BrokerTlsInvalid` for files that do not load or pair."""
    if not broker.tls_ca_file:
        return None
    return client_tls_context(
        ca_file=broker.tls_ca_file,
        cert_file=broker.tls_cert_file,
        key_file=broker.tls_key_file,
        what="broker",
    )


def tls_problems(broker: BrokerSettings) -> list[str]:
    """What is wrong with the TLS settings of ``broker`` (empty: fine, or no TLS)."""
    files = {
        "broker.tls_ca_file": broker.tls_ca_file,
        "broker.tls_cert_file": broker.tls_cert_file,
        "broker.tls_key_file": broker.tls_key_file,
    }
    problems = [_password_problem(key, value) for key, value in files.items()]
    if (broker.tls_cert_file or broker.tls_key_file) and not broker.tls_ca_file:
        problems.append("broker.tls_cert_file/tls_key_file need broker.tls_ca_file (TLS)")
    if bool(broker.tls_cert_file) != bool(broker.tls_key_file):
        problems.append("broker.tls_cert_file and broker.tls_key_file: set both or neither")
    found = [problem for problem in problems if problem is not None]
    if found:
        return found
    try:
        tls_context(broker)
    except BrokerTlsInvalid as exc:
        found.append(str(exc))
    return found


def _parse_node_id(text: str) -> tuple[object | None, str | None]:
    """Parse an OPC-UA node id offline (no server needed): (the node id, None), or (None,
    why it does not parse). Two spellings of one node (``i=85``, ``ns=0;i=85``) are equal."""
    # asyncua takes a second to import; only configs with OPC-UA sources need it.
    from asyncua import ua
    from asyncua.ua.uaerrors import UaError

    try:
        return ua.NodeId.from_string(text), None
    except (ValueError, UaError, TypeError, IndexError) as exc:
        return None, str(exc.args[-1]) if exc.args else type(exc).__name__


def _modbus_problems(index: int, source: ModbusSourceConfig) -> list[str]:
    path = f"modbus[{index}]"
    label = f"source {source.name!r}"
    problems: list[str | None] = []
    if not _NAME_RE.fullmatch(source.name):
        problems.append(_bad(f"{path}.name", source.name))
    if source.transport not in MODBUS_TRANSPORTS:
        problems.append(_bad(f"{path}.transport", source.transport, label))
    if source.transport == "rtu":
        if not source.serial_port:
            problems.append(
                f'{path}.serial_port is empty ({label}) but transport is "rtu"; set it to '
                f"{_allowed(f'{path}.serial_port')}"
            )
        if source.parity not in PARITIES:
            problems.append(_bad(f"{path}.parity", source.parity, label))
        if source.stopbits not in (1, 2):
            problems.append(_bad(f"{path}.stopbits", source.stopbits, label))
        if source.bytesize not in (7, 8):
            problems.append(_bad(f"{path}.bytesize", source.bytesize, label))
        problems.append(_int_range(f"{path}.baudrate", source.baudrate, BAUDRATE_RANGE, label))
    elif source.transport in MODBUS_TRANSPORTS:
        if (why := host_problem(source.host)) is not None:
            problems.append(_bad(f"{path}.host", source.host, label) + f" ({why})")
        problems.append(_int_range(f"{path}.port", source.port, PORT_RANGE, label))
    problems.append(_int_range(f"{path}.unit", source.unit, DEVICE_ID_RANGE, label))
    problems.append(
        _float_range(f"{path}.poll_interval_s", source.poll_interval_s, INTERVAL_RANGE, label)
    )
    problems.append(_float_range(f"{path}.timeout_s", source.timeout_s, TIMEOUT_RANGE, label))
    if not source.registers:
        problems.append(f"{path} ({label}) has no registers; add {_allowed(f'{path}.registers')}")
    seen: set[str] = set()
    for number, register in enumerate(source.registers):
        problems.extend(_register_problems(f"{path}.registers[{number}]", register, seen))
    return [problem for problem in problems if problem is not None]


def _register_problems(path: str, register: ModbusRegister, seen: set[str]) -> list[str | None]:
    label = f"tag {register.tag!r}"
    problems: list[str | None] = []
    if not _NAME_RE.fullmatch(register.tag):
        problems.append(_bad(f"{path}.tag", register.tag))
    elif register.tag in seen:
        problems.append(f"{path}.tag = {register.tag!r} is used twice in this source")
    seen.add(register.tag)
    if register.kind not in REGISTER_KINDS:
        problems.append(_bad(f"{path}.kind", register.kind, label))
    if register.type not in REGISTER_TYPES:
        problems.append(_bad(f"{path}.type", register.type, label))
    elif register.kind in BIT_KINDS and register.type != "bool":
        problems.append(
            f"{path}.type = {register.type!r} ({label}) cannot be read from a {register.kind}; "
            'coils and discrete inputs are "bool"'
        )
    if register.word_order not in WORD_ORDERS:
        problems.append(_bad(f"{path}.word_order", register.word_order, label))
    width = register_count(register.type) if register.type in REGISTER_TYPES else 1
    if not ADDRESS_RANGE[0] <= register.address <= ADDRESS_RANGE[1] - (width - 1):
        problems.append(_bad(f"{path}.address", register.address, label))
    if not math.isfinite(register.scale) or register.scale == 0:
        problems.append(_bad(f"{path}.scale", register.scale, label))
    if not math.isfinite(register.offset):
        problems.append(_bad(f"{path}.offset", register.offset, label))
    if len(register.unit) > 32:
        problems.append(_bad(f"{path}.unit", register.unit, label))
    return problems


def _opcua_problems(index: int, source: OpcuaSourceConfig) -> list[str]:
    path = f"opcua[{index}]"
    label = f"source {source.name!r}"
    problems: list[str | None] = []
    if not _NAME_RE.fullmatch(source.name):
        problems.append(_bad(f"{path}.name", source.name))
    endpoint = source.endpoint
    if not endpoint.startswith("opc.tcp://") or len(endpoint) <= len("opc.tcp://"):
        problems.append(_bad(f"{path}.endpoint", endpoint, label))
    elif (why := url_host_problem(endpoint)) is not None:
        problems.append(_bad(f"{path}.endpoint", endpoint, label) + f" (its host: {why})")
    if source.mode not in OPCUA_MODES:
        problems.append(_bad(f"{path}.mode", source.mode, label))
    problems.append(
        _float_range(f"{path}.poll_interval_s", source.poll_interval_s, INTERVAL_RANGE, label)
    )
    problems.append(_password_problem(f"{path}.password_file", source.password_file, label))
    if not source.username.isprintable():
        problems.append(_bad(f"{path}.username", source.username, label) + " (control characters)")
    if not source.nodes:
        problems.append(f"{path} ({label}) has no nodes; add {_allowed(f'{path}.nodes')}")
    seen: set[str] = set()
    nodes: dict[object, str] = {}  # parsed node id → the first tag on it
    for number, node in enumerate(source.nodes):
        node_path = f"{path}.nodes[{number}]"
        node_label = f"tag {node.tag!r}"
        if not _NAME_RE.fullmatch(node.tag):
            problems.append(_bad(f"{node_path}.tag", node.tag))
        elif node.tag in seen:
            problems.append(f"{node_path}.tag = {node.tag!r} is used twice in this source")
        seen.add(node.tag)
        parsed, why = _parse_node_id(node.node_id)
        if why is not None:
            problems.append(
                f"{node_path}.node_id = {node.node_id!r} ({node_label}) does not parse ({why}); "
                f"use {_allowed(f'{node_path}.node_id')}"
            )
        elif parsed in nodes:
            # One subscription per node: the second tag would take the first one's values.
            problems.append(
                f"{node_path}.node_id = {node.node_id!r} ({node_label}) is the node of tag "
                f"{nodes[parsed]!r} already; a node can feed one tag"
            )
        else:
            nodes[parsed] = node.tag
        if len(node.unit) > 32:
            problems.append(_bad(f"{node_path}.unit", node.unit, node_label))
    return [problem for problem in problems if problem is not None]


def validate_config(config: BridgeConfig) -> list[str]:
    """Every problem with ``config``, each naming the key, the value and what is allowed.

    Empty when the configuration is fine. Reads no network; checks that password files
    are readable.
    """
    problems: list[str | None] = []
    if not os.path.isabs(config.state_dir):
        problems.append(_bad("state_dir", config.state_dir))
    if bad_topic_prefix(config.topic_prefix):
        problems.append(_bad("topic_prefix", config.topic_prefix))
    if config.log_level not in LOG_LEVELS:
        problems.append(_bad("log_level", config.log_level))
    broker = config.broker
    if (why := host_problem(broker.host)) is not None:
        problems.append(_bad("broker.host", broker.host) + f" ({why})")
    problems.append(_int_range("broker.port", broker.port, PORT_RANGE))
    if len(broker.client_id) > 128 or any(
        c.isspace() or not c.isprintable() for c in broker.client_id
    ):
        problems.append(_bad("broker.client_id", broker.client_id))
    if not broker.username.isprintable():
        problems.append(_bad("broker.username", broker.username) + " (control characters)")
    problems.append(_password_problem("broker.password_file", broker.password_file))
    problems.extend(tls_problems(broker))
    problems.append(_int_range("broker.keepalive_s", broker.keepalive_s, KEEPALIVE_RANGE))
    problems.append(_int_range("broker.max_inflight", broker.max_inflight, INFLIGHT_RANGE))
    problems.append(_int_range("broker.ack_timeout_s", broker.ack_timeout_s, ACK_TIMEOUT_RANGE))
    if broker.protocol not in MQTT_PROTOCOLS:
        problems.append(_bad("broker.protocol", broker.protocol))
    problems.append(_int_range("outbox.max_messages", config.outbox.max_messages, OUTBOX_RANGE))
    if config.outbox.policy not in OUTBOX_POLICIES:
        problems.append(_bad("outbox.policy", config.outbox.policy))
    if not config.modbus and not config.opcua:
        problems.append("no sources: add at least one [[modbus]] or [[opcua]] table")
    for index, modbus in enumerate(config.modbus):
        problems.extend(_modbus_problems(index, modbus))
    for index, opcua in enumerate(config.opcua):
        problems.extend(_opcua_problems(index, opcua))
    ports = [m.serial_port for m in config.modbus if m.transport == "rtu" and m.serial_port]
    for port in sorted({port for port in ports if ports.count(port) > 1}):
        problems.append(
            f"serial port {port!r} is used by {ports.count(port)} [[modbus]] sources; they "
            "would open the line at once and garble each other's frames (several unit ids "
            "on one RS-485 line are not supported yet: one source per serial port)"
        )
    names = source_names(config)
    for name in sorted({name for name in names if names.count(name) > 1}):
        problems.append(
            f"source name {name!r} is used by {names.count(name)} sources; names must be "
            "unique because each one is a topic level"
        )
    return [problem for problem in problems if problem is not None]


# --------------------------------------------------------------------------- loading


def _raise_problems(problems: Sequence[str], where: str) -> None:
    if problems:
        listing = "\n".join(f"  - {problem}" for problem in problems)
        count = f"{len(problems)} problem" + ("s" if len(problems) > 1 else "")
        raise ConfigError(
            f"invalid configuration in {where} ({count}):\n{listing}", problems=list(problems)
        )


def parse_config(raw: Mapping[str, Any], *, where: str = "the configuration") -> BridgeConfig:
    """Check and convert a TOML document already parsed to a dict.

    Raises :class:`ConfigError` whose ``problems`` lists every issue found.
    """
    shape = _shape_problems(raw, BridgeConfig, "")
    if shape:
        # Unknown keys alone leave a configuration whose values can still be checked: all
        # of it is reported in one go (other shape problems stop here).
        try:
            values = validate_config(
                msgspec.convert(_known_only(raw, BridgeConfig), BridgeConfig, strict=True)
            )
        except msgspec.ValidationError:
            values = []
        _raise_problems([*shape, *values], where)
    try:
        config = msgspec.convert(raw, BridgeConfig, strict=True)
    except msgspec.ValidationError as exc:  # pragma: no cover - the shape check catches these
        raise ConfigError(f"invalid configuration in {where}: {exc}") from None
    _raise_problems(validate_config(config), where)
    return config


def load_config(path: Path) -> BridgeConfig:
    """Read, check and return the configuration in ``path`` (no network IO)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist; copy packaging/bridge.toml.example there "
            "or pass --config PATH"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    # Under systemd, secret files come from $CREDENTIALS_DIRECTORY (LoadCredential).
    load_credentials_into(raw, credential_names(raw), os.environ, exists=os.path.isfile)
    return parse_config(raw, where=str(path))


def credential_names(raw: Mapping[str, Any]) -> dict[SettingPath, str]:
    """The secret-file settings of a raw configuration and their systemd credential
    names (``fedgate-bridge install-service`` writes the matching ``LoadCredential=``)."""
    names: dict[SettingPath, str] = {
        ("broker", "password_file"): "broker-password",
        ("broker", "tls_key_file"): "broker-tls-key",
    }
    sources = raw.get("opcua", [])
    for index, source in enumerate(sources if isinstance(sources, list) else []):
        name = source.get("name", "") if isinstance(source, dict) else ""
        if isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,48}", name):
            names[("opcua", index, "password_file")] = f"opcua-{name}-password"
    return names
