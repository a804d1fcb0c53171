"""The dmu stores an import writes and an export reads, by blocks: subsets.zarr of M models (`write_subsets`,
`subsets_blocks`) and the margin part of datamodels/<name>.zarr (`write_margin_datamodels`). Resumable: blocks are
marked done after their rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import zarr

from attribution.store import ArraySpec, open_or_create, open_store, read
from pipelines.config import ConfigError

# Modules that import torch (about 0.5 GB resident) are imported inside the functions that need them, so that
# copying masks and margins runs in a small process.
KIND = "subsets"
DATAMODELS_KIND = "datamodels"
TARGET_CHUNK = 512  # targets per chunk of an imported datamodel store (the datamodels stage's default)


def progress(total: int, done: int, desc: str, unit: str):
    """The progress bar of an import or export (items/s, ETA); `done` items were finished by an earlier run."""
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc=desc, unit=unit, dynamic_ncols=True)


def write_subsets(run_dir: str | Path, *, n_models: int, n_train: int, outputs: tuple[tuple[int, ...], str],
                  read_block: Callable[[int, int], tuple[np.ndarray, np.ndarray]], config: dict, attrs: dict,
                  block_size: int, extra: dict[str, np.ndarray] | None = None) -> Path:
    """Create (or resume) run_dir/subsets.zarr with `masks` (M, N), `done` (M,) and `margins` (M, T) when
    `outputs` is ((T,), dtype), else `logits` (M, T, C); fill every block not done with `read_block(start, stop)`
    -> (masks, outputs), writing its done flags last. `extra`: small (M,) arrays written at creation."""
    shape, dtype = outputs
    name = "margins" if len(shape) == 1 else "logits"
    t = shape[0]
    fill = float("nan")
    arrays = {"masks": ArraySpec((n_models, n_train), "bool", (block_size, n_train), False),
              name: ArraySpec((n_models, *shape), dtype, (block_size, *shape), fill),
              "done": ArraySpec((n_models,), "bool", (block_size,), False)}
    for key, values in (extra or {}).items():
        arrays[key] = ArraySpec(values.shape, values.dtype.name, (block_size,), 0)

    def initialise(group: zarr.Group) -> None:
        for key, values in (extra or {}).items():
            group[key][:] = values

    path = Path(run_dir) / "subsets.zarr"
    group = open_or_create(path, arrays, kind=KIND, config={**config, "block_size": block_size},
                           attrs={"n_train": n_train, "n_targets": t, "margin_only": name == "margins",
                                  "block_size": block_size, **attrs}, initialise=initialise)
    done = np.asarray(group["done"][:])
    with progress(n_models, int(done.sum()), "importing subset models", "model") as bar:
        for start in range(0, n_models, block_size):
            stop = min(n_models, start + block_size)
            if done[start:stop].all():
                continue
            masks, values = read_block(start, stop)
            group["masks"][start:stop] = masks
            group[name][start:stop] = values
            group["done"][start:stop] = True  # last: a block counts only once its rows are written
            bar.update(stop - start - int(done[start:stop].sum()))
    return path


def run_labels(run_dir: str | Path) -> np.ndarray:
    """(T,) labels of a run's targets, from its task (for the margins of a logits store)."""
    from pipelines.rundir.layout import load_run_config
    from pipelines.tasks import get_task

    return get_task(load_run_config(run_dir).task).load_data(None).y_targets.numpy()


def subsets_blocks(run_dir: str | Path, labels: np.ndarray | None = None
                   ) -> tuple[zarr.Group, Iterator[tuple[int, int, np.ndarray, np.ndarray]]]:
    """A complete run_dir/subsets.zarr and its blocks (start, stop, masks, margins), one stored block of models
    at a time; the margins of a logits store are computed with `labels` (default: the run's task's labels)."""
    group = open_store(Path(run_dir) / "subsets.zarr", KIND)
    done = np.asarray(group["done"][:])
    if not done.all():
        raise ConfigError(f"{run_dir}/subsets.zarr has {int((~done).sum())} models not done: finish the import or "
                          "the subsets stage first")
    if "margins" not in group:
        from unlearning.klom import margins as margins_of

        labels = run_labels(run_dir) if labels is None else labels

    def blocks():
        m, block = group["masks"].shape[0], group["masks"].chunks[0]
        for start in range(0, m, block):
            stop = min(m, start + block)
            if "margins" in group:
                margins = read(group["margins"], slice(start, stop))
            else:
                margins = margins_of(read(group["logits"], slice(start, stop)), labels)
            yield start, stop, read(group["masks"], slice(start, stop)), margins

    return group, blocks()


def margin_arrays(n_train: int, n_targets: int) -> dict[str, ArraySpec]:
    """The margin-only form of the datamodels stage's schema (`store_arrays` with no classes): margin_weights
    (N, T) in chunks of (256 rows, TARGET_CHUNK), margin_bias / margin_lambda / margin_val_mse / margin_lds (T,),
    done per chunk."""
    from pipelines.stages.datamodel_io import store_arrays

    return store_arrays(n_train, n_targets, 0, min(TARGET_CHUNK, n_targets))


def write_margin_datamodels(run_dir: str | Path, name: str, *, n_train: int, n_targets: int,
                            read_rows: Callable[[int, int], np.ndarray], per_target: dict[str, np.ndarray],
                            config: dict, attrs: dict) -> Path:
    """Create (or resume) run_dir/datamodels/<name>.zarr as a margin-only datamodel store and copy the weights
    256 training points (one chunk row) at a time with `read_rows(start, stop)` -> (rows, T); attrs
    `imported_rows` counts the rows written, so a rerun continues there; then `per_target` (margin_bias,
    margin_lambda) and every done flag."""
    path = Path(run_dir) / "datamodels" / f"{name}.zarr"
    group = open_or_create(path, margin_arrays(n_train, n_targets), kind=DATAMODELS_KIND, config=config,
                           attrs={"n_train": n_train, "n_targets": n_targets, "margin_only": True,
                                  "imported_rows": 0, **attrs})
    weights = group["margin_weights"]
    rows = weights.chunks[0]  # the stage's ROW_CHUNK: whole chunks written
    first = int(group.attrs["imported_rows"])
    with progress(n_train, first, f"importing datamodels/{name}", "training point") as bar:
        for start in range(first, n_train, rows):
            stop = min(n_train, start + rows)
            weights[start:stop] = read_rows(start, stop).astype(weights.dtype, copy=False)
            group.attrs["imported_rows"] = stop  # after the rows: a rerun rewrites at most this block
            bar.update(stop - start)
    for key, values in per_target.items():
        group[key][:] = values
    group["done"][:] = True
    return path
