"""The subset-training stage driver: subsets.zarr holds one row per subset model (mask, logits, training loss,
test accuracy, done and failed flags).

Model-agnostic: the caller supplies the function that trains a block of models (pipelines does, with its engine).
Work units are fixed blocks of model indices, one Zarr shard each; units return arrays, and this driver writes the
rows and then their `done` flags, so an interrupted run resumes by training only the blocks not done. A model
with non-finite outputs (diverged) is written with `failed` set and `done` not: the stage trains every other
block, then raises FailedModelsError naming the failed rows; a rerun retrains their blocks.

Layout for reading by targets: `logits` (M, T, C) is written one shard per block of models (all targets)
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
from attribution.store import ArraySpec, FailedModelsError, done_rows, open_or_create, read, row_ranges

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
        # each model's quality: mean minibatch loss of its last epoch, accuracy of its logits on
        # the test targets (N..T-1), and whether it produced non-finite outputs (then not done: a rerun
        # retrains it)
        "train_loss": ArraySpec((n_models,), "float64", (block_size,), float("nan")),
        "test_accuracy": ArraySpec((n_models,), "float64", (block_size,), float("nan")),
        "failed": ArraySpec((n_models,), "bool", (block_size,), False),
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


def accuracy_on_test_targets(logits: np.ndarray, test_labels: np.ndarray) -> np.ndarray:
    """(B,) accuracy of each model's logits (B, T, C) on the test targets (the last len(test_labels))."""
    preds = np.asarray(logits[:, logits.shape[1] - len(test_labels):]).argmax(-1)
    return (preds == np.asarray(test_labels)[None]).mean(1)


def failed_models(logits: np.ndarray, train_loss: np.ndarray | None = None,
                  params: np.ndarray | None = None) -> np.ndarray:
    """(B,) bool: which models of a block produced non-finite logits, training loss or parameters."""
    bad = ~np.isfinite(logits).reshape(len(logits), -1).all(1)
    if train_loss is not None:
        bad |= ~np.isfinite(np.asarray(train_loss, dtype=np.float64))
    if params is not None:
        bad[:len(params)] |= ~np.isfinite(params).reshape(len(params), -1).all(1)
    return bad


def write_block(group: zarr.Group, start: int, logits: np.ndarray, params: np.ndarray | None,
                train_loss: np.ndarray | None = None, test_labels: np.ndarray | None = None) -> np.ndarray:
    """Write one block's rows (logits, params, training loss, test accuracy), then its flags: `done` for the
    models with finite outputs, `failed` for the others (a crash before the flags leaves the block to redo).
    Returns the indices of the failed rows. test_labels: labels of the test targets (None: accuracy not
    recorded).

    The accuracy is computed from the logits as stored (after the cast to the store's dtype), so that it
    equals what any reader computes from the store."""
    stop = start + len(logits)
    stored = logits.astype(group["logits"].dtype)
    group["logits"][start:stop] = stored
    keep_rows = 0
    if "params" in group and start < group["params"].shape[0]:
        keep_rows = min(stop, group["params"].shape[0]) - start
        group["params"][start:start + keep_rows] = params[:keep_rows]
    failed = failed_models(stored, train_loss, params[:keep_rows] if keep_rows else None)
    if train_loss is not None:
        group["train_loss"][start:stop] = np.asarray(train_loss, dtype=np.float64)
    if test_labels is not None:
        accuracy = accuracy_on_test_targets(stored, test_labels)
        group["test_accuracy"][start:stop] = np.where(failed, np.nan, accuracy)
    group["failed"][start:stop] = failed
    group["done"][start:stop] = ~failed
    return start + np.flatnonzero(failed)


def run(group: zarr.Group, executor: Executor, train_block: Callable[..., tuple[Any, ...]],
        shared: dict | None = None, test_labels: np.ndarray | None = None) -> int:
    """Train every pending block through the executor; returns the number of models trained (done).

    train_block((start, stop), **shared) -> (logits (B, T, C), params (B, P) or None, train_loss (B,),
    seeds (B,)); the seeds only name failed models. Models with non-finite outputs are recorded as failed
    (`write_block`); after every block has been written, FailedModelsError names them with their seeds.
    """
    blocks = pending_blocks(group)
    done = done_rows(group)
    bar = tqdm(total=len(done), initial=int(done.sum()), unit="model", desc="subset models", dynamic_ncols=True)
    trained, failed = 0, []
    try:
        for (start, stop), (logits, params, train_loss, seeds) in executor.map_unordered(train_block, blocks,
                                                                                           shared):
            rows = write_block(group, start, logits, params, train_loss, test_labels)
            failed += [(int(r), int(seeds[r - start])) for r in rows]  # (row, seed)
            trained += stop - start - len(rows)
            bar.update(stop - start - len(rows))
    finally:
        bar.close()
    if failed:
        raise failed_error("subsets", [(f"row {row}", seed) for row, seed in sorted(failed)], len(done))
    return trained


def failed_error(stage: str, failed: list[tuple[str, int]], total: int) -> FailedModelsError:
    """One line naming a training stage's failed models ("row 5", their seed) and the fix."""
    shown = ", ".join(f"{row} (seed {seed})" for row, seed in failed[:10])
    more = f" and {len(failed) - 10} more" if len(failed) > 10 else ""
    return FailedModelsError(
        f"{stage}: {len(failed)} of {total} models produced non-finite outputs (diverged): {shown}{more}; "
        "they are recorded as failed, not done, and the others are saved: rerun the same command to retry "
        "them, and if they fail again lower task.recipe.lr (in a new run directory)")


def verify_masks(group: zarr.Group, path: str | Path, block: int = 4096) -> list[str]:
    """Problems with a subsets store's masks (empty: none): every row must equal `sample_masks` of the store's
    seed and alpha. Compared by blocks of rows (`block` rows of masks and of regenerated masks at a time)."""
    masks = group["masks"]
    n_models, n_train = masks.shape
    if group.attrs.get("imported"):  # masks copied from a public store (pipelines.interchange): no seed to replay
        return []
    alpha, seed = group.attrs.get("alpha"), group.attrs.get("seed")
    if alpha is None or seed is None:
        return [f"store {path}: attrs lack alpha or seed: the masks cannot be checked; recompute the store"]
    wrong: list[int] = []
    for start in range(0, n_models, block):
        stop = min(start + block, n_models)
        stored = np.asarray(read(masks, slice(start, stop), store=path), dtype=bool)
        expected = sample_masks(stop - start, n_train, alpha, seed, start=start)
        wrong += (start + np.flatnonzero((stored != expected).any(1))).tolist()
    if not wrong:
        return []
    return [(f"store {path}: array masks: rows {row_ranges(np.array(wrong))} differ from the masks of seed "
             f"{seed} (alpha {alpha}): the store was edited; recompute it in a new run directory")]
