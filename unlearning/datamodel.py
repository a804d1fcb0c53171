"""Datamodel unlearning: DM-Direct (predict the retrained model's logits from datamodel weights) and Datamodel
Matching (Oracle Matching towards DM-Direct's predictions), docs/methods.md §3 (A2D).

Data flow: the pipeline reads the forget-set rows of a datamodel weight store, `datamodel_weights` (|F|, T, C)
(one weight per removed training point, target and class, targets = training examples then test examples), and
the original model's logits on all targets `original_logits` (T, C). This module takes arrays, never a store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from unlearning.base import (
    FORWARD_PASS,
    PackRequest,
    UnlearnRequest,
    as_float_tensor,
    as_tensor,
    unlearning_method,
)
from unlearning.oracle_matching import match_logits


class DatamodelPredictor:
    """DM-Direct's "unlearned model": predicted logits of the retrained model for the datamodel targets only.

    `predicted_logits` (T, C) = original logits − Σ_{i∈F} datamodel weights of i (no intercept: only the
    change caused by removing F is applied, docs/methods.md §3). It cannot answer new inputs."""

    def __init__(self, predicted_logits: torch.Tensor, forget_idx: torch.Tensor) -> None:
        self.predicted_logits = predicted_logits
        self.forget_idx = forget_idx

    @property
    def num_targets(self) -> int:
        return int(self.predicted_logits.shape[0])

    def logits(self, target_idx: Any = None) -> torch.Tensor:
        """Predicted logits (T, C) for all targets, or (k, C) for the target indices `target_idx`."""
        if target_idx is None:
            return self.predicted_logits
        idx = torch.as_tensor(np.asarray(target_idx), dtype=torch.int64)
        if idx.ndim != 1 or (idx.numel() and (idx.min() < 0 or idx.max() >= self.num_targets)):
            raise ValueError(
                f"target_idx must be a 1-D array of target indices in [0, {self.num_targets}), "
                f"got shape {tuple(idx.shape)}."
            )
        return self.predicted_logits[idx.to(self.predicted_logits.device)]

    def __call__(self, x: Any) -> torch.Tensor:
        raise ValueError(
            "DM-Direct answers only for datamodel targets (use .logits(target_idx)); "
            "use dm_matching for a model that answers new inputs."
        )


@dataclass(frozen=True)
class DatamodelDirectHyperparameters:
    """DM-Direct has no hyperparameters: the prediction is a fixed sum (docs/methods.md §3)."""


def _summed_forget_weights(datamodel_weights: Any, n_forget: int, device: torch.device) -> torch.Tensor:
    """Σ_{i∈F} w_i (T, C), summed in float64 so that many small weights do not lose precision; returned as
    float32."""
    w = as_tensor(datamodel_weights)
    if w.ndim != 3 or w.shape[0] != n_forget:
        raise ValueError(
            f"datamodel_weights must have shape (|F|, T, C) = ({n_forget}, T, C), the weight-store rows of "
            f"the forget points; got shape {tuple(w.shape)}."
        )
    if not w.dtype.is_floating_point:
        raise ValueError(f"datamodel_weights must be floating point, got dtype {w.dtype}.")
    total = w.to(device=device, dtype=torch.float64).sum(dim=0)
    if not torch.isfinite(total).all():
        raise ValueError("datamodel_weights contain NaN or infinite values.")
    return total.to(torch.float32)


def datamodel_direct_logits(
    original_logits: torch.Tensor, datamodel_weights: Any, n_forget: int
) -> torch.Tensor:
    """DM-Direct's prediction (T, C): original logits minus the summed forget-set datamodel weights (original
    logits (G, T, C) of G models: (G, T, C))."""
    delta = _summed_forget_weights(datamodel_weights, n_forget, original_logits.device)
    if delta.shape != original_logits.shape[-2:]:
        raise ValueError(
            f"datamodel_weights give (T, C) = {tuple(delta.shape)} per forget point but original_logits has "
            f"shape {tuple(original_logits.shape)}; both must cover the same targets and classes."
        )
    return original_logits - delta


def _original_logits(original_logits: Any, n_train: int, device: torch.device) -> torch.Tensor:
    """`original_logits` (T, C) as float32 on `device`, checked to cover the n_train training targets."""
    original = as_float_tensor("original_logits", original_logits, (None, None), device)
    if original.shape[0] < n_train:
        raise ValueError(
            f"original_logits has {original.shape[0]} targets but the training set has {n_train}; "
            "targets are the training examples followed by the test examples."
        )
    return original


@unlearning_method(DatamodelDirectHyperparameters)
def dm_direct(
    req: UnlearnRequest, *, datamodel_weights: Any, original_logits: Any
) -> tuple[DatamodelPredictor, float, dict]:
    """DM-Direct: returns an UnlearnResult whose `model` is a DatamodelPredictor (not an nn.Module).

    `datamodel_weights` (|F|, T, C): weight-store rows of the forget points; `original_logits` (T, C): the
    model's logits on all targets. `model` is only used for its device; `seed` is accepted for a uniform
    interface. Cost: no example passes (the one-off datamodel estimation is not counted, as in docs/methods.md
    §3)."""
    original = _original_logits(original_logits, len(req.data), req.device)
    predicted = datamodel_direct_logits(original, datamodel_weights, req.forget.numel())
    return DatamodelPredictor(predicted, req.forget), 0.0, {}


@dataclass(frozen=True)
class DatamodelMatchingHyperparameters:
    # Passes over the fine-tuning set (docs/methods.md §3, DMM settings seen: 4 (or 10) epochs).
    epochs: int = 4
    # Adam learning rate at the first epoch (docs/methods.md §3: lr 1e-4).
    lr: float = 1e-4
    # Learning rate multiplied by this after every epoch (the OM schedule, docs/methods.md §3).
    lr_decay: float = 0.95
    # Examples per Adam step, forget and retain mixed (docs/methods.md §3: batch 512).
    batch_size: int = 512
    # Each forget point appears this many times in the fine-tuning set (docs/methods.md §3: forget ×5).
    forget_multiplier: int = 5
    # retain_multiplier·|F| retain points sampled once, without replacement (docs/methods.md §3: retain ×20).
    retain_multiplier: int = 20
    # BatchNorm in train mode during fine-tuning, as in the reference OM code; False = eval mode.
    batchnorm_train: bool = True
    # bf16 autocast on CUDA (ignored on CPU); the MSE itself is computed in float32.
    amp: bool = True


@unlearning_method(DatamodelMatchingHyperparameters, packs=True, per_model=("original_logits",))
def dm_matching(
    req: PackRequest, *, datamodel_weights: Any, original_logits: Any = None
) -> tuple[float, list[dict]]:
    """Datamodel Matching: Oracle Matching where the oracle is DM-Direct on the training points (targets
    0..N-1).

    `datamodel_weights` (|F|, T, C) with T ≥ N; `original_logits` (T, C) or None, in which case the model's
    eval-mode logits on the training set are computed here (counted as forward passes). Returns a new
    nn.Module."""
    n_train = len(req.data)
    passes = 0.0
    if original_logits is None:
        original = req.pack.predict(req.data.x, amp=req.hp.amp)
        passes += FORWARD_PASS * n_train
    else:
        original = torch.stack([_original_logits(o, n_train, req.device)[:n_train] for o in original_logits])
    weights = as_tensor(datamodel_weights)
    if weights.ndim == 3 and weights.shape[1] < n_train:
        raise ValueError(
            f"datamodel_weights cover {weights.shape[1]} targets but the training set has {n_train}; "
            "DMM needs weights for every training target (targets 0..N-1)."
        )
    if weights.ndim == 3:
        weights = weights[:, :n_train]
    oracle = datamodel_direct_logits(original, weights, req.forget.numel())
    ft_passes, infos = match_logits(req, oracle)
    return passes + ft_passes, infos
