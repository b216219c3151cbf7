"""Model architecture descriptions shared by agents (torch) and coordinators (numpy only).

The coordinator never imports torch, yet it creates the genesis model and checks update
shapes; both come from :func:`parameter_shapes`, which agents' tests check against the
torch module built from the same spec.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import msgspec
import numpy as np
import numpy.typing as npt

from fedgate_common.errors import MalformedMessage
from fedgate_common.limits import DEFAULT_LIMITS

Architecture = Literal["cnn1d-v1"]


def parameter_shapes(spec: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the trainable parameters, in state-dict order."""
    c, k = spec.channels, spec.kernel_size
    return [
        ("conv1.weight", (c, spec.n_features, k)),
        ("conv1.bias", (c,)),
        ("conv2.weight", (c, c, k)),
        ("conv2.bias", (c,)),
        ("head.weight", (spec.n_classes, c)),
        ("head.bias", (spec.n_classes,)),
    ]


class ModelSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A 1-D CNN over windows of ``window`` samples of ``n_features`` sensor channels.

    ``feature_mean``/``feature_scale`` standardise inputs inside the model (fixed, not
    trained), so an exported model scores raw sensor values. Empty means identity.
    """

    architecture: Architecture = "cnn1d-v1"
    n_features: int
    window: int
    n_classes: int
    channels: int = 64
    kernel_size: int = 3
    feature_mean: tuple[float, ...] = ()
    feature_scale: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for name in ("n_features", "window", "n_classes", "channels", "kernel_size"):
            value = getattr(self, name)
            if not 1 <= value <= 100_000:
                raise MalformedMessage(f"model spec: {name}={value} out of range 1..100000")
        if self.window < 2 * self.kernel_size - 1:
            raise MalformedMessage("model spec: window too short for two convolutions")
        for name in ("feature_mean", "feature_scale"):
            values = getattr(self, name)
            if values and len(values) != self.n_features:
                raise MalformedMessage(f"model spec: {name} needs {self.n_features} values")
            if not all(math.isfinite(v) for v in values):
                raise MalformedMessage(f"model spec: {name} has NaN/Inf")
        if any(v <= 0 for v in self.feature_scale):
            raise MalformedMessage("model spec: feature_scale must be positive")
        # Every tensor must fit the wire limits that models and updates are decoded with;
        # checked here, before anything is allocated, rather than at the first round.
        sizes = {name: math.prod(shape) for name, shape in parameter_shapes(self)}
        for name, size in sizes.items():
            if size > DEFAULT_LIMITS.max_array_elements:
                raise MalformedMessage(
                    f"model spec: {name} would hold {size:,} values, more than the "
                    f"{DEFAULT_LIMITS.max_array_elements:,} one array may carry"
                )
        total = sum(sizes.values())
        if total > DEFAULT_LIMITS.max_total_elements:
            raise MalformedMessage(
                f"model spec: {total:,} parameters, more than the "
                f"{DEFAULT_LIMITS.max_total_elements:,} a model may carry"
            )


# The TEP model a coordinator uses unless told otherwise: 52 sensors, windows of 20 samples,
# normal operation and faults 1-21; no standardisation.
DEFAULT_MODEL = ModelSpec(n_features=52, window=20, n_classes=22)


def _fan_in(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]


def initial_weights(
    spec: ModelSpec, rng: np.random.Generator
) -> dict[str, npt.NDArray[np.float32]]:
    """Genesis weights: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), the PyTorch default for
    Conv1d/Linear; a bias uses the fan-in of its layer's weight."""
    shapes = parameter_shapes(spec)
    weights: dict[str, npt.NDArray[np.float32]] = {}
    for index, (name, shape) in enumerate(shapes):
        weight_shape = shape if name.endswith(".weight") else shapes[index - 1][1]
        bound = 1.0 / math.sqrt(_fan_in(weight_shape))
        weights[name] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
    return weights


def flatten_parameters(
    named: Mapping[str, npt.NDArray[np.floating]], spec: ModelSpec
) -> npt.NDArray[np.float64]:
    """One flat vector of the parameters, in :func:`parameter_shapes` order."""
    return np.concatenate(
        [np.asarray(named[name], dtype=np.float64).ravel() for name, _ in parameter_shapes(spec)]
    )


def split_parameters(
    flat: npt.NDArray[np.floating], spec: ModelSpec
) -> dict[str, npt.NDArray[np.float32]]:
    """The inverse of :func:`flatten_parameters`."""
    named: dict[str, npt.NDArray[np.float32]] = {}
    offset = 0
    for name, shape in parameter_shapes(spec):
        size = math.prod(shape)
        named[name] = np.asarray(flat[offset : offset + size], dtype=np.float32).reshape(shape)
        offset += size
    if offset != flat.size:
        raise ValueError(f"vector of {flat.size} values for a model of {offset} parameters")
    return named


def parameter_count(spec: ModelSpec) -> int:
    return sum(math.prod(shape) for _, shape in parameter_shapes(spec))
