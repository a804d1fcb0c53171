import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import stack_module_state

from pipelines.config import RecipeConfig, TaskConfig
from pipelines.tasks import get_task
from pipelines.engine.training import load_state_vector, minibatch_streams, state_vector, train_models


@pytest.mark.parametrize("arch", ["cnn", "mlp"])
def test_packed_forward_equals_each_model(arch):
    task = get_task(TaskConfig(arch=arch))
    models = [task.build_model(10, seed) for seed in range(5)]
    stacked, _ = stack_module_state(models)
    x = torch.randn(5, 7, 40)
    packed = task.packed_forward(stacked, x)
    for g, m in enumerate(models):
        torch.testing.assert_close(packed[g], m(x[g]), rtol=1e-5, atol=1e-5)


def test_packed_gradient_is_each_models_own():
    """The summed per-model mean loss gives every model exactly the gradient of its own loss."""
    task = get_task(TaskConfig())
    models = [task.build_model(10, seed) for seed in range(3)]
    stacked, _ = stack_module_state(models)
    x, y = torch.randn(3, 16, 40), torch.randint(0, 10, (3, 16))
    out = task.packed_forward(stacked, x)
    (F.cross_entropy(out.reshape(48, 10), y.reshape(-1), reduction="sum") / 16).backward()
    for g, m in enumerate(models):
        F.cross_entropy(m(x[g]), y[g]).backward()
        for name, p in m.named_parameters():
            torch.testing.assert_close(stacked[name].grad[g], p.grad, rtol=1e-4, atol=1e-6)


def test_minibatch_streams_cycle_through_own_examples():
    masks = np.zeros((2, 30), bool)
    masks[0, :10] = True
    masks[1, 20:] = True
    s = minibatch_streams(masks, [1, 2], n_steps=5, batch_size=4).numpy()
    assert s.shape == (2, 5, 4)
    assert set(s[0].ravel()) <= set(range(10)) and set(s[1].ravel()) <= set(range(20, 30))
    assert sorted(s[0].ravel()[:10]) == list(range(10))  # the first epoch is a permutation of the subset
    np.testing.assert_array_equal(s, minibatch_streams(masks, [1, 2], 5, 4).numpy())


@pytest.mark.slow
def test_packed_and_one_at_a_time_learn_alike_and_deterministically():
    task = get_task(TaskConfig(n_train=600, n_test=300, recipe=RecipeConfig(epochs=8, batch_size=64)))
    data = task.load_data()
    masks = np.ones((2, data.n_train), bool)
    packed = train_models(task, data, masks, [11, 12])
    again = train_models(task, data, masks, [11, 12])
    np.testing.assert_array_equal(packed.logits, again.logits)  # same seeds, same numbers
    single = train_models(task, data, masks, [11, 12], packed=False)
    y_test = data.y_test.numpy()
    acc_p = (packed.logits[:, data.n_train:].argmax(-1) == y_test).mean()
    acc_s = (single.logits[:, data.n_train:].argmax(-1) == y_test).mean()
    assert acc_p > 0.4 and acc_s > 0.4  # chance is 0.1
    # same init and minibatches, the two engines differ only by float rounding: predictions mostly agree
    agree = (packed.logits.argmax(-1) == single.logits.argmax(-1)).mean()
    assert agree > 0.8, agree
    assert packed.logits.shape == (2, data.n_targets, 10)


def test_state_vector_roundtrip():
    task = get_task(TaskConfig())
    a, b = task.build_model(10, 0), task.build_model(10, 1)
    load_state_vector(b, state_vector(a))
    x = torch.randn(3, 40)
    torch.testing.assert_close(a(x), b(x))
    with pytest.raises(ValueError, match="entries"):
        load_state_vector(b, torch.zeros(5))


def test_returned_params_rebuild_the_trained_models():
    task = get_task(TaskConfig(n_train=100, n_test=20, recipe=RecipeConfig(epochs=2, batch_size=32)))
    data = task.load_data()
    r = train_models(task, data, np.ones((2, 100), bool), [0, 1], return_params=True)
    model = load_state_vector(task.build_model(10, 99), r.params[1])
    with torch.no_grad():
        np.testing.assert_allclose(model(data.x_targets).numpy(), r.logits[1], rtol=1e-4, atol=1e-4)


def test_each_model_trains_alike_whatever_the_pack_size():
    """Model i's result depends on its mask, seed and recipe only: packs of 1, 2 and 3 give the same models (to
    float rounding: the batched products' kernels depend on the batch count, as grouped convolutions' did)."""
    task = get_task(TaskConfig(n_train=300, n_test=100, recipe=RecipeConfig(epochs=3, batch_size=50)))
    data = task.load_data()
    masks = np.random.default_rng(0).random((3, data.n_train)) < 0.5
    runs = [train_models(task, data, masks, [5, 6, 7], epoch_size=150, pack_size=size) for size in (1, 2, 3)]
    for r in runs[1:]:
        np.testing.assert_allclose(r.logits, runs[0].logits, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(r.train_loss, runs[0].train_loss, rtol=1e-5)


def test_tasks_do_not_import_the_engine():
    """pipelines.tasks owns Task, TaskData and Recipe; the engine imports them (and re-exports Recipe)."""
    code = ("import sys, pipelines.tasks.mnist1d, pipelines.tasks.cifar10; "
            "assert 'pipelines.engine.training' not in sys.modules, 'pipelines.tasks imports the engine'; "
            "from pipelines.engine.training import Recipe; assert Recipe is pipelines.tasks.Recipe")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[3])


def test_packs_on_threads_equal_packs_one_after_another():
    """With several torch threads, a block's packs train side by side in Python threads, each on one torch thread:
    the same numbers, bit for bit, as the same packs one after another on one thread; the thread count is restored."""
    task = get_task(TaskConfig(n_train=300, n_test=100, recipe=RecipeConfig(epochs=2, batch_size=50)))
    data = task.load_data()
    masks = np.random.default_rng(1).random((5, data.n_train)) < 0.5
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = train_models(task, data, masks, range(5), epoch_size=150, pack_size=2)
        torch.set_num_threads(2)
        threaded = train_models(task, data, masks, range(5), epoch_size=150, pack_size=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    np.testing.assert_array_equal(threaded.logits, serial.logits)
    np.testing.assert_array_equal(threaded.train_loss, serial.train_loss)
