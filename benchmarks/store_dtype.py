"""Store precision: what float16 logits and weights cost against float32, from two runs of one config that differ
only in `subsets.logits_dtype` and `datamodels.weights_dtype`.

    .venv/bin/dmu run pipelines/configs/demo.yaml                      # float32 -> runs/demo
    .venv/bin/dmu run demo16.yaml   # demo.yaml with name demo16, logits_dtype and weights_dtype float16
    .venv/bin/python benchmarks/store_dtype.py runs/demo runs/demo16

Prints per run: bytes on disk of every store; LDS of the STORED margin weights (read back at their precision) on
the held-out LDS subset models, over test targets and over all targets; and DM-Direct's KLOM p95 per forget set
from the report. The stage's own LDS is computed before the weights are rounded for storage, so it only shows the
effect of float16 logits; the LDS here shows both.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attribution.lds import lds  # noqa: E402
from attribution.store import bytes_on_disk, find_stores, open_group  # noqa: E402
from pipelines.rundir.layout import load_run_config  # noqa: E402
from pipelines.tasks import get_task  # noqa: E402
from unlearning.klom import margins  # noqa: E402

from machine import describe  # benchmarks/machine.py: scripts run as files, their folder on sys.path


def stored_lds(run: Path) -> tuple[float, float]:
    """Mean LDS (test targets, all targets) of the stored LASSO margin weights on the LDS subset models."""
    subsets, dm = open_group(run / "subsets.zarr"), open_group(run / "datamodels" / "lasso.zarr")
    n_lds = int(dm.attrs["n_lds"])
    held = slice(subsets["masks"].shape[0] - n_lds, None)
    labels = get_task(load_run_config(run).task).load_data().y_targets.numpy()
    y = margins(np.asarray(subsets["logits"][held], np.float32), labels)
    w = np.asarray(dm["margin_weights"][:], np.float32)
    scores = lds(w, np.asarray(dm["margin_bias"][:], np.float32), subsets["masks"][held], y)
    n_train = subsets["masks"].shape[1]
    return float(np.nanmean(scores[n_train:])), float(np.nanmean(scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories to compare")
    args = parser.parse_args()
    print(f"# {describe()}")
    for run in map(Path, args.runs):
        dtypes = (open_group(run / "subsets.zarr")["logits"].dtype,
                  open_group(run / "datamodels" / "lasso.zarr")["weights"].dtype)
        print(f"{run}: logits {dtypes[0]}, weights {dtypes[1]}")
        for store in find_stores(run):
            if "unlearned" not in str(store):
                print(f"  {str(store)[len(str(run)) + 1:]:<28} {bytes_on_disk(store) / 2**20:8.2f} MiB on disk")
        unlearned = sum(bytes_on_disk(s) for s in find_stores(run) if "unlearned" in str(s))
        print(f"  {'unlearned/* (all)':<28} {unlearned / 2**20:8.2f} MiB on disk")
        test, everything = stored_lds(run)
        print(f"  LDS of the stored margin weights: test targets {test:.4f}, all targets {everything:.4f}")
        metrics = json.loads((run / "report" / "metrics.json").read_text())
        for fs, entry in metrics["forget_sets"].items():
            k = entry["methods"]["dm_direct"]["klom"]
            print(f"  DM-Direct KLOM p95 {fs:<10} forget {k['forget']['p95']:.3f} retain {k['retain']['p95']:.3f} "
                  f"validation {k['validation']['p95']:.3f}")


if __name__ == "__main__":
    main()
