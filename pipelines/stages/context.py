"""What every stage shares: the run context (config, run directory, task, data, executor) and the driver that runs
a stage's work units through the executor and writes their results."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

from tqdm import tqdm
from upath import UPath

from attribution.store import as_path
from pipelines.config import RunConfig
from pipelines.engine.executor import Executor, make_executor
from pipelines.tasks import Task, TaskData, get_task


@dataclass
class RunContext:
    """What every stage needs: the config, the run directory, the task and its data, the executor.

    run_dir: a local path or an object-store URL (s3://bucket/runs/demo), as `attribution.store.as_path` reads
    it; stages join paths under it and open their stores through attribution.store, so both work."""

    cfg: RunConfig
    run_dir: UPath
    address: str | None = None
    data_dir: Path | None = None
    _executor: Executor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.run_dir = as_path(self.run_dir)

    @cached_property
    def task(self) -> Task:
        return get_task(self.cfg.task)

    @cached_property
    def data(self) -> TaskData:
        return self.task.load_data(self.data_dir)

    @property
    def executor(self) -> Executor:
        if self._executor is None:
            self._executor = make_executor(self.cfg.executor, self.address)
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.close()
            self._executor = None

    def dataset_attrs(self) -> dict:
        return {"dataset": self.cfg.task.name, "dataset_fingerprint": self.data.fingerprint(),
                "n_train": self.data.n_train, "n_targets": self.data.n_targets,
                "num_classes": self.data.num_classes, "targets": self.data.target_map()}


def drive(ctx: RunContext, fn: Callable, units: list[tuple], shared: dict, write: Callable[[tuple, object], None],
          *, total: int, desc: str, unit: str = "model") -> None:
    """Run work units through the executor and write each result as it arrives (the driver is the only writer),
    with a progress bar (items/s, ETA). Units are tuples ending in (start, stop); `total` counts all items, done
    or not, so a resumed stage shows its real progress. Nothing pending: returns without starting the executor."""
    if not units:
        return
    bar = tqdm(total=total, initial=total - sum(u[-1] - u[-2] for u in units), unit=unit, desc=desc,
               dynamic_ncols=True)
    try:
        for done_unit, result in ctx.executor.map_unordered(fn, units, shared):
            write(done_unit, result)
            bar.update(done_unit[-1] - done_unit[-2])
    finally:
        bar.close()
