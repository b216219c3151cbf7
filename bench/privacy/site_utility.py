"""What site-level DP costs in TEP test accuracy, for the demo's 6 sites and for 100 sites.

    .venv/bin/python -m bench.privacy.site_utility                 # 6 and 100 sites, full
    .venv/bin/python -m bench.privacy.site_utility --quick         # 6 sites, 3 rounds

For each federation size, in one run with the same split, genesis and seeds: centralized
training on the union, plain FedAvg (window-weighted, no clipping), and site-level DP
FedAvg (:mod:`bench.privacy.site_level`: every site weighs the same, updates clipped,
encoded, and noised by the agents) at each ε of ``--epsilons``; ε = inf clips and encodes
without noise. ε is the site-level budget of the whole run (``planned_rounds`` = rounds)
at δ = 1e-5, spent by the dp-accounting RDP accountant exactly as the coordinator books it.

The 6-site federation is the demo's split; the 100-site one is the same TEP training runs
split 100 ways (``federated_split(100, sites_per_fault=10)``: each fault's runs are cut
into 10 parts, so every site holds normal data and about two faults, 40 to 84 windows).
Noise shares are sized for ``min_participants`` (the demo's n − 2 for 6 sites, 80 % of
the sites for 100). ``--dp-local-epochs``, ``--dp-batch-size`` and ``--dp-learning-rate``
change the plan of the site-level DP rows only; centralized and plain FedAvg keep the
size's plan, so "below plain FedAvg" stays against the better baseline. Writes
``site_utility.json`` and ``site_utility.png`` into ``--out``; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import msgspec
import torch
from fedgate_agent.datasets.tep import FederatedSplit, federated_split
from fedgate_common.text_table import format_table
from fedgate_coordinator.rounds import RoundSettings
from fedgate_coordinator.site_privacy import noise_to_signal

from bench.privacy.federation import (
    DEFAULT_PLAN,
    genesis,
    run_centralized,
    run_fedavg,
    score,
    training_plan,
)
from bench.privacy.public_pretraining import load_pretrained
from bench.privacy.site_level import SiteDp, SiteDpAggregator

# Many small sites train few steps per round at the default plan: a larger learning rate
# and smaller batches make 20 rounds enough for plain FedAvg (the reference) to learn.
PLAN_100 = training_plan(
    learning_rate=0.05, lr_decay=0.98, momentum=0.9, local_epochs=5, batch_size=16
)


@dataclass(frozen=True)
class Row:
    sites: int
    method: str
    epsilon: float  # the site-level budget; inf without noise
    accuracy: float
    epsilon_spent: float
    noise_multiplier: float  # z of the round's shares (aggregate, at min_inputs)
    noise_to_signal: float  # z·√d / n: noise norm of the mean update in clip norms
    final_clip_norm: float
    seconds: float


@dataclass(frozen=True)
class PlanChange:
    """The site-level DP rows' plan: the size's plan with these fields replaced."""

    local_epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None

    def apply(self, plan: RoundSettings) -> RoundSettings:
        changes = {k: v for k, v in asdict(self).items() if v is not None}
        return msgspec.structs.replace(plan, **changes)


def split_for(sites: int, seed: int, channels: int = 64) -> FederatedSplit:
    if sites == 6:
        return federated_split(sites, seed=seed, channels=channels)  # the demo's split
    return federated_split(sites, seed=seed, sites_per_fault=10, channels=channels)


def plan_for(sites: int) -> RoundSettings:
    return DEFAULT_PLAN if sites <= 6 else PLAN_100


def min_participants_for(sites: int) -> int:
    return max(2, sites - 2) if sites <= 6 else math.ceil(0.8 * sites)


def progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def run_size(
    sites: int,
    epsilons: list[float],
    *,
    rounds: int,
    seed: int,
    clip: float,
    adaptive: bool,
    channels: int = 64,
    exact_noise: bool = False,
    genesis_weights: Path | None = None,
    dp_plan: PlanChange | None = None,
) -> list[Row]:
    """Centralized and plain FedAvg with the size's plan, then site-level DP at each ε with
    that plan changed by ``dp_plan`` (the baselines keep the plan they do best with)."""
    split = split_for(sites, seed, channels)
    plan = plan_for(sites)
    site_dp_plan = plan if dp_plan is None else dp_plan.apply(plan)
    initial = None if genesis_weights is None else load_pretrained(genesis_weights, split.spec)
    dimension = sum(int(v.size) for v in genesis(split, seed).values())
    rows: list[Row] = []
    if initial is not None:
        start = score(split, initial)[0]
        rows.append(Row(sites, "pre-trained genesis", math.inf, start, 0.0, 0.0, 0.0, 0.0, 0.0))
    print(f"[{sites} sites] centralized", file=sys.stderr, flush=True)
    central = run_centralized(split, plan, rounds=rounds, seed=seed, initial=initial)
    rows.append(
        Row(sites, "centralized", math.inf, central.accuracy, 0.0, 0.0, 0.0, 0.0, central.seconds)
    )
    print(f"[{sites} sites] plain FedAvg", file=sys.stderr, flush=True)
    plain = run_fedavg(split, plan, rounds=rounds, seed=seed, progress=progress, initial=initial)
    rows.append(Row(sites, "fedavg", math.inf, plain.accuracy, 0.0, 0.0, 0.0, 0.0, plain.seconds))
    for target in epsilons:
        label = "inf (clip only)" if math.isinf(target) else f"{target:g}"
        print(f"[{sites} sites] site-level DP, ε {label}", file=sys.stderr, flush=True)
        aggregator = SiteDpAggregator(
            SiteDp(
                target_epsilon=None if math.isinf(target) else target,
                clip_norm=clip,
                adaptive_clip=adaptive,
                min_participants=min_participants_for(sites),
                exact_noise=exact_noise,
            ),
            split.spec,
            rounds,
        )
        result = run_fedavg(
            split,
            site_dp_plan,
            rounds=rounds,
            seed=seed,
            aggregate=aggregator,
            min_participants=min_participants_for(sites),
            progress=progress,
            initial=initial,
        )
        z = aggregator.noise_multipliers[0] if aggregator.noise_multipliers else 0.0
        rows.append(
            Row(
                sites,
                "site-dp" + ("-adaptive" if adaptive else ""),
                target,
                result.accuracy,
                aggregator.epsilon if not math.isinf(target) else math.inf,
                z,
                noise_to_signal(z, dimension, sites),
                aggregator.clip_norms[-1] if aggregator.clip_norms else clip,
                result.seconds,
            )
        )
    return rows


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r.sites for r in rows})
    figure, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for axis, sites in zip(axes[0], sizes, strict=True):
        mine = [r for r in rows if r.sites == sites]
        dp = sorted((r for r in mine if r.method.startswith("site-dp")), key=lambda r: r.epsilon)
        finite = [r for r in dp if not math.isinf(r.epsilon)]
        axis.plot(
            [r.epsilon for r in finite], [r.accuracy for r in finite], "o-", label="site-level DP"
        )
        for r in mine:
            if r.method in ("fedavg", "centralized"):
                axis.axhline(
                    r.accuracy,
                    linestyle="--",
                    label=r.method,
                    color="C1" if r.method == "fedavg" else "C2",
                )
            elif r.method == "pre-trained genesis":
                axis.axhline(r.accuracy, linestyle="-.", label=r.method, color="C4")
            elif math.isinf(r.epsilon):
                axis.axhline(r.accuracy, linestyle=":", label="clip, no noise (ε ∞)", color="C3")
        axis.set_xscale("log")
        axis.set_xlabel("site-level ε (δ = 1e-5, whole run)")
        axis.set_ylabel("TEP test accuracy")
        axis.set_title(f"{sites} sites")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sites", type=int, nargs="+", default=[6, 100])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0, math.inf])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--clip", type=float, default=1.0, help="clip norm (initial, if adaptive)")
    parser.add_argument("--adaptive", action="store_true", help="adaptive clipping (median)")
    parser.add_argument(
        "--channels", type=int, default=64, help="model width (the demo's model: 64)"
    )
    parser.add_argument(
        "--exact-noise",
        action="store_true",
        help="draw shares with the product's exact discrete Gaussian sampler (slow)",
    )
    parser.add_argument(
        "--genesis-weights",
        type=Path,
        default=None,
        help="start every row from this pre-trained genesis (`fedgate-agent pretrain` for "
        "the split's model spec) instead of the random genesis of --seed",
    )
    parser.add_argument(
        "--dp-local-epochs", type=int, default=None, help="local epochs of the DP rows only"
    )
    parser.add_argument(
        "--dp-batch-size", type=int, default=None, help="batch size of the DP rows only"
    )
    parser.add_argument(
        "--dp-learning-rate", type=float, default=None, help="learning rate of the DP rows only"
    )
    parser.add_argument("--quick", action="store_true", help="6 sites, 3 rounds, ε 8 and inf")
    parser.add_argument("--out", type=Path, default=Path("out/bench-privacy"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.sites, args.rounds, args.epsilons = [6], 3, [8.0, math.inf]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows: list[Row] = []
    for sites in args.sites:
        rows.extend(
            run_size(
                sites,
                args.epsilons,
                rounds=args.rounds,
                seed=args.seed,
                clip=args.clip,
                adaptive=args.adaptive,
                channels=args.channels,
                exact_noise=args.exact_noise,
                genesis_weights=args.genesis_weights,
                dp_plan=PlanChange(
                    local_epochs=args.dp_local_epochs,
                    batch_size=args.dp_batch_size,
                    learning_rate=args.dp_learning_rate,
                ),
            )
        )
    headers = ["sites", "method", "ε target", "accuracy", "ε spent", "z", "noise/clip", "clip", "s"]
    table = [
        [
            r.sites,
            r.method,
            r.epsilon,
            round(r.accuracy, 4),
            r.epsilon_spent,
            round(r.noise_multiplier, 3),
            round(r.noise_to_signal, 3),
            round(r.final_clip_norm, 3),
            round(r.seconds, 1),
        ]
        for r in rows
    ]
    print(format_table(headers, table))
    for sites in args.sites:
        plain = next(r for r in rows if r.sites == sites and r.method == "fedavg")
        for r in rows:
            if r.sites == sites and r.method.startswith("site-dp"):
                print(
                    f"{sites} sites, ε {r.epsilon:g}: "
                    f"{100 * (plain.accuracy - r.accuracy):+.1f} points below plain FedAvg"
                )
    (args.out / "site_utility.json").write_text(
        json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "rows": [asdict(r) for r in rows]},
            indent=2,
        )
    )
    plot(rows, args.out / "site_utility.png")
    print(
        f"wrote {args.out / 'site_utility.json'} and site_utility.png "
        f"in {time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
