"""The run's report: KLOM, accuracies, MIA and cost of every unlearning method on every forget set, as tables
and plots a person reads. Last step of the data flow: reads forget_sets.json, models.zarr,
unlearned/<fs>/<method>.zarr and datamodels/<method>.zarr (LDS); writes runs/<name>/report/{report.md,
metrics.json, *.png}.

KLOM compares K unlearned models with the first K oracles of a forget set, the reference (reference.md §4); the
next om_oracles oracles are Oracle Matching's targets and are never used here, so OM is not scored against the
models it matched. The oracle floor is the K floor oracles that follow (pipelines/stages/models.py) scored against
the reference like a method, K vs K; a run without them falls back to two disjoint halves of the reference, K/2
vs K/2, which reads higher from sampling noise alone (reference.md §8).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from attribution.store import StoreError, as_path, is_local, make_dirs, open_store, write_text
from pipelines.config import UnlearnConfig
from pipelines.stages.models import stored_oracle_rows
from unlearning.klom import klom, klom_summary, margins, oracle_floor, shift_and_spread
from unlearning.metrics import MIA_FOLDS, accuracy, cost_fraction, per_example_loss, population_mia

# Display order of methods: the config's default order; methods it does not know follow, alphabetically.
METHOD_ORDER = UnlearnConfig().methods
# KLOM is summarised over these point sets; validation = the test targets (reference.md §4).
POINT_SETS = ("forget", "retain", "validation")
# Methods that cost no example passes (do_nothing, dm_direct) sit at this x on the log-scale cost axis.
ZERO_COST_X = 1e-4
# The seed paper's Figure 2 plots the mean over forget / retain / validation of the KLOM p95.
HEADLINE = "p95"


def build_report(run_dir: str | Path, labels: np.ndarray, *, seed: int = 0, linear: dict | None = None) -> dict:
    """Evaluate every finished unlearned store of the run against its oracles, write the report, return the
    metrics (as written to metrics.json).

    run_dir: the run directory (a local path or an object-store URL); labels: (T,) integer labels of all targets
    (training examples, then test); seed: seeds the oracle floor's random halves (when it falls back to them)
    and the MIA's subsampling and folds; linear: the result of pipelines.linear.linear_experiment, plotted and summarised when given.
    Writes run_dir/report/{report.md, metrics.json, klom_vs_cost.png, klom_distributions.png, lds_curve.png
    (when an LDS curve is stored), linear.png (when `linear` is given)}.
    """
    run_dir = as_path(run_dir)
    models = open_store(run_dir / "models.zarr", "models")
    info = _run_info(models)
    labels = _check_labels(labels, info)
    skipped: list[str] = []
    forget_sets, per_point = {}, {}
    for fs, entry in _load_forget_sets(run_dir).items():
        result = _evaluate_forget_set(run_dir, models, fs, entry, labels, info, seed, skipped)
        if result is not None:
            forget_sets[fs], per_point[fs] = result
    metrics = {"run": run_dir.name, "k": info["k"], "n_train": info["n"], "n_targets": info["t"],
               "num_classes": info["c"], "epochs": info["epochs"], "seed": seed, "forget_sets": forget_sets,
               "datamodels": _lds(run_dir, skipped), "skipped": skipped}
    if linear is not None:
        metrics["linear"] = _linear_summary(linear)

    out = make_dirs(run_dir / "report")
    plots = {}
    if forget_sets:
        plot_klom_vs_cost(metrics, out / "klom_vs_cost.png")
        plots["KLOM against cost"] = "klom_vs_cost.png"
    per_point = {fs: values for fs, values in per_point.items() if values}
    if per_point:
        plot_klom_distributions(per_point, metrics, out / "klom_distributions.png")
        plots["KLOM per forget point"] = "klom_distributions.png"
    if any(d.get("lds_curve") for d in metrics["datamodels"].values()):
        plot_lds_curve(metrics["datamodels"], out / "lds_curve.png")
        plots["LDS curve"] = "lds_curve.png"
    if linear is not None:
        from pipelines.linear import plot_linear

        plot_linear(linear, out / "linear.png")
        plots["Linear model (seed Figure 3)"] = "linear.png"
    metrics = _json_safe(metrics)
    write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    write_text(out / "report.md", render_markdown(metrics, plots))
    return metrics


# ----------------------------------------------------------------------------------------------------------
# reading the stores


def _run_info(models) -> dict:
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


def _check_labels(labels, info: dict) -> np.ndarray:
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
    path = run_dir / "forget_sets.json"
    if not path.exists():
        raise StoreError(f"no forget sets at {path}: run the forget_sets stage first (dmu run CONFIG)")
    return json.loads(path.read_text())["sets"]


def _method_order(names) -> list[str]:
    known = [m for m in METHOD_ORDER if m in names]
    return known + sorted(set(names) - set(known))


def _method_stores(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    found = {p.name[: -len(".zarr")]: p for p in folder.glob("*.zarr") if p.is_dir()}
    return {m: found[m] for m in _method_order(found)}


def _lds(run_dir: Path, skipped: list[str]) -> dict:
    """LDS numbers stored as attrs of each datamodel store (lds_mean, lds_margin_mean, lds_curve)."""
    out = {}
    folder = run_dir / "datamodels"
    for path in sorted(folder.glob("*.zarr")) if folder.is_dir() else []:
        try:
            attrs = dict(open_store(path, "datamodels").attrs)
        except StoreError as err:
            skipped.append(f"datamodels/{path.name}: {err}")
            continue
        out[path.name[: -len(".zarr")]] = {k: v for k, v in attrs.items() if k.startswith("lds")}
    return out


# ----------------------------------------------------------------------------------------------------------
# metrics


def _accuracies(logits: np.ndarray, labels: np.ndarray, sets: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean over models of the accuracy on forget, retain and test (validation) points (MU-Mis's FA, RA,
    TA)."""
    names = {"forget": "forget", "retain": "retain", "validation": "test"}
    return {names[s]: float(np.mean(accuracy(logits[:, idx], labels[idx]))) for s, idx in sets.items()}


def _mia(losses: np.ndarray, forget: np.ndarray, test: np.ndarray, seed: int) -> float | None:
    """Population MIA (forget vs test losses, reference.md §6), one attack per model, averaged over models."""
    if min(len(forget), len(test)) < MIA_FOLDS:
        return None  # too few points for 5-fold cross-validation; noted in the report
    return float(np.mean([population_mia(losses[m, forget], losses[m, test], seed + m)
                          for m in range(losses.shape[0])]))


def _avg_gap(acc: dict, retrain: dict) -> float:
    """MU-Mis's "Avg. Gap" (reference.md §5): mean of |dFA|, |dRA|, |dTA| to retraining."""
    return float(np.mean([abs(acc[s] - retrain[s]) for s in ("forget", "retain", "test")]))


def _evaluate_forget_set(run_dir, models, fs, entry, labels, info, seed, skipped):
    """metrics and per-point KLOM on the forget points for one forget set; None if its oracles are missing."""
    k, n = info["k"], info["n"]
    forget = np.unique(np.asarray(entry["indices"], dtype=np.int64))
    sets = {"forget": forget, "retain": np.setdiff1d(np.arange(n), forget),
            "validation": np.arange(*info["test"])}
    if f"oracle/{fs}/done" not in models or not np.asarray(models[f"oracle/{fs}/done"][:k]).all():
        skipped.append(f"forget set {fs}: its first {k} oracles are not all trained (run the models stage)")
        return None
    # Only the first K oracles, the reference: the others are OM's targets and the floor's (module doc).
    oracle_logits = np.asarray(models[f"oracle/{fs}/logits"][:k])
    oracle_margins = margins(oracle_logits, labels)
    oracle_seconds = float(np.mean(models[f"oracle/{fs}/seconds"][:k]))
    retrain_passes = info["epochs"] * (n - len(forget))  # the models stage trains epochs x |retain| passes
    test = sets["validation"]

    retrain_acc = _accuracies(oracle_logits, labels, sets)
    retrain = {"accuracy": retrain_acc, "avg_gap": 0.0,
               "mia": _mia(per_example_loss(oracle_logits, labels), forget, test, seed),
               "cost": {"passes_fraction": 1.0, "seconds_fraction": 1.0, "seconds": oracle_seconds,
                        "example_passes": retrain_passes}}
    per_point, floor = {}, None
    found = _oracle_floor(models, fs, info["oracle_rows"], labels, oracle_margins, seed, skipped)
    if found is not None:
        floor_values, kind, per_side = found
        floor = {"klom": klom_summary(floor_values, sets), "kind": kind, "n_models_per_side": per_side}
        per_point["oracle floor"] = floor_values[forget]

    methods = {}
    for method, path in _method_stores(run_dir / "unlearned" / fs).items():
        try:
            store = open_store(path, "unlearned")
        except StoreError as err:
            skipped.append(f"{fs}/{method}: {err}")
            continue
        done = np.asarray(store["done"][:]) if "done" in store else np.zeros(0, bool)
        if done.size == 0 or not done.all():
            skipped.append(f"{fs}/{method}: {int(done.sum())} of {done.size} models done "
                           "(rerun the unlearn stage to finish it)")
            continue
        logits = np.asarray(store["logits"][:])
        if logits.shape != (k, info["t"], info["c"]):
            skipped.append(f"{fs}/{method}: logits have shape {logits.shape}, expected (K, T, C) = "
                           f"{(k, info['t'], info['c'])}")
            continue
        method_margins = margins(logits, labels)
        values = klom(method_margins, oracle_margins)
        per_point[method] = values[forget]
        acc = _accuracies(logits, labels, sets)
        seconds = float(np.mean(store["seconds"][:]))
        passes = float(np.mean(store["example_passes"][:]))
        methods[method] = {
            "klom": klom_summary(values, sets),
            "margins": _shift_and_spread(method_margins, oracle_margins, sets),
            "accuracy": acc,
            "avg_gap": _avg_gap(acc, retrain_acc),
            "mia": _mia(per_example_loss(logits, labels), forget, test, seed),
            "cost": {"passes_fraction": float(cost_fraction(passes, retrain_passes)),
                     "seconds_fraction": seconds / oracle_seconds if oracle_seconds > 0 else None,
                     "seconds": seconds, "example_passes": passes},
        }
    if not methods:
        skipped.append(f"forget set {fs}: no finished unlearned stores")
    return ({"size": int(entry.get("size", len(forget))), "how": entry.get("how", ""), "methods": methods,
             "oracle_floor": floor, "retrain": retrain}, per_point)


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


def _oracle_floor(models, fs, rows, labels, oracle_margins, seed, skipped):
    """(per-point KLOM, kind, models per side) of the oracle floor of one forget set, or None (K < 2, no floor
    oracles). kind "floor_oracles": the K floor oracles scored against the K reference oracles as a method is, K
    vs K; "half_split" (floor oracles off or unfinished): two disjoint halves of the reference, K/2 vs K/2."""
    k = oracle_margins.shape[0]
    if rows["floor"].stop > rows["floor"].start:
        if np.asarray(models[f"oracle/{fs}/done"][rows["floor"]]).all():
            floor_logits = np.asarray(models[f"oracle/{fs}/logits"][rows["floor"]])
            return klom(margins(floor_logits, labels), oracle_margins), "floor_oracles", k
        skipped.append(f"forget set {fs}: its floor oracles are not all trained (run the models stage); its "
                       f"oracle floor splits the reference oracles instead ({k // 2} vs {k // 2})")
    if k < 2:
        return None
    return oracle_floor(oracle_margins, seed), "half_split", k // 2


def _floor_label(floor: dict) -> str:
    n = floor["n_models_per_side"]
    return f"oracle floor ({n} vs {n})"


def _linear_summary(linear: dict) -> dict:
    """The linear experiment without its curves: settings and iterations to tolerance per method and seed."""
    return {"settings": linear.get("settings"), "seeds": linear.get("seeds"),
            "tolerance": linear.get("tolerance"),
            "methods": {name: {"label": e["label"], "iters_to_tol": e["iters_to_tol"],
                               "min_relative": e["min_relative"]} for name, e in linear["methods"].items()}}


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


# ----------------------------------------------------------------------------------------------------------
# markdown


def _fmt(x, scale: float = 1.0) -> str:
    """3 significant digits; None (not available) as a dash."""
    if x is None:
        return "–"
    return f"{x * scale:.3g}"


def _headline(klom_sets: dict) -> float:
    return float(np.mean([klom_sets[s][HEADLINE] for s in POINT_SETS]))


def _table(fs_metrics: dict) -> list[str]:
    head = ("| method | KLOM p95 forget | KLOM p95 retain | KLOM p95 val | KLOM p99 avg | FA % | RA % | TA % "
            "| spread retain | avg gap % | MIA % | cost % passes | seconds |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]

    def row(name, kl, acc, gap, mia, cost, spread=None):
        cells = [name]
        cells += [_fmt(kl[s]["p95"]) for s in POINT_SETS] if kl else ["–"] * 3
        cells.append(_fmt(float(np.mean([kl[s]["p99"] for s in POINT_SETS]))) if kl else "–")
        cells += [_fmt(acc[s], 100) for s in ("forget", "retain", "test")] if acc else ["–"] * 3
        cells += [_fmt(spread), _fmt(gap, 100), _fmt(mia, 100)]
        cells += [_fmt(cost["passes_fraction"], 100), _fmt(cost["seconds"])] if cost else ["–", "–"]
        lines.append("| " + " | ".join(cells) + " |")

    for name, m in fs_metrics["methods"].items():
        row(name, m["klom"], m["accuracy"], m["avg_gap"], m["mia"], m["cost"], m["margins"]["retain"]["spread"])
    r = fs_metrics["retrain"]
    row("retrain (oracles)", None, r["accuracy"], None, r["mia"], r["cost"])
    if fs_metrics["oracle_floor"] is not None:
        floor = fs_metrics["oracle_floor"]
        row(_floor_label(floor), floor["klom"], None, None, None, None)
    return lines


def render_markdown(metrics: dict, plots: dict[str, str]) -> str:
    k = metrics["k"]
    lines = [
        f"# Unlearning report: {metrics['run']}",
        "",
        f"K = {k} unlearned models (one per full model) against K = {k} oracles (retrained without the "
        f"forget set) per forget set; N = {metrics['n_train']} training examples, T = {metrics['n_targets']} "
        f"targets (training, then test), {metrics['num_classes']} classes, retraining = "
        f"{metrics['epochs']:g} epochs.",
        "",
        "KLOM (KL divergence of margins, reference.md §4): per point, the KL divergence between the "
        "histograms of the unlearned models' margins and the oracles' margins; 0 = indistinguishable "
        "from retraining, at most about 11.5. Tables give its 95th percentile over each point set "
        "(forget, retain, val = test points) and the mean of the three 99th percentiles.",
        "",
        "Columns: FA / RA / TA = accuracy on forget / retain / test points (mean over models); spread "
        "retain = median over retain points of the spread of the method's margins across its models over "
        "the oracles' (1 = as varied as retraining; below 1, the models were pulled together, which KLOM "
        "penalises even where mean margins agree; metrics.json also has the mean shift); avg gap = "
        "mean |difference| of FA, RA, TA to retraining (MU-Mis); MIA = population membership "
        f"inference, forget vs test losses, {MIA_FOLDS}-fold CV accuracy (ideal about 50%); cost = "
        "example passes as a % of retraining (epochs x retained examples); seconds = wall time per "
        "model.",
        "",
    ]
    kinds = {m["oracle_floor"]["kind"] for m in metrics["forget_sets"].values() if m["oracle_floor"]}
    if "floor_oracles" in kinds:
        lines += [f"Oracle floor ({k} vs {k}): what retraining itself scores, KLOM of {k} further oracles "
                  "(fresh seeds, trained like the others) against the oracles the methods are scored against, "
                  "the same comparison as a method's.", ""]
    if "half_split" in kinds:
        lines += [f"Oracle floor ({k // 2} vs {k // 2}), where the floor oracles are missing "
                  "(models.floor_oracles off or unfinished): KLOM between two disjoint halves of the oracles; "
                  "histograms of half as many models are noisier, so it reads higher than the floor at K vs K, "
                  "a pessimistic bound (reference.md §8).", ""]
    for fs, m in metrics["forget_sets"].items():
        lines += [f"## Forget set `{fs}` ({m['size']} points)", "", m["how"], ""]
        lines += _table(m)
        if m["retrain"]["mia"] is None:
            lines += ["", f"MIA not computed: it needs at least {MIA_FOLDS} forget points for "
                          f"{MIA_FOLDS}-fold CV."]
        lines.append("")
    if not metrics["forget_sets"]:
        lines += ["No forget set has finished oracles yet: run the models and unlearn stages.", ""]

    lines += ["## Datamodels (LDS)", ""]
    if metrics["datamodels"]:
        # test targets first (the published LDS); training targets apart: there a point's own presence in a
        # subset dominates its output, which flatters a datamodel
        lines += ["| datamodel | LDS, test margins | LDS, test logits | LDS, training-target margins "
                  "| curve on test margins (models or checkpoints: LDS) |", "|---|---|---|---|---|"]
        for name, d in metrics["datamodels"].items():
            curve = ", ".join(f"{int(x)}: {_fmt(y)}" for x, y in d.get("lds_curve") or []) or "–"
            cells = [name, _fmt(d.get("lds_margin_test_mean")), _fmt(d.get("lds_test_mean")),
                     _fmt(d.get("lds_margin_train_mean")), curve]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Spearman correlation of predicted and actual outputs of the held-out subset models, mean over "
                  "targets."]
    else:
        lines.append("No datamodel store in this run.")
    lines.append("")

    if "linear" in metrics:
        lin = metrics["linear"]
        s = lin["settings"] or {}
        lines += ["## Linear model (seed Figure 3)", "",
                  f"Ridge regression, {s.get('n')} points in {s.get('d')} dimensions, unlearning "
                  f"{s.get('n_forget')}; iterations until ||theta_t - theta_R|| <= {lin['tolerance']:g} x "
                  "||theta_full - theta_R|| (per seed; pipelines/linear.py explains the settings).", "",
                  "| method | iterations to tolerance (per seed) | closest (median, relative) |",
                  "|---|---|---|"]
        for e in lin["methods"].values():
            reach = ", ".join("never" if v is None else str(v) for v in e["iters_to_tol"])
            lines.append(f"| {e['label']} | {reach} | {_fmt(float(np.median(e['min_relative'])))} |")
        lines.append("")

    if metrics["skipped"]:
        lines += ["## Skipped", ""] + [f"- {s}" for s in metrics["skipped"]] + [""]
    if plots:
        lines += ["## Plots", ""]
        for title, path in plots.items():
            lines += [f"![{title}]({path})", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# plots (matplotlib's object API with the Agg canvas: no pyplot global state, no display needed)


def _figure(n_panels: int, panel_size=(5.0, 3.8), ncols_max: int = 3, extra_width: float = 0.0, **kw):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(ncols_max, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(panel_size[0] * ncols + extra_width, panel_size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def save_figure(fig, path, **kwargs) -> None:
    """fig.savefig to a local path, or to an object-store URL through a file object (PNG unless the name says
    otherwise)."""
    path = as_path(path)
    if is_local(path):
        fig.savefig(path, **kwargs)
        return
    with path.open("wb") as f:
        fig.savefig(f, format=path.suffix.lstrip(".") or "png", **kwargs)


def _colors(metrics: dict) -> dict[str, tuple]:
    """One colour per method, the same in every panel and plot."""
    from matplotlib import colormaps

    names = _method_order({m for fs in metrics["forget_sets"].values() for m in fs["methods"]})
    cmap = colormaps["tab10"]
    return {name: cmap(i % 10) for i, name in enumerate(names)}


MARKERS = "osD^vP<>Xh"


def plot_klom_vs_cost(metrics: dict, path) -> None:
    """Per forget set: KLOM (mean of the p95 over forget / retain / val) against cost as a fraction of
    retraining in example passes, log scale (seed Figure 2); dashed line = the oracle floor; star =
    retraining."""
    sets = metrics["forget_sets"]
    colors = _colors(metrics)
    order = list(colors)
    fig, axes = _figure(len(sets), sharey=True, extra_width=2.0)  # room for the legend on the right
    any_zero = False
    for ax, (fs, m) in zip(axes, sets.items()):
        for name, entry in m["methods"].items():
            frac = entry["cost"]["passes_fraction"]
            any_zero |= frac == 0
            x, y = max(frac, ZERO_COST_X), _headline(entry["klom"])
            i = order.index(name)
            ax.scatter(x, y, color=colors[name], marker=MARKERS[i % len(MARKERS)], s=55, zorder=3,
                       edgecolor="black", linewidth=0.5, label=name)
            ax.annotate(name + (" (cost 0)" if frac == 0 else ""), (x, y), xytext=(5, 4),
                        textcoords="offset points", fontsize=7.5)
        if m["oracle_floor"] is not None:
            floor = _headline(m["oracle_floor"]["klom"])
            ax.axhline(floor, color="grey", ls="--", lw=1.2, label=_floor_label(m["oracle_floor"]))
            ax.scatter(1.0, floor, marker="*", s=160, color="black", zorder=3,
                       label="retrain (cost 1, KLOM = floor)")
        ax.set_xscale("log")
        ax.set_xlim(ZERO_COST_X / 3, 3.0)
        ax.set_title(f"forget set {fs} ({m['size']} points)", fontsize=10)
        ax.set_xlabel("cost / retraining (example passes, log scale)")
        ax.grid(True, which="major", alpha=0.3)
    # one y range for all panels, set after plotting: a limit fixed on the first panel would hide the points of
    # the others that lie above it (shared axes); the floor lines too, and a run with no method yet
    tops = [_headline(e["klom"]) for m in sets.values() for e in m["methods"].values()]
    tops += [_headline(m["oracle_floor"]["klom"]) for m in sets.values() if m["oracle_floor"] is not None]
    axes[0].set_ylim(0, 1.08 * max(tops, default=1.0))
    axes[0].set_ylabel(f"KLOM {HEADLINE} (nats), mean of forget / retain / val")
    handles, names = {}, []
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = h
                names.append(label)
    fig.legend([handles[n] for n in names], names, loc="outside right center", fontsize=8)
    title = f"KLOM against cost, K = {metrics['k']} models per side"
    if any_zero:
        title += f"  (zero-cost methods drawn at x = {ZERO_COST_X:g})"
    fig.suptitle(title, fontsize=11)
    save_figure(fig, path, dpi=110)


def plot_klom_distributions(per_point: dict, metrics: dict, path) -> None:
    """Per forget set: box plots of per-point KLOM on the forget points, one box per method and the oracle
    floor; whiskers at the 5th and 95th percentiles, so the right whisker is the headline p95."""
    colors = _colors(metrics)
    fig, axes = _figure(len(per_point), panel_size=(5.0, 0.42 * (len(colors) + 2) + 1.4), sharex=True)
    for ax, (fs, values) in zip(axes, per_point.items()):
        names = _method_order([n for n in values if n != "oracle floor"])
        names += ["oracle floor"] if "oracle floor" in values else []
        data = [values[n] for n in names]
        box = ax.boxplot(data, vert=False, whis=(5, 95), showfliers=True, patch_artist=True, widths=0.6,
                         flierprops={"markersize": 3, "alpha": 0.5}, medianprops={"color": "black"})
        for patch, name in zip(box["boxes"], names):
            patch.set_facecolor(colors.get(name, (0.8, 0.8, 0.8, 1.0)))
            patch.set_alpha(0.75)
        floor = metrics["forget_sets"][fs]["oracle_floor"]
        ax.set_yticks(range(1, len(names) + 1),
                      [n if n != "oracle floor" else _floor_label(floor) for n in names], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("KLOM per forget point (nats)")
        ax.set_title(f"forget set {fs} ({metrics['forget_sets'][fs]['size']} points)", fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"KLOM on the forget points, K = {metrics['k']} models per side (whiskers: 5th-95th pct)",
                 fontsize=11)
    save_figure(fig, path, dpi=110)


def plot_lds_curve(datamodels: dict, path) -> None:
    """LDS against the number of subset models (LASSO) or checkpoints (TRAK), log2 x axis."""
    fig, (ax,) = _figure(1, panel_size=(6.0, 4.0))
    unit = {"lasso": "subset models", "trak": "checkpoints"}
    for i, (name, d) in enumerate(datamodels.items()):
        curve = np.asarray(d.get("lds_curve") or [], dtype=float)
        if curve.size == 0:
            continue
        curve = curve[np.argsort(curve[:, 0])]
        ax.plot(curve[:, 0], curve[:, 1], marker=MARKERS[i % len(MARKERS)], lw=1.6,
                label=f"{name.upper()} (x = {unit.get(name, 'models')})")
    ax.set_xscale("log")
    ticks = sorted({int(x) for d in datamodels.values() for x, _ in d.get("lds_curve") or []})
    ax.set_xticks(ticks, [str(t) for t in ticks], minor=False)  # the budgets measured, as plain numbers
    ax.minorticks_off()
    ax.set_xlabel("number of subset models (LASSO) / checkpoints (TRAK), log scale")
    ax.set_ylabel("LDS (Spearman, mean over test-target margins)")
    ax.set_title("Linear datamodeling score against estimation budget", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=110)
