"""The unlearn stage's packs on the MNIST-1D CNN (its hand-written packed forward, custom convolution backward
included): each model's logits, passes and diagnostics as when it is unlearned alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.config import RecipeConfig, TaskConfig
from pipelines.engine.apply import unlearn_model, unlearn_pack
from pipelines.tasks import get_task
from pipelines.engine.training import packed_forward, state_vector, train_models

FORGET = np.array([1, 5, 9, 20, 33, 47, 58, 71, 80, 99])


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    task = get_task(TaskConfig(n_train=120, n_test=40, recipe=RecipeConfig(epochs=2, batch_size=32)))
    data = task.load_data()
    result = train_models(task, data, np.ones((3, data.n_train), dtype=bool), [3, 4, 5], return_params=True)
    return task, data, result.params


@pytest.mark.parametrize("method, hparams", [
    ("dm_matching", {"epochs": 2, "batch_size": 16, "retain_multiplier": 3}),
    ("oracle_matching", {"epochs": 2, "batch_size": 16}),
    # SCRUB without max-steps: its first max-step starts at student = teacher, where the KL's gradient is rounding
    # noise (at most 3e-8 here) that Adam (eps 1e-8) turns into a step of 5 % of lr per weight on average, so
    # after it a SCRUB model depends on how its floats were computed (bmm here, conv1d alone): 0.02 apart in
    # logits. tests/unlearning/test_packed.py
    # runs the max-steps packed through vmap, whose rounding is the module's own.
    ("scrub", {"epochs": 2, "max_steps": 0, "batch_size": 32}),
    ("neggrad_plus", {"epochs": 1, "batch_size": 32}),
])
def test_packed_cnn_equals_one_at_a_time(method, hparams, trained):
    task, data, params = trained
    rng = np.random.default_rng(0)
    # Oracle Matching: a target of its own for each model (models.om_target "own")
    own = list(rng.normal(size=(3, data.n_train, 10)).astype(np.float32))
    inputs = {"oracle_matching": {"oracle_logits": own},
              "dm_matching": {"datamodel_weights": 0.05 * rng.normal(size=(len(FORGET), data.n_targets, 10))
                              .astype(np.float32)}}.get(method, {})
    device = torch.device("cpu")
    forward = packed_forward(task, task.build_model(data.num_classes, 0), data.x_train[:1])
    assert forward is task.packed_forward  # the hand-written one
    seeds = [21, 22, 23]
    packed = unlearn_pack(task, data, params, method, FORGET, seeds=seeds, hparams=hparams, inputs=inputs,
                          device=device, forward=forward)
    for g in range(3):
        alone = {"oracle_logits": own[g]} if method == "oracle_matching" else inputs
        model, logits, cost, info = unlearn_model(task, data, params[g], method, FORGET, seed=seeds[g],
                                                  hparams=hparams, inputs=alone, device=device)
        p_logits, p_cost, p_info = packed[g]
        np.testing.assert_allclose(p_logits, logits, rtol=1e-4, atol=1e-4)
        assert p_cost.example_passes == cost.example_passes
        if "epoch_losses" in info:
            np.testing.assert_allclose(p_info["epoch_losses"], info["epoch_losses"], rtol=1e-4)
        # the unlearning moved the model (the comparison is not between two unchanged models)
        assert not np.allclose(state_vector(model).numpy(), params[g])


def test_models_inputs_give_each_model_its_own_oracle():
    from pipelines.engine.apply import method_inputs, models_inputs

    targets = np.arange(3 * 4 * 2, dtype=np.float32).reshape(3, 4, 2)  # 3 models' own oracles, N = 4, C = 2
    pack = method_inputs("oracle_matching", oracle_targets=targets, weight_rows=None)
    for g in range(3):
        np.testing.assert_array_equal(models_inputs("oracle_matching", pack, g)["oracle_logits"], targets[g])
    np.testing.assert_array_equal(models_inputs("oracle_matching", pack, slice(1, 3))["oracle_logits"], targets[1:])
    rows = np.ones((2, 5, 3), np.float32)
    dm = method_inputs("dm_matching", oracle_targets=None, weight_rows=rows)
    assert models_inputs("dm_matching", dm, 1)["datamodel_weights"] is rows  # shared by every model


def test_a_block_larger_than_a_pack_gives_each_pack_its_own_oracles(trained, monkeypatch):
    """A unit's block of models runs in packs of at most CPU_PACK_SIZE on a CPU: each pack matches its own models'
    oracles, so every model ends as when unlearned alone (a block of 3 in packs of 2 here)."""
    from pipelines.engine import training
    from pipelines.engine.apply import unlearn_packs

    monkeypatch.setattr(training, "CPU_PACK_SIZE", 2)
    task, data, params = trained
    own = list(np.random.default_rng(1).normal(size=(3, data.n_train, 10)).astype(np.float32))
    hparams = {"epochs": 2, "batch_size": 16}
    forward = packed_forward(task, task.build_model(data.num_classes, 0), data.x_train[:1])
    packed = unlearn_packs(task, data, params, "oracle_matching", FORGET, seeds=[21, 22, 23], hparams=hparams,
                           inputs={"oracle_logits": own}, device=torch.device("cpu"), forward=forward)
    assert len(packed) == 3
    for g in range(3):
        _, logits, _, _ = unlearn_model(task, data, params[g], "oracle_matching", FORGET, seed=21 + g,
                                        hparams=hparams, inputs={"oracle_logits": own[g]}, device=torch.device("cpu"))
        np.testing.assert_allclose(packed[g][0], logits, rtol=1e-4, atol=1e-4)
