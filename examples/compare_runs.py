"""Compare unlearning methods across two runs from their reports' metrics.json (e.g. two configs, two seeds, float32
against float16 stores).

    python examples/compare_runs.py runs/demo runs/demo16 [--stat p95] [--points forget]

For every forget set that both runs report, one row per method found in both: KLOM (the chosen statistic over the
chosen point set: forget, retain or validation) in run A, in run B, and B - A; the oracle floor's first. A forget
set with the same name may hold other points in the two runs (the PC sets depend on the datamodels): the script
says when their sizes differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def rows(metrics_a: dict, metrics_b: dict, stat: str, points: str) -> list[tuple[str, str, float, float]]:
    """(forget set, method, value in A, value in B) for every forget set and method reported by both."""
    out = []
    sets_a, sets_b = metrics_a["forget_sets"], metrics_b["forget_sets"]
    for fs in (name for name in sets_a if name in sets_b):
        a, b = sets_a[fs], sets_b[fs]
        if "klom" in a["oracle_floor"] and "klom" in b["oracle_floor"]:
            out.append((fs, "oracle floor", a["oracle_floor"]["klom"][points][stat],
                        b["oracle_floor"]["klom"][points][stat]))
        for method in (m for m in a["methods"] if m in b["methods"]):
            out.append((fs, method, a["methods"][method]["klom"][points][stat],
                        b["methods"][method]["klom"][points][stat]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", help="run directory A (local path or object-store URL)")
    parser.add_argument("run_b", help="run directory B")
    parser.add_argument("--stat", choices=("p95", "p99", "mean"), default="p95", help="KLOM statistic (p95)")
    parser.add_argument("--points", choices=("forget", "retain", "validation"), default="forget",
                        help="the points KLOM is summarised over (forget)")
    args = parser.parse_args(argv)

    from pipelines import open_run

    runs = [open_run(r) for r in (args.run_a, args.run_b)]
    metrics = [r.metrics for r in runs]
    for path, m in zip((args.run_a, args.run_b), metrics):
        if m is None:
            print(f"{path} has no report yet: run `dmu report {path}` first", file=sys.stderr)
            return 2
    for fs in (n for n in metrics[0]["forget_sets"] if n in metrics[1]["forget_sets"]):
        sizes = [m["forget_sets"][fs]["size"] for m in metrics]
        if sizes[0] != sizes[1]:
            print(f"note: forget set {fs} has {sizes[0]} points in A and {sizes[1]} in B")
    print(f"KLOM {args.stat} on {args.points} points   A = {args.run_a}   B = {args.run_b}")
    print(f"{'forget set':<14} {'method':<18} {'A':>8} {'B':>8} {'B - A':>8}")
    for fs, method, a, b in rows(*metrics, args.stat, args.points):
        print(f"{fs:<14} {method:<18} {a:8.3f} {b:8.3f} {b - a:+8.3f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
