"""Generic packing: a task without a hand-written packed forward trains its models packed by `torch.vmap` of the
model's own forward where the model allows it, one at a time otherwise, and says which in the log."""

import dataclasses
import logging

import numpy as np
import pytest
from torch import nn

from pipelines.engine import training
from pipelines.config import RecipeConfig, TaskConfig
from pipelines.tasks import get_task
from pipelines.engine.training import train_models


class Small(nn.Module):
    def __init__(self, num_classes: int = 10, extra: nn.Module | None = None):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(40, 32), nn.Linear(32, num_classes)
        self.extra = extra or nn.Identity()

    def forward(self, x):
        return self.fc2(self.extra(self.fc1(x).relu()))


def small_task(name: str, extra=None):
    task = get_task(TaskConfig(arch="mlp", n_train=300, n_test=100, recipe=RecipeConfig(epochs=3, batch_size=50)))
    return dataclasses.replace(task, name=name, make_model=lambda c: Small(c, extra() if extra else None),
                               packed_forward=None)


@pytest.fixture(autouse=True)
def fresh_log(monkeypatch):
    monkeypatch.setattr(training, "_LOGGED", set())


def test_generic_packing_trains_each_model_as_one_at_a_time(caplog):
    task = small_task("generic")
    data = task.load_data()
    masks = np.random.default_rng(0).random((3, data.n_train)) < 0.5
    with caplog.at_level(logging.INFO, logger="dmu"):
        packed = train_models(task, data, masks, [1, 2, 3], epoch_size=150, pack_size=2)
    assert "packed generically" in caplog.text
    single = train_models(task, data, masks, [1, 2, 3], epoch_size=150, packed=False)
    np.testing.assert_allclose(packed.logits, single.logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(packed.train_loss, single.train_loss, rtol=1e-5)


@pytest.mark.parametrize("extra, why", [(lambda: nn.BatchNorm1d(32), "buffers"),
                                        (lambda: nn.Dropout(0.1), "does not vectorise")])
def test_models_that_cannot_be_vmapped_train_one_at_a_time(caplog, extra, why):
    task = small_task(f"fallback-{why}", extra)
    data = task.load_data()
    with caplog.at_level(logging.INFO, logger="dmu"):
        r = train_models(task, data, np.ones((2, data.n_train), bool), [1, 2])
    assert "one model at a time" in caplog.text and why in caplog.text
    assert np.isfinite(r.logits).all()


def test_hand_written_packed_forward_is_used_as_it_is(caplog):
    task = get_task(TaskConfig(n_train=100, n_test=20, recipe=RecipeConfig(epochs=1, batch_size=50)))
    with caplog.at_level(logging.INFO, logger="dmu"):
        train_models(task, task.load_data(), np.ones((2, 100), bool), [0, 1])
    assert "no packed forward" not in caplog.text
