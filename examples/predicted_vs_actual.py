"""Predicted against actual effects of removing training data, on the subset models held out for LDS.

    python examples/predicted_vs_actual.py runs/demo [--targets test|all] [--method lasso] [--out scatter.png]

Each held-out LDS subset model j (never used to fit the datamodels) was trained without the training points
outside its mask, R_j. For every target t:
  predicted effect = run.predicted_effect(R_j, t): the datamodel's change of the margin when R_j is removed;
  actual effect    = margin of model j on t - mean margin of the run's K full models on t.
Prints the Pearson correlation over all (model, target) pairs and the mean over targets of the Spearman
correlation across models (the LDS of margins: it ignores each target's offset, so it matches the store's
`margin_lds` on these targets, printed beside it), and writes a scatter plot (default:
<RUN>/predicted_vs_actual.png for a local run, else ./predicted_vs_actual.png). It reads, per LDS model, the
weight rows of its removed points on the chosen targets: meant for runs of MNIST-1D size, or few targets.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr


def effects(run, targets: np.ndarray, method: str = "lasso") -> tuple[np.ndarray, np.ndarray]:
    """(predicted, actual) effects, each (n_lds_models, n_targets), as the module docstring defines them."""
    from unlearning.klom import margins

    if not np.asarray(run.models["full/done"][:]).all():
        raise SystemExit("the full models are not all trained: run the models stage first")
    labels = run.labels[targets]
    rows = run.lds_models
    full = margins(np.asarray(run.models["full/logits"].get_orthogonal_selection((slice(None), targets))),
                   labels).mean(0)
    masks = np.asarray(run.subsets["masks"][rows], dtype=bool)
    actual = margins(np.asarray(run.subsets["logits"].get_orthogonal_selection((rows, targets))), labels) - full
    predicted = np.stack([run.predicted_effect(np.flatnonzero(~mask), targets=targets, method=method)
                          for mask in masks])
    return predicted, actual


def mean_spearman(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Mean over targets (columns) of the Spearman correlation across models; constant columns skipped."""
    values = [spearmanr(p, a).statistic for p, a in zip(predicted.T, actual.T)
              if np.ptp(p) > 0 and np.ptp(a) > 0]
    return float(np.mean(values)) if values else float("nan")


def plot(predicted: np.ndarray, actual: np.ndarray, title: str, path: Path) -> np.ndarray:
    """The scatter of actual against predicted effects with the diagonal; returns the drawn points (n, 2)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    points = ax.scatter(predicted.ravel(), actual.ravel(), s=4, alpha=0.3, edgecolor="none")
    lo = float(min(predicted.min(), actual.min()))
    hi = float(max(predicted.max(), actual.max()))
    ax.plot([lo, hi], [lo, hi], color="grey", ls="--", lw=1, label="predicted = actual")
    ax.set_xlabel("predicted effect on the margin (datamodel)")
    ax.set_ylabel("actual effect (LDS model - mean full model)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    return np.asarray(points.get_offsets())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run directory (local path or object-store URL)")
    parser.add_argument("--targets", choices=("test", "all"), default="test",
                        help="the test targets (default) or every target")
    parser.add_argument("--method", default="lasso", help="datamodel store: lasso (default) or trak")
    parser.add_argument("--out", help="PNG path (default: <RUN>/predicted_vs_actual.png for a local run)")
    args = parser.parse_args(argv)

    from attribution.store import is_local
    from pipelines import open_run

    run = open_run(args.run)
    n_targets = run.subsets["logits"].shape[1]
    targets = run.test_targets if args.targets == "test" else np.arange(n_targets)
    predicted, actual = effects(run, targets, args.method)
    r = float(pearsonr(predicted.ravel(), actual.ravel()).statistic)
    rho = mean_spearman(predicted, actual)
    stored = np.asarray(run.datamodels(args.method)["margin_lds"].get_orthogonal_selection((targets,)))
    print(f"{predicted.shape[0]} held-out LDS models x {len(targets)} {args.targets} targets, {args.method} "
          "datamodel, margins")
    print(f"pearson (all pairs): {r:.4f}")
    print(f"spearman (mean over targets): {rho:.4f}")
    print(f"stored margin LDS (mean over the same targets): {float(np.nanmean(stored)):.4f}")
    print(f"mean |predicted|: {np.abs(predicted).mean():.4f}  mean |actual|: {np.abs(actual).mean():.4f}")

    out = Path(args.out) if args.out else (Path(str(run.run_dir)) if is_local(run.run_dir) else Path(".")) / \
        "predicted_vs_actual.png"
    plot(predicted, actual, f"{len(targets)} {args.targets} targets x {predicted.shape[0]} models: pearson {r:.2f}, "
         f"spearman {rho:.2f}", out)
    print(f"plot: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
