"""SCRUB (Kurmanji et al. 2023) as a baseline (reference.md §6): the original model is the teacher; the
student (a copy) alternates max-steps on the forget set, pushing its predictions away from the teacher's, and
min-steps on the retain set, staying close to the teacher and to the labels.

Data flow: model + training set + forget-set indices in, the student and its cost out. The student trains in
train mode (as in SCRUB); the teacher is a frozen copy in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unlearning.base import (
    FORWARD_PASS,
    UnlearnRequest,
    autocast,
    copy_model,
    shuffled_batches,
    trainable_parameters,
    unlearning_method,
)


@dataclass(frozen=True)
class ScrubHyperparameters:
    # Epochs; each runs one pass over the retain set (min-step) and, while epoch < max_steps, one pass over
    # the forget set before it (max-step) (reference.md §6: 10 epochs).
    epochs: int = 10
    # Epochs that include a max-step pass over the forget set (reference.md §6: 3 max-steps).
    max_steps: int = 3
    # Adam learning rate; reference.md §6 gives none: project choice, of the order SCRUB uses at small scale.
    lr: float = 5e-4
    # Weight of the cross-entropy on retain in the min-step (reference.md §6: gamma 1).
    gamma: float = 1.0
    # Weight of KL(teacher‖student) on retain in the min-step (reference.md §6: alpha 0.5).
    alpha: float = 0.5
    # Softmax temperature of both KL terms (reference.md §6: T 2).
    temperature: float = 2.0
    # Examples per step on both sets; project choice.
    batch_size: int = 128
    # bf16 autocast on CUDA (ignored on CPU).
    amp: bool = True


def distillation_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(teacher‖student) of temperature-softened softmaxes, mean over the batch, times T² so that gradient
    scales do not shrink with the temperature (Hinton et al. 2015, as in SCRUB)."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


@unlearning_method(ScrubHyperparameters)
def scrub(req: UnlearnRequest) -> tuple[nn.Module, float, dict]:
    """SCRUB: max-steps maximise KL(teacher‖student) on the forget set; min-steps minimise gamma·CE +
    alpha·KL(teacher‖student) on the retain set. Returns the student."""
    hp, device, forget, retain = req.hp, req.device, req.forget, req.retain
    if retain.numel() == 0:
        raise ValueError("the forget set is the whole training set: SCRUB needs retain examples.")
    (xr, yr), (xf, _) = req.examples(retain), req.examples(forget)
    teacher = copy_model(req.model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = copy_model(req.model)
    optimizer = torch.optim.Adam(trainable_parameters(student), lr=hp.lr)
    student.train()
    passes = 0.0

    def step(x: torch.Tensor, loss_fn) -> None:
        nonlocal passes
        with torch.no_grad(), autocast(device, hp.amp):
            teacher_logits = teacher(x)
        with autocast(device, hp.amp):
            student_logits = student(x)
        loss = loss_fn(student_logits.float(), teacher_logits.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        passes += x.shape[0] * (1.0 + FORWARD_PASS)  # student forward + backward, teacher forward

    for epoch in range(hp.epochs):
        if epoch < hp.max_steps:
            for fb in shuffled_batches(forget.numel(), hp.batch_size, req.generator):
                step(xf[fb.to(device)], lambda s, t: -distillation_kl(s, t, hp.temperature))
        for rb in shuffled_batches(retain.numel(), hp.batch_size, req.generator):
            rb = rb.to(device)
            yb = yr[rb]
            step(
                xr[rb],
                lambda s, t, yb=yb: hp.gamma * F.cross_entropy(s, yb)
                + hp.alpha * distillation_kl(s, t, hp.temperature),
            )
    student.eval()
    return student, passes, {}
