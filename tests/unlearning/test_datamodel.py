"""Tests of DM-Direct and Datamodel Matching: the prediction by hand, the exact leave-out effect of a model
whose outputs are additive in the training indicator (weights fit by scikit-learn on random subsets, oracle by
brute-force retraining), and DMM as Oracle Matching towards DM-Direct."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LinearRegression
from torch import nn

from unlearning import METHODS, DatamodelPredictor, UnlearnData
from unlearning.base import predict_logits

from .conftest import N_CLASSES, N_TRAIN, assert_same_state, state_snapshot


def test_dm_direct_by_hand():
    data = UnlearnData(torch.zeros(2, 1), torch.tensor([0, 1]))  # 2 training targets + 1 test target
    weights = np.array(
        [
            [[1.0, 0.0], [0.5, -1.0], [0.0, 2.0]],  # training point 0
            [[-2.0, 1.0], [0.5, 0.0], [1.0, 1.0]],  # training point 1
        ]
    )
    original = np.array([[3.0, 1.0], [0.0, 0.0], [2.0, -1.0]])
    result = METHODS["dm_direct"](
        nn.Linear(1, 2), data, [0, 1], datamodel_weights=weights, original_logits=original
    )
    expected = torch.tensor([[4.0, 0.0], [-1.0, 1.0], [1.0, -4.0]])
    assert isinstance(result.model, DatamodelPredictor)
    assert torch.equal(result.model.logits(), expected)
    assert torch.equal(result.model.logits([2, 0]), expected[[2, 0]])
    assert result.cost.example_passes == 0
    # Forgetting only point 1: the pipeline passes only that row.
    one = METHODS["dm_direct"](
        nn.Linear(1, 2), data, [1], datamodel_weights=weights[1:], original_logits=original
    )
    assert torch.equal(one.model.logits(), torch.tensor([[5.0, 0.0], [-0.5, 0.0], [1.0, -2.0]]))


def test_dm_direct_predictor_refuses_new_inputs():
    predictor = DatamodelPredictor(torch.zeros(3, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match="only for datamodel targets.*dm_matching"):
        predictor(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="target_idx"):
        predictor.logits([3])


def test_dm_direct_reproduces_the_exact_leave_out_effect_of_an_additive_model():
    """A kernel-vote classifier f_j(S) = b_j + Σ_{i∈S} k(x_j, x_i)·onehot(y_i) is exactly linear in the
    training indicator, so linear datamodels fit on random subsets recover its weights and DM-Direct must
    equal retraining without F exactly."""
    rng = np.random.default_rng(0)
    n_train, n_test, n_classes, n_models = 30, 5, 3, 200
    x = rng.normal(size=(n_train + n_test, 4))
    y = rng.integers(0, n_classes, size=n_train)
    bias = rng.normal(size=(n_train + n_test, n_classes))
    kernel = np.exp(-((x[:, None, :] - x[None, :n_train, :]) ** 2).sum(-1) / 4)  # (T, N)
    onehot = np.eye(n_classes)[y]  # (N, C)

    def train_and_predict(mask: np.ndarray) -> np.ndarray:  # the "model trained on S", outputs (T, C)
        return bias + kernel @ (mask[:, None] * onehot)

    masks = rng.random((n_models, n_train)) < 0.5  # α = 0.5 subsets (docs/methods.md §1)
    outputs = np.stack([train_and_predict(m) for m in masks]).reshape(n_models, -1)
    fit = LinearRegression().fit(masks.astype(float), outputs)
    weights = fit.coef_.T.reshape(n_train, n_train + n_test, n_classes)  # (N, T, C), the store layout

    forget = np.array([2, 7, 11, 25])
    full = train_and_predict(np.ones(n_train, dtype=bool))
    keep = np.ones(n_train, dtype=bool)
    keep[forget] = False
    oracle = train_and_predict(keep)

    data = UnlearnData(torch.as_tensor(x[:n_train], dtype=torch.float32), torch.as_tensor(y))
    result = METHODS["dm_direct"](
        nn.Linear(4, n_classes), data, forget, datamodel_weights=weights[forget], original_logits=full
    )
    np.testing.assert_allclose(result.model.logits().numpy(), oracle, rtol=1e-5, atol=1e-5)
    # The leave-out effect is not trivially small: doing nothing is far from the oracle.
    assert np.abs(full - oracle).max() > 0.5


@pytest.mark.parametrize(
    "weights_shape, logits_shape, message",
    [
        ((3, 100, N_CLASSES), (100, N_CLASSES), r"\(\|F\|, T, C\) = \(2, T, C\)"),
        ((2, 100, N_CLASSES), (101, N_CLASSES), "same targets"),
        ((2, 100, N_CLASSES), (50, N_CLASSES), "targets but the training set has"),
    ],
)
def test_dm_direct_shape_errors(weights_shape, logits_shape, message, trained_mlp, mlp_data):
    with pytest.raises(ValueError, match=message):
        METHODS["dm_direct"](
            trained_mlp, mlp_data, [0, 1],
            datamodel_weights=np.zeros(weights_shape, dtype=np.float32),
            original_logits=np.zeros(logits_shape),
        )  # fmt: skip


def test_dm_matching_with_zero_weights_leaves_the_model_unchanged(net_and_data, forget_idx):
    model, data = net_and_data
    weights = np.zeros((forget_idx.numel(), N_TRAIN + 3, N_CLASSES), dtype=np.float32)
    # Zero weights make DM-Direct's oracle the model's own logits: a fixed point with eval-mode BatchNorm.
    result = METHODS["dm_matching"](model, data, forget_idx, datamodel_weights=weights, batchnorm_train=False)
    assert result.info["epoch_losses"] == [0.0] * 4
    assert_same_state(result.model, state_snapshot(model))


def test_dm_matching_fits_dm_direct_predictions(trained_mlp, mlp_data, forget_idx):
    g = torch.Generator().manual_seed(1)
    n_targets = N_TRAIN + 6
    weights = 0.5 * torch.randn(forget_idx.numel(), n_targets, N_CLASSES, generator=g)
    original = torch.cat([predict_logits(trained_mlp, mlp_data.x), torch.randn(6, N_CLASSES, generator=g)])
    result = METHODS["dm_matching"](
        trained_mlp, mlp_data, forget_idx, datamodel_weights=weights, original_logits=original,
        epochs=200, lr=1e-2, lr_decay=0.99, retain_multiplier=3,
    )  # fmt: skip
    ft = result.info["finetune_idx"]
    # Default forget ×5: each forget point five times, then 3·|F| distinct retain points.
    assert ft[: 5 * forget_idx.numel()].tolist() == forget_idx.tolist() * 5
    assert ft.numel() == 8 * forget_idx.numel()
    target = original[:N_TRAIN] - weights[:, :N_TRAIN].sum(0)  # DM-Direct on the training targets, by hand
    before = ((predict_logits(trained_mlp, mlp_data.x[ft]) - target[ft]) ** 2).mean()
    after = ((predict_logits(result.model, mlp_data.x[ft]) - target[ft]) ** 2).mean()
    assert after <= 0.1 * before


def test_dm_matching_needs_weights_for_every_training_target(trained_mlp, mlp_data, forget_idx):
    weights = np.zeros((forget_idx.numel(), N_TRAIN - 1, N_CLASSES), dtype=np.float32)
    with pytest.raises(ValueError, match="every training target"):
        METHODS["dm_matching"](trained_mlp, mlp_data, forget_idx, datamodel_weights=weights)
