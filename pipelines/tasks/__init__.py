"""Tasks: a task is a dataset + an architecture + a training recipe (the contract: `pipelines.tasks.base`).

`get_task(cfg)` returns a `Task` bound to the config's architecture, sizes and recipe overrides: a built-in task
(mnist1d, the embedded default; cifar10) or one of the user's own, named by an import path.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys

from pipelines.config import ConfigError, TaskConfig
from pipelines.tasks import cifar10, mnist1d
from pipelines.tasks.base import DataError, PackedForward, Recipe, Task, TaskData, load_cached

__all__ = ["DataError", "PackedForward", "Recipe", "Task", "TaskData", "get_task", "load_cached"]


def get_task(cfg: TaskConfig) -> Task:
    """The task named by `cfg.name`, bound to the config's architecture, sizes and recipe overrides.

    `cfg.name` is a built-in task (mnist1d, cifar10) or an import path `package.module:make_task` to a callable
    that takes the TaskConfig (its `arch`, and anything else it wants) and returns a `Task` (its contract: the
    `Task` docstring). The module is imported as usual; if it is not found, the import is retried with the
    current working directory first on sys.path (a console script such as `dmu` does not put the working
    directory there), so `examples.digits_task:make_task` works from the repository root. In that case the
    directory is also prepended to PYTHONPATH, which local Ray workers inherit; on a cluster, install the
    package (or set PYTHONPATH) on every node.
    """
    registry = {"mnist1d": mnist1d.task, "cifar10": cifar10.task}
    if ":" in cfg.name:
        task = _import_task(cfg)
    elif cfg.name in registry:
        task = registry[cfg.name](cfg.arch)
    else:
        raise ConfigError(f"unknown task.name {cfg.name!r}; known: {', '.join(registry)}, or an import path "
                          "package.module:make_task")
    overrides = {k: v for k, v in dataclasses.asdict(cfg.recipe).items() if v is not None}
    return dataclasses.replace(task, recipe=dataclasses.replace(task.recipe, **overrides),
                               n_train=cfg.n_train, n_test=cfg.n_test)


def _import_task(cfg: TaskConfig) -> Task:
    """The Task returned by the callable at import path `cfg.name` ("package.module:attribute")."""
    module_name, _, attr = cfg.name.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"task.name {cfg.name!r} must be a built-in task or package.module:make_task")
    module = _import_module(module_name, cfg.name)
    make = getattr(module, attr, None)
    if make is None or not callable(make):
        raise ConfigError(f"task.name {cfg.name!r}: module {module_name} has no callable {attr!r}")
    task = make(cfg)
    if not isinstance(task, Task):
        raise ConfigError(f"task.name {cfg.name!r}: {attr}(task_config) returned {type(task).__name__}, not a "
                          "pipelines.tasks.Task")
    return task


def _import_module(module_name: str, name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only retry when the module itself (or a parent package) is missing, not a dependency it imports.
        if exc.name is None or not (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ConfigError(f"task.name {name!r}: importing {module_name} failed: {exc}") from exc
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
        # local Ray workers start from this process's environment: let them import the module too
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (cwd, os.environ.get("PYTHONPATH")) if p)
    importlib.invalidate_caches()
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"task.name {name!r}: no module {module_name} (looked on sys.path and in {cwd}): "
                          f"{exc}") from exc
