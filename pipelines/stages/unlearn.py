"""Stage `unlearn`: every configured method on every full model for every forget set, through the executor.

Reads models.zarr (full models and OM's oracles), forget_sets.json, tune.json (the tune stage's choice of
hyperparameters, where the run tunes) and the datamodel stores (only the forget rows); writes
runs/<name>/unlearned/<forget_set>/<variant>.zarr with the unlearned logits on all targets (K, T, C), the cost
per model and diagnostics. A variant is a method at one compute budget on one datamodel store (`Variant`:
dm_matching, dm_matching@3x, dm_matching[trak]). DM-Direct's logits are its predictions. Work unit = (forget
set, variant, block of full models); the fine-tuning methods run a block's models in packs, as one computation
through the task's packed forward (`unlearn_pack`; the same models as one at a time up to rounding), where the
task has one. The stage also times retraining per forget set the same way (the report's cost basis). The tune
stage runs the same units on its tuning sets (`run_variants`). Also serves single deletion requests (`dmu
unlearn`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import zarr
from torch import nn

from attribution.masks import model_seeds
from attribution.store import (
    ArraySpec,
    StoreError,
    exists,
    location,
    open_group,
    open_or_create,
    open_store,
    read,
)
from pipelines.config import ConfigError, RunConfig, TaskConfig, to_dict
from pipelines.engine.apply import method_inputs, models_inputs, unlearn_model, unlearn_packs
from pipelines.engine.training import default_device, pack_size_for, packed_forward, train_models
from pipelines.rundir.layout import (
    datamodel_rows,
    datamodel_store,
    fingerprint,
    load_forget_sets,
    load_tuned,
    dm_direct_margins,
    margin_only_models,
    om_ready,
    om_targets,
    open_models,
    point_sets,
    read_datamodel_rows,
)
from pipelines.rundir.reuse import open_reused, store_path
from pipelines.rundir.seeds import RETRAIN_TIMING_STREAM, method_seed
from pipelines.rundir.variants import DATAMODEL_METHODS, STOPPED_BY, Variant, show_datamodel, variants
from pipelines.stages.context import RunContext, drive
from pipelines.tasks import TaskData, get_task
from unlearning import METHODS

KIND = "unlearned"


# ----------------------------------------------------------------------------------------------------------
# variants: a method with its hyperparameters, datamodel store and compute budget (a row of the report)


def unlearned_config(cfg: RunConfig, fs: str, forget_idx: np.ndarray, variant: Variant,
                     margin_only: bool = False) -> dict:
    """What defines an unlearned store; `margin_only`: DM-Direct on an imported margin-only models.zarr."""
    config = {"seed": cfg.seed, "task": to_dict(cfg.task), "models": to_dict(cfg.models),
              "forget_set": {fs: fingerprint(forget_idx)},
              "method": variant.method, "hparams": variant.hparams, "datamodel": variant.datamodel}
    return {**config, "margin_only": True} if margin_only else config


# ----------------------------------------------------------------------------------------------------------
# work units


def unlearn_block(unit: tuple[str, int, int], *, task_cfg: TaskConfig, data: TaskData, seed: int,
                  plans: dict, models: str, full: str, om_ensemble: str, datamodels: dict) -> dict[str, np.ndarray]:
    """Work unit: one variant on full models start..stop-1 (of models.zarr's `full` ensemble) for one forget
    set (plans[key] = (forget set, indices, Variant)). It reads its own full models' rows and, for the datamodel methods,
    its forget set's rows of its datamodel store (Oracle Matching: its models' targets from models.zarr's
    `om_ensemble`, `om_targets`), so no process holds every model or every forget set's rows
    (both stores at their locations, see `location`). Returns per model: logits, seconds, example passes,
    and diagnostics (MU-Mis's steps and why it stopped; OM's and DMM's final matching loss)."""
    key, start, stop = unit
    fs, forget_idx, variant = plans[key]
    task, device = get_task(task_cfg), default_device()
    full_params = read(open_group(models)[f"{full}/params"], slice(start, stop), store=models)
    weight_rows = (read_datamodel_rows(datamodels[variant.datamodel], forget_idx)
                   if variant.method in DATAMODEL_METHODS else None)
    targets = (om_targets(open_group(models), fs, slice(start, stop), data.n_train, om_ensemble, store=models)
               if variant.method == "oracle_matching" else None)
    inputs = method_inputs(variant.method, oracle_targets=targets, weight_rows=weight_rows)
    seeds = [method_seed(seed, k, fs, variant.method) for k in range(start, stop)]
    forward = None
    if METHODS[variant.method].packed is not None:
        forward = packed_forward(task, task.build_model(data.num_classes, 0), data.x_train[:1])
    if forward is not None:  # packs of models as one computation (pipelines.engine.training.pack_size_for)
        results = unlearn_packs(task, data, full_params, variant.method, forget_idx, seeds=seeds,
                                hparams=variant.hparams, inputs=inputs, device=device, forward=forward)
    else:
        results = [unlearn_model(task, data, full_params[i], variant.method, forget_idx, seed=seeds[i],
                                 hparams=variant.hparams, inputs=models_inputs(variant.method, inputs, i),
                                 device=device)[1:]
                   for i in range(stop - start)]
    out: dict[str, list] = {name: [] for name in ("logits", "seconds", "example_passes", "steps", "stopped_by",
                                                   "final_loss")}
    for logits, cost, info in results:
        losses = info.get("epoch_losses") or [float("nan")]
        for name, value in (("logits", logits), ("seconds", cost.seconds), ("example_passes", cost.example_passes),
                            ("steps", info.get("steps", float("nan"))), ("final_loss", losses[-1]),
                            ("stopped_by", STOPPED_BY.index(info["stopped_by"]) if "stopped_by" in info else -1)):
            out[name].append(value)
    return {name: np.asarray(values) for name, values in out.items()}


def time_retraining(unit: tuple[str, int, int], *, task_cfg: TaskConfig, data: TaskData, seed: int,
                    forget_sets: dict, block: int) -> np.ndarray:
    """Work unit: retrain models without forget set `unit[0]` as the fine-tuning methods run, as many as one of
    their packs (`pack_size_for` a block of `block` models; trained one at a time where the task does not pack).
    Returns (seconds per model, models trained): the seconds are the cost basis the report divides by
    (retraining's example passes are counted, not timed)."""
    fs = unit[0]
    n = pack_size_for(default_device(), block)
    masks = np.ones((n, data.n_train), dtype=bool)
    masks[:, forget_sets[fs]] = False
    result = train_models(get_task(task_cfg), data, masks, model_seeds(n, seed, RETRAIN_TIMING_STREAM),
                          epoch_size=int(masks[0].sum()))
    return np.array([result.seconds / n, n])


RETRAIN_TIMING = "_retrain_timing.zarr"  # unlearned/<fs>/: seconds to retrain one model (in a pack, attr "pack")


def unlearned_arrays(k: int, block: int, data: TaskData) -> dict[str, ArraySpec]:
    t, c = data.n_targets, data.num_classes
    arrays = {"logits": ArraySpec((k, t, c), "float32", (block, t, c), float("nan"), compressed=False),
              "stopped_by": ArraySpec((k,), "int8", (block,), -1),
              "done": ArraySpec((k,), "bool", (block,), False)}
    for name in ("seconds", "example_passes", "steps", "final_loss"):
        arrays[name] = ArraySpec((k,), "float64", (block,), float("nan"))
    return arrays


def run_variants(ctx: RunContext, sets: dict[str, np.ndarray], chosen: list[Variant], *, root, k: int,
                 full: str, ensemble: str, config: Callable[[str, np.ndarray, Variant], dict], desc: str) -> dict:
    """Unlearn the first k full models of models.zarr's `full` ensemble ("full" for the evaluated sets,
    "tuning_full", the tune stage's own) for every forget set in `sets` with every variant, into
    root/<forget set>/<variant.store_name>.zarr (resuming: only blocks not done run). ensemble: where the
    sets' Oracle Matching targets live in models.zarr ("oracle" for evaluated sets, "tuning" for the tune
    stage's). Returns {(forget set, label): store}."""
    cfg, data = ctx.cfg, ctx.data
    models = open_models(ctx.run_dir)
    block = cfg.models.block_size
    if f"{full}/done" not in models or not models[f"{full}/done"][:k].all():
        raise StoreError(f"models.zarr has the {full} models not done: run the models stage first")
    stores: dict[tuple[str, str], zarr.Group] = {}
    plans, units = {}, []
    for fs, idx in sets.items():
        for v in chosen:
            # a reused run's complete store, read-only (pipelines.rundir.reuse), else this run's
            g = open_reused(ctx, root / fs / f"{v.store_name}.zarr", config(fs, idx, v), KIND)
            if g is None:
                g = open_or_create(root / fs / f"{v.store_name}.zarr", unlearned_arrays(k, block, data), kind=KIND,
                                   config=config(fs, idx, v),
                                   attrs={**ctx.dataset_attrs(), "forget_set": fs, **v.describe(),
                                      "nan_allowed": ["steps", "final_loss"]})  # NaN: the method has none
            key = f"{fs}/{v.store_name}"
            stores[(fs, v.label)], plans[key] = g, (fs, idx, v)
            done = g["done"][:]
            units += [(key, s, min(s + block, k)) for s in range(0, k, block) if not done[s:s + block].all()]
    if not units:
        return stores
    if any(v.method == "oracle_matching" for v in chosen):
        for fs in sets:
            if not om_ready(models, fs, ensemble, k):
                raise StoreError(f"models.zarr has Oracle Matching's oracles for {fs!r} not done: run the "
                                 "models stage first")
    dms = {v.datamodel for v in chosen if v.datamodel is not None}
    shared = {"task_cfg": cfg.task, "data": data, "seed": cfg.seed, "plans": plans,
              "models": location(store_path(ctx.run_dir, "models.zarr")), "full": full, "om_ensemble": ensemble,
              "datamodels": {dm: datamodel_store(ctx.run_dir, dm, data) for dm in sorted(dms)}}
    by_key = {f"{fs}/{v.store_name}": stores[(fs, v.label)] for fs in sets for v in chosen}

    def write(unit: tuple[str, int, int], result: dict) -> None:
        key, start, stop = unit
        g = by_key[key]
        for name, values in result.items():
            g[name][start:stop] = values
        g["done"][start:stop] = True

    drive(ctx, unlearn_block, units, shared, write, total=len(sets) * len(chosen) * k, desc=desc)
    return stores


# ----------------------------------------------------------------------------------------------------------
# a margin-only models.zarr (dmu import edub): DM-Direct on margins


# what runs on full models' and oracles' margins alone; do_nothing is scored by the report from models.zarr
MARGIN_METHODS = ("do_nothing", "dm_direct")
# stages that need trained models' logits or parameters, or that would replace the imported forget sets
LOGIT_STAGES = ("forget_sets", "models", "tune")


def check_margin_only(ctx: RunContext, stages) -> None:
    """Refuse, before any stage runs, what a margin-only models.zarr (`dmu import edub`) cannot serve: methods
    that need class logits or the full models' parameters, and the stages that train or draw over it."""
    if not margin_only_models(ctx.run_dir):
        return
    where = f"{ctx.run_dir}/models.zarr holds margins only (imported)"
    bad_stages = [s for s in stages if s in LOGIT_STAGES]
    if bad_stages:
        raise ConfigError(f"{where}: stages {', '.join(bad_stages)} need trained models' logits and parameters or "
                          "would replace the imported forget sets; run unlearn and report only (pipelines/configs/"
                          "cifar10_imported.yaml), or train in a new run directory")
    if "unlearn" in stages:
        bad = [m for m in ctx.cfg.unlearn.methods if m not in MARGIN_METHODS]
        if bad:
            raise ConfigError(f"{where}: unlearn.methods {', '.join(bad)} need class logits and the full models' "
                              f"parameters, which it lacks; keep only {' and '.join(MARGIN_METHODS)}, or train the "
                              "models (the models stage) in a new run directory")
        if "dm_direct" in ctx.cfg.unlearn.methods and "datamodels" not in stages:
            attrs = open_models(ctx.run_dir).attrs
            for dm in ctx.cfg.unlearn.datamodels:
                margin_datamodel_store(ctx.run_dir, dm, int(attrs["n_train"]), int(attrs["n_targets"]))


def margin_datamodel_store(run_dir, datamodel: str, n_train: int, t: int) -> str:
    """The location of datamodels/<datamodel>.zarr, checked for DM-Direct on margins: complete, with
    `margin_weights` (N, T)."""
    path = store_path(run_dir, f"datamodels/{datamodel}.zarr")
    if not exists(path):
        raise ConfigError(f"no datamodel store at {path}: DM-Direct on a margin-only models.zarr reads its "
                          "margin_weights; import one (dmu import datamodels-weights) or fit it (the datamodels stage)")
    store = open_store(path, "datamodels")
    if "margin_weights" not in store:
        raise ConfigError(f"{path} has no margin_weights: DM-Direct on a margin-only models.zarr needs margin "
                          "datamodels; import or fit a store that has them")
    if tuple(store["margin_weights"].shape) != (n_train, t):
        raise ConfigError(f"{path} has margin_weights {tuple(store['margin_weights'].shape)} but models.zarr has "
                          f"(N, T) = {(n_train, t)}: the stores are of different datasets")
    if "done" in store and not np.asarray(store["done"][:]).all():
        raise ConfigError(f"{path} is not complete: finish the datamodels stage or the import first")
    return location(path)


def run_on_margins(ctx: RunContext) -> None:
    """DM-Direct on margins for every forget set: the full models' margins minus the sum of the forget rows'
    margin datamodel weights, into unlearned/<fs>/<variant>.zarr (`margins` (K, T) float32, seconds, done); in
    the driver, one forget set at a time: K x T x 8 + |F| x T x 4 bytes."""
    cfg = ctx.cfg
    models = open_models(ctx.run_dir)
    k, n_train, t = int(models.attrs["k"]), int(models.attrs["n_train"]), int(models.attrs["n_targets"])
    chosen = [v for v in variants(cfg, load_tuned(ctx.run_dir, cfg)) if v.method == "dm_direct"]
    if not chosen:
        return
    full = read(models["full/margins"], slice(0, k), store=store_path(ctx.run_dir, "models.zarr"))
    block = cfg.models.block_size
    for fs, idx in load_forget_sets(ctx.run_dir).items():
        for v in chosen:
            arrays = {"margins": ArraySpec((k, t), "float32", (block, t), float("nan"), compressed=False),
                      "seconds": ArraySpec((k,), "float64", (block,), float("nan")),
                      "example_passes": ArraySpec((k,), "float64", (block,), float("nan")),
                      "done": ArraySpec((k,), "bool", (block,), False)}
            g = open_or_create(ctx.run_dir / "unlearned" / fs / f"{v.store_name}.zarr", arrays, kind=KIND,
                               config=unlearned_config(cfg, fs, idx, v, margin_only=True),
                               attrs={"forget_set": fs, **v.describe(), "margin_only": True})
            if np.asarray(g["done"][:]).all():
                continue
            start = time.perf_counter()
            store = margin_datamodel_store(ctx.run_dir, v.datamodel, n_train, t)
            g["margins"][:] = dm_direct_margins(store, idx, full)
            g["seconds"][:] = (time.perf_counter() - start) / k
            g["example_passes"][:] = 0.0  # no passes beyond the datamodels' one-off fit (docs/methods.md §3)
            g["done"][:] = True


def run(ctx: RunContext) -> None:
    if margin_only_models(ctx.run_dir):
        run_on_margins(ctx)
        return
    cfg, data = ctx.cfg, ctx.data
    sets = load_forget_sets(ctx.run_dir)
    chosen = variants(cfg, load_tuned(ctx.run_dir, cfg))
    run_variants(ctx, sets, chosen, root=ctx.run_dir / "unlearned", k=cfg.models.k, full="full", ensemble="oracle",
                 config=lambda fs, idx, v: unlearned_config(cfg, fs, idx, v), desc="unlearning")
    # retraining timed as the fine-tuning methods run (packs of the same size, same executor), per forget set
    timing = {fs: open_or_create(ctx.run_dir / "unlearned" / fs / RETRAIN_TIMING,
                                 {"seconds": ArraySpec((1,), "float64", (1,), float("nan")),
                                  "done": ArraySpec((1,), "bool", (1,), False)}, kind="retrain_timing",
                                 config={"seed": cfg.seed, "task": to_dict(cfg.task),
                                         "forget_set": {fs: fingerprint(idx)}})
              for fs, idx in sets.items()}
    units = [(fs, 0, 1) for fs, g in timing.items() if not g["done"][0]]

    def write(unit: tuple[str, int, int], result: np.ndarray) -> None:
        seconds, pack = result
        timing[unit[0]].attrs["pack"] = int(pack)
        timing[unit[0]]["seconds"][:] = seconds
        timing[unit[0]]["done"][:] = True

    drive(ctx, time_retraining, units, {"task_cfg": cfg.task, "data": data, "seed": cfg.seed, "forget_sets": sets,
                                        "block": min(cfg.models.block_size, cfg.models.k)},
          write, total=len(sets), desc="timing retraining")


def read_forget_ids(path: Path) -> np.ndarray:
    """Forget-set ids from a file: .npy, a JSON list, or integers separated by whitespace or commas."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"forget-id file {path} does not exist: write the training indices to forget, one per line")
    if path.suffix == ".npy":
        try:
            ids = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:  # EOFError: an empty file
            raise ConfigError(f"forget-id file {path} is not a readable .npy array of integers "
                              f"({exc or type(exc).__name__})") from exc
    else:
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError) as exc:  # binary (a .npy under another name), a directory
            raise ConfigError(f"forget-id file {path} is not a text file of integers ({exc}): write the ids as "
                              "text or JSON, or save them with numpy.save under a .npy name") from exc
        text = text.replace(",", " ").replace("[", " ").replace("]", " ").split()
        try:
            ids = np.array([int(t) for t in text], dtype=np.int64)
        except ValueError as exc:
            raise ConfigError(f"forget-id file {path} holds a non-integer id ({exc}): write training indices "
                              "0..N-1 only") from exc
        except OverflowError as exc:  # beyond int64: no training index
            raise ConfigError(f"forget-id file {path} holds an id too large for a training index ({exc}): "
                              "write training indices 0..N-1 only") from exc
    return np.asarray(ids)


def serve_request(run_dir: str | Path, cfg: RunConfig, forget_ids: np.ndarray, method: str, model_index: int,
                  out: Path, *, hparams: dict | None = None) -> dict:
    """One deletion request from the precomputed stores: unlearn full model `model_index`, write the checkpoint
    (or, for DM-Direct, the predicted logits), and return accuracies before and after. `run_dir` may be an
    object-store URL; `out` is a local file."""
    from unlearning.base import check_forget_idx
    from unlearning.metrics import accuracy

    task = get_task(cfg.task)
    data = task.load_data()
    if method not in METHODS or method == "retrain":
        raise ConfigError(f"unknown method {method!r}; known: {', '.join(sorted(set(METHODS) - {'retrain'}))}")
    try:
        idx = check_forget_idx(forget_ids, data.n_train).numpy()
    except ValueError as exc:
        raise ConfigError(f"bad forget ids: {exc}") from exc
    if len(idx) == data.n_train:
        raise ConfigError(f"bad forget ids: they name all {data.n_train} training examples, so nothing is "
                          "retained; forget a subset")
    if margin_only_models(run_dir):
        raise ConfigError(f"{run_dir}/models.zarr holds margins only (imported): no full model's parameters to "
                          "unlearn from; serve requests from a run whose models stage trained them")
    models = open_models(run_dir)
    k = models.attrs["k"]
    if not 0 <= model_index < k or not models["full/done"][model_index]:
        raise ConfigError(f"--model must name a trained full model in [0, {k}), got {model_index}")
    full_logits = read(models["full/logits"], model_index, store=store_path(run_dir, "models.zarr"))
    inputs: dict = {}
    if method in DATAMODEL_METHODS:
        inputs = {"datamodel_weights": datamodel_rows(run_dir, cfg.unlearn.datamodels[0], idx, data)}
    elif method == "oracle_matching":
        sets = load_forget_sets(run_dir)
        match = [fs for fs, f in sets.items() if np.array_equal(np.sort(f), np.sort(idx))]
        if not match:
            raise ConfigError("oracle_matching needs oracles retrained without this forget set, and the run has "
                              "none: use dm_matching, which needs only the datamodels")
        target = om_targets(models, match[0], slice(model_index, model_index + 1), data.n_train)
        if target is None:
            raise ConfigError(f"oracle_matching needs Oracle Matching's oracles for {match[0]!r} "
                              "(trained by the models stage): finish the models stage, or use dm_matching")
        inputs = {"oracle_logits": target[0]}
    key = Variant(method, {}, cfg.unlearn.datamodels[0] if method in DATAMODEL_METHODS else None,
                  show_datamodel=show_datamodel(cfg, method)).tuning_key
    hp = {**load_tuned(run_dir, cfg).get(key, cfg.unlearn.hparams.get(method, {})), **(hparams or {})}
    params = read(models["full/params"], model_index, store=store_path(run_dir, "models.zarr"))
    unlearned, logits, cost, _ = unlearn_model(task, data, params, method, idx,
                                               seed=method_seed(cfg.seed, model_index, "request", method),
                                               hparams=hp, inputs=inputs, device=default_device())
    labels = data.y_targets.numpy()
    sets = point_sets(idx, data.n_train, np.arange(data.n_train, data.n_targets))  # every test target

    def accs(lg: np.ndarray) -> dict:
        return {name: float(accuracy(lg[sets[key]], labels[sets[key]])) for name, key in
                (("forget", "forget"), ("retain", "retain"), ("test", "validation"))}

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    seconds, passes = cost.seconds, cost.example_passes
    meta = {"run": str(run_dir), "method": method, "model": model_index, "forget_ids": idx.tolist(),
            "seconds": seconds, "example_passes": passes}
    if isinstance(unlearned, nn.Module):
        torch.save({"state_dict": unlearned.state_dict(), **meta}, out)
    else:
        torch.save({"predicted_logits": torch.as_tensor(logits), **meta}, out)
    return {"before": accs(full_logits), "after": accs(logits), "seconds": seconds, "example_passes": passes,
            "out": str(out)}
