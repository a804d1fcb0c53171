"""Oracle Matching (OM): fine-tune the original model so that its logits match an oracle's (reference.md §3,
A2D).

Data flow: the pipeline passes the model, its training set, the forget-set indices and `oracle_logits` (N, C),
the target logits on the training points (e.g. the mean of oracles retrained without the forget set);
Datamodel Matching (`datamodel.py`) reuses `match_logits` with DM-Direct's predictions as the oracle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unlearning.base import (
    UnlearnData,
    UnlearnRequest,
    as_float_tensor,
    autocast,
    copy_model,
    model_device,
    retain_indices,
    shuffled_batches,
    trainable_parameters,
    unlearning_method,
)


@dataclass(frozen=True)
class OracleMatchingHyperparameters:
    # Passes over the fine-tuning set (reference.md §3: "5 epochs" in the public OM code).
    epochs: int = 5
    # Adam learning rate at the first epoch (reference.md §3: lr 5e-4).
    lr: float = 5e-4
    # Learning rate multiplied by this after every epoch (reference.md §3: "decayed ×0.95 per epoch").
    lr_decay: float = 0.95
    # Examples per Adam step; forget and retain points mixed in each batch (reference.md §3: batch 512).
    batch_size: int = 512
    # Each forget point appears this many times in the fine-tuning set (reference.md §3: forget ×1).
    forget_multiplier: int = 1
    # retain_multiplier·|F| retain points sampled once, without replacement (reference.md §3: retain ×3).
    retain_multiplier: int = 3
    # BatchNorm in train mode (batch statistics, running stats updated) as in the reference code; False = eval
    # mode (dropout off too), under which a model given its own logits as the oracle is an exact fixed point.
    batchnorm_train: bool = True
    # bf16 autocast on CUDA (ignored on CPU); the MSE itself is computed in float32.
    amp: bool = True


def match_logits(
    model: nn.Module,
    data: UnlearnData,
    forget_idx: torch.Tensor,
    oracle_logits: torch.Tensor,
    hp: Any,
    generator: torch.Generator,
) -> tuple[float, dict]:
    """Fine-tune `model` IN PLACE towards `oracle_logits` (N, C) on the OM fine-tuning set; return the example
    passes spent and diagnostics. `hp` needs the fields of OracleMatchingHyperparameters (DMM's class has
    them).

    Fine-tuning set (reference.md §3): forget points repeated `forget_multiplier` times plus
    `retain_multiplier`·|F| retain points drawn once (capped at the retain-set size); shuffled every epoch, so
    batches mix both. Loss: MSE over all classes' logits. No augmentation."""
    device = model_device(model)
    n_train = len(data)
    retain = retain_indices(n_train, forget_idx)
    n_retain_sample = min(hp.retain_multiplier * forget_idx.numel(), retain.numel())
    retain_sample = retain[torch.randperm(retain.numel(), generator=generator)[:n_retain_sample]]
    finetune_idx = torch.cat([forget_idx.repeat(hp.forget_multiplier), retain_sample])

    # The fine-tuning set is small (a multiple of |F|): move it to the device once.
    x_ft = data.x[finetune_idx.to(data.x.device)].to(device)
    target_ft = oracle_logits[finetune_idx.to(oracle_logits.device)].to(device)

    params = trainable_parameters(model)
    optimizer = torch.optim.Adam(params, lr=hp.lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=hp.lr_decay)
    model.train(hp.batchnorm_train)
    epoch_losses = []
    passes = 0.0
    for _ in range(hp.epochs):
        total, count = 0.0, 0
        for batch in shuffled_batches(finetune_idx.numel(), hp.batch_size, generator):
            batch = batch.to(device)
            with autocast(device, hp.amp):
                out = model(x_ft[batch])
            target = target_ft[batch]
            if out.shape != target.shape:
                raise ValueError(
                    f"the model outputs logits of shape {tuple(out.shape[1:])} per example but the oracle "
                    f"logits have {tuple(target.shape[1:])}; pass oracle logits with one column per class."
                )
            loss = F.mse_loss(out.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * batch.numel()
            count += batch.numel()
            passes += batch.numel()
        scheduler.step()
        epoch_losses.append(total / count)
    model.eval()
    info = {
        "finetune_idx": finetune_idx,  # positions into the training set, forget points first (with repeats)
        "retain_sample_idx": retain_sample,
        "epoch_losses": epoch_losses,  # mean MSE over the fine-tuning set during each epoch
    }
    return passes, info


@unlearning_method(OracleMatchingHyperparameters)
def oracle_matching(req: UnlearnRequest, *, oracle_logits: Any) -> tuple[nn.Module, float, dict]:
    """OM: a copy of `model` fine-tuned so its logits on the fine-tuning set match `oracle_logits` (N, C), the
    oracle's logits on the N training points. Keyword overrides replace hyperparameters (e.g. `epochs=3`)."""
    oracle = as_float_tensor("oracle_logits", oracle_logits, (len(req.data), None), req.device)
    unlearned = copy_model(req.model)
    passes, info = match_logits(unlearned, req.data, req.forget, oracle, req.hp, req.generator)
    return unlearned, passes, info
