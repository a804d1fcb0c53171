"""Evaluating a run: the numbers of the report, computed from the stores. Reads forget_sets.json, models.zarr,
unlearned/<fs>/<method>.zarr and the attrs of datamodels/<method>.zarr (LDS); writes nothing. `evaluate_run`
returns the metrics dict (KLOM, accuracies, MIA and cost of every unlearning method on every forget set, the
oracle floor, retraining, LDS; report.markdown writes it as metrics.json and renders it) and the per-point
KLOM on the forget points (for the plots).

KLOM compares K unlearned models with the first K oracles of a forget set, the reference (docs/methods.md §4); the
next om_oracles oracles are Oracle Matching's targets and are never used here, so OM is not scored against the
models it matched. The oracle floor is the K floor oracles that follow (pipelines.rundir.layout.oracle_rows) scored against
the reference like a method, K vs K; a run without them falls back to two disjoint halves of the reference, K/2
vs K/2, which reads higher from sampling noise alone (docs/methods.md §8).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed

from attribution.store import StoreError, as_path, location, open_store, read
from pipelines.config import UnlearnConfig
from pipelines.rundir.reuse import store_path, stores_in
from pipelines.rundir.layout import (
    om_rows,
    om_targets,
    point_sets,
    read_datamodel_rows,
    stored_oracle_rows,
    validation_points,
)
from pipelines.rundir.variants import DATAMODEL_METHODS, STOPPED_BY, curve_models, parse_store_name
from unlearning.base import FORWARD_PASS
from unlearning.klom import floor_halves, klom, klom_intervals, klom_summary, margins, shift_and_spread
from unlearning.metrics import MIA_FOLDS, accuracy, cost_fraction, lira_mia, per_example_loss, population_mia

# Display order of methods: the config's default order; methods it does not know follow, alphabetically.
METHOD_ORDER = UnlearnConfig().methods
# processes for the population MIA's attacks (joblib; -1: every core)
MIA_JOBS = -1
# KLOM is summarised over these point sets; validation = the test targets outside the tune stage's half
# (docs/methods.md §4).
POINT_SETS = ("forget", "retain", "validation")
# half-sample replicates (over models, unlearning.klom.klom_intervals) of every KLOM interval, and their level
N_SUBSAMPLES = 200
INTERVAL_LEVEL = 0.95
# the direction that is not the default (unlearning.klom.DIRECTIONS), reported beside it with its own floor
OTHER_DIRECTION = "unlearned||oracle"


def evaluate_run(run_dir: str | Path, labels: np.ndarray, *, seed: int = 0,
                 linear: dict | None = None) -> tuple[dict, dict]:
    """(metrics, per_point) of every finished unlearned store of the run against its oracles.

    run_dir, labels, seed, linear: as pipelines.report.build_report. metrics: the report's numbers, not yet made
    JSON-safe (json_safe; NaN stays NaN for the plots); what could not be scored is listed in metrics["skipped"].
    per_point: {forget set: {method or "oracle floor": per-point KLOM on its forget points}}.
    """
    run_dir = as_path(run_dir)
    models = open_store(store_path(run_dir, "models.zarr"), "models")  # a reused run's where linked
    info = run_info(models)
    if models.attrs.get("margin_only", False):  # imported margins (dmu import edub): no labels needed
        return evaluate_margins(run_dir, models, info, seed)
    labels = check_labels(labels, info)
    skipped: list[str] = []
    forget_sets, per_point = {}, {}
    # the full models' margins, read once: every forget set's membership test fits its "in" distribution on them
    full_margins = margins(read(models["full/logits"], slice(0, info["k"]), store=store_path(run_dir, "models.zarr")),
                           labels)
    # the report's validation points: the test targets outside the tune stage's half (rundir.layout)
    info["validation"] = validation_points(run_dir, "reporting", info["n"], info["t"])
    for fs, entry in _load_forget_sets(run_dir).items():
        result = _evaluate_forget_set(run_dir, models, fs, entry, labels, info, seed, skipped, full_margins)
        if result is not None:
            forget_sets[fs], per_point[fs] = result
    metrics = {"run": run_dir.name, "k": info["k"], "n_train": info["n"], "n_targets": info["t"],
               "num_classes": info["c"], "epochs": info["epochs"], "seed": seed,
               "validation_points": {"reporting": len(info["validation"]), "test_targets": info["t"] - info["n"]},
               "forget_sets": forget_sets,
               "datamodels": _lds(run_dir, skipped), "datamodels_cost": _datamodels_cost(run_dir, info),
               "tuning": _tuning(run_dir), "draws": draws_summary(forget_sets), "skipped": skipped}
    metrics["datamodel_curve"] = datamodel_curve(forget_sets, metrics["datamodels"])
    if linear is not None:
        metrics["linear"] = _linear_summary(linear)
    return metrics, per_point


# ----------------------------------------------------------------------------------------------------------
# reading the stores


def run_info(models) -> dict:
    attrs = models.attrs
    missing = [key for key in ("k", "n_train", "n_targets", "num_classes", "epochs") if key not in attrs]
    if missing:
        raise StoreError(f"models.zarr lacks attrs {missing}: it was not written by the models stage; "
                         "rerun that stage")
    n, t = int(attrs["n_train"]), int(attrs["n_targets"])
    test = attrs.get("targets", {}).get("test", [n, t])
    return {"k": int(attrs["k"]), "oracle_rows": stored_oracle_rows(models), "n": n, "t": t,
            "c": int(attrs["num_classes"]), "epochs": float(attrs["epochs"]),
            "test": (int(test[0]), int(test[1]))}


def check_labels(labels, info: dict) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (info["t"],):
        raise ValueError(f"labels must hold one label per target, shape ({info['t']},) (training examples, "
                         f"then test), got shape {y.shape}: pass the task's target labels")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= info["c"]):
        raise ValueError(f"labels must lie in [0, {info['c']}), got range [{y.min()}, {y.max()}]")
    return y


def _load_forget_sets(run_dir: Path) -> dict[str, dict]:
    path = store_path(run_dir, "forget_sets.json")
    if not path.exists():
        raise StoreError(f"no forget sets at {path}: run the forget_sets stage first (dmu run CONFIG)")
    return json.loads(path.read_text())["sets"]


def method_order(names) -> list[str]:
    known = [m for m in METHOD_ORDER if m in names]
    return known + sorted(set(names) - set(known))


def _method_stores(run_dir: Path, folder: str) -> dict[str, Path]:
    """The unlearned stores of `folder` (unlearned/<fs>), the run's own and those it reuses (pipelines.rundir.reuse),
    by store name (a variant's `store_name`: dm_matching, dm_matching__trak__x3), in method order, then
    datamodel and budget; names starting with "_" are not methods (_retrain_timing.zarr)."""
    found = {p.name[: -len(".zarr")]: p for p in stores_in(run_dir, folder).values() if not p.name.startswith("_")}
    parsed = {name: parse_store_name(name) for name in found}
    methods = method_order({method for method, _, _ in parsed.values()})
    order = sorted(found, key=lambda n: (methods.index(parsed[n][0]), parsed[n][1], parsed[n][2]))
    return {n: found[n] for n in order}


def _tuning(run_dir: Path) -> dict | None:
    """What the tune stage chose and on what (tune.json without its per-set details), or None."""
    path = store_path(run_dir, "tune.json")
    if not path.exists():
        return None
    tune = json.loads(path.read_text())
    keys = ("criterion", "k", "sets", "validation_points", "grid", "widened", "chosen", "untuned")
    return {key: tune.get(key) for key in keys} | {
        "scores": {m: [{"hparams": e["hparams"], "score": e["score"]} for e in entries]
                   for m, entries in tune.get("candidates", {}).items()},
        "at_grid_edge": grid_edges(tune.get("grid", {}), tune.get("chosen", {}))}


def grid_edges(grid: dict, chosen: dict) -> dict[str, dict[str, str]]:
    """method -> {hyperparameter: "lowest" | "highest"} where the choice is an end of a grid of 2 or more values
    (a better value may lie beyond what was tried)."""
    out: dict[str, dict[str, str]] = {}
    for method, axes in grid.items():
        for key, values in axes.items():
            value = chosen.get(method, {}).get(key)
            try:
                ends = (min(values), max(values))
            except TypeError:  # values with no order (e.g. strings and numbers mixed): no ends
                continue
            if len(values) > 1 and value in ends:
                out.setdefault(method, {})[key] = "lowest" if value == min(values) else "highest"
    return out


def _datamodels_cost(run_dir: Path, info: dict) -> dict | None:
    """The datamodels' one-off cost in example passes: M subset models x epochs x round(alpha N) examples per
    epoch (the subsets stage's epoch size), and amortised over 1, 10 and 100 deletion requests as a fraction of
    retraining on all N (epochs x N). The fit itself costs no example passes (its seconds are not recorded)."""
    path = store_path(run_dir, "subsets.zarr")
    try:
        subsets = open_store(path, "subsets")
    except StoreError:
        return None
    config = subsets.attrs.get("config", {})
    m, alpha = config.get("subsets", {}).get("n_models"), config.get("subsets", {}).get("alpha")
    if m is None or alpha is None:
        return None
    passes = float(m) * info["epochs"] * round(alpha * info["n"])
    full = info["epochs"] * info["n"]
    return {"n_models": int(m), "example_passes": passes, "retrain_passes": full,
            "fraction_per_request": {str(r): passes / r / full for r in (1, 10, 100)}}


def _lds(run_dir: Path, skipped: list[str]) -> dict:
    """LDS numbers stored as attrs of each datamodel store (lds_mean, lds_margin_mean, lds_curve)."""
    out = {}
    for path in stores_in(run_dir, "datamodels").values():  # the run's own and those it reuses
        try:
            attrs = dict(open_store(path, "datamodels").attrs)
        except StoreError as err:
            skipped.append(f"datamodels/{path.name}: {err}")
            continue
        out[path.name[: -len(".zarr")]] = {k: v for k, v in attrs.items() if k.startswith("lds") or k == "n_fit"}
    return out


# ----------------------------------------------------------------------------------------------------------
# metrics


def _accuracies(logits: np.ndarray, labels: np.ndarray, sets: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean over models of the accuracy on forget, retain and test (validation) points (MU-Mis's FA, RA,
    TA)."""
    names = {"forget": "forget", "retain": "retain", "validation": "test"}
    return {names[s]: float(np.mean(accuracy(logits[:, idx], labels[idx]))) for s, idx in sets.items()}


def _mia(losses: np.ndarray, forget: np.ndarray, test: np.ndarray, seed: int) -> float | None:
    """Population MIA (forget vs test losses, docs/methods.md §6), one attack per model, averaged over models."""
    if min(len(forget), len(test)) < MIA_FOLDS:
        return None  # too few points for 5-fold cross-validation; noted in the report
    # one attack per model, on the driver's cores (scikit-learn's per-fit overhead dominates: 20 ms an attack)
    attacks = Parallel(n_jobs=MIA_JOBS)(delayed(population_mia)(losses[m, forget], losses[m, test], seed + m)
                                        for m in range(losses.shape[0]))
    return float(np.mean(attacks))


def _avg_gap(acc: dict, retrain: dict) -> float:
    """MU-Mis's "Avg. Gap" (docs/methods.md §5): mean of |dFA|, |dRA|, |dTA| to retraining."""
    return float(np.mean([abs(acc[s] - retrain[s]) for s in ("forget", "retain", "test")]))


def _evaluate_forget_set(run_dir, models, fs, entry, labels, info, seed, skipped, full_margins):
    """metrics and per-point KLOM on the forget points for one forget set; None if its oracles are missing."""
    k, n = info["k"], info["n"]
    sets = point_sets(entry["indices"], n, info["validation"])
    forget = sets["forget"]
    if f"oracle/{fs}/done" not in models or not np.asarray(models[f"oracle/{fs}/done"][:k]).all():
        skipped.append(f"forget set {fs}: its first {k} oracles are not all trained (run the models stage)")
        return None
    # Only the first K oracles, the reference: the others are OM's targets and the floor's (module doc).
    models_path = store_path(run_dir, "models.zarr")
    oracle_logits = read(models[f"oracle/{fs}/logits"], slice(0, k), store=models_path)
    oracle_margins = margins(oracle_logits, labels)
    retrain = _retrain(run_dir, models, fs, oracle_logits, labels, sets, info, seed)
    per_point, floor, floor_margins = {}, None, None
    found = _oracle_floor(models, fs, info["oracle_rows"], labels, oracle_margins, sets, seed, skipped)
    if found is not None:
        floor_values, kind, per_side, floor_margins, reverse_values, intervals = found
        floor = {"klom": klom_summary(floor_values, sets), "klom_reverse": klom_summary(reverse_values, sets),
                 "klom_interval": intervals, "kind": kind, "n_models_per_side": per_side}
        per_point["oracle floor"] = floor_values[forget]
        floor_margins = floor_margins[:, forget] if floor_margins is not None else None
    # the oracles one deletion request costs Oracle Matching per model: its own, or all of those it averages
    om = info["oracle_rows"]["om"]
    om_oracles = 1 if om_rows(models)[1] == "own" else om.stop - om.start

    methods = {}
    for name, path in _method_stores(run_dir, f"unlearned/{fs}").items():
        try:
            store = open_store(path, "unlearned")
        except StoreError as err:
            skipped.append(f"{fs}/{name}: {err}")
            continue
        label = store.attrs.get("label", name)
        done = np.asarray(store["done"][:]) if "done" in store else np.zeros(0, bool)
        if done.size == 0 or not done.all():
            skipped.append(f"{fs}/{label}: {int(done.sum())} of {done.size} models done "
                           "(rerun the unlearn stage to finish it)")
            continue
        logits = read(store["logits"], store=path)
        if logits.shape != (k, info["t"], info["c"]):
            skipped.append(f"{fs}/{label}: logits have shape {logits.shape}, expected (K, T, C) = "
                           f"{(k, info['t'], info['c'])}")
            continue
        method = store.attrs.get("method", name)
        # A model whose unlearning diverged (non-finite logits: gradient ascent past its budget) has no margins:
        # the variant is scored over the others and the report names how many diverged.
        finite = finite_models(logits)
        if not finite.any():
            skipped.append(f"{fs}/{label}: all {len(finite)} models diverged (non-finite logits): nothing to score")
            continue
        logits = logits[finite]
        method_margins = margins(logits, labels)
        values = klom(method_margins, oracle_margins)
        per_point[label] = values[forget]
        intervals = _intervals(method_margins, oracle_margins, sets, seed)
        acc = _accuracies(logits, labels, sets)
        methods[label] = {
            "method": method, "datamodel": store.attrs.get("datamodel"), "budget": store.attrs.get("budget", 1.0),
            "hparams": store.attrs.get("hparams"),
            "klom": klom_summary(values, sets),
            "klom_interval": intervals,
            # the other direction, KL(unlearned || oracle), which rewards under-dispersed models (unlearning.klom)
            "klom_reverse": klom_summary(klom(method_margins, oracle_margins, direction=OTHER_DIRECTION), sets),
            # the Easy Data Unlearning Bench's convention (unlearning.klom), to set beside its published numbers
            "klom_edub": klom_summary(klom(method_margins, oracle_margins, convention="edub"), sets),
            "margins": _shift_and_spread(method_margins, oracle_margins, sets),
            "accuracy": acc,
            "avg_gap": _avg_gap(acc, retrain["accuracy"]),
            "mia": _mia(per_example_loss(logits, labels), forget, sets["validation"], seed),
            "lira": _lira(method_margins[:, forget], floor_margins, full_margins[:, forget],
                          oracle_margins[:, forget]),
            "cost": _cost(store, method, om_oracles, retrain, n),
            "diagnostics": _diagnostics(store, method, diverged=int((~finite).sum())),
        }
        if method in MATCHING_METHODS:
            residuals = _matching_residuals(run_dir, models, fs, store.attrs.get("datamodel"), method, logits,
                                            finite, sets, labels)
            if residuals is not None:
                methods[label]["diagnostics"]["residuals"] = residuals
    if not methods:
        skipped.append(f"forget set {fs}: no finished unlearned stores")
    return ({"size": int(entry.get("size", len(forget))), "how": entry.get("how", ""), "methods": methods,
             "oracle_floor": floor, "retrain": retrain}, per_point)


# ----------------------------------------------------------------------------------------------------------
# margin-only models stores (dmu import edub)

# what a margin-only run cannot report: accuracies, MIAs and costs need logits, losses or training times
MARGINS_ONLY = "n/a (margins only)"


def evaluate_margins(run_dir, models, info: dict, seed: int) -> tuple[dict, dict]:
    """`evaluate_run` on a margin-only models.zarr (full models' and oracles' margins, pipelines.interchange.edub):
    per forget set, doing nothing (the full models' margins; on the forget points the bench's own pretrain
    forget margins where imported, `full_forget/<fs>`) and every finished unlearned store that holds margins
    (DM-Direct on margins), against every imported oracle; KLOM in dmu's and in the bench's convention, both
    directions; the oracle floor from two halves of the oracles. Accuracies, MIA and cost: MARGINS_ONLY."""
    path = store_path(run_dir, "models.zarr")
    k, n = info["k"], info["n"]
    info["validation"] = validation_points(run_dir, "reporting", n, info["t"])
    full = read(models["full/margins"], slice(0, k), store=path)
    skipped: list[str] = []
    forget_sets, per_point = {}, {}
    for fs, entry in _load_forget_sets(run_dir).items():
        indices = np.asarray(entry["indices"], dtype=np.int64)
        sets = point_sets(indices, n, info["validation"])
        done = np.asarray(models[f"oracle/{fs}/done"][:]) if f"oracle/{fs}/done" in models else np.zeros(0, bool)
        if done.size < 2 or not done.all():
            skipped.append(f"forget set {fs}: its oracles' margins are not all imported (rerun dmu import edub)")
            continue
        oracle = read(models[f"oracle/{fs}/margins"], store=path)
        unchanged = full.copy()
        if f"full_forget/{fs}/margins" in models:  # the bench's own margins of the full models on F
            unchanged[:, indices] = read(models[f"full_forget/{fs}/margins"], slice(0, k), store=path)
        scored = {"do_nothing": ("do_nothing", unchanged)}
        for name, store_at in _method_stores(run_dir, f"unlearned/{fs}").items():
            store = open_store(store_at, "unlearned")
            label, method = store.attrs.get("label", name), store.attrs.get("method", name)
            if method == "do_nothing":
                continue  # scored above, from models.zarr
            if "margins" not in store or not np.asarray(store["done"][:]).all():
                skipped.append(f"{fs}/{label}: no finished margins (a margin-only run scores margins only)")
                continue
            scored[label] = (method, read(store["margins"], store=store_at))
        methods = {}
        for label, (method, unlearned) in scored.items():
            values = klom(unlearned, oracle)
            per_point.setdefault(fs, {})[label] = values[sets["forget"]]
            methods[label] = {"method": method, **margin_scores(unlearned, oracle, sets, values)}
        halves = floor_halves(oracle, seed)
        floor_values = klom(*halves)
        per_point[fs]["oracle floor"] = floor_values[sets["forget"]]
        floor = {"klom": klom_summary(floor_values, sets),
                 "klom_reverse": klom_summary(klom(*halves, direction=OTHER_DIRECTION), sets),
                 "klom_interval": None, "kind": "half_split", "n_models_per_side": len(halves[0])}
        forget_sets[fs] = {"size": int(indices.size), "how": entry.get("how", ""), "methods": methods,
                           "oracle_floor": floor, "n_oracles": int(oracle.shape[0]),
                           "retrain": {"accuracy": None, "mia": None, "cost": None}}
    metrics = {"run": run_dir.name, "margin_only": True, "imported": models.attrs.get("imported"), "k": k,
               "n_train": n, "n_targets": info["t"], "num_classes": info["c"], "epochs": info["epochs"],
               "seed": seed, "validation_points": {"reporting": len(info["validation"]),
                                                   "test_targets": info["t"] - n},
               "forget_sets": forget_sets, "datamodels": _lds(run_dir, skipped), "skipped": skipped}
    return metrics, per_point


def margin_scores(unlearned: np.ndarray, oracle: np.ndarray, sets: dict, values: np.ndarray) -> dict:
    """KLOM of margins (K, T) against the oracles' (K_o, T), summarised per point set: dmu's convention (`values`,
    KL(oracle || unlearned)) and its other direction, and the Easy Data Unlearning Bench's binning
    (unlearning.klom, convention "edub") in both directions: "klom_edub" KL(oracle || unlearned), the direction
    of RoyRin/data-unlearning-bench's run.py; "klom_edub_reverse" KL(unlearned || oracle), the direction of
    EasyDUB's klom_from_margins (easydub/eval.py), whose P95s its README prints."""
    return {"klom": klom_summary(values, sets),
            "klom_reverse": klom_summary(klom(unlearned, oracle, direction=OTHER_DIRECTION), sets),
            "klom_edub": klom_summary(klom(unlearned, oracle, convention="edub"), sets),
            "klom_edub_reverse": klom_summary(klom(unlearned, oracle, convention="edub",
                                                   direction=OTHER_DIRECTION), sets),
            "margins": _shift_and_spread(unlearned, oracle, sets),
            "accuracy": MARGINS_ONLY, "mia": MARGINS_ONLY, "lira": MARGINS_ONLY, "cost": MARGINS_ONLY}


def p99_average(kl: dict) -> float:
    """The headline: the average of the KLOM p99s over forget, retain and validation points (A2D Figure 2)."""
    return float(np.mean([kl[s]["p99"] for s in POINT_SETS]))


def headline_interval(entry: dict | None) -> list[float] | None:
    """The interval of the headline (the p99 average) of a method's or the floor's metrics, None without one."""
    return ((entry.get("klom_interval") or {}).get("p99_avg") or {}).get("p99") if entry else None


def datamodel_curve(forget_sets: dict, datamodels: dict) -> dict:
    """Unlearning quality against datamodel quality (unlearn.datamodel_curve): per forget set, each datamodel
    method's headline with its interval against the number of subset models its LASSO datamodels were fit on
    (the curve stores lasso_n<n>, and the run's own LASSO store at its n_fit models), and the oracle floor's
    headline; {} for a run without curve stores."""
    n_full = (datamodels.get("lasso") or {}).get("n_fit")
    out = {}
    for fs, entry in forget_sets.items():
        lines: dict[str, list[dict]] = {}
        for m in entry["methods"].values():
            n = curve_models(m["datamodel"]) or (n_full if m["datamodel"] == "lasso" else None)
            if m["method"] in DATAMODEL_METHODS and m["budget"] == 1 and n is not None:
                lines.setdefault(m["method"], []).append(
                    {"n_models": int(n), "p99_avg": p99_average(m["klom"]), "interval": headline_interval(m),
                     "curve_store": curve_models(m["datamodel"]) is not None})
        lines = {method: sorted(points, key=lambda p: p["n_models"]) for method, points in lines.items()
                 if any(p["curve_store"] for p in points)}
        if lines:
            floor = entry["oracle_floor"]
            out[fs] = {"methods": lines, "oracle_floor": p99_average(floor["klom"]) if floor else None}
    return out


def draws_summary(forget_sets: dict) -> dict:
    """Per random forget-set size drawn more than once (forget_sets.draws: random_<size>, random_<size>_d<j>):
    each method's and the oracle floor's headline per draw, with their mean and standard deviation over the
    draws, the spread that comes from which points were drawn."""
    groups: dict[str, list[str]] = {}
    for name in forget_sets:
        match = re.fullmatch(r"(random_\d+)(?:_d\d+)?", name)
        if match:
            groups.setdefault(match.group(1), []).append(name)
    out = {}
    for kind, names in groups.items():
        if len(names) < 2:
            continue
        rows: dict[str, dict[str, float]] = {}
        for name in names:
            entry = forget_sets[name]
            for label, m in entry["methods"].items():
                rows.setdefault(label, {})[name] = p99_average(m["klom"])
            if entry["oracle_floor"] is not None:
                rows.setdefault("oracle floor", {})[name] = p99_average(entry["oracle_floor"]["klom"])
        out[kind] = {"draws": names, "rows": {
            label: {"values": values, "mean": float(np.mean(list(values.values()))),
                    "sd": float(np.std(list(values.values()), ddof=1)) if len(values) > 1 else None}
            for label, values in rows.items()}}
    return out


def finite_models(logits: np.ndarray) -> np.ndarray:
    """(K,) bool: the models whose logits (K, T, C) are all finite. A model whose unlearning diverged
    (gradient ascent past its budget) has no margins: a variant is scored over the others."""
    return np.isfinite(logits).reshape(len(logits), -1).all(1)


def _retrain(run_dir, models, fs, oracle_logits, labels, sets, info, seed) -> dict:
    """Retraining's row: the reference oracles' accuracies and MIA, and its cost: epochs x |retain| example
    passes; seconds per model retrained as the fine-tuning methods ran (the unlearn stage's _retrain_timing.zarr,
    in packs of the same size: the methods' basis), else the oracles' packed training time per model (noted as
    the basis)."""
    passes = info["epochs"] * len(sets["retain"])  # the models stage trains epochs x |retain| passes
    seconds, basis = None, "one model alone (unlearn stage)"
    timing = store_path(run_dir, f"unlearned/{fs}/_retrain_timing.zarr")
    try:
        g = open_store(timing, "retrain_timing")
        if bool(g["done"][0]):
            seconds = float(g["seconds"][0])
            pack = int(g.attrs.get("pack", 1))
            basis = (f"packs of {pack} models, as the fine-tuning methods ran (unlearn stage)" if pack > 1
                     else basis)
    except StoreError:
        pass
    if seconds is None:
        seconds, basis = float(np.mean(models[f"oracle/{fs}/seconds"][:info["k"]])), "packed oracles, per model"
    return {"accuracy": _accuracies(oracle_logits, labels, sets), "avg_gap": 0.0,
            "mia": _mia(per_example_loss(oracle_logits, labels), sets["forget"], sets["validation"], seed),
            "cost": {"passes_fraction": 1.0, "seconds_fraction": 1.0, "seconds": seconds, "example_passes": passes,
                     "seconds_basis": basis}}


def _cost(store, method: str, om_oracles: int, retrain: dict, n: int) -> dict:
    """One deletion request's cost, everything counted: the method's passes and seconds as stored (the datamodel
    methods' include the original model's forward passes on the targets), plus, for Oracle Matching, training its
    om_oracles oracles (each costs a retraining: epochs x |retain| passes and the retraining seconds) and their
    forward passes on the N training points it matches (one oracle per model with models.om_target "own").
    Fractions of retraining (method_passes_fraction: the fine-tuning alone, the paper's thought experiment); the
    datamodels' one-off cost is apart (metrics["datamodels_cost"])."""
    seconds = float(np.mean(store["seconds"][:]))
    passes = float(np.mean(store["example_passes"][:]))
    extra_passes = extra_seconds = 0.0
    if method == "oracle_matching":
        extra_passes = om_oracles * (retrain["cost"]["example_passes"] + FORWARD_PASS * n)
        extra_seconds = om_oracles * retrain["cost"]["seconds"]
    total_passes, total_seconds = passes + extra_passes, seconds + extra_seconds
    r_seconds = retrain["cost"]["seconds"]
    return {"passes_fraction": float(cost_fraction(total_passes, retrain["cost"]["example_passes"])),
            "seconds_fraction": total_seconds / r_seconds if r_seconds > 0 else None,
            "seconds": total_seconds, "example_passes": total_passes,
            "method_seconds": seconds, "method_passes": passes, "oracle_passes": extra_passes,
            "method_passes_fraction": float(cost_fraction(passes, retrain["cost"]["example_passes"])),
            "oracle_seconds": extra_seconds}


def _diagnostics(store, method: str, diverged: int = 0) -> dict:
    """What each method reports about its own run: MU-Mis's steps and why it stopped (counts over the models),
    OM's and DMM's final matching loss (mean over the models that did not diverge), and for any method the
    number of models whose unlearning diverged (non-finite logits; left out of every score). Empty for the
    others and for older stores."""
    out: dict = {"diverged": diverged} if diverged else {}
    if "stopped_by" in store and method in ("mu_mis", "mu_mis_gap"):
        codes = np.asarray(store["stopped_by"][:])
        out["stopped_by"] = {name: int((codes == i).sum()) for i, name in enumerate(STOPPED_BY)}
        steps = np.asarray(store["steps"][:])
        out["steps"] = {"mean": float(steps.mean()), "min": float(steps.min()), "max": float(steps.max())}
    if "final_loss" in store and method in ("oracle_matching", "dm_matching"):
        out["final_matching_loss"] = float(np.nanmean(store["final_loss"][:]))
    return out


MATCHING_METHODS = ("oracle_matching", "dm_matching")


def _matching_residuals(run_dir, models, fs, datamodel, method, logits, finite, sets, labels) -> dict | None:
    """How close OM's and DMM's models came to their own targets, per model (the ones that did not diverge):
    the mean squared difference of the logits to the target logits on the forget and on the retain points, and
    on the forget points the margins' progress from the full model (0) to the target (1),
    Σ (m − m₀)(m* − m₀) / Σ (m* − m₀)². Targets: OM's, each model's own oracle's logits (or the oracles' mean);
    DMM's, DM-Direct's predictions, the full model's logits minus the forget rows' datamodel weights summed.
    None where the targets cannot be read (no oracles, no datamodel store)."""
    n, k = len(sets["forget"]) + len(sets["retain"]), len(finite)
    models_path = store_path(run_dir, "models.zarr")
    full = read(models["full/logits"], slice(0, k), store=models_path)[finite, :n].astype(np.float64)
    if method == "oracle_matching":
        target = om_targets(models, fs, slice(0, k), n, store=models_path)
        if target is None:
            return None
        target = np.asarray(target, np.float64)[finite]
    else:
        try:
            path = store_path(run_dir, f"datamodels/{datamodel}.zarr")
            rows = read_datamodel_rows(location(path), sets["forget"])[:, :n]
        except (StoreError, KeyError, FileNotFoundError):
            return None
        target = full - rows.astype(np.float64).sum(0)
    z = logits[:, :n].astype(np.float64)
    out = {f"{name}_mse": ((z[:, idx] - target[:, idx]) ** 2).mean(axis=(1, 2)).tolist()
           for name, idx in (("forget", sets["forget"]), ("retain", sets["retain"]))}
    forget = sets["forget"]
    m, m0, mt = (margins(a[:, forget], labels[forget]) for a in (z, full, target))
    out["forget_margin_progress"] = ((m - m0) * (mt - m0)).sum(1) / np.maximum(((mt - m0) ** 2).sum(1), 1e-12)
    out["forget_margin_progress"] = out["forget_margin_progress"].tolist()
    return out


def _lira(method_forget, floor_forget, full_forget, oracle_forget) -> dict | None:
    """The per-example membership test (unlearning.metrics.lira_mia) on the forget points: the method's models
    against the floor oracles, fresh retrained models that fit neither distribution (in: the full models, out:
    the reference oracles); None without floor oracles."""
    if floor_forget is None:
        return None
    return lira_mia(method_forget, floor_forget, full_forget, oracle_forget)


def _shift_and_spread(method_margins, oracle_margins, sets) -> dict:
    """Per point set: the mean over its points of the mean-margin shift, and the median spread ratio
    (unlearning.klom.shift_and_spread)."""
    shift, spread = shift_and_spread(method_margins, oracle_margins)
    out = {}
    for name, idx in sets.items():
        finite = spread[idx][np.isfinite(spread[idx])]
        out[name] = {"mean_shift": float(shift[idx].mean()),
                     "spread": float(np.median(finite)) if finite.size else None}
    return out


def _oracle_floor(models, fs, rows, labels, oracle_margins, sets, seed, skipped):
    """(per-point KLOM, kind, models per side, the floor oracles' margins or None, per-point KLOM in the other
    direction, half-sample intervals) of the oracle floor of one forget set, or None (K < 2, no floor oracles).
    kind "floor_oracles": the K floor oracles scored against the K reference oracles as a method is, K vs K;
    "half_split" (floor oracles off or unfinished): two disjoint halves of the reference, K/2 vs K/2."""
    k = oracle_margins.shape[0]
    if rows["floor"].stop > rows["floor"].start:
        if np.asarray(models[f"oracle/{fs}/done"][rows["floor"]]).all():
            floor_margins = margins(read(models[f"oracle/{fs}/logits"], rows["floor"]), labels)
            return (klom(floor_margins, oracle_margins), "floor_oracles", k, floor_margins,
                    klom(floor_margins, oracle_margins, direction=OTHER_DIRECTION),
                    _intervals(floor_margins, oracle_margins, sets, seed))
        skipped.append(f"forget set {fs}: its floor oracles are not all trained (run the models stage); its "
                       f"oracle floor splits the reference oracles instead ({k // 2} vs {k // 2})")
    if k < 2:
        return None
    halves = floor_halves(oracle_margins, seed)
    return (klom(*halves), "half_split", k // 2, None, klom(*halves, direction=OTHER_DIRECTION),
            _intervals(*halves, sets, seed))


def _intervals(method_margins, oracle_margins, sets, seed) -> dict | None:
    """KLOM's intervals over models (unlearning.klom.klom_intervals); None with fewer than 2 models a side, where
    a half-sample has none."""
    if min(len(method_margins), len(oracle_margins)) < 2:
        return None
    return klom_intervals(method_margins, oracle_margins, sets, n_rep=N_SUBSAMPLES, level=INTERVAL_LEVEL,
                          seed=seed)



def floor_label(floor: dict) -> str:
    n = floor["n_models_per_side"]
    return f"oracle floor ({n} vs {n})"


def _linear_summary(linear: dict) -> dict:
    """The linear experiment without its curves: settings and iterations to tolerance per method and seed."""
    return {"settings": linear.get("settings"), "seeds": linear.get("seeds"),
            "tolerance": linear.get("tolerance"),
            "methods": {name: {"label": e["label"], "iters_to_tol": e["iters_to_tol"],
                               "min_relative": e["min_relative"]} for name, e in linear["methods"].items()}}


def json_safe(x):
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x

