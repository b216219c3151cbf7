"""fedgate's side of the SecAgg benchmark: the protocol core, every party in one process.

:func:`fedgate_round` runs :func:`fedgate_common.secagg.local_round.run_local_round`, which
drives N real :class:`Participant` objects and one :class:`Aggregator` through all five
stages and seals every message as the MQTT drivers do (Ed25519 envelopes), so byte counts
are wire bytes (MQTT framing excluded, as Flower's gRPC framing is excluded on its side).
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from fedgate_common.messages import SecAggParams
from fedgate_common.secagg.aggregator import Unmasked
from fedgate_common.secagg.encoding import EncodingParams, encode_update
from fedgate_common.secagg.graph import default_threshold, effective_degree
from fedgate_common.secagg.keystream import MaskExpander
from fedgate_common.secagg.local_round import STAGES, run_local_round

CLIP_NORM = 8.0  # Flower's default clipping range, for like-for-like quantization work
WEIGHT_CAP = 1000


@dataclass
class FedgateTimes:
    agent: dict[str, float]  # stage → median seconds of one agent
    coordinator: dict[str, float]  # stage → seconds to close the stage
    encode_seconds: float  # median seconds to clip, weight, quantize one update
    bytes_up_per_agent: int
    bytes_down_per_agent: int
    masked_payload_bytes: int  # the masked vector's data alone
    degree: int = 0
    threshold: int = 0
    dropped: int = 0
    max_abs_error: float = 0.0
    refusals: dict[str, str] = field(default_factory=dict)

    @property
    def mask_encode_seconds(self) -> float:
        """Agent encoding plus the masked stage (open delivered shares, add every mask)."""
        return self.encode_seconds + self.agent["masked"]


def params_for(n: int, k: int, word_bits: int) -> SecAggParams:
    degree = effective_degree(n, k)
    return SecAggParams(
        word_bits=word_bits,
        clip_norm=CLIP_NORM,
        weight_cap=WEIGHT_CAP,
        max_inputs=n,
        degree=k,
        threshold=default_threshold(degree),
    )


def fedgate_round(
    n: int, d: int, k: int, *, word_bits: int = 16, dropout_fraction: float = 0.0, seed: int = 0
) -> FedgateTimes:
    """One round over N agents with d parameters; checks the decoded mean."""
    params = params_for(n, k, word_bits)
    encoding = EncodingParams(
        word_bits=word_bits, clip_norm=CLIP_NORM, weight_cap=WEIGHT_CAP, max_inputs=n
    )
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal(d) * 0.001).astype(np.float32)
    ids = [f"agent-{i:04d}" for i in range(n)]
    updates = {agent: base + np.float32(i * 1e-5) for i, agent in enumerate(ids)}
    encoded, encode_times = {}, []
    for agent in ids:
        began = time.perf_counter()
        encoded[agent] = encode_update(updates[agent], 100, encoding)
        encode_times.append(time.perf_counter() - began)
    dropped = set(random.Random(seed).sample(ids, int(n * dropout_fraction)))
    result = run_local_round(
        encoded, params, dropouts={"masked": dropped}, dimension=d, round=seed + 1
    )
    if not isinstance(result.outcome, Unmasked):
        raise RuntimeError(f"fedgate round aborted: {result.outcome}")
    survivors = [a for a in ids if a not in dropped]
    exact = np.mean([updates[a].astype(np.float64) for a in survivors], axis=0)
    mean = result.outcome.decoded.mean_update(WEIGHT_CAP)
    error = float(np.abs(mean - exact).max())
    if error > 2 * n / encoding.scale:
        raise RuntimeError(f"decoded mean off by {error}")
    watched = survivors[0]
    return FedgateTimes(
        agent=dict(result.agent_seconds),
        coordinator=dict(result.coordinator_seconds),
        encode_seconds=statistics.median(encode_times),
        bytes_up_per_agent=result.bytes_up[watched],
        bytes_down_per_agent=result.bytes_down[watched],
        masked_payload_bytes=encoded[watched].nbytes,
        degree=effective_degree(n, k),
        threshold=params.threshold,
        dropped=len(dropped),
        max_abs_error=error,
        refusals=result.refusals,
    )


def fedgate_agent_mask_encode_seconds(
    d: int, k: int, *, word_bits: int = 16, repeats: int = 3
) -> float:
    """One agent's encoding + masked stage with k neighbours (the figure of the 5× target)."""
    return statistics.median(
        fedgate_round(k + 1, d, k, word_bits=word_bits, seed=r).mask_encode_seconds
        for r in range(repeats)
    )


def mask_expansion_throughput(d: int, k: int, word_bits: int = 16) -> tuple[float, float]:
    """(mask expansion incl. the modular add, raw AES-256-CTR keystream) in bytes/second."""
    expander = MaskExpander(d, word_bits)
    words = np.zeros(d, dtype=expander.dtype)
    keys = [bytes([i % 256]) * 32 for i in range(k)]
    length = d * expander.dtype.itemsize
    zeros, out = bytes(length), bytearray(length + 15)

    def raw() -> None:
        for key in keys:
            encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
            encryptor.update_into(zeros, out)

    def masks() -> None:
        for key in keys:
            expander.add(words, key)

    best = {}
    for name, run in (("raw", raw), ("masks", masks)):
        times = []
        for _ in range(7):
            began = time.perf_counter()
            run()
            times.append(time.perf_counter() - began)
        best[name] = length * k / min(times)
    return best["masks"], best["raw"]


__all__ = [
    "STAGES",
    "FedgateTimes",
    "fedgate_agent_mask_encode_seconds",
    "fedgate_round",
    "mask_expansion_throughput",
]
