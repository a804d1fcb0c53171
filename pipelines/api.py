"""A Python API for analysis scripts: a finished (or partly finished) run, opened read-only.

```python
from pipelines import open_run
run = open_run("runs/demo")                      # a local path or an object-store URL (s3://bucket/runs/demo)
run.config                                       # the RunConfig the run was made with (config.json)
run.subsets["logits"]                            # zarr arrays, read lazily: index them to read slices
effect = run.predicted_effect([3, 17], targets=run.test_targets)   # datamodel-predicted margin change
idx, w = run.most_influential(1234, k=10)        # the training points that move target 1234 most
values = run.klom("random_50", "dm_matching")    # per-point KLOM against the oracles, as the report scores it
```

Every store is opened once, read-only, and read by slices: nothing here loads a whole (M, T, C), (N, T, C) or
(K, T, C) array except `klom`, which reads one forget set's K x T x C logits as the report does. Target indices
follow the run's one convention: 0..N-1 are the training examples, then the test examples (`test_targets`).
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np
import zarr
from upath import UPath

from attribution.store import StoreError, as_path, open_store
from pipelines.config import RunConfig
from pipelines.rundir.reuse import read_links, store_path
from pipelines.report.evaluate import check_labels, finite_models, run_info
from pipelines.rundir.layout import (
    load_forget_sets,
    load_run_config,
    open_models,
    point_sets,
    split,
    stored_oracle_rows,
    validation_points,
)
from pipelines.rundir.variants import store_name_of
from pipelines.tasks import TaskData, get_task
from unlearning.klom import klom, margins

OUTPUTS = ("margin", "logits")


def open_run(run_dir: str | Path, data_dir: str | Path | None = None) -> Run:
    """A run directory (a local path or an object-store URL), opened read-only for analysis.

    data_dir: where the task's data live (default: the project's data/ folder), needed only by what reads the
    task's data (`data`, `labels`, `klom`, and `most_influential(output="logits")` for its default class)."""
    return Run(run_dir, data_dir)


class Run:
    """The stores of one run; see the module docstring. Stores open on first use, so a run that has finished
    only some stages serves what it has (a missing store is a StoreError naming the stage to run). Stores the
    run reuses from other runs (`links`, pipelines.rundir.reuse) are read where they are."""

    def __init__(self, run_dir: str | Path, data_dir: str | Path | None = None):
        self.run_dir: UPath = as_path(run_dir)
        self.config: RunConfig = load_run_config(self.run_dir)
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self._datamodels: dict[str, zarr.Group] = {}

    def __repr__(self) -> str:
        return f"Run({str(self.run_dir)!r})"

    # ---- stores ------------------------------------------------------------------------------------------

    @property
    def links(self) -> dict[str, str]:
        """The stores this run reuses from other runs: {name in the run ("models.zarr"): location}."""
        return read_links(self.run_dir)

    @cached_property
    def subsets(self) -> zarr.Group:
        """subsets.zarr: `masks` (M, N) bool, `logits` (M, T, C), `done` (M,)."""
        return open_store(store_path(self.run_dir, "subsets.zarr"), "subsets")

    def datamodels(self, method: str = "lasso") -> zarr.Group:
        """datamodels/<method>.zarr (lasso | trak): `weights` (N, T, C), `margin_weights` (N, T), `bias`,
        `margin_bias`, `lds`, `margin_lds`, ..."""
        if method not in self._datamodels:
            self._datamodels[method] = open_store(store_path(self.run_dir, f"datamodels/{method}.zarr"),
                                                  "datamodels")
        return self._datamodels[method]

    @cached_property
    def models(self) -> zarr.Group:
        """models.zarr: `full/{params,logits,seconds,done}` and `oracle/<forget_set>/{...}`."""
        return open_models(self.run_dir)

    @cached_property
    def forget_sets(self) -> dict[str, np.ndarray]:
        """Forget set name -> training indices (forget_sets.json)."""
        return load_forget_sets(self.run_dir)

    def unlearned(self, forget_set: str, method: str) -> zarr.Group:
        """The unlearned store of a method (or a variant's label as the report names it: dm_matching@3x,
        dm_matching[trak]): `logits` (K, T, C), `seconds`, `example_passes`, diagnostics, `done`."""
        return open_store(store_path(self.run_dir, f"unlearned/{forget_set}/{store_name_of(method)}.zarr"),
                          "unlearned")

    @property
    def metrics(self) -> dict | None:
        """report/metrics.json as a dict; None before the report stage has run."""
        path = self.run_dir / "report" / "metrics.json"
        return json.loads(path.read_text()) if path.exists() else None

    # ---- the task's data and the run's index sets --------------------------------------------------------

    @cached_property
    def data(self) -> TaskData:
        """The task's data at the run's sizes (loads the dataset: a task of your own must be importable)."""
        return get_task(self.config.task).load_data(self.data_dir)

    @cached_property
    def labels(self) -> np.ndarray:
        """(T,) labels of every target (training examples, then test)."""
        return self.data.y_targets.numpy()

    @property
    def test_targets(self) -> np.ndarray:
        """Target indices of the test examples (N..T-1), from whichever of subsets.zarr and models.zarr exists."""
        group = self.subsets if store_path(self.run_dir, "subsets.zarr").exists() else self.models
        return np.arange(*group.attrs["targets"]["test"])

    @property
    def lds_models(self) -> slice | np.ndarray:
        """The subset models held out for LDS (never fit by the datamodels): the last datamodels.n_lds rows, as a
        slice; an index array where the datamodels dropped failed models among them (datamodels.drop_failed)."""
        d = self.config.datamodels
        try:
            dropped = self.datamodels("lasso").attrs.get("dropped_rows", [])
        except StoreError:
            dropped = []
        rows = split(int(self.subsets["masks"].shape[0]), d.n_val, d.n_lds, np.asarray(dropped, np.int64))[2]
        contiguous = len(rows) and rows[-1] - rows[0] + 1 == len(rows)
        return slice(int(rows[0]), int(rows[-1]) + 1) if contiguous else rows

    def point_sets(self, forget_set: str) -> dict[str, np.ndarray]:
        """Target indices of the forget, retain (the other training points) and validation points (the test
        targets the report reads: the tune stage's half left out, `validation_points`) of a
        forget set, in the order of `klom`'s arrays."""
        n_train, n_targets = int(self.models.attrs["n_train"]), int(self.models.attrs["targets"]["test"][1])
        return point_sets(self.forget_sets[forget_set], n_train,
                          validation_points(self.run_dir, "reporting", n_train, n_targets))

    # ---- datamodel helpers -------------------------------------------------------------------------------

    def _weights(self, output: str, method: str) -> zarr.Array:
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        store = self.datamodels(method)
        if output == "logits" and "weights" not in store:
            raise ValueError(f"datamodels/{method}.zarr holds margin datamodels only (imported, or fit on imported "
                             "margins): ask for output='margin'")
        return store["margin_weights" if output == "margin" else "weights"]

    def predicted_effect(self, remove, targets=None, output: str = "margin", method: str = "lasso") -> np.ndarray:
        """The datamodel's predicted change of the targets' outputs when the training points `remove` are left
        out of training: minus the sum of their weight rows (the linear model's f(all but R) - f(all)).

        remove: training indices (repeats count once); targets: target indices, a slice, or None for all;
        output: "margin" -> (t,), "logits" -> (t, C) (an int `targets` drops that axis). Reads only the rows of
        `remove` (in blocks of the store's row chunk) on the chosen targets.
        """
        weights = self._weights(output, method)
        rows = np.unique(np.asarray(remove, dtype=np.int64).ravel())
        if rows.size and (rows[0] < 0 or rows[-1] >= weights.shape[0]):
            raise ValueError(f"remove must hold training indices in [0, {weights.shape[0]})")
        scalar = np.ndim(targets) == 0 and targets is not None and not isinstance(targets, slice)
        cols = slice(None) if targets is None else ([int(targets)] if scalar else targets)
        if not isinstance(cols, slice):
            cols = np.asarray(cols, dtype=np.int64)
        rest = (slice(None),) if weights.ndim == 3 else ()
        n_cols = len(range(*cols.indices(weights.shape[1]))) if isinstance(cols, slice) else len(cols)
        total = np.zeros((n_cols, *weights.shape[2:]), dtype=np.float64)
        step = weights.chunks[0]
        for i in range(0, rows.size, step):  # a bounded block of rows at a time: |remove| may be large
            block = weights.get_orthogonal_selection((rows[i:i + step], cols, *rest))
            total += np.asarray(block, dtype=np.float64).sum(0)
        effect = (0.0 - total).astype(np.float32)  # not -total: no -0.0 where nothing was removed
        return effect[0] if scalar else effect

    def most_influential(self, target: int, k: int = 10, output: str = "margin", method: str = "lasso",
                         cls: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k training points with the largest |weight| on one target's output: (indices, weights), largest
        first (ties by index). A positive weight: the point raises the output (removing it lowers it).

        output "margin": the target's margin; "logits": the logit of class `cls` (default: the target's label).
        Reads the target's column in blocks of the store's row chunk, never the whole (N, T, C) array."""
        weights = self._weights(output, method)
        target = int(target)
        if not 0 <= target < weights.shape[1]:
            raise ValueError(f"target must be in [0, {weights.shape[1]}), got {target}")
        if output == "logits" and cls is None:
            cls = int(self.labels[target])
        index = (target,) if output == "margin" else (target, int(cls))
        step = weights.chunks[0]
        # zarr reads only the chunks that hold this target, one row chunk at a time
        column = np.concatenate([np.asarray(weights[(slice(r, r + step), *index)])
                                 for r in range(0, weights.shape[0], step)]).astype(np.float32)
        order = np.argsort(-np.abs(column), kind="stable")[:k]
        return order, column[order]

    # ---- KLOM ---------------------------------------------------------------------------------------------

    def klom(self, forget_set: str, method: str) -> dict[str, np.ndarray]:
        """Per-point KLOM of one method's K unlearned models against the forget set's K reference oracles, as
        the report computes it: {"forget", "retain", "validation"} -> values on `point_sets(forget_set)`."""
        info = run_info(self.models)  # the report's own checks of the stores
        labels = check_labels(self.labels, info)
        reference = stored_oracle_rows(self.models)["reference"]
        done = np.asarray(self.models[f"oracle/{forget_set}/done"][reference])
        if not done.all():
            raise StoreError(f"forget set {forget_set}: {int(done.sum())} of {done.size} reference oracles "
                             "trained: finish the models stage")
        store = self.unlearned(forget_set, method)
        if not np.asarray(store["done"][:]).all():
            raise StoreError(f"{forget_set}/{method}: not every unlearned model is done: finish the unlearn stage")
        oracle = margins(np.asarray(self.models[f"oracle/{forget_set}/logits"][reference]), labels)
        logits = np.asarray(store["logits"][:])
        finite = finite_models(logits)  # diverged models are left out, as the report leaves them out
        if not finite.any():
            raise StoreError(f"{forget_set}/{method}: all {len(finite)} models diverged (non-finite logits)")
        values = klom(margins(logits[finite], labels), oracle)
        return {name: values[idx] for name, idx in self.point_sets(forget_set).items()}
