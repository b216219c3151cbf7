"""Sparkplug B payloads (``spBv1.0/<group>/<type>/<edge node>[/<device>]``) into samples.

Why no generated code: the Sparkplug packages on PyPI (pysparkplug, mqtt-spb-wrapper, tahu)
pin paho-mqtt < 2 or protobuf 3, which cannot live beside this agent's pins. The subset of
the Eclipse Tahu ``sparkplug_b.proto`` schema read here — ``Payload`` (timestamp, metrics,
seq) and ``Payload.Metric`` (name, alias, timestamp, datatype, is_null and the numeric value
fields) — is described in code with ``descriptor_pb2`` and turned into a message class by the
maintained ``protobuf`` runtime. Field numbers are the schema's; fields outside the subset
(metadata, properties, data sets, templates, extensions) survive as unknown fields.

Mapping, one :class:`~.samples.Sample` per metric that has a number or a boolean:

- ``source`` = ``mqtt:spBv1.0/<group>/<edge node>[/<device>]#<metric name>`` — the message
  type level is left out so a metric's birth value and its data values are one stream;
- ``seq`` = the metric's timestamp in ms, else the payload's (Sparkplug's own ``seq`` counts
  0..255 and wraps, so it cannot identify a message). Two values of one metric in the same
  millisecond are therefore one sample;
- ``ts`` = that timestamp in seconds; ``tag`` = ``tag_prefix + metric name``;
- Int8/16/32/64 values are read as two's complement of their width (both the Java and the
  Python Tahu encodings of negative numbers come out right); UInt* as unsigned; Float and
  Double as is; Boolean as 0.0/1.0;
- skipped: null metrics, strings, bytes, DateTime, data sets, templates,
  ``bdSeq`` and the ``Node Control/*`` / ``Device Control/*`` commands;
- a metric named only by its alias, or sent without its data type (both allowed in
  NDATA/DDATA), takes name and type from the NBIRTH / DBIRTH seen earlier from the same edge
  node (:class:`SparkplugAliases`, kept on disk by the caller so that a restart of the agent
  does not forget them). NCMD, DCMD, NDEATH, DDEATH and STATE carry no measurements.

Refused with :class:`MalformedPayload`: ``too_large``, ``not_sparkplug_topic``,
``not_protobuf``, ``missing_timestamp``, ``seq_out_of_range``, ``ts_in_future``. Refused
alone, the message's other metrics kept: a name with a control character (``bad_tag``), a
non-finite Float or Double (``not_finite``), an alias no birth named (``unknown_alias``)
and an integer whose data type no birth gave (``unknown_datatype``: its sign cannot be
told). The last two are never stored under a guessed name or value; the edge node's next
birth (it sends one when it reconnects, or on a ``Node Control/Rebirth`` command) cures
them.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from fedgate_agent.ingest.errors import MalformedPayload
from fedgate_agent.ingest.samples import MAX_SEQ, Sample, tag_problem, too_far_ahead

__all__ = [
    "DATA_TYPES",
    "SparkplugAliases",
    "decode_sparkplug_samples",
    "sparkplug_payload_class",
]

NAMESPACE = "spBv1.0"
_PACKAGE = "org.eclipse.tahu.protobuf"
_MESSAGE_TYPES_WITH_VALUES = {"NBIRTH", "DBIRTH", "NDATA", "DDATA"}
_MESSAGE_TYPES = _MESSAGE_TYPES_WITH_VALUES | {"NDEATH", "DDEATH", "NCMD", "DCMD", "STATE"}
_SKIPPED_NAMES = ("Node Control/", "Device Control/")
_MAX_EDGE_NODES = 10_000

#: Sparkplug B metric data types (the subset with a numeric reading).
DATA_TYPES = {
    "Int8": 1,
    "Int16": 2,
    "Int32": 3,
    "Int64": 4,
    "UInt8": 5,
    "UInt16": 6,
    "UInt32": 7,
    "UInt64": 8,
    "Float": 9,
    "Double": 10,
    "Boolean": 11,
    "String": 12,
    "DateTime": 13,
}
_SIGNED_WIDTH = {1: 8, 2: 16, 3: 32, 4: 64}
_NOT_MEASUREMENTS = {DATA_TYPES["String"], DATA_TYPES["DateTime"]}


def _build_payload_class() -> Any:
    field = descriptor_pb2.FieldDescriptorProto
    optional = field.LABEL_OPTIONAL
    file = descriptor_pb2.FileDescriptorProto(
        name="fedgate_agent/sparkplug_b_subset.proto", package=_PACKAGE, syntax="proto2"
    )
    payload = file.message_type.add(name="Payload")
    metric = payload.nested_type.add(name="Metric")
    metric.oneof_decl.add(name="value")
    metric_fields = [
        ("name", 1, field.TYPE_STRING, None),
        ("alias", 2, field.TYPE_UINT64, None),
        ("timestamp", 3, field.TYPE_UINT64, None),
        ("datatype", 4, field.TYPE_UINT32, None),
        ("is_historical", 5, field.TYPE_BOOL, None),
        ("is_transient", 6, field.TYPE_BOOL, None),
        ("is_null", 7, field.TYPE_BOOL, None),
        ("int_value", 10, field.TYPE_UINT32, 0),
        ("long_value", 11, field.TYPE_UINT64, 0),
        ("float_value", 12, field.TYPE_FLOAT, 0),
        ("double_value", 13, field.TYPE_DOUBLE, 0),
        ("boolean_value", 14, field.TYPE_BOOL, 0),
        ("string_value", 15, field.TYPE_STRING, 0),
        ("bytes_value", 16, field.TYPE_BYTES, 0),
    ]
    for name, number, kind, oneof in metric_fields:
        added = metric.field.add(name=name, number=number, type=kind, label=optional)
        if oneof is not None:
            added.oneof_index = oneof
    payload.field.add(name="timestamp", number=1, type=field.TYPE_UINT64, label=optional)
    payload.field.add(
        name="metrics",
        number=2,
        type=field.TYPE_MESSAGE,
        label=field.LABEL_REPEATED,
        type_name=f".{_PACKAGE}.Payload.Metric",
    )
    payload.field.add(name="seq", number=3, type=field.TYPE_UINT64, label=optional)
    payload.field.add(name="uuid", number=4, type=field.TYPE_STRING, label=optional)
    payload.field.add(name="body", number=5, type=field.TYPE_BYTES, label=optional)
    # A private pool: a Tahu schema registered elsewhere in the process cannot clash.
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.Payload"))


_PAYLOAD_CLASS = _build_payload_class()


def sparkplug_payload_class() -> Any:
    """The protobuf message class of a Sparkplug B ``Payload`` (the subset above); tests and
    simulators encode with it."""
    return _PAYLOAD_CLASS


class _EdgeNodeBirths(msgspec.Struct, array_like=True):
    group: str
    edge_node: str
    names: dict[int, str]
    datatypes: dict[str, int]


class SparkplugAliases:
    """Metric names and data types announced in NBIRTH/DBIRTH, per edge node.

    Aliases are unique within an edge node (its devices included); a new NBIRTH starts a
    new session and forgets the node's previous aliases. At most ``max_edge_nodes`` nodes are
    remembered (the least recently born are forgotten first). :attr:`changed` says that a
    birth changed them since :meth:`to_bytes` last ran; :meth:`from_bytes` reads them back.
    """

    def __init__(self, *, max_edge_nodes: int = _MAX_EDGE_NODES) -> None:
        self._max_edge_nodes = max_edge_nodes
        self._names: dict[tuple[str, str], dict[int, str]] = {}
        self._datatypes: dict[tuple[str, str], dict[str, int]] = {}
        self.changed = False

    def to_bytes(self) -> bytes:
        """Everything learnt, oldest edge node first; clears :attr:`changed`."""
        self.changed = False
        return msgspec.json.encode(
            [
                _EdgeNodeBirths(group, node, names, self._datatypes.get((group, node), {}))
                for (group, node), names in self._names.items()
            ]
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, max_edge_nodes: int = _MAX_EDGE_NODES) -> SparkplugAliases:
        """What :meth:`to_bytes` wrote; raises ``msgspec.DecodeError`` (a ``ValueError``)
        for anything else."""
        aliases = cls(max_edge_nodes=max_edge_nodes)
        for node in msgspec.json.decode(data, type=list[_EdgeNodeBirths]):
            aliases.start_session(node.group, node.edge_node)
            aliases._names[(node.group, node.edge_node)].update(node.names)
            aliases._datatypes[(node.group, node.edge_node)].update(node.datatypes)
        aliases.changed = False
        return aliases

    def start_session(self, group: str, edge_node: str) -> None:
        self.changed = True
        key = (group, edge_node)
        self._names.pop(key, None)
        self._datatypes.pop(key, None)
        self._names[key] = {}
        self._datatypes[key] = {}
        while len(self._names) > self._max_edge_nodes:
            oldest = next(iter(self._names))
            del self._names[oldest]
            self._datatypes.pop(oldest, None)

    def learn(
        self, group: str, edge_node: str, name: str, alias: int | None, datatype: int | None
    ) -> None:
        key = (group, edge_node)
        if key not in self._names:
            self.start_session(group, edge_node)
        if alias is not None and self._names[key].get(alias) != name:
            self._names[key][alias] = name
            self.changed = True
        if datatype is not None and self._datatypes[key].get(name) != datatype:
            self._datatypes[key][name] = datatype
            self.changed = True

    def name(self, group: str, edge_node: str, alias: int) -> str | None:
        return self._names.get((group, edge_node), {}).get(alias)

    def datatype(self, group: str, edge_node: str, name: str) -> int | None:
        return self._datatypes.get((group, edge_node), {}).get(name)


def decode_sparkplug_samples(
    topic: str,
    payload: bytes,
    *,
    tag_prefix: str = "",
    aliases: SparkplugAliases | None = None,
    max_bytes: int = 1 << 20,
    refused: list[MalformedPayload] | None = None,
) -> list[Sample]:
    """Decode one Sparkplug B message into samples (see the module docstring); BIRTH
    messages also teach ``aliases``. Raises :class:`MalformedPayload` for the message;
    a metric refused alone (``bad_tag``) is left out, its error appended to ``refused``."""
    levels = topic.split("/")
    if len(levels) not in (4, 5) or levels[0] != NAMESPACE or levels[2] not in _MESSAGE_TYPES:
        raise MalformedPayload(
            f"{topic!r} is not spBv1.0/<group>/<type>/<edge node>[/<device>]",
            reason="not_sparkplug_topic",
        )
    if len(payload) > max_bytes:
        raise MalformedPayload(
            f"payload of {len(payload)} bytes exceeds {max_bytes}", reason="too_large"
        )
    group, message_type, edge_node = levels[1], levels[2], levels[3]
    if message_type not in _MESSAGE_TYPES_WITH_VALUES:
        return []
    message = _PAYLOAD_CLASS()
    try:
        message.ParseFromString(payload)
    except DecodeError as exc:
        raise MalformedPayload(f"not a Sparkplug B payload: {exc}", reason="not_protobuf") from None
    aliases = aliases if aliases is not None else SparkplugAliases()
    if message_type == "NBIRTH":
        aliases.start_session(group, edge_node)
    stream = "/".join([NAMESPACE, group, edge_node, *levels[4:]])
    payload_ms = message.timestamp if message.HasField("timestamp") else None
    samples: list[Sample] = []
    refusals: list[MalformedPayload] = [] if refused is None else refused
    for metric in message.metrics:
        try:
            name = _metric_name(
                metric, group, edge_node, aliases, birth=message_type.endswith("BIRTH")
            )
            if name is None or name == "bdSeq" or name.startswith(_SKIPPED_NAMES):
                continue
            datatype = (
                metric.datatype
                if metric.HasField("datatype")
                else aliases.datatype(group, edge_node, name)
            )
            value = _metric_value(metric, name, datatype)
            if value is None:
                continue
            if (why := tag_problem(tag_prefix + name, slash=True)) is not None:
                raise _refused(f"metric {name!r}: {why}", "bad_tag")
        except _MetricRefused as exc:
            refusals.append(exc.error)
            continue
        ms = metric.timestamp if metric.HasField("timestamp") else payload_ms
        if ms is None:
            raise MalformedPayload(
                f"metric {name!r} has no timestamp and neither has the payload",
                reason="missing_timestamp",
            )
        if not 0 < ms <= MAX_SEQ:
            raise MalformedPayload(f"timestamp {ms} ms is out of range", reason="seq_out_of_range")
        if too_far_ahead(ms / 1000.0):
            raise MalformedPayload(
                f"metric {name!r} is stamped {ms} ms, ahead of this gateway's clock",
                reason="ts_in_future",
            )
        samples.append(
            Sample(
                source=f"mqtt:{stream}#{name}",
                seq=ms,
                tag=tag_prefix + name,
                ts=ms / 1000.0,
                value=value,
            )
        )
    return samples


def _metric_name(
    metric: Any, group: str, edge_node: str, aliases: SparkplugAliases, *, birth: bool
) -> str | None:
    alias = metric.alias if metric.HasField("alias") else None
    if metric.HasField("name") and metric.name:
        name = metric.name
        if not isinstance(name, str):  # protobuf hands back bytes that are not UTF-8
            raise MalformedPayload("a metric name is not UTF-8", reason="not_protobuf")
        if birth:
            datatype = metric.datatype if metric.HasField("datatype") else None
            aliases.learn(group, edge_node, name, alias, datatype)
        return name
    if alias is None:
        return None
    name = aliases.name(group, edge_node, alias)
    if name is None:
        raise _refused(
            f"alias {alias} of edge node {group}/{edge_node} was named by no birth seen",
            "unknown_alias",
        )
    return name


def _metric_value(metric: Any, name: str, datatype: int | None) -> float | None:
    if metric.HasField("is_null") and metric.is_null:
        return None
    if datatype in _NOT_MEASUREMENTS:
        return None
    kind = metric.WhichOneof("value")
    if kind in ("int_value", "long_value"):
        if datatype is None:
            raise _refused(
                f"metric {name!r}: an integer without its data type (no birth gave it)",
                "unknown_datatype",
            )
        raw: int = getattr(metric, kind)
        width = _SIGNED_WIDTH.get(datatype)
        if width is not None:
            raw &= (1 << width) - 1
            if raw >= 1 << (width - 1):
                raw -= 1 << width
        return float(raw)
    if kind in ("float_value", "double_value"):
        number = float(getattr(metric, kind))
        if not math.isfinite(number):
            raise _refused(f"metric {name!r} is {number}", "not_finite")
        return number
    if kind == "boolean_value":
        return 1.0 if metric.boolean_value else 0.0
    return None


class _MetricRefused(Exception):
    """One metric refused; the message's other metrics go on."""

    def __init__(self, error: MalformedPayload) -> None:
        super().__init__(str(error))
        self.error = error


def _refused(message: str, reason: str) -> _MetricRefused:
    return _MetricRefused(MalformedPayload(message, reason=reason))
