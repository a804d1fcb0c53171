"""The run's report as a person reads it: `build_report` evaluates the run (report.evaluate reads forget_sets.json,
models.zarr, unlearned/<fs>/<method>.zarr and datamodels/<method>.zarr), plots it (report.plots) and renders the
markdown (here); writes runs/<name>/report/{report.md, metrics.json, *.png} and returns the metrics. How KLOM and
the oracle floor are scored: report.evaluate.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from attribution.store import as_path, make_dirs, write_text
from pipelines.report.evaluate import (
    INTERVAL_LEVEL,
    MARGINS_ONLY,
    N_SUBSAMPLES,
    POINT_SETS,
    evaluate_run,
    floor_label,
    headline_interval,
    json_safe,
    p99_average,
)
from pipelines.report.plots import (
    plot_klom_distributions,
    plot_klom_vs_cost,
    plot_klom_vs_models,
    plot_lds_curve,
    plot_linear,
)
from unlearning.metrics import MIA_FOLDS


def build_report(run_dir: str | Path, labels: np.ndarray, *, seed: int = 0, linear: dict | None = None) -> dict:
    """Evaluate every finished unlearned store of the run against its oracles, write the report, return the
    metrics (as written to metrics.json).

    run_dir: the run directory (a local path or an object-store URL); labels: (T,) integer labels of all targets
    (training examples, then test); seed: seeds the oracle floor's random halves (when it falls back to them)
    and the MIA's subsampling and folds; linear: the result of pipelines.stages.linear.linear_experiment, plotted and summarised when given.
    Writes run_dir/report/{report.md, metrics.json, klom_vs_cost.png, klom_distributions.png, lds_curve.png
    (when an LDS curve is stored), klom_vs_models.png (with unlearn.datamodel_curve's stores), linear.png (when
    `linear` is given)}.
    """
    run_dir = as_path(run_dir)
    metrics, per_point = evaluate_run(run_dir, labels, seed=seed, linear=linear)

    out = make_dirs(run_dir / "report")
    plots = {}
    if metrics.get("margin_only"):  # imported margins: KLOM only (report.evaluate.evaluate_margins)
        if per_point:
            plot_klom_distributions(per_point, metrics, out / "klom_distributions.png")
            plots["KLOM per forget point"] = "klom_distributions.png"
        metrics = json_safe(metrics)
        write_text(out / "metrics.json", json.dumps(metrics, indent=1))
        write_text(out / "report.md", render_margins_markdown(metrics, plots))
        return metrics
    if metrics["forget_sets"]:
        drawn = plot_klom_vs_cost(metrics, out / "klom_vs_cost.png")
        write_text(out / "klom_vs_cost.json", json.dumps(json_safe(drawn), indent=1))  # the plot's data
        plots["KLOM p99 against cost (seed Figure 2)"] = "klom_vs_cost.png"
    per_point = {fs: values for fs, values in per_point.items() if values}
    if per_point:
        plot_klom_distributions(per_point, metrics, out / "klom_distributions.png")
        plots["KLOM per forget point"] = "klom_distributions.png"
    if any(d.get("lds_curve") for d in metrics["datamodels"].values()):
        plot_lds_curve(metrics["datamodels"], out / "lds_curve.png")
        plots["LDS curve"] = "lds_curve.png"
    if metrics["datamodel_curve"]:
        drawn = plot_klom_vs_models(metrics["datamodel_curve"], out / "klom_vs_models.png")
        write_text(out / "klom_vs_models.json", json.dumps(json_safe(drawn), indent=1))  # the plot's data
        plots["KLOM against the number of subset models"] = "klom_vs_models.png"
    if linear is not None:
        plot_linear(linear, out / "linear.png")
        plots["Linear model (seed Figure 3)"] = "linear.png"
    metrics = json_safe(metrics)
    write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    write_text(out / "report.md", render_markdown(metrics, plots))
    return metrics


# ----------------------------------------------------------------------------------------------------------
# markdown


def _fmt(x, scale: float = 1.0) -> str:
    """3 significant digits; None (not available) as a dash."""
    if x is None:
        return "–"
    return f"{x * scale:.3g}"


def _per_set(kl: dict | None, stat: str) -> str:
    """forget / retain / val values of one KLOM statistic in one cell."""
    return " / ".join(_fmt(kl[s][stat]) for s in POINT_SETS) if kl else "–"


def _with_interval(value: float, interval: list[float] | None) -> str:
    return f"{_fmt(value)} [{_fmt(interval[0])}, {_fmt(interval[1])}]" if interval else _fmt(value)


def _against(interval: list[float] | None, floor: list[float] | None) -> str:
    """How a method's headline stands to the floor's: above / below where the intervals do not overlap, else ≈."""
    if not interval or not floor:
        return "–"
    if interval[0] > floor[1]:
        return "above"
    if interval[1] < floor[0]:
        return "below"
    return "≈"


def _pairwise(fs_metrics: dict) -> list[str]:
    """Method against method on the headline: "<" where the row's interval lies wholly below the column's
    (better), ">" wholly above, "≈" where they overlap (the difference is within sampling noise)."""
    named = {name: headline_interval(m) for name, m in fs_metrics["methods"].items()}
    named = {name: ci for name, ci in named.items() if ci}
    if len(named) < 2:
        return []
    names = list(named)
    symbol = {"below": "<", "above": ">", "≈": "≈"}
    lines = ["Method against method (headline intervals; < : the row's lies wholly below the column's, "
             "> : above, ≈ : they overlap):", "", "| | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for a in names:
        cells = ["" if a == b else symbol[_against(named[a], named[b])] for b in names]
        lines.append(f"| **{a}** | " + " | ".join(cells) + " |")
    return lines + [""]


def _table(fs_metrics: dict) -> list[str]:
    head = ("| method | KLOM p99 avg [95 % CI] | vs floor | KLOM p99 forget / retain / val | KLOM p95 forget / "
            "retain / val | reverse KLOM p99 avg | FA % | RA % | TA % | spread retain | avg gap % | MIA % | "
            "LiRA AUC % | cost % passes | seconds | cost % seconds |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    floor = fs_metrics["oracle_floor"]
    floor_ci = headline_interval(floor)

    def row(name, m, acc, gap, mia, lira, cost, spread=None, is_floor=False):
        kl = m.get("klom") if m else None
        ci = headline_interval(m)
        reverse = m.get("klom_reverse") if m else None
        cells = [name, _with_interval(p99_average(kl), ci) if kl else "–",
                 "–" if is_floor else _against(ci, floor_ci), _per_set(kl, "p99"), _per_set(kl, "p95"),
                 _fmt(p99_average(reverse)) if reverse else "–"]
        cells += [_fmt(acc[s], 100) for s in ("forget", "retain", "test")] if acc else ["–"] * 3
        cells += [_fmt(spread), _fmt(gap, 100), _fmt(mia, 100), _fmt(lira["auc"], 100) if lira else "–"]
        cells += ([_fmt(cost["passes_fraction"], 100), _fmt(cost["seconds"]), _fmt(cost["seconds_fraction"], 100)]
                  if cost else ["–"] * 3)
        lines.append("| " + " | ".join(cells) + " |")

    for name, m in fs_metrics["methods"].items():
        diverged = (m.get("diagnostics") or {}).get("diverged")
        row(f"{name} ({diverged} diverged)" if diverged else name, m, m["accuracy"], m["avg_gap"], m["mia"],
            m.get("lira"), m["cost"], m["margins"]["retain"]["spread"])
    r = fs_metrics["retrain"]
    row("retrain (oracles)", None, r["accuracy"], None, r["mia"], None, r["cost"])
    if floor is not None:
        row(floor_label(floor), floor, None, None, None, None, None, is_floor=True)
    return lines


def _diagnostics(fs_metrics: dict) -> list[str]:
    """One line per method that reports on its own run (MU-Mis: why it stopped; OM, DMM: final loss)."""
    lines = []
    for name, m in fs_metrics["methods"].items():
        d = m.get("diagnostics") or {}
        if d.get("diverged"):
            lines.append(f"- {name}: {d['diverged']} models diverged (non-finite logits); every score of this row is "
                         "over the others")
        if "stopped_by" in d:
            counts = ", ".join(f"{why} {n}" for why, n in d["stopped_by"].items() if n)
            lines.append(f"- {name}: stopped by {counts}; steps {d['steps']['min']:g}-{d['steps']['max']:g} "
                         f"(mean {d['steps']['mean']:.3g})")
        cost = m.get("cost") or {}
        if m.get("method") == "oracle_matching" and cost.get("method_passes_fraction") is not None:
            lines.append(f"- {name}: cost {_fmt(cost['method_passes_fraction'], 100)} % of retraining's passes for "
                         f"the fine-tuning alone, {_fmt(cost['passes_fraction'], 100)} % with the oracles it needs")
        if "final_matching_loss" in d:
            lines.append(f"- {name}: final matching loss (MSE to its target logits, mean over models) "
                         f"{_fmt(d['final_matching_loss'])}")
        if "residuals" in d:
            r = d["residuals"]
            progress = np.asarray(r["forget_margin_progress"])
            lines.append(f"- {name}: logits' MSE to its own targets on the forget points "
                         f"{_fmt(float(np.mean(r['forget_mse'])))}, on the retain points "
                         f"{_fmt(float(np.mean(r['retain_mse'])))}; forget margins moved "
                         f"{_fmt(float(np.mean(progress)), 100)} % of the way from the full model to the "
                         f"target (models {_fmt(float(progress.min()), 100)}-{_fmt(float(progress.max()), 100)} %)")
    return ["Diagnostics:", ""] + lines + [""] if lines else []


def _draws_section(draws: dict) -> list[str]:
    """One table per random forget-set size drawn several times: each row's headline per draw, their mean and
    standard deviation over the draws."""
    lines = []
    for kind, d in draws.items():
        lines += [f"## Over {len(d['draws'])} draws of `{kind}`", "",
                  "KLOM p99 average per draw of the forget set (forget_sets.draws), its mean and standard deviation "
                  "over the draws: how much the ranking depends on which points were drawn.", "",
                  "| method | mean (sd) | " + " | ".join(d["draws"]) + " |", "|---|---|" + "---|" * len(d["draws"])]
        for label, row in d["rows"].items():
            per_draw = [_fmt(row["values"].get(name)) for name in d["draws"]]
            lines.append(f"| {label} | {_fmt(row['mean'])} ({_fmt(row['sd'])}) | " + " | ".join(per_draw) + " |")
        lines.append("")
    return lines


def _tuning_section(tuning: dict | None) -> list[str]:
    if tuning is None:
        return ["## Hyperparameters", "", "Not tuned by this run (no tune.grid): every method ran with the "
                "config's unlearn.hparams. Where those were chosen is not known to the report.", ""]
    sets = ", ".join(f"`{n}` ({s['size']} points: {s['how']})" for n, s in tuning["sets"].items())
    lines = ["## Hyperparameters (tune stage)", "",
             f"Chosen on the tune stage's own data, none of it reported here: tuning forget sets disjoint from "
             f"every set reported here, with their own oracles ({sets}); {tuning['k']} full models of their own "
             f"seed stream, never evaluated; and {tuning.get('validation_points')} of the test targets as "
             "validation points, the other half being the report's. "
             f"Criterion: {tuning['criterion']}. Every method with a grid had its values tried on the same "
             "sets and models.", "", "| method | grid | chosen | score (chosen / worst) |", "|---|---|---|---|"]
    for method, entries in tuning["scores"].items():
        scores = [e["score"] for e in entries if e["score"] is not None]  # None: a grid point diverged
        worst = _fmt(max(scores)) if len(scores) == len(entries) else "diverged"
        grid = "; ".join(f"{k}: {v}" for k, v in tuning["grid"][method].items())
        lines.append(f"| {method} | {grid} | {tuning['chosen'][method]} | "
                     f"{_fmt(min(scores)) if scores else 'diverged'} / {worst} |")
    widened = tuning.get("widened") or {}
    if widened:
        listed = "; ".join(f"{method} {w['hyperparameter']} {w['value']}" for method, ws in widened.items()
                           for w in ws)
        lines += ["", f"Grids widened where a choice was an end (one step beyond, at most tune.widen times): "
                  f"{listed}."]
    edges = tuning.get("at_grid_edge") or {}
    if edges:
        listed = "; ".join(f"{method} {key} {tuning['chosen'][method][key]} ({end} tried)"
                           for method, keys in edges.items() for key, end in keys.items())
        lines += ["", f"Chosen at an end of its grid after widening, so a better value may lie beyond it: "
                  f"{listed}. Widen the grid (tune.grid, tune.widen) to know."]
    if tuning.get("untuned"):
        why = (" (mu_mis_gap: MU-Mis stopped by the remaining-data-free gap rule, which has no threshold)"
               if "mu_mis_gap" in tuning["untuned"] else "")
        lines += ["", f"Not tuned (no grid): {', '.join(tuning['untuned'])}: config hparams or defaults{why}."]
    return lines + [""]


def _datamodels_cost_section(cost: dict | None) -> list[str]:
    if cost is None:
        return []
    per = cost["fraction_per_request"]
    return ["## Datamodels' one-off cost", "",
            f"{cost['n_models']} subset models: {cost['example_passes']:.3g} example passes, "
            f"{_fmt(cost['example_passes'] / cost['retrain_passes'])} retrainings on all N. Amortised over 1 / 10 / "
            f"100 deletion requests: {_fmt(per['1'])} / {_fmt(per['10'])} / {_fmt(per['100'])} retrainings per "
            "request, to add to DM-Direct's and DMM's cost above (not included there). The LASSO or TRAK fit costs "
            "no example passes; its seconds are not recorded.", ""]


def _datamodel_curve_section(curve: dict) -> list[str]:
    """Unlearning quality against datamodel quality: the headline per number of subset models."""
    if not curve:
        return []
    lines = ["## Unlearning against the number of subset models", "",
             "KLOM p99 average [95 % interval] of the datamodel methods with LASSO datamodels fit on the first n "
             "subset models (the largest n: the run's own LASSO store), each with the hyperparameters tuned on "
             "the full LASSO store.", ""]
    for fs, entry in curve.items():
        sizes = sorted({p["n_models"] for points in entry["methods"].values() for p in points})
        lines += [f"Forget set {fs} (oracle floor {_fmt(entry['oracle_floor'])}):", "",
                  "| method | " + " | ".join(f"n = {n}" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
        for method, points in entry["methods"].items():
            by_n = {p["n_models"]: _with_interval(p["p99_avg"], p["interval"]) for p in points}
            lines.append(f"| {method} | " + " | ".join(by_n.get(n, "–") for n in sizes) + " |")
        lines.append("")
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
        "KLOM (KL divergence of margins, docs/methods.md): per point, KL(oracle || unlearned) between the "
        "histograms of the oracles' margins and the unlearned models' margins, the direction of the "
        "authors' benchmark; 0 = indistinguishable from retraining, at most about 11.5. The headline is the "
        "average of the 99th percentiles over forget, retain and val (= test) points (the datamodel-matching "
        f"paper's Figure 2), with a {INTERVAL_LEVEL:.0%} interval over models ({N_SUBSAMPLES} half-samples of "
        "the unlearned and the oracle models, without replacement: a bootstrap's repeated models inflate "
        "KLOM; docs/methods.md); 'vs floor' says whether that "
        "interval lies above or below the oracle floor's, or overlaps it (≈). Per-set p99 and p95 follow. "
        "'reverse' is the other direction, KL(unlearned || oracle), against its own floor (the floor row): "
        "it rewards models less varied than retraining, so a method can score below the floor there.",
        "",
        "Columns: FA / RA / TA = accuracy on forget / retain / test points (mean over models); spread "
        "retain = median over retain points of the spread of the method's margins across its models over "
        "the oracles' (1 = as varied as retraining; below 1, the models were pulled together, which KLOM "
        "penalises even where mean margins agree; metrics.json also has the mean shift); avg gap = "
        "mean |difference| of FA, RA, TA to retraining (MU-Mis); MIA = population membership "
        f"inference, forget vs test losses, {MIA_FOLDS}-fold CV accuracy (ideal about 50%); LiRA AUC = "
        "per-example membership test on the forget points (likelihood ratio of a margin under the full "
        "models' and the oracles' Gaussians; the method's models against the floor oracles; ideal 50%); "
        "cost = everything one deletion request needs, in example passes as a % of retraining (epochs x "
        "retained examples): the method, the original model's forward passes where it reads its logits "
        "(DM-Direct, DMM), Oracle Matching's oracles (each a retraining); seconds = wall time per model as "
        "the unlearn stage ran it: the fine-tuning methods and retraining in packs of the same size (one "
        "computation, its time shared), MU-Mis and DM-Direct one model at a time (metrics.json: "
        "retrain.cost.seconds_basis).",
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
                  "a pessimistic bound (docs/methods.md §8).", ""]
    lines += _tuning_section(metrics.get("tuning"))
    lines += _draws_section(metrics.get("draws") or {})
    for fs, m in metrics["forget_sets"].items():
        lines += [f"## Forget set `{fs}` ({m['size']} points)", "", m["how"], ""]
        lines += _table(m)
        if m["retrain"]["mia"] is None:
            lines += ["", f"MIA not computed: it needs at least {MIA_FOLDS} forget points for "
                          f"{MIA_FOLDS}-fold CV."]
        lines.append("")
        lines += _pairwise(m)
        lines += _diagnostics(m)
    if not metrics["forget_sets"]:
        lines += ["No forget set has finished oracles yet: run the models and unlearn stages.", ""]

    lines += _datamodels_cost_section(metrics.get("datamodels_cost"))
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

    lines += _datamodel_curve_section(metrics.get("datamodel_curve") or {})
    if "linear" in metrics:
        lin = metrics["linear"]
        s = lin["settings"] or {}
        lines += ["## Linear model (seed Figure 3)", "",
                  f"Ridge regression, {s.get('n')} points in {s.get('d')} dimensions, unlearning "
                  f"{s.get('n_forget')}; iterations until ||theta_t - theta_R|| <= {lin['tolerance']:g} x "
                  "||theta_full - theta_R|| (per seed; pipelines/stages/linear.py explains the settings).", "",
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


def _p95s(kl: dict | None) -> str:
    """The p95s of one KLOM summary as the bench prints them: retain / forget / val, 4 decimals."""
    if not kl:
        return "–"
    return " / ".join("–" if kl[s]["p95"] is None else f"{kl[s]['p95']:.4f}" for s in ("retain", "forget",
                                                                                        "validation"))


def render_margins_markdown(metrics: dict, plots: dict[str, str]) -> str:
    """report.md of a margin-only run (`dmu import edub`): KLOM of doing nothing and of each method scored on
    margins, per split, in the bench's convention and in dmu's; what needs logits is n/a."""
    k = metrics["k"]
    lines = [
        f"# Unlearning report: {metrics['run']} (margins only)",
        "",
        f"models.zarr holds margins, not logits ({metrics.get('imported') or 'imported'}): K = {k} full models; "
        f"N = {metrics['n_train']} training points, T = {metrics['n_targets']} targets (training, then test). "
        f"Accuracies, MIA and cost need logits or training times: {MARGINS_ONLY}.",
        "",
        "Bench P95 = the 95th percentile of KLOM per split, retain / forget / val, in the Easy Data Unlearning "
        "Bench's binning (unlearning.klom, convention \"edub\"): 'EasyDUB' is KL(unlearned || oracle), the "
        "direction of its eval_pretrain.py and README table; 'run.py' is KL(oracle || unlearned), the direction "
        "of RoyRin/data-unlearning-bench's run.py. dmu p99 / p95 = this project's binning (docs/methods.md), "
        "KL(oracle || unlearned), forget / retain / val. Every method is scored against all the oracles "
        "imported for the forget set; the oracle floor splits them into two halves.",
        "",
    ]
    for fs, m in metrics["forget_sets"].items():
        floor = m["oracle_floor"]
        lines += [f"## Forget set `{fs}` ({m['size']} points, {m['n_oracles']} oracles)", "", m["how"], "",
                  "| method | bench P95, EasyDUB (retain / forget / val) | bench P95, run.py (retain / forget / val) "
                  "| dmu p99 (forget / retain / val) | dmu p95 | accuracy | MIA |",
                  "|---|---|---|---|---|---|---|"]
        for label, e in m["methods"].items():
            lines.append(f"| {label} | {_p95s(e['klom_edub_reverse'])} | {_p95s(e['klom_edub'])} | "
                         f"{_per_set(e['klom'], 'p99')} | {_per_set(e['klom'], 'p95')} | {MARGINS_ONLY} | "
                         f"{MARGINS_ONLY} |")
        if floor:
            lines.append(f"| {floor_label(floor)} | – | – | {_per_set(floor['klom'], 'p99')} | "
                         f"{_per_set(floor['klom'], 'p95')} | – | – |")
        lines.append("")
    if not metrics["forget_sets"]:
        lines += ["No forget set has imported oracles: rerun `dmu import edub`.", ""]
    if metrics["skipped"]:
        lines += ["## Skipped", ""] + [f"- {s}" for s in metrics["skipped"]] + [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{title}]({path})\n" for title, path in plots.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# plots (matplotlib's object API with the Agg canvas: no pyplot global state, no display needed)
