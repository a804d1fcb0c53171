"""TRAK datamodels for the `datamodels` stage: the cheap alternative to LASSO, in datamodels/trak.zarr.

Checkpoints = the first `trak_checkpoints` subset models (their parameters are kept in subsets.zarr), so TRAK sees
models trained on alpha-subsets exactly like the LASSO fit; scores for every class logit and for the margin of every
target; calibrated to effects on outputs (one global scale, attribution.trak.calibrate) on the validation slice of
subset models; LDS on the LDS slice, the same held-out models as LASSO's. One work unit (a GPU unit on a cluster).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from attribution.lds import lds
from attribution.store import open_or_create, open_store
from attribution.trak import calibrate, trak_scores
from pipelines.config import ConfigError, TaskConfig
from pipelines.stages import RunContext
from pipelines.stages.datamodel_io import KIND, SubsetSource, datamodels_config, lds_summary, store_arrays
from pipelines.tasks import TaskData, get_task
from pipelines.training import default_device, load_state_vector

log = logging.getLogger("dmu")


def _checkpoint_dicts(task_cfg: TaskConfig, data: TaskData, params: np.ndarray) -> tuple[torch.nn.Module, list]:
    task = get_task(task_cfg)
    model = task.build_model(data.num_classes, 0)
    dicts = []
    for p in params:
        load_state_vector(model, p)
        dicts.append({k: v.clone() for k, v in model.state_dict().items()})
    return model, dicts


def trak_unit(unit: tuple[int, ...], *, task_cfg: TaskConfig, data: TaskData, params: np.ndarray, proj_dim: int,
              lambda_reg: float) -> tuple[np.ndarray, np.ndarray]:
    """Work unit: TRAK scores (N, T, C) for the logits and (N, T) for the margins, from len(params) checkpoints."""
    model, checkpoints = _checkpoint_dicts(task_cfg, data, params)
    device = str(default_device())
    common = dict(train_x=data.x_train, train_y=data.y_train, target_x=data.x_targets, target_y=data.y_targets,
                  num_classes=data.num_classes, proj_dim=proj_dim, lambda_reg=lambda_reg, device=device)
    logit_scores = trak_scores(model, checkpoints, outputs="logits", **common)
    margin_scores = trak_scores(model, checkpoints, outputs="margin", **common)
    return logit_scores, margin_scores


def run_trak(ctx: RunContext, source: SubsetSource) -> None:
    cfg, data = ctx.cfg, ctx.data
    d = cfg.datamodels
    _, val, held = source.splits
    k = d.trak_checkpoints
    if cfg.subsets.keep_params < k:
        raise ConfigError(f"TRAK needs the parameters of {k} subset models (datamodels.trak_checkpoints) but "
                          f"subsets.keep_params = {cfg.subsets.keep_params}: raise keep_params (this retrains the "
                          "subset store in a new run directory) or lower trak_checkpoints")
    if d.trak_proj_dim >= data.n_train:
        raise ConfigError(f"datamodels.trak_proj_dim = {d.trak_proj_dim} must stay below the {data.n_train} "
                          "training examples (reference.md §8: LDS collapses otherwise)")
    chunk = min(d.target_chunk, data.n_targets)
    group = open_or_create(ctx.run_dir / "datamodels" / "trak.zarr",
                           store_arrays(data.n_train, data.n_targets, data.num_classes, chunk, d.weights_dtype),
                           kind=KIND,
                           config=datamodels_config(cfg, "trak"),
                           attrs={**ctx.dataset_attrs(), "method": "trak", "target_chunk": chunk,
                                  "n_checkpoints": k, "n_calibration": d.n_val, "n_lds": d.n_lds,
                                  "calibration": "one global scale + per-target bias, least squares on the "
                                                 "validation subset models (attribution.trak.calibrate)"})
    if group["done"][:].all():
        return
    masks = source.masks()
    everything = slice(0, data.n_targets)
    logits, margin = np.full((len(masks), data.n_targets, data.num_classes), np.nan, np.float32), \
        np.full((len(masks), data.n_targets), np.nan, np.float32)
    for rows in (val, held):
        logits[rows], margin[rows] = source.outputs(rows, everything)
    params = np.asarray(open_store(ctx.run_dir / "subsets.zarr", "subsets")["params"][:k])
    shared = {"task_cfg": cfg.task, "data": data, "proj_dim": d.trak_proj_dim, "lambda_reg": d.trak_lambda_reg}
    log.info("TRAK: %d checkpoints, proj_dim %d", k, d.trak_proj_dim)
    curve = []
    for n in sorted({max(1, k // 4), max(1, k // 2), k}):  # LDS against the number of checkpoints
        [(_, (logit_scores, margin_scores))] = list(ctx.executor.map_unordered(
            trak_unit, [(n,)], {**shared, "params": params[:n]}))
        m_weights, m_info = calibrate(margin_scores, masks[val], margin[val])
        test = slice(data.n_train, data.n_targets)
        curve.append([n, float(np.nanmean(lds(m_weights[:, test], m_info["intercept"][test], masks[held],
                                              margin[held][:, test])))])
    weights, info = calibrate(logit_scores, masks[val], logits[val])
    t = data.n_targets
    group["weights"][:] = weights.astype(np.float32)
    group["bias"][:] = info["intercept"]
    group["lds"][:] = lds(weights.reshape(data.n_train, -1), info["intercept"].reshape(-1), masks[held],
                          logits[held].reshape(len(masks[held]), -1)).reshape(t, -1)
    group["margin_weights"][:] = m_weights.astype(np.float32)
    group["margin_bias"][:] = m_info["intercept"]
    group["margin_lds"][:] = lds(m_weights, m_info["intercept"], masks[held], margin[held])
    group["done"][:] = True
    group.attrs.update({**lds_summary(group, data.n_train), "lds_curve": curve,
                        "scale": float(np.ravel(info["scale"])[0])})
    log.info("TRAK datamodels: mean LDS %.3f (logits), %.3f (margins)", group.attrs["lds_mean"],
             group.attrs["lds_margin_mean"])
