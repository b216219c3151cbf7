"""Inference benchmark: per-window scoring latency and throughput of the demo model in
onnxruntime (the agent's live scorer) against the same model in torch eager, on one core,
in one run.

    .venv/bin/python -m bench.inference.run            # 5,000 windows per engine and batch size
    .venv/bin/python -m bench.inference.run --quick    # 640 windows: a smoke run, seconds

The model is the demo's ``cnn1d-v1`` (TEP: 52 features, windows of 20, 22 classes, 64
channels; :func:`fedgate_agent.datasets.tep.tep_model_spec`), exported exactly as the agent
exports a certified global model (:func:`fedgate_agent.onnx_export.export_model`, parity
checked). The windows are the held-out TEP test windows. Both engines run pinned to one CPU
with one thread (``torch.set_num_threads(1)``, onnxruntime intra/inter-op threads 1), torch
under ``torch.inference_mode()``.

Latency is the wall time of one call (``time.perf_counter_ns``), from numpy windows in to
the engine's logits out; batch 1 is what live scoring does for each new window. The engines
alternate in blocks so that another job on the machine hurts both alike. windows/s is
windows over the summed call times. Prints one table on stdout; see bench/inference/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from fedgate_agent.datasets.tep import held_out_test_set, tep_model_spec
from fedgate_agent.model import build_model
from fedgate_agent.onnx_export import export_model, parity_windows
from fedgate_agent.scoring import INPUT_NAME, OUTPUT_NAME, ScoringModel
from fedgate_common.model_spec import initial_weights
from fedgate_common.text_table import format_table

HEADERS = (
    "engine",
    "batch",
    "windows",
    "p50 µs/window",
    "p99 µs/window",
    "mean µs/window",
    "windows/s",
    "vs torch eager",
)
TARGET_SPEEDUP = 3.0
TARGET_P99_US = 1000.0
ENGINES = ("torch eager", "onnxruntime")


@dataclass(frozen=True)
class Timing:
    """Call times of one engine at one batch size; every figure is per window."""

    engine: str
    batch: int
    call_ns: npt.NDArray[np.int64]  # one entry per call

    @property
    def windows(self) -> int:
        return len(self.call_ns) * self.batch

    def percentile_us(self, q: float) -> float:
        return float(np.percentile(self.call_ns, q)) / 1000 / self.batch

    @property
    def mean_us(self) -> float:
        return float(self.call_ns.mean()) / 1000 / self.batch

    @property
    def rate(self) -> float:
        return self.windows / (float(self.call_ns.sum()) / 1e9)


def test_windows(count: int) -> npt.NDArray[np.float32]:
    """``count`` held-out TEP windows of every class (repeated when more are asked for)."""
    pool = held_out_test_set(window=20, stride=2).x
    chosen = np.random.default_rng(0).permutation(len(pool))
    return np.ascontiguousarray(np.resize(pool[chosen], (count, *pool.shape[1:])))


def _time_calls(
    call: Callable[[npt.NDArray[np.float32]], object],
    windows: npt.NDArray[np.float32],
    batch: int,
) -> npt.NDArray[np.int64]:
    times = np.empty(len(windows) // batch, dtype=np.int64)
    clock = time.perf_counter_ns
    for i in range(len(times)):
        x = windows[i * batch : (i + 1) * batch]
        start = clock()
        call(x)
        times[i] = clock() - start
    return times


def run(
    *, windows: int, batches: Sequence[int] = (1, 64), blocks: int = 5, cpu: int | None = None
) -> tuple[list[Timing], float]:
    """Time both engines at each batch size; returns the timings and the parity gap
    (max |onnxruntime − torch| over every logit of the windows)."""
    allowed = os.sched_getaffinity(0)
    threads = torch.get_num_threads()
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    torch.set_num_threads(1)
    try:
        return _measure(windows, batches, blocks)
    finally:  # a caller in the same process (the smoke test) gets its CPUs back
        os.sched_setaffinity(0, allowed)
        torch.set_num_threads(threads)


def _measure(windows: int, batches: Sequence[int], blocks: int) -> tuple[list[Timing], float]:
    spec = tep_model_spec(20)
    weights = initial_weights(spec, np.random.default_rng(0))
    data = test_windows(windows)
    exported = export_model(
        spec, weights, digest="be" * 32, round=0, windows=parity_windows(spec, data)
    )
    scorer = ScoringModel.from_onnx(exported.onnx)
    session = scorer.session
    model = build_model(spec, weights=weights).eval()

    def torch_call(x: npt.NDArray[np.float32]) -> object:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    def onnx_call(x: npt.NDArray[np.float32]) -> object:
        return session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]

    calls = {"torch eager": torch_call, "onnxruntime": onnx_call}
    with torch.inference_mode():
        reference = model(torch.from_numpy(data)).numpy()
    parity = float(np.max(np.abs(session.run([OUTPUT_NAME], {INPUT_NAME: data})[0] - reference)))

    timings: list[Timing] = []
    for batch in batches:
        usable = len(data) // (batch * blocks) * batch * blocks
        if usable == 0:
            raise ValueError(f"{len(data)} windows are too few for {blocks} blocks of {batch}")
        split = np.split(data[:usable], blocks)
        for engine in ENGINES:  # warm-up: first calls allocate
            _time_calls(calls[engine], split[0][: batch * 20], batch)
        per_engine: dict[str, list[npt.NDArray[np.int64]]] = {e: [] for e in ENGINES}
        for block in split:
            for engine in ENGINES:
                per_engine[engine].append(_time_calls(calls[engine], block, batch))
        timings.extend(
            Timing(engine=e, batch=batch, call_ns=np.concatenate(per_engine[e])) for e in ENGINES
        )
    return timings, parity


def table_row(timing: Timing, reference: Timing) -> list[object]:
    return [
        timing.engine,
        timing.batch,
        timing.windows,
        f"{timing.percentile_us(50):.1f}",
        f"{timing.percentile_us(99):.1f}",
        f"{timing.mean_us:.1f}",
        round(timing.rate),
        f"{timing.rate / reference.rate:.2f} x",
    ]


def table(timings: Sequence[Timing]) -> str:
    rows = []
    for timing in timings:
        reference = next(
            t for t in timings if t.engine == "torch eager" and t.batch == timing.batch
        )
        rows.append(table_row(timing, reference))
    return format_table(HEADERS, rows)


def verdict(timings: Sequence[Timing]) -> str:
    live = {t.engine: t for t in timings if t.batch == 1}
    speedup = live["onnxruntime"].rate / live["torch eager"].rate
    p99 = live["onnxruntime"].percentile_us(99)
    met = speedup >= TARGET_SPEEDUP and p99 < TARGET_P99_US
    return (
        f"target (batch 1, the live case): onnxruntime >= {TARGET_SPEEDUP:g} x torch eager "
        f"windows/s and p99 < {TARGET_P99_US:g} µs; measured {speedup:.2f} x, p99 {p99:.1f} µs: "
        + ("met" if met else "NOT met")
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=5000, help="per engine and batch size")
    parser.add_argument("--batch", type=int, action="append", help="default: 1 and 64")
    parser.add_argument("--blocks", type=int, default=5, help="alternations of the engines")
    parser.add_argument("--cpu", type=int, default=None, help="default: the last allowed CPU")
    parser.add_argument("--quick", action="store_true", help="640 windows: a smoke run")
    args = parser.parse_args(argv)
    cpu = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
    timings, parity = run(
        windows=640 if args.quick else args.windows,
        batches=tuple(args.batch or (1, 64)),
        blocks=args.blocks,
        cpu=cpu,
    )
    print(table(timings))
    print(f"\nparity: max |onnxruntime - torch| over all logits = {parity:.3g}")
    if any(t.batch == 1 for t in timings):
        print(verdict(timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
