"""Packed unlearning: G models fine-tuned as one computation give each model what it gets alone (same seed, same
draws), up to floating-point rounding. The packed forward here is an independent one: torch.vmap of the
module's own forward over stacked parameters."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call

from unlearning import METHODS
from unlearning.base import StackedPack, predict_logits

from .conftest import N_CLASSES, N_TRAIN, assert_same_state, make_conv_bn, make_mlp, state_snapshot, train

PACKED = ["oracle_matching", "dm_matching", "gradient_descent", "gradient_ascent", "neggrad_plus", "scrub"]
SEEDS = [11, 12, 13]


def vmap_forward(model):
    base = copy.deepcopy(model).to("meta")
    return torch.vmap(lambda params, x: functional_call(base, params, (x,)))


@pytest.fixture(scope="module")
def three_mlps(mlp_data):
    return [train(make_mlp(s), mlp_data, steps=60, seed=s) for s in range(3)]


def inputs_for(name, models, data, forget_idx, packed: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    if name == "oracle_matching":
        # each model its own target (models.om_target "own"): its logits with the classes reversed
        own = [predict_logits(m, data.x).flip(-1) for m in models]
        return {"oracle_logits": own if packed else own[0]}
    if name == "dm_matching":
        weights = 0.1 * torch.randn(forget_idx.numel(), N_TRAIN + 10, N_CLASSES, generator=g)
        own = [torch.cat([predict_logits(m, data.x), torch.zeros(10, N_CLASSES)]) for m in models]
        return {"datamodel_weights": weights, "original_logits": own if packed else own[0]}
    return {}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_exactly_the_fine_tuning_methods_pack(name):
    assert (METHODS[name].packed is not None) == (name in PACKED)


@pytest.mark.parametrize("name", PACKED)
def test_packed_equals_one_at_a_time(name, three_mlps, mlp_data, forget_idx):
    before = [state_snapshot(m) for m in three_mlps]
    # small batches: several steps per epoch, each model its own shuffles
    hp = {"batch_size": 16, "epochs": 2}
    packed = METHODS[name].packed(three_mlps, vmap_forward(three_mlps[0]), mlp_data, forget_idx, seeds=SEEDS,
                                  **inputs_for(name, three_mlps, mlp_data, forget_idx, packed=True), **hp)
    for m, snap in zip(three_mlps, before):
        assert_same_state(m, snap)  # the inputs are never trained
    for g, (model, seed) in enumerate(zip(three_mlps, SEEDS)):
        alone = METHODS[name](model, mlp_data, forget_idx, seed=seed,
                              **inputs_for(name, [model], mlp_data, forget_idx, packed=False), **hp)
        assert packed[g].cost.example_passes == alone.cost.example_passes
        for p, q in zip(packed[g].model.parameters(), alone.model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
        for key in ("finetune_idx", "retain_sample_idx"):
            if key in alone.info:
                assert torch.equal(packed[g].info[key], alone.info[key])
        if "epoch_losses" in alone.info:
            assert packed[g].info["epoch_losses"] == pytest.approx(alone.info["epoch_losses"], rel=1e-4)
    # the models moved, and each its own way
    moved = [torch.cat([p.flatten() for p in r.model.parameters()]) for r in packed]
    assert not torch.equal(moved[0], torch.cat([p.flatten() for p in three_mlps[0].parameters()]))


def test_stacked_pack_refuses_batchnorm(conv_data):
    model = make_conv_bn(0)
    with pytest.raises(ValueError, match="buffers"):
        StackedPack([model, model], vmap_forward(model))


def test_stacked_pack_predicts_each_models_logits(three_mlps, mlp_data):
    logits = StackedPack(three_mlps, vmap_forward(three_mlps[0])).predict(mlp_data.x, batch_size=40)
    for g, m in enumerate(three_mlps):
        torch.testing.assert_close(logits[g], predict_logits(m, mlp_data.x), rtol=1e-5, atol=1e-6)
