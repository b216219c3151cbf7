"""Model specs: parameter shapes, genesis weights, and validation on decode."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import numpy as np
import pytest
from fedgate_common.errors import MalformedMessage
from fedgate_common.model_spec import ModelSpec, initial_weights, parameter_shapes

SPECS = [
    ModelSpec(n_features=52, window=20, n_classes=22),
    ModelSpec(n_features=3, window=5, n_classes=2, channels=4, kernel_size=3),
    ModelSpec(n_features=1, window=1, n_classes=1, channels=1, kernel_size=1),
    ModelSpec(n_features=7, window=30, n_classes=5, channels=16, kernel_size=5),
]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            SPECS[0],
            [
                ("conv1.weight", (64, 52, 3)),
                ("conv1.bias", (64,)),
                ("conv2.weight", (64, 64, 3)),
                ("conv2.bias", (64,)),
                ("head.weight", (22, 64)),
                ("head.bias", (22,)),
            ],
        ),
        (
            SPECS[2],
            [
                ("conv1.weight", (1, 1, 1)),
                ("conv1.bias", (1,)),
                ("conv2.weight", (1, 1, 1)),
                ("conv2.bias", (1,)),
                ("head.weight", (1, 1)),
                ("head.bias", (1,)),
            ],
        ),
        (
            SPECS[3],
            [
                ("conv1.weight", (16, 7, 5)),
                ("conv1.bias", (16,)),
                ("conv2.weight", (16, 16, 5)),
                ("conv2.bias", (16,)),
                ("head.weight", (5, 16)),
                ("head.bias", (5,)),
            ],
        ),
    ],
)
def test_parameter_shapes(spec: ModelSpec, expected: list[tuple[str, tuple[int, ...]]]) -> None:
    assert parameter_shapes(spec) == expected


def test_parameter_shapes_ignore_window_and_standardisation() -> None:
    base = SPECS[1]
    other = msgspec.structs.replace(
        base, window=50, feature_mean=(1.0, 2.0, 3.0), feature_scale=(1.0, 1.0, 2.0)
    )
    assert parameter_shapes(other) == parameter_shapes(base)


def _layer_fan_in(name: str, spec: ModelSpec) -> int:
    """PyTorch's fan-in of the layer owning parameter ``name`` (bias included)."""
    layer = name.split(".")[0]
    return {
        "conv1": spec.n_features * spec.kernel_size,
        "conv2": spec.channels * spec.kernel_size,
        "head": spec.channels,
    }[layer]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_initial_weights_shapes_dtype_and_bounds(spec: ModelSpec) -> None:
    weights = initial_weights(spec, np.random.default_rng(0))
    assert [(name, w.shape) for name, w in weights.items()] == parameter_shapes(spec)
    for name, w in weights.items():
        assert w.dtype == np.float32
        bound = 1 / math.sqrt(_layer_fan_in(name, spec))
        # float32 rounding is monotone, so values stay within the rounded bound
        assert np.abs(w).max() <= np.float32(bound), name
        if w.size >= 64:  # uniform over the whole range, not a narrower one
            assert np.abs(w).max() > 0.8 * bound, name
            assert w.min() < 0 < w.max(), name


def test_bias_bound_uses_the_fan_in_of_its_layer() -> None:
    # conv1.bias has 64 entries; its bound is 1/sqrt(2*3), not 1/sqrt(64).
    spec = ModelSpec(n_features=2, window=10, n_classes=2, channels=64, kernel_size=3)
    bias = initial_weights(spec, np.random.default_rng(3))["conv1.bias"]
    assert np.abs(bias).max() > 1 / math.sqrt(64)
    assert np.abs(bias).max() <= np.float32(1 / math.sqrt(6))


def test_initial_weights_are_deterministic_for_a_seed() -> None:
    spec = SPECS[1]
    first = initial_weights(spec, np.random.default_rng(42))
    again = initial_weights(spec, np.random.default_rng(42))
    other = initial_weights(spec, np.random.default_rng(43))
    assert first.keys() == again.keys() == other.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
        assert not np.array_equal(first[name], other[name]), name


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_spec_round_trips_through_msgpack_and_json(spec: ModelSpec) -> None:
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(spec), type=ModelSpec) == spec
    assert msgspec.json.decode(msgspec.json.encode(spec), type=ModelSpec) == spec


VALID = {"n_features": 3, "window": 5, "n_classes": 2, "channels": 4, "kernel_size": 3}


def test_smallest_window_for_the_kernel_is_accepted() -> None:
    spec = msgspec.msgpack.decode(msgspec.msgpack.encode(VALID), type=ModelSpec)
    assert spec.window == 2 * spec.kernel_size - 1


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"window": 4}, "window too short"),
        ({"window": 8, "kernel_size": 5}, "window too short"),
        ({"n_features": 0}, "n_features"),
        ({"n_classes": -1}, "n_classes"),
        ({"channels": 100_001}, "channels"),
        ({"kernel_size": 0}, "kernel_size"),
        ({"window": 0}, "window"),
        ({"feature_mean": [0.0, 1.0]}, "feature_mean needs 3"),
        ({"feature_mean": [0.0, 1.0, 2.0, 3.0]}, "feature_mean needs 3"),
        ({"feature_scale": [1.0]}, "feature_scale needs 3"),
        ({"feature_scale": [1.0, 0.0, 1.0]}, "positive"),
        ({"feature_scale": [1.0, -2.0, 1.0]}, "positive"),
        ({"feature_mean": [0.0, math.nan, 0.0]}, "NaN"),
        ({"feature_mean": [math.inf, 0.0, 0.0]}, "NaN"),
        ({"feature_scale": [1.0, 1.0, math.nan]}, "NaN"),
        ({"feature_scale": [1.0, math.inf, 1.0]}, "NaN"),
        # too large for the wire limits: refused at once, not by the first round's decode
        ({"channels": 2400, "window": 5}, "conv2.weight would hold 17,280,000 values"),
        ({"channels": 100_000}, "conv2.weight would hold"),
        ({"n_features": 100_000, "channels": 100}, "conv1.weight would hold 30,000,000"),
    ],
    ids=str,
)
def test_invalid_spec_is_malformed_when_decoded(changes: dict[str, Any], match: str) -> None:
    raw = msgspec.msgpack.encode(VALID | changes)
    with pytest.raises(MalformedMessage, match=match):
        msgspec.msgpack.decode(raw, type=ModelSpec)
    with pytest.raises(MalformedMessage, match=match):
        ModelSpec(**(VALID | changes))


@pytest.mark.parametrize(
    "changes",
    [
        {"architecture": "transformer"},
        {"window": 5.0},
        {"window": True},
        {"feature_mean": "0,0,0"},
        {"dropout": 0.5},
    ],
    ids=str,
)
def test_wrongly_typed_or_unknown_spec_fields_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(msgspec.msgpack.encode(VALID | changes), type=ModelSpec)


def test_missing_required_field_is_refused() -> None:
    body = dict(VALID)
    del body["n_classes"]
    with pytest.raises(msgspec.ValidationError, match="n_classes"):
        msgspec.msgpack.decode(msgspec.msgpack.encode(body), type=ModelSpec)
