"""What drawing DP-SGD's batches and noise from ChaCha20 costs (decision 0043).

    .venv/bin/python -m bench.privacy.randomness_cost            # the demo's model, 5 repeats
    .venv/bin/python -m bench.privacy.randomness_cost --repeats 9 --windows 1450

Times one DP round of ``train_locally_private`` per step on the demo's model (52 features,
window 20, 64 channels, 22 classes: 23,830 parameters) on one thread, with the production
path (no seed: ChaCha20 stream) and the seeded path (torch generator, as before the
stream), alternating so that both see the same machine load; then the noise of one step
and one Poisson mask on their own. Prints a table (milliseconds, min and median).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from fedgate_agent.model import build_model
from fedgate_agent.private_training import CsprngDPOptimizer, train_locally_private
from fedgate_agent.secure_random import ChaCha20Stream
from fedgate_agent.training import LocalDataset
from fedgate_common.messages import TrainingPlan
from fedgate_common.model_spec import ModelSpec, initial_weights, parameter_count
from fedgate_common.text_table import format_table
from opacus.optimizers.optimizer import _generate_noise

from bench.privacy.federation import quiet_opacus

SPEC = ModelSpec(n_features=52, window=20, n_classes=22, channels=64, kernel_size=3)
SIGMA, CLIP = 4.0, 1.0


def _dataset(windows: int) -> LocalDataset:
    rng = np.random.default_rng(0)
    return LocalDataset(
        x=rng.normal(size=(windows, SPEC.window, SPEC.n_features)).astype(np.float32),
        y=rng.integers(0, SPEC.n_classes, windows).astype(np.int64),
    )


def _round_ms_per_step(data: LocalDataset, plan: TrainingPlan, seed: int | None) -> float:
    model = build_model(SPEC, weights=initial_weights(SPEC, np.random.default_rng(1)))
    started = time.perf_counter()
    result = train_locally_private(
        model, data, plan, noise_multiplier=SIGMA, max_grad_norm=CLIP, seed=seed
    )
    return 1e3 * (time.perf_counter() - started) / result.steps


def _ms(call: Callable[[], object], repeats: int, calls: int = 100) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            call()
        times.append(1e3 * (time.perf_counter() - started) / calls)
    return times


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions of each row")
    parser.add_argument("--windows", type=int, default=1450, help="windows (a demo site's)")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    quiet_opacus()
    data = _dataset(args.windows)
    plan = TrainingPlan(learning_rate=1.0, momentum=0.9, local_epochs=2, batch_size=args.batch_size)
    rounds: dict[str, list[float]] = {"chacha20": [], "torch": []}
    for repeat in range(args.repeats):
        print(f"round {repeat + 1}/{args.repeats}", file=sys.stderr, flush=True)
        rounds["chacha20"].append(_round_ms_per_step(data, plan, None))
        rounds["torch"].append(_round_ms_per_step(data, plan, 1))

    shapes = [p.shape for p in build_model(SPEC).parameters()]
    references = [torch.zeros(shape) for shape in shapes]
    generator = torch.Generator().manual_seed(2)
    stream = ChaCha20Stream()
    optimizer = CsprngDPOptimizer(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1),
        noise_multiplier=SIGMA,
        max_grad_norm=CLIP,
        expected_batch_size=args.batch_size,
        stream=stream,
    )
    rate = args.batch_size / args.windows
    rows = [
        ("one step of a DP round", "ChaCha20 (no seed)", rounds["chacha20"]),
        ("one step of a DP round", "torch generator (seed)", rounds["torch"]),
        (
            "noise of one step",
            "ChaCha20, 4 normals/value",
            _ms(lambda: [optimizer._noise_like(r, SIGMA * CLIP) for r in references], args.repeats),
        ),
        (
            "noise of one step",
            "torch, Opacus secure mode",
            _ms(
                lambda: [
                    _generate_noise(SIGMA * CLIP, r, generator=generator, secure_mode=True)
                    for r in references
                ],
                args.repeats,
            ),
        ),
        (
            "Poisson mask of one step",
            "ChaCha20",
            _ms(lambda: stream.bernoulli_mask(args.windows, rate), args.repeats),
        ),
        (
            "Poisson mask of one step",
            "torch generator",
            _ms(lambda: torch.rand(args.windows, generator=generator) < rate, args.repeats),
        ),
    ]
    print(
        f"{parameter_count(SPEC)} parameters, {args.windows} windows, batch {args.batch_size}, "
        f"one thread, {args.repeats} repeats"
    )
    print(
        format_table(
            ["what", "randomness", "min ms", "median ms"],
            [[what, how, min(t), statistics.median(t)] for what, how, t in rows],
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
