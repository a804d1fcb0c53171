"""Gradient baselines of unlearning (reference.md §6): gradient descent on the retain set (GD / fine-tune),
gradient ascent on the forget set (GA) and NegGrad+ (descent on retain, ascent on forget, in one loss).

Data flow: model + training set + forget-set indices in, a fine-tuned copy and its cost out. The model trains
in train mode (BatchNorm batch statistics, dropout on), as practitioners fine-tune.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unlearning.base import (
    UnlearnRequest,
    autocast,
    copy_model,
    shuffled_batches,
    trainable_parameters,
    unlearning_method,
)


@dataclass(frozen=True)
class GradientDescentHyperparameters:
    # Passes over the retain set (reference.md §6, A2D: 3 epochs).
    epochs: int = 3
    # SGD learning rate (reference.md §6, A2D: lr 1e-4).
    lr: float = 1e-4
    # SGD momentum (reference.md §6: momentum 0.9).
    momentum: float = 0.9
    # L2 weight decay (reference.md §6: wd 5e-4).
    weight_decay: float = 5e-4
    # Examples per step; project choice, small enough to give several steps per epoch on small CPU-sized sets.
    batch_size: int = 128
    # bf16 autocast on CUDA (ignored on CPU).
    amp: bool = True


@dataclass(frozen=True)
class GradientAscentHyperparameters:
    # Passes over the forget set; project choice (reference.md §6 gives none).
    epochs: int = 3
    # SGD learning rate: tiny, GA is unstable (reference.md §6); the value is a project choice.
    lr: float = 1e-5
    # SGD momentum, as for GD (reference.md §6).
    momentum: float = 0.9
    # No weight decay: ascent should move the model only by the forget-set loss (project choice).
    weight_decay: float = 0.0
    # Examples per step; project choice.
    batch_size: int = 128
    # bf16 autocast on CUDA (ignored on CPU).
    amp: bool = True


@dataclass(frozen=True)
class NegGradPlusHyperparameters:
    # Loss = alpha·CE(retain) − (1 − alpha)·CE(forget) (reference.md §6: alpha ≈ 0.95).
    alpha: float = 0.95
    # Passes over the retain set; the GD setting (reference.md §6), project choice.
    epochs: int = 3
    # SGD learning rate; the GD setting (reference.md §6), project choice.
    lr: float = 1e-4
    # SGD momentum (reference.md §6).
    momentum: float = 0.9
    # L2 weight decay (reference.md §6).
    weight_decay: float = 5e-4
    # Retain examples per step, each paired with up to this many forget examples (project choice).
    batch_size: int = 128
    # bf16 autocast on CUDA (ignored on CPU).
    amp: bool = True


def _sgd(model: nn.Module, hp: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        trainable_parameters(model), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
    )


def _cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, amp: bool):
    with autocast(device, amp):
        out = model(x)
    return F.cross_entropy(out.float(), y)


def _descend_or_ascend(req: UnlearnRequest, idx: torch.Tensor, sign: float) -> tuple[nn.Module, float, dict]:
    """A copy of the model trained on the examples `idx` with loss sign·CE, and the example passes spent."""
    hp, device = req.hp, req.device
    model = copy_model(req.model)
    x, y = req.examples(idx)
    optimizer = _sgd(model, hp)
    model.train()
    passes = 0.0
    for _ in range(hp.epochs):
        for batch in shuffled_batches(idx.numel(), hp.batch_size, req.generator):
            batch = batch.to(device)
            loss = sign * _cross_entropy(model, x[batch], y[batch], device, hp.amp)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            passes += batch.numel()
    model.eval()
    return model, passes, {}


@unlearning_method(GradientDescentHyperparameters)
def gradient_descent(req: UnlearnRequest) -> tuple[nn.Module, float, dict]:
    """GD / fine-tune: a copy of `model` trained with cross-entropy on the retain set only."""
    return _descend_or_ascend(req, req.retain, 1.0)


@unlearning_method(GradientAscentHyperparameters)
def gradient_ascent(req: UnlearnRequest) -> tuple[nn.Module, float, dict]:
    """GA: a copy of `model` trained to increase the cross-entropy on the forget set."""
    return _descend_or_ascend(req, req.forget, -1.0)


@unlearning_method(NegGradPlusHyperparameters)
def neggrad_plus(req: UnlearnRequest) -> tuple[nn.Module, float, dict]:
    """NegGrad+: each step descends alpha·CE on a retain batch and ascends (1 − alpha)·CE on a forget batch;
    the forget set is cycled (reshuffled whenever exhausted) alongside one pass over the retain set per
    epoch."""
    hp, device, forget, retain = req.hp, req.device, req.forget, req.retain
    if retain.numel() == 0:
        raise ValueError("the forget set is the whole training set: NegGrad+ needs retain examples.")
    (xr, yr), (xf, yf) = req.examples(retain), req.examples(forget)
    forget_batch = min(hp.batch_size, forget.numel())
    unlearned = copy_model(req.model)
    optimizer = _sgd(unlearned, hp)
    unlearned.train()
    passes = 0.0
    forget_queue: list[torch.Tensor] = []
    for _ in range(hp.epochs):
        for rb in shuffled_batches(retain.numel(), hp.batch_size, req.generator):
            if not forget_queue:
                forget_queue = shuffled_batches(forget.numel(), forget_batch, req.generator)
            rb, fb = rb.to(device), forget_queue.pop(0).to(device)
            loss = hp.alpha * _cross_entropy(unlearned, xr[rb], yr[rb], device, hp.amp) - (
                1.0 - hp.alpha
            ) * _cross_entropy(unlearned, xf[fb], yf[fb], device, hp.amp)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            passes += rb.numel() + fb.numel()
    unlearned.eval()
    return unlearned, passes, {}
