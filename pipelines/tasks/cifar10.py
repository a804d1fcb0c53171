"""CIFAR-10 with ResNet-9: the seed paper's setting (A2D, arXiv 2410.23232), for a GPU cluster.

Data: the standard python batches (`cifar-10-batches-py/`) under data/cifar10, downloaded by torchvision when online;
offline and missing is one clear error saying where to put them. The batches are read directly (pickle), so a small
stand-in in the same on-disk format serves the tests. Model and recipe: the ResNet-9 of the FFCV CIFAR-10 example,
which the datamodels and A2D code train (24 epochs, batch 512, SGD, peak lr 0.5 at epoch 2, label smoothing 0.1,
flip + translate augmentation); retraining costs 24 x 50k = 1.2M example passes (docs/methods.md §3).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipelines.config import ConfigError
from pipelines.tasks.base import DataError, Recipe, Task, TaskData

RECIPE = Recipe(
    epochs=24,  # FFCV CIFAR-10 example / A2D
    batch_size=512,
    lr=0.5,  # peak SGD learning rate at batch 512
    weight_decay=5e-4,
    optimizer="sgd",  # momentum 0.9, nesterov
    schedule="onecycle",
    warmup=2 / 24,  # peak at epoch 2, then linear decay to 0
    label_smoothing=0.1,
)

MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
BATCHES = "cifar-10-batches-py"


def conv_bn(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, padding: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Residual(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)


class ResNet9(nn.Module):
    """ResNet-9 of the FFCV CIFAR-10 example (about 2.3M parameters)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            conv_bn(3, 64), conv_bn(64, 128, kernel=5, stride=2, padding=2),
            Residual(nn.Sequential(conv_bn(128, 128), conv_bn(128, 128))),
            conv_bn(128, 256), nn.MaxPool2d(2),
            Residual(nn.Sequential(conv_bn(256, 256), conv_bn(256, 256))),
            conv_bn(256, 128, padding=0), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
            nn.Linear(128, num_classes, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * 0.2  # output scale of the FFCV model


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and random translation by up to 2 pixels (reflect padding), on the device."""
    b = x.shape[0]
    flip = torch.rand(b, generator=gen, device=x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    pad = 2
    padded = nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=gen, device=x.device).tolist()
    return padded[:, :, dy:dy + x.shape[2], dx:dx + x.shape[3]]


def _read_batches(root: Path) -> dict[str, np.ndarray]:
    def read(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for name in names:
            with open(root / BATCHES / name, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    x, y = read([f"data_batch_{i}" for i in range(1, 6)])
    x_test, y_test = read(["test_batch"])
    return {"x": x, "y": y, "x_test": x_test, "y_test": y_test}


def ensure_downloaded(root: Path) -> None:
    """Download through torchvision when the batches are missing; offline, say where to put them."""
    if (root / BATCHES / "test_batch").exists():
        return
    try:
        import torchvision

        torchvision.datasets.CIFAR10(root=str(root), train=True, download=True)
    except Exception as exc:  # no network, or a broken partial download
        raise DataError(
            f"CIFAR-10 is not in {root / BATCHES} and could not be downloaded ({type(exc).__name__}): put the "
            f"extracted 'cifar-10-batches-py' folder of cifar-10-python.tar.gz under {root}") from exc


def load(data_dir: Path) -> TaskData:
    root = Path(data_dir) / "cifar10"
    ensure_downloaded(root)
    try:
        d = _read_batches(root)
    except (OSError, KeyError, pickle.UnpicklingError, ValueError) as exc:
        raise DataError(f"CIFAR-10 files under {root / BATCHES} are unreadable ({exc}): delete the folder to "
                        "download again, or replace it with the extracted cifar-10-python.tar.gz") from exc

    def norm(x: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(x).float() / 255.0 - MEAN) / STD

    return TaskData(norm(d["x"]), torch.from_numpy(d["y"]), norm(d["x_test"]), torch.from_numpy(d["y_test"]),
                    num_classes=10)


def task(arch: str | None) -> Task:
    if arch not in (None, "resnet9"):
        raise ConfigError(f"unknown task.arch {arch!r} for cifar10; known: resnet9")
    return Task(name="cifar10", arch="resnet9", recipe=RECIPE, load=load, make_model=ResNet9, augment=augment)
