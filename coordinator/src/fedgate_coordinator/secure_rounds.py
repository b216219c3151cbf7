"""Secure-aggregation settings of a coordinator and what it does with an unmasked sum.

The protocol itself is :class:`fedgate_common.secagg.aggregator.Aggregator` (IO-free); the
service drives it over MQTT.
"""

from __future__ import annotations

import math

import msgspec
import numpy as np
import numpy.typing as npt
from fedgate_common.messages import SecAggParams
from fedgate_common.model_spec import ModelSpec, split_parameters
from fedgate_common.secagg.aggregator import Unmasked
from fedgate_common.secagg.graph import default_degree, default_threshold, effective_degree
from fedgate_common.secagg.participant import encoding_params

AGGREGATIONS = ("secagg", "plaintext")


class SecAggSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[secagg]`` in coordinator.toml.

    ``degree`` and ``threshold`` of 0 mean "derive from the number of agents": k = ceil(3
    log2 N) neighbours and t = ceil(2(k+1)/3). ``weight_cap`` is the most samples one agent
    counts for; set it near the largest site's number of training windows, since inputs
    are scaled by weight / weight_cap before quantization.
    """

    aggregation: str = "secagg"
    word_bits: int = 16
    clip_norm: float = 10.0
    weight_cap: int = 2000
    degree: int = 0
    threshold: int = 0
    stage_timeout_s: float = 30.0

    def params_for(self, selected: int) -> SecAggParams:
        degree = self.degree or default_degree(selected)
        threshold = self.threshold or default_threshold(effective_degree(selected, degree))
        return SecAggParams(
            word_bits=self.word_bits,
            clip_norm=self.clip_norm,
            weight_cap=self.weight_cap,
            max_inputs=max(selected, 1),
            degree=degree,
            threshold=threshold,
        )


def secagg_problems(settings: SecAggSettings) -> list[str]:
    problems = []
    if settings.aggregation not in AGGREGATIONS:
        problems.append(f"secagg.aggregation={settings.aggregation!r}: use secagg or plaintext")
    if settings.word_bits not in (16, 32):
        problems.append(f"secagg.word_bits={settings.word_bits}: use 16 or 32")
    if not 0 < settings.clip_norm <= 1e6:
        problems.append("secagg.clip_norm must be in (0, 1e6]")
    if not 1 <= settings.weight_cap <= 10**9:
        problems.append("secagg.weight_cap must be 1..1e9")
    if settings.degree < 0 or settings.threshold < 0:
        problems.append("secagg.degree and secagg.threshold must be 0 (automatic) or positive")
    if not 0 < settings.stage_timeout_s <= 3600:
        problems.append("secagg.stage_timeout_s must be in (0, 3600]")
    return problems


def mean_delta(
    unmasked: Unmasked, params: SecAggParams, spec: ModelSpec
) -> dict[str, npt.NDArray[np.float32]]:
    """The weighted mean update, split back into the model's named arrays."""
    return split_parameters(unmasked.decoded.mean_update(params.weight_cap), spec)


def input_bound_violation(unmasked: Unmasked, params: SecAggParams) -> str:
    """Why the decoded sum cannot come from honest, clipped inputs; "" when it can.

    Each honest input is clipped to ``clip_norm`` and scaled by at most 1, and its weight is
    at most ``weight_cap``; rounding moves each coordinate of the sum by less than n / scale.
    A sum outside those bounds means some agent sent words it did not encode honestly:
    the round is aborted rather than the sum used.
    """
    n = len(unmasked.survivors)
    encoding = encoding_params(params)
    total = unmasked.decoded.total_weight
    if total <= 0:
        return "survivors reported no samples"
    if total > n * params.weight_cap:
        return f"total weight {total} exceeds {n} survivors x weight_cap {params.weight_cap}"
    values = unmasked.decoded.weighted_sum
    rounding = n / encoding.scale * math.sqrt(values.size)
    norm = float(np.linalg.norm(values))
    # Honest input i is (w_i / weight_cap) * clipped update: the sum's norm is at most
    # (total weight / weight_cap) * clip_norm, whatever weights the agents hold.
    reach = total / params.weight_cap * params.clip_norm + rounding
    if norm > reach:
        return (
            f"sum of updates has L2 norm {norm:.4g}, more than inputs clipped to "
            f"{params.clip_norm} with total weight {total} can reach ({reach:.4g}): "
            "an input was not clipped or its weight understated"
        )
    return ""
