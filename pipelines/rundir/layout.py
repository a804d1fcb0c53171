"""The run directory's files and stores as later stages, the report and analysis scripts read them: the forget
sets (forget_sets.json), the full models and oracles (models.zarr), the datamodel weight stores
(datamodels/<name>.zarr) and the tune stage's choice (tune.json); the run's config (config.json) and the split
of the subset models into fit, validation and LDS rows. Every path goes through `store_path`, so a store
linked from a reused run is read there (pipelines.rundir.reuse)."""

from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path

import numpy as np
import zarr
from upath import UPath

from attribution.store import (
    StoreError,
    as_path,
    check_reachable,
    diff_keys,
    exists,
    location,
    normalise_config,
    open_group,
    open_store,
    read,
)
from pipelines.config import ConfigError, RunConfig, from_dict, to_dict, validate
from pipelines.rundir.reuse import store_path
from pipelines.tasks import TaskData


# ----------------------------------------------------------------------------------------------------------
# config.json


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The config a run was made with (runs/<name>/config.json; the run directory may be an object-store URL)."""
    run_dir = as_path(run_dir)
    check_reachable(run_dir)
    path = run_dir / "config.json"
    if not path.exists():
        raise ConfigError(f"{run_dir} is not a run directory (no config.json): run `dmu run CONFIG` first")
    cfg = dataclasses.replace(from_dict(RunConfig, json.loads(path.read_text())), run_dir=str(run_dir))
    validate(cfg, stages=())  # its stores exist: only what reading them needs
    return cfg


# ----------------------------------------------------------------------------------------------------------
# subsets.zarr


def split(n_models: int, n_val: int, n_lds: int,
          dropped: np.ndarray = ()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit / validation / LDS rows of the subset models, increasing and disjoint: by position in the store, the
    first M - n_val - n_lds fit, the next n_val choose λ, the last n_lds measure LDS; the `dropped` rows (failed
    models, datamodels.drop_failed) are removed from their own split, so every other model keeps its role."""
    n_fit = n_models - n_val - n_lds
    if n_fit < 2 or n_val < 1 or n_lds < 1:  # config.validate refuses such a config
        raise ValueError(f"cannot split {n_models} models into fit, {n_val} validation and {n_lds} LDS rows")
    keep = np.ones(n_models, dtype=bool)
    keep[np.asarray(dropped, dtype=np.int64)] = False
    bounds = ((0, n_fit), (n_fit, n_fit + n_val), (n_fit + n_val, n_models))
    splits = tuple(np.flatnonzero(keep[a:b]) + a for a, b in bounds)
    for name, rows, least, (a, b) in zip(("fit", "validation", "LDS"), splits, (2, 1, 1), bounds):
        if len(rows) < least:
            raise StoreError(f"subsets.zarr: only {len(rows)} of the {b - a} {name} models (rows {a}..{b - 1}) did "
                             "not fail: rerun the subsets stage (dmu run CONFIG --stages subsets), which retrains "
                             "the failed ones")
    return splits


# ----------------------------------------------------------------------------------------------------------
# forget_sets.json


def fingerprint(indices: np.ndarray) -> int:
    """A forget set's identity in the configs of the stores built on it (models, unlearned)."""
    return zlib.crc32(np.asarray(indices, np.int64).tobytes())


def point_sets(forget: np.ndarray, n_train: int, validation: np.ndarray) -> dict[str, np.ndarray]:
    """The target indices a forget set's unlearning is scored on: its forget points, the retain points (the other
    training points) and `validation` (test targets: the reporting or the tuning half, `validation_points`)."""
    forget = np.unique(np.asarray(forget, dtype=np.int64))
    return {"forget": forget, "retain": np.setdiff1d(np.arange(n_train), forget),
            "validation": np.asarray(validation, dtype=np.int64)}


def validation_points(run_dir: str | Path, half: str, n_train: int, n_targets: int) -> np.ndarray:
    """The test targets (indices n_train..n_targets-1) of one half of forget_sets.json's split: "tuning" (the
    tune stage's validation points) or "reporting" (the report's). A run that does not tune has no split: every
    test target reports, none tunes."""
    if half not in ("tuning", "reporting"):
        raise ValueError(f"half must be 'tuning' or 'reporting', got {half!r}")
    p = forget_sets_path(run_dir)
    split_ = json.loads(p.read_text()).get("validation") if p.exists() else None
    if split_ is None:
        return np.arange(n_train, n_targets) if half == "reporting" else np.arange(0)
    return np.asarray(split_[half], dtype=np.int64)


def forget_sets_path(run_dir: str | Path) -> UPath:
    """runs/<name>/forget_sets.json (the run directory may be an object-store URL), or the reused run's where
    links.json links it (pipelines.rundir.reuse)."""
    return store_path(run_dir, "forget_sets.json")


def load_forget_sets(run_dir: str | Path, key: str = "sets") -> dict[str, np.ndarray]:
    """The evaluated forget sets (key "sets") or the tune stage's tuning sets (key "tuning"), name -> indices."""
    p = forget_sets_path(run_dir)
    if not p.exists():
        raise StoreError(f"no forget sets at {p}: run the forget_sets stage first (dmu run CONFIG)")
    return {name: np.asarray(s["indices"], dtype=np.int64)
            for name, s in json.loads(p.read_text()).get(key, {}).items()}


# ----------------------------------------------------------------------------------------------------------
# models.zarr

MODELS_KIND = "models"


def om_count(models_cfg, k: int) -> int:
    """Oracle Matching's oracles per forget set for k full models: one each ("own"), or om_oracles ("mean")."""
    return k if models_cfg.om_target == "own" else models_cfg.om_oracles


def oracle_rows(k: int, om_oracles: int, floor_oracles: bool) -> dict[str, slice]:
    """Rows of `oracle/<forget_set>`: "reference" (KLOM's, K), "om" (Oracle Matching's targets, om_oracles) and
    "floor" (the oracle floor's, K when floor_oracles, else empty), in that order."""
    om = slice(k, k + om_oracles)
    return {"reference": slice(0, k), "om": om, "floor": slice(om.stop, om.stop + (k if floor_oracles else 0))}


def open_models(run_dir) -> zarr.Group:
    """models.zarr of a run (a local path or an object-store URL; a reused run's where linked), read-only."""
    return open_store(store_path(run_dir, "models.zarr"), MODELS_KIND)


def margin_only_models(run_dir) -> bool:
    """Whether the run's models.zarr holds margins in place of logits and parameters (`dmu import edub`): only
    what works on margins runs on it (DM-Direct on margin datamodels, KLOM)."""
    path = store_path(run_dir, "models.zarr")
    return exists(path) and bool(open_store(path, MODELS_KIND).attrs.get("margin_only", False))


def stored_oracle_rows(models: zarr.Group) -> dict[str, slice]:
    """`oracle_rows` of a models store, from its attrs (a store from before the floor oracles has none)."""
    attrs = models.attrs
    return oracle_rows(int(attrs["k"]), int(attrs.get("om_oracles", 0)), bool(attrs.get("floor_oracles", False)))


def om_rows(models: zarr.Group, ensemble: str = "oracle") -> tuple[slice, str]:
    """(rows of Oracle Matching's oracles in `ensemble` ("oracle", or "tuning": after its tune_k reference
    oracles), the store's om_target: "own" or "mean"; a store from before "own" existed is "mean")."""
    mode = str(models.attrs.get("om_target", "mean"))
    rows = stored_oracle_rows(models)["om"]
    if ensemble == "tuning":
        k = int(models.attrs["tune_k"])
        rows = slice(k, k + (k if mode == "own" else rows.stop - rows.start))
    return rows, mode


def om_ready(models: zarr.Group, forget_set: str, ensemble: str, n_models: int) -> bool:
    """Whether Oracle Matching's oracles for the first n_models full models are trained."""
    rows, mode = om_rows(models, ensemble)
    need = slice(rows.start, rows.start + n_models) if mode == "own" else rows
    return need.stop > need.start and need.stop <= rows.stop and bool(
        np.asarray(models[f"{ensemble}/{forget_set}/done"][need]).all())


def om_targets(models: zarr.Group, forget_set: str, model_rows: slice, n_train: int, ensemble: str = "oracle",
               store=None) -> np.ndarray | None:
    """Oracle Matching's targets on the training points for full models model_rows: (n, n_train, C), row i for
    full model model_rows.start + i: its own oracle's logits ("own") or the mean logits of the OM oracles, the
    same for every model ("mean"). None when those oracles are not all trained. Reads only those rows."""
    if not om_ready(models, forget_set, ensemble, model_rows.stop):
        return None
    rows, mode = om_rows(models, ensemble)
    logits = models[f"{ensemble}/{forget_set}/logits"]
    if mode == "own":
        own = slice(rows.start + model_rows.start, rows.start + model_rows.stop)
        return read(logits, own, store=store)[:, :n_train]
    n = model_rows.stop - model_rows.start
    mean = read(logits, rows, store=store)[:, :n_train].mean(0)
    return np.broadcast_to(mean, (n, *mean.shape))


# ----------------------------------------------------------------------------------------------------------
# datamodels/<name>.zarr


def datamodel_store(run_dir: str | Path, datamodel: str, data: TaskData) -> str:
    """The location of the datamodel weight store, checked against the task (complete, same N, T, C, dataset)."""
    path = store_path(run_dir, f"datamodels/{datamodel}.zarr")  # a reused run's where linked (pipelines.rundir.reuse)
    store = open_store(path, "datamodels")
    if "weights" not in store:
        raise StoreError(f"datamodel store {datamodel}.zarr holds margin datamodels only (fit on imported margins, "
                         "or imported weights): DM-Direct and DM-Matching on this run's models need class-logit "
                         "datamodels; fit LASSO on subset models with logits (the subsets stage) in this run")
    weights = store["weights"]
    if tuple(weights.shape) != (data.n_train, data.n_targets, data.num_classes):
        raise StoreError(f"datamodel store {datamodel}.zarr has weights {tuple(weights.shape)} but the task has "
                         f"(N, T, C) = {(data.n_train, data.n_targets, data.num_classes)}: it belongs to another "
                         "task or size; recompute the datamodels stage for this config")
    if "done" in store and not np.asarray(store["done"][:]).all():
        raise StoreError(f"datamodel store {datamodel}.zarr is not complete: finish the datamodels stage "
                         "first (dmu run CONFIG --stages datamodels resumes it)")
    fp = store.attrs.get("dataset_fingerprint")
    if fp is not None and fp != data.fingerprint():
        raise StoreError(f"datamodel store {datamodel}.zarr was fit on another dataset (fingerprint {fp}): "
                         "recompute it for this task")
    return location(path)


def read_datamodel_rows(store: str, forget_idx: np.ndarray) -> np.ndarray:
    """The forget rows (|F|, T, C) float32 of a datamodel store (only the row chunks that hold them are read)."""
    weights = open_group(store)["weights"]
    return read(weights, (np.sort(forget_idx), slice(None), slice(None)), store=store).astype(np.float32, copy=False)


def dm_direct_margins(store: str, forget_idx: np.ndarray, margins: np.ndarray) -> np.ndarray:
    """DM-Direct on margins (docs/methods.md §3): `margins` (..., T) minus the summed `margin_weights` rows of the
    forget points (summed in float64; only those rows are read), as float32."""
    weights = open_group(store)["margin_weights"]
    rows = np.sort(np.asarray(forget_idx, dtype=np.int64))
    delta = read(weights, (rows, slice(None)), store=store).astype(np.float64).sum(0)
    return (np.asarray(margins, dtype=np.float64) - delta).astype(np.float32)


def datamodel_rows(run_dir: str | Path, datamodel: str, forget_idx: np.ndarray, data: TaskData) -> np.ndarray:
    """The forget rows (|F|, T, C) of the datamodel weight store, checked against the task."""
    return read_datamodel_rows(datamodel_store(run_dir, datamodel, data), forget_idx)


# ----------------------------------------------------------------------------------------------------------
# tune.json


def tune_config(cfg: RunConfig, tuning_sets: dict[str, np.ndarray]) -> dict:
    """What the choice depends on: a tune.json made for another config is refused by `load_tune`."""
    return normalise_config({
        "seed": cfg.seed, "task": to_dict(cfg.task), "models": to_dict(cfg.models),
        "tune": to_dict(cfg.tune), "hparams": cfg.unlearn.hparams, "datamodels": list(cfg.unlearn.datamodels),
        "tuning_sets": {n: fingerprint(i) for n, i in tuning_sets.items()}})


def tune_path(run_dir) -> UPath:
    return as_path(run_dir) / "tune.json"


def load_tune(run_dir, cfg: RunConfig) -> dict:
    """tune.json of a run, checked against `cfg` (StoreError when missing or made for another config)."""
    p = tune_path(run_dir)
    if not p.exists():
        raise StoreError(f"no tuned hyperparameters at {p}: the config has tune.grid, so run the tune stage "
                         "first (dmu run CONFIG --stages tune)")
    stored = json.loads(p.read_text())
    expected = tune_config(cfg, load_forget_sets(run_dir, "tuning"))
    if stored["config"] != expected:
        raise StoreError(f"{p} was made with a different config ({'; '.join(diff_keys(stored['config'], expected))})"
                         ": rerun the tune stage (dmu run CONFIG --stages tune)")
    return stored


def load_tuned(run_dir, cfg: RunConfig) -> dict[str, dict]:
    """The tune stage's choice, tuning key (the method, with its datamodel where labels show it:
    `Variant.tuning_key`) -> hyperparameters ({} for a run without tune.grid); refuses a choice made for another
    config."""
    if not cfg.tune.grid:
        return {}
    return load_tune(run_dir, cfg)["chosen"]
