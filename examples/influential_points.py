"""The most influential training points for one target of a finished run, by its datamodel weights.

    python examples/influential_points.py runs/demo --target 1100 [--k 10] [--output margin|logits]
        [--method lasso] [--out influential.png]

Prints one line per training point, largest |weight| first: rank, training index, label, weight. A weight is the
datamodel's predicted change of the target's output (its margin, by default) when that point is included;
removing the point moves the output by minus the weight. Writes a PNG (default: <RUN>/influential_<T>.png for a
local run, else ./influential_<T>.png): the weights as bars and, for image or sequence inputs, the target and
the points themselves. Run it from the repository root when the run's task is an import path such as
examples.digits_task:make_task.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def as_image(x: np.ndarray) -> np.ndarray | None:
    """An input as something imshow draws: (H, W) or (H, W, 3) scaled to [0, 1]; None for sequences."""
    x = np.squeeze(x)
    if x.ndim == 3 and x.shape[0] == 3:
        x = x.transpose(1, 2, 0)
    elif x.ndim != 2:
        return None
    return (x - x.min()) / max(float(x.max() - x.min()), 1e-12)  # normalised inputs (CIFAR-10) to [0, 1]


def plot(run, target: int, idx: np.ndarray, weights: np.ndarray, output: str, path: Path) -> dict:
    """The bar chart of the weights above the target and its most influential points; returns what was drawn:
    {"points": the bars' training indices, "weights": their heights}."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x, labels = run.data.x_targets.numpy(), run.labels
    shown = [target, *idx.tolist()]
    fig = Figure(figsize=(max(8.0, 1.0 * len(shown)), 5.5), layout="constrained")
    FigureCanvasAgg(fig)  # no pyplot: no global state, no display needed
    grid = fig.add_gridspec(2, len(shown), height_ratios=[1.4, 1])
    bars = fig.add_subplot(grid[0, :])
    drawn = bars.bar(range(len(idx)), weights, color=["tab:blue" if w > 0 else "tab:red" for w in weights])
    bars.set_xticks(range(len(idx)), [f"#{i}\ny={labels[i]}" for i in idx], fontsize=7)
    bars.axhline(0, color="black", lw=0.6)
    bars.set_ylabel(f"weight on the target's {output}")
    bars.set_title(f"Most influential training points for target {target} (label {labels[target]}); "
                   "blue raises it, red lowers it", fontsize=10)
    if as_image(x[target]) is not None:
        for col, j in enumerate(shown):
            ax = fig.add_subplot(grid[1, col])
            image = as_image(x[j])
            ax.imshow(image, cmap="gray_r" if image.ndim == 2 else None)
            ax.set_title("target" if j == target else f"#{j}", fontsize=7)
            ax.set_axis_off()
    else:  # sequences (MNIST-1D): the target and the three most influential points
        ax = fig.add_subplot(grid[1, :])
        for j in shown[:4]:
            ax.plot(np.ravel(x[j]), lw=2.0 if j == target else 1.0,
                    label="target" if j == target else f"#{j} (y={labels[j]})")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)
    return {"points": [int(i) for i in idx], "weights": [float(bar.get_height()) for bar in drawn]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run directory (local path or object-store URL)")
    parser.add_argument("--target", type=int, required=True, help="target index (0..N-1 train, then test)")
    parser.add_argument("--k", type=int, default=10, help="how many training points (default 10)")
    parser.add_argument("--output", choices=("margin", "logits"), default="margin",
                        help="margin (default) or the logit of the target's label")
    parser.add_argument("--method", default="lasso", help="datamodel store: lasso (default) or trak")
    parser.add_argument("--out", help="PNG path (default: <RUN>/influential_<T>.png for a local run)")
    args = parser.parse_args(argv)

    from attribution.store import is_local
    from pipelines import open_run

    run = open_run(args.run)
    idx, weights = run.most_influential(args.target, k=args.k, output=args.output, method=args.method)
    labels = run.labels
    print(f"target {args.target} (label {labels[args.target]}): {args.k} most influential training points "
          f"on its {args.output}, {args.method} datamodel")
    print(f"{'rank':>4} {'index':>6} {'label':>5} {'weight':>12}")
    for rank, (i, w) in enumerate(zip(idx, weights), 1):
        print(f"{rank:>4} {i:>6} {labels[i]:>5} {w:>12.6f}")
    out = Path(args.out) if args.out else (Path(str(run.run_dir)) if is_local(run.run_dir) else Path(".")) / \
        f"influential_{args.target}.png"
    plot(run, args.target, idx, weights, args.output, out)
    print(f"plot: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
