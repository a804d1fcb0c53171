"""The report's plots: reads the metrics dict and the per-point KLOM of report.evaluate (evaluate_run);
writes PNG files (a local path or an object-store URL) and returns the numbers each one drew. matplotlib's
object API with the Agg canvas: no pyplot global state, no display needed.
"""

from __future__ import annotations

import math

import numpy as np

from attribution.store import as_path, is_local
from pipelines.report.evaluate import POINT_SETS, floor_label, method_order
from pipelines.rundir.variants import curve_models

# Methods that cost no example passes (do_nothing, dm_direct) sit at this x on the log-scale cost axis.
ZERO_COST_X = 1e-4
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


def _series(label: str) -> str:
    """A method's curve across budgets: its label without the budget (dm_matching[trak]@3x -> dm_matching[trak])."""
    return label.split("@")[0]


def method_colors(metrics: dict) -> dict[str, tuple]:
    """One colour per method (per curve: a method on one datamodel store), the same in every panel and plot."""
    from matplotlib import colormaps

    labels = {_series(m) for fs in metrics["forget_sets"].values() for m in fs["methods"]}
    names = sorted(labels, key=lambda n: (method_order({x.split("[")[0] for x in labels}).index(n.split("[")[0]), n))
    # tab10's colours while they suffice; past 10 curves (mnist1d.yaml has 11), tab20's 20 distinct ones
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


MARKERS = "osD^vP<>XhpH"  # one per curve up to 12 (the star is retraining's)
# Figure 2's panels: KLOM p99 on each point set and their average
FIGURE2_PANELS = (*POINT_SETS, "average")


def klom_vs_cost_data(metrics: dict) -> dict:
    """What plot_klom_vs_cost draws, from the metrics alone: per forget set and panel, per method a curve
    [(cost as a fraction of retraining in example passes, KLOM p99), ...] sorted by cost (one point per
    budget), and the oracle floor's p99 (None without a floor)."""
    out = {}
    for fs, m in metrics["forget_sets"].items():
        panels = {}
        for panel in FIGURE2_PANELS:
            curves: dict[str, list] = {}
            for label, entry in m["methods"].items():
                if curve_models(entry.get("datamodel")) is not None:  # drawn by plot_klom_vs_models
                    continue
                y = _p99(entry["klom"], panel)
                curves.setdefault(_series(label), []).append((entry["cost"]["passes_fraction"], y))
            floor = _p99(m["oracle_floor"]["klom"], panel) if m["oracle_floor"] is not None else None
            panels[panel] = {"curves": {k: sorted(v) for k, v in curves.items()}, "floor": floor}
        out[fs] = panels
    return out


def _p99(klom_sets: dict, panel: str) -> float:
    if panel == "average":
        return float(np.mean([klom_sets[s]["p99"] for s in POINT_SETS]))
    return float(klom_sets[panel]["p99"])


def plot_klom_vs_cost(metrics: dict, path) -> dict:
    """The seed's Figure 2 per forget set (a row): KLOM p99 on forget, retain and validation points and their
    average against cost as a fraction of retraining in example passes (log scale), a line per method through
    its compute budgets; the grey band is the oracle floor (what retraining itself scores), the star
    retraining at cost 1. Returns the plotted data (klom_vs_cost_data)."""
    data = klom_vs_cost_data(metrics)
    colors = method_colors(metrics)
    order = list(colors)
    fig, axes = _figure(len(data) * len(FIGURE2_PANELS), panel_size=(3.9, 3.3), ncols_max=len(FIGURE2_PANELS),
                        extra_width=2.4)
    axes = axes.reshape(len(data), len(FIGURE2_PANELS)) if len(data) else axes
    xs = [x for d in data.values() for p in d.values() for c in p["curves"].values() for x, _ in c]
    lo = min([x for x in xs if x > 0] + [1.0])
    for row, (fs, panels) in zip(axes, data.items()):
        for ax, (panel, d) in zip(row, panels.items()):
            for name, curve in d["curves"].items():
                x = [max(c, ZERO_COST_X) for c, _ in curve]
                i = order.index(name)
                ax.plot(x, [y for _, y in curve], color=colors[name], marker=MARKERS[i % len(MARKERS)], ms=5,
                        lw=1.4, mec="black", mew=0.4, label=name)
            if d["floor"] is not None:
                ax.axhspan(0, d["floor"], color="grey", alpha=0.25, lw=0, label="oracle floor (retraining)")
                ax.scatter(1.0, d["floor"], marker="*", s=140, color="black", zorder=3, label="retrain (cost 1)")
            ax.set_xscale("log")
            ax.set_xlim(min(lo, ZERO_COST_X) / 2, 2.0 * max(xs + [1.0]))  # OM's oracles cost more than 1
            ax.set_ylim(bottom=0)
            ax.tick_params(labelbottom=True, labelleft=True, labelsize=8)
            title = "average of the three" if panel == "average" else f"{panel} points"
            ax.set_title(f"{fs}: {title}", fontsize=9)
            ax.set_xlabel("cost / retraining (passes)", fontsize=8)
            ax.set_ylabel("KLOM p99 (nats)", fontsize=8)
            ax.grid(True, which="major", alpha=0.3)
    handles: dict = {}
    for ax in axes.ravel():
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="outside right center", fontsize=8)
    title = f"KLOM p99 against cost (seed Figure 2), K = {metrics['k']} models per side"
    if any(x == 0 for x in xs):
        title += f"; zero-cost methods at x = {ZERO_COST_X:g}"
    fig.suptitle(title, fontsize=11)
    save_figure(fig, path, dpi=100)
    return data


def plot_klom_distributions(per_point: dict, metrics: dict, path) -> dict:
    """Per forget set: box plots of per-point KLOM on the forget points, one box per method and the oracle
    floor; whiskers at the 5th and 95th percentiles (each ends at the last forget point inside them, so the
    right whisker is at most the headline p95). Returns what was drawn: {forget set: {method or "oracle
    floor": {"p5", "q1", "median", "q3", "p95"}}}, whisker ends, box edges and median, boxes top to bottom."""
    colors = method_colors(metrics)
    fig, axes = _figure(len(per_point), panel_size=(5.0, 0.42 * (len(colors) + 2) + 1.4), sharex=True)
    drawn = {}
    for ax, (fs, values) in zip(axes, per_point.items()):
        names = method_order([n for n in values if n != "oracle floor"])
        names += ["oracle floor"] if "oracle floor" in values else []
        data = [values[n] for n in names]
        box = ax.boxplot(data, orientation="horizontal", whis=(5, 95), showfliers=True, patch_artist=True, widths=0.6,
                         flierprops={"markersize": 3, "alpha": 0.5}, medianprops={"color": "black"})
        for patch, name in zip(box["boxes"], names):
            patch.set_facecolor(colors.get(_series(name), (0.8, 0.8, 0.8, 1.0)))
            patch.set_alpha(0.75)
        whiskers = [float(w.get_xdata()[1]) for w in box["whiskers"]]  # each from its box edge outwards
        edges = [float(w.get_xdata()[0]) for w in box["whiskers"]]
        medians = [float(m.get_xdata()[0]) for m in box["medians"]]
        drawn[fs] = {name: {"p5": whiskers[2 * i], "q1": edges[2 * i], "median": medians[i],
                            "q3": edges[2 * i + 1], "p95": whiskers[2 * i + 1]}
                     for i, name in enumerate(names)}
        floor = metrics["forget_sets"][fs]["oracle_floor"]
        ax.set_yticks(range(1, len(names) + 1),
                      [n if n != "oracle floor" else floor_label(floor) for n in names], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("KLOM per forget point (nats)")
        ax.set_title(f"forget set {fs} ({metrics['forget_sets'][fs]['size']} points)", fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"KLOM on the forget points, K = {metrics['k']} models per side (whiskers: 5th-95th pct)",
                 fontsize=11)
    save_figure(fig, path, dpi=110)
    return drawn


def plot_lds_curve(datamodels: dict, path) -> dict:
    """LDS against the number of subset models (LASSO) or checkpoints (TRAK), log2 x axis. Returns what was
    drawn: {datamodel: [[budget, LDS], ...] in budget order} (datamodels without a curve left out)."""
    fig, (ax,) = _figure(1, panel_size=(6.0, 4.0))
    drawn = {}
    unit = {"lasso": "subset models", "trak": "checkpoints"}
    for i, (name, d) in enumerate(datamodels.items()):
        curve = np.asarray(d.get("lds_curve") or [], dtype=float)
        if curve.size == 0:
            continue
        curve = curve[np.argsort(curve[:, 0])]
        (line,) = ax.plot(curve[:, 0], curve[:, 1], marker=MARKERS[i % len(MARKERS)], lw=1.6,
                          label=f"{name.upper()} (x = {unit.get(name, 'models')})")
        drawn[name] = line.get_xydata().tolist()
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
    return drawn


def plot_klom_vs_models(curve: dict, path) -> dict:
    """KLOM's headline (p99 average, with its interval) of the datamodel methods against the number of subset
    models their LASSO datamodels were fit on, a panel per forget set, the oracle floor dashed; returns the drawn
    data {forget set: {series: [[n, value, low, high], ...]}} (low, high NaN without an interval)."""
    fig, axes = _figure(len(curve))
    drawn: dict[str, dict[str, list]] = {}
    for ax, (fs, entry) in zip(axes, curve.items()):
        drawn[fs] = {}
        for i, (method, points) in enumerate(entry["methods"].items()):
            rows = [[p["n_models"], p["p99_avg"], *(p["interval"] or (np.nan, np.nan))] for p in points]
            x, y, lo, hi = np.asarray(rows, dtype=float).T
            ax.errorbar(x, y, yerr=np.abs(np.vstack([y - lo, hi - y])), marker=MARKERS[i % len(MARKERS)],
                        capsize=3, lw=1.6, label=method)
            drawn[fs][method] = rows
        if entry["oracle_floor"] is not None:
            ax.axhline(entry["oracle_floor"], ls="--", color="grey", lw=1.2, label="oracle floor")
            drawn[fs]["oracle floor"] = [[np.nan, entry["oracle_floor"], np.nan, np.nan]]
        ticks = sorted({p["n_models"] for points in entry["methods"].values() for p in points})
        ax.set_xscale("log")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("subset models the LASSO datamodels were fit on (log scale)")
        ax.set_ylabel("KLOM p99 average (lower is better)")
        ax.set_title(f"forget set {fs}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path, dpi=110)
    return drawn


def plot_linear(result: dict, path) -> dict:
    """Relative distance to theta_R vs iteration (log scale), one line per method (geometric mean over seeds),
    shaded between the best and worst seed; the dashed line is the tolerance. Returns what was drawn:
    {"tolerance": float, "methods": {name: {"center", "low", "high"}}}, one value per iteration each (NaN
    where a seed diverged)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    initial = np.array(result["initial_distance"], dtype=float)[:, None]
    drawn = {"tolerance": float(result["tolerance"]), "methods": {}}
    for name, entry in result["methods"].items():
        per_seed = np.array([[np.nan if v is None else v for v in c] for c in entry["per_seed"]], dtype=float)
        rel = np.clip(per_seed / initial, 1e-16, None)  # float64 round-off floor; keeps the log axis finite
        steps = np.arange(rel.shape[1])
        center = np.exp(np.log(rel).mean(axis=0))
        (line,) = ax.plot(steps, center, label=entry["label"], lw=1.6)
        ax.fill_between(steps, rel.min(axis=0), rel.max(axis=0), color=line.get_color(), alpha=0.2, lw=0)
        drawn["methods"][name] = {"center": line.get_ydata().tolist(), "low": rel.min(axis=0).tolist(),
                                  "high": rel.max(axis=0).tolist()}
    ax.axhline(result["tolerance"], color="grey", ls="--", lw=1, label=f"tolerance ({result['tolerance']:g})")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel(r"$\|\theta_t-\theta_R\| \,/\, \|\theta_{full}-\theta_R\|$")
    s = result["settings"]
    ax.set_title(f"Unlearning {s['n_forget']} of {s['n']} points, d = {s['d']}, "
                 f"{len(result['seeds'])} seeds", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)  # a local path, or a run's report/ on an object store
    return drawn
