"""Accuracy, cross-entropy, population MIA, the LiRA-style per-example MIA and cost fraction against hand
counts, torch, scipy, brute force and known extremes."""

import numpy as np
import pytest
import torch
from scipy.stats import norm

from unlearning.base import Cost
from unlearning.metrics import (
    LIRA_STD_FLOOR,
    accuracy,
    cost_fraction,
    lira_mia,
    lira_scores,
    per_example_loss,
    population_mia,
)


def test_accuracy_matches_hand_count():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.5, 0.1, 0.9], [1.0, 0.0, 0.0]])
    labels = np.array([0, 2, 2, 1])  # right, wrong, right, wrong
    assert accuracy(logits, labels) == 0.5
    stacked = np.stack([logits, logits[:, [2, 1, 0]]])  # second model: classes 0 and 2 swapped
    # Second model predicts 2, 1, 0, 2 against labels 0, 2, 2, 1: none right.
    np.testing.assert_array_equal(accuracy(stacked, labels), [0.5, 0.0])
    # torch tensors are accepted
    assert accuracy(torch.tensor(logits), torch.tensor(labels)) == 0.5


def test_per_example_loss_matches_torch_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 30, 10)) * 5
    labels = rng.integers(0, 10, 30)
    got = per_example_loss(logits, labels)
    for k in range(2):
        ref = torch.nn.functional.cross_entropy(
            torch.tensor(logits[k]), torch.tensor(labels), reduction="none"
        ).numpy()
        np.testing.assert_allclose(got[k], ref, rtol=1e-12, atol=1e-12)
    # Stable for large logits: CE of [1000, 0] at label 1 is 1000.
    assert per_example_loss(np.array([[1000.0, 0.0]]), np.array([1]))[0] == pytest.approx(1000.0)


def test_mia_is_chance_for_identical_loss_distributions():
    rng = np.random.default_rng(1)
    forget = rng.exponential(size=400)
    test = rng.exponential(size=400)
    assert population_mia(forget, test, seed=0) == pytest.approx(0.5, abs=0.07)


def test_mia_balances_groups_by_subsampling():
    # 100 forget vs 2,000 test from one distribution: without balancing, "always test" would score 0.95.
    rng = np.random.default_rng(2)
    forget = rng.exponential(size=100)
    test = rng.exponential(size=2000)
    assert population_mia(forget, test, seed=0) == pytest.approx(0.5, abs=0.1)
    assert population_mia(forget, test, seed=3) == population_mia(forget, test, seed=3)  # seeded


def test_mia_is_one_for_separable_losses():
    rng = np.random.default_rng(3)
    forget = rng.uniform(0.0, 0.1, 300)  # memorised: tiny loss
    test = rng.uniform(1.0, 3.0, 300)
    assert population_mia(forget, test, seed=0) == pytest.approx(1.0, abs=0.01)
    # Tiny loss scales still separate (the loss is standardised before the L2-penalised fit).
    assert population_mia(forget * 1e-3, test * 1e-3, seed=0) == pytest.approx(1.0, abs=0.01)


def test_mia_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 5"):
        population_mia(np.ones(3), np.ones(10), seed=0)
    with pytest.raises(ValueError, match="NaN"):
        population_mia(np.array([1.0, np.nan, 1, 1, 1]), np.ones(10), seed=0)


def test_cost_fraction():
    assert cost_fraction(9_600, 1_200_000) == pytest.approx(0.008)
    unlearn, retrain = Cost(seconds=1.0, example_passes=300.0), Cost(seconds=5.0, example_passes=1200.0)
    assert cost_fraction(unlearn, retrain) == 0.25
    np.testing.assert_allclose(cost_fraction(np.array([1.0, 2.0]), 4.0), [0.25, 0.5])
    with pytest.raises(ValueError, match="retrain_cost"):
        cost_fraction(1.0, 0.0)
    with pytest.raises(ValueError, match="cost must be"):
        cost_fraction(-1.0, 2.0)


def test_lira_scores_match_scipy_norm_logpdf():
    rng = np.random.default_rng(4)
    n_points = 12
    in_m = rng.normal(3.0, 2.0, (8, n_points)) + rng.normal(size=n_points)
    out_m = rng.normal(-1.0, 0.5, (10, n_points))
    out_m[:, 0] = 2.0  # the oracles agree exactly: their standard deviation is floored
    m = rng.normal(1.0, 3.0, (5, n_points))
    got = lira_scores(m, in_m, out_m)
    assert got.shape == (5, n_points)
    for j in range(n_points):
        s_in = max(np.std(in_m[:, j], ddof=1), LIRA_STD_FLOOR)
        s_out = max(np.std(out_m[:, j], ddof=1), LIRA_STD_FLOOR)
        assert (s_out == LIRA_STD_FLOOR) == (j == 0)
        for k in range(5):
            expected = norm.logpdf(m[k, j], np.mean(in_m[:, j]), s_in) - norm.logpdf(
                m[k, j], np.mean(out_m[:, j]), s_out
            )
            assert got[k, j] == pytest.approx(expected, rel=1e-12, abs=1e-9)
    assert np.isfinite(got).all()
    # torch tensors are accepted
    np.testing.assert_allclose(lira_scores(torch.tensor(m), torch.tensor(in_m), out_m), got)


def brute_force_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(positive score > negative score) + P(equal) / 2 over all pairs."""
    wins = sum(float(p > n) + 0.5 * float(p == n) for p in pos for n in neg)
    return wins / (pos.size * neg.size)


def brute_force_tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, max_fpr: float) -> float:
    """Largest TPR over thresholds t ("member" when score >= t) whose FPR is at most max_fpr."""
    best = 0.0  # t = +inf: nothing flagged
    for t in np.concatenate([pos, neg]):
        if np.mean(neg >= t) <= max_fpr:
            best = max(best, float(np.mean(pos >= t)))
    return best


def test_lira_mia_matches_brute_force_auc_and_tpr():
    rng = np.random.default_rng(5)
    n_points = 25
    in_m = rng.normal(2.0, 1.0, (8, n_points))
    out_m = rng.normal(0.0, 1.0, (8, n_points))
    # Margins on a coarse grid: equal margins at a point give tied scores, which AUC counts as 1/2.
    method = np.round(rng.normal(1.0, 1.0, (8, n_points)) * 2) / 2
    heldout = np.round(rng.normal(0.0, 1.0, (8, n_points)) * 2) / 2
    result = lira_mia(method, heldout, in_m, out_m)
    assert set(result) == {"auc", "tpr_at_1pct_fpr"}
    pos = lira_scores(method, in_m, out_m).ravel()
    neg = lira_scores(heldout, in_m, out_m).ravel()
    assert len(np.unique(pos)) < pos.size  # the ties are really there
    assert result["auc"] == pytest.approx(brute_force_auc(pos, neg), rel=1e-12)
    assert result["tpr_at_1pct_fpr"] == pytest.approx(brute_force_tpr_at_fpr(pos, neg, 0.01), rel=1e-12)
    assert 0.5 < result["auc"] < 1.0 and 0.0 < result["tpr_at_1pct_fpr"] < 1.0


def test_lira_mia_extremes():
    # Full models memorise (margin ~ +4), oracles do not (~ 0); K = 8 models a side, 200 forget points.
    rng = np.random.default_rng(6)
    n_points = 200
    mu_in = rng.normal(4.0, 1.0, n_points)
    mu_out = rng.normal(0.0, 1.0, n_points)

    def draw(mu, sd):
        return mu + sd * rng.normal(size=(8, n_points))

    in_m, out_m, heldout = draw(mu_in, 1.0), draw(mu_out, 1.5), draw(mu_out, 1.5)
    # A method that did nothing: fresh models from the in-distribution are recognised.
    nothing = lira_mia(draw(mu_in, 1.0), heldout, in_m, out_m)
    assert nothing["auc"] > 0.9 and nothing["tpr_at_1pct_fpr"] > 0.3  # measured 0.97, 0.55
    # A perfect unlearner: fresh models from the out-distribution look like the held-out oracles.
    perfect = lira_mia(draw(mu_out, 1.5), heldout, in_m, out_m)
    assert perfect["auc"] == pytest.approx(0.5, abs=0.05)
    assert perfect["tpr_at_1pct_fpr"] < 0.05


def test_lira_rejects_bad_input():
    rng = np.random.default_rng(7)
    in_m, out_m, m = rng.normal(size=(4, 6)), rng.normal(size=(4, 6)), rng.normal(size=(3, 6))
    with pytest.raises(ValueError, match="n_models, n_points"):
        lira_scores(m[0], in_m, out_m)
    with pytest.raises(ValueError, match="same 6 points"):
        lira_scores(m[:, :5], in_m, out_m)
    with pytest.raises(ValueError, match="same 6 points"):
        lira_mia(m, m[:, :5], in_m, out_m)
    with pytest.raises(ValueError, match="at least 2"):
        lira_scores(m, in_m[:1], out_m)
    bad = out_m.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        lira_scores(m, in_m, bad)
    with pytest.raises(ValueError, match="NaN"):
        lira_mia(m, bad, in_m, out_m)
