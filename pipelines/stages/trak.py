"""TRAK datamodels for the `datamodels` stage: the cheap alternative to LASSO, in datamodels/trak.zarr.

Checkpoints = the first k = `trak_checkpoints` subset models (their parameters are kept in subsets.zarr; with
`datamodels.drop_failed`, the first k that did not fail: `SubsetSource.checkpoints`), so
TRAK sees models trained on alpha-subsets exactly like the LASSO fit; scores for every class logit and for the
margin of every target; calibrated to effects on outputs (one global scale per output kind, attribution.trak)
on the validation slice of subset models; LDS on the LDS slice, the same held-out models as LASSO's.

In bounded memory, by chunks of t = `target_chunk` targets, in two passes:
1. One work unit (a GPU unit on a cluster) featurizes the train set once with the k checkpoints
   (attribution.trak.TrakScorer) and then, for every chunk not yet `scored`, scores its logits and margins,
   writes these raw scores into `raw_weights` / `raw_margin_weights`, the chunk's calibration sums against the
   validation models into `calibration_sums` / `margin_calibration_sums`, and sets `scored[chunk]` (the unit
   writes its own whole chunks and flags: it is the only writer while it runs). An interrupted pass 1 reruns
   the unit, which featurizes again and scores only the chunks not scored.
2. The driver pools all sums into the scales and biases (attribution.trak.calibrate_from_sums); one unit per
   chunk not `done` writes weights = scale * raw scores and returns the chunk's LDS; the driver writes bias
   and LDS, marks the chunk done, then clears its raw chunk. Weights are always computed from the raw arrays,
   never from stored weights, so a rerun after any interruption applies the scale exactly once. When every
   chunk is done, the scratch arrays (raw_*, *calibration_sums, scored) are deleted: LASSO's schema remains.
3. The LDS-vs-checkpoints curve (attrs `lds_curve`, [[n, lds], ...] for n in {k//4, k//2, k}, written as
   points arrive; complete when `done` is) uses margins only, of at most CURVE_TARGETS test targets: small
   TRAK runs with n < k checkpoints (one unit each, calibrated on those targets alone), and for n = k the
   pass-1 unit's own features.

Peak memory (N train points, C classes, d = trak_proj_dim, float32 = 4 bytes):
- pass-1 unit, disk (traker's memory maps in the worker's temporary directory, TMPDIR): 4*(k+1)*N*d at most
  (projected train gradients, replaced checkpoint by checkpoint by the features), plus per chunk
  4*k*t*(C+1)*d target gradients and 4*N*t*(C+1) scores, deleted after the chunk;
- pass-1 unit, memory: about 3 * 4*N*t*(C+1) while traker finalizes a chunk's scores (its accumulator, the
  product and its copy, the averaged result; the returned chunk replaces them; measured 3.0x on the CPU), plus
  4*N*d (one checkpoint's features, also on the GPU), the per-example gradients of one batch (<= 1 GiB) and
  the task data;
- pass-2 unit: 4*N*t*C (the raw chunk, scaled in place) plus float64 LDS blocks of <= 128 MiB;
- driver: the sums, 8*T*(C+1)*6, and scales and biases, 8*T*(C+1)*2.
CIFAR-10 (N = 50,000, T = 60,000, C = 10, t = 1,000, k = 20, d = 4,096): 16 GB of features on disk, ~9 GB
in the pass-1 unit, 2 GB per pass-2 unit, 45 MB in the driver.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import zarr

from attribution.lds import lds
from attribution.store import ArraySpec, StoreError, location, open_group, open_or_create
from attribution.trak import CALIBRATION_SUMS, TrakScorer, calibrate, calibrate_from_sums, calibration_sums
from pipelines.config import ConfigError, TaskConfig
from pipelines.stages.context import RunContext, drive
from pipelines.stages.datamodel_io import (
    CURVE_TARGETS,
    KIND,
    ROW_CHUNK,
    SubsetSource,
    check_dropped,
    datamodels_config,
    dropped_attrs,
    lds_summary,
    log_lds,
    store_arrays,
    target_units,
)
from pipelines.tasks import TaskData, get_task
from pipelines.engine.training import default_device, load_state_vector

log = logging.getLogger("dmu")

SCRATCH = ("raw_weights", "raw_margin_weights", "calibration_sums", "margin_calibration_sums", "scored")
_LDS_BLOCK_BYTES = 1 << 27  # float64 copies of weights inside attribution.lds.lds stay below this


def scratch_arrays(n_train: int, n_targets: int, n_classes: int, target_chunk: int) -> dict[str, ArraySpec]:
    """Between the two passes: raw scores (chunked like the weights), per-target calibration sums (last axis
    in attribution.trak.CALIBRATION_SUMS order) and `scored` per target chunk."""
    rows, nan, k = min(ROW_CHUNK, n_train), float("nan"), len(CALIBRATION_SUMS)
    return {"raw_weights": ArraySpec((n_train, n_targets, n_classes), "float32",
                                     (rows, target_chunk, n_classes), nan),
            "raw_margin_weights": ArraySpec((n_train, n_targets), "float32", (rows, target_chunk), nan),
            "calibration_sums": ArraySpec((n_targets, n_classes, k), "float64", (target_chunk, n_classes, k),
                                          nan),
            "margin_calibration_sums": ArraySpec((n_targets, k), "float64", (target_chunk, k), nan),
            "scored": ArraySpec((-(-n_targets // target_chunk),), "bool", (1,), False)}


def _model_and_checkpoints(task_cfg: TaskConfig, data: TaskData,
                           params: np.ndarray) -> tuple[torch.nn.Module, list]:
    task = get_task(task_cfg)
    model = task.build_model(data.num_classes, 0)
    dicts = []
    for p in params:
        load_state_vector(model, p)
        dicts.append({k: v.clone() for k, v in model.state_dict().items()})
    return model, dicts


def _targets(data: TaskData, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels of targets rows.start..rows.stop-1 (without concatenating the whole target set)."""
    n, parts_x, parts_y = data.n_train, [], []
    if rows.start < n:
        parts_x.append(data.x_train[rows.start:min(rows.stop, n)])
        parts_y.append(data.y_train[rows.start:min(rows.stop, n)])
    if rows.stop > n:
        parts_x.append(data.x_test[max(rows.start - n, 0):rows.stop - n])
        parts_y.append(data.y_test[max(rows.start - n, 0):rows.stop - n])
    return torch.cat(parts_x), torch.cat(parts_y)


def _stack(sums: dict) -> np.ndarray:
    return np.stack([sums[k] for k in CALIBRATION_SUMS], axis=-1)


def _unstack(a: np.ndarray, n_models: int) -> dict:
    return {**{k: a[..., i] for i, k in enumerate(CALIBRATION_SUMS)}, "n_models": n_models}


def curve_targets(source: SubsetSource) -> slice | None:
    """The test targets the LDS curve averages over (the first CURVE_TARGETS), None without test targets."""
    stop = min(source.n_targets, source.n_train + CURVE_TARGETS)
    return slice(source.n_train, stop) if stop > source.n_train else None


def _curve_lds(scorer: TrakScorer, source: SubsetSource, data: TaskData, targets: slice) -> float:
    """Mean margin LDS over `targets` of TRAK from this scorer, calibrated on those targets alone."""
    _, val, held = source.splits
    x, y = _targets(data, targets)
    scores = scorer.scores(x, y, outputs="margin")
    weights, info = calibrate(scores, source.masks(val), source.outputs(val, targets)[1])
    scores = lds(weights, info["intercept"], source.masks(held), source.outputs(held, targets)[1])
    return float(np.nanmean(scores)) if np.isfinite(scores).any() else float("nan")


def trak_unit(unit: tuple[int], *, source: SubsetSource, store: str, task_cfg: TaskConfig, data: TaskData,
              k: int, chunks: list[tuple[int, int]], curve_sizes: tuple[int, ...], proj_dim: int,
              lambda_reg: float) -> list[float] | None:
    """Work unit with n = unit[0] checkpoints (the first n subset models not dropped). n = k: pass 1 over
    `chunks` (module docstring). n in curve_sizes: the LDS curve's point [n, lds], else None."""
    n = unit[0]
    model, checkpoints = _model_and_checkpoints(task_cfg, data, source.params(source.checkpoints(n)))
    with TrakScorer(model, checkpoints, data.x_train, data.y_train, num_classes=data.num_classes,
                    proj_dim=proj_dim, lambda_reg=lambda_reg, device=str(default_device())) as scorer:
        if n == k and chunks:
            group = open_group(store, mode="r+")
            chunk = group["raw_weights"].chunks[1]  # target_chunk
            masks_val = source.masks(source.splits[1])
            for t0, t1 in chunks:
                rows = slice(t0, t1)
                logit_scores, margin_scores = scorer.logit_and_margin_scores(*_targets(data, rows))
                group["raw_weights"][:, rows] = logit_scores
                group["raw_margin_weights"][:, rows] = margin_scores
                logits_val, margin_val = source.outputs(source.splits[1], rows)
                group["calibration_sums"][rows] = _stack(
                    calibration_sums(logit_scores, masks_val, logits_val))
                group["margin_calibration_sums"][rows] = _stack(
                    calibration_sums(margin_scores, masks_val, margin_val))
                del logit_scores, margin_scores  # before the next chunk's: one chunk at a time
                group["scored"][t0 // chunk] = True  # last: the chunk's raw scores and sums are complete
        targets = curve_targets(source)
        if n in curve_sizes and targets is not None:
            return [n, _curve_lds(scorer, source, data, targets)]
    return None


def _lds_by_columns(weights: np.ndarray, bias: np.ndarray, masks: np.ndarray,
                    outputs: np.ndarray) -> np.ndarray:
    """attribution.lds.lds on (N, K) weights in column blocks (it copies them to float64)."""
    step = max(1, _LDS_BLOCK_BYTES // (8 * weights.shape[0]))
    return np.concatenate([lds(weights[:, c:c + step], bias[c:c + step], masks, outputs[:, c:c + step])
                           for c in range(0, weights.shape[1], step)])


def calibrate_chunk(unit: tuple[int, int], *, source: SubsetSource, store: str, scale: np.ndarray,
                    bias: np.ndarray, margin_scale: np.ndarray, margin_bias: np.ndarray) -> dict:
    """Work unit, pass 2: weights of targets t0..t1-1 = scale * their raw scores, written into the store's
    chunk; returns the chunk's LDS on the held-out models (logits (t, C), margins (t,))."""
    t0, t1 = unit
    rows, held = slice(t0, t1), source.splits[2]
    group = open_group(store, mode="r+")
    masks, (logits, margin) = source.masks(held), source.outputs(held, rows)
    out = {}
    for prefix, s, b, y in (("", scale, bias, logits), ("margin_", margin_scale, margin_bias, margin)):
        w = np.asarray(group[f"raw_{prefix}weights"][:, rows])
        if not np.isfinite(w).all():
            raise RuntimeError(f"raw TRAK scores of targets {t0}..{t1 - 1} are missing from {store}: the "
                               "store is damaged; move it away to start it again")
        # float64 product rounded to float32, as attribution.trak.calibrate; in place: one chunk in memory
        np.multiply(w, s[rows], out=w, casting="unsafe")
        group[f"{prefix}weights"][:, rows] = w.astype(group[f"{prefix}weights"].dtype, copy=False)
        n_out = int(np.prod(w.shape[1:]))
        out[f"{prefix}lds"] = _lds_by_columns(w.reshape(len(w), n_out), b[rows].reshape(n_out), masks,
                                              y.reshape(len(y), n_out)).reshape(w.shape[1:])
        del w
    return out


def _scratch(group: zarr.Group, n_train: int, n_targets: int, n_classes: int, chunk: int) -> None:
    """Create the scratch arrays where absent (a store made before they existed has none)."""
    for name, spec in scratch_arrays(n_train, n_targets, n_classes, chunk).items():
        if name not in group:
            group.create_array(name, shape=spec.shape, dtype=spec.dtype, chunks=spec.chunks,
                               fill_value=spec.fill_value)


def run_trak(ctx: RunContext, source: SubsetSource) -> None:
    cfg, data = ctx.cfg, ctx.data
    d = cfg.datamodels
    k = d.trak_checkpoints
    kept = int(np.sum(source.checkpoints(k) < cfg.subsets.keep_params))
    if kept < k:
        raise StoreError(f"TRAK needs the parameters of {k} subset models (datamodels.trak_checkpoints) but only "
                         f"{kept} of the first {cfg.subsets.keep_params} (subsets.keep_params) did not fail: rerun "
                         "the subsets stage, which retrains the failed ones, or lower trak_checkpoints")
    if d.trak_proj_dim >= data.n_train:
        raise ConfigError(f"datamodels.trak_proj_dim = {d.trak_proj_dim} must stay below the {data.n_train} "
                          "training examples (docs/methods.md §8: LDS collapses otherwise)")
    n_train, n_targets, n_classes = data.n_train, data.n_targets, data.num_classes
    chunk = min(d.target_chunk, n_targets)
    path = ctx.run_dir / "datamodels" / "trak.zarr"
    group = open_or_create(path, store_arrays(n_train, n_targets, n_classes, chunk, d.weights_dtype),
                           kind=KIND, config=datamodels_config(cfg, "trak"),
                           attrs={**ctx.dataset_attrs(), "method": "trak", "target_chunk": chunk,
                                  "n_checkpoints": k, "n_calibration": len(source.splits[1]),
                                  "n_lds": len(source.splits[2]), **dropped_attrs(cfg, source),
                                  "calibration": "one global scale per output kind (logits, margins) + "
                                                 "per-target bias, least squares on the validation subset "
                                                 "models (attribution.trak.calibrate_from_sums)"})
    check_dropped(group, path, source)
    sizes = sorted({max(1, k // 4), max(1, k // 2), k}) if curve_targets(source) is not None else []
    curve = {int(n): v for n, v in group.attrs.get("lds_curve", [])}
    missing = tuple(n for n in sizes if n not in curve)
    done = np.asarray(group["done"][:])
    if done.all() and "lds_mean" in group.attrs and not missing:
        return
    store = location(path)

    # pass 1 (and the curve)
    log.info("TRAK: %d checkpoints, proj_dim %d, %d targets in chunks of %d", k, d.trak_proj_dim, n_targets,
             chunk)
    chunks = []
    if not done.all():
        _scratch(group, n_train, n_targets, n_classes, chunk)
        chunks = target_units(n_targets, chunk, np.asarray(group["scored"][:]))
    units = [(n,) for n in sorted(set(missing) | ({k} if chunks else set()))]
    shared = {"source": source, "store": store, "task_cfg": cfg.task, "data": data, "k": k, "chunks": chunks,
              "curve_sizes": missing, "proj_dim": d.trak_proj_dim, "lambda_reg": d.trak_lambda_reg}
    for (n,), point in (ctx.executor.map_unordered(trak_unit, units, shared) if units else ()):
        if point is not None:
            curve[n] = point[1]
            group.attrs["lds_curve"] = [[m, curve[m]] for m in sorted(curve)]

    # pass 2
    if not done.all():
        if not np.asarray(group["scored"][:]).all():
            raise RuntimeError(f"TRAK pass 1 left target chunks unscored in {path}; rerun the stage")
        n_val = len(source.splits[1])
        scale, bias, _, degenerate = calibrate_from_sums(
            _unstack(np.asarray(group["calibration_sums"][:]), n_val))
        margin_scale, margin_bias, _, margin_degenerate = calibrate_from_sums(
            _unstack(np.asarray(group["margin_calibration_sums"][:]), n_val))
        group.attrs.update({"scale": float(scale[~degenerate][0]),
                            "margin_scale": float(margin_scale[~margin_degenerate][0])})

        def write(unit: tuple[int, int], result: dict) -> None:
            t0, t1 = unit
            group["bias"][t0:t1] = bias[t0:t1]
            group["margin_bias"][t0:t1] = margin_bias[t0:t1]
            group["lds"][t0:t1] = result["lds"]
            group["margin_lds"][t0:t1] = result["margin_lds"]
            group["done"][t0 // chunk] = True
            # only now: until the chunk is done, its weights are recomputed from these
            group["raw_weights"][:, t0:t1] = np.nan  # NaN = fill value: zarr deletes the chunks
            group["raw_margin_weights"][:, t0:t1] = np.nan

        drive(ctx, calibrate_chunk, target_units(n_targets, chunk, done),
              {"source": source, "store": store, "scale": scale, "bias": bias, "margin_scale": margin_scale,
               "margin_bias": margin_bias}, write, total=n_targets, desc="TRAK calibration", unit="target")

    group.attrs.update({**lds_summary(group, n_train), "lds_curve": [[n, curve[n]] for n in sorted(curve)]})
    for name in SCRATCH:
        if name in group:
            del group[name]
    log_lds("TRAK", group)
