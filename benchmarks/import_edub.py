"""Seconds and peak memory of `dmu import edub` on a stand-in of the Easy Data Unlearning Bench's layout.

Writes K pretrain models' and K oracles' per-model margin files (float32, CIFAR-10's 50,000 training and 10,000
test points by default) for two forget sets in the bench's folders (pipelines/interchange/edub.py), then imports
them into a run's margin-only models.zarr in a fresh process and reports the time and that process's peak
resident memory beside the base (the same process after its imports, before importing the bench).

    .venv/bin/python benchmarks/import_edub.py                  # 40 models, forget sets of 100 and 1,000
    .venv/bin/python benchmarks/import_edub.py --block-size 64
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from machine import describe  # benchmarks/machine.py: scripts run as files, their folder on sys.path


def write_standin(root: Path, k: int, n: int, n_test: int, sizes: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    base = root / "margins" / "cifar10"
    (root / "forget_sets" / "cifar10").mkdir(parents=True)
    folders = {s: base / "pretrain" / s / "resnet9" for s in ("retain", "val")}
    for fid, size in enumerate(sizes, start=1):
        idx = np.sort(rng.choice(n, size, replace=False))
        np.save(root / "forget_sets" / "cifar10" / f"forget_set_{fid}.npy", idx)
        folders[f"forget_{fid}"] = base / "pretrain" / f"forget_{fid}" / "resnet9"
        for split, count in (("retain", n - size), ("forget", size), ("val", n_test)):
            folder = base / "oracle" / f"forget_{fid}" / split / "resnet9"
            folder.mkdir(parents=True)
            for m in range(k):
                np.save(folder / f"id_{m}_epoch_23.npy", rng.normal(size=count).astype(np.float32))
    counts = {"retain": n, "val": n_test, **{f"forget_{f}": s for f, s in enumerate(sizes, start=1)}}
    for name, folder in folders.items():
        folder.mkdir(parents=True)
        for m in range(k):
            np.save(folder / f"id_{m}_epoch_23.npy", rng.normal(size=counts[name]).astype(np.float32))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=40)
    ap.add_argument("--points", type=int, default=50_000)
    ap.add_argument("--test-points", type=int, default=10_000)
    ap.add_argument("--block-size", type=int, default=16)
    args = ap.parse_args()
    print(describe())
    sizes = (100, 1000)
    with tempfile.TemporaryDirectory() as tmp:
        src, run = Path(tmp) / "src", Path(tmp) / "run"
        write_standin(src, args.models, args.points, args.test_points, sizes)
        source_bytes = sum(f.stat().st_size for f in src.rglob("*.npy"))
        hwm = "[l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]"
        code = (f"import time; from pipelines.interchange.edub import import_edub; base = {hwm}; "
                f"t0 = time.perf_counter(); import_edub({str(src)!r}, {str(run)!r}, block_size={args.block_size}); "
                f"s = time.perf_counter() - t0; print(s, base, {hwm})")
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
        seconds, base, peak = float(out.split()[-3]), int(out.split()[-2]), int(out.split()[-1])  # KiB
        t = args.points + args.test_points
        print(f"{args.models} pretrain models + {args.models} oracles for each of {len(sizes)} forget sets "
              f"({', '.join(map(str, sizes))} points), T = {t}, block {args.block_size}")
        print(f"source {source_bytes / 2**20:.1f} MiB in {sum(1 for _ in src.rglob('*.npy'))} files; "
              f"import {seconds:.1f} s ({source_bytes / 2**20 / seconds:.0f} MiB/s)")
        print(f"peak RSS {peak / 2**10:.0f} MiB, base {base / 2**10:.0f} MiB: the import adds "
              f"{(peak - base) / 2**10:.1f} MiB; 3 x B x T x 4 = {3 * args.block_size * t * 4 / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
