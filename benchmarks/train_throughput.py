"""Models per hour on this machine, and the fraction of the machine's matrix-multiply limit that each engine reaches.

Setting (docs/methods.md §8): MNIST-1D CNN (or `--arch mlp`), each model trained on its own Bernoulli(0.5) subset of
the first 2,000 training examples, the task's recipe with `--epochs` epochs; accuracy on the 1,000 test examples.
Every engine trains the same models (same masks, seeds and minibatches); the one-at-a-time engine trains a sample of
them and is extrapolated per model. The limit: a model's forward + backward FLOPs (counted by
`torch.utils.flop_counter.FlopCounterMode` on the task's own module, times its example passes) at the rate of a
2048 x 2048 fp32 matrix product on the same threads, measured in this run before every engine (median taken), so
"fraction" is a ratio within one run. Figures and the load they were measured under: README, "Performance".

    .venv/bin/python benchmarks/train_throughput.py [--packed 64] [--single 8] [--pack-sizes 4,8,16] [--epochs 30]
        [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from attribution.masks import model_seeds, sample_masks
from pipelines.config import RecipeConfig, TaskConfig
from pipelines.tasks import Task, TaskData, get_task
from pipelines.engine.training import CPU_PACK_SIZE, train_models

from machine import cpu_model, describe  # benchmarks/machine.py: scripts run as files, their folder on sys.path


def flop_per_example(task: Task, data: TaskData, batch: int = 100) -> float:
    """Forward + backward FLOPs of one training example through the task's (unpacked) model."""
    model = task.build_model(data.num_classes, 0)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(data.x_train[:batch]), data.y_train[:batch]).backward()
    return counter.get_total_flops() / batch


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n fp32 matrix product on the current torch threads (best of `repeats`)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="cnn", help="mnist1d architecture: cnn | mlp")
    p.add_argument("--packed", type=int, default=64, help="models trained by the packed engine")
    p.add_argument("--pack-sizes", default=str(CPU_PACK_SIZE),
                   help="comma-separated models per packed computation, one packed run each")
    p.add_argument("--single", type=int, default=8, help="models trained one at a time (a sample; 0: skip)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    task = get_task(TaskConfig(arch=args.arch, n_train=args.n_train, recipe=RecipeConfig(epochs=args.epochs)))
    data = task.load_data()
    masks = sample_masks(args.packed, data.n_train, 0.5, seed=0)
    seeds = model_seeds(args.packed, 0, stream=1)
    y_test = data.y_test.numpy()
    flop_example = flop_per_example(task, data)
    runs = [("one at a time", args.single, False, None)] if args.single else []
    runs += [("packed", args.packed, True, int(g)) for g in args.pack_sizes.split(",")]
    rows, rates = [], []
    for name, n, packed, pack_size in runs:
        rates.append(matmul_rate())
        start = time.perf_counter()
        r = train_models(task, data, masks[:n], seeds[:n], epoch_size=data.n_train // 2, packed=packed,
                         pack_size=pack_size, device="cpu")
        sec = (time.perf_counter() - start) / n
        acc = (r.logits[:, data.n_train:].argmax(-1) == y_test).mean(1)
        rows.append({"engine": name, "pack_size": pack_size, "models": n, "s_per_model": sec,
                     "models_per_hour": 3600 / sec, "flop_per_model": flop_example * r.example_passes / n,
                     "test_accuracy_mean": float(acc.mean()), "test_accuracy_sd": float(acc.std())})
    rate = statistics.median(rates)
    for row in rows:
        row["limit_s_per_model"] = row["flop_per_model"] / rate
        row["fraction_of_limit"] = row["limit_s_per_model"] / row["s_per_model"]
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads,
               "torch": torch.__version__, "load_average": os.getloadavg(), "matmul_flops": rate,
               "matmul_flops_each_run": rates, "flop_per_example": flop_example, "arch": args.arch,
               "n_train": data.n_train, "recipe": dataclasses.asdict(task.recipe)}
    if args.json:
        print(json.dumps({"machine": machine, "engines": rows}, indent=1))
        return
    print(f"# train_throughput: {describe()}, {args.threads} torch threads, device cpu, load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"# MNIST-1D {args.arch}, N={data.n_train}, alpha=0.5, recipe {task.recipe}")
    print(f"# {flop_example:,.0f} FLOP per example (forward + backward); 2048^2 fp32 matmul "
          f"{rate / 1e9:.0f} GFLOP/s (median of {', '.join(f'{x / 1e9:.0f}' for x in rates)})")
    print(f"{'engine':<14} {'pack':>4} {'models':>6} {'s/model':>8} {'models/h':>9} {'limit s':>8} {'fraction':>8} "
          f"{'test acc':>14}")
    for row in rows:
        print(f"{row['engine']:<14} {row['pack_size'] or '':>4} {row['models']:>6} {row['s_per_model']:>8.3f} "
              f"{row['models_per_hour']:>9.0f} {row['limit_s_per_model']:>8.4f} {row['fraction_of_limit']:>8.3f} "
              f"{row['test_accuracy_mean']:>8.3f} ± {row['test_accuracy_sd']:.3f}")
    if args.single:
        best = min(rows[1:], key=lambda row: row["s_per_model"])
        speedup = rows[0]["s_per_model"] / best["s_per_model"]
        print(f"speed-up (packed {best['pack_size']} / one at a time): {speedup:.2f}x")


if __name__ == "__main__":
    main()
