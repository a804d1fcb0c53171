"""MNIST-1D (Greydanus & Kalais 2020): the embedded default task.

The data set is generated locally by the `mnist1d` package with its default arguments (seed 42: 4,000 training and
1,000 test sequences of length 40, 10 classes) and cached in data/mnist1d.npz. Architectures: the paper's 1-D conv
net (`ConvBase`: about 6.5k parameters) and its MLP, each with a packed forward that trains many models as one
computation (each layer a batched matrix product over the models).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.config import ConfigError
from pipelines.tasks import Recipe, Task, TaskData, load_cached

# The MNIST-1D paper's recipe (Adam, lr 1e-2, batch 100, 6,000 steps = 150 epochs of 4,000 examples, constant lr).
# Measured here on the full training set, 4 CNNs packed: 94.8% mean test accuracy (paper: ~94%); a 60-epoch
# one-cycle schedule reached 93.6%. Subset-model configs shorten `epochs`.
RECIPE = Recipe(
    epochs=150,  # passes over each model's training examples
    batch_size=100,  # examples per step, per model
    lr=1e-2,  # Adam learning rate (the paper's value)
    weight_decay=0.0,  # the paper uses none
    optimizer="adam",
    schedule="constant",
)


class ConvNet1D(nn.Module):
    """The MNIST-1D paper's CNN: conv 1→25 k5, 25→25 k3 s2, 25→25 k3 s2 (ReLU), linear 250→10."""

    def __init__(self, num_classes: int = 10, channels: int = 25, length: int = 40):
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=1, padding=2)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.linear = nn.Linear(channels * (length // 4), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x.unsqueeze(1)).relu()
        h = self.conv2(h).relu()
        h = self.conv3(h).relu()
        return self.linear(h.flatten(1))


def convnet_packed_forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """G ConvNet1Ds at once, each convolution a batched matrix product over the models. x (G, b, L) -> (G, b, C).

    Activations stay channels-last, (G, b, positions, channels), so every layer's output is the next one's input
    without a transpose. Measured on this 2-core CPU (1 thread, pack 8, with the fused Adam step): 1.7x faster per
    model than grouped convolutions with one group per model, whose CPU kernels are slow with many groups
    (README, "Performance").
    """
    G = x.shape[0]
    # conv1 (1 -> C, kernel 5, padding 2): the windows of the input (a copy of 5 x L entries per example)
    cols = F.pad(x, (2, 2)).unfold(2, 5, 1)  # (G, b, L, 5)
    h = _packed_linear(cols, p["conv1.weight"].flatten(2), p["conv1.bias"]).relu()
    h = _conv_k3_s2(h, p["conv2.weight"], p["conv2.bias"]).relu()
    h = _conv_k3_s2(h, p["conv3.weight"], p["conv3.bias"]).relu()
    # ConvNet1D flattens (channels, positions); ours are (positions, channels): permute the weight, not the data
    w = p["linear.weight"]
    w = w.view(G, w.shape[1], h.shape[3], h.shape[2]).transpose(2, 3).flatten(2)
    return _packed_linear(h.flatten(2), w, p["linear.bias"])


def _packed_linear(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Model g's affine map on its rows: h (G, ..., K), w (G, N, K), bias (G, N) -> (G, ..., N), one bmm."""
    rows = h.reshape(h.shape[0], -1, h.shape[-1])
    return torch.baddbmm(bias[:, None, :], rows, w.transpose(1, 2)).view(*h.shape[:-1], w.shape[1])


class _ConvK3S2(torch.autograd.Function):
    """Packed convolution with kernel 3, stride 2, padding 1 on channels-last h (G, b, L, C), w (G, C_out, C, 3).

    Output o sees inputs 2o-1, 2o, 2o+1: viewed as pairs (G, b, L/2, 2C), h gives [h[2o], h[2o+1]] as they are,
    and the odd half shifted by one gives h[2o-1] (zero at o = 0). Both are copied into one buffer of windows
    (tap, channel), which meets the weight reordered the same way in one matrix product. The backward is written
    out because autograd's (through unfold, or cat + pad) spends more time filling and adding than the products:
    it is the windows' gradient, whose taps 1, 2 are h's gradient and tap 0 adds to the odd positions before.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        G, b, L, C = h.shape
        pairs = h.view(G, b, L // 2, 2 * C)
        cols = h.new_empty(G, b, L // 2, 3 * C)
        cols[..., C:] = pairs
        cols[:, :, 1:, :C] = pairs[:, :, :-1, C:]
        cols[:, :, 0, :C] = 0
        w = w.transpose(2, 3).flatten(2)  # (G, C_out, 3C), taps outer as in cols
        ctx.save_for_backward(cols, w)
        return _packed_linear(cols, w, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cols, w = ctx.saved_tensors
        G, b, L2, C3 = cols.shape
        C = C3 // 3
        grad_rows = grad_out.reshape(G, -1, grad_out.shape[-1])
        grad_w = torch.bmm(grad_rows.transpose(1, 2), cols.view(G, -1, C3))  # (G, C_out, 3C)
        grad_cols = torch.bmm(grad_rows, w).view(G, b, L2, C3)
        grad_h = grad_cols[..., C:].clone()  # taps 1, 2: h[2o], h[2o+1]
        grad_h[:, :, :-1, C:] += grad_cols[:, :, 1:, :C]  # tap 0 of output o + 1: h[2o+1]
        return (grad_h.view(G, b, 2 * L2, C), grad_w.view(G, -1, 3, C).transpose(2, 3),
                grad_rows.sum(1))


_conv_k3_s2 = _ConvK3S2.apply


class MLP(nn.Module):
    """The MNIST-1D paper's MLP: 40 → 100 → 100 → 10 with ReLUs."""

    def __init__(self, num_classes: int = 10, width: int = 100, length: int = 40):
        super().__init__()
        self.fc1 = nn.Linear(length, width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.fc2(self.fc1(x).relu()).relu())


def mlp_packed_forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """G MLPs at once as batched matrix products. x (G, b, L) -> (G, b, C)."""
    h = _packed_linear(x, p["fc1.weight"], p["fc1.bias"]).relu()
    h = _packed_linear(h, p["fc2.weight"], p["fc2.bias"]).relu()
    return _packed_linear(h, p["fc3.weight"], p["fc3.bias"])


def load(data_dir: Path) -> TaskData:
    def make() -> dict[str, np.ndarray]:
        from mnist1d.data import get_dataset_args, make_dataset

        d = make_dataset(get_dataset_args())  # generated locally, seed 42 (get_dataset would download)
        return {k: d[k] for k in ("x", "y", "x_test", "y_test")}

    d = load_cached(Path(data_dir) / "mnist1d.npz", make)
    as_x = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))  # noqa: E731
    as_y = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64))  # noqa: E731
    return TaskData(as_x(d["x"]), as_y(d["y"]), as_x(d["x_test"]), as_y(d["y_test"]), num_classes=10)


def task(arch: str | None) -> Task:
    archs = {"cnn": (ConvNet1D, convnet_packed_forward), "mlp": (MLP, mlp_packed_forward)}
    arch = arch or "cnn"
    if arch not in archs:
        raise ConfigError(f"unknown task.arch {arch!r} for mnist1d; known: {', '.join(archs)}")
    model_cls, packed = archs[arch]
    return Task(name="mnist1d", arch=arch, recipe=RECIPE, load=load,
                make_model=lambda num_classes: model_cls(num_classes), packed_forward=packed)
