"""Tests of MU-Mis: its loss and parameter gradient against finite differences (float64), per-sample input
gradients against per-example Jacobians, the target-class term's effect on forget accuracy, and the delta stop
rule."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from torch import nn

from unlearning import METHODS, UnlearnData, mu_mis
from unlearning.mumis import MuMisHyperparameters, _input_gradients, mu_mis_loss

from .conftest import accuracy, assert_same_state, state_snapshot


def tiny_smooth_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def fd_input_gradient(
    model: nn.Module, x: torch.Tensor, classes: torch.Tensor, h: float = 1e-6
) -> torch.Tensor:
    """∂f_{k_i}(x_i)/∂x_i by central differences, one sample and one coordinate at a time."""
    grad = torch.zeros_like(x)
    with torch.no_grad():
        for i in range(x.shape[0]):
            for j in range(x.shape[1]):
                e = torch.zeros_like(x[i])
                e[j] = h
                up = model((x[i] + e)[None])[0, classes[i]]
                down = model((x[i] - e)[None])[0, classes[i]]
                grad[i, j] = (up - down) / (2 * h)
    return grad


def test_mu_mis_loss_matches_finite_differences():
    model = tiny_smooth_net()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    y, irrelevant = torch.tensor([0, 1, 2, 0]), torch.tensor([2, 0, 1, 1])
    g_c, g_o = fd_input_gradient(model, x, y), fd_input_gradient(model, x, irrelevant)
    expected = (g_c.pow(2).sum(1) - g_o.pow(2).sum(1)).mean()
    assert mu_mis_loss(model, x, y, irrelevant).item() == pytest.approx(expected.item(), rel=1e-7, abs=1e-9)
    expected_half = (g_c.pow(2).sum(1) - 0.5 * g_o.pow(2).sum(1)).mean()
    assert mu_mis_loss(model, x, y, irrelevant, 0.5).item() == pytest.approx(expected_half.item(), rel=1e-7)


def test_mu_mis_parameter_gradient_matches_finite_differences():
    """The double backward (through input gradients built with create_graph) against central differences of
    the loss in every parameter entry."""
    model = tiny_smooth_net()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    y, irrelevant = torch.tensor([0, 1, 2, 0]), torch.tensor([2, 0, 1, 1])
    model.zero_grad()
    mu_mis_loss(model, x, y, irrelevant).backward()
    h = 1e-6
    for param in model.parameters():
        fd = torch.zeros_like(param)
        for k in range(param.numel()):
            with torch.no_grad():
                param.view(-1)[k] += h
            up = mu_mis_loss(model, x, y, irrelevant).item()
            with torch.no_grad():
                param.view(-1)[k] -= 2 * h
            down = mu_mis_loss(model, x, y, irrelevant).item()
            with torch.no_grad():
                param.view(-1)[k] += h
            fd.view(-1)[k] = (up - down) / (2 * h)
        # The output bias does not enter any input gradient: autograd leaves its grad None, differences give
        # 0.
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)


def test_batched_input_gradients_are_per_sample_only_in_eval_mode(trained_conv_bn, conv_data):
    """With BatchNorm in eval mode the gradient of a batch-summed logit is the stack of per-sample gradients
    (checked against one Jacobian per example); in train mode samples interact through batch statistics."""
    model = copy.deepcopy(trained_conv_bn).double().eval()
    x, y = conv_data.x[:6].double(), conv_data.y[:6]
    (batched,) = _input_gradients(model, x, [y], create_graph=False)
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda xi: model(xi[None])[0, y[i]], x[i])
        torch.testing.assert_close(batched[i], jac)
    model.train()
    (mixed,) = _input_gradients(model, x, [y], create_graph=False)
    assert not torch.allclose(mixed, batched, atol=1e-6)


def test_mu_mis_takes_only_the_model_and_the_forget_set():
    assert list(inspect.signature(mu_mis).parameters) == ["model", "forget", "hp", "seed"]


def test_methods_entry_runs_mu_mis_on_the_forget_slice(trained_mlp, mlp_data, forget_idx):
    hp = MuMisHyperparameters(max_steps=3, delta=math.inf)
    via_entry = METHODS["mu_mis"](trained_mlp, mlp_data, forget_idx, hparams=hp, seed=2).model
    direct = mu_mis(trained_mlp, mlp_data.subset(forget_idx), hp, seed=2).model
    assert_same_state(via_entry, state_snapshot(direct))


def test_target_class_term_alone_lowers_forget_accuracy(trained_mlp, mlp_data, forget_idx):
    forget = mlp_data.subset(forget_idx)
    assert accuracy(trained_mlp, forget.x, forget.y) == 1.0
    result = mu_mis(
        trained_mlp,
        forget,
        MuMisHyperparameters(irrelevant_weight=0.0, delta=math.inf, max_steps=50, lr=1e-2),
    )
    assert accuracy(result.model, forget.x, forget.y) <= 0.5


def per_sample_sensitivity(model: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> float:
    """Mean over examples of ‖∂f_{k_i}/∂x_i‖, one Jacobian per example (independent of the batched trick)."""
    model = model.eval()
    norms = [
        torch.autograd.functional.jacobian(lambda xi: model(xi[None])[0, classes[i]], x[i]).norm()
        for i in range(x.shape[0])
    ]
    return torch.stack(norms).mean().item()


def test_small_delta_stops_after_the_first_step(trained_conv_bn, conv_data, forget_idx):
    forget = conv_data.subset(forget_idx)
    result = mu_mis(trained_conv_bn, forget, MuMisHyperparameters(delta=0.5, max_steps=50))
    assert result.info["steps"] == 1 and result.info["stopped_by"] == "delta"
    check = result.info["check_classes"]
    assert bool((check != forget.y).all())
    ratio = per_sample_sensitivity(result.model, forget.x, check) / per_sample_sensitivity(
        trained_conv_bn, forget.x, check
    )
    assert result.info["sensitivity_ratios"] == [pytest.approx(ratio, rel=1e-4)]
    assert ratio > 0.5


def test_stop_rule_threshold_and_max_steps(trained_mlp, mlp_data, forget_idx):
    forget = mlp_data.subset(forget_idx)
    capped = mu_mis(trained_mlp, forget, MuMisHyperparameters(delta=math.inf, max_steps=4, lr=1e-3))
    assert capped.info["steps"] == 4 and capped.info["stopped_by"] == "max_steps"
    ratios = capped.info["sensitivity_ratios"]
    # A threshold between the ratios after steps 2 and 3 must stop exactly at step 3 (same seed, same run).
    assert ratios[0] < ratios[1] < ratios[2] < ratios[3]
    delta = (ratios[1] + ratios[2]) / 2
    stopped = mu_mis(trained_mlp, forget, MuMisHyperparameters(delta=delta, max_steps=50, lr=1e-3))
    assert stopped.info["steps"] == 3 and stopped.info["stopped_by"] == "delta"
    assert stopped.info["sensitivity_ratios"] == ratios[:3]


def test_mu_mis_keeps_batchnorm_statistics_and_returns_eval_mode(trained_conv_bn, conv_data, forget_idx):
    hp = MuMisHyperparameters(max_steps=3, delta=math.inf)
    result = mu_mis(trained_conv_bn, conv_data.subset(forget_idx), hp)
    original, unlearned = trained_conv_bn.state_dict(), result.model.state_dict()
    for name in original:
        if "running" in name or "num_batches" in name:
            assert torch.equal(original[name], unlearned[name]), name
    assert not torch.equal(original["0.weight"], unlearned["0.weight"])
    assert not result.model.training


def test_mu_mis_rejects_labels_outside_the_model_classes(trained_mlp):
    forget = UnlearnData(torch.zeros(2, 16), torch.tensor([0, 9]))
    with pytest.raises(ValueError, match=r"forget labels must lie in \[0, 4\)"):
        mu_mis(trained_mlp, forget)


def test_an_overflowing_step_is_rolled_back(trained_mlp, mlp_data, forget_idx):
    """Without the delta rule, maximising the irrelevant-class term diverges; the run stops at the first
    non-finite step and returns the last finite weights."""
    forget = mlp_data.subset(forget_idx)
    result = mu_mis(trained_mlp, forget, MuMisHyperparameters(delta=math.inf, max_steps=200, lr=1e-2))
    assert result.info["stopped_by"] == "non_finite"
    assert result.info["steps"] == len(result.info["sensitivity_ratios"]) < 200
    assert all(math.isfinite(r) for r in result.info["sensitivity_ratios"])
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_gap_rule_stops_when_the_target_sensitivity_no_longer_exceeds_the_irrelevant(
    trained_mlp, mlp_data, forget_idx
):
    forget = mlp_data.subset(forget_idx)
    hp = MuMisHyperparameters(stop="gap", max_steps=200, lr=1e-2)
    result = mu_mis(trained_mlp, forget, hp, seed=1)
    info = result.info
    assert info["stopped_by"] == "gap_closed" and info["steps"] >= 1
    ratios = info["target_ratios"]
    assert len(ratios) == info["steps"] + 1  # before the first step, then after each
    assert all(r > 1.0 for r in ratios[:-1]) and ratios[-1] <= 1.0
    # the last ratio, recomputed one Jacobian per example on the returned model
    check = info["check_classes"]
    expected = per_sample_sensitivity(result.model, forget.x, forget.y) / per_sample_sensitivity(
        result.model, forget.x, check
    )
    assert ratios[-1] == pytest.approx(expected, rel=1e-4)
    # the delta rule with no threshold runs the same updates until max_steps
    capped = mu_mis(trained_mlp, forget, MuMisHyperparameters(delta=math.inf, max_steps=info["steps"], lr=1e-2),
                    seed=1)
    assert_same_state(capped.model, state_snapshot(result.model))


def test_gap_rule_takes_no_step_where_the_forget_set_shows_no_gap():
    # a linear model whose class-0 logit ignores the input: the forget points (all class 0) show no gap
    model = tiny_smooth_net()
    with torch.no_grad():
        model[2].weight[0] = 0.0
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    forget = UnlearnData(x, torch.zeros(6, dtype=torch.long))
    result = mu_mis(model, forget, MuMisHyperparameters(stop="gap", max_steps=5), seed=0)
    assert result.info["target_ratios"] == [0.0]
    assert result.info["steps"] == 0 and result.info["stopped_by"] == "gap_closed"
    assert_same_state(result.model, state_snapshot(model))


def test_mu_mis_gap_entry_reads_only_the_forget_set(trained_mlp, mlp_data, forget_idx):
    poisoned = UnlearnData(mlp_data.x.clone(), mlp_data.y.clone())
    retain = torch.ones(len(mlp_data), dtype=torch.bool)
    retain[forget_idx] = False
    poisoned.x[retain] = torch.randn_like(poisoned.x[retain]) * 100
    poisoned.y[retain] = (poisoned.y[retain] + 1) % int(mlp_data.y.max() + 1)
    hp = METHODS["mu_mis_gap"].Hyperparameters(max_steps=5, lr=1e-2)
    assert hp.stop == "gap"
    clean = METHODS["mu_mis_gap"](trained_mlp, mlp_data, forget_idx, hparams=hp, seed=3)
    dirty = METHODS["mu_mis_gap"](trained_mlp, poisoned, forget_idx, hparams=hp, seed=3)
    assert_same_state(dirty.model, state_snapshot(clean.model))
    direct = mu_mis(trained_mlp, mlp_data.subset(forget_idx), MuMisHyperparameters(stop="gap", max_steps=5, lr=1e-2),
                    seed=3)
    assert_same_state(clean.model, state_snapshot(direct.model))


def test_unknown_stop_rule_is_one_clear_error():
    with pytest.raises(ValueError, match="stop rule 'halt' is unknown: use one of delta, gap"):
        MuMisHyperparameters(stop="halt")
