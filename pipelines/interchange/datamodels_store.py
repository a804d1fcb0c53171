"""A MadryLab/datamodels store (datamodels/training: `spec.json`, one `<key>.npy` (M,)+shape per schema key,
`_completed.npy` (M,) bool) to and from a run's subsets.zarr. Import copies the completed models' masks and
margins (or (T, C) logits), in their order, block by block; export writes a complete subsets.zarr back.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

from pipelines.config import ConfigError
from pipelines.interchange.files import NpyRows, write_npys
from pipelines.interchange.stores import subsets_blocks, write_subsets

COMPLETED = "_completed"
HINT = "the store folder is incomplete (initialize_store writes one .npy per spec.json key)"
FLOATS = ("float16", "float32", "float64")


def read_spec(source: Path) -> tuple[int, dict]:
    """(num_models, schema) of source/spec.json, checked for the keys datamodels' own `verify_spec` requires."""
    path = source / "spec.json"
    if not path.exists():
        raise ConfigError(f"missing {path}: copy the spec file given to initialize_store (--logging.spec) into "
                          "the store folder")
    try:
        spec = json.loads(path.read_text())
        m, schema = int(spec["num_models"]), dict(spec["schema"])
        for key, entry in schema.items():
            schema[key] = (tuple(int(s) for s in entry["shape"]), np.dtype(getattr(np, entry["dtype"])))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path} is not a datamodels spec ({type(exc).__name__}: {exc}): it needs num_models "
                          "and a schema of {key: {shape, dtype}}") from exc
    return m, schema


def open_key(source: Path, key: str, m: int, schema: dict) -> NpyRows:
    """source/<key>.npy, checked against its spec.json entry (shape (M,)+shape, dtype)."""
    if key not in schema:
        raise ConfigError(f"{source}/spec.json has no key {key!r} (keys: {sorted(schema)}): name the right one "
                          "with --masks-key / --margins-key")
    shape, dtype = schema[key]
    arr = NpyRows(source / f"{key}.npy", HINT)
    if arr.shape != (m, *shape) or arr.dtype != dtype:
        raise ConfigError(f"{arr.path} is {arr.dtype} {arr.shape}, spec.json declares {dtype} {(m, *shape)}: the "
                          "file and spec.json are of different stores")
    return arr


def completed_rows(source: Path, m: int) -> np.ndarray:
    """Rows whose _completed flag is set (the worker sets it after writing every key of the row)."""
    done = NpyRows(source / f"{COMPLETED}.npy", HINT)
    if done.shape != (m,) or done.dtype != np.bool_:
        raise ConfigError(f"{done.path} is {done.dtype} {done.shape}, expected bool ({m},): the file and "
                          "spec.json are of different stores")
    rows = np.flatnonzero(done.rows(0, m))
    if len(rows) == 0:
        raise ConfigError(f"{source} has no completed model (_completed.npy all false): run its workers first")
    return rows


def import_store(source: str | Path, run_dir: str | Path, block_size: int = 256, masks_key: str = "masks",
                 margins_key: str = "margins") -> Path:
    """Copy the completed models of the datamodels store in `source` into run_dir/subsets.zarr.

    `margins_key`: one key, or several separated by commas whose targets are concatenated in that order (e.g.
    `train_margins,margins`); each (T_k,) float (margin-only store) or all (T_k, C) float (a logits store).
    Incomplete rows are left out, the others kept in order: the store's `source_row` (M',) holds each model's
    row in the source and its attrs `skipped_incomplete` their count."""
    source = Path(source)
    m, schema = read_spec(source)
    masks = open_key(source, masks_key, m, schema)
    if masks.dtype != np.bool_ or masks.ndim != 2:
        raise ConfigError(f"{masks.path} must hold (N,) bool masks per model, got {masks.dtype} {masks.shape[1:]}: "
                          "name the masks with --masks-key")
    keys = margins_key.split(",")
    outputs = [open_key(source, key, m, schema) for key in keys]
    for arr in outputs:
        if arr.dtype.name not in FLOATS or arr.ndim not in (2, 3) or arr.shape[2:] != outputs[0].shape[2:]:
            raise ConfigError(f"{arr.path} must hold (T,) margins or (T, C) logits of a float type, like the other "
                              f"keys, per model, got {arr.dtype} {arr.shape[1:]}: name them with --margins-key")
    dtype = np.result_type(*[arr.dtype for arr in outputs]).name
    rows = completed_rows(source, m)
    widths = [arr.shape[1] for arr in outputs]
    t = sum(widths)
    bounds = np.cumsum([0, *widths]).tolist()

    def read_block(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        at = rows[start:stop]
        return masks.take(at), np.concatenate([arr.take(at).astype(dtype, copy=False) for arr in outputs], axis=1)

    return write_subsets(
        run_dir, n_models=len(rows), n_train=masks.shape[1], outputs=((t, *outputs[0].shape[2:]), dtype),
        read_block=read_block, block_size=block_size, extra={"source_row": rows.astype(np.int64)},
        config={"imported": "datamodels-store", "source_models": m, "n_models": len(rows),
                "completed": zlib.crc32(rows.astype(np.int64).tobytes()),  # which rows: a rerun on a store
                # completed further is refused (a new run directory takes the new rows)
                "masks_key": masks_key, "margins_key": margins_key, "n_train": masks.shape[1], "n_targets": t},
        attrs={"imported": "datamodels-store", "skipped_incomplete": m - len(rows),
               "target_keys": {key: bounds[i:i + 2] for i, key in enumerate(keys)}})


def export_store(run_dir: str | Path, out: str | Path, labels: np.ndarray | None = None) -> Path:
    """Write run_dir/subsets.zarr (complete) under `out` as a datamodels store: spec.json, masks.npy and the
    margins (of a logits store: its margins, unlearning.klom.margins, with `labels` or the run's task's labels),
    under the keys the store was imported from (else `margins`), and _completed.npy, one block at a time."""
    group, blocks = subsets_blocks(run_dir, labels)
    m, n = group["masks"].shape
    t = int(group.attrs["n_targets"])
    dtype = np.dtype(group["margins"].dtype if "margins" in group else np.float32)
    keys = group.attrs.get("target_keys") if "margins" in group else None
    keys = keys or {"margins": [0, t]}
    schema = {"masks": ((n,), np.dtype(np.bool_)), **{k: ((b - a,), dtype) for k, (a, b) in keys.items()}}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_npys({key: (out / f"{key}.npy", dt, (m, *shape)) for key, (shape, dt) in schema.items()},
               ({"masks": masks, **{key: margins[:, a:b] for key, (a, b) in keys.items()}}
                for _, _, masks, margins in blocks))
    np.save(out / f"{COMPLETED}.npy", np.ones(m, dtype=np.bool_))  # (M,) bool: 300 kB at M = 300,000
    spec = {"num_models": m, "schema": {key: {"shape": list(shape), "dtype": "bool_" if dt == np.bool_ else dt.name}
                                        for key, (shape, dt) in schema.items()}}
    (out / "spec.json").write_text(json.dumps(spec, indent=4) + "\n")
    return out
