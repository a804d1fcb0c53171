"""What a task declares (`Task`, `TaskData`, `Recipe`): a dataset + an architecture + a training recipe.

Every stage sees the data as a `TaskData`, whose targets are indexed the one way used everywhere: targets 0..N-1
are the training examples, then the test examples. The training engine (pipelines.engine.training) imports these
from here and never the other way round.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from pipelines.config import ConfigError
# Packed forward: (stacked parameters {name: (G, ...)}, inputs (G, b, ...)) -> logits (G, b, C); the unlearning
# methods run packs through the same forwards (unlearning.base.StackedPack).
from unlearning.base import PackedForward

DATA_DIR = Path(__file__).resolve().parents[2] / "data"


class DataError(RuntimeError):
    """A dataset is missing or malformed; the message says where to put the files."""


@dataclass(frozen=True)
class Recipe:
    """A training recipe; each task declares its own, configs may override fields (`task.recipe`)."""

    epochs: int  # passes over each model's training examples
    batch_size: int  # examples per step, per model
    lr: float  # peak learning rate
    weight_decay: float = 0.0  # L2 (adam, sgd) or decoupled (adamw)
    optimizer: str = "adam"  # adam | adamw | sgd (nesterov, momentum 0.9)
    schedule: str = "onecycle"  # constant | onecycle: linear warm-up to lr, then linear decay to 0
    warmup: float = 0.2  # fraction of the steps spent warming up (onecycle)
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class TaskData:
    """Training and test tensors (CPU) of one task."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    @property
    def n_targets(self) -> int:
        return len(self.y_train) + len(self.y_test)

    @property
    def x_targets(self) -> torch.Tensor:
        """Inputs of every target: training examples first, then test examples."""
        return torch.cat([self.x_train, self.x_test])

    @property
    def y_targets(self) -> torch.Tensor:
        return torch.cat([self.y_train, self.y_test])

    def target_map(self) -> dict:
        return {"train": [0, self.n_train], "test": [self.n_train, self.n_targets]}

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for t in (self.x_train, self.y_train, self.x_test, self.y_test):
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def head(self, n_train: int | None, n_test: int | None) -> "TaskData":
        """The first n training and test examples (a smaller N makes datamodels cheaper)."""
        for name, n, full in (("n_train", n_train, self.n_train), ("n_test", n_test, len(self.y_test))):
            if n is not None and not 0 < n <= full:
                raise ConfigError(f"task.{name} must be in [1, {full}] for this dataset, got {n}")
        return TaskData(self.x_train[:n_train], self.y_train[:n_train], self.x_test[:n_test], self.y_test[:n_test],
                        self.num_classes)


@dataclass(frozen=True)
class Task:
    """One dataset + architecture + recipe, as every stage uses it.

    The contract a task of your own fulfils (`task.name: package.module:make_task`, see `get_task`):
    - `load(data_dir) -> TaskData`: the full dataset as CPU tensors: float inputs of any shape (n, ...), int64
      labels in [0, num_classes). Deterministic: the stores keep the data's fingerprint and refuse other data.
      `data_dir` is the project's data/ folder (a task that ships its data may ignore it).
    - `make_model(num_classes) -> nn.Module`: a freshly initialised model mapping a batch of inputs (b, ...) to
      logits (b, num_classes). The engine seeds the global RNG before calling it (`build_model`), so draw every
      initial weight from torch's global RNG. Its state vector (every floating-point entry of its state dict)
      is what models.zarr stores.
    - `recipe`: a `Recipe` (epochs, batch size, optimizer, lr, schedule); configs override
      its fields through `task.recipe`.
    - `packed_forward` (optional): (stacked parameters {name: (G, ...)}, inputs (G, b, ...)) -> logits
      (G, b, C), G models as one computation (see pipelines/tasks/mnist1d.py). Without it (None) the engine
      packs the models generically (`torch.vmap` of `make_model`'s forward) where the model has no buffers and
      the task no `augment`, and trains them one at a time (each with its own optimiser) otherwise: the same
      kind of models, only slower.
    - `augment` (optional): (inputs (b, ...), torch.Generator) -> inputs, applied to each training minibatch.
    `name` and `arch` are recorded in the stores' attrs; `n_train` / `n_test` are set by `get_task` from the
    config.
    """

    name: str
    arch: str
    recipe: Recipe
    load: Callable[[Path], TaskData]  # full dataset, from data_dir
    make_model: Callable[[int], nn.Module]  # num_classes -> a freshly initialised model
    packed_forward: PackedForward | None = None  # None: packed generically where possible, else one at a time
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    n_train: int | None = None
    n_test: int | None = None

    def load_data(self, data_dir: Path | None = None) -> TaskData:
        return self.load(Path(data_dir or DATA_DIR)).head(self.n_train, self.n_test)

    def build_model(self, num_classes: int, seed: int) -> nn.Module:
        """A model initialised from `seed` alone (independent of the global RNG and of other models)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.make_model(num_classes)


def load_cached(path: Path, make: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Arrays from an .npz cache, made (and written atomically) on first use."""
    if path.exists():
        with np.load(path) as f:
            return dict(f)
    arrays = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return arrays
