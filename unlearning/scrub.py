"""SCRUB (Kurmanji et al. 2023) as a baseline (docs/methods.md §6): the original model is the teacher; the
student (a copy) alternates max-steps on the forget set, pushing its predictions away from the teacher's, and
min-steps on the retain set, staying close to the teacher and to the labels.

Data flow: model + training set + forget-set indices in, the student and its cost out; the body is written
for G models at a time (`base.PackRequest`). The student trains in train mode (as in SCRUB); the teacher is a
frozen copy in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unlearning.base import FORWARD_PASS, PackRequest, autocast, per_model_cross_entropy, unlearning_method


@dataclass(frozen=True)
class ScrubHyperparameters:
    # Epochs; each runs one pass over the retain set (min-step) and, while epoch < max_steps, one pass over
    # the forget set before it (max-step) (docs/methods.md §6: 10 epochs).
    epochs: int = 10
    # Epochs that include a max-step pass over the forget set (docs/methods.md §6: 3 max-steps).
    max_steps: int = 3
    # Adam learning rate; docs/methods.md §6 gives none: project choice, of the order SCRUB uses at small scale.
    lr: float = 5e-4
    # Weight of the cross-entropy on retain in the min-step (docs/methods.md §6: gamma 1).
    gamma: float = 1.0
    # Weight of KL(teacher‖student) on retain in the min-step (docs/methods.md §6: alpha 0.5).
    alpha: float = 0.5
    # Softmax temperature of both KL terms (docs/methods.md §6: T 2).
    temperature: float = 2.0
    # Examples per step on both sets; project choice.
    batch_size: int = 128
    # bf16 autocast on CUDA (ignored on CPU).
    amp: bool = True


def distillation_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(teacher‖student) of temperature-softened softmaxes, mean over the batch, times T² so that gradient
    scales do not shrink with the temperature (Hinton et al. 2015, as in SCRUB). Logits (..., b, C): one value
    per leading index (a scalar for one batch (b, C), (G,) for a pack's batches (G, b, C))."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="none").sum(-1).mean(-1)
    return kl * temperature**2


@unlearning_method(ScrubHyperparameters, packs=True)
def scrub(req: PackRequest) -> tuple[float, list[dict]]:
    """SCRUB: max-steps maximise KL(teacher‖student) on the forget set; min-steps minimise gamma·CE +
    alpha·KL(teacher‖student) on the retain set. The student is the pack."""
    hp, device, forget, retain = req.hp, req.device, req.forget, req.retain
    if retain.numel() == 0:
        raise ValueError("the forget set is the whole training set: SCRUB needs retain examples.")
    (xr, yr), (xf, _) = req.examples(retain), req.examples(forget)
    student = req.pack
    teacher = student.frozen()
    optimizer = torch.optim.Adam(student.parameters(), lr=hp.lr)
    student.train()
    passes = 0.0

    def step(x: torch.Tensor, loss_fn) -> None:
        nonlocal passes
        with torch.no_grad(), autocast(device, hp.amp):
            teacher_logits = teacher(x)
        with autocast(device, hp.amp):
            student_logits = student(x)
        loss = loss_fn(student_logits.float(), teacher_logits.float()).sum()  # per-model losses summed
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        passes += x.shape[1] * (1.0 + FORWARD_PASS)  # student forward + backward, teacher forward

    for epoch in range(hp.epochs):
        if epoch < hp.max_steps:
            for fb in req.batches(forget.numel(), hp.batch_size):
                step(xf[fb], lambda s, t: -distillation_kl(s, t, hp.temperature))
        for rb in req.batches(retain.numel(), hp.batch_size):
            yb = yr[rb]
            step(
                xr[rb],
                lambda s, t, yb=yb: hp.gamma * per_model_cross_entropy(s, yb)
                + hp.alpha * distillation_kl(s, t, hp.temperature),
            )
    student.train(False)
    return passes, [{} for _ in range(req.size)]
