"""Ray scaling of the subsets stage: the same subset models with 1 and 2 workers, and the per-unit overhead
(scheduling, shipping the unit's inputs, returning its logits, the driver's write) against the unit's compute.

    .venv/bin/python benchmarks/ray_scaling.py [--models 64] [--block 8] [--json]

Each worker count runs in a fresh process with its own local Ray instance (`executor.num_cpus` = workers, one CPU
per unit); the stage's wall clock excludes Ray's start. A unit's compute is what it measures itself
(`Executor.unit_stats`, inside the worker); overhead per unit = (wall x workers - sum of compute) / units, so it is
what the driver and Ray add around the training (workers are started and have imported torch before the clock).
Both runs must store the same logits bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attribution.store import open_group  # noqa: E402
from pipelines.config import ExecutorConfig, RecipeConfig, RunConfig, SubsetsConfig, TaskConfig  # noqa: E402
from pipelines.stages import RunContext, run_stages  # noqa: E402

from machine import describe  # benchmarks/machine.py: scripts run as files, their folder on sys.path


def _warm_up(unit: tuple[int, int]) -> None:
    """Start a worker and import the training code (torch) in it: a one-off cost per worker, not per unit."""
    import pipelines.engine.training  # noqa: F401

    time.sleep(1.0)  # long enough that each warm-up unit lands on its own worker


def run_once(run_dir: Path, workers: int, n_models: int, block: int, epochs: int) -> dict:
    cfg = RunConfig(name="ray_scaling", seed=0, run_dir=str(run_dir),
                    task=TaskConfig(n_train=1000, n_test=200, recipe=RecipeConfig(epochs=epochs)),
                    subsets=SubsetsConfig(n_models=n_models, block_size=block),
                    executor=ExecutorConfig(kind="ray", num_cpus=workers, cpus_per_unit=1))
    ctx = RunContext(cfg=cfg, run_dir=cfg.resolved_run_dir())
    ctx.data  # load the data, start Ray and its workers before the clock: none of them is the stage's scaling
    list(ctx.executor.map_unordered(_warm_up, [(i, i + 1) for i in range(workers)]))
    ctx.executor.unit_stats.clear()
    start = time.perf_counter()
    try:
        run_stages(ctx, ["subsets"])
        wall = time.perf_counter() - start
        compute = [s["seconds"] for s in ctx.executor.unit_stats]
    finally:
        ctx.close()
    return {"workers": workers, "units": len(compute), "wall_seconds": wall, "unit_seconds_mean": float(np.mean(compute)),
            "overhead_per_unit_seconds": (wall * workers - sum(compute)) / len(compute)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=int, default=64)
    p.add_argument("--block", type=int, default=8, help="models per unit")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # workers, in this process
    p.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.one:
        print(json.dumps(run_once(Path(args.dir), args.one, args.models, args.block, args.epochs)))
        return
    root = Path(tempfile.mkdtemp(prefix="dmu_ray_scaling_"))
    rows = []
    for workers in (1, 2):
        out = subprocess.run([sys.executable, __file__, "--one", str(workers), "--dir", str(root / str(workers)),
                              "--models", str(args.models), "--block", str(args.block), "--epochs", str(args.epochs)],
                             check=True, stdout=subprocess.PIPE, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    same = np.array_equal(open_group(root / "1" / "subsets.zarr")["logits"][:],
                          open_group(root / "2" / "subsets.zarr")["logits"][:])
    one, two = rows
    summary = {"speedup": one["wall_seconds"] / two["wall_seconds"],
               "overhead_fraction_of_unit": one["overhead_per_unit_seconds"] / one["unit_seconds_mean"],
               "same_logits": bool(same), "runs": rows}
    if args.json:
        print(json.dumps(summary))
        return
    print(f"# {describe()}; subsets stage, MNIST-1D CNN, N = 1,000, {args.models} models "
          f"in units of {args.block}, {args.epochs} epochs")
    for r in rows:
        print(f"{r['workers']} worker(s): {r['wall_seconds']:.1f} s for {r['units']} units, unit compute "
              f"{r['unit_seconds_mean']:.2f} s, overhead {r['overhead_per_unit_seconds']:.3f} s per unit")
    print(f"speedup 1 -> 2 workers: {summary['speedup']:.2f}x; overhead {100 * summary['overhead_fraction_of_unit']:.1f} % "
          f"of a unit at 1 worker; same logits: {same}")


if __name__ == "__main__":
    main()
