"""Stage `report`: KLOM and the usual metrics for every method and forget set, the linear-model experiment, and
plots, written to runs/<name>/report/ (report.md, metrics.json, PNGs). Also `dmu report RUN`. On a margin-only
models.zarr (`dmu import edub`) KLOM alone, without the task's data."""

from __future__ import annotations

import logging

from pipelines.rundir.layout import margin_only_models
from pipelines.stages.context import RunContext

log = logging.getLogger("dmu")


def run(ctx: RunContext) -> None:
    from pipelines.stages.linear import linear_experiment
    from pipelines.report import build_report

    if margin_only_models(ctx.run_dir):  # imported margins: KLOM needs no labels, data or linear experiment
        build_report(ctx.run_dir, None, seed=ctx.cfg.seed)
        log.info("report: %s", ctx.run_dir / "report" / "report.md")
        return
    linear = linear_experiment()  # the seed paper's Figure 3: seconds on a CPU
    build_report(ctx.run_dir, ctx.data.y_targets.numpy(), seed=ctx.cfg.seed, linear=linear)
    log.info("report: %s", ctx.run_dir / "report" / "report.md")
