"""Stage `subsets`: train the subset models through the executor into runs/<name>/subsets.zarr.

Work unit = a block of model indices (one Zarr chunk); each unit regenerates its masks and seeds from the run seed.
Models that diverge are recorded as failed (attribution.subsets.write_block); the stage then ends with
FailedModelsError naming their rows and seeds, and a rerun retrains them.
"""

from __future__ import annotations

import logging

import numpy as np

from attribution import subsets as subsets_store
from attribution.masks import model_seeds, sample_masks
from pipelines.config import RunConfig, TaskConfig, to_dict
from pipelines.engine.training import state_vector, train_models
from pipelines.rundir.reuse import reuse_store
from pipelines.rundir.seeds import SUBSET_TRAIN_STREAM
from pipelines.stages.context import RunContext
from pipelines.tasks import TaskData, get_task

log = logging.getLogger("dmu")


def subsets_config(cfg: RunConfig) -> dict:
    """The settings that define subsets.zarr's contents (a rerun with others refuses)."""
    s = cfg.subsets
    return {"seed": cfg.seed, "task": to_dict(cfg.task),
            "subsets": {"n_models": s.n_models, "alpha": s.alpha, "block_size": s.block_size,
                        "keep_params": s.keep_params, "logits_dtype": s.logits_dtype}}


def train_subset_block(unit: tuple[int, int], *, task_cfg: TaskConfig, data: TaskData, seed: int, alpha: float,
                       keep_params: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
    """Work unit: train subset models start..stop-1 (masks and seeds regenerated from the run seed); returns
    their logits, params (when start < keep_params), final training losses and seeds."""
    start, stop = unit
    task = get_task(task_cfg)
    masks = sample_masks(stop - start, data.n_train, alpha, seed, start=start)
    seeds = model_seeds(stop - start, seed, SUBSET_TRAIN_STREAM, start=start)
    result = train_models(task, data, masks, seeds, epoch_size=round(alpha * data.n_train),
                          return_params=start < keep_params)
    return result.logits, result.params, result.train_loss, seeds


def run(ctx: RunContext) -> None:
    cfg, data = ctx.cfg, ctx.data
    s = cfg.subsets
    if reuse_store(ctx, "subsets.zarr", subsets_config(cfg)):  # a reused run's complete store (pipelines.rundir.reuse)
        return
    n_params = state_vector(ctx.task.build_model(data.num_classes, 0)).numel()
    group = subsets_store.create_store(
        ctx.run_dir / "subsets.zarr", n_models=s.n_models, n_train=data.n_train, n_targets=data.n_targets,
        n_classes=data.num_classes, alpha=s.alpha, seed=cfg.seed, block_size=s.block_size,
        keep_params=s.keep_params, n_params=n_params, config=subsets_config(cfg), attrs=ctx.dataset_attrs(),
        logits_dtype=s.logits_dtype)
    if not subsets_store.pending_blocks(group):
        log.info("subsets: all %d models done", s.n_models)
        return
    subsets_store.run(group, ctx.executor, train_subset_block,
                      shared={"task_cfg": cfg.task, "data": data, "seed": cfg.seed, "alpha": s.alpha,
                              "keep_params": s.keep_params},
                      test_labels=data.y_targets.numpy()[data.n_train:])
