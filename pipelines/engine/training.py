"""The training engine: trains a block of models, each on its own mask, and returns their logits on all targets.

Every stage that trains (subset models, full models, oracles, retraining) goes through `train_models`. Model i's
result depends only on its mask, its seed and the recipe: its initialisation, its minibatch stream and its optimiser
state are its own, so a block gives the same models however it is scheduled. Where the task provides a packed
forward, the block trains as one computation (Adam and weight decay act elementwise, and the loss is a sum of the
per-model means, so each model follows exactly its own gradient); without one, the block is packed generically
(`torch.vmap` of the model's forward) where the model allows it, and trains one model at a time otherwise. Task,
TaskData and Recipe are declared in pipelines/tasks (imported from there, and re-exported here).
"""

from __future__ import annotations

import copy
import ctypes
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pipelines.tasks import PackedForward, Recipe, Task, TaskData
from unlearning.base import StackedPack
from unlearning.base import predict_logits as _predict_logits

log = logging.getLogger("dmu")

__all__ = ["Recipe", "TrainResult", "default_device", "load_state_vector", "lr_at", "make_optimizer",
           "minibatch_streams", "n_steps_for", "pack_size_for", "packed_forward", "predict_logits", "state_vector",
           "train_models"]


# Models per packed computation on a CPU. Measured on 2 cores (benchmarks/train_throughput.py, MNIST-1D CNN, 30
# epochs, 32 models, quiet): 1 thread, 8 and 16 within noise (25-28 % of the matmul limit each); 2 threads (two packs
# side by side, `_map_packs`), 16: 26-27 %, 8: 24-25 %. A pack of 16 holds a few tens of MB of activations. On a GPU the
# whole block is one pack.
CPU_PACK_SIZE = 16


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
    """The recipe's optimiser; fused (one kernel for all parameters) on CPU and CUDA, where torch has one."""
    fused = all(p.device.type in ("cpu", "cuda") for p in params) or None
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay, fused=fused)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, fused=fused)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=0.9, nesterov=True, weight_decay=recipe.weight_decay,
                               fused=fused)
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}: use adam, adamw or sgd")


def n_steps_for(recipe: Recipe, epoch_size: int) -> int:
    return recipe.epochs * math.ceil(epoch_size / recipe.batch_size)


def train_models(task: Task, data: TaskData, masks: np.ndarray, seeds: Sequence[int], *,
                 epoch_size: int | None = None, packed: bool = True, pack_size: int | None = None,
                 return_params: bool = False, device: torch.device | str | None = None,
                 eval_batch: int = 2048) -> TrainResult:
    """Train one model per row of `masks` (B, N) with seeds `seeds` and return their logits on all targets.

    epoch_size: examples per epoch, the same for every model of a stage (the subset stage passes round(alpha*N),
    so a model's number of steps does not depend on which other models share its block); default: the mask size
    of the first model.
    packed: train the block as packed computations: through the task's packed forward, or generically
    (`_generic_packed_forward`) where the model allows it; False: one model at a time.
    pack_size: models per packed computation (None: the whole block on a GPU, CPU_PACK_SIZE on a CPU, where larger
    packs were slower: benchmarks/train_throughput.py).
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 2 or masks.shape[1] != data.n_train:
        raise ValueError(f"masks must have shape (B, {data.n_train}), got {masks.shape}")
    if len(seeds) != len(masks):
        raise ValueError(f"got {len(seeds)} seeds for {len(masks)} masks")
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cpu":
        keep_freed_memory()
    recipe = task.recipe
    n_steps = n_steps_for(recipe, int(epoch_size or masks[0].sum()))
    # the final training loss averages the last epoch's steps (one step's minibatch loss alone is noisy)
    loss_from = n_steps - n_steps // max(1, recipe.epochs)
    streams = minibatch_streams(masks, seeds, n_steps, recipe.batch_size).to(device)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_targets = data.x_targets.to(device)
    models = [task.build_model(data.num_classes, int(s)).to(device) for s in seeds]

    start = time.perf_counter()
    fwd = packed_forward(task, models[0], x_train[:1]) if packed else None
    if fwd is not None:
        threads = torch.get_num_threads() if device.type == "cpu" else 1
        size = pack_size or pack_size_for(device, len(models))
        packs = _map_packs(lambda i: _train_packed(task, fwd, models[i:i + size], streams[i:i + size], x_train,
                                                   y_train, x_targets, eval_batch, loss_from),
                           range(0, len(models), size), threads)
        models = [m for p in packs for m in p[2]]
    else:
        packs = [_train_one(task, m, streams[i], x_train, y_train, x_targets, int(seeds[i]), eval_batch,
                            loss_from) for i, m in enumerate(models)]
    logits = np.concatenate([np.asarray(p[0]).reshape(-1, *p[0].shape[-2:]) for p in packs])
    train_loss = np.concatenate([np.atleast_1d(p[1]) for p in packs]).astype(np.float64)
    seconds = time.perf_counter() - start
    params = np.stack([state_vector(m).numpy() for m in models]) if return_params else None
    return TrainResult(logits=logits, params=params, seconds=seconds,
                       example_passes=len(models) * n_steps * recipe.batch_size, train_loss=train_loss)


# glibc's malloc returns freed blocks above its thresholds to the system, so a CPU training step's activations
# (a few MB each) came back as fresh pages every step: about 1,000 page faults per step, 10-20 % of its time on
# this 2-core machine (`keep_freed_memory`).
MALLOC_MMAP_THRESHOLD = 32 << 20  # blocks below this come from the heap, not from their own mapping
MALLOC_TRIM_THRESHOLD = 64 << 20  # freed memory at the heap's top is kept up to this much
_MALLOC_TUNED = False


def keep_freed_memory() -> None:
    """Have glibc keep freed memory for the next allocation instead of unmapping it (mallopt; once per process;
    the thresholds hold for every allocation of the process). Costs at most MALLOC_TRIM_THRESHOLD of resident
    memory kept free per arena."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, MALLOC_MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, MALLOC_TRIM_THRESHOLD)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc (macOS, musl): its own allocator's behaviour stands
        pass


def pack_size_for(device: torch.device, n: int) -> int:
    """Models per packed computation: all n on a GPU, at most CPU_PACK_SIZE on a CPU. It depends on the block and
    the device only: a model's numbers depend on its pack, never on the threads that run it (`_map_packs`)."""
    return n if device.type == "cuda" else min(n, CPU_PACK_SIZE)


def _map_packs(train: Callable[[int], tuple], starts: Sequence[int], threads: int) -> list[tuple]:
    """train(start) for every pack, in order. With several CPU threads and several packs, the packs run side by
    side in that many Python threads, each pack on one torch thread (torch releases the GIL inside its operators):
    measured on this 2-core CPU, 1.15x the rate of one pack at a time on 2 torch threads, whose small operators
    split badly (benchmarks/train_throughput.py). A single pack uses the threads inside its operators."""
    if threads <= 1 or len(starts) <= 1:
        return [train(i) for i in starts]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # process-wide: every pack's operators on the thread that runs it
    try:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dmu-pack") as pool:
            return list(pool.map(train, starts))
    finally:
        torch.set_num_threads(previous)


def packed_forward(task: Task, model: nn.Module, x: torch.Tensor) -> PackedForward | None:
    """The forward that runs a pack of `model`'s architecture as one computation: the task's own, else the
    generic one where the model allows it (`_generic_packed_forward`); None: one model at a time."""
    return task.packed_forward or _generic_packed_forward(task, model, x)


def _augment(task: Task, xb: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    return task.augment(xb, gen) if task.augment is not None else xb


def _train_one(task: Task, model: nn.Module, stream: torch.Tensor, x_train, y_train, x_targets,
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


def _generic_packed_forward(task: Task, model: nn.Module, x: torch.Tensor) -> PackedForward | None:
    """A packed forward for a task without a hand-written one: the model's own forward over stacked parameters,
    vectorised over the pack by `torch.vmap` (`torch.func.functional_call`), or None where that cannot hold.

    None (one model at a time) where the model has buffers (BatchNorm statistics, updated in place per model),
    where the task augments (per-model generators), or where the vmapped forward fails on one example (random
    ops such as dropout). Measured on this 2-core CPU (1 thread, 8 models, 5 epochs): the digits CNN
    (examples/digits_task.py) 1.26x faster packed this way than one at a time, the MNIST-1D MLP 1.5x; the
    MNIST-1D CNN 0.92x (Conv1d under vmap is a grouped convolution), which is why it has a hand-written one.
    The choice depends on the model alone, never on timing, so every run trains a model the same way.
    """
    why = ("the model has buffers" if any(True for _ in model.buffers()) else
           "the task augments its minibatches" if task.augment is not None else None)
    fwd = None
    if why is None:
        base = copy.deepcopy(model).to("meta")  # the structure only: parameters come from the stacked pack
        fwd = torch.vmap(lambda params, xb: functional_call(base, params, (xb,)))
        try:
            with torch.no_grad():
                fwd({name: p[None] for name, p in model.named_parameters()}, x[None])
        except RuntimeError as exc:
            why, fwd = f"its forward does not vectorise ({str(exc).splitlines()[0]})", None
    key = (task.name, task.arch, x.device.type)
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info(f"training: {task.name}/{task.arch} has no packed forward; " +
                 (f"one model at a time on {x.device.type}: {why}" if why else
                  f"packed generically (torch.vmap of its forward) on {x.device.type}"))
    return fwd


_LOGGED: set[tuple] = set()  # (task, arch, device) whose way of training has been logged in this process


def _train_packed(task: Task, fwd: PackedForward, models: list[nn.Module], streams: torch.Tensor, x_train,
                  y_train, x_targets, eval_batch: int, loss_from: int) -> tuple[np.ndarray, np.ndarray, list]:
    """Train a pack of models as one computation through `fwd` (a packed forward); returns their logits
    (G, T, C) on the targets, each model's mean minibatch loss over steps loss_from.. (G,) and the trained
    models."""
    recipe = task.recipe
    pack = StackedPack(models, fwd)
    opt = make_optimizer(pack.parameters(), recipe)
    G, n_steps, b = streams.shape
    loss_sum = torch.zeros(G, dtype=torch.float64, device=x_train.device)
    for step in range(n_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(recipe, step, n_steps)
        idx = streams[:, step]  # (G, b): every model its own minibatch
        out = pack(x_train[idx])
        per_example = F.cross_entropy(out.reshape(G * b, -1), y_train[idx].reshape(-1), reduction="none",
                                      label_smoothing=recipe.label_smoothing)
        # sum over models of each model's mean loss: model g's gradient is exactly that of its own loss
        loss = per_example.sum() / b
        if step >= loss_from:  # detached: recording the loss changes nothing in the training
            loss_sum += per_example.detach().view(G, b).double().mean(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    logits = pack.predict(x_targets, eval_batch)
    n_recorded = n_steps - loss_from
    train_loss = (loss_sum / n_recorded).cpu().numpy() if n_recorded > 0 else np.full(G, np.nan)
    return logits.cpu().numpy(), train_loss, pack.modules()
