"""Bytes, seconds and peak memory of `dmu import datamodels-release` on a stand-in of the release layout.

Writes M models x N training points (+ N_TEST test points) as train_masks / train_margins / test_margins .npy
files (the datamodels release's names and dtypes), then imports them into a run's subsets.zarr in blocks and
reports the source and store sizes, the import time and the process's peak resident memory.

    .venv/bin/python benchmarks/import_release.py                 # 10,000 models x 5,000 points (+ 1,000 test)
    .venv/bin/python benchmarks/import_release.py --models 200    # seconds
"""

from __future__ import annotations

import argparse
import tempfile
import subprocess
import sys
from pathlib import Path

import numpy as np

from attribution.store import bytes_on_disk

from machine import describe  # benchmarks/machine.py: scripts run as files, their folder on sys.path


def write_standin(folder: Path, m: int, n: int, n_test: int, block: int = 1000) -> None:
    rng = np.random.default_rng(0)
    files = [np.lib.format.open_memmap(folder / name, "w+", dtype, shape) for name, dtype, shape in (
        ("train_masks_50pct.npy", np.bool_, (m, n)), ("train_margins_50pct.npy", np.float16, (m, n)),
        ("test_margins_50pct.npy", np.float16, (m, n_test)))]
    for start in range(0, m, block):
        stop = min(m, start + block)
        files[0][start:stop] = rng.random((stop - start, n)) < 0.5
        files[1][start:stop] = rng.normal(size=(stop - start, n))
        files[2][start:stop] = rng.normal(size=(stop - start, n_test))
    for f in files:
        f.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=10_000)
    ap.add_argument("--points", type=int, default=5_000)
    ap.add_argument("--test-points", type=int, default=1_000)
    ap.add_argument("--block-size", type=int, default=256)
    args = ap.parse_args()
    print(describe())
    with tempfile.TemporaryDirectory() as tmp:
        src, run = Path(tmp) / "src", Path(tmp) / "run"
        src.mkdir()
        write_standin(src, args.models, args.points, args.test_points)
        source_bytes = sum(f.stat().st_size for f in src.iterdir())
        # the import runs in a fresh process, so that its peak memory is its own (not the stand-in's writing)
        code = (f"import time; from pipelines.interchange.datamodels import import_release; t0 = time.perf_counter(); "
                f"import_release({str(src)!r}, {str(run)!r}, block_size={args.block_size}); "
                "s = time.perf_counter() - t0; "
                "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
                "print(s, hwm)")
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
        seconds, peak = float(out.split()[-2]), int(out.split()[-1])  # VmHWM: this process's own peak, KiB
        path = run / "subsets.zarr"
        print(f"{args.models} models x {args.points} + {args.test_points} points, block {args.block_size}")
        print(f"source {source_bytes / 2**20:.1f} MiB, store {bytes_on_disk(path) / 2**20:.1f} MiB on disk")
        print(f"import {seconds:.1f} s ({source_bytes / 2**20 / seconds:.0f} MiB/s)")
        print(f"peak RSS of the importing process {peak / 2**10:.0f} MiB")


if __name__ == "__main__":
    main()
