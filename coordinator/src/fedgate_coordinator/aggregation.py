"""Plaintext federated averaging (secure aggregation replaces the encoding later)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

Weights = Mapping[str, npt.NDArray[np.float32]]


def weighted_mean_delta(
    contributions: Sequence[tuple[int, Weights]],
) -> dict[str, npt.NDArray[np.float32]]:
    """Mean of the deltas weighted by each contributor's number of samples.

    Accumulates in float64 so the result does not depend on the order of arrival beyond
    float64 rounding.
    """
    if not contributions:
        raise ValueError("no contributions to average")
    total = float(sum(weight for weight, _ in contributions))
    if total <= 0:
        raise ValueError("total weight must be positive")
    names = list(contributions[0][1])
    mean: dict[str, npt.NDArray[np.float32]] = {}
    for name in names:
        acc = np.zeros(contributions[0][1][name].shape, dtype=np.float64)
        for weight, delta in contributions:
            acc += (weight / total) * delta[name].astype(np.float64)
        mean[name] = acc.astype(np.float32)
    return mean


def as_float32(
    weights: Mapping[str, npt.NDArray[np.generic]],
) -> dict[str, npt.NDArray[np.float32]]:
    """``weights`` with every array as float32 (decoded arrays carry their wire dtype)."""
    return {name: np.asarray(value, dtype=np.float32) for name, value in weights.items()}


def apply_delta(base: Weights, delta: Weights) -> dict[str, npt.NDArray[np.float32]]:
    with np.errstate(over="ignore"):  # overflow shows up as Inf; the caller checks
        return {name: (base[name] + delta[name]).astype(np.float32) for name in base}


def with_momentum(
    delta: Weights, base: Weights, parent: Weights, beta: float
) -> dict[str, npt.NDArray[np.float32]]:
    """Δ + β·(base − parent): heavy-ball momentum taken from the last two decided models
    (the manifest's ``server_momentum``). Element-wise float64 operations, cast to float32
    once, so every coordinator computes the same bits."""
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite results are refused later
        return {
            name: (
                delta[name].astype(np.float64)
                + beta * (base[name].astype(np.float64) - parent[name].astype(np.float64))
            ).astype(np.float32)
            for name in delta
        }
