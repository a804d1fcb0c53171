"""Accuracy, cross-entropy, population MIA and cost fraction against hand counts, torch and known extremes."""

import numpy as np
import pytest
import torch

from unlearning.base import Cost
from unlearning.metrics import accuracy, cost_fraction, per_example_loss, population_mia


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
