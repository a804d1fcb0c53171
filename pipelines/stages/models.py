"""Stage `models`: K full models (all training data) and, per forget set, K + n_om (+ K floor) oracles
(retrained without it), trained through the executor with the packed engine into runs/<name>/models.zarr.

Layout: `full/{params,logits,seconds,train_loss,test_accuracy,failed,done}` and `oracle/<forget_set>/{...}`,
one row per model (`oracle_rows`); where the run tunes, also `tuning_full/{...}` (the tune stage's own tune.k full
models, from their own seed stream, never evaluated) and `tuning/<tuning set>/{...}` (its tune.k reference
oracles, then Oracle Matching's). In `oracle/<forget_set>`:
rows [0, K) are KLOM's reference; [K, K + n_om) Oracle Matching's targets (kept apart so OM is not scored
against the very models it matched): n_om = K with models.om_target "own" (row K + i is full model i's own
oracle), om_oracles with "mean" (`om_count`); with models.floor_oracles, the next K rows are the floor
oracles, which the report scores against the reference as if they were unlearned models (the oracle floor, K vs K).
Row i of an ensemble trains with seed i of its stream, and work units never straddle the start of the floor rows,
so the earlier rows train in the same packs, bit for bit, with or without the floor oracles. Store attrs `k`,
`om_oracles` and `floor_oracles` say which rows are which. Work unit = (ensemble, block of model indices).
A model with non-finite outputs is recorded as failed, not done: the stage finishes every other unit, then
raises FailedModelsError naming the rows and seeds; a rerun retrains their units.
"""

from __future__ import annotations

import numpy as np

from attribution.masks import model_seeds
from attribution.store import ArraySpec, open_or_create
from attribution.subsets import accuracy_on_test_targets, failed_error, failed_models
from pipelines.config import RunConfig, TaskConfig, to_dict
from pipelines.engine.training import default_device, load_state_vector, predict_logits, state_vector, train_models
from pipelines.rundir.layout import MODELS_KIND, fingerprint, load_forget_sets, om_count, oracle_rows
from pipelines.rundir.reuse import reuse_store
from pipelines.rundir.seeds import FULL_STREAM, TUNING_FULL_STREAM, oracle_stream
from pipelines.stages.context import RunContext, drive
from pipelines.tasks import TaskData, get_task


def ensembles(cfg: RunConfig, forget_sets: dict[str, np.ndarray],
              tuning_sets: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray | None, list, int]]:
    """name -> (forget indices or None, row segments [(start, stop), ...], seed stream). Each segment is cut
    into work units on its own; the last stop is the number of models."""
    m = cfg.models
    rows = oracle_rows(m.k, om_count(m, m.k), m.floor_oracles)
    # the reference and OM rows cut into units as they were before the floor oracles, the floor rows on their own
    floor = (rows["floor"].start, rows["floor"].stop)
    oracle_segments = [(0, rows["om"].stop)] + ([floor] if m.floor_oracles else [])
    out = {"full": (None, [(0, m.k)], FULL_STREAM)}
    for name, idx in forget_sets.items():
        out[f"oracle/{name}"] = (idx, oracle_segments, oracle_stream(name))
    # the tune stage's own full models (never evaluated) and, per tuning set (forget_sets.tuning_sets), tune.k
    # reference oracles, then their OM targets
    if tuning_sets:
        out["tuning_full"] = (None, [(0, cfg.tune.k)], TUNING_FULL_STREAM)
    for name, idx in tuning_sets.items():
        out[f"tuning/{name}"] = (idx, [(0, cfg.tune.k + om_count(m, cfg.tune.k))], oracle_stream(name))
    return out


def models_config(cfg: RunConfig, forget_sets: dict[str, np.ndarray], tuning_sets: dict[str, np.ndarray]) -> dict:
    config = {"seed": cfg.seed, "task": to_dict(cfg.task), "models": to_dict(cfg.models),
              "forget_sets": {n: fingerprint(i) for n, i in forget_sets.items()}}
    if tuning_sets:
        config["tuning"] = {"k": cfg.tune.k, "full_models": "tuning_full",
                            "sets": {n: fingerprint(i) for n, i in tuning_sets.items()}}
    return config


def train_ensemble_block(unit: tuple[str, int, int], *, task_cfg: TaskConfig, data: TaskData, seed: int,
                         plans: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Work unit: models start..stop-1 of one ensemble; returns logits, params, seconds, final training loss
    and seed per model."""
    name, start, stop = unit
    forget, _, stream = plans[name]
    mask = np.ones(data.n_train, dtype=bool)
    if forget is not None:
        mask[forget] = False
    masks = np.repeat(mask[None], stop - start, axis=0)
    seeds = model_seeds(stop - start, seed, stream, start=start)
    task = get_task(task_cfg)
    result = train_models(task, data, masks, seeds, epoch_size=int(mask.sum()), return_params=True)
    # Store the logits that the stored params give through the task's own module, as every later consumer
    # computes them (unlearning methods, `dmu unlearn`), not the packed forward's, which differ by float
    # rounding (~1e-5): then do_nothing reproduces the full models' logits exactly, and DM-Direct starts from
    # the logits of the model it stands for.
    x_targets = data.x_targets.to(default_device())
    logits = np.stack([predict_logits(load_state_vector(task.build_model(data.num_classes, 0), p)
                                      .to(x_targets.device), x_targets) for p in result.params])
    seconds = np.full(stop - start, result.seconds / (stop - start))
    return logits, result.params, seconds, result.train_loss, seeds


def run(ctx: RunContext) -> None:
    cfg, data = ctx.cfg, ctx.data
    sets = load_forget_sets(ctx.run_dir)
    tune_sets = load_forget_sets(ctx.run_dir, "tuning")
    plans = ensembles(cfg, sets, tune_sets)
    config = models_config(cfg, sets, tune_sets)
    if reuse_store(ctx, "models.zarr", config):  # a reused run's complete store (pipelines.rundir.reuse)
        return
    n_params = state_vector(ctx.task.build_model(data.num_classes, 0)).numel()
    block = cfg.models.block_size
    arrays = {}
    for name, (_, segments, _) in plans.items():
        n = segments[-1][1]
        arrays[f"{name}/logits"] = ArraySpec((n, data.n_targets, data.num_classes), "float32",
                                             (block, data.n_targets, data.num_classes), float("nan"), compressed=False)
        arrays[f"{name}/params"] = ArraySpec((n, n_params), "float32", (block, n_params), float("nan"),
                                             compressed=False)
        arrays[f"{name}/seconds"] = ArraySpec((n,), "float64", (block,), float("nan"))
        arrays[f"{name}/done"] = ArraySpec((n,), "bool", (block,), False)
        # each model's quality, as in subsets.zarr: a failed model (non-finite outputs) is not done
        arrays[f"{name}/train_loss"] = ArraySpec((n,), "float64", (block,), float("nan"))
        arrays[f"{name}/test_accuracy"] = ArraySpec((n,), "float64", (block,), float("nan"))
        arrays[f"{name}/failed"] = ArraySpec((n,), "bool", (block,), False)
    group = open_or_create(ctx.run_dir / "models.zarr", arrays, kind=MODELS_KIND, config=config,
                           attrs={**ctx.dataset_attrs(), "k": cfg.models.k,
                                  "om_oracles": om_count(cfg.models, cfg.models.k), "om_target": cfg.models.om_target,
                                  "floor_oracles": cfg.models.floor_oracles, "epochs": ctx.task.recipe.epochs,
                                  "tune_k": cfg.tune.k if tune_sets else 0})
    units = []
    for name, (_, segments, _) in plans.items():
        done = group[f"{name}/done"][:]
        for lo, hi in segments:
            blocks = [(s, min(s + block, hi)) for s in range(lo, hi, block)]
            units += [(name, s, e) for s, e in blocks if not done[s:e].all()]
    total = sum(segments[-1][1] for _, segments, _ in plans.values())

    test_labels = data.y_targets.numpy()[data.n_train:]
    failed: list[tuple[str, int]] = []

    def write(unit: tuple[str, int, int], result: tuple) -> None:
        name, start, stop = unit
        logits, params, seconds, train_loss, seeds = result
        for array, values in (("logits", logits), ("params", params), ("seconds", seconds),
                              ("train_loss", train_loss)):
            group[f"{name}/{array}"][start:stop] = values
        bad = failed_models(logits, train_loss, params)
        accuracy = accuracy_on_test_targets(logits, test_labels)
        group[f"{name}/test_accuracy"][start:stop] = np.where(bad, np.nan, accuracy)
        # the flags last: a crash before them leaves the unit to redo
        group[f"{name}/failed"][start:stop] = bad
        group[f"{name}/done"][start:stop] = ~bad
        failed.extend((f"{name} row {start + i}", int(seeds[i])) for i in np.flatnonzero(bad))

    shared = {"task_cfg": cfg.task, "data": data, "seed": cfg.seed, "plans": plans}
    drive(ctx, train_ensemble_block, units, shared, write, total=total, desc="full + oracle models")
    if failed:
        raise failed_error("models", failed, total)


