"""JSON payload decoding: every refusal class has its reason; valid payloads round-trip."""

from __future__ import annotations

import json
import math
import time

import pytest
from fedgate_agent.ingest.errors import MalformedPayload
from fedgate_agent.ingest.payloads import decode_json_sample
from fedgate_agent.ingest.samples import MAX_CLOCK_SKEW_S, MAX_SEQ, Sample
from hypothesis import given
from hypothesis import strategies as st


def test_a_valid_payload_becomes_a_sample() -> None:
    payload = b'{"ts": 1718000000.25, "value": 42.5, "seq": 1017, "unit": "kPa", "quality": 192}'
    sample = decode_json_sample("plant/line1/P_101", payload, tag="P_101")
    assert sample == Sample("mqtt:plant/line1/P_101", 1017, "P_101", 1718000000.25, 42.5)


@pytest.mark.parametrize(
    ("payload", "value"),
    [
        (b'{"ts": 5, "value": true, "seq": 0}', 1.0),
        (b'{"ts": 5, "value": false, "seq": 0}', 0.0),
        (b'{"ts": 5, "value": -7, "seq": 0, "unit": null, "quality": "good"}', -7.0),
        (b'{"seq": 0, "extra": [1, {"a": null}], "value": 1e300, "ts": 5}', 1e300),
    ],
)
def test_booleans_integers_and_extra_keys(payload: bytes, value: float) -> None:
    sample = decode_json_sample("t", payload, tag="T")
    assert sample.value == value
    assert type(sample.value) is float
    assert sample.ts == 5.0


MALFORMED = [
    (b"hello", "not_json"),
    (b"\xff\xfe{}", "not_json"),
    (b"", "not_json"),
    (b'{"ts": 1, "value": 2, "seq": 3} trailing', "not_json"),
    (b'{"ts": 1, "value": 2, "seq": 3', "not_json"),
    (b"[1, 2, 3]", "not_object"),
    (b'"a string"', "not_object"),
    (b"42", "not_object"),
    (b'{"value": 2, "seq": 3}', "missing_key"),
    (b'{"ts": 1, "seq": 3}', "missing_key"),
    (b'{"ts": 1, "value": 2}', "missing_key"),
    (b'{"ts": "1", "value": 2, "seq": 3}', "wrong_type"),
    (b'{"ts": true, "value": 2, "seq": 3}', "wrong_type"),
    (b'{"ts": 1, "value": "2", "seq": 3}', "wrong_type"),
    (b'{"ts": 1, "value": null, "seq": 3}', "wrong_type"),
    (b'{"ts": 1, "value": [2], "seq": 3}', "wrong_type"),
    (b'{"ts": 1, "value": 2, "seq": 3.0}', "wrong_type"),
    (b'{"ts": 1, "value": 2, "seq": true}', "wrong_type"),
    (b'{"ts": 1, "value": 2, "seq": "3"}', "wrong_type"),
    (b'{"ts": 1, "value": 2, "seq": 3, "unit": 5}', "wrong_type"),
    (b'{"ts": 1, "value": 2, "seq": 3, "quality": 1.5}', "wrong_type"),
    (b'{"ts": 1, "value": NaN, "seq": 3}', "not_finite"),
    (b'{"ts": 1, "value": Infinity, "seq": 3}', "not_finite"),
    (b'{"ts": 1, "value": -Infinity, "seq": 3}', "not_finite"),
    (b'{"ts": NaN, "value": 2, "seq": 3}', "not_finite"),
    (b'{"ts": 1, "value": 1e999, "seq": 3}', "not_finite"),
    (b'{"ts": 1e400, "value": 2, "seq": 3}', "not_finite"),
    (b'{"ts": 1, "value": 2, "seq": -1}', "seq_out_of_range"),
    (b'{"ts": 1, "value": 2, "seq": 9223372036854775808}', "seq_out_of_range"),
    (b'{"ts": 1, "value": 2, "seq": 123456789012345678901234567890}', "seq_out_of_range"),
    (b'{"ts": 0, "value": 2, "seq": 3}', "ts_out_of_range"),
    (b'{"ts": -5.5, "value": 2, "seq": 3}', "ts_out_of_range"),
]


@pytest.mark.parametrize(("payload", "reason"), MALFORMED)
def test_malformed_payloads_are_refused_with_their_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(MalformedPayload) as refused:
        decode_json_sample("t", payload, tag="T")
    assert refused.value.reason == reason


def test_too_large_is_refused_before_parsing() -> None:
    payload = json.dumps({"ts": 1, "value": 2, "seq": 3, "unit": "x" * 70_000}).encode()
    with pytest.raises(MalformedPayload) as refused:
        decode_json_sample("t", payload, tag="T")
    assert refused.value.reason == "too_large"
    # a caller may allow more
    assert decode_json_sample("t", payload, tag="T", max_bytes=100_000).seq == 3


finite = st.floats(allow_nan=False, allow_infinity=False)


@given(
    ts=st.floats(min_value=1e-3, max_value=1.7e9, allow_nan=False),  # not ahead of the clock
    value=finite | st.booleans() | st.integers(min_value=-(2**53), max_value=2**53),
    seq=st.integers(min_value=0, max_value=MAX_SEQ),
    extra=st.dictionaries(
        st.text(max_size=5).filter(lambda k: k not in ("ts", "value", "seq")),
        st.text(max_size=5),
        max_size=3,
    ),
)
def test_valid_payloads_round_trip(
    ts: float, value: float | bool | int, seq: int, extra: dict[str, str]
) -> None:
    extra.pop("unit", None)
    extra.pop("quality", None)
    payload = json.dumps({"ts": ts, "value": value, "seq": seq, **extra}).encode()
    sample = decode_json_sample("plant/x", payload, tag="X")
    assert sample == Sample("mqtt:plant/x", seq, "X", ts, float(value))
    assert math.isfinite(sample.value)


def test_a_timestamp_far_ahead_of_the_clock_is_refused() -> None:
    now = time.time()
    near = json.dumps({"ts": now + MAX_CLOCK_SKEW_S / 2, "value": 1.0, "seq": 1}).encode()
    assert decode_json_sample("p/t", near, tag="t").ts == pytest.approx(now + MAX_CLOCK_SKEW_S / 2)
    year_ahead = json.dumps({"ts": now + 365 * 86400, "value": 1.0, "seq": 2}).encode()
    with pytest.raises(MalformedPayload) as refused:
        decode_json_sample("p/t", year_ahead, tag="t")
    assert refused.value.reason == "ts_in_future"
