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
from pipelines.tasks.base import Recipe, Task, TaskData, load_cached

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
    """G ConvNet1Ds at once, each convolution batched matrix products over the models. x (G, b, L) -> (G, b, C).

    Activations stay channels-last, (G, b, positions, channels), so every layer's output is the next one's input
    without a transpose; each convolution applies its ReLU in place and undoes it in its own backward. Measured on
    this 2-core CPU (1 thread, pack 8, with the fused Adam step): 1.7x faster per model than grouped convolutions
    with one group per model, whose CPU kernels are slow with many groups (README, "Performance").
    """
    G = x.shape[0]
    h = _conv1_relu(x, p["conv1.weight"], p["conv1.bias"])
    h = _conv_k3_s2_relu(h, p["conv2.weight"], p["conv2.bias"])
    h = _conv_k3_s2_relu(h, p["conv3.weight"], p["conv3.bias"])
    # ConvNet1D flattens (channels, positions); ours are (positions, channels): permute the weight, not the data
    w = p["linear.weight"]
    w = w.view(G, w.shape[1], h.shape[3], h.shape[2]).transpose(2, 3).flatten(2)
    return _packed_linear(h.flatten(2), w, p["linear.bias"])


def _packed_linear(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Model g's affine map on its rows: h (G, ..., K), w (G, N, K), bias (G, N) -> (G, ..., N), one bmm."""
    rows = h.reshape(h.shape[0], -1, h.shape[-1])
    return torch.baddbmm(bias[:, None, :], rows, w.transpose(1, 2)).view(*h.shape[:-1], w.shape[1])


def _relu_backward(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The gradient through a ReLU whose output was `out` (what autograd's ReLU does)."""
    return torch.ops.aten.threshold_backward(grad, out, 0)


class _Conv1ReLU(torch.autograd.Function):
    """ReLU of the packed first convolution (1 -> C, kernel 5, padding 2): x (G, b, L), w (G, C, 1, 5) -> (G, b, L,
    C). The input's windows (a copy of 5 x L entries per example) meet the weight in one matrix product; no
    gradient flows to the data."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            raise NotImplementedError("the packed MNIST-1D CNN gives no gradient to its input: use the module")
        G, b, L = x.shape
        # the windows and a column of ones, which meets the bias as a sixth tap: no separate pass adds it
        cols = x.new_ones(G, b, L, 6)
        cols[..., :5] = F.pad(x, (2, 2)).unfold(2, 5, 1)
        cols = cols.view(G, b * L, 6)
        out = torch.bmm(cols, torch.cat([w.view(G, -1, 5), bias[..., None]], 2).transpose(1, 2)).relu_()
        ctx.save_for_backward(cols, out)
        return out.view(G, b, L, -1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[None, torch.Tensor, torch.Tensor]:
        cols, out = ctx.saved_tensors
        grad = _relu_backward(grad_out.reshape(out.shape), out)  # (G, rows, C)
        grad_wb = torch.bmm(cols.transpose(1, 2), grad).transpose(1, 2)  # (G, C, 6): the faster of the two orders
        return None, grad_wb[..., :5].unsqueeze(2), grad_wb[..., 5]


class _ConvK3S2ReLU(torch.autograd.Function):
    """ReLU of a packed convolution with kernel 3, stride 2, padding 1 on channels-last h (G, b, L, C), w (G, C_out,
    C, 3) -> (G, b, L/2, C_out).

    Output o sees inputs 2o-1, 2o, 2o+1. Viewed as pairs, a matrix of rows (example, o) = [h[2o], h[2o+1]], h gives
    taps 1 and 2 of output o as it is (one matrix product, no copy), and the odd half of row r is tap 0 of row r + 1:
    a second product added in place one row on, over the flattened rows. Row r + 1 is the next example's first
    output where r is an example's last: those rows are put back (forward), or their gradient is zeroed first
    (backward), so that nothing crosses examples and every number is exact. No window buffer is built: copying the
    overlapping windows cost more than the products they fed (benchmarks/train_throughput.py).
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        G, b, L, C = h.shape
        L2 = L // 2
        pairs = h.view(G, b * L2, 2 * C)
        w12 = w[..., 1:].transpose(2, 3).reshape(G, w.shape[1], 2 * C)  # taps 1, 2 as pairs hold them
        w0 = w[..., 0]  # (G, C_out, C)
        out = torch.baddbmm(bias[:, None, :], pairs, w12.transpose(1, 2))
        first = out[:, ::L2].clone()  # every example's output 0: its tap 0 is the padding
        out[:, 1:].baddbmm_(pairs[:, :-1, C:], w0.transpose(1, 2))
        out[:, ::L2] = first
        out.relu_()
        ctx.save_for_backward(h, out, w12, w0)
        return out.view(G, b, L2, -1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        h, out, w12, w0 = ctx.saved_tensors
        G, b, L, C = h.shape
        L2 = L // 2
        grad = _relu_backward(grad_out.reshape(out.shape), out)  # (G, rows, C_out), ours to change
        pairs = h.view(G, b * L2, 2 * C)
        grad_h = torch.bmm(grad, w12) if ctx.needs_input_grad[0] else None  # (G, rows, 2C)
        grad_w = grad.new_empty(w0.shape + (3,))
        grad_w[..., 1:] = torch.bmm(grad.transpose(1, 2), pairs).view(G, -1, 2, C).transpose(2, 3)
        grad_bias = grad.sum(1)
        grad[:, ::L2] = 0  # outputs 0 take nothing from the odd halves (their tap 0 is the padding)
        if grad_h is not None:
            grad_h[:, :-1, C:].baddbmm_(grad[:, 1:], w0)
            grad_h = grad_h.view(G, b, L, C)
        grad_w[..., 0] = torch.bmm(grad[:, 1:].transpose(1, 2), pairs[:, :-1, C:])
        return grad_h, grad_w, grad_bias


_conv1_relu = _Conv1ReLU.apply
_conv_k3_s2_relu = _ConvK3S2ReLU.apply


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
