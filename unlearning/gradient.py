"""Gradient baselines of unlearning (docs/methods.md §6): gradient descent on the retain set (GD / fine-tune),
gradient ascent on the forget set (GA) and NegGrad+ (descent on retain, ascent on forget, in one loss).

Data flow: model + training set + forget-set indices in, a fine-tuned copy and its cost out; each body is
written for G models at a time (`base.PackRequest`). The model trains in train mode (BatchNorm batch
statistics, dropout on), as practitioners fine-tune.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unlearning.base import PackRequest, autocast, per_model_cross_entropy, unlearning_method


@dataclass(frozen=True)
class GradientDescentHyperparameters:
    # Passes over the retain set (docs/methods.md §6, A2D: 3 epochs).
    epochs: int = 3
    # SGD learning rate (docs/methods.md §6, A2D: lr 1e-4).
    lr: float = 1e-4
    # SGD momentum (docs/methods.md §6: momentum 0.9).
    momentum: float = 0.9
    # L2 weight decay (docs/methods.md §6: wd 5e-4).
    weight_decay: float = 5e-4
    # Examples per step; project choice, small enough to give several steps per epoch on small CPU-sized sets.
    batch_size: int = 128
    # bf16 autocast on CUDA (ignored on CPU).
    amp: bool = True


@dataclass(frozen=True)
class GradientAscentHyperparameters:
    # Passes over the forget set; project choice (docs/methods.md §6 gives none).
    epochs: int = 3
    # SGD learning rate: tiny, GA is unstable (docs/methods.md §6); the value is a project choice.
    lr: float = 1e-5
    # SGD momentum, as for GD (docs/methods.md §6).
    momentum: float = 0.9
    # No weight decay: ascent should move the model only by the forget-set loss (project choice).
    weight_decay: float = 0.0
    # Examples per step; project choice.
    batch_size: int = 128
    # bf16 autocast on CUDA (ignored on CPU).
    amp: bool = True


@dataclass(frozen=True)
class NegGradPlusHyperparameters:
    # Loss = alpha·CE(retain) − (1 − alpha)·CE(forget) (docs/methods.md §6: alpha ≈ 0.95).
    alpha: float = 0.95
    # Passes over the retain set; the GD setting (docs/methods.md §6), project choice.
    epochs: int = 3
    # SGD learning rate; the GD setting (docs/methods.md §6), project choice.
    lr: float = 1e-4
    # SGD momentum (docs/methods.md §6).
    momentum: float = 0.9
    # L2 weight decay (docs/methods.md §6).
    weight_decay: float = 5e-4
    # Retain examples per step, each paired with up to this many forget examples (project choice).
    batch_size: int = 128
    # bf16 autocast on CUDA (ignored on CPU).
    amp: bool = True


def _sgd(req: PackRequest) -> torch.optim.Optimizer:
    hp = req.hp
    return torch.optim.SGD(req.pack.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)


def _cross_entropy(req: PackRequest, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(G,) each model's mean cross-entropy on its batch x (G, b, ...), y (G, b)."""
    with autocast(req.device, req.hp.amp):
        out = req.pack(x)
    return per_model_cross_entropy(out, y)


def _descend_or_ascend(req: PackRequest, idx: torch.Tensor, sign: float) -> tuple[float, list[dict]]:
    """Train the pack on the examples `idx` with loss sign·CE; returns the example passes spent per model."""
    hp, pack = req.hp, req.pack
    x, y = req.examples(idx)
    optimizer = _sgd(req)
    pack.train()
    passes = 0.0
    for _ in range(hp.epochs):
        for batch in req.batches(idx.numel(), hp.batch_size):
            loss = sign * _cross_entropy(req, x[batch], y[batch]).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            passes += batch.shape[1]
    pack.train(False)
    return passes, [{} for _ in range(req.size)]


@unlearning_method(GradientDescentHyperparameters, packs=True)
def gradient_descent(req: PackRequest) -> tuple[float, list[dict]]:
    """GD / fine-tune: a copy of `model` trained with cross-entropy on the retain set only."""
    return _descend_or_ascend(req, req.retain, 1.0)


@unlearning_method(GradientAscentHyperparameters, packs=True)
def gradient_ascent(req: PackRequest) -> tuple[float, list[dict]]:
    """GA: a copy of `model` trained to increase the cross-entropy on the forget set."""
    return _descend_or_ascend(req, req.forget, -1.0)


@unlearning_method(NegGradPlusHyperparameters, packs=True)
def neggrad_plus(req: PackRequest) -> tuple[float, list[dict]]:
    """NegGrad+: each step descends alpha·CE on a retain batch and ascends (1 − alpha)·CE on a forget batch;
    the forget set is cycled (reshuffled whenever exhausted) alongside one pass over the retain set per
    epoch."""
    hp, forget, retain = req.hp, req.forget, req.retain
    if retain.numel() == 0:
        raise ValueError("the forget set is the whole training set: NegGrad+ needs retain examples.")
    (xr, yr), (xf, yf) = req.examples(retain), req.examples(forget)
    forget_batch = min(hp.batch_size, forget.numel())
    optimizer = _sgd(req)
    req.pack.train()
    passes = 0.0
    forget_queue: list[torch.Tensor] = []
    for _ in range(hp.epochs):
        for rb in req.batches(retain.numel(), hp.batch_size):
            if not forget_queue:
                forget_queue = req.batches(forget.numel(), forget_batch)
            fb = forget_queue.pop(0)
            loss = (hp.alpha * _cross_entropy(req, xr[rb], yr[rb])
                    - (1.0 - hp.alpha) * _cross_entropy(req, xf[fb], yf[fb])).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            passes += rb.shape[1] + fb.shape[1]
    req.pack.train(False)
    return passes, [{} for _ in range(req.size)]
