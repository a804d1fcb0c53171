"""The subset-training stage driver: subsets.zarr holds one row per subset model (mask, logits, done flag).

Model-agnostic: the caller supplies the function that trains a block of models (pipelines does, with its engine).
Work units are fixed blocks of model indices, one Zarr shard each; units return arrays, and this driver writes the
rows and then their `done` flags, so an interrupted run resumes by training only the blocks not done.

Layout for reading by targets (issue 9): `logits` (M, T, C) is written one shard per block of models (all targets)
and read in inner chunks of TARGET_CHUNK targets, so a datamodel work unit that fits targets t0..t1 reads only those
targets' bytes of every shard, never the whole (M, T, C) array.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import zarr
from tqdm import tqdm

from attribution.masks import sample_masks
from attribution.store import ArraySpec, done_rows, open_or_create

KIND = "subsets"
# Targets per inner chunk of `logits`: the unit of reading for the datamodels stage (whose target chunks should be
# multiples of it). 128 targets x 10 classes x a block of 32 models is 160 KB in float32.
TARGET_CHUNK = 128
# Stored precisions of the logits: what the datamodels read (they compute in float32 whatever is stored).
LOGIT_DTYPES = ("float32", "float16")


class Executor(Protocol):
    def map_unordered(self, fn: Callable, units: list, shared: dict | None = None): ...


def create_store(path: str | Path, *, n_models: int, n_train: int, n_targets: int, n_classes: int, alpha: float,
                 seed: int, block_size: int, keep_params: int, n_params: int, config: dict,
                 attrs: dict, logits_dtype: str = "float32") -> zarr.Group:
    """Open or create subsets.zarr; a new store gets its masks written as part of its creation (they are a function
    of the seed), before the store is declared."""
    if logits_dtype not in LOGIT_DTYPES:
        raise ValueError(f"logits_dtype must be one of {LOGIT_DTYPES}, got {logits_dtype!r}")
    inner = min(TARGET_CHUNK, n_targets)
    arrays = {
        "masks": ArraySpec((n_models, n_train), "bool", (block_size, n_train), False),
        "logits": ArraySpec((n_models, n_targets, n_classes), logits_dtype, (block_size, inner, n_classes),
                            float("nan"), shards=(block_size, -(-n_targets // inner) * inner, n_classes),
                            compressed=False),
        "done": ArraySpec((n_models,), "bool", (block_size,), False),
    }
    if keep_params:
        arrays["params"] = ArraySpec((keep_params, n_params), "float32", (block_size, n_params), float("nan"))

    def write_masks(group: zarr.Group) -> None:
        # part of the creation: the store is declared only after its masks are written, so a crash here never
        # leaves all-False masks under a matching config (open_or_create redoes the creation)
        group["masks"][:] = sample_masks(n_models, n_train, alpha, seed)

    return open_or_create(path, arrays, kind=KIND, config=config, initialise=write_masks,
                          attrs={**attrs, "alpha": alpha, "seed": seed, "block_size": block_size})


def pending_blocks(group: zarr.Group) -> list[tuple[int, int]]:
    """(start, stop) of every block with a model not done."""
    done = done_rows(group)
    block = group.attrs["block_size"]
    return [(s, min(s + block, len(done))) for s in range(0, len(done), block) if not done[s:s + block].all()]


def write_block(group: zarr.Group, start: int, logits: np.ndarray, params: np.ndarray | None) -> None:
    """Write one block's rows, then its done flags (a crash between the two leaves the block to redo)."""
    stop = start + len(logits)
    if not np.isfinite(logits).all():
        raise FloatingPointError(f"models {start}..{stop - 1} produced non-finite logits: lower the learning rate")
    group["logits"][start:stop] = logits.astype(group["logits"].dtype)
    if "params" in group and start < group["params"].shape[0]:
        keep = group["params"].shape[0]
        group["params"][start:min(stop, keep)] = params[: min(stop, keep) - start]
    group["done"][start:stop] = True


def run(group: zarr.Group, executor: Executor, train_block: Callable[..., tuple[np.ndarray, Any]],
        shared: dict | None = None) -> int:
    """Train every pending block through the executor; returns the number of models trained.

    train_block((start, stop), **shared) -> (logits (B, T, C), params (B, P) or None).
    """
    blocks = pending_blocks(group)
    done = done_rows(group)
    bar = tqdm(total=len(done), initial=int(done.sum()), unit="model", desc="subset models", dynamic_ncols=True)
    trained = 0
    try:
        for (start, stop), (logits, params) in executor.map_unordered(train_block, blocks, shared):
            write_block(group, start, logits, params)
            trained += stop - start
            bar.update(stop - start)
    finally:
        bar.close()
    return trained
