"""Stage `tune`: each method's hyperparameters chosen by KLOM on tuning forget sets, never on the evaluated ones.

Reads forget_sets.json's tuning sets (drawn by the forget_sets stage from their own seed stream, disjoint from
every evaluated set: `forget_sets.tuning_sets`), models.zarr (the first tune.k full models and each tuning set's
own oracles, `tuning/<set>`) and the datamodel store; writes runs/<name>/tune/<set>/<method>__g<i>.zarr (the
unlearned logits of grid point i, the unlearn stage's units and layout) and runs/<name>/tune.json: the sets, the
grid, every grid point's score and the choice. The unlearn stage runs every method with the chosen values.

Criterion (the same for every method): KLOM of the tune.k unlearned models against the tuning set's tune.k
reference oracles, the mean of its p95 over forget, retain and validation points, averaged over the tuning sets;
the smallest wins (ties: the first grid point). No evaluated forget set, and none of its oracles, is read here.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np

from attribution.store import StoreError, read, write_text
from pipelines.report.evaluate import json_safe
from pipelines.rundir.layout import (
    forget_sets_path,
    load_forget_sets,
    open_models,
    point_sets,
    tune_config,
    tune_path,
)
from pipelines.rundir.reuse import store_path
from pipelines.rundir.variants import candidates
from pipelines.stages.context import RunContext
from pipelines.stages.unlearn import run_variants, unlearned_config
from unlearning import METHODS
from unlearning.klom import klom, klom_summary, margins

log = logging.getLogger("dmu")

CRITERION = ("mean over the tuning sets of the mean of KLOM p95 on forget, retain and validation points "
             "(tune.k unlearned models against the set's tune.k reference oracles)")
POINT_SETS = ("forget", "retain", "validation")


def score(unlearned_logits: np.ndarray, oracle_margins: np.ndarray, labels: np.ndarray,
          point_sets: dict[str, np.ndarray]) -> tuple[float, dict]:
    """The criterion on one tuning set: (mean of the KLOM p95 over the point sets, the p95 per point set);
    infinite where any model's unlearning diverged (non-finite logits), so that a diverging setting is never
    chosen over one that does not."""
    if not np.isfinite(unlearned_logits).all():
        return math.inf, {name: math.inf for name in POINT_SETS}
    summary = klom_summary(klom(margins(unlearned_logits, labels), oracle_margins), point_sets)
    per_set = {name: summary[name]["p95"] for name in POINT_SETS}
    return float(np.mean(list(per_set.values()))), per_set


def run(ctx: RunContext) -> None:
    cfg, data = ctx.cfg, ctx.data
    if not cfg.tune.grid:
        log.info("tune: the config has no tune.grid; methods run with unlearn.hparams")
        return
    sets = load_forget_sets(ctx.run_dir, "tuning")
    if not sets:
        raise StoreError("forget_sets.json has no tuning sets: run the forget_sets stage with this config")
    grid = candidates(cfg)
    k = cfg.tune.k
    if k > cfg.models.k:
        raise StoreError(f"tune.k = {k} needs that many full models, the run has models.k = {cfg.models.k}")
    stores = run_variants(ctx, sets, [v for vs in grid.values() for v in vs], root=ctx.run_dir / "tune", k=k,
                          ensemble="tuning", desc="tuning",
                          config=lambda fs, idx, v: {**unlearned_config(cfg, fs, idx, v), "k": k})
    models = open_models(ctx.run_dir)
    models_path = store_path(ctx.run_dir, "models.zarr")
    labels = data.y_targets.numpy()
    results: dict[str, list[dict]] = {m: [{"hparams": v.hparams, "per_set": {}} for v in vs] for m, vs in grid.items()}
    for fs, idx in sets.items():
        if not np.asarray(models[f"tuning/{fs}/done"][:k]).all():
            raise StoreError(f"models.zarr has the oracles of tuning set {fs!r} not done: run the models stage")
        oracle_margins = margins(read(models[f"tuning/{fs}/logits"], slice(0, k), store=models_path), labels)
        sets_of_points = point_sets(idx, data.n_train, data.n_targets)
        for method, vs in grid.items():
            for v, entry in zip(vs, results[method]):
                logits = read(stores[(fs, v.label)]["logits"], store=ctx.run_dir / "tune" / fs / v.store_name)
                value, per_set = score(logits, oracle_margins, labels, sets_of_points)
                entry["per_set"][fs] = {"score": value, "p95": per_set}
    chosen = {}
    for method, entries in results.items():
        for entry in entries:
            entry["score"] = float(np.mean([s["score"] for s in entry["per_set"].values()]))
        best = min(range(len(entries)), key=lambda i: entries[i]["score"])
        chosen[method] = entries[best]["hparams"]
        if not math.isfinite(entries[best]["score"]):
            log.warning("tune: %s diverged at every grid point (non-finite logits); it runs with %s: give it a "
                        "grid of smaller learning rates (tune.grid)", method, chosen[method])
        log.info("tune: %s -> %s (score %.3f; grid of %d)", method, chosen[method], entries[best]["score"],
                 len(entries))
    untuned = [m for m in cfg.unlearn.methods if m not in grid and METHODS[m].Hyperparameters.__dataclass_fields__]
    stored = json.loads(forget_sets_path(ctx.run_dir).read_text())["tuning"]
    write_text(tune_path(ctx.run_dir), json.dumps({
        "config": tune_config(cfg, sets), "criterion": CRITERION, "k": k,
        "sets": {n: {"size": s["size"], "how": s["how"]} for n, s in stored.items()},
        "grid": cfg.tune.grid, "candidates": json_safe(results), "chosen": chosen, "untuned": untuned}, indent=1))
