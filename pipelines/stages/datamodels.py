"""Stage `datamodels`: linear datamodels from subsets.zarr into runs/<name>/datamodels/<method>.zarr.

The subset models are split by index: the first M - n_val - n_lds fit the datamodels, the next n_val choose λ per
target, the last n_lds (never used for fitting) measure LDS; with `datamodels.drop_failed`, failed models are left
out of their split (the others keep their roles) and every unit (Gram rows, LASSO chunks, the LDS curve, TRAK) uses
the same surviving rows (`SubsetSource.splits`). Targets are every class logit of every target (T x C
regressions, what DM-Direct and DMM consume) and, for comparison with the literature, the margin. On an imported
margin-only subsets.zarr (`datamodel_io`), LASSO fits the margins alone into a margin-only store (TRAK, which needs
the models' parameters, is refused).

LASSO in bounded memory, in the form `attribution.lasso.choose_form` picks from the stage's shapes (M = fit +
validation models, N training points). Masks form (2·M < N, or an N x N Gram over its memory bound): one work unit
per chunk of targets, which reads the masks and its own targets' logits (the subsets store is chunked along
targets), fits on the masks, and writes its own target chunk of every array; no N x N array exists. Gram form: first
the masks' Gram sums XᵀX of the fit and validation models, once per stage, in work units of GRAM_ROWS rows each
written into the store (exact counts, so any split of the work gives the same bits); then the target-chunk units,
which also read the shared Gram sums. The driver marks chunks done (resumable per chunk). Peak memory per stage:
docs/design.md.

Store (both methods, `datamodel_io.store_arrays`): `weights` (N, T, C) chunked along N (a forget request reads
only its rows), `bias` (T, C), `lambda` (T, C), `val_mse` (T, C), `lds` (T, C), the same for margins
(`margin_weights` (N, T), ...), `done` per target chunk; LASSO in Gram form adds `xtx_fit`, `xtx_val` (N, N)
float32, `x_sum_fit`, `x_sum_val` (N,), `gram_done`; attrs: model counts, solver settings (with the form), mean
LDS, the LDS-vs-models curve, the dropped failed models (`dropped_rows`, `dropped_seeds`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from attribution.lasso import LassoDatamodels, MaskGram, choose_form
from attribution.lds import lds
from attribution.store import ArraySpec, location, open_group, open_or_create
from pipelines.config import ConfigError
from pipelines.rundir.reuse import reuse_store
from pipelines.rundir.variants import curve_sizes, curve_store
from pipelines.stages.context import RunContext, drive
from pipelines.stages.datamodel_io import (
    CURVE_TARGETS,
    KIND,
    SubsetSource,
    check_dropped,
    datamodels_config,
    dropped_attrs,
    imported_margins,
    lds_summary,
    log_lds,
    open_subsets,
    source_attrs,
    store_arrays,
    target_units,
    write_targets,
)
from pipelines.stages.trak import run_trak

log = logging.getLogger("dmu")

GRAM_ROWS = 4096  # rows of XᵀX per work unit and per Zarr chunk: 4 * GRAM_ROWS * N bytes per array chunk


def gram_arrays(n_train: int) -> dict[str, ArraySpec]:
    rows = min(GRAM_ROWS, n_train)
    n_blocks = -(-n_train // rows)
    return {**{f"xtx_{s}": ArraySpec((n_train, n_train), "float32", (rows, n_train), 0.0) for s in ("fit", "val")},
            **{f"x_sum_{s}": ArraySpec((n_train,), "float64", (n_train,), 0.0) for s in ("fit", "val")},
            "gram_done": ArraySpec((n_blocks,), "bool", (1,), False)}


def gram_rows(unit: tuple[int, int], *, source: SubsetSource, store: str) -> None:
    """Work unit: rows i0..i1-1 of XᵀX for the fit and the validation models, written into the store."""
    i0, i1 = unit
    group = open_group(store, mode="r+")
    for name, rows in zip(("fit", "val"), source.splits[:2]):
        gram = MaskGram.from_masks(source.masks(rows), rows=slice(i0, i1))
        group[f"xtx_{name}"][i0:i1] = gram.xtx
        if i0 == 0:
            group[f"x_sum_{name}"][:] = gram.x_sum


def stored_grams(group, splits: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[MaskGram, MaskGram]:
    """The fit and validation MaskGrams of a store; XᵀX stays in the store and is read by blocks of rows."""
    return tuple(MaskGram(group[f"xtx_{name}"], np.asarray(group[f"x_sum_{name}"][:]), len(rows))
                 for name, rows in zip(("fit", "val"), splits[:2]))


def regression_targets(source: SubsetSource, rows: np.ndarray, targets: slice) -> tuple[np.ndarray, int]:
    """What LASSO regresses for `targets`: (m, t·C + t) every class logit, then the margins, and t·C, where the
    margins begin (0 on a margin-only store: the margins alone)."""
    if source.margin_only:
        return source.margins(rows, targets), 0
    logits, margin = source.outputs(rows, targets)
    return np.concatenate([logits.reshape(len(logits), -1), margin], axis=1), logits[0].size


def fit_lasso_chunk(unit: tuple[int, int], *, source: SubsetSource, store: str, n_lambdas: int,
                    lambda_ratio: float, form: str) -> None:
    """Work unit: LASSO datamodels of targets t0..t1-1 (every class logit, and the margin) with LDS, written into
    the store's target chunk t0..t1-1; form 'gram' reads the store's Gram sums, 'masks' fits on the masks alone."""
    t0, t1 = unit
    fit, val, held = source.positions()
    group = open_group(store, mode="r+")
    grams = dict(zip(("gram", "gram_val"), stored_grams(group, source.splits))) if form == "gram" else {}
    masks = source.masks(source.rows)
    y, split_at = regression_targets(source, source.rows, slice(t0, t1))
    est = LassoDatamodels(n_lambdas=n_lambdas, lambda_ratio=lambda_ratio, dtype="float32", form=form)
    est.fit(masks[fit], y[fit], masks[val], y[val], **grams)
    scores = lds(est.coef_, est.intercept_, masks[held], y[held])
    result = {"margin_weights": est.coef_[:, split_at:], "margin_bias": est.intercept_[split_at:],
              "margin_lambda": est.lambda_[split_at:], "margin_val_mse": est.val_mse_[split_at:],
              "margin_lds": scores[split_at:]}
    if split_at:
        k, c = t1 - t0, source.n_classes

        def logit_part(a: np.ndarray) -> np.ndarray:
            return a[..., :split_at].reshape(*a.shape[:-1], k, c)

        result.update({"weights": logit_part(est.coef_), "bias": logit_part(est.intercept_),
                       "lambda": logit_part(est.lambda_), "val_mse": logit_part(est.val_mse_),
                       "lds": logit_part(scores)})
    write_targets(group, t0, t1, result)


def curve_point(unit: tuple[int, int], *, source: SubsetSource, sizes: tuple[int, ...], n_lambdas: int,
                lambda_ratio: float) -> list[float]:
    """Work unit: LDS (mean over up to CURVE_TARGETS test-target margins) of LASSO fit on the first sizes[i]
    fit models (its own Gram: the first n models are not the whole fit set)."""
    n = sizes[unit[0]]
    _, val, held = source.positions()
    targets = slice(source.n_train, min(source.n_targets, source.n_train + CURVE_TARGETS))
    masks = source.masks(source.rows)
    margin = source.margins(source.rows, targets)
    est = LassoDatamodels(n_lambdas=n_lambdas, lambda_ratio=lambda_ratio, dtype="float32")
    est.fit(masks[:n], margin[:n], masks[val], margin[val])
    return [int(n), float(np.nanmean(lds(est.coef_, est.intercept_, masks[held], margin[held])))]


def lasso_curve(ctx: RunContext, source: SubsetSource) -> list[list[float]]:
    d = ctx.cfg.datamodels
    n_fit = len(source.splits[0])
    sizes = tuple(n for n in d.lds_curve if n <= n_fit)
    for n in sorted(set(d.lds_curve) - set(sizes)):
        log.warning("lds_curve: %d models requested but only %d fit the datamodels; skipped", n, n_fit)
    points: dict[int, list[float]] = {}
    drive(ctx, curve_point, [(i, i + 1) for i in range(len(sizes))],
          {"source": source, "sizes": sizes, "n_lambdas": d.n_lambdas, "lambda_ratio": d.lambda_ratio},
          lambda unit, point: points.__setitem__(unit[0], point), total=len(sizes), desc="LDS curve", unit="fit")
    return [points[i] for i in range(len(sizes))]


def curve_config(cfg, n_models: int, subsets: dict | None = None) -> dict:
    """The config of a curve store (`pipelines.rundir.variants.curve_store`): LASSO's, on the first n fit models."""
    return {**datamodels_config(cfg, "lasso", subsets), "fit_models": n_models}


def run_lasso(ctx: RunContext, source: SubsetSource, *, fit_models: int | None = None) -> None:
    """LASSO datamodels into datamodels/lasso.zarr, or with `fit_models` = n into the curve store
    datamodels/lasso_n<n>.zarr, fit on the first n fit models (the same validation and LDS models)."""
    cfg = ctx.cfg
    d = cfg.datamodels
    n_train, n_targets = source.n_train, source.n_targets
    subsets = imported_margins(ctx.run_dir) if source.margin_only else None
    name, config = "lasso", datamodels_config(cfg, "lasso", subsets)
    if fit_models is not None:
        name, config = curve_store(fit_models), curve_config(cfg, fit_models, subsets)
        source = replace(source, splits=(source.splits[0][:fit_models], *source.splits[1:]))
    chunk = min(d.target_chunk, n_targets)
    path = ctx.run_dir / "datamodels" / f"{name}.zarr"
    form, reason = choose_form(len(source.splits[0]) + len(source.splits[1]), n_train)
    log.info("LASSO datamodels (%s) in %s form: %s", name, form, reason)
    arrays = store_arrays(n_train, n_targets, source.n_classes, chunk, d.weights_dtype)
    if form == "gram":
        arrays.update(gram_arrays(n_train))
    group = open_or_create(path, arrays, kind=KIND, config=config,
                           attrs={**source_attrs(ctx, source), "method": "lasso", "target_chunk": chunk,
                                  **dict(zip(("n_fit", "n_val", "n_lds"), map(len, source.splits))),
                                  **dropped_attrs(cfg, source),
                                  "solver": {"n_lambdas": d.n_lambdas, "lambda_ratio": d.lambda_ratio,
                                             "dtype": "float32", "refit_on": "fit + validation models",
                                             "form": form}})
    check_dropped(group, path, source)
    store = location(path)
    if form == "gram":
        rows = group["xtx_fit"].chunks[0]
        gram_done = np.asarray(group["gram_done"][:])
        drive(ctx, gram_rows, target_units(n_train, rows, gram_done), {"source": source, "store": store},
              lambda unit, _: group["gram_done"].__setitem__(unit[0] // rows, True), total=n_train,
              desc="Gram of the masks", unit="row")
    shared = {"source": source, "store": store, "n_lambdas": d.n_lambdas, "lambda_ratio": d.lambda_ratio,
              "form": form}
    drive(ctx, fit_lasso_chunk, target_units(n_targets, chunk, np.asarray(group["done"][:])), shared,
          lambda unit, _: group["done"].__setitem__(unit[0] // chunk, True), total=n_targets,
          desc=f"LASSO datamodels ({name})", unit="target")
    curve = bool(d.lds_curve) and fit_models is None  # the LDS curve belongs to the run's own LASSO store
    if "lds_margin_mean" not in group.attrs or (curve and "lds_curve" not in group.attrs):
        summary = lds_summary(group, n_train)
        if curve:
            summary["lds_curve"] = lasso_curve(ctx, source)
        group.attrs.update(summary)
    log_lds(f"LASSO ({name})", group)


def run(ctx: RunContext) -> None:
    d = ctx.cfg.datamodels
    subsets = imported_margins(ctx.run_dir)
    # stores a reused run holds, complete and made with this config, are read there (pipelines.rundir.reuse)
    methods = [m for m in d.methods
               if not reuse_store(ctx, f"datamodels/{m}.zarr", datamodels_config(ctx.cfg, m, subsets))]
    curve = [n for n in curve_sizes(ctx.cfg)
             if not reuse_store(ctx, f"datamodels/{curve_store(n)}.zarr", curve_config(ctx.cfg, n, subsets))]
    if not methods and not curve:
        return
    source = open_subsets(ctx)
    for method in methods:
        ESTIMATORS[method](ctx, source)
    for n in curve:  # unlearn.datamodel_curve: LASSO on the first n fit models
        run_lasso(ctx, source, fit_models=n)


def check_imported(ctx: RunContext, stages) -> None:
    """Refuse, before any stage runs, what an imported margin-only subsets.zarr cannot serve: the subsets stage
    (it would train over the import) and TRAK (it needs the subset models' parameters and the training data)."""
    if imported_margins(ctx.run_dir) is None:
        return
    where = f"{ctx.run_dir}/subsets.zarr holds imported margins"
    if "subsets" in stages:
        raise ConfigError(f"{where}: leave the subsets stage out (stages: [datamodels, ...]), or train subset "
                          "models in a new run directory")
    if "datamodels" in stages and "trak" in ctx.cfg.datamodels.methods:
        raise ConfigError(f"{where}, no model parameters: TRAK needs them; set datamodels.methods: [lasso], or "
                          "import TRAK's scores (dmu import trak-scores)")


# The datamodel estimators (datamodels.methods, config.DATAMODEL_ESTIMATORS), each writing datamodels/<name>.zarr.
ESTIMATORS: dict[str, Callable[[RunContext, SubsetSource], None]] = {"lasso": run_lasso, "trak": run_trak}
