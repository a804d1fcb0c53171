"""The pipeline's stages: each reads the run's config and earlier stores, and writes its own store in the run dir.

`dmu run` calls them in order; every stage skips work already done, so a rerun resumes. Work units are module-level
functions (so Ray can ship them) that take a unit and shared inputs and return arrays; the stage driver writes them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np

from attribution import subsets as subsets_store
from attribution.masks import model_seeds, sample_masks
from pipelines.config import RunConfig, TaskConfig, to_dict
from pipelines.executor import Executor, make_executor
from pipelines.tasks import Task, TaskData, get_task
from pipelines.training import state_vector, train_models

log = logging.getLogger("dmu")

# Seed streams (attribution.masks.model_rng): one per kind of model, so no two models share a seed.
SUBSET_TRAIN_STREAM = 1


@dataclass
class RunContext:
    """What every stage needs: the config, the run directory, the task and its data, the executor."""

    cfg: RunConfig
    run_dir: Path
    address: str | None = None
    data_dir: Path | None = None
    _executor: Executor | None = field(default=None, repr=False)

    @cached_property
    def task(self) -> Task:
        return get_task(self.cfg.task)

    @cached_property
    def data(self) -> TaskData:
        return self.task.load_data(self.data_dir)

    @property
    def executor(self) -> Executor:
        if self._executor is None:
            self._executor = make_executor(self.cfg.executor, self.address)
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.close()
            self._executor = None

    def dataset_attrs(self) -> dict:
        return {"dataset": self.cfg.task.name, "dataset_fingerprint": self.data.fingerprint(),
                "n_train": self.data.n_train, "n_targets": self.data.n_targets,
                "num_classes": self.data.num_classes, "targets": self.data.target_map()}


# ---------------------------------------------------------------- subsets


def subsets_config(cfg: RunConfig) -> dict:
    """The settings that define subsets.zarr's contents (a rerun with others refuses)."""
    s = cfg.subsets
    return {"seed": cfg.seed, "task": to_dict(cfg.task),
            "subsets": {"n_models": s.n_models, "alpha": s.alpha, "block_size": s.block_size,
                        "keep_params": s.keep_params}}


def train_subset_block(unit: tuple[int, int], *, task_cfg: TaskConfig, data: TaskData, seed: int, alpha: float,
                       keep_params: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Work unit: train subset models start..stop-1 (masks and seeds regenerated from the run seed)."""
    start, stop = unit
    task = get_task(task_cfg)
    masks = sample_masks(stop - start, data.n_train, alpha, seed, start=start)
    seeds = model_seeds(stop - start, seed, SUBSET_TRAIN_STREAM, start=start)
    result = train_models(task, data, masks, seeds, epoch_size=round(alpha * data.n_train),
                          return_params=start < keep_params)
    return result.logits, result.params


def run_subsets(ctx: RunContext) -> None:
    cfg, data = ctx.cfg, ctx.data
    s = cfg.subsets
    n_params = state_vector(ctx.task.build_model(data.num_classes, 0)).numel()
    group = subsets_store.create_store(
        ctx.run_dir / "subsets.zarr", n_models=s.n_models, n_train=data.n_train, n_targets=data.n_targets,
        n_classes=data.num_classes, alpha=s.alpha, seed=cfg.seed, block_size=s.block_size,
        keep_params=s.keep_params, n_params=n_params, config=subsets_config(cfg), attrs=ctx.dataset_attrs())
    if not subsets_store.pending_blocks(group):
        log.info("subsets: all %d models done", s.n_models)
        return
    subsets_store.run(group, ctx.executor, train_subset_block,
                      shared={"task_cfg": cfg.task, "data": data, "seed": cfg.seed, "alpha": s.alpha,
                              "keep_params": s.keep_params})


STAGES: dict[str, Callable[[RunContext], None]] = {
    "subsets": run_subsets,
}


def run_stages(ctx: RunContext, stages: tuple[str, ...] | list[str]) -> None:
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; known: {', '.join(STAGES)}")
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    (ctx.run_dir / "config.json").write_text(json.dumps(to_dict(ctx.cfg), indent=2))
    for name in stages:
        log.info("stage %s", name)
        STAGES[name](ctx)
