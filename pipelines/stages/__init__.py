"""The pipeline's stages: each reads the run's config and earlier stores, and writes its own store in the run dir.

`dmu run` calls them in order; every stage skips work already done, so a rerun resumes. Work units are module-level
functions (so Ray can ship them) that take a unit and shared inputs and return arrays; the stage driver
(`context.drive`) writes them. `context` holds what all stages share; each stage is a module beside it, and
`STAGES` is their order.
"""

from __future__ import annotations

import json
import logging
from typing import Callable

from attribution.store import make_dirs, write_text
from pipelines.config import ConfigError, to_dict, validate
from pipelines.rundir.reuse import check_sources
from pipelines.stages import datamodels, forget_sets, models, report, subsets, tune, unlearn
from pipelines.stages.context import RunContext

log = logging.getLogger("dmu")

STAGES: dict[str, Callable[[RunContext], None]] = {
    "subsets": subsets.run, "datamodels": datamodels.run, "forget_sets": forget_sets.run, "models": models.run,
    "tune": tune.run, "unlearn": unlearn.run, "report": report.run}


def run_stages(ctx: RunContext, stages: tuple[str, ...] | list[str]) -> None:
    """Run `stages` in the order given (each resumes where its store left off), after checking the config for
    them (pipelines.config.validate), so that a bad config fails before any stage runs."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; known, in order: {', '.join(STAGES)}")
    validate(ctx.cfg, stages)
    make_dirs(ctx.run_dir)  # an object store: checks that its bucket answers (one clear error if not)
    unlearn.check_margin_only(ctx, stages)  # a margin-only models.zarr (dmu import edub): what it cannot serve
    datamodels.check_imported(ctx, stages)  # an imported margin-only subsets.zarr: LASSO on margins only
    if ctx.cfg.reuse and set(stages) - {"report"}:  # the runs whose stores this one may read (rundir.reuse)
        check_sources(ctx.run_dir, ctx.cfg.reuse)
    # the run's config, for `dmu unlearn` / `dmu report` (each store also keeps the part it depends on)
    write_text(ctx.run_dir / "config.json", json.dumps(to_dict(ctx.cfg), indent=2))
    for name in stages:
        log.info("stage %s", name)
        STAGES[name](ctx)
