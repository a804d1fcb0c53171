"""What both datamodel estimators (LASSO in `datamodels.py`, TRAK in `trak.py`) read and write.

They read the subset models of subsets.zarr through `SubsetSource`, which checks the store once in the driver and
then hands work units only the slices they ask for (masks by model rows; logits and margins by model rows and
targets), so no process holds the (M, T, C) logits. They write one store schema, datamodels/<method>.zarr
(`store_arrays`), whose target chunks are owned by one work unit each.

An imported subsets.zarr (`dmu import datamodels-release` or `datamodels-store`) may hold margins only: LASSO then
fits the margins alone into a margin-only datamodel store (`margin_*` arrays, attr `margin_only`), which is what
DM-Direct on margins reads; the store is checked against its own attrs, since the run's task data may be absent.

Failed subset models are refused, or with `datamodels.drop_failed` left out: the fit / validation / LDS splits
(`split`) are then index arrays over the surviving rows (read one block of stored rows at a time), the stores'
config holds `drop_failed: true` and their attrs `dropped_rows` and `dropped_seeds` (`dropped_attrs`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import zarr

from attribution.masks import model_seeds
from attribution.store import (
    ArraySpec,
    StoreError,
    as_path,
    exists,
    location,
    normalise_config,
    open_group,
    open_store,
    read,
    row_ranges,
)
from pipelines.config import RunConfig, to_dict
from pipelines.rundir.layout import split
from pipelines.rundir.reuse import store_path
from pipelines.rundir.seeds import SUBSET_TRAIN_STREAM
from pipelines.stages.context import RunContext
from pipelines.stages.subsets import subsets_config
from unlearning.klom import margins

log = logging.getLogger("dmu")

KIND = "datamodels"
ROW_CHUNK = 256  # training points per Zarr chunk of the weights: a forget request reads ceil(|F| rows / 256) chunks
CHECK_TARGETS = 1024  # targets per read when the driver checks the subset logits (a multiple of their 128-chunks)
# subsets.zarr attr: the number of done models whose logits were found finite, so that later stages skip the scan
# (the whole store: 48 GB at CIFAR-10 size) until the subsets stage finishes more models
CHECKED_ATTR = "finite_checked_done"
Rows = slice | np.ndarray  # model rows: a slice or an index array


@dataclass
class SubsetSource:
    """Read access to a complete subsets.zarr by slices; small and picklable, so work units receive it and read
    their own slices from the store (a shared filesystem or an object store that every node reaches).

    Target indices follow the run's one convention: 0..N-1 the training examples, then the test examples.
    """

    path: str
    n_models: int
    n_train: int
    n_targets: int
    n_classes: int
    labels: np.ndarray | None  # (T,) the targets' labels, for margins (None: margins stored)
    splits: tuple[np.ndarray, np.ndarray, np.ndarray]  # fit, validation, LDS model rows (`split`)
    dropped: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # failed rows left out
    margin_only: bool = False  # an imported store of margins (M, T), no logits; n_classes is then 0
    _group: zarr.Group | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_group": None}  # an open zarr group stays with its process

    @property
    def group(self) -> zarr.Group:
        if self._group is None:
            self._group = open_group(self.path, mode="r")
        return self._group

    @property
    def rows(self) -> np.ndarray:
        """Every model row the datamodels use: the fit, validation and LDS rows in this order (increasing)."""
        return np.concatenate(self.splits)

    def positions(self) -> tuple[slice, slice, slice]:
        """Where the fit, validation and LDS models lie in what `masks(self.rows)` and `outputs(self.rows, ...)`
        return."""
        a, b = len(self.splits[0]), len(self.splits[0]) + len(self.splits[1])
        return slice(0, a), slice(a, b), slice(b, b + len(self.splits[2]))

    def checkpoints(self, n: int) -> np.ndarray:
        """Rows of TRAK's n checkpoints: the first n subset models that were not dropped."""
        return np.setdiff1d(np.arange(n + len(self.dropped)), self.dropped)[:n]

    def _read(self, name: str, rows: Rows, rest: tuple = ()) -> np.ndarray:
        """`name`[rows, *rest]; rows: a slice or an index array, read one block of stored rows at a time (each
        chunk once; memory: the result plus one block)."""
        arr = self.group[name]
        if not isinstance(rows, slice):
            rows = np.asarray(rows, dtype=np.int64)
            if len(rows) == 0 or np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
                rows = slice(int(rows[0]), int(rows[0]) + len(rows)) if len(rows) else slice(0, 0)
        if isinstance(rows, slice):
            return read(arr, (rows, *rest), store=self.path)
        block = arr.shards[0] if arr.shards else arr.chunks[0]
        out = None
        for b in np.unique(rows // block):
            at = np.flatnonzero(rows // block == b)
            lo, hi = int(rows[at].min()), int(rows[at].max()) + 1
            part = read(arr, (slice(lo, hi), *rest), store=self.path)
            if out is None:
                out = np.empty((len(rows), *part.shape[1:]), dtype=part.dtype)
            out[at] = part[rows[at] - lo]
        return out

    def masks(self, rows: Rows = slice(None)) -> np.ndarray:
        """(m, N) bool training-set indicators of the models in `rows` (a corrupt chunk: CorruptChunkError)."""
        return np.asarray(self._read("masks", rows), dtype=bool)

    def params(self, rows: Rows) -> np.ndarray:
        """(m, P) float32 parameters of the models in `rows` (kept for the first subsets.keep_params models)."""
        return np.asarray(self._read("params", rows), dtype=np.float32)

    def logits(self, rows: Rows, targets: slice) -> np.ndarray:
        """(m, t, C) float32 logits of the models in `rows` on `targets` (only those targets' chunks are read;
        a corrupt chunk: CorruptChunkError)."""
        return np.asarray(self._read("logits", rows, (targets,)), dtype=np.float32)

    def outputs(self, rows: Rows, targets: slice) -> tuple[np.ndarray, np.ndarray]:
        """Logits (m, t, C) and margins (m, t) float32 of the models in `rows` on `targets`."""
        logits = self.logits(rows, targets)
        return logits, margins(logits, self.labels[targets]).astype(np.float32)

    def margins(self, rows: Rows, targets: slice) -> np.ndarray:
        """Margins (m, t) float32 of the models in `rows` on `targets`: stored (margin-only), else of the logits."""
        if self.margin_only:
            return np.asarray(self._read("margins", rows, (targets,)), dtype=np.float32)
        return self.outputs(rows, targets)[1]


def check_finite(logits: zarr.Array, path, failed: np.ndarray) -> None:
    """Refuse subset logits with a non-finite value outside the failed rows, reading one block of models x
    CHECK_TARGETS targets at a time (the check's memory grows with neither M nor T)."""
    block = logits.shards[0] if logits.shards else logits.chunks[0]
    bad: set[int] = set()
    for start in range(0, logits.shape[0], block):
        for t0 in range(0, logits.shape[1], CHECK_TARGETS):
            rows = read(logits, (slice(start, start + block), slice(t0, t0 + CHECK_TARGETS)), store=path)
            bad.update((start + np.flatnonzero(~np.isfinite(rows).reshape(len(rows), -1).all(1))).tolist())
    bad = sorted(bad - set(failed.tolist()))
    if bad:
        raise StoreError(f"subsets.zarr has non-finite logits in models {bad[:5]}: retrain them (delete the "
                         "store) or lower the learning rate")


def open_subsets(ctx: RunContext) -> SubsetSource:
    """subsets.zarr of this run, checked against its task and config, complete and finite (read in blocks of
    models, so the check holds one block's logits at a time); an imported margin-only store against its own attrs.

    Failed models (diverged: `failed` set, not done) are refused (a rerun of the subsets stage retrains them),
    or with datamodels.drop_failed left out of their split (`split`) and named in `SubsetSource.dropped`."""
    path = store_path(ctx.run_dir, "subsets.zarr")  # a reused run's where linked (pipelines.rundir.reuse)
    group = open_store(path, "subsets")
    if group.attrs.get("margin_only"):
        return _open_imported_margins(ctx, group, path)
    if group.attrs.get("dataset_fingerprint") != ctx.data.fingerprint():
        raise StoreError(f"{path} holds models of another dataset ({group.attrs.get('dataset')}, fingerprint "
                         f"{group.attrs.get('dataset_fingerprint')}): use this config's own run directory")
    if group.attrs.get("config") != normalise_config(subsets_config(ctx.cfg)):
        raise StoreError(f"{path} was made with another subsets/task config: rerun the subsets stage with this "
                         "config first")
    d = ctx.cfg.datamodels
    failed_flags = np.asarray(read(group["failed"], store=path), dtype=bool)
    failed = np.flatnonzero(failed_flags)
    if len(failed) and not d.drop_failed:
        raise StoreError(f"subsets.zarr has {len(failed)} failed models (non-finite outputs; rows "
                         f"{row_ranges(failed)}): rerun the subsets stage (dmu run CONFIG --stages subsets), which "
                         "retrains them (if they fail again, lower task.recipe.lr in a new run directory), or set "
                         "datamodels.drop_failed: true to fit the datamodels without them")
    done = np.asarray(read(group["done"], store=path))
    if not (done | failed_flags).all():  # failed rows are not done: with drop_failed they are left out
        raise StoreError(f"subsets.zarr has {int(done.sum())}/{done.size} models done: finish the subsets stage "
                         "first (dmu run CONFIG --stages subsets resumes it)")
    masks, logits = group["masks"], group["logits"]
    if masks.shape[0] != logits.shape[0]:
        raise StoreError(f"subsets.zarr has {masks.shape[0]} masks but {logits.shape[0]} rows of logits: the store "
                         "is damaged; recompute it in a new run directory")
    _check_finite_once(ctx, group, path, logits, failed, int(done.sum()))
    splits = split(logits.shape[0], d.n_val, d.n_lds, failed)
    if len(failed):
        log.warning("datamodels.drop_failed: dropping %d failed subset models (rows %s); fitting on %d, "
                    "validating on %d, LDS on %d", len(failed), row_ranges(failed), *map(len, splits))
    return SubsetSource(path=location(path), n_models=logits.shape[0], n_train=masks.shape[1],
                        n_targets=logits.shape[1], n_classes=logits.shape[2], labels=ctx.data.y_targets.numpy(),
                        splits=splits, dropped=failed.astype(np.int64))


def _check_finite_once(ctx: RunContext, group: zarr.Group, path, outputs: zarr.Array, failed: np.ndarray,
                       n_done: int) -> None:
    """`check_finite` unless the store records that its `n_done` models were checked (recorded in this run's own
    store; a reused run's store stays read-only)."""
    if group.attrs.get(CHECKED_ATTR) != n_done:
        check_finite(outputs, path, failed)
        if path == as_path(ctx.run_dir) / "subsets.zarr":
            open_group(path, mode="r+").attrs[CHECKED_ATTR] = n_done


def _open_imported_margins(ctx: RunContext, group: zarr.Group, path) -> SubsetSource:
    """A margin-only subsets.zarr written by an import (`masks` (M, N), `margins` (M, T), `done`): complete and
    finite; no task data is read (the targets are the store's: its N training points, then its test points)."""
    done = np.asarray(read(group["done"], store=path), dtype=bool)
    if not done.all():
        raise StoreError(f"{path} has {int(done.sum())}/{done.size} imported models: finish the import first "
                         "(the same dmu import command resumes it)")
    masks, stored = group["masks"], group["margins"]
    if masks.shape[0] != stored.shape[0] or stored.shape[1] != group.attrs.get("n_targets"):
        raise StoreError(f"{path} has masks {masks.shape} but margins {stored.shape}: the store is damaged; "
                         "import it again into a new run directory")
    _check_finite_once(ctx, group, path, stored, np.zeros(0, np.int64), int(done.sum()))
    d = ctx.cfg.datamodels
    if masks.shape[0] - d.n_val - d.n_lds < 2:
        raise StoreError(f"{path} holds {masks.shape[0]} imported models, too few for datamodels.n_val = {d.n_val} "
                         f"and n_lds = {d.n_lds} held out and two to fit: hold out fewer")
    return SubsetSource(path=location(path), n_models=masks.shape[0], n_train=masks.shape[1],
                        n_targets=stored.shape[1], n_classes=0, labels=None,
                        splits=split(masks.shape[0], d.n_val, d.n_lds), margin_only=True)


def imported_margins(run_dir) -> dict | None:
    """The config of the run's subsets.zarr where it is an imported margin-only store (what a datamodel store fit
    on it records in place of the subsets stage's config), else None."""
    path = store_path(run_dir, "subsets.zarr")
    if not exists(path):
        return None
    attrs = open_store(path, "subsets").attrs
    return {"imported": attrs.get("config")} if attrs.get("margin_only") else None


def source_attrs(ctx: RunContext, source: SubsetSource) -> dict:
    """The dataset attrs of a datamodel store fit on `source`: the task's (`RunContext.dataset_attrs`), or for an
    imported margin-only store its own shapes (the task's data is not read)."""
    if not source.margin_only:
        return ctx.dataset_attrs()
    n, t = source.n_train, source.n_targets
    return {"dataset": ctx.cfg.task.name, "n_train": n, "n_targets": t, "margin_only": True,
            "targets": {"train": [0, n], "test": [n, t]}}


def datamodels_config(cfg: RunConfig, method: str, subsets: dict | None = None) -> dict:
    """What defines a datamodel store of `method`: its settings and the subset models' (`subsets`: an imported
    store's, `imported_margins`; default the subsets stage's config)."""
    d = cfg.datamodels
    keys = {"lasso": ("n_val", "n_lds", "n_lambdas", "lambda_ratio", "target_chunk", "weights_dtype"),
            "trak": ("n_val", "n_lds", "trak_checkpoints", "trak_proj_dim", "trak_lambda_reg", "target_chunk",
                     "weights_dtype")}
    # drop_failed only when set: a store fit on every model keeps the config (and hash) it had before the key
    drop = {"drop_failed": True} if d.drop_failed else {}
    return {"subsets": subsets or subsets_config(cfg), "method": method, **{k: to_dict(d)[k] for k in keys[method]},
            **drop}


def dropped_attrs(cfg: RunConfig, source: SubsetSource) -> dict:
    """What a datamodel store records of the failed subset models it was fit without (datamodels.drop_failed):
    their rows and training seeds (empty lists: none)."""
    rows = [int(r) for r in source.dropped]
    seeds = [int(model_seeds(1, cfg.seed, SUBSET_TRAIN_STREAM, start=r)[0]) for r in rows]
    return {"dropped_rows": rows, "dropped_seeds": seeds}


def check_dropped(group: zarr.Group, path, source: SubsetSource) -> None:
    """Refuse to resume a datamodel store fit without other subset models than those dropped now (the subsets
    stage retrained some since, or others failed): its finished parts would mix two sets of models."""
    stored = [int(r) for r in group.attrs.get("dropped_rows", [])]
    now = [int(r) for r in source.dropped]
    if stored != now:
        raise StoreError(f"{path} was fit without the failed subset models "
                         f"{row_ranges(np.array(stored)) if stored else '(none)'}, but the failed ones are now "
                         f"{row_ranges(np.array(now)) if now else '(none)'}: move it away to fit it again on "
                         "today's models, or use a new run directory (--run-dir)")


def store_arrays(n_train: int, n_targets: int, n_classes: int, target_chunk: int,
                 weights_dtype: str = "float32") -> dict[str, ArraySpec]:
    """The datamodel store: `weights` (N, T, C) and `margin_weights` (N, T) chunked (256 rows, target_chunk), so
    a forget request reads only its rows and each target-chunk work unit writes only its own chunks; per-target
    `bias`, `lambda`, `val_mse`, `lds` (and `margin_` ones); `done` per target chunk. n_classes 0: the margin
    part and `done` only (a margin-only store)."""
    rows = min(ROW_CHUNK, n_train)
    nan = float("nan")
    per_target = {name: ArraySpec((n_targets, n_classes), "float32", (target_chunk, n_classes), nan)
                  for name in ("bias", "lambda", "val_mse", "lds")}
    per_margin = {f"margin_{name}": ArraySpec((n_targets,), "float32", (target_chunk,), nan)
                  for name in ("bias", "lambda", "val_mse", "lds")}
    n_units = -(-n_targets // target_chunk)
    margin_part = {"margin_weights": ArraySpec((n_train, n_targets), weights_dtype, (rows, target_chunk), nan),
                   **per_margin, "done": ArraySpec((n_units,), "bool", (1,), False)}
    if n_classes == 0:
        return margin_part
    return {"weights": ArraySpec((n_train, n_targets, n_classes), weights_dtype, (rows, target_chunk, n_classes),
                                 nan), **per_target, **margin_part}


def target_units(n_targets: int, chunk: int, done: np.ndarray) -> list[tuple[int, int]]:
    """(t0, t1) of every target chunk not done."""
    return [(t0, min(t0 + chunk, n_targets)) for i, t0 in enumerate(range(0, n_targets, chunk)) if not done[i]]


def write_targets(group: zarr.Group, t0: int, t1: int, result: dict) -> None:
    """A work unit writes its own target chunk of every array in `result` (the driver then marks it done)."""
    if "weights" in result:
        group["weights"][:, t0:t1, :] = result["weights"].astype(group["weights"].dtype)
    group["margin_weights"][:, t0:t1] = result["margin_weights"].astype(group["margin_weights"].dtype)
    for name in ("bias", "lambda", "val_mse", "lds"):
        for prefix in ("", "margin_"):
            if prefix + name in result:
                group[prefix + name][t0:t1] = result[prefix + name]


def lds_summary(group: zarr.Group, n_train: int) -> dict:
    """Mean LDS over targets (NaN for constant targets skipped): over all targets, and apart on test targets (what
    the literature reports) and training targets (where a point's own presence in a subset dominates its output);
    the logits' only where the store has them."""
    def mean(a: np.ndarray) -> float:
        return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")

    margin_lds = np.asarray(group["margin_lds"][:])
    summary = {"lds_margin_mean": mean(margin_lds), "lds_margin_test_mean": mean(margin_lds[n_train:]),
               "lds_margin_train_mean": mean(margin_lds[:n_train])}
    if "lds" in group:
        logit_lds = np.asarray(group["lds"][:])
        summary.update(lds_mean=mean(logit_lds), lds_test_mean=mean(logit_lds[n_train:]))
    return summary


def log_lds(name: str, group: zarr.Group) -> None:
    logits = f"{group.attrs['lds_mean']:.3f} (logits), " if "lds_mean" in group.attrs else ""
    log.info("%s datamodels: mean LDS %s%.3f (margins)", name, logits, group.attrs["lds_margin_mean"])


CURVE_TARGETS = 100  # test-target margins the LDS-vs-models curve averages over
