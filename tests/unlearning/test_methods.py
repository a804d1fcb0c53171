"""Tests of the unlearning-method library as a whole: the METHODS interface (no mutation, determinism,
forget-set validation, costs by the convention of unlearning/base.py) and the behaviour of OM and the gradient
baselines, checked against closed forms and hand computations."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import scipy.special
import torch
from torch import nn

import unlearning
from unlearning import METHODS, Cost, UnlearnData, check_forget_idx, get_method
from unlearning.base import predict_logits
from unlearning.mumis import CHECK_PASSES, GAP_CHECK_PASSES, STEP_PASSES
from unlearning.scrub import distillation_kl

from .conftest import N_CLASSES, N_TRAIN, accuracy, assert_same_state, make_mlp, state_snapshot, train

# Small settings so that every method runs in a fraction of a second on the tiny nets.
FAST = {
    "oracle_matching": dict(epochs=2),
    "dm_direct": {},
    "dm_matching": dict(epochs=2),
    "mu_mis": dict(max_steps=2, delta=math.inf),
    "mu_mis_gap": dict(max_steps=2),
    "gradient_descent": dict(epochs=1, lr=1e-2),
    "gradient_ascent": dict(epochs=1, lr=1e-3),
    "neggrad_plus": dict(epochs=1, lr=1e-2),
    "scrub": dict(epochs=2, max_steps=1),
    "retrain": {},
    "do_nothing": {},
}
N_EXTRA_TARGETS = 10  # test examples after the training targets, for the datamodel inputs


def method_inputs(name: str, model: nn.Module, data: UnlearnData, forget: torch.Tensor) -> dict:
    """The keyword inputs each method needs, built from the model (seeded, so repeated calls agree)."""
    g = torch.Generator().manual_seed(7)
    train_logits = predict_logits(model, data.x)
    if name == "oracle_matching":
        return {"oracle_logits": train_logits + 0.5 * torch.randn(train_logits.shape, generator=g)}
    if name in ("dm_direct", "dm_matching"):
        test_logits = torch.randn(N_EXTRA_TARGETS, N_CLASSES, generator=g)
        weights = 0.1 * torch.randn(forget.numel(), N_TRAIN + N_EXTRA_TARGETS, N_CLASSES, generator=g)
        return {"datamodel_weights": weights, "original_logits": torch.cat([train_logits, test_logits])}
    if name == "retrain":

        def train_fn(retain: UnlearnData, seed: int):
            fresh = copy.deepcopy(model)
            for m in fresh.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            device = next(model.parameters()).device
            on_device = UnlearnData(retain.x.to(device), retain.y.to(device))
            return train(fresh, on_device, steps=3, seed=seed), 3 * len(retain)

        return {"train_fn": train_fn}
    return {}


def run(name, model, data, forget, seed=0, **extra):
    kwargs = {**method_inputs(name, model, data, forget), **FAST[name], **extra}
    return METHODS[name](model, data, forget, seed=seed, **kwargs)


# ---------------------------------------------------------------- interface


def test_registry_lists_the_methods():
    assert set(METHODS) == {
        "oracle_matching", "dm_direct", "dm_matching", "mu_mis", "mu_mis_gap", "gradient_descent", "gradient_ascent",
        "neggrad_plus", "scrub", "retrain", "do_nothing",
    }  # fmt: skip
    for fn in METHODS.values():
        assert dataclasses.is_dataclass(fn.Hyperparameters)
        assert isinstance(fn.inputs, tuple)


def test_get_method_unknown_name_lists_known_ones():
    assert get_method("scrub") is METHODS["scrub"]
    with pytest.raises(ValueError, match="known methods: .*dm_matching.*oracle_matching"):
        get_method("dmm")


def test_unknown_hyperparameter_is_an_error(trained_mlp, mlp_data, forget_idx):
    with pytest.raises(ValueError, match="unknown argument.*'epoch'.*epochs"):
        METHODS["gradient_descent"](trained_mlp, mlp_data, forget_idx, epoch=3)


def test_hyperparameters_are_frozen_with_reference_defaults():
    om = METHODS["oracle_matching"].Hyperparameters()
    om_values = (om.epochs, om.lr, om.batch_size, om.retain_multiplier, om.forget_multiplier)
    assert om_values == (5, 5e-4, 512, 3, 1)
    dmm = METHODS["dm_matching"].Hyperparameters()
    dmm_values = (dmm.epochs, dmm.lr, dmm.batch_size, dmm.retain_multiplier, dmm.forget_multiplier)
    assert dmm_values == (4, 1e-4, 512, 20, 5)
    sc = METHODS["scrub"].Hyperparameters()
    assert (sc.gamma, sc.alpha, sc.max_steps, sc.temperature, sc.epochs) == (1.0, 0.5, 3, 2.0, 10)
    assert METHODS["neggrad_plus"].Hyperparameters().alpha == 0.95
    with pytest.raises(dataclasses.FrozenInstanceError):
        om.epochs = 1


@pytest.mark.parametrize("name", sorted(METHODS))
def test_no_method_mutates_its_input_model(name, net_and_data, forget_idx):
    model, data = net_and_data
    before = state_snapshot(model)
    was_training = model.training
    result = run(name, model, data, forget_idx)
    assert_same_state(model, before)
    assert model.training == was_training
    assert result.model is not model
    assert isinstance(result.cost, Cost)
    if name == "dm_direct":
        assert isinstance(result.model, unlearning.DatamodelPredictor)
        return
    assert isinstance(result.model, nn.Module)
    input_storage = {p.data_ptr() for p in model.state_dict().values()}
    assert not input_storage & {p.data_ptr() for p in result.model.state_dict().values()}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_same_seed_gives_same_model(name, trained_conv_bn, conv_data, forget_idx):
    a = run(name, trained_conv_bn, conv_data, forget_idx, seed=3).model
    b = run(name, trained_conv_bn, conv_data, forget_idx, seed=3).model
    if name == "dm_direct":
        assert torch.equal(a.logits(), b.logits())
        return
    assert_same_state(a, state_snapshot(b))


STOCHASTIC = ["oracle_matching", "dm_matching", "gradient_descent", "neggrad_plus", "scrub"]


@pytest.mark.parametrize("name", STOCHASTIC)
def test_different_seed_gives_different_model(name, trained_mlp, mlp_data, forget_idx):
    # Small batches, so that the seeded shuffles change the batches and not only their order.
    a = run(name, trained_mlp, mlp_data, forget_idx, seed=3, batch_size=16).model
    b = run(name, trained_mlp, mlp_data, forget_idx, seed=4, batch_size=16).model
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


BAD_FORGET_IDS = [
    ([N_TRAIN], "out of range"),
    ([-1, 2], "out of range"),
    ([4, 5, 4], "duplicated"),
    ([], "empty"),
    ([0.0, 2.0], "integer"),
    (np.zeros(N_TRAIN, dtype=bool), "boolean mask"),
    ([[1, 2]], "1-D"),
]


@pytest.mark.parametrize("bad, message", BAD_FORGET_IDS)
@pytest.mark.parametrize("name", ["oracle_matching", "dm_direct", "mu_mis", "scrub", "retrain", "do_nothing"])
def test_bad_forget_ids_are_errors(name, bad, message, trained_mlp, mlp_data):
    inputs = method_inputs(name, trained_mlp, mlp_data, torch.arange(2))
    with pytest.raises(ValueError, match=message):
        METHODS[name](trained_mlp, mlp_data, bad, **inputs)


def test_forget_ids_accept_list_array_and_tensor():
    for ids in ([5, 1], np.array([5, 1], dtype=np.int32), torch.tensor([5, 1])):
        out = check_forget_idx(ids, 10)
        assert out.dtype == torch.int64 and out.tolist() == [5, 1]


def test_unlearn_data_validates_shapes():
    with pytest.raises(ValueError, match="same examples"):
        UnlearnData(torch.zeros(3, 2), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="integers"):
        UnlearnData(torch.zeros(3, 2), torch.zeros(3))
    assert UnlearnData(np.zeros((3, 2)), np.arange(3, dtype=np.int32)).y.dtype == torch.int64


def test_costs_follow_the_pass_convention(trained_mlp, mlp_data, forget_idx):
    """Example passes in closed form: 1 per forward + backward of one example, 1/3 per forward alone."""
    f, r = forget_idx.numel(), N_TRAIN - forget_idx.numel()
    passes = {name: run(name, trained_mlp, mlp_data, forget_idx).cost.example_passes for name in METHODS}
    om = METHODS["oracle_matching"].Hyperparameters()
    assert passes["oracle_matching"] == FAST["oracle_matching"]["epochs"] * f * (
        om.forget_multiplier + om.retain_multiplier
    )
    dmm = METHODS["dm_matching"].Hyperparameters()
    # retain ×20 of 8 points = 160 > |retain|: capped at the whole retain set.
    assert passes["dm_matching"] == FAST["dm_matching"]["epochs"] * (dmm.forget_multiplier * f + r)
    assert passes["gradient_descent"] == r
    assert passes["gradient_ascent"] == f
    assert passes["neggrad_plus"] == r + f  # one retain batch of 88 paired with one forget batch of 8
    # SCRUB: 1 max-step epoch, 2 min-step epochs; student forward + backward and teacher forward.
    assert passes["scrub"] == pytest.approx((1 * f + 2 * r) * (1 + 1 / 3))
    assert passes["mu_mis"] == pytest.approx(f * (CHECK_PASSES + 2 * (STEP_PASSES + CHECK_PASSES)))
    steps = run("mu_mis_gap", trained_mlp, mlp_data, forget_idx).info["steps"]
    assert passes["mu_mis_gap"] == pytest.approx(f * (GAP_CHECK_PASSES + steps * (STEP_PASSES + GAP_CHECK_PASSES)))
    assert math.isclose(GAP_CHECK_PASSES, 5 / 3)
    assert passes["retrain"] == 3 * r  # reported by train_fn
    assert passes["dm_direct"] == 0 and passes["do_nothing"] == 0
    assert math.isclose(STEP_PASSES, 11 / 3)


def test_dm_matching_counts_the_original_logits_it_computes(trained_mlp, mlp_data, forget_idx):
    inputs = method_inputs("dm_matching", trained_mlp, mlp_data, forget_idx)
    given = METHODS["dm_matching"](trained_mlp, mlp_data, forget_idx, epochs=1, **inputs)
    inputs["original_logits"] = None
    computed = METHODS["dm_matching"](trained_mlp, mlp_data, forget_idx, epochs=1, **inputs)
    assert computed.cost.example_passes == pytest.approx(given.cost.example_passes + N_TRAIN / 3)
    # Same oracle either way (the given logits are the model's own), so the same fine-tuned model.
    for p, q in zip(given.model.parameters(), computed.model.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(METHODS))
def test_methods_run_on_the_models_device(name, trained_conv_bn, conv_data, forget_idx):
    """A CUDA model with CPU data: each method works on the model's device (bf16 autocast where enabled)."""
    model = copy.deepcopy(trained_conv_bn).cuda()
    before = state_snapshot(model)
    result = run(name, model, conv_data, forget_idx, seed=1)
    assert_same_state(model, before)
    if name == "dm_direct":
        assert result.model.logits().device.type == "cuda"
    else:
        assert all(p.device.type == "cuda" for p in result.model.parameters())
        assert torch.isfinite(predict_logits(result.model, conv_data.x)).all()


# ---------------------------------------------------------------- oracle matching


def test_om_with_own_logits_as_oracle_is_a_fixed_point(net_and_data, forget_idx):
    model, data = net_and_data
    own = predict_logits(model, data.x)
    # BatchNorm in train mode normalises by batch statistics, not the running statistics behind `own`; in eval
    # mode the model reproduces `own` exactly, so the MSE and every Adam update are exactly zero.
    result = METHODS["oracle_matching"](model, data, forget_idx, oracle_logits=own, batchnorm_train=False)
    assert result.info["epoch_losses"] == [0.0] * 5
    assert_same_state(result.model, state_snapshot(model))


def test_om_drives_mse_to_another_models_logits_down(trained_mlp, mlp_data, forget_idx):
    other = train(make_mlp(1), mlp_data, steps=50)
    oracle = predict_logits(other, mlp_data.x)
    result = METHODS["oracle_matching"](
        trained_mlp, mlp_data, forget_idx, oracle_logits=oracle, epochs=200, lr=1e-2, lr_decay=0.99
    )
    ft = result.info["finetune_idx"]
    assert ft[: forget_idx.numel()].tolist() == forget_idx.tolist()
    assert ft.numel() == 4 * forget_idx.numel() and ft.unique().numel() == ft.numel()
    x = mlp_data.x[ft]
    before = ((predict_logits(trained_mlp, x) - oracle[ft]) ** 2).mean()
    after = ((predict_logits(result.model, x) - oracle[ft]) ** 2).mean()
    assert after <= 0.1 * before


def test_om_rejects_oracle_logits_of_the_wrong_shape(trained_mlp, mlp_data, forget_idx):
    with pytest.raises(ValueError, match="oracle_logits has shape"):
        METHODS["oracle_matching"](trained_mlp, mlp_data, forget_idx, oracle_logits=torch.zeros(5, N_CLASSES))
    with pytest.raises(ValueError, match="one column per class"):
        METHODS["oracle_matching"](trained_mlp, mlp_data, forget_idx, oracle_logits=torch.zeros(N_TRAIN, 3))


# ---------------------------------------------------------------- gradient baselines and SCRUB


def cross_entropy_numpy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cross-entropy computed outside torch's loss functions (scipy log-sum-exp)."""
    z = predict_logits(model, x).double().numpy()
    return float(np.mean(scipy.special.logsumexp(z, axis=1) - z[np.arange(len(y)), y.numpy()]))


def test_gradient_ascent_raises_forget_loss(net_and_data, forget_idx):
    model, data = net_and_data
    result = METHODS["gradient_ascent"](model, data, forget_idx, lr=0.1, epochs=10)
    xf, yf = data.x[forget_idx], data.y[forget_idx]
    before, after = cross_entropy_numpy(model, xf, yf), cross_entropy_numpy(result.model, xf, yf)
    assert after > 2 * before


def test_gradient_descent_on_retain_keeps_retain_accuracy(net_and_data, forget_idx):
    model, data = net_and_data
    retain = torch.tensor([i for i in range(N_TRAIN) if i not in set(forget_idx.tolist())])
    result = METHODS["gradient_descent"](model, data, forget_idx, lr=1e-2, epochs=3)
    before = accuracy(model, data.x[retain], data.y[retain])
    after = accuracy(result.model, data.x[retain], data.y[retain])
    assert after >= before - 1 / retain.numel()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), result.model.parameters()))


def test_neggrad_plus_raises_forget_loss_more_than_gradient_descent(trained_mlp, mlp_data, forget_idx):
    common = dict(lr=1e-2, epochs=3, momentum=0.9, weight_decay=5e-4, batch_size=128)
    gd = METHODS["gradient_descent"](trained_mlp, mlp_data, forget_idx, **common).model
    ng = METHODS["neggrad_plus"](trained_mlp, mlp_data, forget_idx, alpha=0.5, **common).model
    xf, yf = mlp_data.x[forget_idx], mlp_data.y[forget_idx]
    assert cross_entropy_numpy(ng, xf, yf) > cross_entropy_numpy(gd, xf, yf)


def test_distillation_kl_matches_scipy():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    t = 2.0
    p_t = scipy.special.softmax(teacher.double().numpy() / t, axis=1)
    p_s = scipy.special.softmax(student.double().numpy() / t, axis=1)
    expected = scipy.special.rel_entr(p_t, p_s).sum(axis=1).mean() * t**2
    assert distillation_kl(student, teacher, t).item() == pytest.approx(expected, rel=1e-5)


def test_scrub_moves_the_forget_set_away_from_the_teacher(trained_mlp, mlp_data, forget_idx):
    result = METHODS["scrub"](trained_mlp, mlp_data, forget_idx, epochs=3, max_steps=3, lr=1e-2)
    xf = mlp_data.x[forget_idx]
    kl = distillation_kl(predict_logits(result.model, xf), predict_logits(trained_mlp, xf), 2.0).item()
    assert kl > 1e-3


# ---------------------------------------------------------------- reference points


def test_retrain_trains_on_exactly_the_retain_set(trained_mlp, mlp_data, forget_idx):
    seen = {}

    def train_fn(retain: UnlearnData, seed: int) -> nn.Module:
        seen["x"], seen["seed"] = retain.x, seed
        return make_mlp(seed)

    result = METHODS["retrain"](trained_mlp, mlp_data, forget_idx, train_fn=train_fn, seed=5, epochs=4)
    keep = np.setdiff1d(np.arange(N_TRAIN), forget_idx.numpy())
    assert torch.equal(seen["x"], mlp_data.x[keep]) and seen["seed"] == 5
    assert result.cost.example_passes == 4 * keep.size  # bare model: epochs × |retain|
    no_epochs = METHODS["retrain"](trained_mlp, mlp_data, forget_idx, train_fn=train_fn)
    assert math.isnan(no_epochs.cost.example_passes)
    with pytest.raises(ValueError, match="nn.Module"):
        METHODS["retrain"](trained_mlp, mlp_data, forget_idx, train_fn=lambda r, s: "not a model")


def test_do_nothing_is_an_identical_copy(trained_mlp, mlp_data, forget_idx):
    result = METHODS["do_nothing"](trained_mlp, mlp_data, forget_idx)
    assert result.cost.example_passes == 0
    assert torch.equal(predict_logits(result.model, mlp_data.x), predict_logits(trained_mlp, mlp_data.x))
