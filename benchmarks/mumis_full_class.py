"""MU-Mis on full-class removal against retraining, per architecture (docs/methods.md §5).

The paper's claim (ResNet-18, CIFAR-100): forget accuracy 0 with retain and test accuracy within a point of
retraining, using no retain data. Here: MNIST-1D, the first `--n-train` training examples, class `--forget-class`
removed; K full models and K models retrained without the class (the task's recipe, `--epochs` epochs); MU-Mis
with its default hyperparameters (unlearning/mumis.py) at each stop threshold δ of `--deltas`. Printed per δ: mean
forget / retain / test accuracy (FA / RA / TA) and the largest gap to retraining of RA and TA.

Also printed, per architecture: the interference ratio of one small MU-Mis step on the forget set, i.e. the mean
|change| of the retain margins divided by the mean |change| of the forget margins (KLOM's margins; first model,
step of norm 1e-3 along the normalised gradient), and the mean change of each class's logit after MU-Mis (first
model, default δ, whose row is always printed). MU-Mis rests on the forget and remaining samples' input
sensitivities being nearly orthogonal in parameter space (seeds/mu-mis-qa.txt); a larger ratio means a step that
unlearns the class moves the remaining data more.

    .venv/bin/python benchmarks/mumis_full_class.py [--arch cnn mlp] [--width N] [--epochs 150] [--k 3]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os

import numpy as np
import torch

from attribution.masks import model_seeds
from pipelines.config import RecipeConfig, TaskConfig
from pipelines.tasks import get_task
from pipelines.tasks.mnist1d import MLP, ConvNet1D
from pipelines.engine.training import load_state_vector, train_models
from unlearning import METHODS
from unlearning.base import UnlearnData
from unlearning.klom import margins
from unlearning.metrics import accuracy
from unlearning.mumis import MuMisHyperparameters, draw_irrelevant_classes, mu_mis_loss

from machine import describe  # benchmarks/machine.py: scripts run as files, their folder on sys.path


def build_task(arch: str, width: int | None, n_train: int, epochs: int):
    task = get_task(TaskConfig(arch=arch, n_train=n_train, n_test=1000, recipe=RecipeConfig(epochs=epochs)))
    if width is None:
        return task
    make = {"cnn": lambda c: ConvNet1D(c, channels=width), "mlp": lambda c: MLP(c, width=width)}[arch]
    return dataclasses.replace(task, make_model=make)


def accuracies(logits: np.ndarray, y: np.ndarray, point_sets) -> np.ndarray:
    """(FA, RA, TA): mean over models of the accuracy of logits (..., T, C) on each point set."""
    return np.array([np.mean(accuracy(logits[..., idx, :], y[idx])) for idx in point_sets])


def train_margins(model: torch.nn.Module, data, idx: torch.Tensor) -> np.ndarray:
    """The KLOM margins (unlearning.klom.margins) of the training examples `idx`."""
    with torch.no_grad():
        return margins(model(data.x_train[idx]).numpy(), data.y_train[idx].numpy())


def interference_ratio(model: torch.nn.Module, data, forget: torch.Tensor, retain: torch.Tensor,
                       step: float = 1e-3) -> float:
    x, y = data.x_train, data.y_train
    irrelevant = draw_irrelevant_classes(y[forget], data.num_classes, torch.Generator().manual_seed(0))
    stepped = copy.deepcopy(model)
    params = list(stepped.parameters())
    loss = mu_mis_loss(stepped, x[forget], y[forget], irrelevant)
    grads = torch.autograd.grad(loss, params, allow_unused=True)  # the last bias leaves input gradients alone
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= step * g / norm
    change_f = train_margins(stepped, data, forget) - train_margins(model, data, forget)
    change_r = train_margins(stepped, data, retain) - train_margins(model, data, retain)
    return float(np.abs(change_r).mean() / np.abs(change_f).mean())


def logit_shift(model: torch.nn.Module, unlearned: torch.nn.Module, train: UnlearnData) -> np.ndarray:
    """Mean change of each class's logit over the training set from `model` to `unlearned`: does MU-Mis lower
    the forgotten class's logit, or move the others?"""
    with torch.no_grad():
        return (unlearned(train.x) - model(train.x)).mean(0).numpy()


def logit_std(model: torch.nn.Module, train: UnlearnData) -> float:
    with torch.no_grad():
        return float(model(train.x).std())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", nargs="+", default=["cnn", "mlp"])
    p.add_argument("--width", type=int, default=None, help="CNN channels / MLP hidden units (default: the task's)")
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=150, help="the task's recipe has 150 (the MNIST-1D paper's)")
    p.add_argument("--k", type=int, default=3, help="full and retrained models per architecture")
    p.add_argument("--forget-class", type=int, default=0)
    p.add_argument("--deltas", type=float, nargs="+", default=[1.05, 1.1, 1.3, 2.0])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {describe()}")
    print(f"# mumis_full_class: MNIST-1D N={args.n_train}, class {args.forget_class} removed, {args.epochs} epochs, "
          f"K={args.k}, {args.threads} threads, device cpu")
    print(f"{'model':<22} {'FA':>6} {'RA':>6} {'TA':>6} {'max |gap|':>9} {'steps':>6}")
    for arch in args.arch:
        task = build_task(arch, args.width, args.n_train, args.epochs)
        data = task.load_data()
        n = data.n_train
        y = data.y_targets.numpy()
        forget = np.flatnonzero(y[:n] == args.forget_class)
        retain = np.setdiff1d(np.arange(n), forget)
        full_masks = np.ones((args.k, n), bool)
        retrain_masks = full_masks.copy()
        retrain_masks[:, forget] = False
        full = train_models(task, data, full_masks, model_seeds(args.k, 0, stream=0), return_params=True)
        retrained = train_models(task, data, retrain_masks, model_seeds(args.k, 0, stream=1),
                                 epoch_size=len(retain))
        n_params = full.params.shape[1]
        point_sets = (forget, retain, np.arange(n, len(y)))
        ref = accuracies(retrained.logits, y, point_sets)
        label = f"{arch}{'' if args.width is None else args.width} ({n_params} params)"
        print(f"{label + ': full':<22} {' '.join(f'{a:6.3f}' for a in accuracies(full.logits, y, point_sets))}")
        print(f"{'  retrain':<22} {' '.join(f'{a:6.3f}' for a in ref)}")
        models = [load_state_vector(task.build_model(data.num_classes, 0), v).eval() for v in full.params]
        train = UnlearnData(data.x_train, data.y_train)
        x_targets = data.x_targets
        default_delta = MuMisHyperparameters().delta
        first_default = None  # the first model after MU-Mis at the default delta, for the logit shift
        for delta in sorted(set(args.deltas) | {default_delta}):
            accs, steps = [], []
            for i, model in enumerate(models):
                result = METHODS["mu_mis"](model, train, forget, seed=i, delta=delta)
                with torch.no_grad():
                    accs.append(accuracies(result.model(x_targets).numpy(), y, point_sets))
                steps.append(result.info["steps"])
                if delta == default_delta and i == 0:
                    first_default = result.model
            acc = np.mean(accs, axis=0)
            gap = np.abs(acc[1:] - ref[1:]).max()
            print(f"{f'  MU-Mis delta {delta:g}':<22} {' '.join(f'{a:6.3f}' for a in acc)} {gap:9.3f} "
                  f"{np.mean(steps):6.1f}")
        ratio = interference_ratio(models[0], data, torch.from_numpy(forget), torch.from_numpy(retain))
        print(f"  interference ratio (retain / forget margin change, one small MU-Mis step): {ratio:.3f}")
        shift = logit_shift(models[0], first_default, train)
        others = np.delete(shift, args.forget_class)
        print(f"  mean logit change on the training set, first model, default MU-Mis: class {args.forget_class} "
              f"{shift[args.forget_class]:+.2f}, other classes {others.min():+.2f} to {others.max():+.2f} "
              f"(logit std {logit_std(models[0], train):.1f})")


if __name__ == "__main__":
    main()
