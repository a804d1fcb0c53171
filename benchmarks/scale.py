"""Scale: the datamodels and forget-set stages on synthetic subsets stores of growing size, through the real Ray
executor, with the peak memory of the driver and of the largest work unit.

Each size writes a subsets.zarr whose logits are a known sparse linear function of the masks plus noise (so the
benchmark also says how well LASSO recovers the true weights), then runs `datamodels` (LASSO) and `forget_sets`
(random sets and the principal-component sets of the datamodel matrix) on a local Ray instance. Memory is bounded
when the driver's and the units' peaks stay flat while the logits grow: neither holds (M, T, C).

    .venv/bin/python benchmarks/scale.py            # a table
    .venv/bin/python benchmarks/scale.py --json     # one JSON list
    .venv/bin/python benchmarks/scale.py --sizes 256x1024,512x2048   # models x targets, for a quick look

Peak memory is each process's VmHWM (Linux), reset just before the stages run (driver) and before each unit
(worker, `pipelines.engine.executor`). Each size runs in a fresh driver process, which first writes its store block by
block and then, after the reset, runs the stages. A unit's memory grows with the models M (it reads M x t x C
logits for its t targets) and not with the targets T; the default sizes grow T 8x and M 2x.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attribution import subsets as subsets_store  # noqa: E402
from attribution.store import bytes_on_disk, open_group  # noqa: E402
from pipelines.config import (  # noqa: E402
    DatamodelsConfig,
    ExecutorConfig,
    ForgetSetsConfig,
    RunConfig,
    SubsetsConfig,
    TaskConfig,
)
from pipelines.engine.executor import peak_rss, reset_peak_rss  # noqa: E402
from pipelines.stages import RunContext, run_stages  # noqa: E402
from pipelines.stages.subsets import subsets_config  # noqa: E402
from pipelines.tasks import TaskData  # noqa: E402

from machine import describe  # benchmarks/machine.py: scripts run as files, their folder on sys.path

N_TRAIN = 100  # training points: small, so the largest size fits the time budget; M and T are what grow
C = 10
BLOCK = 64  # subset models per block (= shard of the logits)
NONZERO = 5  # training points that move each target output in the planted model
NOISE = 0.1
# models x targets: each size 4x the last in M * T; the largest holds 2.7 GB of float32 logits
DEFAULT_SIZES = ((1024, 4096), (1024, 16384), (2048, 32768))


def synthetic_data(n_targets: int, seed: int) -> TaskData:
    """A stand-in task: what the datamodels stage needs of the data is the labels and a fingerprint."""
    g = torch.Generator().manual_seed(seed)
    n_test = n_targets - N_TRAIN
    return TaskData(torch.randn(N_TRAIN, 1, generator=g), torch.randint(0, C, (N_TRAIN,), generator=g),
                    torch.randn(n_test, 1, generator=g), torch.randint(0, C, (n_test,), generator=g), C)


def planted_weights(n_targets: int, rows: slice, seed: int) -> np.ndarray:
    """True weights (N, t, C) of targets in `rows`: NONZERO training points per target, the same for every class
    of a target, each target drawn from its own seed (so any block of targets can be regenerated alone)."""
    out = np.zeros((N_TRAIN, rows.stop - rows.start, C), np.float32)
    for j, t in enumerate(range(rows.start, rows.stop)):
        rng = np.random.default_rng([seed, t])
        out[rng.choice(N_TRAIN, NONZERO, replace=False), j, :] = rng.normal(0, 1, (NONZERO, C))
    return out


def write_store(ctx: RunContext, n_models: int, seed: int) -> None:
    """subsets.zarr with logits = masks @ W + noise, written one block of models at a time."""
    cfg, data = ctx.cfg, ctx.data
    group = subsets_store.create_store(
        ctx.run_dir / "subsets.zarr", n_models=n_models, n_train=N_TRAIN, n_targets=data.n_targets, n_classes=C,
        alpha=0.5, seed=cfg.seed, block_size=BLOCK, keep_params=0, n_params=1, config=subsets_config(cfg),
        attrs=ctx.dataset_attrs())
    weights = planted_weights(data.n_targets, slice(0, data.n_targets), seed).reshape(N_TRAIN, -1)
    rng = np.random.default_rng(seed)
    for start in range(0, n_models, BLOCK):
        masks = group["masks"][start:start + BLOCK].astype(np.float32)
        logits = masks @ weights + rng.normal(0, NOISE, (len(masks), weights.shape[1])).astype(np.float32)
        subsets_store.write_block(group, start, logits.reshape(len(masks), data.n_targets, C), None)


def recovery_error(run_dir: Path, n_targets: int, seed: int, chunk: int = 2048) -> float:
    """‖W_lasso − W_true‖ / ‖W_true‖ over every class logit of every target, read by target chunks."""
    weights = open_group(run_dir / "datamodels" / "lasso.zarr")["weights"]
    num = den = 0.0
    for t0 in range(0, n_targets, chunk):
        rows = slice(t0, min(t0 + chunk, n_targets))
        true = planted_weights(n_targets, rows, seed)
        num += float(((np.asarray(weights[:, rows]) - true) ** 2).sum())
        den += float((true ** 2).sum())
    return (num / den) ** 0.5


def size_context(root: Path, n_models: int, n_targets: int, seed: int = 0) -> RunContext:
    cfg = RunConfig(
        name=f"scale_{n_models}x{n_targets}", seed=seed, run_dir=str(root / f"{n_models}x{n_targets}"),
        task=TaskConfig(name="mnist1d", n_train=N_TRAIN),  # the name only keys the config; data is synthetic
        subsets=SubsetsConfig(n_models=n_models, block_size=BLOCK),
        datamodels=DatamodelsConfig(n_val=128, n_lds=128, n_lambdas=3, lambda_ratio=0.05, target_chunk=512),
        forget_sets=ForgetSetsConfig(random_sizes=(10,), full_class=None, pc_top_k=10, pc_ends=5),
        executor=ExecutorConfig(kind="ray", num_cpus=2, cpus_per_unit=1))
    ctx = RunContext(cfg=cfg, run_dir=cfg.resolved_run_dir())
    ctx.__dict__["data"] = synthetic_data(n_targets, seed)  # the stand-in task's data (cached_property slot)
    return ctx


def run_size(root: Path, n_models: int, n_targets: int, seed: int = 0) -> dict:
    """The stages on a store written by another process (so this driver's memory holds none of the writing)."""
    ctx = size_context(root, n_models, n_targets, seed)
    ctx.executor  # start Ray before the measurement: its start-up is not the stage's memory
    reset_peak_rss()
    start = time.perf_counter()
    try:
        run_stages(ctx, ["datamodels", "forget_sets"])
        seconds = time.perf_counter() - start
        driver_peak = peak_rss()
        units = [s for s in ctx.executor.unit_stats if s["peak_rss_bytes"]]
    finally:
        ctx.close()
    logits = open_group(ctx.run_dir / "subsets.zarr")["logits"]
    return {"models": n_models, "targets": n_targets, "n_train": N_TRAIN,
            "logits_bytes": int(np.prod(logits.shape)) * logits.dtype.itemsize,
            "driver_peak_rss_bytes": driver_peak,
            "unit_peak_rss_bytes": max(s["peak_rss_bytes"] for s in units),
            "units": len(units), "seconds": round(seconds, 1),
            "recovery_error": round(recovery_error(ctx.run_dir, n_targets, seed), 4),
            "subsets_bytes_on_disk": bytes_on_disk(ctx.run_dir / "subsets.zarr"),
            "lasso_bytes_on_disk": bytes_on_disk(ctx.run_dir / "datamodels" / "lasso.zarr")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    parser.add_argument("--sizes", default=",".join(f"{m}x{t}" for m, t in DEFAULT_SIZES),
                        help="comma-separated MODELSxTARGETS (default: %(default)s)")
    parser.add_argument("--dir", default=None, help="where the stores go (default: a temporary directory)")
    parser.add_argument("--write", default=None, help=argparse.SUPPRESS)  # MxT: write the store, in a process
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # MxT: the stages, in a fresh driver
    args = parser.parse_args()
    if args.write:
        n_models, n_targets = (int(v) for v in args.write.split("x"))
        write_store(size_context(Path(args.dir), n_models, n_targets), n_models, seed=0)
        return
    if args.one:
        n_models, n_targets = (int(v) for v in args.one.split("x"))
        print(json.dumps(run_size(Path(args.dir), n_models, n_targets)))
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    root = Path(args.dir or tempfile.mkdtemp(prefix="dmu_scale_"))
    if not args.json:
        print(f"# {describe()}, N = {N_TRAIN}, C = {C}, "
              f"Ray 2 CPUs, stores in {root}")
        print(f"{'models':>7} {'targets':>8} {'logits':>9} {'driver peak':>12} {'unit peak':>10} {'units':>6} "
              f"{'seconds':>8} {'recovery':>9}")
    rows = []
    try:
        for n_models, n_targets in sizes:
            size = f"{n_models}x{n_targets}"
            subprocess.run([sys.executable, __file__, "--write", size, "--dir", str(root)], check=True)
            out = subprocess.run([sys.executable, __file__, "--one", size, "--dir", str(root)], check=True,
                                 stdout=subprocess.PIPE, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            rows.append(row)
            shutil.rmtree(root / f"{n_models}x{n_targets}", ignore_errors=True)
            if not args.json:
                mb = 2 ** 20
                print(f"{row['models']:>7} {row['targets']:>8} {row['logits_bytes'] / mb:>7.0f}MB "
                      f"{row['driver_peak_rss_bytes'] / mb:>10.0f}MB {row['unit_peak_rss_bytes'] / mb:>8.0f}MB "
                      f"{row['units']:>6} {row['seconds']:>8.1f} {row['recovery_error']:>9.4f}", flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(rows))
    else:
        first, last = rows[0], rows[-1]
        print(f"logits grew {last['logits_bytes'] / first['logits_bytes']:.0f}x; driver peak "
              f"{last['driver_peak_rss_bytes'] / first['driver_peak_rss_bytes']:.2f}x, largest unit peak "
              f"{last['unit_peak_rss_bytes'] / first['unit_peak_rss_bytes']:.2f}x")


if __name__ == "__main__":
    main()
