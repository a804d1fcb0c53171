"""The pipeline's stages: each reads the run's config and earlier stores, and writes its own store in the run dir.

`dmu run` calls them in order; every stage skips work already done, so a rerun resumes. Work units are module-level
functions (so Ray can ship them) that take a unit and shared inputs and return arrays; the stage driver writes them.
This module holds what all stages share (the run context, the run directory's lock) and the stage order; each stage
is a module beside it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Self

from tqdm import tqdm
from upath import UPath

from attribution.store import StoreError, as_path, check_reachable, is_local, make_dirs, write_text
from pipelines.config import ConfigError, RunConfig, to_dict
from pipelines.executor import EXIT_HOOKS, Executor, make_executor
from pipelines.tasks import Task, TaskData, get_task

log = logging.getLogger("dmu")


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


LOCK_NAME = ".dmu.lock"


class RunLock:
    """One `dmu run` per run directory: `<run_dir>/.dmu.lock`, JSON naming the holder (host, pid, start time),
    held for the whole run and removed on release (a context manager: also on Ctrl-C and errors).

    A second run on the directory while the holder lives refuses with StoreError naming it. A lock whose process
    is gone on this host (os.kill(pid, 0) raises ProcessLookupError) is taken over with a warning; a lock from
    another host cannot be checked from here, so it refuses, telling how to remove it. Locally the lock file is
    created atomically (O_CREAT | O_EXCL); on an object store it is checked, then written (best effort: S3 has no
    create-if-absent here, so two runs started in the same instant can both take it)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = as_path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.held = False

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        make_dirs(self.run_dir)
        text = json.dumps(self.holder)
        for _ in range(2):  # a second try after taking over a stale lock
            if self._create(text):
                self.held = True
                EXIT_HOOKS.append(self.release)
                return
            old = self._read()
            if old is None:  # removed (or half-written) between our create and read: try once more
                continue
            if old.get("host") != self.holder["host"] or not isinstance(old.get("pid"), int):
                raise StoreError(f"{self.run_dir} is in use by `dmu run` on host {old.get('host')} (pid "
                                 f"{old.get('pid')}, started {old.get('started')}): wait for it to finish, or "
                                 f"delete {self.path} if that run is gone")
            if _alive(old["pid"]):
                raise StoreError(f"{self.run_dir} is in use by `dmu run` pid {old['pid']} on {old['host']} "
                                 f"(started {old.get('started')}): wait for it to finish or stop it (one run per "
                                 f"run directory); delete {self.path} only if that pid is not a dmu run")
            log.warning("dmu: taking over the lock of %s from pid %s on %s (started %s), which is gone",
                        self.run_dir, old["pid"], old["host"], old.get("started"))
            # only if it is still the stale one: another run may have just taken it over (two runs taking over
            # the same stale lock in the same instant can still both succeed: the window is this read to the unlink)
            if self._read() == old:
                self._remove()
        raise StoreError(f"cannot take the lock {self.path} (unreadable, or changing): if no `dmu run` is using "
                         f"{self.run_dir}, delete it and rerun")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self.release in EXIT_HOOKS:
            EXIT_HOOKS.remove(self.release)
        old = self._read()
        if old is not None and old.get("pid") == self.holder["pid"] and old.get("host") == self.holder["host"]:
            self._remove()

    def _create(self, text: str) -> bool:
        if is_local(self.path):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return True
        # object store: no O_EXCL here, so check then write (one PUT) - best effort, see the class docstring
        if self.path.exists():
            return False
        write_text(self.path, text)
        return True

    def _read(self) -> dict | None:
        try:
            old = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return old if isinstance(old, dict) else None

    def _remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def _stages() -> dict[str, Callable[[RunContext], None]]:
    from pipelines.stages import datamodels, forget_sets, models, report, subsets, tune, unlearn

    return {"subsets": subsets.run, "datamodels": datamodels.run, "forget_sets": forget_sets.run, "models": models.run,
            "tune": tune.run, "unlearn": unlearn.run, "report": report.run}


def run_stages(ctx: RunContext, stages: tuple[str, ...] | list[str]) -> None:
    known = _stages()
    unknown = [s for s in stages if s not in known]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; known, in order: {', '.join(known)}")
    if "unlearn" in stages or "tune" in stages:  # unknown methods or hyperparameters: refused before any stage trains anything
        from pipelines.stages.unlearn import check_methods

        check_methods(ctx.cfg)
    make_dirs(ctx.run_dir)  # an object store: checks that its bucket answers (one clear error if not)
    if ctx.cfg.reuse and set(stages) - {"report"}:  # the runs whose stores this one may read (pipelines.reuse)
        from pipelines.reuse import check_sources

        check_sources(ctx.run_dir, ctx.cfg.reuse)
    # the run's config, for `dmu unlearn` / `dmu report` (each store also keeps the part it depends on)
    write_text(ctx.run_dir / "config.json", json.dumps(to_dict(ctx.cfg), indent=2))
    for name in stages:
        log.info("stage %s", name)
        known[name](ctx)


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The config a run was made with (runs/<name>/config.json; the run directory may be an object-store URL)."""
    from pipelines.config import from_dict

    run_dir = as_path(run_dir)
    check_reachable(run_dir)
    path = run_dir / "config.json"
    if not path.exists():
        raise ConfigError(f"{run_dir} is not a run directory (no config.json): run `dmu run CONFIG` first")
    return dataclasses.replace(from_dict(RunConfig, json.loads(path.read_text())), run_dir=str(run_dir))
