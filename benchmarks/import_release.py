"""Bytes, seconds and peak memory of `dmu import KIND` on a stand-in of each public layout.

Writes M models x N training points (+ N_TEST test points) in the layout of KIND, then imports it into a run
directory in blocks and reports the source and store sizes, the import time and the importing process's peak
resident memory:
- datamodels-release: train_masks / train_margins / test_margins _50pct.npy (the release's names and dtypes);
- datamodels-store: spec.json, masks.npy, train_margins.npy, margins.npy, _completed.npy (MadryLab/datamodels);
- datamodels-weights: train_50pct.pt (N, N) and test_50pct.pt (N, N_TEST) float32 fitted datamodels (M unused);
- trak-scores: traker's save_dir with scores/train.mmap and scores/test.mmap float16 (M unused).

    .venv/bin/python benchmarks/import_release.py                          # release, 10,000 x 5,000 (+ 1,000)
    .venv/bin/python benchmarks/import_release.py --kind datamodels-store
    .venv/bin/python benchmarks/import_release.py --models 200             # seconds
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from attribution.store import bytes_on_disk

from machine import describe  # benchmarks/machine.py: scripts run as files, their folder on sys.path

BLOCK = 1000  # rows of the stand-in written at a time


def write_rows(files: list[tuple[Path, np.dtype, tuple[int, int], str]], seed: int = 0) -> None:
    """.npy files of random rows ("mask": bool, else normal), BLOCK rows at a time."""
    rng = np.random.default_rng(seed)
    for path, dtype, shape, what in files:
        arr = np.lib.format.open_memmap(path, "w+", dtype, shape)
        for start in range(0, shape[0], BLOCK):
            rows = (min(shape[0], start + BLOCK) - start, shape[1])
            arr[start:start + rows[0]] = rng.random(rows) < 0.5 if what == "mask" else rng.normal(size=rows)
        arr.flush()


def write_standin(kind: str, folder: Path, m: int, n: int, n_test: int) -> tuple[str, str]:
    """The stand-in of `kind` in `folder`; returns (import function, its extra keyword arguments)."""
    if kind == "datamodels-release":
        write_rows([(folder / "train_masks_50pct.npy", np.bool_, (m, n), "mask"),
                    (folder / "train_margins_50pct.npy", np.float16, (m, n), ""),
                    (folder / "test_margins_50pct.npy", np.float16, (m, n_test), "")])
        return "datamodels:import_release", ""
    if kind == "datamodels-store":
        write_rows([(folder / "masks.npy", np.bool_, (m, n), "mask"),
                    (folder / "train_margins.npy", np.float16, (m, n), ""),
                    (folder / "margins.npy", np.float16, (m, n_test), "")])
        np.save(folder / "_completed.npy", np.ones(m, bool))
        schema = {"masks": {"shape": [n], "dtype": "bool_"}, "train_margins": {"shape": [n], "dtype": "float16"},
                  "margins": {"shape": [n_test], "dtype": "float16"}}
        (folder / "spec.json").write_text(json.dumps({"num_models": m, "schema": schema}))
        return "datamodels_store:import_store", "margins_key='train_margins,margins'"
    if kind == "datamodels-weights":
        g = torch.Generator().manual_seed(0)
        for split, t in (("train", n), ("test", n_test)):
            torch.save({"weight": torch.randn(n, t, generator=g), "bias": torch.randn(t, generator=g),
                        "lam": torch.rand(t, generator=g)}, folder / f"{split}_50pct.pt")
        return "datamodels:import_weights", ""
    (folder / "scores").mkdir()
    write_rows([(folder / "scores" / "train.mmap", np.float16, (n, n), ""),
                (folder / "scores" / "test.mmap", np.float16, (n, n_test), "")])
    (folder / "metadata.json").write_text(json.dumps({"JL dimension": 2048, "JL matrix type": "rademacher",
                                                      "train set size": n}))
    (folder / "experiments.json").write_text(json.dumps({
        name: {"num_targets": t, "scores_path": str(folder / "scores" / f"{name}.mmap"), "scores_finalized": 1}
        for name, t in (("train", n), ("test", n_test))}))
    return "trak_scores:import_scores", "experiment='train,test'"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", default="datamodels-release",
                    choices=("datamodels-release", "datamodels-store", "datamodels-weights", "trak-scores"))
    ap.add_argument("--models", type=int, default=10_000)
    ap.add_argument("--points", type=int, default=5_000)
    ap.add_argument("--test-points", type=int, default=1_000)
    ap.add_argument("--block-size", type=int, default=256)
    args = ap.parse_args()
    print(describe())
    with tempfile.TemporaryDirectory() as tmp:
        src, run = Path(tmp) / "src", Path(tmp) / "run"
        src.mkdir()
        function, extra = write_standin(args.kind, src, args.models, args.points, args.test_points)
        module, name = function.split(":")
        if args.kind in ("datamodels-release", "datamodels-store"):
            extra = ", ".join(filter(None, [extra, f"block_size={args.block_size}"]))
        source_bytes = sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
        # the import runs in a fresh process, so that its peak memory is its own (not the stand-in's writing)
        code = (f"import time; from pipelines.interchange.{module} import {name}; t0 = time.perf_counter(); "
                f"path = {name}({str(src)!r}, {str(run)!r}, {extra}); "
                "s = time.perf_counter() - t0; "
                "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
                "print(s, hwm, path)")
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
        seconds, peak, path = out.split()[-3:]  # VmHWM: this process's own peak, KiB
        seconds, peak = float(seconds), int(peak)
        shape = ("" if args.kind in ("datamodels-weights", "trak-scores") else f"{args.models} models x ")
        print(f"{args.kind}: {shape}{args.points} + {args.test_points} points, block {args.block_size}")
        print(f"source {source_bytes / 2**20:.1f} MiB, store {bytes_on_disk(path) / 2**20:.1f} MiB on disk")
        print(f"import {seconds:.1f} s ({source_bytes / 2**20 / seconds:.0f} MiB/s)")
        print(f"peak RSS of the importing process {peak / 2**10:.0f} MiB")


if __name__ == "__main__":
    main()
