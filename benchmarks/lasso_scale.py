"""Memory and time of one LASSO work unit (`LassoDatamodels.fit`) as the number of training points N grows, in
masks form and in Gram form (attribution/lasso.py, `choose_form`).

Synthetic datamodel problem (docs/methods.md §1): Bernoulli(0.5) masks (M, N), each of the targets a sparse
linear function of the masks (EFFECTS planted N(0, 1) weights) + N(0, NOISE²) noise. The unit is the stage's:
a λ path on 90 % of the models, λ chosen per target on the other 10 %, the refit on all M, in float32. Each case
runs in a fresh subprocess, which reports its peak RSS (ru_maxrss: masks, outputs and the fit, the interpreter
and torch included) and its RSS after importing torch (the base), so the unit's own memory is peak − base.
Seconds per target per sweep: time inside the solver over the sweeps summed over targets, wall clock and the
process's CPU time (steadier when other jobs share the cores); setup: the rest of
the fit (masks transposed and block Grams, or the N x N Gram). Recovery: ‖W − W*‖_F / ‖W*‖_F.
The Gram form runs where building its Gram (M·N² multiply-adds, twice: path and refit) takes minutes here.

    .venv/bin/python benchmarks/lasso_scale.py            # N = 2,000 ... 50,000 (about 20 minutes on 2 cores)
    .venv/bin/python benchmarks/lasso_scale.py --quick    # N = 1,000 and 2,000, seconds
    .venv/bin/python benchmarks/lasso_scale.py --json     # the table as JSON on the last line
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from attribution import lasso
from attribution.lasso import LassoDatamodels

from machine import describe  # benchmarks/machine.py: scripts run as files, their folder on sys.path

# (N training points, M models, forms): M = N / 2.5 up to M = 20,000 at N = 50,000, so 2·M < N and `choose_form`
# picks the masks form everywhere; the Gram form is run for comparison where its Gram takes minutes to build.
CASES = [(2_000, 800, ("masks", "gram")), (8_000, 3_200, ("masks", "gram")), (32_000, 12_800, ("masks",)),
         (50_000, 20_000, ("masks",))]
QUICK = [(1_000, 400, ("masks", "gram")), (2_000, 800, ("masks", "gram"))]
TARGETS = 8  # outputs fit at once
EFFECTS = 10  # nonzero planted weights per target
NOISE = 1.0  # standard deviation of the output noise
PATH = {"n_lambdas": 4, "lambda_ratio": 0.05, "patience": 1, "tol": 1e-3, "max_iter": 100, "dtype": "float32"}


def planted(n_train: int, n_models: int, seed: int = 0):
    """Masks (M, N) bool, outputs (M, t) float32, planted weights (N, t)."""
    rng = np.random.default_rng(seed)
    masks = np.empty((n_models, n_train), bool)
    for start in range(0, n_models, 1024):  # uint8 draws viewed as bool: never a float copy of the masks
        stop = min(start + 1024, n_models)
        masks[start:stop] = rng.integers(0, 2, size=(stop - start, n_train), dtype=np.uint8).view(bool)
    weights = np.zeros((n_train, TARGETS))
    outputs = NOISE * rng.normal(size=(n_models, TARGETS)) + rng.normal(size=TARGETS)
    for j in range(TARGETS):
        support = rng.choice(n_train, EFFECTS, replace=False)
        weights[support, j] = rng.normal(size=EFFECTS)
        outputs[:, j] += masks[:, support].astype(np.float64) @ weights[support, j]
    return masks, outputs.astype(np.float32), weights


def run_case(n_train: int, n_models: int, form: str) -> dict:
    """One unit in this process: its peak RSS, timings and recovery error."""
    base = psutil.Process().memory_info().rss
    masks, outputs, weights = planted(n_train, n_models)
    n_fit = int(0.9 * n_models)
    solver = {"s": 0.0, "cpu_s": 0.0, "sweeps": 0}
    solve = lasso._solve

    def timed_solve(*args, **kwargs):
        start, cpu = time.perf_counter(), time.process_time()
        out = solve(*args, **kwargs)
        solver["s"] += time.perf_counter() - start
        solver["cpu_s"] += time.process_time() - cpu
        solver["sweeps"] += int(out[2].sum())
        return out

    lasso._solve = timed_solve
    start = time.perf_counter()
    dm = LassoDatamodels(**PATH, form=form).fit(masks[:n_fit], outputs[:n_fit], masks[n_fit:], outputs[n_fit:])
    total = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    error = float(np.linalg.norm(dm.coef_ - weights) / np.linalg.norm(weights))
    return {"N": n_train, "M": n_models, "form": dm.form_, "peak_gb": peak / 1e9, "base_gb": base / 1e9,
            "unit_gb": (peak - base) / 1e9, "fit_s": total, "setup_s": total - solver["s"],
            "sweeps_per_target": solver["sweeps"] / TARGETS,
            "s_per_target_sweep": solver["s"] / max(solver["sweeps"], 1),
            "cpu_s_per_target_sweep": solver["cpu_s"] / max(solver["sweeps"], 1), "recovery_error": error,
            "chosen_lambda_index": dm.lambda_index_.tolist()}


def slope(rows: list[dict], key: str) -> float:
    """Least-squares slope of log(key) against log N."""
    if len(rows) < 2:
        return float("nan")
    return float(np.polyfit(np.log([r["N"] for r in rows]), np.log([r[key] for r in rows]), 1)[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 1,000 and 2,000 only")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON line at the end")
    parser.add_argument("--case", nargs=3, metavar=("N", "M", "FORM"), help=argparse.SUPPRESS)  # a subprocess
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.case:
        print(json.dumps(run_case(int(args.case[0]), int(args.case[1]), args.case[2])))
        return
    print(f"# lasso_scale: {describe()} ({torch.get_num_threads()} threads), "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB memory")
    print(f"# unit: LassoDatamodels.fit, {TARGETS} targets with {EFFECTS} planted effects each, noise {NOISE}, "
          f"90 % / 10 % fit / validation models, {PATH}")
    print(f"{'N':>7} {'M':>7} {'form':>6} {'peak GB':>8} {'unit GB':>8} {'setup s':>8} {'sweeps':>7} "
          f"{'s/target/sweep':>15} {'CPU s/t/sweep':>14} {'recovery':>9}")
    rows = []
    for n_train, n_models, forms in (QUICK if args.quick else CASES):
        for form in forms:
            done = subprocess.run([sys.executable, str(Path(__file__)), "--case", str(n_train), str(n_models), form],
                                  capture_output=True, text=True, check=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"{r['N']:>7,} {r['M']:>7,} {r['form']:>6} {r['peak_gb']:>8.2f} {r['unit_gb']:>8.2f} "
                  f"{r['setup_s']:>8.1f} {r['sweeps_per_target']:>7.1f} {r['s_per_target_sweep']:>15.4f} "
                  f"{r['cpu_s_per_target_sweep']:>14.4f} {r['recovery_error']:>9.3f}", flush=True)
    exponents = {}
    for form in ("masks", "gram"):
        own = [r for r in rows if r["form"] == form]
        exponents[form] = {k: slope(own, k) for k in ("unit_gb", "s_per_target_sweep", "cpu_s_per_target_sweep",
                                                      "setup_s")}
        e = exponents[form]
        print(f"growth exponents in N ({form} form, M = N/2.5): unit memory N^{e['unit_gb']:.2f}, "
              f"s/target/sweep N^{e['s_per_target_sweep']:.2f} (CPU N^{e['cpu_s_per_target_sweep']:.2f}), "
              f"setup N^{e['setup_s']:.2f}")
    if args.json:
        print(json.dumps({"machine": describe(), "path": PATH, "rows": rows, "exponents": exponents}))


if __name__ == "__main__":
    main()
