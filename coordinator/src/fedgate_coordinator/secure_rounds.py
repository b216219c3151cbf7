"""Secure-aggregation settings of a coordinator and what it does with an unmasked sum.

The protocol itself is :class:`fedgate_common.secagg.aggregator.Aggregator` (IO-free); the
service drives it over MQTT.
"""

from __future__ import annotations

import math

import msgspec
import numpy as np
import numpy.typing as npt
from fedgate_common.messages import SecAggParams, SiteNoise
from fedgate_common.model_spec import ModelSpec, split_parameters
from fedgate_common.secagg.aggregator import Unmasked
from fedgate_common.secagg.encoding import HEADROOM_TAIL
from fedgate_common.secagg.graph import default_degree, default_threshold, effective_degree
from fedgate_common.secagg.participant import encoding_params

AGGREGATIONS = ("secagg", "plaintext")


class SecAggSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[secagg]`` in coordinator.toml.

    ``degree`` and ``threshold`` of 0 mean "derive from the number of agents": k = ceil(3
    log2 N) neighbours and t = ceil(2(k+1)/3). ``weight_cap`` is the most samples one agent
    counts for; set it near the largest site's number of training windows, since inputs
    are scaled by weight / weight_cap before quantization.

    With ``adaptive_clip`` the clip norm starts at ``clip_norm`` and follows the
    ``clip_quantile`` of the agents' update norms (Andrew et al. 2021): after each round
    C ← C · exp(−clip_learning_rate · (b − clip_quantile)), b the fraction of inputs that
    were within C, counted inside the masked sum (noised under site-level DP with std
    ``clip_count_noise``; 0 = selected / 20, the paper's choice).
    """

    aggregation: str = "secagg"
    word_bits: int = 16
    clip_norm: float = 10.0
    weight_cap: int = 2000
    degree: int = 0
    threshold: int = 0
    stage_timeout_s: float = 30.0
    adaptive_clip: bool = False
    clip_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clip_count_noise: float = 0.0

    def params_for(self, selected: int, *, clip_norm: float | None = None) -> SecAggParams:
        degree = self.degree or default_degree(selected)
        threshold = self.threshold or default_threshold(effective_degree(selected, degree))
        return SecAggParams(
            word_bits=self.word_bits,
            clip_norm=self.clip_norm if clip_norm is None else clip_norm,
            weight_cap=self.weight_cap,
            max_inputs=max(selected, 1),
            degree=degree,
            threshold=threshold,
            count_within_clip=self.adaptive_clip,
        )

    def count_noise_for(self, selected: int) -> float:
        return self.clip_count_noise or max(selected, 1) / 20

    def next_clip_norm(self, clip_norm: float, within_fraction: float) -> float:
        """The geometric update of adaptive clipping; the fraction is clamped to [0, 1]."""
        within = min(max(within_fraction, 0.0), 1.0)
        return clip_norm * math.exp(-self.clip_learning_rate * (within - self.clip_quantile))


def with_site_noise(
    params: SecAggParams, *, noise_multiplier: float, min_inputs: int, count_noise: float
) -> SecAggParams:
    """``params`` with site-level noise; the count carries noise only with adaptive clipping."""
    return msgspec.structs.replace(
        params,
        noise=SiteNoise(
            noise_multiplier=noise_multiplier,
            min_inputs=min_inputs,
            count_noise=count_noise if params.count_within_clip else 0.0,
        ),
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
    if not 0 < settings.clip_quantile < 1:
        problems.append("secagg.clip_quantile must be in (0, 1)")
    if not 0 < settings.clip_learning_rate <= 10:
        problems.append("secagg.clip_learning_rate must be in (0, 10]")
    if not 0 <= settings.clip_count_noise <= 1e6:
        problems.append("secagg.clip_count_noise must be 0 (selected / 20) or in (0, 1e6]")
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
    Under site-level DP the sum also carries the noise: every input weighs ``weight_cap``
    and the noise's norm is, except with probability HEADROOM_TAIL, within
    σ·(√d + √(2 ln(1 / HEADROOM_TAIL))) (Gaussian concentration; the shares are
    subgaussian). A sum outside those bounds means some agent sent words it did not encode
    honestly: the round is aborted rather than the sum used.
    """
    n = len(unmasked.survivors)
    encoding = encoding_params(params)
    total = unmasked.decoded.total_weight
    if total <= 0:
        return "survivors reported no samples"
    if total > n * params.weight_cap:
        return f"total weight {total} exceeds {n} survivors x weight_cap {params.weight_cap}"
    if encoding.noisy and total != n * params.weight_cap:
        return f"total weight {total} is not {n} survivors x weight_cap under site-level DP"
    values = unmasked.decoded.weighted_sum
    rounding = n / encoding.scale * math.sqrt(values.size)
    noise = 0.0
    if encoding.noisy:
        sigma = encoding.update_share_sigma * math.sqrt(n) / encoding.scale
        noise = sigma * (math.sqrt(values.size) + math.sqrt(2 * math.log(1 / HEADROOM_TAIL)))
    norm = float(np.linalg.norm(values))
    # Honest input i is (w_i / weight_cap) * clipped update: the sum's norm is at most
    # (total weight / weight_cap) * clip_norm, whatever weights the agents hold.
    reach = total / params.weight_cap * params.clip_norm + rounding + noise
    if norm > reach:
        return (
            f"sum of updates has L2 norm {norm:.4g}, more than inputs clipped to "
            f"{params.clip_norm} with total weight {total} can reach ({reach:.4g}): "
            "an input was not clipped or its weight understated"
        )
    return ""
