"""Speed of the batched LASSO datamodel fit against a loop of scikit-learn `Lasso` over the same λ paths.

Synthetic datamodel problem (docs/methods.md §1): Bernoulli(0.5) masks, outputs = sparse linear effects of
the masks + noise. Both sides do the same work per target: the whole λ path (warm starts) on the fitting
models, the choice of λ by validation MSE, the refit at that λ on fitting + validation models, at
scikit-learn's default tolerance (tol=1e-4). scikit-learn is timed on a random sample of targets and
extrapolated per target. Two loops:
  - `Lasso(precompute=True, warm_start=True)`, the usual call, which recomputes the Gram matrix at every fit;
  - the same with the centred Gram matrix passed in (`precompute=G`, computed once and its time added once):
    the strongest per-target loop scikit-learn offers.
Exactness: relative objective gap of the final weights (refit problem, chosen λ) on the sampled targets.

    .venv/bin/python benchmarks/lasso_speed.py            # 4,000 + 500 models x 2,000 points x 1,000 targets
    .venv/bin/python benchmarks/lasso_speed.py --quick    # a small problem, seconds
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import sklearn
import torch
from sklearn.linear_model import Lasso

from attribution.lasso import LassoDatamodels

from machine import describe  # benchmarks/machine.py: scripts run as files, their folder on sys.path


def make_problem(n_models: int, n_train: int, n_targets: int, n_effects: int, noise: float, seed: int):
    """Masks (n_models, n_train) bool, outputs (n_models, n_targets) with n_effects nonzero effects each."""
    rng = np.random.default_rng(seed)
    masks = rng.random((n_models, n_train)) < 0.5
    effects = np.zeros((n_train, n_targets))
    for j in range(n_targets):
        effects[rng.choice(n_train, n_effects, replace=False), j] = rng.normal(scale=0.1, size=n_effects)
    outputs = masks @ effects + rng.normal(size=n_targets) + noise * rng.normal(size=(n_models, n_targets))
    return masks, outputs


def objective(X, y, w, b, lam):
    r = y - X @ w - b
    return 0.5 * np.mean(r * r) + lam * np.abs(w).sum()


def sklearn_plain(X, y, X_val, y_val, X_all, y_all, lambdas, tol):
    """One target, the usual way: path with warm starts, choice by validation MSE, refit on all models.
    Returns (chosen index, coef, intercept)."""
    model = Lasso(precompute=True, warm_start=True, tol=tol)
    val_mse = []
    for lam in lambdas:
        model.set_params(alpha=lam).fit(X, y)
        val_mse.append(np.mean((y_val - X_val @ model.coef_ - model.intercept_) ** 2))
    best = int(np.argmin(val_mse))
    final = Lasso(alpha=lambdas[best], precompute=True, tol=tol).fit(X_all, y_all)
    return best, final.coef_, final.intercept_


def sklearn_gram(centred, y, X_val, y_val, centred_all, y_all, lambdas, tol):
    """The same with precomputed Gram matrices: `centred` = (Xc, x_mean, XcᵀXc) of the fitting models,
    `centred_all` the same for all models; the intercept is restored from the means."""
    Xc, x_mean, gram = centred
    model = Lasso(precompute=gram, warm_start=True, fit_intercept=False, tol=tol)
    val_mse = []
    for lam in lambdas:
        model.set_params(alpha=lam).fit(Xc, y - y.mean())
        b = y.mean() - x_mean @ model.coef_
        val_mse.append(np.mean((y_val - X_val @ model.coef_ - b) ** 2))
    best = int(np.argmin(val_mse))
    Xc_all, x_mean_all, gram_all = centred_all
    final = Lasso(alpha=lambdas[best], precompute=gram_all, warm_start=True, fit_intercept=False, tol=tol)
    final.coef_ = model.coef_.copy()  # warm start from the chosen path solution, as the batched fit does
    final.fit(Xc_all, y_all - y_all.mean())
    return best, final.coef_, y_all.mean() - x_mean_all @ final.coef_


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small problem (600 + 100 models x 300 x 60)")
    parser.add_argument("--models", type=int, default=4000, help="fitting models")
    parser.add_argument("--val-models", type=int, default=500, help="validation models (choice of λ)")
    parser.add_argument("--train", type=int, default=2000, help="training points = features")
    parser.add_argument("--targets", type=int, default=1000)
    parser.add_argument("--sample", type=int, default=20, help="targets timed with scikit-learn")
    parser.add_argument("--n-lambdas", type=int, default=12)
    parser.add_argument("--lambda-ratio", type=float, default=1e-3)
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.models, args.val_models, args.train, args.targets, args.sample = 600, 100, 300, 60, 5
    tol = 1e-4  # scikit-learn's default duality-gap tolerance, on both sides

    print(f"# lasso_speed: {describe()} "
          f"({torch.get_num_threads()} threads), scikit-learn {sklearn.__version__}, numpy {np.__version__}, "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"# problem: {args.models} fitting + {args.val_models} validation models x {args.train} training "
          f"points x {args.targets} targets; {args.n_lambdas} λ from λ_max to {args.lambda_ratio:g}·λ_max; "
          f"tol {tol:g}; batched dtype {args.dtype}")
    masks, outputs = make_problem(args.models + args.val_models, args.train, args.targets, n_effects=50,
                                  noise=0.5, seed=args.seed)
    X, Y = masks[:args.models], outputs[:args.models]
    X_val, Y_val = masks[args.models:], outputs[args.models:]

    def batched_fit(patience):
        start = time.perf_counter()
        dm = LassoDatamodels(n_lambdas=args.n_lambdas, lambda_ratio=args.lambda_ratio, patience=patience,
                             tol=tol, dtype=args.dtype).fit(X, Y, X_val, Y_val)
        return dm, time.perf_counter() - start

    dm, batched = batched_fit(None)
    dm_stop, batched_stop = batched_fit(3)

    rng = np.random.default_rng(args.seed + 1)
    sample = np.sort(rng.choice(args.targets, size=min(args.sample, args.targets), replace=False))
    Xf, Xv = X.astype(np.float64), X_val.astype(np.float64)
    X_all, Y_all = np.concatenate([Xf, Xv]), np.concatenate([Y, Y_val])

    start = time.perf_counter()
    plain = [sklearn_plain(Xf, Y[:, j], Xv, Y_val[:, j], X_all, Y_all[:, j], dm.path_lambdas_[:, j], tol)
             for j in sample]
    sk_plain = (time.perf_counter() - start) / len(sample)

    start = time.perf_counter()  # the two centred Gram matrices, once for all targets
    centred = []
    for A in (Xf, X_all):
        Ac = A - A.mean(0)
        centred.append((Ac, A.mean(0), Ac.T @ Ac))
    gram_once = time.perf_counter() - start
    start = time.perf_counter()
    pre = [sklearn_gram(centred[0], Y[:, j], Xv, Y_val[:, j], centred[1], Y_all[:, j], dm.path_lambdas_[:, j],
                        tol) for j in sample]
    sk_gram = (time.perf_counter() - start) / len(sample)

    gaps, agree = [], 0
    for (best, coef, b), j in zip(plain + pre, np.concatenate([sample, sample])):
        lam = dm.path_lambdas_[best, j]
        agree += best == dm.lambda_index_[j]
        ref = objective(X_all, Y_all[:, j], coef, b, lam)
        ours = objective(X_all, Y_all[:, j], dm.coef_[:, j].astype(np.float64), float(dm.intercept_[j]), lam)
        gaps.append((ours - ref) / ref)
    gaps = np.array(gaps)

    full_plain = sk_plain * args.targets
    full_gram = sk_gram * args.targets + gram_once
    same = np.mean(dm_stop.lambda_index_ == dm.lambda_index_)
    print(f"batched LassoDatamodels, whole path (patience=None): {batched:8.1f} s for {args.targets} targets")
    print(f"batched LassoDatamodels, early stop (patience=3):    {batched_stop:8.1f} s "
          f"(same λ as the whole path for {same:.1%} of targets)")
    print(f"sklearn Lasso(precompute=True, warm_start=True):     {sk_plain:8.3f} s/target x {args.targets} = "
          f"{full_plain:.1f} s (timed on {len(sample)} random targets, extrapolated)")
    print(f"sklearn Lasso(precompute=Gram, warm_start=True):     {sk_gram:8.3f} s/target x {args.targets} "
          f"+ {gram_once:.1f} s Gram = {full_gram:.1f} s (same targets, extrapolated)")
    print(f"ratio vs Lasso(precompute=True): {full_plain / batched:6.1f}x whole path, "
          f"{full_plain / batched_stop:.1f}x with early stopping")
    print(f"ratio vs Lasso(precompute=Gram): {full_gram / batched:6.1f}x whole path, "
          f"{full_gram / batched_stop:.1f}x with early stopping")
    print(f"exactness on the sampled targets: chosen λ equal in {agree}/{len(gaps)} scikit-learn fits; "
          f"relative objective gap (batched − sklearn)/sklearn: max {gaps.max():.2e}, min {gaps.min():.2e}")


if __name__ == "__main__":
    main()
