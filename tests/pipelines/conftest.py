"""Helpers shared by the pipeline tests, as plain functions (imported from here): the tiny MNIST-1D run of the
stage tests (`stage_config`, `run`, `write_datamodels`, `build_run`) and the subsets stage run in-process,
optionally interrupted after a number of units (`run_subsets`, `InterruptAfter`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import zarr

from attribution import subsets as subsets_store
from attribution.store import ArraySpec, open_or_create
from pipelines.config import DatamodelsConfig, ForgetSetsConfig, ModelsConfig, UnlearnConfig
from pipelines.engine.executor import SerialExecutor
from pipelines.stages import RunContext, run_stages
from pipelines.stages.subsets import subsets_config
from tests.conftest import small_config
from unlearning import METHODS

K = 2  # full models and reference oracles per forget set in the tiny run
ALL_METHODS = tuple(m for m in METHODS if m != "retrain")
# Keep the tiny run fast: MU-Mis's double-backward steps are the slowest part of the unlearn stage.
FAST_HPARAMS = {"mu_mis": {"max_steps": 20}}


def stage_config(tmp_path, *, methods=ALL_METHODS, random_sizes=(10,), full_class=0, pc_top_k=0, pc_ends=0):
    """small_config (seed 7, 200 + 50 examples), forget sets random_10 and class_0, K = 2, an OM oracle of its
    own per full model, 2 floor oracles."""
    return dataclasses.replace(
        small_config(tmp_path, epochs=8),
        forget_sets=ForgetSetsConfig(random_sizes=random_sizes, full_class=full_class, pc_top_k=pc_top_k,
                                     pc_ends=pc_ends),
        models=ModelsConfig(k=K, block_size=2),
        unlearn=UnlearnConfig(methods=methods, hparams=FAST_HPARAMS))


def run(cfg, stages, executor=None) -> RunContext:
    """Run `stages` of `cfg` in-process (the config's executor, or `executor`); the closed RunContext."""
    ctx = RunContext(cfg=cfg, run_dir=cfg.resolved_run_dir(), _executor=executor)
    try:
        run_stages(ctx, stages)
    finally:
        ctx.close()
    return ctx


def write_datamodels(ctx: RunContext, *, seed: int = 0, shape: tuple | None = None, name: str = "lasso",
                     margin_weights: np.ndarray | None = None, fingerprint: str | None = None) -> np.ndarray:
    """A datamodel store written by hand: random `weights` (N, T, C) (or `shape`) and, optionally,
    `margin_weights` (N, T), for the task's dataset (or the one of `fingerprint`). Returns the weights."""
    data = ctx.data
    shape = shape or (data.n_train, data.n_targets, data.num_classes)
    weights = (np.random.default_rng(seed).standard_normal(shape) * 0.05).astype(np.float32)
    arrays = {"weights": ArraySpec(shape, "float32", (64, *shape[1:]))}
    if margin_weights is not None:
        arrays["margin_weights"] = ArraySpec(margin_weights.shape, "float32", margin_weights.shape)
    group = open_or_create(ctx.run_dir / "datamodels" / f"{name}.zarr", arrays, kind="datamodels",
                           config={"written_by": "test", "seed": seed},
                           attrs={"dataset_fingerprint": fingerprint or data.fingerprint()})
    group["weights"][:] = weights
    if margin_weights is not None:
        group["margin_weights"][:] = margin_weights
    return weights


def build_run(tmp_path, *, methods=ALL_METHODS, unlearn: bool = True):
    """forget_sets + models (+ a hand datamodel store, + unlearn) in tmp_path/run -> (cfg, ctx, weights)."""
    cfg = stage_config(tmp_path, methods=methods)
    ctx = run(cfg, ["forget_sets", "models"])
    weights = write_datamodels(ctx)
    if unlearn:
        run(cfg, ["unlearn"])
    return cfg, ctx, weights


def run_subsets(cfg, executor=None):
    """The subsets stage of `cfg` in-process; its store, opened read-only with plain zarr."""
    ctx = run(cfg, ["subsets"], executor)
    return zarr.open_group(str(ctx.run_dir / "subsets.zarr"), mode="r")


class InterruptAfter(SerialExecutor):
    """Serial executor that is interrupted (Ctrl-C) after `n` units, counting the units it runs."""

    def __init__(self, n: int | None):
        super().__init__(1)
        self.n, self.units = n, []

    def map_unordered(self, fn, units, shared=None):
        for unit, result in super().map_unordered(fn, units, shared):
            self.units.append(unit)
            yield unit, result
            if self.n is not None and len(self.units) >= self.n:
                raise KeyboardInterrupt


# ---- the datamodels stage on a planted linear problem (no training needed)

N_TRAIN, N_TEST, C = 200, 50, 10  # the planted run's training points, test points and classes


def planted_run(tmp_path, *, n_models=160, kind="serial", datamodels=None, corrupt=None):
    """A run whose subset logits are an exact sparse linear function of the masks plus noise."""
    cfg = small_config(tmp_path, kind=kind, n_models=n_models, block=32)
    cfg = dataclasses.replace(cfg, datamodels=datamodels or DatamodelsConfig(n_val=32, n_lds=32, target_chunk=64,
                                                                            n_lambdas=8))
    ctx = RunContext(cfg=cfg, run_dir=cfg.resolved_run_dir())
    data = ctx.data
    group = subsets_store.create_store(
        ctx.run_dir / "subsets.zarr", n_models=n_models, n_train=N_TRAIN, n_targets=data.n_targets, n_classes=C,
        alpha=0.5, seed=cfg.seed, block_size=32, keep_params=0, n_params=1, config=subsets_config(cfg),
        attrs=ctx.dataset_attrs())
    rng = np.random.default_rng(0)
    weights = np.zeros((N_TRAIN, data.n_targets, C), np.float32)
    for j in range(data.n_targets):  # each target output depends on 3 training points
        weights[rng.choice(N_TRAIN, 3, replace=False), j, :] = rng.normal(0, 1, (3, C))
    masks = group["masks"][:]
    logits = np.einsum("mn,ntc->mtc", masks.astype(np.float32), weights) + rng.normal(0, 0.1, (n_models,
                                                                                            data.n_targets, C))
    if corrupt is not None:
        corrupt(logits)
    group["logits"][:] = logits.astype(np.float32)
    group["done"][:] = True
    return ctx, masks, logits, weights
