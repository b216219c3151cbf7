"""Centralized training vs plain FedAvg on the non-IID Tennessee Eastman split.

Everything runs in one process on one thread (unless ``--threads``): no masking, no DP,
no consensus — the baseline that fedgate's own numbers are compared against.

    .venv/bin/python bench/fedavg_sim.py                    # centralized, FedAvg, seed 0
    .venv/bin/python bench/fedavg_sim.py --seeds 0 1 2 --iid-control
    .venv/bin/python bench/fedavg_sim.py --grid             # centralized lr/window/channels grid

Centralized: ``--epochs`` epochs of SGD (momentum 0.9, constant lr) on the union of all
sites' windows. FedAvg: every round each site starts from the global weights, trains
``--local-epochs`` epochs with lr = lr0 · decay^round (fresh momentum), and the global
model moves by the mean of the sites' deltas weighted by their number of windows.
``fedavg-iid`` (``--iid-control``) is the same FedAvg on the same windows dealt to the
sites at random: the gap between it and ``fedavg`` is what the non-IID split costs.
Both start from the same genesis weights (``initial_weights`` with the run's seed).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from fedgate_agent.datasets.tep import FederatedSplit, centralized_dataset, federated_split
from fedgate_agent.model import build_model, load_weights, weights_of
from fedgate_agent.training import LocalDataset, evaluate, train_locally
from fedgate_common.messages import TrainingPlan
from fedgate_common.model_spec import initial_weights

Weights = dict[str, npt.NDArray[np.float32]]

# Faults 3, 9 and 15 are known to be indistinguishable from normal operation in this data.
UNOBSERVABLE_FAULTS = (3, 9, 15)


@dataclass(frozen=True)
class Row:
    method: str
    seed: int
    window: int
    channels: int
    lr: float
    accuracy: float
    accuracy_observable: float
    test_loss: float
    seconds: float


def is_finite(weights: Weights) -> bool:
    return all(np.isfinite(w).all() for w in weights.values())


def row_for(
    method: str, split: FederatedSplit, lr: float, seed: int, weights: Weights, seconds: float
) -> Row:
    spec = split.spec
    if is_finite(weights):
        model = build_model(spec, weights=weights)
        result = evaluate(model, split.test)
        accuracy, loss = result.accuracy, result.loss
        keep = ~np.isin(split.test.y, UNOBSERVABLE_FAULTS)
        observable = evaluate(model, LocalDataset(x=split.test.x[keep], y=split.test.y[keep]))
        accuracy_observable = observable.accuracy
    else:  # diverged
        accuracy = loss = accuracy_observable = float("nan")
    return Row(
        method=method,
        seed=seed,
        window=spec.window,
        channels=spec.channels,
        lr=lr,
        accuracy=accuracy,
        accuracy_observable=accuracy_observable,
        test_loss=loss,
        seconds=seconds,
    )


def train_centralized(
    split: FederatedSplit, *, lr: float, epochs: int, batch_size: int, seed: int
) -> tuple[Weights, float]:
    genesis = initial_weights(split.spec, np.random.default_rng(seed))
    model = build_model(split.spec, weights=genesis)
    plan = TrainingPlan(learning_rate=lr, momentum=0.9, local_epochs=epochs, batch_size=batch_size)
    started = time.perf_counter()
    train_locally(model, centralized_dataset(split), plan, seed=seed)
    return weights_of(model), time.perf_counter() - started


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
) -> tuple[Weights, float]:
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
            name: np.zeros(w.shape, dtype=np.float64) for name, w in global_weights.items()
        }
        total = 0
        for site_index, site in enumerate(split.sites):
            load_weights(model, global_weights)
            result = train_locally(
                model, site, plan, seed=seed * 1_000_003 + round_number * 1_000 + site_index
            )
            for name, value in weights_of(model).items():
                weighted_sum[name] += result.num_samples * (value - global_weights[name])
            total += result.num_samples
        global_weights = {
            name: (global_weights[name] + weighted_sum[name] / total).astype(np.float32)
            for name in global_weights
        }
        if not is_finite(global_weights):
            break
        if verbose:
            accuracy = evaluate(build_model(spec, weights=global_weights), split.test).accuracy
            print(f"  round {round_number + 1:3d}: test accuracy {accuracy:.3f}", flush=True)
    return global_weights, time.perf_counter() - started


def iid_control(split: FederatedSplit, seed: int) -> FederatedSplit:
    """The same windows and test set, dealt to the same number of sites uniformly at random."""
    everything = centralized_dataset(split)
    order = np.random.default_rng(seed).permutation(len(everything))
    parts = np.array_split(order, len(split.sites))
    sites = [LocalDataset(x=everything.x[p], y=everything.y[p]) for p in parts]
    return dataclasses.replace(split, sites=sites)


HEADER = (
    f"{'method':<16} {'seed':>4} {'window':>6} {'ch':>4} {'lr':>6} {'acc':>7} "
    f"{'acc w/o 3,9,15':>15} {'test loss':>10} {'seconds':>8}"
)


def print_rows(rows: Sequence[Row], *, header: bool) -> None:
    if header:
        print(HEADER)
        print("-" * len(HEADER))
    for row in rows:
        print(
            f"{row.method:<16} {row.seed:>4} {row.window:>6} {row.channels:>4} {row.lr:>6.3f} "
            f"{row.accuracy:>7.3f} {row.accuracy_observable:>15.3f} {row.test_loss:>10.3f} "
            f"{row.seconds:>8.1f}",
            flush=True,
        )


def print_summary(rows: Sequence[Row]) -> None:
    methods = list(dict.fromkeys(row.method for row in rows))
    print()
    print(
        f"{'method':<16} {'runs':>4} {'acc mean':>9} {'acc sd':>7} {'w/o 3,9,15':>11} {'s/run':>7}"
    )
    print("-" * 59)
    for method in methods:
        mine = [row for row in rows if row.method == method]
        accuracies = [row.accuracy for row in mine]
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        print(
            f"{method:<16} {len(mine):>4} {statistics.fmean(accuracies):>9.3f} {spread:>7.3f} "
            f"{statistics.fmean(row.accuracy_observable for row in mine):>11.3f} "
            f"{statistics.fmean(row.seconds for row in mine):>7.1f}"
        )


def run_grid(args: argparse.Namespace) -> None:
    rows: list[Row] = []
    grid = itertools.product(args.grid_windows, args.grid_channels, args.grid_lrs)
    for window, channels, lr in grid:
        split = federated_split(
            args.sites,
            window=window,
            stride=args.stride,
            seed=args.seeds[0],
            sites_per_fault=args.sites_per_fault,
            channels=channels,
        )
        weights, seconds = train_centralized(
            split, lr=lr, epochs=args.epochs, batch_size=args.batch_size, seed=args.seeds[0]
        )
        rows.append(row_for("centralized", split, lr, args.seeds[0], weights, seconds))
        print_rows(rows[-1:], header=len(rows) == 1)


def run_comparison(args: argparse.Namespace) -> None:
    rows: list[Row] = []
    for seed in args.seeds:
        split = federated_split(
            args.sites,
            window=args.window,
            stride=args.stride,
            seed=seed,
            sites_per_fault=args.sites_per_fault,
            channels=args.channels,
        )
        if seed == args.seeds[0]:
            sizes = ", ".join(str(len(site)) for site in split.sites)
            print(
                f"TEP split: {args.sites} sites, each fault on {args.sites_per_fault}; windows "
                f"per site [{sizes}]; test {len(split.test)}; {torch.get_num_threads()} thread(s)"
            )
            print(
                f"centralized: {args.epochs} epochs; FedAvg: {args.rounds} rounds x "
                f"{args.local_epochs} local epochs, lr decay {args.decay}/round; batch "
                f"{args.batch_size}, momentum 0.9"
            )
        fedavg_runs = [(f"fedavg {args.rounds}x{args.local_epochs}", split)]
        if args.iid_control:
            fedavg_runs.append(("fedavg-iid", iid_control(split, seed)))
        new_rows: list[Row] = []
        if not args.skip_centralized:
            weights, seconds = train_centralized(
                split, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, seed=seed
            )
            new_rows.append(
                row_for(f"centralized {args.epochs}", split, args.lr, seed, weights, seconds)
            )
            print_rows(new_rows[-1:], header=not rows and len(new_rows) == 1)
        for method, federation in fedavg_runs:
            weights, seconds = train_fedavg(
                federation,
                lr=args.lr,
                rounds=args.rounds,
                local_epochs=args.local_epochs,
                decay=args.decay,
                batch_size=args.batch_size,
                seed=seed,
                verbose=args.verbose,
            )
            new_rows.append(row_for(method, federation, args.lr, seed, weights, seconds))
            print_rows(new_rows[-1:], header=not rows and len(new_rows) == 1)
        rows.extend(new_rows)
    print_summary(rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Centralized vs plain FedAvg on the non-IID TEP split (one process)."
    )
    parser.add_argument("--sites", type=int, default=6)
    parser.add_argument("--sites-per-fault", type=int, default=3)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--stride", type=int, default=2)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=100, help="centralized epochs")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--decay", type=float, default=0.98, help="FedAvg lr decay per round")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iid-control", action="store_true", help="add FedAvg on an IID deal")
    parser.add_argument("--skip-centralized", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="FedAvg accuracy per round")
    parser.add_argument("--grid", action="store_true", help="centralized grid, no FedAvg")
    parser.add_argument("--grid-windows", type=int, nargs="+", default=[10, 20, 30])
    parser.add_argument("--grid-channels", type=int, nargs="+", default=[32, 64])
    parser.add_argument(
        "--grid-lrs", type=float, nargs="+", default=[0.001, 0.003, 0.01, 0.03, 0.05, 0.1]
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.grid:
        run_grid(args)
    else:
        run_comparison(args)


if __name__ == "__main__":
    main()
