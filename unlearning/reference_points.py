"""The two reference points every unlearning method sits between: retraining without the forget set (the exact
answer, at full cost) and doing nothing (free, unlearns nothing).

Data flow: like every method in `unlearning.METHODS`. `retrain` takes the training recipe as a callable from
the pipeline (`train_fn`), so this library never imports the pipeline's tasks or training engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from unlearning.base import Cost, UnlearnData, UnlearnRequest, copy_model, unlearning_method

# train_fn(retain_data, seed) returns the trained model, or (model, example_passes) / (model, Cost) to report
# what training cost; a bare model is costed as epochs × |retain| passes when `epochs` is given.
TrainFn = Callable[[UnlearnData, int], Any]


@dataclass(frozen=True)
class RetrainHyperparameters:
    # Epochs of the pipeline's recipe, used only to count the cost (epochs × |retain| example passes) when
    # train_fn returns a bare model; None leaves the passes unknown (NaN). Retraining ResNet-9 on CIFAR-10 is
    # 24 epochs × 50k = 1.2M passes (docs/methods.md §3).
    epochs: int | None = None


@unlearning_method(RetrainHyperparameters)
def retrain(req: UnlearnRequest, *, train_fn: TrainFn) -> tuple[nn.Module, float, dict]:
    """The oracle: `train_fn(retain_data, seed)` trains a fresh model on the retain set only. `model` is not
    used beyond identifying the request (it is not mutated)."""
    if not callable(train_fn):
        raise ValueError(
            "retrain needs train_fn: a callable (retain_data: UnlearnData, seed: int) -> nn.Module."
        )
    retain = req.retain
    # Under seeded() (unlearning_method), a train_fn drawing from torch's global RNG (initialisation, dropout)
    # is deterministic.
    out = train_fn(req.data.subset(retain), req.seed)
    reported: Any = None
    if isinstance(out, tuple):
        if len(out) != 2:
            raise ValueError("train_fn must return a model or a (model, example_passes) pair.")
        out, reported = out
    if not isinstance(out, nn.Module):
        raise ValueError(f"train_fn must return an nn.Module (or (model, passes)), got {type(out).__name__}.")
    if isinstance(reported, Cost):
        passes = float(reported.example_passes)
    elif reported is not None:
        passes = float(reported)
    elif req.hp.epochs is not None:
        passes = float(req.hp.epochs * retain.numel())
    else:
        passes = float("nan")
    return out.eval(), passes, {}


@dataclass(frozen=True)
class DoNothingHyperparameters:
    """Doing nothing has no hyperparameters."""


@unlearning_method(DoNothingHyperparameters)
def do_nothing(req: UnlearnRequest) -> tuple[nn.Module, float, dict]:
    """A copy of the model, at zero example passes: the baseline every method must beat on the forget set."""
    return copy_model(req.model), 0.0, {}
