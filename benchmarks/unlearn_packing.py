"""The unlearn stage's fine-tuning methods packed (G models as one computation) against one model at a time, on a
finished run's stores (`make demo` makes runs/demo): for every variant the run evaluates, the same G full models
unlearned both ways with the same seeds, seconds per model, the speed-up, and how far apart their logits end up.
Both ways run in this one process, one after the other per variant, so the ratio holds under the same load. The
stage-level figure weights each variant's seconds by the runs it makes (every variant runs K models per forget
set); DM-Direct and MU-Mis, which do not pack, count at their one-at-a-time seconds in both columns.

    .venv/bin/python benchmarks/unlearn_packing.py [--run runs/demo] [--forget-set random_50] [--models 8]
        [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from attribution.store import read
from pipelines.engine.apply import method_inputs, models_inputs, unlearn_model, unlearn_pack
from pipelines.engine.training import CPU_PACK_SIZE, packed_forward
from pipelines.rundir.layout import datamodel_rows, load_forget_sets, load_run_config, load_tuned, om_targets, open_models
from pipelines.rundir.reuse import store_path
from pipelines.rundir.seeds import method_seed
from pipelines.rundir.variants import DATAMODEL_METHODS, variants
from pipelines.tasks import get_task
from unlearning import METHODS

from machine import describe  # benchmarks/machine.py: scripts run as files, their folder on sys.path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", default="runs/demo", help="a finished run directory (make demo makes runs/demo)")
    p.add_argument("--forget-set", default=None, help="forget set to unlearn (default: the run's first)")
    p.add_argument("--models", type=int, default=CPU_PACK_SIZE, help="full models, one pack of them")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_run_config(args.run)
    task = get_task(cfg.task)
    data = task.load_data()
    sets = load_forget_sets(args.run)
    fs = args.forget_set or next(iter(sets))
    forget = sets[fs]
    models = open_models(args.run)
    params = read(models["full/params"], slice(0, args.models), store=store_path(args.run, "models.zarr"))
    forward = packed_forward(task, task.build_model(data.num_classes, 0), data.x_train[:1])
    device = torch.device("cpu")

    if not args.json:
        print(f"# {describe()}, {args.threads} torch threads")
    rows = []
    for v in variants(cfg, load_tuned(args.run, cfg)):
        weights = datamodel_rows(args.run, v.datamodel, forget, data) if v.method in DATAMODEL_METHODS else None
        targets = (om_targets(models, fs, slice(0, args.models), data.n_train)
                   if v.method == "oracle_matching" else None)
        inputs = method_inputs(v.method, oracle_targets=targets, weight_rows=weights)
        seeds = [method_seed(cfg.seed, k, fs, v.method) for k in range(args.models)]
        start = time.perf_counter()
        alone = [unlearn_model(task, data, params[g], v.method, forget, seed=seeds[g], hparams=v.hparams,
                               inputs=models_inputs(v.method, inputs, g), device=device)[1] for g in range(args.models)]
        single = (time.perf_counter() - start) / args.models
        packs = METHODS[v.method].packed is not None and forward is not None
        packed, gap = single, 0.0
        if packs:
            start = time.perf_counter()
            out = unlearn_pack(task, data, params, v.method, forget, seeds=seeds, hparams=v.hparams,
                               inputs=inputs, device=device, forward=forward)
            packed = (time.perf_counter() - start) / args.models
            gap = float(max(np.abs(o[0] - a).max() for o, a in zip(out, alone)))
        rows.append({"variant": v.label, "packs": packs, "single_s_per_model": single,
                     "packed_s_per_model": packed, "speedup": single / packed, "max_logit_gap": gap})
        if not args.json:
            print(f"{v.label:28s} one at a time {single:7.3f} s/model  packed {packed:7.3f} s/model  "
                  f"{single / packed:5.2f}x  max |logit gap| {gap:.1e}" + ("" if packs else "  (does not pack)"))
    single_total = sum(r["single_s_per_model"] for r in rows)
    packed_total = sum(r["packed_s_per_model"] for r in rows)
    summary = {"run": args.run, "forget_set": fs, "models": args.models, "threads": args.threads,
               "variants": rows, "stage_single_s_per_model": single_total,
               "stage_packed_s_per_model": packed_total, "stage_speedup": single_total / packed_total}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"unlearn stage (every variant once per model): one at a time {single_total:.2f} s/model, packed "
              f"{packed_total:.2f} s/model: {single_total / packed_total:.2f}x")


if __name__ == "__main__":
    main()
