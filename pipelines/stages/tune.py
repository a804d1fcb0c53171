"""Stage `tune`: each method's hyperparameters chosen by KLOM on the tune stage's own forget sets, full models,
oracles and validation points, never on anything the report evaluates.

Reads forget_sets.json's tuning sets (drawn by the forget_sets stage from their own seed stream, disjoint from
every evaluated set: `forget_sets.tuning_sets`) and its tuning half of the test targets (`validation_points`),
models.zarr's `tuning_full` (tune.k full models of their own seed stream, never evaluated) and each tuning set's
own oracles (`tuning/<set>`), and the datamodel stores; writes runs/<name>/tune/<set>/<variant>__g<i>.zarr (the
unlearned logits of grid point i, the unlearn stage's units and layout) and runs/<name>/tune.json: the sets, the
grids, every grid point's score, what widening added, and the choice. The unlearn stage runs every method with
the chosen values. A datamodel method is tuned on each datamodel store it runs on (`Variant.tuning_key`).

Criterion (the same for every method): KLOM of the tune.k unlearned models against the tuning set's tune.k
reference oracles, the mean of its p95 over forget, retain and validation (tuning half) points, averaged over the
tuning sets; the smallest wins (ties: the first grid point). Where the choice is an end of a numeric axis of two or
more values, the axis grows by one step beyond that end (the ratio of the last two values; integers by their
difference) and the grid is scored again, at most tune.widen times; tune.json lists what was added and which
choices still sit at an end.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np

from attribution.store import StoreError, read, write_text
from pipelines.report.evaluate import grid_edges, json_safe
from pipelines.rundir.layout import (
    forget_sets_path,
    load_forget_sets,
    open_models,
    point_sets,
    tune_config,
    tune_path,
    validation_points,
)
from pipelines.rundir.reuse import store_path
from pipelines.rundir.variants import Variant, candidates, grid_axes
from pipelines.stages.context import RunContext
from pipelines.stages.unlearn import run_variants, unlearned_config
from unlearning import METHODS
from unlearning.klom import klom, klom_summary, margins

log = logging.getLogger("dmu")

CRITERION = ("mean over the tuning sets of the mean of KLOM p95 on forget, retain and validation points "
             "(the tune stage's own tune.k full models unlearned, against the set's tune.k reference oracles; "
             "validation: the tuning half of the test targets)")
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


# Hyperparameters whose meaningful values lie above a bound other than 0: MU-Mis's stop threshold δ (it stops
# once s_t / s_0 > δ, which holds at the first check for any δ <= 1: one step, whatever δ).
LOWER_BOUNDS = {"delta": 1.0}


def beyond(values: list, chosen, name: str = "") -> int | float | None:
    """One step past the end of a numeric axis that `chosen` sits at: the ratio of the two end values for
    positive floats, their difference for integers (kept >= 1); None where `chosen` is inside the axis, the
    axis has fewer than two values or is not numeric, or the step would leave the positive numbers (for the
    hyperparameter `name` in LOWER_BOUNDS: the numbers above its bound)."""
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values) or len(set(values)) < 2:
        return None
    ordered = sorted(set(values))
    if chosen == ordered[-1]:
        inner, end = ordered[-2], ordered[-1]
    elif chosen == ordered[0]:
        inner, end = ordered[1], ordered[0]
    else:
        return None
    if all(isinstance(v, int) for v in values):
        new = end + (end - inner)
        return new if new >= 1 else None
    if inner <= 0 or end <= 0:
        return None
    new = float(f"{end * end / inner:.3g}")  # a geometric step, to 3 significant digits
    return new if new > LOWER_BOUNDS.get(name, 0.0) else None


def score_grid(ctx: RunContext, sets: dict[str, np.ndarray], grid: dict[str, list[Variant]], k: int,
               validation: np.ndarray) -> dict[str, list[dict]]:
    """Unlearn every grid point's tune.k tuning models for every tuning set (resuming the points already run)
    and score them: per tuning key, per grid point, {"hparams", "per_set": {set: {"score", "p95"}}, "score"}."""
    cfg, data = ctx.cfg, ctx.data
    stores = run_variants(ctx, sets, [v for vs in grid.values() for v in vs], root=ctx.run_dir / "tune", k=k,
                          full="tuning_full", ensemble="tuning", desc="tuning",
                          config=lambda fs, idx, v: {**unlearned_config(cfg, fs, idx, v), "k": k,
                                                     "full_models": "tuning_full"})
    models = open_models(ctx.run_dir)
    models_path = store_path(ctx.run_dir, "models.zarr")
    labels = data.y_targets.numpy()
    results = {key: [{"hparams": v.hparams, "grid_point": v.grid_point, "per_set": {}} for v in vs]
               for key, vs in grid.items()}
    for fs, idx in sets.items():
        if not np.asarray(models[f"tuning/{fs}/done"][:k]).all():
            raise StoreError(f"models.zarr has the oracles of tuning set {fs!r} not done: run the models stage")
        oracle_margins = margins(read(models[f"tuning/{fs}/logits"], slice(0, k), store=models_path), labels)
        sets_of_points = point_sets(idx, data.n_train, validation)
        for key, vs in grid.items():
            for v, entry in zip(vs, results[key]):
                logits = read(stores[(fs, v.label)]["logits"], store=ctx.run_dir / "tune" / fs / v.store_name)
                value, per_set = score(logits, oracle_margins, labels, sets_of_points)
                entry["per_set"][fs] = {"score": value, "p95": per_set}
    for entries in results.values():
        for entry in entries:
            entry["score"] = float(np.mean([s["score"] for s in entry["per_set"].values()]))
    return results


def best(entries: list[dict]) -> dict:
    """The grid point of smallest score; ties: the lowest grid point number (the first of the configured grid)."""
    return min(entries, key=lambda e: (e["score"], e["grid_point"]))


def run(ctx: RunContext) -> None:
    cfg, data = ctx.cfg, ctx.data
    if not cfg.tune.grid:
        log.info("tune: the config has no tune.grid; methods run with unlearn.hparams")
        return
    sets = load_forget_sets(ctx.run_dir, "tuning")
    if not sets:
        raise StoreError("forget_sets.json has no tuning sets: run the forget_sets stage with this config")
    validation = validation_points(ctx.run_dir, "tuning", data.n_train, data.n_targets)
    if not len(validation):
        raise StoreError("forget_sets.json has no tuning half of the test targets: rebuild the forget sets in a "
                         "new run directory (--run-dir) with this config")
    k = cfg.tune.k
    axes = grid_axes(cfg)
    numbering: dict[str, dict[str, int]] = {}
    widened: dict[str, list[dict]] = {}
    for round_ in range(cfg.tune.widen + 1):
        results = score_grid(ctx, sets, candidates(cfg, axes, numbering), k, validation)
        chosen = {key: best(entries)["hparams"] for key, entries in results.items()}
        grown = False
        if round_ < cfg.tune.widen:
            for key, (method, _, grid) in axes.items():
                for name, values in grid.items():
                    new = beyond(values, chosen[key][name], name)
                    if new is not None and new not in values:
                        values.append(new)
                        widened.setdefault(key, []).append({"hyperparameter": name, "value": new,
                                                            "round": round_ + 1})
                        log.info("tune: %s's %s = %s is an end of its grid: trying %s", key, name,
                                 chosen[key][name], new)
                        grown = True
        if not grown:
            break
    for key, entries in results.items():
        top = best(entries)
        if not math.isfinite(top["score"]):
            log.warning("tune: %s diverged at every grid point (non-finite logits); it runs with %s: give it a "
                        "grid of smaller learning rates (tune.grid)", key, chosen[key])
        log.info("tune: %s -> %s (score %.3f; grid of %d)", key, chosen[key], top["score"], len(entries))
    grids = {key: grid for key, (_, _, grid) in axes.items()}
    untuned = [m for m in cfg.unlearn.methods if m not in cfg.tune.grid
               and METHODS[m].Hyperparameters.__dataclass_fields__]
    stored = json.loads(forget_sets_path(ctx.run_dir).read_text())["tuning"]
    write_text(tune_path(ctx.run_dir), json.dumps({
        "config": tune_config(cfg, sets), "criterion": CRITERION, "k": k,
        "sets": {n: {"size": s["size"], "how": s["how"]} for n, s in stored.items()},
        "validation_points": len(validation), "grid": grids, "widened": widened,
        "at_edge": grid_edges(grids, chosen), "candidates": json_safe(results), "chosen": chosen,
        "untuned": untuned}, indent=1))
