"""The training engine: trains a block of models, each on its own mask, and returns their logits on all targets.

Every stage that trains (subset models, full models, oracles, retraining) goes through `train_models`. Model i's
result depends only on its mask, its seed and the recipe: its initialisation, its minibatch stream and its optimiser
state are its own, so a block gives the same models however it is scheduled. Where the task provides a packed
forward, the block trains as one computation (Adam and weight decay act elementwise, and the loss is a sum of the
per-model means, so each model follows exactly its own gradient); otherwise the models train one at a time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import stack_module_state

from unlearning.base import predict_logits as _predict_logits

if TYPE_CHECKING:
    from pipelines.tasks import Task, TaskData


# Models per packed computation on a CPU. Measured on 2 cores, 1 thread per unit, MNIST-1D CNN (2,000 examples,
# 30 epochs): 0.60 s/model one at a time; packed 8: 0.51, 16: 0.72, 32: 0.77, 64: 0.79 (grouped convolutions with
# many groups run slowly on the CPU). On a GPU the whole block is one pack.
CPU_PACK_SIZE = 8


@dataclass(frozen=True)
class Recipe:
    """A training recipe; each task declares its own (pipelines/tasks), configs may override fields."""

    epochs: int  # passes over each model's training examples
    batch_size: int  # examples per step, per model
    lr: float  # peak learning rate
    weight_decay: float = 0.0  # L2 (adam, sgd) or decoupled (adamw)
    optimizer: str = "adam"  # adam | adamw | sgd (nesterov, momentum 0.9)
    schedule: str = "onecycle"  # constant | onecycle: linear warm-up to lr, then linear decay to 0
    warmup: float = 0.2  # fraction of the steps spent warming up (onecycle)
    label_smoothing: float = 0.0


@dataclass
class TrainResult:
    logits: np.ndarray  # (B, T, C) float32: every model's logits on every target
    params: np.ndarray | None  # (B, P) float32: flattened state (see state_vector), when asked for
    seconds: float
    example_passes: int  # forward+backward passes of single examples, summed over the block
    # (B,) float64: each model's final training loss, the mean of its minibatch losses over its last epoch
    # (NaN where it diverged, or where it took no step)
    train_loss: np.ndarray


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def state_vector(model: nn.Module) -> torch.Tensor:
    """All floating-point entries of the state dict (parameters and BN statistics), flattened, in order."""
    return torch.cat([t.detach().reshape(-1).float().cpu()
                      for t in model.state_dict().values() if t.is_floating_point()])


def load_state_vector(model: nn.Module, vector: np.ndarray | torch.Tensor) -> nn.Module:
    """Inverse of state_vector: writes the entries back into `model` (in place) and returns it."""
    if isinstance(vector, torch.Tensor):
        vector = vector.detach().cpu().reshape(-1)
    else:  # a copy: rows read through Ray are read-only arrays, which torch warns about
        vector = torch.from_numpy(np.array(vector)).reshape(-1)
    state = model.state_dict()
    needed = sum(t.numel() for t in state.values() if t.is_floating_point())
    if needed != vector.numel():
        raise ValueError(f"state vector has {vector.numel()} entries but the model needs {needed}")
    offset = 0
    for name, t in state.items():
        if t.is_floating_point():
            state[name] = vector[offset:offset + t.numel()].view_as(t).to(t.dtype)
            offset += t.numel()
    model.load_state_dict(state)
    return model


def minibatch_streams(masks: np.ndarray, seeds: Sequence[int], n_steps: int, batch_size: int) -> torch.Tensor:
    """(B, n_steps, batch) example indices: model i cycles through seeded permutations of its own examples."""
    streams = np.empty((len(masks), n_steps * batch_size), dtype=np.int64)
    for i, (mask, seed) in enumerate(zip(masks, seeds)):
        idx = np.flatnonzero(mask)
        if len(idx) == 0:
            raise ValueError(f"model {i} has an empty training mask")
        rng = np.random.default_rng(seed)
        reps = math.ceil(streams.shape[1] / len(idx))
        streams[i] = np.concatenate([rng.permutation(idx) for _ in range(reps)])[: streams.shape[1]]
    return torch.from_numpy(streams.reshape(len(masks), n_steps, batch_size))


def lr_at(recipe: Recipe, step: int, n_steps: int) -> float:
    if recipe.schedule == "constant":
        return recipe.lr
    if recipe.schedule == "onecycle":
        warm = max(1, int(recipe.warmup * n_steps))
        if step < warm:
            return recipe.lr * (step + 1) / warm
        return recipe.lr * max(0.0, (n_steps - step) / max(1, n_steps - warm))
    raise ValueError(f"unknown schedule {recipe.schedule!r}: use constant or onecycle")


def make_optimizer(params: list[torch.Tensor], recipe: Recipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=0.9, nesterov=True, weight_decay=recipe.weight_decay)
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}: use adam, adamw or sgd")


def n_steps_for(recipe: Recipe, epoch_size: int) -> int:
    return recipe.epochs * math.ceil(epoch_size / recipe.batch_size)


def train_models(task: "Task", data: "TaskData", masks: np.ndarray, seeds: Sequence[int], *,
                 epoch_size: int | None = None, packed: bool = True, pack_size: int | None = None,
                 return_params: bool = False, device: torch.device | str | None = None,
                 eval_batch: int = 2048) -> TrainResult:
    """Train one model per row of `masks` (B, N) with seeds `seeds` and return their logits on all targets.

    epoch_size: examples per epoch, the same for every model of a stage (the subset stage passes round(alpha*N),
    so a model's number of steps does not depend on which other models share its block); default: the mask size
    of the first model.
    packed: train the block as packed computations when the task has a packed forward.
    pack_size: models per packed computation (None: the whole block on a GPU, CPU_PACK_SIZE on a CPU, where larger
    packs were slower: benchmarks/train_throughput.py).
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 2 or masks.shape[1] != data.n_train:
        raise ValueError(f"masks must have shape (B, {data.n_train}), got {masks.shape}")
    if len(seeds) != len(masks):
        raise ValueError(f"got {len(seeds)} seeds for {len(masks)} masks")
    device = torch.device(device) if device is not None else default_device()
    recipe = task.recipe
    n_steps = n_steps_for(recipe, int(epoch_size or masks[0].sum()))
    # the final training loss averages the last epoch's steps (one step's minibatch loss alone is noisy)
    loss_from = n_steps - n_steps // max(1, recipe.epochs)
    streams = minibatch_streams(masks, seeds, n_steps, recipe.batch_size).to(device)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_targets = data.x_targets.to(device)
    models = [task.build_model(data.num_classes, int(s)).to(device) for s in seeds]

    start = time.perf_counter()
    if packed and task.packed_forward is not None:
        size = pack_size or (len(models) if device.type == "cuda" else CPU_PACK_SIZE)
        packs = [_train_packed(task, models[i:i + size], streams[i:i + size], x_train, y_train, x_targets,
                               eval_batch, loss_from) for i in range(0, len(models), size)]
    else:
        packs = [_train_one(task, m, streams[i], x_train, y_train, x_targets, int(seeds[i]), eval_batch,
                            loss_from) for i, m in enumerate(models)]
    logits = np.concatenate([np.asarray(p[0]).reshape(-1, *p[0].shape[-2:]) for p in packs])
    train_loss = np.concatenate([np.atleast_1d(p[1]) for p in packs]).astype(np.float64)
    seconds = time.perf_counter() - start
    params = np.stack([state_vector(m).numpy() for m in models]) if return_params else None
    return TrainResult(logits=logits, params=params, seconds=seconds,
                       example_passes=len(models) * n_steps * recipe.batch_size, train_loss=train_loss)


def _augment(task: "Task", xb: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    return task.augment(xb, gen) if task.augment is not None else xb


def _train_one(task: "Task", model: nn.Module, stream: torch.Tensor, x_train, y_train, x_targets,
               seed: int, eval_batch: int, loss_from: int) -> tuple[np.ndarray, float]:
    """Train one model; returns its logits on the targets and its mean minibatch loss from step loss_from."""
    recipe = task.recipe
    opt = make_optimizer(list(model.parameters()), recipe)
    gen = torch.Generator(device=x_train.device).manual_seed(seed) if task.augment else None
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=x_train.device)
    for step, idx in enumerate(stream):
        for group in opt.param_groups:
            group["lr"] = lr_at(recipe, step, len(stream))
        out = model(_augment(task, x_train[idx], gen))
        loss = F.cross_entropy(out, y_train[idx], label_smoothing=recipe.label_smoothing)
        if step >= loss_from:  # detached: recording the loss changes nothing in the training
            loss_sum += loss.detach().double()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    n_recorded = len(stream) - loss_from
    train_loss = float(loss_sum) / n_recorded if n_recorded > 0 else float("nan")
    return predict_logits(model, x_targets, eval_batch), train_loss


def predict_logits(model: nn.Module, x: torch.Tensor, batch: int = 2048) -> np.ndarray:
    """Logits (n, C) float32 numpy of a model in eval mode, in batches (unlearning.base.predict_logits)."""
    return _predict_logits(model, x, batch_size=batch).cpu().numpy()


def _train_packed(task: "Task", models: list[nn.Module], streams: torch.Tensor, x_train, y_train, x_targets,
                  eval_batch: int, loss_from: int) -> tuple[np.ndarray, np.ndarray]:
    """Train a pack of models as one computation; returns their logits (G, T, C) on the targets and each
    model's mean minibatch loss over steps loss_from.. (G,)."""
    recipe = task.recipe
    fwd = task.packed_forward
    stacked, _buffers = stack_module_state(models)  # {name: (G, ...)} leaf tensors that require grad
    params = list(stacked.values())
    opt = make_optimizer(params, recipe)
    G, n_steps, b = streams.shape
    loss_sum = torch.zeros(G, dtype=torch.float64, device=x_train.device)
    for step in range(n_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(recipe, step, n_steps)
        idx = streams[:, step]  # (G, b): every model its own minibatch
        out = fwd(stacked, x_train[idx])
        # sum over models of each model's mean loss: model g's gradient is exactly that of its own loss
        loss = F.cross_entropy(out.reshape(G * b, -1), y_train[idx].reshape(-1), reduction="sum",
                               label_smoothing=recipe.label_smoothing) / b
        if step >= loss_from:  # each model's own mean loss, from detached outputs: the training is unchanged
            with torch.no_grad():
                per_example = F.cross_entropy(out.detach().reshape(G * b, -1), y_train[idx].reshape(-1),
                                              reduction="none", label_smoothing=recipe.label_smoothing)
                loss_sum += per_example.reshape(G, b).double().mean(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        for g, m in enumerate(models):  # write the trained weights back into the per-model modules
            for name, p in m.named_parameters():
                p.copy_(stacked[name][g])
        logits = torch.cat([fwd(stacked, x_targets[i:i + eval_batch].expand(G, *x_targets[i:i + eval_batch].shape))
                            for i in range(0, len(x_targets), eval_batch)], dim=1)
    n_recorded = n_steps - loss_from
    train_loss = (loss_sum / n_recorded).cpu().numpy() if n_recorded > 0 else np.full(G, np.nan)
    return logits.float().cpu().numpy(), train_loss

