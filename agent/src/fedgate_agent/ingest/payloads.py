"""Strict decoding of JSON MQTT payloads into :class:`~.samples.Sample` (untrusted bytes
are decoded here, at the edge, and nowhere else).

The payload is one UTF-8 JSON object::

    {"ts": 1718000000.25, "value": 42.5, "seq": 1017, "unit": "kPa", "quality": "good"}

- ``ts`` — number (integer or decimal), seconds since the Unix epoch, UTC; finite and > 0.
- ``value`` — number or boolean (``true`` → 1.0, ``false`` → 0.0); finite.
- ``seq`` — integer, 0 ≤ seq ≤ 2**63 − 1, strictly increasing per topic in the publisher's
  intent (it identifies the message: a redelivered ``(topic, seq)`` is stored once). A
  boolean or a decimal such as ``3.0`` is refused.
- ``unit`` (string or null) and ``quality`` (string, integer or null) are optional, accepted
  and ignored; any other key is ignored.
- At most ``max_bytes`` bytes (default 64 KiB).

Anything else raises :class:`MalformedPayload` whose ``reason`` (a counter name suffix) is
one of: ``too_large``, ``not_json`` (not UTF-8 JSON, trailing data), ``not_object``,
``missing_key``, ``wrong_type``, ``not_finite`` (NaN, ±Infinity or a number that overflows a
double), ``seq_out_of_range``, ``ts_out_of_range``, ``ts_in_future`` (more than
:data:`~.samples.MAX_CLOCK_SKEW_S` ahead of the gateway's clock).

The sample's ``source`` is ``"mqtt:" + topic``; its ``tag`` is given by the caller (the
subscription names it).
"""

from __future__ import annotations

import json
from math import isfinite

import msgspec

from fedgate_agent.ingest.buffer import SampleRow
from fedgate_agent.ingest.errors import MalformedPayload
from fedgate_agent.ingest.samples import MAX_CLOCK_SKEW_S, MAX_SEQ, Sample, too_far_ahead

__all__ = ["DEFAULT_MAX_PAYLOAD_BYTES", "decode_json_row", "decode_json_sample"]

DEFAULT_MAX_PAYLOAD_BYTES = 65536


class _JsonSample(msgspec.Struct):
    ts: float
    value: float | bool
    seq: int
    unit: str | None = None
    quality: str | int | None = None


_decoder = msgspec.json.Decoder(_JsonSample)


def decode_json_sample(
    topic: str, payload: bytes, *, tag: str, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
) -> Sample:
    """Decode one JSON payload received on ``topic``; raise :class:`MalformedPayload`."""
    return Sample(*decode_json_row("mqtt:" + topic, payload, tag=tag, max_bytes=max_bytes))


def decode_json_row(
    source: str, payload: bytes, *, tag: str, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
) -> SampleRow:
    """:func:`decode_json_sample` as a ``(source, seq, tag, ts, value)`` tuple, for the
    ingest's bulk path (``source`` given whole: the caller computes it once per topic)."""
    if len(payload) > max_bytes:
        raise MalformedPayload(
            f"payload of {len(payload)} bytes exceeds {max_bytes}", reason="too_large"
        )
    try:
        decoded = _decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise MalformedPayload(str(exc), reason=_validation_reason(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise MalformedPayload(str(exc), reason=_decode_reason(payload)) from None
    ts = decoded.ts
    value = float(decoded.value)
    seq = decoded.seq
    if not (isfinite(ts) and isfinite(value)):
        raise MalformedPayload("ts and value must be finite", reason="not_finite")
    if ts <= 0:
        raise MalformedPayload(f"ts must be > 0, not {ts}", reason="ts_out_of_range")
    if not 0 <= seq <= MAX_SEQ:
        raise MalformedPayload(f"seq {seq} is outside 0..{MAX_SEQ}", reason="seq_out_of_range")
    if too_far_ahead(ts):
        raise MalformedPayload(
            f"ts {ts} is more than {MAX_CLOCK_SKEW_S:.0f} s ahead of this gateway's clock",
            reason="ts_in_future",
        )
    return (source, seq, tag, ts, value)


def _validation_reason(message: str) -> str:
    if message.startswith("Object missing required field"):
        return "missing_key"
    if message.startswith("Number out of range"):
        return "not_finite"
    if message.startswith("Expected `object`") and " - at " not in message:
        return "not_object"
    return "wrong_type"


def _decode_reason(payload: bytes) -> str:
    """Not JSON to msgspec. Python's own parser accepts the NaN/Infinity extensions some
    publishers emit; those are the ``not_finite`` class, anything else is ``not_json``.
    (Runs only for refused payloads, at most ``max_bytes`` long.)"""
    try:
        json.loads(payload, parse_constant=_raise_non_finite)
    except _NonFinite:
        return "not_finite"
    except (ValueError, RecursionError):
        return "not_json"
    return "not_json"


class _NonFinite(Exception):
    pass


def _raise_non_finite(constant: str) -> float:
    raise _NonFinite(constant)
