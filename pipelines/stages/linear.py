"""The seed paper's linear-model experiment (datamodel-matching-paper.txt §2.1, Figure 3; docs/methods.md §3):
how fast gradient methods and Oracle Matching move a ridge model from the full-data optimum to the retrained
one. Self-contained (numpy, matplotlib); `dmu linear` runs `main`: a table or JSON, and the figure.

Setting (seed Figure 3): n = 100 points x ~ N(0, I_400), labels y = x^T theta* + noise, fit by l2-regularised
least squares  L(theta) = (1/n) sum_i (x_i^T theta - y_i)^2 + lambda ||theta||^2;  unlearn 5 random points.
The seed gives no lambda, noise level, step size or budget; ours: theta* ~ N(0, I/d) so the signal x^T theta*
has unit variance, noise sd 0.5, lambda = 2e-2, one constant step size eta = 1/L (L bounds the curvature of
all four objectives) for every method, 3,000 iterations, "reached" = ||theta_t - theta_R|| <= 1% of
||theta_full - theta_R||.

Why Oracle Matching (OM) is fast here (and why the others are not). Ridge optima are combinations of the data
rows, so theta_full and theta_R = argmin of the retain loss both lie in the row span of X (100 of 400
dimensions), and so does their difference. Most of that difference lies along the forget points' own
directions, the part of span(X) orthogonal to the retain rows: what the model memorised from the forget
points.
- OM on all points minimises (1/n) ||X theta - X theta_R||^2, the squared error to the oracle's outputs (seed
  §2.1, "(i) ... relative to the optimal model predictions, (ii) ... both the forget set and the retain
  set"). On span(X) its curvature is (2/n) X X^T, whose eigenvalues lie in about [2, 18] (Marchenko-Pastur,
  d/n = 4): condition number about 9, error x (1 - 1/9) per step, so ~30 iterations to 1%. The outputs on the
  forget points are what pin the memorised directions; its optimum over span(X) is exactly theta_R.
- GD on the retain loss sees the memorised directions only through the weight decay 2 lambda theta: error x
  (1 - 2 eta lambda) per step there, about ln(100) / (2 eta lambda) = 2,100 iterations at lambda = 2e-2.
- OM on retain points only is flat in the memorised directions and has no weight decay: it only fixes the
  small part of the difference inside the retain rows' span; 99.999% of the distance remains (the seed's
  "negligible progress").
- GD + GA adds -beta * grad(forget loss): curvature -2 beta x_f x_f^T / n_f along the memorised directions,
  which beats 2 lambda for any beta > lambda n_f / |x_f|^2 (about 3e-4 here), so after a first approach it
  diverges; below that it behaves like GD with a displaced optimum. With beta = 1e-3 (a "tiny" ascent rate,
  docs/methods.md §6) it gets no closer than 6-16% (5 seeds). A scan on 5 seeds: beta 1e-4 -> closest 1.2-3.9%,
  1e-2 -> 18-32%, 5e-2 overflows; beta <= 1e-5 is GD in all but name.
Measured (`dmu linear`, 5 seeds, defaults): OM reaches 1% in 25-30 iterations, GD in 2,040-2,160 (about 75x
more), OM-retain and GD + GA never do.

The OM objectives match outputs only, by default. With the ridge term (`om_l2=True`, `--om-l2`) the OM optimum moves to
(X^T X/n + lambda I)^-1 X^T X theta_R / n, 1.5-5.5% of the initial distance away from theta_R at
lambda = 2e-2 (so it never reaches 1%), and OM-retain becomes GD on the retain loss up to a constant
2 lambda theta_R in the gradient (theta_R solves the retain ridge problem), which hides the seed's
distinction between the two.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass

import numpy as np

# name -> legend label, in plotting order (seed Figure 3's four methods).
METHODS = {
    "gd": "GD (retain)",
    "gd_ga": "GD (retain) + GA (forget)",
    "om": "OM (all points)",
    "om_retain": "OM (retain points only)",
}
# A method whose distance grows past this many times the initial distance has diverged; it is stopped there
# (its remaining curve is None) instead of overflowing.
DIVERGED = 1e12


@dataclass(frozen=True)
class LinearSettings:
    n: int = 100  # training points (seed Figure 3)
    d: int = 400  # input dimension (seed Figure 3)
    n_forget: int = 5  # random forget-set size (seed Figure 3)
    iters: int = 3000  # iteration budget, the same for every method
    l2: float = 2e-2  # lambda in (1/n) sum (x^T theta - y)^2 + lambda ||theta||^2; sets GD's rate (see above)
    noise: float = 0.5  # label-noise standard deviation; the signal x^T theta* has unit variance
    ascent_weight: float = 1e-3  # beta: GD + GA steps along -(grad retain loss - beta grad forget loss)
    tolerance: float = 1e-2  # "reached": ||theta_t - theta_R|| <= tolerance * ||theta_full - theta_R||
    om_l2: bool = False  # add lambda ||theta||^2 to the OM objectives (module doc: biases their optimum)

    def validate(self) -> None:
        if not 0 < self.n_forget < self.n:
            raise ValueError(f"n_forget must be in (0, n) = (0, {self.n}), got {self.n_forget}")
        if self.d < 1 or self.iters < 1:
            raise ValueError(f"d and iters must be positive, got d={self.d}, iters={self.iters}")
        if self.l2 <= 0:
            raise ValueError(f"l2 (lambda) must be positive for the ridge optima to be unique, got {self.l2}")
        if self.noise < 0 or self.ascent_weight < 0:
            raise ValueError(f"noise and ascent_weight must be >= 0, got {self.noise}, {self.ascent_weight}")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"tolerance is relative to the initial distance, in (0, 1): {self.tolerance}")


def make_problem(settings: LinearSettings, seed: int) -> dict[str, np.ndarray]:
    """Data, labels and a random forget set for one seed: X (n, d), y (n,), forget (n_forget,), retain."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((settings.n, settings.d))
    theta_star = rng.standard_normal(settings.d) / math.sqrt(settings.d)
    y = x @ theta_star + settings.noise * rng.standard_normal(settings.n)
    forget = np.sort(rng.choice(settings.n, settings.n_forget, replace=False))
    retain = np.setdiff1d(np.arange(settings.n), forget)
    return {"x": x, "y": y, "forget": forget, "retain": retain}


def ridge_optimum(x: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
    """argmin_theta (1/m) ||x theta - y||^2 + l2 ||theta||^2, m = len(y).

    = (x^T x/m + l2 I)^-1 x^T y/m = x^T (x x^T + m l2 I)^-1 y: the last form (push-through identity) solves an
    m x m system (m < d here) and shows the optimum lies in the row span of x.
    """
    m = y.shape[0]
    return x.T @ np.linalg.solve(x @ x.T + m * l2 * np.eye(m), y)


def method_gradients(problem: dict, theta_retrain: np.ndarray, settings: LinearSettings) -> dict:
    """name -> gradient function of the objective each method descends (seed §2.1, Figure 3's methods)."""
    x, y, f, r = problem["x"], problem["y"], problem["forget"], problem["retain"]
    xr, yr, xf, yf = x[r], y[r], x[f], y[f]
    oracle_outputs = x @ theta_retrain  # what OM matches: the retrained model's outputs on every point
    lam, beta = settings.l2, settings.ascent_weight
    om_lam = lam if settings.om_l2 else 0.0
    n, nr, nf = x.shape[0], len(r), len(f)

    def gd(t):  # retain loss: (1/n_r) sum_R (x^T t - y)^2 + lam ||t||^2
        return 2 * xr.T @ (xr @ t - yr) / nr + 2 * lam * t

    def gd_ga(t):  # ... minus beta times the forget loss (1/n_f) sum_F (x^T t - y)^2
        return gd(t) - beta * 2 * xf.T @ (xf @ t - yf) / nf

    def om(t):  # (1/n) sum_all (x^T t - x^T theta_R)^2 [+ lam ||t||^2 if om_l2]
        return 2 * x.T @ (x @ t - oracle_outputs) / n + 2 * om_lam * t

    def om_retain(t):  # the same over the retain points only
        return 2 * xr.T @ (xr @ t - oracle_outputs[r]) / nr + 2 * om_lam * t

    return {"gd": gd, "gd_ga": gd_ga, "om": om, "om_retain": om_retain}


def step_size(problem: dict, settings: LinearSettings) -> float:
    """One constant step 1/L for every method, L = an upper bound on the curvature of all four objectives.

    Each Hessian is 2 (x_S^T x_S / m_S) + 2 c I, whose top eigenvalue is that of the small Gram x_S x_S^T;
    for GD + GA, Weyl's inequality bounds |curvature| by the larger of the descent part and the ascent part.
    """
    x, f, r = problem["x"], problem["forget"], problem["retain"]
    lam, beta = settings.l2, settings.ascent_weight

    def top(rows):  # largest eigenvalue of x_S^T x_S / m_S, from the m_S x m_S Gram
        return np.linalg.eigvalsh(rows @ rows.T).max() / rows.shape[0]

    retain_curv = 2 * top(x[r]) + 2 * lam
    curvatures = [retain_curv, 2 * top(x) + 2 * lam, 2 * beta * top(x[f]) - 2 * lam]
    return 1.0 / max(curvatures)


def _descend(grad, theta0: np.ndarray, target: np.ndarray, eta: float, iters: int) -> np.ndarray:
    """||theta_t - target||, t = 0..iters, of theta_{t+1} = theta_t - eta grad(theta_t); NaN once diverged."""
    dist = np.full(iters + 1, np.nan)
    theta = theta0.copy()
    dist[0] = np.linalg.norm(theta - target)
    for t in range(1, iters + 1):
        theta = theta - eta * grad(theta)
        dist[t] = np.linalg.norm(theta - target)
        if not dist[t] <= DIVERGED * dist[0]:  # also catches NaN / inf
            dist[t] = np.nan
            break
    return dist


def _first_reach(dist: np.ndarray, level: float) -> int | None:
    hits = np.flatnonzero(dist <= level)
    return int(hits[0]) if hits.size else None


def _curve(values: np.ndarray) -> list:
    """JSON-ready list: 6 significant digits (keeps --json output small), NaN -> None."""
    return [None if not np.isfinite(v) else float(f"{v:.6g}") for v in values]


def linear_experiment(n: int = 100, d: int = 400, n_forget: int = 5, iters: int = 3000,
                      seeds=(0, 1, 2, 3, 4), l2: float = 2e-2, noise: float = 0.5,
                      ascent_weight: float = 1e-3, tolerance: float = 1e-2, om_l2: bool = False) -> dict:
    """Run the four methods from theta_full on each seed; return JSON-serialisable results.

    Returns {"settings", "seeds", "tolerance", "tolerance_kind", "step_size" (per seed), "initial_distance"
    (||theta_full - theta_R|| per seed), "methods": name -> {"label", "mean" (mean over seeds of
    ||theta_t - theta_R||, t = 0..iters), "per_seed" (one such curve per seed), "iters_to_tol" (per seed; None
    if never reached), "min_relative" (per seed, min_t ||theta_t - theta_R|| / ||theta_full - theta_R||)}}.
    """
    settings = LinearSettings(n=n, d=d, n_forget=n_forget, iters=iters, l2=l2, noise=noise,
                              ascent_weight=ascent_weight, tolerance=tolerance, om_l2=om_l2)
    settings.validate()
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    curves = {name: [] for name in METHODS}
    step_sizes, initial = [], []
    for seed in seeds:
        problem = make_problem(settings, seed)
        x, y = problem["x"], problem["y"]
        theta_full = ridge_optimum(x, y, l2)
        theta_retrain = ridge_optimum(x[problem["retain"]], y[problem["retain"]], l2)
        # The same constant step for all methods, so none is unstable or slow for step-size reasons alone.
        eta = step_size(problem, settings)
        step_sizes.append(eta)
        initial.append(float(np.linalg.norm(theta_full - theta_retrain)))
        for name, grad in method_gradients(problem, theta_retrain, settings).items():
            curves[name].append(_descend(grad, theta_full, theta_retrain, eta, iters))
    initial_arr = np.array(initial)
    methods = {}
    for name, label in METHODS.items():
        per_seed = np.stack(curves[name])
        relative = per_seed / initial_arr[:, None]
        methods[name] = {
            "label": label,
            "mean": _curve(per_seed.mean(axis=0)),
            "per_seed": [_curve(c) for c in per_seed],
            "iters_to_tol": [_first_reach(c, tolerance) for c in relative],
            "min_relative": [float(f"{np.nanmin(c):.6g}") for c in relative],
        }
    return {
        "settings": asdict(settings),
        "seeds": seeds,
        "tolerance": tolerance,
        "tolerance_kind": "relative: ||theta_t - theta_R|| <= tolerance * ||theta_full - theta_R||",
        "step_size": [float(f"{e:.6g}") for e in step_sizes],
        "initial_distance": [float(f"{v:.6g}") for v in initial],
        "methods": methods,
    }


def _table(result: dict) -> str:
    lines = [f"{'method':28s} {'iterations to tolerance (per seed)':36s} {'final':>9s} {'closest':>9s}"]
    for entry in result["methods"].values():
        reach = ", ".join("never" if v is None else str(v) for v in entry["iters_to_tol"])
        finals = [c[-1] for c in entry["per_seed"]]
        final = ("diverged" if any(v is None for v in finals)
                 else f"{np.median(np.array(finals) / np.array(result['initial_distance'])):.2e}")
        lines.append(f"{entry['label']:28s} {reach:36s} {final:>9s} {np.median(entry['min_relative']):9.2e}")
    lines.append(f"(distances relative to ||theta_full - theta_R||, median over seeds; tolerance "
                 f"{result['tolerance']:g})")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="dmu linear",
        description="Seed Figure 3: distance to the retrained optimum of GD, GD + GA, OM and OM-retain on a "
                    "ridge model (pipelines/stages/linear.py explains the settings).")
    defaults = LinearSettings()
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--out", metavar="PNG", help="save the figure here")
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (0..N-1)")
    parser.add_argument("--iters", type=int, default=defaults.iters, help="iteration budget per method")
    parser.add_argument("--l2", type=float, default=defaults.l2, help="ridge lambda")
    parser.add_argument("--ascent-weight", type=float, default=defaults.ascent_weight, help="GA weight beta")
    parser.add_argument("--tolerance", type=float, default=defaults.tolerance, help="relative tolerance")
    parser.add_argument("--om-l2", action="store_true", help="add lambda ||theta||^2 to the OM objectives")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    result = linear_experiment(iters=args.iters, seeds=tuple(range(args.seeds)), l2=args.l2,
                               ascent_weight=args.ascent_weight, tolerance=args.tolerance, om_l2=args.om_l2)
    if args.out:
        from pipelines.report.plots import plot_linear

        plot_linear(result, args.out)
    if args.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(_table(result))
        if args.out:
            print(f"figure: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
