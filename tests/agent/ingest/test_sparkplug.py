"""Sparkplug B decoding, with payloads encoded by the same protobuf descriptors."""

from __future__ import annotations

from typing import Any

import pytest
from fedgate_agent.ingest.errors import MalformedPayload
from fedgate_agent.ingest.samples import Sample
from fedgate_agent.ingest.sparkplug import (
    DATA_TYPES,
    SparkplugAliases,
    decode_sparkplug_samples,
    sparkplug_payload_class,
)

T0 = 1_718_000_000_000  # ms


def payload(timestamp: int | None, *metrics: dict[str, Any]) -> bytes:
    message = sparkplug_payload_class()()
    if timestamp is not None:
        message.timestamp = timestamp
    message.seq = 0
    for fields in metrics:
        message.metrics.add(**fields)
    data: bytes = message.SerializeToString()
    return data


def test_birth_then_alias_only_data_from_the_same_edge_node() -> None:
    aliases = SparkplugAliases()
    birth = payload(
        T0,
        {"name": "bdSeq", "datatype": DATA_TYPES["UInt64"], "long_value": 3},
        {"name": "Node Control/Rebirth", "datatype": DATA_TYPES["Boolean"], "boolean_value": False},
        {
            "name": "Reactor/Temp",
            "alias": 10,
            "datatype": DATA_TYPES["Double"],
            "double_value": 120.5,
        },
        {
            "name": "Reactor/Level",
            "alias": 11,
            "datatype": DATA_TYPES["Int16"],
            "int_value": 0xFFFF,
        },
        {"name": "Label", "alias": 12, "datatype": DATA_TYPES["String"], "string_value": "R1"},
    )
    samples = decode_sparkplug_samples("spBv1.0/plant/NBIRTH/edge1", birth, aliases=aliases)
    assert samples == [
        Sample("mqtt:spBv1.0/plant/edge1#Reactor/Temp", T0, "Reactor/Temp", T0 / 1000, 120.5),
        Sample("mqtt:spBv1.0/plant/edge1#Reactor/Level", T0, "Reactor/Level", T0 / 1000, -1.0),
    ]
    data = payload(
        T0 + 5,
        {"alias": 10, "double_value": 121.0, "timestamp": T0 + 3},
        {"alias": 11, "int_value": 7},  # datatype known from the birth: Int16
        {"alias": 99, "float_value": 1.5},  # never announced
    )
    refused: list[MalformedPayload] = []
    samples = decode_sparkplug_samples(
        "spBv1.0/plant/NDATA/edge1", data, aliases=aliases, tag_prefix="R1.", refused=refused
    )
    assert [(s.source, s.seq, s.tag, s.value) for s in samples] == [
        ("mqtt:spBv1.0/plant/edge1#Reactor/Temp", T0 + 3, "R1.Reactor/Temp", 121.0),
        ("mqtt:spBv1.0/plant/edge1#Reactor/Level", T0 + 5, "R1.Reactor/Level", 7.0),
    ]
    assert [r.reason for r in refused] == ["unknown_alias"]  # 99: never stored under a guess
    # another edge node's aliases are its own
    refused.clear()
    assert (
        decode_sparkplug_samples(
            "spBv1.0/plant/NDATA/edge2", data, aliases=aliases, refused=refused
        )
        == []
    )
    assert [r.reason for r in refused] == ["unknown_alias"] * 3


def test_device_metrics_use_the_edge_nodes_aliases_and_a_new_nbirth_resets_them() -> None:
    aliases = SparkplugAliases()
    decode_sparkplug_samples(
        "spBv1.0/g/NBIRTH/e", payload(T0, {"name": "bdSeq", "long_value": 0}), aliases=aliases
    )
    dbirth = payload(T0, {"name": "Pump/Speed", "alias": 1, "datatype": 9, "float_value": 3.0})
    decode_sparkplug_samples("spBv1.0/g/DBIRTH/e/pump1", dbirth, aliases=aliases)
    ddata = payload(T0 + 1, {"alias": 1, "float_value": 4.0})
    (speed,) = decode_sparkplug_samples("spBv1.0/g/DDATA/e/pump1", ddata, aliases=aliases)
    assert speed.source == "mqtt:spBv1.0/g/e/pump1#Pump/Speed"
    assert speed.tag == "Pump/Speed"
    decode_sparkplug_samples("spBv1.0/g/NBIRTH/e", payload(T0 + 2), aliases=aliases)
    refused: list[MalformedPayload] = []
    assert (
        decode_sparkplug_samples("spBv1.0/g/DDATA/e/pump1", ddata, aliases=aliases, refused=refused)
        == []
    )
    assert [r.reason for r in refused] == ["unknown_alias"]


def test_what_births_taught_survives_a_restart_of_the_agent() -> None:
    """Sparkplug data may leave out name and data type. An agent restarted after the birth
    used to store an Int32 of -1 as 4294967295 and alias-only metrics as "alias:<n>"."""
    aliases = SparkplugAliases()
    birth = payload(
        T0,
        {"name": "Valve/Pos", "alias": 2, "datatype": DATA_TYPES["Int32"], "int_value": 0},
    )
    decode_sparkplug_samples("spBv1.0/g/NBIRTH/e", birth, aliases=aliases)
    assert aliases.changed
    saved = aliases.to_bytes()
    assert not aliases.changed
    decode_sparkplug_samples("spBv1.0/g/NDATA/e", payload(T0 + 1), aliases=aliases)
    assert not aliases.changed  # data teaches nothing: nothing to write
    restarted = SparkplugAliases.from_bytes(saved)
    data = payload(T0 + 1, {"alias": 2, "int_value": 0xFFFFFFFF})
    (sample,) = decode_sparkplug_samples("spBv1.0/g/NDATA/e", data, aliases=restarted)
    assert (sample.tag, sample.value) == ("Valve/Pos", -1.0)
    refused: list[MalformedPayload] = []
    forgot = SparkplugAliases()  # what a restart without the saved births knows
    assert (
        decode_sparkplug_samples("spBv1.0/g/NDATA/e", data, aliases=forgot, refused=refused) == []
    )
    assert [r.reason for r in refused] == ["unknown_alias"]
    with pytest.raises(ValueError, match="Expected"):
        SparkplugAliases.from_bytes(b'{"not": "births"}')


def test_an_integer_without_a_known_data_type_is_refused_not_guessed() -> None:
    refused: list[MalformedPayload] = []
    data = payload(T0, {"name": "m", "int_value": 0xFFFFFFFF}, {"name": "ok", "double_value": 2.0})
    (ok,) = decode_sparkplug_samples("spBv1.0/g/NDATA/e", data, refused=refused)
    assert ok.tag == "ok"  # the message's other metrics are kept
    assert [r.reason for r in refused] == ["unknown_datatype"]  # -1 or 4294967295?


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_readings_are_refused_and_counted(value: float) -> None:
    refused: list[MalformedPayload] = []
    data = payload(T0, {"name": "x", "datatype": DATA_TYPES["Double"], "double_value": value})
    assert decode_sparkplug_samples("spBv1.0/g/NDATA/e", data, refused=refused) == []
    assert [r.reason for r in refused] == ["not_finite"]


@pytest.mark.parametrize(
    ("fields", "value"),
    [
        ({"datatype": DATA_TYPES["Int8"], "int_value": 251}, -5.0),  # Tahu Python: v + 2**8
        ({"datatype": DATA_TYPES["Int8"], "int_value": 0xFFFFFFFB}, -5.0),  # Tahu Java: 32-bit
        ({"datatype": DATA_TYPES["Int32"], "int_value": 0x80000000}, -(2.0**31)),
        ({"datatype": DATA_TYPES["Int64"], "long_value": 2**64 - 2}, -2.0),
        ({"datatype": DATA_TYPES["UInt32"], "int_value": 0xFFFFFFFF}, 4294967295.0),
        ({"datatype": DATA_TYPES["UInt64"], "long_value": 2**40}, 2.0**40),
        ({"datatype": DATA_TYPES["Float"], "float_value": 0.5}, 0.5),
        ({"datatype": DATA_TYPES["Boolean"], "boolean_value": True}, 1.0),
    ],
)
def test_numeric_types(fields: dict[str, Any], value: float) -> None:
    (sample,) = decode_sparkplug_samples("spBv1.0/g/NDATA/e", payload(T0, {"name": "m", **fields}))
    assert sample.value == value


@pytest.mark.parametrize(
    "fields",
    [
        {"name": "s", "datatype": DATA_TYPES["String"], "string_value": "x"},
        {"name": "d", "datatype": DATA_TYPES["DateTime"], "long_value": T0},
        {"name": "b", "bytes_value": b"\x00"},
        {"name": "n", "datatype": DATA_TYPES["Double"], "is_null": True},
        {"name": "nan", "datatype": DATA_TYPES["Double"], "double_value": float("nan")},
        {"name": "inf", "datatype": DATA_TYPES["Float"], "float_value": float("inf")},
        {"name": "novalue", "datatype": DATA_TYPES["Double"]},
        {"alias": 5, "datatype": DATA_TYPES["String"], "string_value": "x"},
        {"datatype": DATA_TYPES["Double"], "double_value": 1.0},  # neither name nor alias
    ],
)
def test_metrics_without_a_numeric_reading_are_skipped(fields: dict[str, Any]) -> None:
    assert decode_sparkplug_samples("spBv1.0/g/DDATA/e/d", payload(T0, fields)) == []


@pytest.mark.parametrize("message_type", ["NCMD", "DCMD", "NDEATH", "DDEATH", "STATE"])
def test_messages_without_measurements_give_no_samples(message_type: str) -> None:
    data = payload(T0, {"name": "m", "double_value": 1.0})
    assert decode_sparkplug_samples(f"spBv1.0/g/{message_type}/e", data) == []


@pytest.mark.parametrize(
    ("topic", "data", "reason"),
    [
        ("plant/line1/x", payload(T0), "not_sparkplug_topic"),
        ("spBv1.0/g/NDATA", payload(T0), "not_sparkplug_topic"),
        ("spBv1.0/g/BOGUS/e", payload(T0), "not_sparkplug_topic"),
        ("spBv1.0/g/NDATA/e", b"\x12\xff\x01", "not_protobuf"),
        # a metric named by two bytes that are not UTF-8 (protobuf returns them as bytes)
        (
            "spBv1.0/g/NDATA/n1",
            b"\x12\x0f\x0a\x02\xff\xfe\x18\x01\x69\x00\x00\x00\x00\x00\x00\xf0\x3f",
            "not_protobuf",
        ),
        (
            "spBv1.0/g/NDATA/e",
            payload(None, {"name": "m", "double_value": 1.0}),
            "missing_timestamp",
        ),
        ("spBv1.0/g/NDATA/e", payload(0, {"name": "m", "double_value": 1.0}), "seq_out_of_range"),
        ("spBv1.0/g/NDATA/e", b"\x00" * 2_000_000, "too_large"),
    ],
)
def test_malformed(topic: str, data: bytes, reason: str) -> None:
    with pytest.raises(MalformedPayload) as refused:
        decode_sparkplug_samples(topic, data)
    assert refused.value.reason == reason


def test_a_metric_named_with_a_control_character_is_refused_alone() -> None:
    """The message's other metrics are kept; ``/`` is Sparkplug's folder separator."""
    data = payload(
        T0,
        {"name": "Pump/Speed", "double_value": 1.0},
        {"name": "bad\x00name", "double_value": 2.0},
        {"name": "\x1b[2Jforged", "alias": 4, "double_value": 3.0},
        {"name": "Label\n", "string_value": "not a reading: skipped, not refused"},
    )
    refused: list[MalformedPayload] = []
    samples = decode_sparkplug_samples("spBv1.0/g/NDATA/e", data, refused=refused)
    assert [s.tag for s in samples] == ["Pump/Speed"]
    assert [r.reason for r in refused] == ["bad_tag", "bad_tag"]
    assert "U+0000" in str(refused[0])
    assert [s.tag for s in decode_sparkplug_samples("spBv1.0/g/NDATA/e", data)] == ["Pump/Speed"]
    prefixed = decode_sparkplug_samples("spBv1.0/g/NDATA/e", data, tag_prefix="line3/")
    assert [s.tag for s in prefixed] == ["line3/Pump/Speed"]


def test_aliases_remember_a_bounded_number_of_edge_nodes() -> None:
    aliases = SparkplugAliases(max_edge_nodes=2)
    for node in ("a", "b", "c"):
        aliases.learn("g", node, "m", 1, DATA_TYPES["Double"])
    assert aliases.name("g", "a", 1) is None
    assert aliases.name("g", "c", 1) == "m"
    assert aliases.datatype("g", "b", "m") == DATA_TYPES["Double"]
