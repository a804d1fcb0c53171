"""Models per hour on this machine: the packed engine vs one model at a time, same recipe, one run.

Setting (reference.md §8): MNIST-1D CNN, each model trained on its own Bernoulli(0.5) subset of the first 2,000
training examples, the task's recipe with `--epochs` epochs; accuracy on the 1,000 test examples. Both engines train
the same models (same masks, seeds and minibatches); the one-at-a-time engine trains a sample of them and is
extrapolated per model.

    .venv/bin/python benchmarks/train_throughput.py [--packed 64] [--single 8] [--epochs 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from attribution.masks import model_seeds, sample_masks
from pipelines.config import RecipeConfig, TaskConfig
from pipelines.tasks import get_task
from pipelines.training import train_models


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--packed", type=int, default=64, help="models trained by the packed engine")
    p.add_argument("--pack-size", type=int, default=None, help="models per packed computation (default: engine's)")
    p.add_argument("--single", type=int, default=8, help="models trained one at a time (a sample)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    task = get_task(TaskConfig(n_train=args.n_train, recipe=RecipeConfig(epochs=args.epochs)))
    data = task.load_data()
    print(f"# train_throughput: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{args.threads} torch threads, torch {torch.__version__}, device cpu")
    print(f"# MNIST-1D CNN, N={data.n_train}, alpha=0.5, recipe {task.recipe}")
    masks = sample_masks(args.packed, data.n_train, 0.5, seed=0)
    seeds = model_seeds(args.packed, 0, stream=1)
    y_test = data.y_test.numpy()
    rows = []
    for name, n, packed in (("one at a time", args.single, False), ("packed", args.packed, True)):
        t0 = time.perf_counter()
        r = train_models(task, data, masks[:n], seeds[:n], epoch_size=data.n_train // 2, packed=packed,
                         pack_size=args.pack_size, device="cpu")
        sec = (time.perf_counter() - t0) / n
        acc = (r.logits[:, data.n_train:].argmax(-1) == y_test).mean(1)
        rows.append((name, n, sec, 3600 / sec, acc.mean(), acc.std()))
    print(f"{'engine':<14} {'models':>6} {'s/model':>8} {'models/h':>9} {'test acc':>14}")
    for name, n, sec, per_hour, acc, sd in rows:
        print(f"{name:<14} {n:>6} {sec:>8.2f} {per_hour:>9.0f} {acc:>8.3f} ± {sd:.3f}")
    print(f"speed-up (packed / one at a time): {rows[0][2] / rows[1][2]:.2f}x")


if __name__ == "__main__":
    main()
