"""CIFAR-10 on a tiny stand-in written in CIFAR-10's on-disk format (the real files cannot be downloaded here)."""

import pickle

import numpy as np
import pytest
import torch

from pipelines.config import RecipeConfig, TaskConfig
from pipelines.tasks import DataError, cifar10, get_task
from pipelines.engine.training import train_models


def write_standin(root, per_batch=8, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = {}
    for name in names:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, per_batch))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
        batches[name] = batch
    return batches


def test_loads_standin_in_cifar_format(tmp_path):
    batches = write_standin(tmp_path)
    data = get_task(TaskConfig(name="cifar10")).load_data(tmp_path)
    assert data.x_train.shape == (40, 3, 32, 32) and data.x_test.shape == (8, 3, 32, 32)
    # pixel (channel 1, row 2, col 3) of the 3rd image of batch 2, normalised with CIFAR-10's mean and std
    raw = batches["data_batch_2"][b"data"][2].reshape(3, 32, 32)[1, 2, 3]
    expected = (raw / 255.0 - 0.4822) / 0.2435
    assert data.x_train[8 + 2, 1, 2, 3].item() == pytest.approx(expected, rel=1e-5)
    assert data.y_train[8 + 2].item() == batches["data_batch_2"][b"labels"][2]


def test_missing_offline_says_where_to_put_files(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match=r"put the extracted 'cifar-10-batches-py' folder .* under .*cifar10"):
        get_task(TaskConfig(name="cifar10")).load_data(tmp_path)


def test_resnet9_trains_on_standin(tmp_path):
    write_standin(tmp_path, per_batch=4)
    task = get_task(TaskConfig(name="cifar10", recipe=RecipeConfig(epochs=1, batch_size=10)))
    data = task.load_data(tmp_path)
    r = train_models(task, data, np.ones((1, 20), bool), [0], device="cpu")
    assert r.logits.shape == (1, 24, 10) and np.isfinite(r.logits).all()
    assert task.packed_forward is None  # ResNet-9 trains one model at a time (BatchNorm)


def test_augment_is_seeded_flip_and_shift():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    a = cifar10.augment(x, torch.Generator().manual_seed(1))
    b = cifar10.augment(x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert a.shape == x.shape
