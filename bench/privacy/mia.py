"""Membership-inference attack math: scores, ROC metrics, bootstrap intervals, the DP bound.

No IO, no torch, no plotting: arrays in, arrays and numbers out. ``bench/privacy/attack.py``
trains the models and calls this.

Scores are oriented so that **higher means "member"**.

- Loss threshold (Yeom et al. 2018): score = −cross-entropy of the true class.
- LiRA (Carlini et al. 2022, "Membership Inference Attacks From First Principles"): the
  statistic is the logit-scaled confidence of the true class, φ = log(p_y / (1 − p_y)).
  Shadow models, each trained on a random half of the data pool, give for every example
  its φ when the example was IN a shadow's training set and when it was OUT. Those are
  fitted with Gaussians (a variance pooled over all examples when there are few shadows,
  as the paper recommends below 64) and the target model's φ is scored with

  - online: log N(φ; μ_in, σ_in²) − log N(φ; μ_out, σ_out²), the likelihood ratio;
  - offline: (φ − μ_out) / σ_out, a one-sided test against the OUT distribution only
    (monotone in the paper's 1 − Pr[Z > φ], Z ~ N(μ_out, σ_out²)).

ROC: one point per distinct score (ties form one step, i.e. randomised tie-breaking), so
the curve is the convex-by-segments interpolation a randomised threshold achieves. TPR at
a target FPR α interpolates linearly on the segment that crosses α (taking the highest TPR
when the curve is vertical at α). With N non-members the smallest FPR a deterministic
threshold can show is 1/N; below it the value rests on zero false positives.

Confidence intervals: percentile bootstrap over examples, members and non-members resampled
separately (stratified), with a fixed seed. They capture the sampling of the evaluated
examples, not the randomness of training the target model.

The DP bound: if training is (ε, δ)-DP with respect to one record, any membership test on
that record satisfies TPR ≤ e^ε · FPR + δ, and, applied to the complementary test,
TPR ≤ 1 − e^(−ε) · (1 − δ − FPR) (Kairouz, Oh, Viswanath 2015). Both are linear in
(FPR, TPR), so they hold too for an ROC averaged over examples with one shared threshold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "AttackMetrics",
    "Interval",
    "Roc",
    "attack_metrics",
    "auc",
    "balanced_membership",
    "cross_entropy",
    "dp_tpr_bound",
    "dp_tpr_bound_tight",
    "lira_scores",
    "loss_scores",
    "roc_curve",
    "tpr_at_fpr",
    "true_class_log_odds",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]

# Floor of a fitted standard deviation (φ is in nats; shadows that agree exactly would
# otherwise give a zero variance and infinite likelihood ratios).
MIN_STD = 1e-6


# --------------------------------------------------------------------------- scores


def _logsumexp(values: FloatArray, axis: int) -> FloatArray:
    top = np.max(values, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    summed = np.log(np.sum(np.exp(values - top), axis=axis, keepdims=True)) + top
    return np.asarray(np.squeeze(summed, axis=axis), dtype=np.float64)


def _true_class(logits: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[FloatArray, IntArray]:
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if z.ndim != 2 or y.shape != z.shape[:1]:
        raise ValueError(f"logits {z.shape} and labels {y.shape} do not match")
    if len(y) and (y.min() < 0 or y.max() >= z.shape[1]):
        raise ValueError("labels outside 0 .. n_classes - 1")
    return z, y


def cross_entropy(logits: npt.ArrayLike, labels: npt.ArrayLike) -> FloatArray:
    """Per-example cross-entropy −log p_y of ``logits`` (n, C) at ``labels`` (n,)."""
    z, y = _true_class(logits, labels)
    return _logsumexp(z, axis=1) - z[np.arange(len(y)), y]


def true_class_log_odds(logits: npt.ArrayLike, labels: npt.ArrayLike) -> FloatArray:
    """LiRA's statistic φ = log(p_y / (1 − p_y)), computed stably from the logits as
    z_y − logsumexp_{j≠y} z_j (no clipping of p needed)."""
    z, y = _true_class(logits, labels)
    rows = np.arange(len(y))
    true = z[rows, y].copy()
    others = z.copy()
    others[rows, y] = -np.inf
    return true - _logsumexp(others, axis=1)


def loss_scores(losses: npt.ArrayLike) -> FloatArray:
    """The loss-threshold attack's scores: lower loss ⇒ member, so score = −loss."""
    return -np.asarray(losses, dtype=np.float64)


def balanced_membership(n_models: int, n_examples: int, rng: np.random.Generator) -> BoolArray:
    """``(n_models, n_examples)`` IN flags: every example is IN for ⌊M/2⌋ or ⌈M/2⌉ models
    (⌈·⌉ with probability ½ when M is odd), the models chosen at random per example.

    Each model's IN set is then a random half of the examples (its size varies a little).
    """
    if n_models < 1 or n_examples < 0:
        raise ValueError("need at least one model and a non-negative number of examples")
    counts = n_models // 2 + (rng.random(n_examples) < 0.5) * (n_models % 2)
    ranks = np.argsort(rng.random((n_models, n_examples)), axis=0).argsort(axis=0)
    return np.asarray(ranks < counts[np.newaxis, :], dtype=np.bool_)


def _pooled_std(values: FloatArray, mask: BoolArray, means: FloatArray) -> float:
    residuals = np.where(mask, values - means[np.newaxis, :], 0.0)
    counts = mask.sum(axis=0)
    dof = int(np.sum(np.maximum(counts - 1, 0)))
    if dof == 0:
        return math.nan
    return max(math.sqrt(float(np.sum(residuals**2)) / dof), MIN_STD)


def _fit(
    values: FloatArray, mask: BoolArray, *, global_variance: bool
) -> tuple[FloatArray, FloatArray, float]:
    """Per-example means (NaN where no shadow qualifies), per-example or pooled std, and
    the pooled std."""
    counts = mask.sum(axis=0)
    sums = np.where(mask, values, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    pooled = _pooled_std(values, mask, np.nan_to_num(means))
    if global_variance or math.isnan(pooled):
        std = np.full(values.shape[1], pooled)
    else:
        squares = np.where(mask, (values - np.nan_to_num(means)[np.newaxis, :]) ** 2, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            own = np.sqrt(squares.sum(axis=0) / np.maximum(counts - 1, 1))
        std = np.where(counts >= 2, np.maximum(own, MIN_STD), pooled)
    return means, std, pooled


def _log_normal_pdf(x: FloatArray, mean: FloatArray, std: FloatArray) -> FloatArray:
    return -0.5 * ((x - mean) / std) ** 2 - np.log(std) - 0.5 * math.log(2 * math.pi)


def lira_scores(
    target_phi: npt.ArrayLike,
    shadow_phi: npt.ArrayLike,
    shadow_in: npt.ArrayLike,
    *,
    online: bool = True,
    global_variance: bool = True,
) -> FloatArray:
    """LiRA scores of the target model's ``target_phi`` (n,), given the shadows' φ
    ``shadow_phi`` (k, n) and whether each example was IN each shadow ``shadow_in`` (k, n).

    ``global_variance`` pools the IN and the OUT variance over all examples (the paper's
    choice below 64 shadows); otherwise each example gets its own (pooled where it has
    fewer than two shadows on a side). An example without IN (OUT) shadows gets
    μ_in = μ_out + s (μ_out = μ_in − s), s the mean μ_in − μ_out of the other examples.

    The shadows' IN flags must not depend on the target's: with an exactly balanced
    design (every example IN for half of target + shadows) a target member has one IN
    shadow fewer than a non-member, and the online score then carries that count.
    """
    phi = np.asarray(target_phi, dtype=np.float64)
    shadows = np.asarray(shadow_phi, dtype=np.float64)
    inside = np.asarray(shadow_in, dtype=np.bool_)
    if shadows.ndim != 2 or shadows.shape != inside.shape or shadows.shape[1:] != phi.shape:
        raise ValueError(
            f"target φ {phi.shape}, shadow φ {shadows.shape} and IN flags {inside.shape} "
            "do not match"
        )
    mean_out, std_out, _ = _fit(shadows, ~inside, global_variance=global_variance)
    mean_in, std_in, _ = _fit(shadows, inside, global_variance=global_variance)
    if np.isnan(std_out).any() or (online and np.isnan(std_in).any()):
        raise ValueError("LiRA needs at least two scores on each side for some example")
    both = ~np.isnan(mean_in) & ~np.isnan(mean_out)
    if not both.any():
        raise ValueError("LiRA needs examples with both IN and OUT shadows")
    # An example without IN (or OUT) shadows borrows the other side's mean shifted by the
    # mean IN − OUT difference of the examples that have both.
    shift = float(np.mean(mean_in[both] - mean_out[both]))
    mean_in = np.where(np.isnan(mean_in), mean_out + shift, mean_in)
    mean_out = np.where(np.isnan(mean_out), mean_in - shift, mean_out)
    if not online:
        return (phi - mean_out) / std_out
    return _log_normal_pdf(phi, mean_in, std_in) - _log_normal_pdf(phi, mean_out, std_out)


# --------------------------------------------------------------------------- ROC


@dataclass(frozen=True)
class Roc:
    """ROC points from (0, 0) to (1, 1); ``thresholds[i]`` is the score at or above which
    examples are called members at point i + 1 (point 0 calls nobody)."""

    fpr: FloatArray
    tpr: FloatArray
    thresholds: FloatArray
    n_members: int
    n_nonmembers: int


@dataclass(frozen=True)
class _Sorted:
    """Examples sorted by score, descending, and where each run of equal scores starts."""

    order: IntArray
    starts: IntArray
    member: BoolArray  # in sorted order
    scores: FloatArray  # in sorted order


def _sort(scores: npt.ArrayLike, is_member: npt.ArrayLike) -> _Sorted:
    s = np.asarray(scores, dtype=np.float64)
    m = np.asarray(is_member, dtype=np.bool_)
    if s.ndim != 1 or m.shape != s.shape:
        raise ValueError(f"scores {s.shape} and membership {m.shape} must be equal 1-D shapes")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if m.all() or not m.any():
        raise ValueError("need at least one member and one non-member")
    order = np.argsort(-s, kind="stable").astype(np.int64)
    sorted_scores = s[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]]).astype(np.int64)
    return _Sorted(order=order, starts=starts, member=m[order], scores=sorted_scores)


def _curve(
    sorted_: _Sorted, weights: FloatArray | None = None
) -> tuple[FloatArray, FloatArray, float, float]:
    w = np.ones(len(sorted_.order)) if weights is None else weights[sorted_.order]
    positives = np.add.reduceat(np.where(sorted_.member, w, 0.0), sorted_.starts)
    negatives = np.add.reduceat(np.where(sorted_.member, 0.0, w), sorted_.starts)
    n_pos, n_neg = float(positives.sum()), float(negatives.sum())
    tpr = np.r_[0.0, np.cumsum(positives)] / n_pos
    fpr = np.r_[0.0, np.cumsum(negatives)] / n_neg
    tpr[-1] = fpr[-1] = 1.0  # exact despite rounding
    return fpr, tpr, n_pos, n_neg


def roc_curve(scores: npt.ArrayLike, is_member: npt.ArrayLike) -> Roc:
    """The ROC of calling "member" every example whose score is at least a threshold."""
    sorted_ = _sort(scores, is_member)
    fpr, tpr, n_pos, n_neg = _curve(sorted_)
    return Roc(
        fpr=fpr,
        tpr=tpr,
        thresholds=sorted_.scores[sorted_.starts],
        n_members=int(n_pos),
        n_nonmembers=int(n_neg),
    )


def _auc(fpr: FloatArray, tpr: FloatArray) -> float:
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def auc(roc: Roc) -> float:
    """Area under the ROC (= Pr[member score > non-member score] + ½ Pr[tie])."""
    return _auc(roc.fpr, roc.tpr)


def _tpr_at(fpr: FloatArray, tpr: FloatArray, target: float) -> float:
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"FPR {target} outside [0, 1]")
    if target >= 1.0:
        return 1.0
    # The last point with FPR ≤ target is the highest TPR reachable there; the next point
    # has FPR > target, and a randomised threshold interpolates linearly between them.
    last = int(np.searchsorted(fpr, target, side="right")) - 1
    x0, y0, x1, y1 = fpr[last], tpr[last], fpr[last + 1], tpr[last + 1]
    return float(y0 + (target - x0) * (y1 - y0) / (x1 - x0))


def tpr_at_fpr(roc: Roc, fpr: float) -> float:
    """The TPR of the ROC at false-positive rate ``fpr`` (interpolated, see module doc)."""
    return _tpr_at(roc.fpr, roc.tpr, fpr)


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap percentile interval."""

    estimate: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.estimate:.4f} [{self.low:.4f}, {self.high:.4f}]"


@dataclass(frozen=True)
class AttackMetrics:
    """AUC and TPR at each FPR of interest, with bootstrap intervals.

    ``resolvable[α]`` says whether α ≥ 1 / n_nonmembers, i.e. whether a threshold with at
    least one false positive exists at α; below that the TPR rests on zero false positives.
    """

    auc: Interval
    tpr: Mapping[float, Interval]
    resolvable: Mapping[float, bool]
    n_members: int
    n_nonmembers: int
    resamples: int
    confidence: float
    roc: Roc


def attack_metrics(
    scores: npt.ArrayLike,
    is_member: npt.ArrayLike,
    *,
    fprs: Sequence[float] = (0.01, 0.001),
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    groups: npt.ArrayLike | None = None,
) -> AttackMetrics:
    """AUC and TPR at ``fprs`` with a percentile bootstrap (``resamples`` resamples,
    fixed ``seed``).

    Without ``groups`` the bootstrap is stratified: members and non-members are resampled
    separately. With ``groups`` (one id per example) whole groups are resampled instead, so
    that correlated examples (the same window scored against several target models) move
    together; the numbers of members and non-members then vary between resamples.
    """
    if not 0 < confidence < 1:
        raise ValueError("confidence must be in (0, 1)")
    sorted_ = _sort(scores, is_member)
    fpr, tpr, n_pos, n_neg = _curve(sorted_)
    member = np.asarray(is_member, dtype=np.bool_)
    members = np.flatnonzero(member)
    nonmembers = np.flatnonzero(~member)
    n = len(member)
    rng = np.random.default_rng(seed)
    if groups is not None:
        group_ids = np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1)
        if group_ids.shape != member.shape:
            raise ValueError("groups must give one id per example")
        n_groups = int(group_ids.max()) + 1
    boot_auc = np.empty(resamples)
    boot_tpr = np.empty((resamples, len(fprs)))
    for r in range(resamples):
        if groups is None:
            counts = np.bincount(
                members[rng.integers(0, len(members), len(members))], minlength=n
            ) + np.bincount(
                nonmembers[rng.integers(0, len(nonmembers), len(nonmembers))], minlength=n
            )
        else:
            drawn = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)
            counts = drawn[group_ids]
        f, t, _, _ = _curve(sorted_, counts.astype(np.float64))
        boot_auc[r] = _auc(f, t)
        boot_tpr[r] = [_tpr_at(f, t, alpha) for alpha in fprs]
    tail = (1 - confidence) / 2 * 100
    roc = Roc(
        fpr=fpr,
        tpr=tpr,
        thresholds=sorted_.scores[sorted_.starts],
        n_members=int(n_pos),
        n_nonmembers=int(n_neg),
    )

    def interval(estimate: float, samples: FloatArray) -> Interval:
        if resamples == 0:
            return Interval(estimate, math.nan, math.nan)
        low, high = np.percentile(samples, [tail, 100 - tail])
        return Interval(estimate, float(low), float(high))

    return AttackMetrics(
        auc=interval(_auc(fpr, tpr), boot_auc),
        tpr={
            alpha: interval(_tpr_at(fpr, tpr, alpha), boot_tpr[:, i])
            for i, alpha in enumerate(fprs)
        },
        resolvable={alpha: alpha * n_neg >= 1 for alpha in fprs},
        n_members=int(n_pos),
        n_nonmembers=int(n_neg),
        resamples=resamples,
        confidence=confidence,
        roc=roc,
    )


# --------------------------------------------------------------------------- DP bound


def dp_tpr_bound(fpr: float, epsilon: float, delta: float) -> float:
    """The bound the issue states: TPR ≤ e^ε · FPR + δ (capped at 1)."""
    if epsilon < 0 or not 0 <= delta <= 1 or not 0 <= fpr <= 1:
        raise ValueError("need ε ≥ 0 and δ, FPR in [0, 1]")
    if math.isinf(epsilon):
        return 1.0
    return min(1.0, math.exp(epsilon) * fpr + delta)


def dp_tpr_bound_tight(fpr: float, epsilon: float, delta: float) -> float:
    """The (ε, δ)-DP privacy region's upper edge:
    min(1, e^ε · FPR + δ, 1 − e^(−ε) · (1 − δ − FPR))."""
    simple = dp_tpr_bound(fpr, epsilon, delta)
    if math.isinf(epsilon):
        return 1.0
    return min(simple, 1.0 - math.exp(-epsilon) * (1.0 - delta - fpr))
