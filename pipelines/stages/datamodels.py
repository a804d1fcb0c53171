"""Stage `datamodels`: linear datamodels from subsets.zarr into runs/<name>/datamodels/<method>.zarr.

The subset models are split by index: the first M - n_val - n_lds fit the datamodels, the next n_val choose λ per
target, the last n_lds (never used for fitting) measure LDS. Targets are every class logit of every target (T x C
regressions, what DM-Direct and DMM consume) and, for comparison with the literature, the margin. LASSO fits run in
chunks of targets over the executor, each chunk one work unit that owns whole Zarr chunks (resumable per chunk).

Store (both methods): `weights` (N, T, C) chunked along N (a forget request reads only its rows), `bias` (T, C),
`lambda` (T, C), `val_mse` (T, C), `lds` (T, C), the same for margins (`margin_weights` (N, T), ...), `done`
per target chunk; attrs: model counts, solver settings, mean LDS and the LDS-vs-models curve.
"""

from __future__ import annotations

import logging

import numpy as np
import zarr

from attribution.lasso import LassoDatamodels
from attribution.lds import lds
from attribution.store import ArraySpec, StoreError, normalise_config, open_or_create, open_store
from pipelines.config import ConfigError, RunConfig, to_dict
from pipelines.stages import RunContext, drive
from pipelines.stages.subsets import subsets_config
from unlearning.klom import margins

log = logging.getLogger("dmu")

KIND = "datamodels"
ROW_CHUNK = 256  # training points per Zarr chunk of the weights: a forget request reads ceil(|F| rows / 256) chunks


def split(n_models: int, n_val: int, n_lds: int) -> tuple[slice, slice, slice]:
    """Fit / validation / LDS slices of the subset models (by index, so they are disjoint)."""
    n_fit = n_models - n_val - n_lds
    if n_val < 1 or n_lds < 1:
        raise ConfigError(f"datamodels.n_val and datamodels.n_lds must be >= 1 (held-out models to choose λ and "
                          f"measure LDS), got {n_val} and {n_lds}")
    if n_fit < 2:
        raise ConfigError(f"subsets.n_models = {n_models} leaves {n_fit} models to fit after n_val = {n_val} and "
                          f"n_lds = {n_lds}: train more subset models or hold out fewer")
    return slice(0, n_fit), slice(n_fit, n_fit + n_val), slice(n_fit + n_val, n_models)


def read_subsets(ctx: RunContext) -> tuple[np.ndarray, np.ndarray, zarr.Group]:
    """Masks (M, N) and logits (M, T, C) of a complete subsets.zarr, checked against this run's task."""
    group = open_store(ctx.run_dir / "subsets.zarr", "subsets")
    if group.attrs.get("dataset_fingerprint") != ctx.data.fingerprint():
        raise StoreError(f"{ctx.run_dir / 'subsets.zarr'} holds models of another dataset "
                         f"({group.attrs.get('dataset')}, fingerprint {group.attrs.get('dataset_fingerprint')}): "
                         "use this config's own run directory")
    if group.attrs.get("config") != normalise_config(subsets_config(ctx.cfg)):
        raise StoreError(f"{ctx.run_dir / 'subsets.zarr'} was made with another subsets/task config: rerun the "
                         "subsets stage with this config first")
    done = np.asarray(group["done"][:])
    if not done.all():
        raise StoreError(f"subsets.zarr has {int(done.sum())}/{done.size} models done: finish the subsets stage "
                         "first (dmu run CONFIG --stages subsets resumes it)")
    masks, logits = np.asarray(group["masks"][:]), np.asarray(group["logits"][:])
    if masks.shape[0] != logits.shape[0]:
        raise StoreError(f"subsets.zarr has {masks.shape[0]} masks but {logits.shape[0]} rows of logits: the store "
                         "is damaged; recompute it in a new run directory")
    if not np.isfinite(logits).all():
        bad = np.flatnonzero(~np.isfinite(logits).reshape(len(logits), -1).all(1))
        raise StoreError(f"subsets.zarr has non-finite logits in models {bad[:5].tolist()}: retrain them (delete "
                         "the store) or lower the learning rate")
    return masks, logits, group


def fit_lasso_chunk(unit: tuple[int, int], *, masks: np.ndarray, logits: np.ndarray, margin: np.ndarray,
                    splits: tuple[slice, slice, slice], n_lambdas: int, lambda_ratio: float) -> dict:
    """Work unit: LASSO datamodels of targets t0..t1-1 (every class logit, and the margin) with LDS."""
    t0, t1 = unit
    fit, val, held = splits
    c = logits.shape[2]
    y = np.concatenate([logits[:, t0:t1, :].reshape(len(logits), -1), margin[:, t0:t1]], axis=1)
    est = LassoDatamodels(n_lambdas=n_lambdas, lambda_ratio=lambda_ratio, dtype="float32")
    est.fit(masks[fit], y[fit], masks[val], y[val])
    scores = lds(est.coef_, est.intercept_, masks[held], y[held])
    k = t1 - t0
    split_at = k * c

    def logit_part(a: np.ndarray) -> np.ndarray:
        return a[..., :split_at].reshape(*a.shape[:-1], k, c)

    return {"weights": logit_part(est.coef_), "bias": logit_part(est.intercept_),
            "lambda": logit_part(est.lambda_), "val_mse": logit_part(est.val_mse_), "lds": logit_part(scores),
            "margin_weights": est.coef_[:, split_at:], "margin_bias": est.intercept_[split_at:],
            "margin_lambda": est.lambda_[split_at:], "margin_val_mse": est.val_mse_[split_at:],
            "margin_lds": scores[split_at:]}


def store_arrays(n_train: int, n_targets: int, n_classes: int, target_chunk: int) -> dict[str, ArraySpec]:
    rows = min(ROW_CHUNK, n_train)
    nan = float("nan")
    per_target = {name: ArraySpec((n_targets, n_classes), "float32", (target_chunk, n_classes), nan)
                  for name in ("bias", "lambda", "val_mse", "lds")}
    per_margin = {f"margin_{name}": ArraySpec((n_targets,), "float32", (target_chunk,), nan)
                  for name in ("bias", "lambda", "val_mse", "lds")}
    n_units = -(-n_targets // target_chunk)
    return {"weights": ArraySpec((n_train, n_targets, n_classes), "float32", (rows, target_chunk, n_classes), nan),
            "margin_weights": ArraySpec((n_train, n_targets), "float32", (rows, target_chunk), nan),
            **per_target, **per_margin, "done": ArraySpec((n_units,), "bool", (1,), False)}


def write_chunk(group: zarr.Group, t0: int, t1: int, result: dict) -> None:
    group["weights"][:, t0:t1, :] = result["weights"]
    group["margin_weights"][:, t0:t1] = result["margin_weights"]
    for name in ("bias", "lambda", "val_mse", "lds"):
        group[name][t0:t1] = result[name]
        group[f"margin_{name}"][t0:t1] = result[f"margin_{name}"]
    group["done"][t0 // group.attrs["target_chunk"]] = True


def lds_summary(group: zarr.Group, n_train: int) -> dict:
    """Mean LDS over targets (NaN for constant targets skipped), overall and on test targets."""
    def mean(a: np.ndarray) -> float:
        return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")

    logit_lds, margin_lds = np.asarray(group["lds"][:]), np.asarray(group["margin_lds"][:])
    return {"lds_mean": mean(logit_lds), "lds_margin_mean": mean(margin_lds),
            "lds_margin_test_mean": mean(margin_lds[n_train:])}


def datamodels_config(cfg: RunConfig, method: str) -> dict:
    d = cfg.datamodels
    keys = {"lasso": ("n_val", "n_lds", "n_lambdas", "lambda_ratio", "target_chunk"),
            "trak": ("n_val", "n_lds", "trak_checkpoints", "trak_proj_dim", "trak_lambda_reg", "target_chunk")}
    return {"subsets": subsets_config(cfg), "method": method, **{k: to_dict(d)[k] for k in keys[method]}}


def lasso_curve(masks: np.ndarray, margin: np.ndarray, splits, sizes: tuple[int, ...], n_train: int,
                n_lambdas: int, lambda_ratio: float, max_targets: int = 100) -> list[list[float]]:
    """LDS (mean over up to `max_targets` test-target margins) of LASSO fit on the first n models, for each n."""
    fit, val, held = splits
    targets = np.arange(n_train, margin.shape[1])[:max_targets]
    curve = []
    for n in sizes:
        if n > fit.stop:
            log.warning("lds_curve: %d models requested but only %d fit the datamodels; skipped", n, fit.stop)
            continue
        est = LassoDatamodels(n_lambdas=n_lambdas, lambda_ratio=lambda_ratio, dtype="float32")
        est.fit(masks[:n], margin[:n][:, targets], masks[val], margin[val][:, targets])
        curve.append([int(n), float(np.nanmean(lds(est.coef_, est.intercept_, masks[held], margin[held][:, targets])))])
    return curve


def run_lasso(ctx: RunContext, masks: np.ndarray, logits: np.ndarray, margin: np.ndarray, splits) -> None:
    cfg, data = ctx.cfg, ctx.data
    d = cfg.datamodels
    chunk = min(d.target_chunk, data.n_targets)
    path = ctx.run_dir / "datamodels" / "lasso.zarr"
    group = open_or_create(path, store_arrays(data.n_train, data.n_targets, data.num_classes, chunk), kind=KIND,
                           config=datamodels_config(cfg, "lasso"),
                           attrs={**ctx.dataset_attrs(), "method": "lasso", "target_chunk": chunk,
                                  "n_fit": splits[0].stop, "n_val": d.n_val, "n_lds": d.n_lds,
                                  "solver": {"n_lambdas": d.n_lambdas, "lambda_ratio": d.lambda_ratio,
                                             "dtype": "float32", "refit_on": "fit + validation models"}})
    done = np.asarray(group["done"][:])
    units = [(t0, min(t0 + chunk, data.n_targets)) for i, t0 in enumerate(range(0, data.n_targets, chunk))
             if not done[i]]
    shared = {"masks": masks, "logits": logits, "margin": margin, "splits": splits, "n_lambdas": d.n_lambdas,
              "lambda_ratio": d.lambda_ratio}
    drive(ctx, fit_lasso_chunk, units, shared, lambda u, result: write_chunk(group, *u, result),
          total=data.n_targets, desc="LASSO datamodels", unit="target")
    if "lds_mean" not in group.attrs or (d.lds_curve and "lds_curve" not in group.attrs):
        summary = lds_summary(group, data.n_train)
        if d.lds_curve:
            summary["lds_curve"] = lasso_curve(masks, margin, splits, d.lds_curve, data.n_train, d.n_lambdas,
                                               d.lambda_ratio)
        group.attrs.update(summary)
    log.info("LASSO datamodels: mean LDS %.3f (logits), %.3f (margins)", group.attrs["lds_mean"],
             group.attrs["lds_margin_mean"])


def run(ctx: RunContext) -> None:
    d = ctx.cfg.datamodels
    unknown = [m for m in d.methods if m not in ("lasso", "trak")]
    if unknown:
        raise ConfigError(f"unknown datamodels.methods {unknown}: use lasso and/or trak")
    masks, logits, _ = read_subsets(ctx)
    splits = split(len(masks), d.n_val, d.n_lds)
    margin = margins(logits, ctx.data.y_targets.numpy()).astype(np.float32)
    if "lasso" in d.methods:
        run_lasso(ctx, masks, logits, margin, splits)
    if "trak" in d.methods:
        from pipelines.stages.trak import run_trak

        run_trak(ctx, masks, logits, margin, splits)
