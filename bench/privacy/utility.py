"""What record-level DP costs the demo federation in TEP test accuracy.

    .venv/bin/python -m bench.privacy.utility                      # seeds 1 2 3, full
    .venv/bin/python -m bench.privacy.utility --quick              # seed 1, 10 rounds
    .venv/bin/python -m bench.privacy.utility --seeds 1 --out out/x

Rows (see README.md): centralized (default plan), plain FedAvg with the coordinator's
default plan, plain FedAvg with the DP plan (= ε ∞), and FedAvg with record-level DP on
every site at each ε of ``--epsilons`` with the DP plan and clip. Seed s is the split seed
and the genesis seed. Writes ``utility.json`` and ``utility.png`` into ``--out``; progress
goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from fedgate_agent.record_privacy import (
    ACCOUNTANTS,
    DEFAULT_ACCOUNTANT,
    Accountant,
    as_accountant,
)
from fedgate_agent.training import LocalDataset
from fedgate_common.text_table import format_table
from fedgate_coordinator.rounds import RoundSettings

from bench.privacy.federation import (
    DEFAULT_PLAN,
    DP_CLIP,
    DP_PLAN,
    DP_ROUNDS,
    RecordDp,
    demo_split,
    genesis,
    memoize_accountant,
    quiet_opacus,
    run_centralized,
    run_fedavg,
    score,
)
from bench.privacy.public_pretraining import load_or_simulate, pretrain, public_windows

DEMO_ROUNDS = 20
DEMO_WINDOW = 20
QUICK_ROUNDS = 10


@dataclass(frozen=True)
class Row:
    method: str
    plan: str  # "default" or "dp"
    epsilon: float  # target ε; math.inf without DP
    seed: int
    rounds: int
    accuracy: float
    epsilon_spent: float  # max over sites; 0 without DP
    noise_multiplier: float  # max over sites; 0 without DP
    min_rounds_trained: int  # fewest rounds any site trained (budget refusals); = rounds
    seconds: float


def _plan_text(plan: RoundSettings) -> str:
    return (
        f"lr {plan.learning_rate:g}, decay {plan.lr_decay:g}/round, momentum {plan.momentum:g}, "
        f"{plan.local_epochs} local epoch(s), batch {plan.batch_size}"
    )


def _log(message: str) -> None:
    print(f"[utility {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_seed(
    seed: int,
    *,
    default_rounds: int,
    dp_rounds: int,
    epsilons: Sequence[float],
    clip: float,
    stride: int = 2,
    accountant: Accountant = DEFAULT_ACCOUNTANT,
    public: LocalDataset | None = None,
    jobs: int = 1,
) -> list[Row]:
    """Every row for one seed; with ``public`` windows, every row starts from the genesis
    of ``seed`` pre-trained on them (public_pretraining.py) instead of the genesis itself.
    ``jobs`` > 1 trains the federations' sites in that many processes (same results)."""
    split = demo_split(seed, stride)
    rows: list[Row] = []

    def log(text: str) -> None:
        _log(f"seed {seed}: {text}")

    initial = None
    if public is not None:
        initial = pretrain(split.spec, genesis(split, seed), public, seed=seed)
        accuracy = score(split, initial)[0]
        log(f"pre-trained on {len(public)} public windows: test accuracy {accuracy:.4f}")
    log("centralized, default plan")
    central = run_centralized(
        split, DEFAULT_PLAN, rounds=default_rounds, seed=seed, initial=initial
    )
    rows.append(
        Row(
            "centralized",
            "default",
            math.inf,
            seed,
            default_rounds,
            central.accuracy,
            0.0,
            0.0,
            default_rounds,
            central.seconds,
        )
    )
    log(f"  accuracy {central.accuracy:.4f} ({central.seconds:.0f} s)")
    for label, plan, rounds in (
        ("default", DEFAULT_PLAN, default_rounds),
        ("dp", DP_PLAN, dp_rounds),
    ):
        log(f"FedAvg, {label} plan, no DP")
        result = run_fedavg(split, plan, rounds=rounds, seed=seed, initial=initial, jobs=jobs)
        rows.append(
            Row(
                "fedavg",
                label,
                math.inf,
                seed,
                rounds,
                result.accuracy,
                0.0,
                0.0,
                min(result.rounds_trained),
                result.seconds,
            )
        )
        log(f"  accuracy {result.accuracy:.4f} ({result.seconds:.0f} s)")
    for target in epsilons:
        log(f"FedAvg, dp plan, record-level DP ε = {target:g} ({accountant}), C = {clip:g}")
        result = run_fedavg(
            split,
            DP_PLAN,
            rounds=dp_rounds,
            seed=seed,
            dp=RecordDp(target_epsilon=target, max_grad_norm=clip, accountant=accountant),
            initial=initial,
            jobs=jobs,
        )
        rows.append(
            Row(
                "fedavg+record-dp",
                "dp",
                target,
                seed,
                dp_rounds,
                result.accuracy,
                max(result.epsilon),
                max(result.noise_multiplier),
                min(result.rounds_trained),
                result.seconds,
            )
        )
        log(
            f"  accuracy {result.accuracy:.4f}, ε spent ≤ {max(result.epsilon):.3f}, "
            f"σ ≤ {max(result.noise_multiplier):.3f} ({result.seconds:.0f} s)"
        )
    return rows


def summarize(rows: Sequence[Row]) -> list[dict[str, object]]:
    groups: dict[tuple[str, str, float], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.method, row.plan, row.epsilon), []).append(row)
    summary: list[dict[str, object]] = []
    for (method, plan, target), mine in groups.items():
        accuracies = [row.accuracy for row in mine]
        summary.append(
            {
                "method": method,
                "plan": plan,
                "epsilon": None if math.isinf(target) else target,
                "seeds": [row.seed for row in mine],
                "accuracy": accuracies,
                "mean": statistics.fmean(accuracies),
                "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                "epsilon_spent_max": max(row.epsilon_spent for row in mine),
            }
        )
    return summary


def print_summary(summary: Sequence[dict[str, object]]) -> None:
    headers = ["method", "plan", "ε", "accuracy per seed", "mean", "std", "ε spent"]
    body = []
    for item in summary:
        target = item["epsilon"]
        accuracies = item["accuracy"]
        assert isinstance(accuracies, list)
        body.append(
            [
                str(item["method"]),
                str(item["plan"]),
                "∞" if target is None else f"{target:g}",
                " ".join(f"{a:.4f}" for a in accuracies),
                f"{item['mean']:.4f}",
                f"{item['std']:.4f}",
                f"{item['epsilon_spent_max']:.3f}",
            ]
        )
    print(format_table(headers, body))


def plot(summary: Sequence[dict[str, object]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp = [s for s in summary if s["method"] == "fedavg+record-dp"]
    no_dp = {(s["method"], s["plan"]): s for s in summary if s["epsilon"] is None}
    finite = sorted(float(s["epsilon"]) for s in dp)  # type: ignore[arg-type]
    at_inf = 2 * max(finite) if finite else 1.0
    xs = [float(s["epsilon"]) for s in dp]  # type: ignore[arg-type]
    means = [float(s["mean"]) for s in dp]  # type: ignore[arg-type]
    stds = [float(s["std"]) for s in dp]  # type: ignore[arg-type]
    plain_dp_plan = no_dp.get(("fedavg", "dp"))
    if plain_dp_plan is not None:
        xs.append(at_inf)
        means.append(float(plain_dp_plan["mean"]))  # type: ignore[arg-type]
        stds.append(float(plain_dp_plan["std"]))  # type: ignore[arg-type]
    order = sorted(range(len(xs)), key=xs.__getitem__)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.errorbar(
        [xs[i] for i in order],
        [means[i] for i in order],
        yerr=[stds[i] for i in order],
        marker="o",
        capsize=3,
        label="FedAvg + record-level DP (DP plan; ∞ = no noise)",
    )
    for (method, plan), style in (
        (("fedavg", "default"), "--"),
        (("centralized", "default"), ":"),
    ):
        item = no_dp.get((method, plan))
        if item is not None:
            axes.axhline(
                float(item["mean"]),  # type: ignore[arg-type]
                linestyle=style,
                color="grey",
                label=f"{method}, {plan} plan, no DP",
            )
    axes.set_xscale("log")
    ticks = [*finite, at_inf]
    axes.set_xticks(ticks)
    axes.set_xticklabels([*(f"{x:g}" for x in finite), "∞"])
    axes.set_xlabel("record-level ε per site over the run (δ = 1e-5)")
    axes.set_ylabel("TEP test accuracy")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"first seed, {QUICK_ROUNDS} rounds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--clip", type=float, default=DP_CLIP, help="DP clip C (max_grad_norm)")
    parser.add_argument(
        "--stride", type=int, default=2, help="window stride (the demo's: 2; 1 doubles the data)"
    )
    parser.add_argument(
        "--accountant",
        choices=sorted(ACCOUNTANTS),
        default=DEFAULT_ACCOUNTANT,
        help="how the sites count ε (the agent's privacy.accountant; default %(default)s)",
    )
    parser.add_argument(
        "--public-seeds",
        type=int,
        default=0,
        help="pre-train every row's genesis on this many simulated TEP runs sets (0: none)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="train each round's sites in this many processes (the same figures; with 2 "
        "on 2 idle cores --quick's default-plan FedAvg took 52 s instead of 79 s)",
    )
    parser.add_argument("--out", type=Path, default=Path("out/bench-privacy"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    quiet_opacus()
    memoize_accountant()
    seeds = args.seeds[:1] if args.quick else args.seeds
    default_rounds = QUICK_ROUNDS if args.quick else DEMO_ROUNDS
    dp_rounds = QUICK_ROUNDS if args.quick else DP_ROUNDS
    _log(f"default plan: {_plan_text(DEFAULT_PLAN)}; {default_rounds} rounds")
    _log(f"DP plan: {_plan_text(DP_PLAN)}; {dp_rounds} rounds; clip {args.clip:g}")
    started = time.perf_counter()
    public = None
    if args.public_seeds > 0:
        runs = load_or_simulate(range(1, args.public_seeds + 1), args.out, _log)
        public = public_windows(runs, DEMO_WINDOW, args.stride)
    rows: list[Row] = []
    for seed in seeds:
        rows.extend(
            run_seed(
                seed,
                default_rounds=default_rounds,
                dp_rounds=dp_rounds,
                epsilons=args.epsilons,
                clip=args.clip,
                stride=args.stride,
                accountant=as_accountant(args.accountant),
                public=public,
                jobs=max(1, args.jobs),
            )
        )
    summary = summarize(rows)
    print_summary(summary)
    seconds = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    document = {
        "command": " ".join(sys.argv),
        "quick": args.quick,
        "seconds": seconds,
        "default_plan": {"rounds": default_rounds, **_plan_dict(DEFAULT_PLAN)},
        "dp_plan": {"rounds": dp_rounds, "clip": args.clip, **_plan_dict(DP_PLAN)},
        "accountant": args.accountant,
        "public_seeds": args.public_seeds,
        "rows": [
            {**asdict(row), "epsilon": None if math.isinf(row.epsilon) else row.epsilon}
            for row in rows
        ],
        "summary": summary,
    }
    (args.out / "utility.json").write_text(json.dumps(document, indent=2) + "\n")
    title = (
        f"TEP, 6 non-IID sites, seeds {' '.join(map(str, seeds))}\nDP plan: "
        f"{_plan_text(DP_PLAN)}, {dp_rounds} rounds, C {args.clip:g}"
    )
    plot(summary, args.out / "utility.png", title)
    _log(f"done in {seconds:.0f} s; wrote {args.out / 'utility.json'} and utility.png")


def _plan_dict(plan: RoundSettings) -> dict[str, float | int]:
    return {
        "learning_rate": plan.learning_rate,
        "lr_decay": plan.lr_decay,
        "momentum": plan.momentum,
        "local_epochs": plan.local_epochs,
        "batch_size": plan.batch_size,
    }


if __name__ == "__main__":
    main()
