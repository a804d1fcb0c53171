"""Oracle Matching (OM): fine-tune the original model so that its logits match an oracle's (docs/methods.md §3,
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

from unlearning.base import PackRequest, as_float_tensor, autocast, gather_rows, unlearning_method


@dataclass(frozen=True)
class OracleMatchingHyperparameters:
    # Passes over the fine-tuning set (docs/methods.md §3: "5 epochs" in the public OM code).
    epochs: int = 5
    # Adam learning rate at the first epoch (docs/methods.md §3: lr 5e-4).
    lr: float = 5e-4
    # Learning rate multiplied by this after every epoch (docs/methods.md §3: "decayed ×0.95 per epoch").
    lr_decay: float = 0.95
    # Examples per Adam step; forget and retain points mixed in each batch (docs/methods.md §3: batch 512).
    batch_size: int = 512
    # Each forget point appears this many times in the fine-tuning set (docs/methods.md §3: forget ×1).
    forget_multiplier: int = 1
    # retain_multiplier·|F| retain points sampled once, without replacement (docs/methods.md §3: retain ×3).
    retain_multiplier: int = 3
    # BatchNorm in train mode (batch statistics, running stats updated) as in the reference code; False = eval
    # mode (dropout off too), under which a model given its own logits as the oracle is an exact fixed point.
    batchnorm_train: bool = True
    # bf16 autocast on CUDA (ignored on CPU); the MSE itself is computed in float32.
    amp: bool = True


def match_logits(req: PackRequest, oracle_logits: torch.Tensor) -> tuple[float, list[dict]]:
    """Fine-tune the pack IN PLACE towards `oracle_logits` (G, N, C), model g towards row g, on the OM
    fine-tuning set; return the example passes spent per model and each model's diagnostics. `req.hp` needs
    the fields of OracleMatchingHyperparameters (DMM's class has them).

    Fine-tuning set (docs/methods.md §3): forget points repeated `forget_multiplier` times plus
    `retain_multiplier`·|F| retain points drawn once (capped at the retain-set size), per model from its own
    generator; shuffled every epoch, so batches mix both. Loss: MSE over all classes' logits. No
    augmentation."""
    hp, device, forget, pack = req.hp, req.device, req.forget, req.pack
    retain = req.retain
    n_retain_sample = min(hp.retain_multiplier * forget.numel(), retain.numel())
    retain_sample = torch.stack([retain[torch.randperm(retain.numel(), generator=g)[:n_retain_sample]]
                                 for g in req.generators])  # (G, n_retain_sample)
    finetune_idx = torch.cat([forget.repeat(hp.forget_multiplier).expand(req.size, -1), retain_sample], dim=1)

    # The fine-tuning set is small (a multiple of |F|): move it to the device once.
    x_ft, _ = req.examples(finetune_idx)  # (G, n_ft, ...)
    target_ft = gather_rows(oracle_logits, finetune_idx).to(device)  # (G, n_ft, C)

    optimizer = torch.optim.Adam(pack.parameters(), lr=hp.lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=hp.lr_decay)
    pack.train(hp.batchnorm_train)
    epoch_losses = []
    passes = 0.0
    for _ in range(hp.epochs):
        total = torch.zeros(req.size, dtype=torch.float64, device=device)
        for batch in req.batches(finetune_idx.shape[1], hp.batch_size):
            with autocast(device, hp.amp):
                out = pack(gather_rows(x_ft, batch))
            target = gather_rows(target_ft, batch)
            if out.shape != target.shape:
                raise ValueError(
                    f"the model outputs logits of shape {tuple(out.shape[2:])} per example but the oracle "
                    f"logits have {tuple(target.shape[2:])}; pass oracle logits with one column per class."
                )
            losses = F.mse_loss(out.float(), target, reduction="none").flatten(1).mean(1)  # (G,)
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
            total += losses.detach().double() * batch.shape[1]
            passes += batch.shape[1]
        scheduler.step()
        epoch_losses.append(total / finetune_idx.shape[1])
    pack.train(False)
    losses = torch.stack(epoch_losses, dim=1).tolist() if epoch_losses else [[] for _ in range(req.size)]
    infos = [{
        "finetune_idx": finetune_idx[g],  # positions into the training set, forget points first (with repeats)
        "retain_sample_idx": retain_sample[g],
        "epoch_losses": losses[g],  # mean MSE over the fine-tuning set during each epoch
    } for g in range(req.size)]
    return passes, infos


@unlearning_method(OracleMatchingHyperparameters, packs=True, per_model=("oracle_logits",))
def oracle_matching(req: PackRequest, *, oracle_logits: Any) -> tuple[float, list[dict]]:
    """OM: a copy of `model` fine-tuned so its logits on the fine-tuning set match `oracle_logits` (N, C), an
    oracle's logits on the N training points (packed: one array per model, model g towards its own oracle's,
    docs/methods.md §3). Keyword overrides replace hyperparameters (e.g. `epochs=3`)."""
    oracles = [as_float_tensor("oracle_logits", o, (len(req.data), None), req.device) for o in oracle_logits]
    return match_logits(req, torch.stack(oracles))
