"""Known-answer tests of the membership-inference math in bench/privacy/mia.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.privacy.attack import random_halves
from bench.privacy.mia import (
    attack_metrics,
    auc,
    balanced_membership,
    cross_entropy,
    dp_tpr_bound,
    dp_tpr_bound_tight,
    lira_scores,
    loss_scores,
    roc_curve,
    tpr_at_fpr,
    true_class_log_odds,
)


def test_roc_of_four_examples_by_hand() -> None:
    # members score 3 and 1, non-members 2 and 0: ROC (0,0) (0,.5) (.5,.5) (.5,1) (1,1)
    roc = roc_curve([3.0, 2.0, 1.0, 0.0], [True, False, True, False])
    assert roc.fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert roc.tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert auc(roc) == pytest.approx(0.75)
    assert tpr_at_fpr(roc, 0.0) == pytest.approx(0.5)
    assert tpr_at_fpr(roc, 0.25) == pytest.approx(0.5)
    assert tpr_at_fpr(roc, 0.5) == pytest.approx(1.0)  # the top of the vertical step
    assert tpr_at_fpr(roc, 1.0) == 1.0


def test_ties_are_one_step_interpolated() -> None:
    roc = roc_curve([1.0, 1.0], [True, False])
    assert auc(roc) == pytest.approx(0.5)
    assert tpr_at_fpr(roc, 0.3) == pytest.approx(0.3)


def test_perfect_and_reversed_separation() -> None:
    member = np.r_[np.ones(100, bool), np.zeros(100, bool)]
    scores = np.r_[np.arange(100) + 1000.0, np.arange(100.0)]
    assert auc(roc_curve(scores, member)) == pytest.approx(1.0)
    assert tpr_at_fpr(roc_curve(scores, member), 0.001) == pytest.approx(1.0)
    assert auc(roc_curve(-scores, member)) == pytest.approx(0.0)
    assert tpr_at_fpr(roc_curve(-scores, member), 0.5) == pytest.approx(0.0)


def test_tpr_at_fpr_on_uniform_grid() -> None:
    # 10,000 non-members at 0..9999, members at 9995.5, 9991.5, 9989.5, 9000.5, 10.5: at
    # FPR 0.1 % (10 false positives) exactly the members above 9989.5 are caught.
    nonmembers = np.arange(10_000, dtype=float)
    members = np.array([9995.5, 9991.5, 9989.5, 9000.5, 10.5])
    scores = np.r_[members, nonmembers]
    member = np.r_[np.ones(5, bool), np.zeros(10_000, bool)]
    roc = roc_curve(scores, member)
    assert tpr_at_fpr(roc, 0.001) == pytest.approx(3 / 5)
    assert tpr_at_fpr(roc, 0.0005) == pytest.approx(1 / 5)  # 5 FPs: only 9995.5 is caught
    assert tpr_at_fpr(roc, 0.1) == pytest.approx(4 / 5)  # 999 non-members above 9000.5


def test_random_scores_give_chance() -> None:
    rng = np.random.default_rng(0)
    member = rng.random(20_000) < 0.5
    metrics = attack_metrics(rng.normal(size=20_000), member, resamples=200, seed=1)
    assert metrics.auc.low < 0.5 < metrics.auc.high
    assert metrics.tpr[0.01].low < 0.01 < metrics.tpr[0.01].high
    assert metrics.resolvable[0.001]


def test_gaussian_shift_matches_the_closed_form() -> None:
    # members ~ N(1, 1), non-members ~ N(0, 1): AUC = Φ(1/√2) ≈ 0.7602,
    # TPR at FPR α = 1 − Φ(Φ⁻¹(1 − α) − 1): α = 1 % → 0.0907, α = 0.1 % → 0.0160.
    rng = np.random.default_rng(2)
    n = 200_000
    scores = np.r_[rng.normal(1.0, 1.0, n), rng.normal(0.0, 1.0, n)]
    member = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    metrics = attack_metrics(scores, member, resamples=100, seed=0)
    assert metrics.auc.estimate == pytest.approx(0.7602, abs=0.003)
    assert metrics.tpr[0.01].estimate == pytest.approx(0.0907, abs=0.004)
    assert metrics.tpr[0.001].estimate == pytest.approx(0.0160, abs=0.002)
    assert metrics.tpr[0.001].low <= 0.0160 <= metrics.tpr[0.001].high


def test_bootstrap_is_reproducible() -> None:
    rng = np.random.default_rng(3)
    scores, member = rng.normal(size=500), rng.random(500) < 0.3
    a = attack_metrics(scores, member, resamples=50, seed=7)
    b = attack_metrics(scores, member, resamples=50, seed=7)
    assert a.auc == b.auc
    assert a.tpr == b.tpr


def test_unresolvable_fpr_is_flagged() -> None:
    member = np.r_[np.ones(600, bool), np.zeros(600, bool)]
    metrics = attack_metrics(np.arange(1200.0), member, resamples=10)
    assert not metrics.resolvable[0.001]  # 0.1 % of 600 non-members < 1
    assert metrics.resolvable[0.01]


def test_dp_bound() -> None:
    assert dp_tpr_bound(0.001, 3.0, 1e-5) == pytest.approx(math.exp(3) * 0.001 + 1e-5)
    assert dp_tpr_bound(0.01, 8.0, 1e-5) == 1.0
    assert dp_tpr_bound(0.5, 0.0, 0.0) == pytest.approx(0.5)
    # The tight region adds the complementary edge: at ε = 1, FPR = 0.5, δ = 0:
    # min(e · 0.5, 1 − e^-1 · 0.5) = 1 − 0.5/e ≈ 0.816.
    assert dp_tpr_bound_tight(0.5, 1.0, 0.0) == pytest.approx(1 - 0.5 / math.e)
    assert dp_tpr_bound_tight(0.001, 3.0, 1e-5) == pytest.approx(dp_tpr_bound(0.001, 3.0, 1e-5))
    with pytest.raises(ValueError, match="ε"):
        dp_tpr_bound(0.1, -1.0, 0.0)


def test_scores_from_logits() -> None:
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    labels = np.array([0, 2])
    p = math.exp(2) / (math.exp(2) + 2)
    assert cross_entropy(logits, labels) == pytest.approx([-math.log(p), math.log(3)])
    assert true_class_log_odds(logits, labels) == pytest.approx(
        [math.log(p / (1 - p)), math.log(0.5)]
    )
    # stable far into saturation, where 1 − p_y underflows in float64
    assert true_class_log_odds([[100.0, 0.0]], [0]) == pytest.approx([100.0])
    assert loss_scores([0.5, 2.0]).tolist() == [-0.5, -2.0]


def test_balanced_membership() -> None:
    flags = balanced_membership(8, 1000, np.random.default_rng(0))
    assert flags.shape == (8, 1000)
    assert (flags.sum(axis=0) == 4).all()
    odd = balanced_membership(5, 1000, np.random.default_rng(0)).sum(axis=0)
    assert set(odd.tolist()) == {2, 3}


def test_lira_separates_a_planted_signal() -> None:
    # Each example has its own difficulty d; φ = d + 2·IN + noise. The loss-style global
    # threshold is weak, LiRA (which subtracts d) is strong.
    rng = np.random.default_rng(4)
    n, k = 4000, 16
    difficulty = rng.normal(0, 5, n)
    shadow_in = balanced_membership(k, n, rng)
    shadow_phi = difficulty + 2.0 * shadow_in + rng.normal(0, 1, (k, n))
    target_in = rng.random(n) < 0.5
    target_phi = difficulty + 2.0 * target_in + rng.normal(0, 1, n)
    online = attack_metrics(lira_scores(target_phi, shadow_phi, shadow_in), target_in, resamples=0)
    offline = attack_metrics(
        lira_scores(target_phi, shadow_phi, shadow_in, online=False), target_in, resamples=0
    )
    naive = attack_metrics(target_phi, target_in, resamples=0)
    # With known IN/OUT Gaussians N(2, 1) vs N(0, 1) the optimal AUC is Φ(2/√2) ≈ 0.921.
    assert online.auc.estimate == pytest.approx(0.921, abs=0.02)
    assert offline.auc.estimate == pytest.approx(0.921, abs=0.02)
    assert naive.auc.estimate < 0.7


def test_grouped_bootstrap_moves_groups_together() -> None:
    # The same 500 windows scored against 4 models: the grouped bootstrap resamples
    # windows; the point estimate does not depend on how the interval is drawn.
    rng = np.random.default_rng(5)
    base = rng.normal(size=500)
    scores = np.tile(base, 4) + rng.normal(0, 0.1, 2000)
    member = rng.random(2000) < 0.5
    scores = scores + 0.3 * member
    independent = attack_metrics(scores, member, resamples=300, seed=0)
    grouped = attack_metrics(
        scores, member, resamples=300, seed=0, groups=np.tile(np.arange(500), 4)
    )
    assert grouped.auc.estimate == independent.auc.estimate
    assert grouped.auc.low <= grouped.auc.estimate <= grouped.auc.high
    with pytest.raises(ValueError, match="groups"):
        attack_metrics(scores, member, resamples=1, groups=np.arange(10))


def test_random_halves() -> None:
    flags = random_halves(8, 1001, np.random.default_rng(0))
    assert set(flags.sum(axis=1).tolist()) <= {500, 501}  # every model trains on a half
    share = flags.mean(axis=0)
    assert 0.3 < share.mean() < 0.7


@pytest.mark.slow
def test_lira_without_signal_is_at_chance_with_independent_halves() -> None:
    # No membership effect at all. Attacking every model in turn with the others as its
    # shadows must give AUC 0.5; an exactly balanced design (each example IN for half
    # of all models) biases online LiRA below 0.5 because a target member then has one
    # IN shadow fewer than a non-member.
    rng = np.random.default_rng(0)
    n, m = 8000, 8
    difficulty = rng.normal(0, 3, n)
    for flags, chance in (
        (random_halves(m, n, rng), True),
        (balanced_membership(m, n, rng), False),
    ):
        phi = difficulty + rng.normal(0, 1, (m, n))
        scores = [
            lira_scores(phi[t], phi[np.arange(m) != t], flags[np.arange(m) != t]) for t in range(m)
        ]
        metrics = attack_metrics(
            np.concatenate(scores),
            flags.reshape(-1),
            resamples=50,
            groups=np.tile(np.arange(n), m),
        )
        assert (metrics.auc.low < 0.5 < metrics.auc.high) == chance
