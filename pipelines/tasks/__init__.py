"""Tasks: a task is a dataset + an architecture + a training recipe.

`get_task(cfg)` returns a `Task` bound to the config's architecture, sizes and recipe overrides. Every stage sees
the data as a `TaskData`, whose targets are indexed the one way used everywhere: targets 0..N-1 are the training
examples, then the test examples.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from pipelines.config import ConfigError, TaskConfig
from pipelines.training import Recipe

DATA_DIR = Path(__file__).resolve().parents[2] / "data"


class DataError(RuntimeError):
    """A dataset is missing or malformed; the message says where to put the files."""


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


# Packed forward: (stacked parameters {name: (G, ...)}, inputs (G, b, ...)) -> logits (G, b, C).
PackedForward = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Task:
    """One dataset + architecture + recipe, as every stage uses it."""

    name: str
    arch: str
    recipe: Recipe
    load: Callable[[Path], TaskData]  # full dataset, from data_dir
    make_model: Callable[[int], nn.Module]  # num_classes -> a freshly initialised model
    packed_forward: PackedForward | None = None  # None: the engine trains one model at a time
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


def get_task(cfg: TaskConfig) -> Task:
    from pipelines.tasks import cifar10, mnist1d

    registry = {"mnist1d": mnist1d.task, "cifar10": cifar10.task}
    if cfg.name not in registry:
        raise ConfigError(f"unknown task.name {cfg.name!r}; known: {', '.join(registry)}")
    task = registry[cfg.name](cfg.arch)
    overrides = {k: v for k, v in dataclasses.asdict(cfg.recipe).items() if v is not None}
    return dataclasses.replace(task, recipe=dataclasses.replace(task.recipe, **overrides),
                               n_train=cfg.n_train, n_test=cfg.n_test)


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
