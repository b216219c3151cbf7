"""Membership inference against the final global model, with and without record-level DP.

    .venv/bin/python -m bench.privacy.attack               # the measurement (~20 min, 1 core)
    .venv/bin/python -m bench.privacy.attack --quick       # smoke run (a few minutes)
    .venv/bin/python -m bench.privacy.attack --shadows 15 --out out/mia

Setup (see ``bench/privacy/attack.md`` for the reading of the results):

- The data pool is every training window of the demo's non-IID TEP split
  (``federated_split(6, seed=1)``), 8,716 windows at 6 sites.
- ``--shadows K`` gives M = K + 1 federations per setting. Model 0 is *the target*; every
  federation is trained exactly like it on its own random half of each site's windows
  (⌊n/2⌋ or ⌈n/2⌉ of the site's n, drawn independently per model), so every window is IN
  for about half of the models. The target's members are the windows IN model 0 (about
  4,358), its non-members the others, from the same sites and the same distribution.
- A federation is FedAvg over the 6 sites: every round each site trains the product's
  :func:`train_locally` (or :func:`train_locally_private`, Opacus DP-SGD) from the global
  weights with the round's plan (``RoundSettings.plan_for``: lr · decay^(round−1)), and the
  global model moves by the coordinator's :func:`weighted_mean_delta` (weights = windows).
  With DP each site uses σ = :func:`noise_multiplier_for` with ``planned_rounds`` = the
  run's rounds, δ = ``--delta``, clip C = ``--clip``; ε spent is :func:`epsilon` of the
  site's history (the steps Opacus actually took), and a setting's ε is the maximum over
  sites (and over its M federations).
- Attacks on a target model t, all scores "higher ⇒ member" (``bench/privacy/mia.py``):
  ``loss`` (Yeom: −cross-entropy), ``lira-online`` and ``lira-offline`` (Carlini et al.
  2022: per-window Gaussians of the logit-scaled confidence over the other M − 1 models,
  IN and OUT, with global variances). Shadows are trained the same way as the target,
  so the DP target is attacked with DP shadows.
- Two evaluations per attack: ``target`` = model 0 alone (≈4,358 members and as many
  non-members), and ``all M`` = every model attacked in turn with the other M − 1 as its
  shadows, scores pooled (Carlini et al.'s protocol; M times the examples, so the 0.1 %
  FPR point rests on ~M·4.4 false positives instead of ~4.4). Intervals are 95 %
  percentile bootstraps (``--bootstrap`` resamples, seed 0): stratified over examples for
  ``target``, over windows (all of a window's M scores together) for ``all M``.
- Bound: TPR ≤ e^ε · FPR + δ with the setting's ε spent (``bound@…`` columns); the ROC
  figure also draws it.

Outputs in ``--out`` (default ``out/bench-privacy``): ``attack.json`` (rows, settings,
sizes, timings) and ``attack_roc.png`` (pooled ROC curves, log-log, with the bounds).
Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from fedgate_agent.datasets.tep import FederatedSplit, federated_split
from fedgate_agent.model import build_model, load_weights, weights_of
from fedgate_agent.private_training import train_locally_private
from fedgate_agent.record_privacy import (
    Accountant as AccountantKind,
)
from fedgate_agent.record_privacy import (
    RecordPrivacySettings,
    RoundSpend,
    epsilon,
    noise_multiplier_for,
    sample_rate,
    steps_per_round,
)
from fedgate_agent.training import LocalDataset, evaluate, train_locally
from fedgate_common.model_spec import ModelSpec, initial_weights
from fedgate_common.text_table import format_table
from fedgate_coordinator.aggregation import apply_delta, weighted_mean_delta
from fedgate_coordinator.rounds import RoundSettings

from bench.fedavg_sim import Weights, is_finite
from bench.privacy.mia import (
    AttackMetrics,
    BoolArray,
    FloatArray,
    attack_metrics,
    cross_entropy,
    dp_tpr_bound,
    lira_scores,
    loss_scores,
    true_class_log_odds,
)
from bench.privacy.public_pretraining import load_pretrained

N_SITES = 6
SPLIT_SEED = 1
FPRS = (0.01, 0.001)
ATTACKS = ("loss", "lira-online", "lira-offline")
# attack.md's tables were measured with the RDP accountant; they stay reproducible with it
# (the agent's default, PLD, would give each ε a little less noise).
ATTACK_ACCOUNTANT: AccountantKind = "rdp"


def progress(message: str) -> None:
    print(f"[attack {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def quiet_opacus() -> None:
    import warnings

    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    warnings.filterwarnings("ignore", message="Secure RNG turned off")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Setting:
    """One way of training the federations: a plan, a number of rounds, DP or not."""

    name: str
    description: str
    learning_rate: float
    lr_decay: float
    local_epochs: int
    batch_size: int
    rounds: int
    target_epsilon: float | None = None  # None: no DP
    max_grad_norm: float | None = None
    delta: float = 1e-5

    def plan(self) -> RoundSettings:
        return RoundSettings(
            learning_rate=self.learning_rate,
            lr_decay=self.lr_decay,
            momentum=0.9,
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
        )

    def privacy(self) -> RecordPrivacySettings | None:
        if self.target_epsilon is None or self.max_grad_norm is None:
            return None
        return RecordPrivacySettings(
            target_epsilon=self.target_epsilon,
            delta=self.delta,
            max_grad_norm=self.max_grad_norm,
            planned_rounds=self.rounds,
            accountant=ATTACK_ACCOUNTANT,
        )


# --------------------------------------------------------------------------- membership


def random_halves(n_models: int, n: int, rng: np.random.Generator) -> BoolArray:
    """``(n_models, n)`` IN flags: every model independently takes a uniformly random
    subset of ⌊n/2⌋ or ⌈n/2⌉ of the ``n`` windows.

    Independence matters: with an exactly balanced design (every window IN for M/2 of the
    M models) and few models, a window IN the target is IN one shadow fewer than a window
    OUT of it, and online LiRA's score then depends on that count, not on the target;
    with M = 8 it pushed the AUC measurably below 0.5. Fixed sizes keep the number of
    distinct per-site training-set sizes (hence σ computations) at two per site.
    """
    flags = np.zeros((n_models, n), dtype=np.bool_)
    for model in range(n_models):
        flags[model, rng.permutation(n)[: (n + int(rng.integers(0, 2))) // 2]] = True
    return flags


# --------------------------------------------------------------------------- training


@dataclass
class Accountant:
    """ε of a site's history. Rounds with the same (σ, q) compose by adding steps (RDP is
    additive), so the history is merged before Opacus's accountant sees it: the same ε,
    computed once instead of once per round."""

    delta: float
    cache: dict[tuple[tuple[float, float, int], ...], float] = field(default_factory=dict)
    sigma_cache: dict[tuple[float, float, int, int, int], float] = field(default_factory=dict)

    def epsilon(self, history: Sequence[RoundSpend]) -> float:
        merged: dict[tuple[float, float], int] = {}
        for spend in history:
            key = (spend.noise_multiplier, spend.sample_rate)
            merged[key] = merged.get(key, 0) + spend.steps
        signature = tuple(sorted((s, q, t) for (s, q), t in merged.items()))
        if signature not in self.cache:
            self.cache[signature] = epsilon(
                [
                    RoundSpend(round=i + 1, noise_multiplier=s, sample_rate=q, steps=t)
                    for i, (s, q, t) in enumerate(signature)
                ],
                self.delta,
                accountant=ATTACK_ACCOUNTANT,
            )
        return self.cache[signature]

    def sigma(self, settings: RecordPrivacySettings, n: int, batch: int, epochs: int) -> float:
        key = (settings.target_epsilon, settings.delta, n, batch, epochs)
        if key not in self.sigma_cache:
            rate = sample_rate(n, batch)
            steps = steps_per_round(n, batch, epochs)
            self.sigma_cache[key] = noise_multiplier_for(settings, sample_rate=rate, steps=steps)
        return self.sigma_cache[key]


@dataclass(frozen=True)
class Federation:
    weights: Weights
    epsilon: float  # max over sites (0 without DP)
    sigma: float  # max over sites (0 without DP)
    rounds_aborted: int
    seconds: float


def train_federation(
    sites: Sequence[LocalDataset],
    spec: ModelSpec,
    setting: Setting,
    *,
    seed: int,
    accountant: Accountant,
    initial: Weights | None = None,
) -> Federation:
    """FedAvg over ``sites`` from the genesis of ``seed``, or from ``initial`` (a
    pre-trained genesis) when given (see the module docstring)."""
    started = time.perf_counter()
    plan = setting.plan()
    privacy = setting.privacy()
    global_weights: Weights = (
        initial_weights(spec, np.random.default_rng(seed)) if initial is None else initial
    )
    model = build_model(spec, weights=global_weights)
    histories: list[list[RoundSpend]] = [[] for _ in sites]
    sigmas = [
        accountant.sigma(privacy, len(site), plan.batch_size, plan.local_epochs)
        if privacy is not None
        else 0.0
        for site in sites
    ]
    aborted = 0
    for round_number in range(1, setting.rounds + 1):
        round_plan = plan.plan_for(round_number)
        contributions: list[tuple[int, Weights]] = []
        for index, site in enumerate(sites):
            load_weights(model, global_weights)
            site_seed = seed * 1_000_003 + round_number * 1_000 + index
            if privacy is not None:
                private = train_locally_private(
                    model,
                    site,
                    round_plan,
                    noise_multiplier=sigmas[index],
                    max_grad_norm=privacy.max_grad_norm,
                    seed=site_seed,
                )
                histories[index].append(
                    RoundSpend(
                        round=round_number,
                        noise_multiplier=private.noise_multiplier,
                        sample_rate=private.sample_rate,
                        steps=private.steps,
                    )
                )
                result = private.result
            else:
                result = train_locally(model, site, round_plan, seed=site_seed)
            trained = weights_of(model)
            delta = {name: trained[name] - global_weights[name] for name in global_weights}
            if math.isfinite(result.mean_loss) and is_finite(delta):
                contributions.append((result.num_samples, delta))
        candidate = (
            apply_delta(global_weights, weighted_mean_delta(contributions))
            if len(contributions) >= plan.min_participants
            else None
        )
        if candidate is None or not is_finite(candidate):
            aborted += 1  # the coordinator aborts the round: global model unchanged
        else:
            global_weights = candidate
    spent = max((accountant.epsilon(h) for h in histories if h), default=0.0)
    return Federation(
        weights=global_weights,
        epsilon=spent,
        sigma=max(sigmas),
        rounds_aborted=aborted,
        seconds=time.perf_counter() - started,
    )


def pool_logits(spec: ModelSpec, weights: Weights, x: npt.NDArray[np.float32]) -> FloatArray:
    model = build_model(spec, weights=weights)
    model.eval()
    parts: list[FloatArray] = []
    with torch.inference_mode():
        for start in range(0, len(x), 1024):
            batch = torch.from_numpy(np.ascontiguousarray(x[start : start + 1024]))
            parts.append(model(batch).numpy().astype(np.float64))
    return np.concatenate(parts)


@dataclass
class Trained:
    """Per model m of a setting: φ and loss on every pool window, test accuracy, ε."""

    setting: Setting
    phi: FloatArray  # (M, n_pool)
    loss: FloatArray  # (M, n_pool)
    accuracy: list[float]
    train_accuracy: list[float]  # on the model's own members
    heldout_accuracy: list[float]  # on the pool windows it did not train on
    epsilon: list[float]
    sigma: list[float]
    aborted: list[int]
    seconds: float


def train_setting(
    setting: Setting,
    split: FederatedSplit,
    site_membership: Sequence[BoolArray],
    pool: LocalDataset,
    accountant: Accountant,
    seed: int,
    initial: Weights | None = None,
) -> Trained:
    n_models = site_membership[0].shape[0]
    membership = np.concatenate(site_membership, axis=1)
    phi = np.empty((n_models, len(pool)))
    loss = np.empty((n_models, len(pool)))
    accuracy: list[float] = []
    train_accuracy: list[float] = []
    heldout_accuracy: list[float] = []
    epsilons: list[float] = []
    sigmas: list[float] = []
    aborted: list[int] = []
    started = time.perf_counter()
    for m in range(n_models):
        sites = [
            LocalDataset(x=site.x[flags[m]], y=site.y[flags[m]])
            for site, flags in zip(split.sites, site_membership, strict=True)
        ]
        federation = train_federation(
            sites,
            split.spec,
            setting,
            seed=seed * 10_000 + m,
            accountant=accountant,
            initial=initial,
        )
        logits = pool_logits(split.spec, federation.weights, pool.x)
        phi[m] = true_class_log_odds(logits, pool.y)
        loss[m] = cross_entropy(logits, pool.y)
        correct = logits.argmax(axis=1) == pool.y
        test = evaluate(build_model(split.spec, weights=federation.weights), split.test)
        accuracy.append(test.accuracy)
        train_accuracy.append(float(correct[membership[m]].mean()))
        heldout_accuracy.append(float(correct[~membership[m]].mean()))
        epsilons.append(federation.epsilon)
        sigmas.append(federation.sigma)
        aborted.append(federation.rounds_aborted)
        spent = f", ε {federation.epsilon:.3f} (σ {federation.sigma:.3f})" if sigmas[-1] else ""
        progress(
            f"{setting.name}: model {m + 1}/{n_models} ({'target' if m == 0 else 'shadow'}) "
            f"test acc {test.accuracy:.3f}, members acc {train_accuracy[-1]:.3f}, "
            f"non-members acc {heldout_accuracy[-1]:.3f}{spent}, {federation.seconds:.1f}s"
        )
    return Trained(
        setting=setting,
        phi=phi,
        loss=loss,
        accuracy=accuracy,
        train_accuracy=train_accuracy,
        heldout_accuracy=heldout_accuracy,
        epsilon=epsilons,
        sigma=sigmas,
        aborted=aborted,
        seconds=time.perf_counter() - started,
    )


# --------------------------------------------------------------------------- attacks


def attack_scores(attack: str, trained: Trained, membership: BoolArray, target: int) -> FloatArray:
    if attack == "loss":
        return loss_scores(trained.loss[target])
    others = np.arange(len(membership)) != target
    return lira_scores(
        trained.phi[target],
        trained.phi[others],
        membership[others],
        online=attack == "lira-online",
        global_variance=True,
    )


@dataclass(frozen=True)
class Row:
    setting: str
    description: str
    epsilon: float | None  # ε spent, max over sites and models; None without DP
    test_accuracy: float  # the target's (model 0)
    test_accuracy_mean: float  # over the M models
    attack: str
    evaluation: str  # "target" or "all M"
    n_members: int
    n_nonmembers: int
    auc: tuple[float, float, float]
    tpr_1pct: tuple[float, float, float]
    tpr_01pct: tuple[float, float, float]
    resolvable_01pct: bool
    bound_1pct: float | None
    bound_01pct: float | None


def metrics_row(trained: Trained, attack: str, evaluation: str, metrics: AttackMetrics) -> Row:
    setting = trained.setting
    spent = max(trained.epsilon) if setting.target_epsilon is not None else None

    def triple(fpr: float) -> tuple[float, float, float]:
        value = metrics.tpr[fpr]
        return (value.estimate, value.low, value.high)

    return Row(
        setting=setting.name,
        description=setting.description,
        epsilon=spent,
        test_accuracy=trained.accuracy[0],
        test_accuracy_mean=float(np.mean(trained.accuracy)),
        attack=attack,
        evaluation=evaluation,
        n_members=metrics.n_members,
        n_nonmembers=metrics.n_nonmembers,
        auc=(metrics.auc.estimate, metrics.auc.low, metrics.auc.high),
        tpr_1pct=triple(0.01),
        tpr_01pct=triple(0.001),
        resolvable_01pct=metrics.resolvable[0.001],
        bound_1pct=None if spent is None else dp_tpr_bound(0.01, spent, setting.delta),
        bound_01pct=None if spent is None else dp_tpr_bound(0.001, spent, setting.delta),
    )


def run_attacks(
    trained: Trained, membership: BoolArray, resamples: int
) -> tuple[list[Row], dict[str, AttackMetrics]]:
    rows: list[Row] = []
    pooled_metrics: dict[str, AttackMetrics] = {}
    n_models, n_pool = membership.shape
    for attack in ATTACKS:
        scores = [attack_scores(attack, trained, membership, t) for t in range(n_models)]
        target = attack_metrics(scores[0], membership[0], fprs=FPRS, resamples=resamples)
        rows.append(metrics_row(trained, attack, "target", target))
        pooled = attack_metrics(
            np.concatenate(scores),
            membership.reshape(-1),
            fprs=FPRS,
            resamples=resamples,
            groups=np.tile(np.arange(n_pool), n_models),
        )
        rows.append(metrics_row(trained, attack, f"all {n_models}", pooled))
        pooled_metrics[attack] = pooled
        progress(
            f"{trained.setting.name} {attack}: target AUC {target.auc}, "
            f"TPR@0.1% {target.tpr[0.001]}; all {n_models}: AUC {pooled.auc}, "
            f"TPR@0.1% {pooled.tpr[0.001]}"
        )
    return rows, pooled_metrics


# --------------------------------------------------------------------------- output


def ci(values: tuple[float, float, float], digits: int = 3) -> str:
    estimate, low, high = values
    return f"{estimate:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def print_table(rows: Sequence[Row]) -> None:
    headers = [
        "setting",
        "ε spent",
        "test acc",
        "attack",
        "eval",
        "AUC [95% CI]",
        "TPR@1% [95% CI]",
        "TPR@0.1% [95% CI]",
        "bound@1%",
        "bound@0.1%",
    ]
    body = [
        [
            row.setting,
            "-" if row.epsilon is None else f"{row.epsilon:.2f}",
            f"{row.test_accuracy:.3f}",
            row.attack,
            row.evaluation,
            ci(row.auc),
            ci(row.tpr_1pct),
            ci(row.tpr_01pct, 4) + ("" if row.resolvable_01pct else " (<1/N)"),
            "-" if row.bound_1pct is None else f"{row.bound_1pct:.4f}",
            "-" if row.bound_01pct is None else f"{row.bound_01pct:.4f}",
        ]
        for row in rows
    ]
    print(format_table(headers, body), flush=True)


def plot_roc(
    path: Path, curves: dict[str, dict[str, AttackMetrics]], settings: Sequence[Trained]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ATTACKS), figsize=(5.2 * len(ATTACKS), 5.0), sharey=True)
    grid = np.logspace(-5, 0, 400)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, attack in zip(axes, ATTACKS, strict=True):
        for index, trained in enumerate(settings):
            name = trained.setting.name
            metrics = curves[name][attack]
            colour = colours[index % len(colours)]
            spent = max(trained.epsilon) if trained.setting.target_epsilon is not None else None
            label = name if spent is None else f"{name} (ε {spent:.2f})"
            fpr, tpr = metrics.roc.fpr, metrics.roc.tpr
            axis.plot(
                np.clip(fpr, 1e-5, 1),
                np.clip(tpr, 1e-5, 1),
                color=colour,
                label=f"{label}: AUC {metrics.auc.estimate:.3f}",
            )
            if spent is not None:
                bound = [dp_tpr_bound(float(a), spent, trained.setting.delta) for a in grid]
                axis.plot(grid, bound, color=colour, linestyle="--", linewidth=0.9)
        axis.plot(grid, grid, color="grey", linestyle=":", linewidth=0.9, label="chance")
        n_neg = next(iter(curves.values()))[attack].n_nonmembers
        axis.axvline(1 / n_neg, color="grey", linewidth=0.6)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlim(1e-5, 1)
        axis.set_ylim(1e-5, 1)
        axis.set_xlabel("false-positive rate")
        axis.set_title(f"{attack} (all models as targets, pooled)")
        axis.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("true-positive rate")
    fig.suptitle(
        "Membership inference on the TEP federation; dashed: DP bound e^ε·FPR + δ; "
        "vertical line: FPR = 1/N non-members",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def build_settings(args: argparse.Namespace) -> list[Setting]:
    settings = [
        Setting(
            name="no-dp",
            description=(
                f"plain FedAvg, lr {args.lr:g} (decay {args.decay:g}/round), batch "
                f"{args.batch_size}, {args.local_epochs} local epochs, {args.rounds} rounds"
            ),
            learning_rate=args.lr,
            lr_decay=args.decay,
            local_epochs=args.local_epochs,
            batch_size=args.batch_size,
            rounds=args.rounds,
        )
    ]
    if args.overfit_local_epochs > 0:
        settings.append(
            Setting(
                name="no-dp-overfit",
                description=(
                    f"EXTRA, deliberately overfit: plain FedAvg, lr {args.overfit_lr:g} "
                    f"(no decay), batch {args.overfit_batch_size}, "
                    f"{args.overfit_local_epochs} local epochs, {args.rounds} rounds"
                ),
                learning_rate=args.overfit_lr,
                lr_decay=1.0,
                local_epochs=args.overfit_local_epochs,
                batch_size=args.overfit_batch_size,
                rounds=args.rounds,
            )
        )
    if args.dp_plan_control:
        settings.append(
            Setting(
                name="dp-plan-no-noise",
                description=(
                    "control: the DP rows' plan without clipping or noise "
                    f"(lr {args.dp_lr:g}, batch {args.dp_batch_size}, "
                    f"{args.dp_local_epochs} local epochs)"
                ),
                learning_rate=args.dp_lr,
                lr_decay=args.decay,
                local_epochs=args.dp_local_epochs,
                batch_size=args.dp_batch_size,
                rounds=args.rounds,
            )
        )
    for target in sorted(args.epsilons, reverse=True):
        settings.append(
            Setting(
                name=f"dp-eps{target:g}",
                description=(
                    f"record-level DP-SGD, target ε {target:g} at δ {args.delta:g}, clip "
                    f"{args.clip:g}, lr {args.dp_lr:g} (decay {args.decay:g}/round), batch "
                    f"{args.dp_batch_size}, {args.dp_local_epochs} local epochs, "
                    f"{args.rounds} rounds"
                ),
                learning_rate=args.dp_lr,
                lr_decay=args.decay,
                local_epochs=args.dp_local_epochs,
                batch_size=args.dp_batch_size,
                rounds=args.rounds,
                target_epsilon=target,
                max_grad_norm=args.clip,
                delta=args.delta,
            )
        )
    return settings


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Membership inference (loss threshold, LiRA) against the final global "
        "model of a TEP federation, with and without record-level DP."
    )
    parser.add_argument("--quick", action="store_true", help="small smoke run (minutes)")
    parser.add_argument("--shadows", type=int, default=None, help="shadow federations (7)")
    parser.add_argument("--out", type=Path, default=Path("out/bench-privacy"))
    parser.add_argument("--rounds", type=int, default=None, help="FedAvg rounds (10)")
    parser.add_argument("--lr", type=float, default=0.02, help="no-DP learning rate")
    parser.add_argument("--decay", type=float, default=0.98, help="lr decay per round")
    parser.add_argument("--local-epochs", type=int, default=2, help="no-DP local epochs")
    parser.add_argument("--batch-size", type=int, default=32, help="no-DP batch size")
    parser.add_argument("--dp-lr", type=float, default=1.0)
    parser.add_argument("--dp-local-epochs", type=int, default=3)
    parser.add_argument("--dp-batch-size", type=int, default=256)
    parser.add_argument("--clip", type=float, default=1.0, help="DP max_grad_norm")
    parser.add_argument("--epsilons", type=float, nargs="*", default=[3.0, 8.0])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument(
        "--overfit-local-epochs",
        type=int,
        default=None,
        help="local epochs of the extra deliberately overfit no-DP row (0: no such row)",
    )
    parser.add_argument("--overfit-lr", type=float, default=0.05)
    parser.add_argument("--overfit-batch-size", type=int, default=16)
    parser.add_argument(
        "--dp-plan-control",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="add the DP plan trained without clipping/noise as a control row",
    )
    parser.add_argument(
        "--stride",
        type=int,
        default=2,
        help="window stride of the TEP split (2: the demo's; 20 = the window: no two "
        "windows share a sample)",
    )
    parser.add_argument(
        "--genesis-weights",
        type=Path,
        default=None,
        help="start every federation from this pre-trained genesis (a `fedgate-agent "
        "pretrain` file for the split's model spec) instead of random weights",
    )
    parser.add_argument("--bootstrap", type=int, default=None, help="resamples (1000)")
    parser.add_argument("--seed", type=int, default=0, help="membership and training seed")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    quick_or = {  # (full, --quick)
        "shadows": (7, 3),
        "rounds": (10, 4),
        "bootstrap": (1000, 200),
        "overfit_local_epochs": (0, 0),
    }
    for name, (full, quick) in quick_or.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.shadows < 3:
        parser.error("--shadows must be at least 3 (LiRA fits IN and OUT per window)")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_opacus()
    started = time.perf_counter()
    command = " ".join(
        [".venv/bin/python -m bench.privacy.attack", *map(shlex.quote, sys.argv[1:])]
    )
    split = federated_split(N_SITES, seed=SPLIT_SEED, stride=args.stride)
    pool = LocalDataset(
        x=np.concatenate([site.x for site in split.sites]),
        y=np.concatenate([site.y for site in split.sites]),
    )
    n_models = args.shadows + 1
    rng = np.random.default_rng(args.seed)
    site_membership = [random_halves(n_models, len(site), rng) for site in split.sites]
    membership = np.concatenate(site_membership, axis=1)
    progress(
        f"pool {len(pool)} windows at {N_SITES} sites {[len(s) for s in split.sites]}; "
        f"{n_models} federations per setting (target + {args.shadows} shadows); target "
        f"members {int(membership[0].sum())}, non-members {int((~membership[0]).sum())}; "
        f"test set {len(split.test)}; {torch.get_num_threads()} thread(s)"
    )
    initial = None
    if args.genesis_weights is not None:
        initial = load_pretrained(args.genesis_weights, split.spec)
        progress(
            f"genesis: pre-trained {args.genesis_weights} (test acc "
            f"{evaluate(build_model(split.spec, weights=initial), split.test).accuracy:.3f})"
        )
    settings = build_settings(args)
    accountant = Accountant(delta=args.delta)
    rows: list[Row] = []
    curves: dict[str, dict[str, AttackMetrics]] = {}
    trained_all: list[Trained] = []
    for setting in settings:
        progress(f"{setting.name}: {setting.description}")
        trained = train_setting(
            setting, split, site_membership, pool, accountant, args.seed, initial
        )
        trained_all.append(trained)
        new_rows, pooled = run_attacks(trained, membership, args.bootstrap)
        rows.extend(new_rows)
        curves[setting.name] = pooled
    wall = time.perf_counter() - started
    print(f"\n{command}\nwall time {wall:.0f} s\n")
    for trained in trained_all:
        eps = (
            f", ε spent ≤ {max(trained.epsilon):.3f} (target {trained.setting.target_epsilon:g}),"
            f" σ {min(trained.sigma):.3f}..{max(trained.sigma):.3f}"
            if trained.setting.target_epsilon is not None
            else ""
        )
        print(
            f"{trained.setting.name}: {trained.setting.description}; test acc target "
            f"{trained.accuracy[0]:.3f}, mean of {len(trained.accuracy)} "
            f"{np.mean(trained.accuracy):.3f}; pool acc members "
            f"{np.mean(trained.train_accuracy):.3f} / non-members "
            f"{np.mean(trained.heldout_accuracy):.3f}{eps}; {trained.seconds:.0f} s"
        )
    print()
    print_table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "command": command,
        "wall_seconds": wall,
        "pool_windows": len(pool),
        "site_windows": [len(site) for site in split.sites],
        "test_windows": len(split.test),
        "genesis_weights": None if args.genesis_weights is None else str(args.genesis_weights),
        "models_per_setting": n_models,
        "bootstrap_resamples": args.bootstrap,
        "confidence": 0.95,
        "settings": [
            {
                **asdict(t.setting),
                "test_accuracy": t.accuracy,
                "member_accuracy": t.train_accuracy,
                "nonmember_accuracy": t.heldout_accuracy,
                "epsilon_spent": t.epsilon,
                "sigma": t.sigma,
                "rounds_aborted": t.aborted,
                "seconds": t.seconds,
            }
            for t in trained_all
        ],
        "rows": [asdict(row) for row in rows],
    }
    (args.out / "attack.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_roc(args.out / "attack_roc.png", curves, trained_all)
    progress(f"wrote {args.out / 'attack.json'} and {args.out / 'attack_roc.png'}")


if __name__ == "__main__":
    main()
