"""The concrete pipeline: tasks, training engine, executors, stages, CLI, reports; `open_run` (pipelines.api) for
analysis scripts."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.api import Run, open_run

__all__ = ["Run", "open_run"]


def __getattr__(name: str):
    # Lazy: `import pipelines.config` (every stage, every Ray worker) should not import the stages and zarr.
    if name in __all__:
        from pipelines import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
