"""Centralized training vs plain FedAvg on the non-IID Tennessee Eastman split.

Everything runs in one process on one thread (unless ``--threads``): no masking, no DP,
no consensus — the baseline fedgate's own numbers are compared against.

    .venv/bin/python bench/fedavg_sim.py                 # default config: both rows
    .venv/bin/python bench/fedavg_sim.py --grid          # centralized lr/window/channels grid

FedAvg: every round each site starts from the global weights, trains ``--local-epochs``
epochs with lr = lr0 · decay^round (fresh momentum), and the global model moves by the
mean of the sites' deltas weighted by their number of windows.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from fedgate_agent.datasets.tep import FederatedSplit, centralized_dataset, federated_split
from fedgate_agent.model import build_model, load_weights, weights_of
from fedgate_agent.training import Evaluation, LocalDataset, evaluate, train_locally
from fedgate_common.errors import NonFiniteValues
from fedgate_common.messages import TrainingPlan
from fedgate_common.model_spec import ModelSpec, initial_weights

Weights = dict[str, npt.NDArray[np.float32]]

# Faults 3, 9 and 15 are known to be indistinguishable from normal operation in this data.
UNOBSERVABLE_FAULTS = (3, 9, 15)


@dataclass(frozen=True)
class Row:
    method: str
    window: int
    channels: int
    lr: float
    accuracy: float
    accuracy_observable: float
    test_loss: float
    seconds: float


def observable_accuracy(spec: ModelSpec, weights: Weights, test: LocalDataset) -> float:
    keep = ~np.isin(test.y, UNOBSERVABLE_FAULTS)
    subset = LocalDataset(x=test.x[keep], y=test.y[keep])
    return evaluate(build_model(spec, weights=weights), subset).accuracy


def row_for(
    method: str, split: FederatedSplit, lr: float, weights: Weights | None, seconds: float
) -> Row:
    spec = split.spec
    if weights is None:  # diverged
        result = Evaluation(accuracy=float("nan"), loss=float("nan"), n=len(split.test))
        observable = float("nan")
    else:
        result = evaluate(build_model(spec, weights=weights), split.test)
        observable = observable_accuracy(spec, weights, split.test)
    return Row(
        method=method,
        window=spec.window,
        channels=spec.channels,
        lr=lr,
        accuracy=result.accuracy,
        accuracy_observable=observable,
        test_loss=result.loss,
        seconds=seconds,
    )


def train_centralized(
    split: FederatedSplit, *, lr: float, epochs: int, batch_size: int, seed: int
) -> tuple[Weights | None, float]:
    model = build_model(
        split.spec, weights=initial_weights(split.spec, np.random.default_rng(seed))
    )
    plan = TrainingPlan(learning_rate=lr, momentum=0.9, local_epochs=epochs, batch_size=batch_size)
    started = time.perf_counter()
    train_locally(model, centralized_dataset(split), plan, seed=seed)
    elapsed = time.perf_counter() - started
    weights = weights_of(model)
    finite = all(np.isfinite(w).all() for w in weights.values())
    return (weights if finite else None), elapsed


def train_fedavg(
    split: FederatedSplit,
    *,
    lr: float,
    rounds: int,
    local_epochs: int,
    decay: float,
    batch_size: int,
    seed: int,
    verbose: bool,
) -> tuple[Weights | None, float]:
    spec = split.spec
    global_weights = initial_weights(spec, np.random.default_rng(seed))
    model = build_model(spec, weights=global_weights)
    started = time.perf_counter()
    for round_number in range(rounds):
        plan = TrainingPlan(
            learning_rate=lr * decay**round_number,
            momentum=0.9,
            local_epochs=local_epochs,
            batch_size=batch_size,
        )
        weighted_sum = {
            name: np.zeros_like(w, dtype=np.float64) for name, w in global_weights.items()
        }
        total = 0
        for site_index, site in enumerate(split.sites):
            try:
                load_weights(model, global_weights)
            except NonFiniteValues:
                return None, time.perf_counter() - started
            result = train_locally(
                model, site, plan, seed=seed * 1_000_003 + round_number * 1_000 + site_index
            )
            local = weights_of(model)
            for name, value in local.items():
                weighted_sum[name] += result.num_samples * (value - global_weights[name])
            total += result.num_samples
        global_weights = {
            name: (global_weights[name] + weighted_sum[name] / total).astype(np.float32)
            for name in global_weights
        }
        if verbose:
            accuracy = evaluate(build_model(spec, weights=global_weights), split.test).accuracy
            print(f"  round {round_number + 1:3d}: test accuracy {accuracy:.3f}", flush=True)
    elapsed = time.perf_counter() - started
    finite = all(np.isfinite(w).all() for w in global_weights.values())
    return (global_weights if finite else None), elapsed


def print_table(rows: Sequence[Row]) -> None:
    header = (
        f"{'method':<14} {'window':>6} {'ch':>4} {'lr':>6} {'acc':>7} "
        f"{'acc w/o 3,9,15':>15} {'test loss':>10} {'seconds':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row.method:<14} {row.window:>6} {row.channels:>4} {row.lr:>6.3f} "
            f"{row.accuracy:>7.3f} {row.accuracy_observable:>15.3f} {row.test_loss:>10.3f} "
            f"{row.seconds:>8.1f}"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--sites", type=int, default=6)
    parser.add_argument("--sites-per-fault", type=int, default=2)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--stride", type=int, default=2)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=100, help="centralized epochs")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--decay", type=float, default=0.98, help="FedAvg lr decay per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grid", action="store_true", help="centralized grid, no FedAvg")
    parser.add_argument("--grid-windows", type=int, nargs="+", default=[10, 20, 30])
    parser.add_argument("--grid-channels", type=int, nargs="+", default=[32, 64])
    parser.add_argument(
        "--grid-lrs", type=float, nargs="+", default=[0.001, 0.003, 0.01, 0.03, 0.05, 0.1]
    )
    parser.add_argument("--skip-centralized", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="FedAvg accuracy per round")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows: list[Row] = []
    if args.grid:
        grid = itertools.product(args.grid_windows, args.grid_channels, args.grid_lrs)
        for window, channels, lr in grid:
            split = federated_split(
                args.sites,
                window=window,
                stride=args.stride,
                seed=args.seed,
                sites_per_fault=args.sites_per_fault,
                channels=channels,
            )
            weights, seconds = train_centralized(
                split, lr=lr, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed
            )
            rows.append(row_for("centralized", split, lr, weights, seconds))
            print_table(rows[-1:])
        print()
        print_table(rows)
        return

    split = federated_split(
        args.sites,
        window=args.window,
        stride=args.stride,
        seed=args.seed,
        sites_per_fault=args.sites_per_fault,
        channels=args.channels,
    )
    sizes = ", ".join(str(len(site)) for site in split.sites)
    print(
        f"TEP split: {args.sites} sites x {args.sites_per_fault} sites/fault, windows per site "
        f"[{sizes}], test {len(split.test)}, {torch.get_num_threads()} thread(s)"
    )
    if not args.skip_centralized:
        weights, seconds = train_centralized(
            split, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed
        )
        rows.append(row_for(f"centralized/{args.epochs}", split, args.lr, weights, seconds))
    weights, seconds = train_fedavg(
        split,
        lr=args.lr,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        decay=args.decay,
        batch_size=args.batch_size,
        seed=args.seed,
        verbose=args.verbose,
    )
    rows.append(
        row_for(f"fedavg/{args.rounds}x{args.local_epochs}", split, args.lr, weights, seconds)
    )
    print_table(rows)


if __name__ == "__main__":
    main()
