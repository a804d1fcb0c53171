"""MU-Mis on full-class removal against retraining, per architecture (issue 4; reference.md §5).

The paper's claim (ResNet-18, CIFAR-100): forget accuracy 0 with retain and test accuracy within a point of
retraining, using no retain data. Here: MNIST-1D, the first `--n-train` training examples, class `--forget-class`
removed; K full models and K models retrained without the class (the task's recipe, `--epochs` epochs); MU-Mis
with its default hyperparameters (unlearning/mumis.py) at each stop threshold δ of `--deltas`. Printed per δ: mean
forget / retain / test accuracy (FA / RA / TA) and the largest gap to retraining of RA and TA.

Also printed, per architecture: the interference ratio of one small MU-Mis step on the forget set, i.e. the mean
|change| of the retain margins divided by the mean |change| of the forget margins (first model, step of norm 1e-3
along the normalised gradient), and the mean change of each class's logit after MU-Mis (first model, default δ). MU-Mis rests on the forget and remaining samples' input sensitivities being nearly
orthogonal in parameter space (seeds/mu-mis-qa.txt); a larger ratio means a step that unlearns the class moves the
remaining data more.

    .venv/bin/python benchmarks/mumis_full_class.py [--arch cnn mlp] [--width N] [--epochs 150] [--k 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import numpy as np
import torch

from attribution.masks import model_seeds
from pipelines.config import RecipeConfig, TaskConfig
from pipelines.tasks import get_task
from pipelines.tasks.mnist1d import MLP, ConvNet1D
from pipelines.training import load_state_vector, train_models
from unlearning import METHODS
from unlearning.base import UnlearnData
from unlearning.mumis import draw_irrelevant_classes, mu_mis_loss


def build_task(arch: str, width: int | None, n_train: int, epochs: int):
    task = get_task(TaskConfig(arch=arch, n_train=n_train, n_test=1000, recipe=RecipeConfig(epochs=epochs)))
    if width is None:
        return task
    make = {"cnn": lambda c: ConvNet1D(c, channels=width), "mlp": lambda c: MLP(c, width=width)}[arch]
    return dataclasses.replace(task, make_model=make)


def accuracies(logits: np.ndarray, y: np.ndarray, forget: np.ndarray, retain: np.ndarray, n: int) -> np.ndarray:
    """(FA, RA, TA) of logits (..., T, C) over targets = training examples then test examples."""
    pred = logits.argmax(-1)
    y_test = y[n:]
    return np.array([(pred[..., forget] == y[forget]).mean(), (pred[..., retain] == y[retain]).mean(),
                     (pred[..., n:] == y_test).mean()])


def margins(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        z = model(x)
    correct = z.gather(1, y[:, None]).squeeze(1)
    return correct - z.scatter(1, y[:, None], -torch.inf).max(1).values


def interference_ratio(model: torch.nn.Module, data, forget: torch.Tensor, retain: torch.Tensor,
                       step: float = 1e-3) -> float:
    x, y = data.x_train, data.y_train
    irrelevant = draw_irrelevant_classes(y[forget], data.num_classes, torch.Generator().manual_seed(0))
    params = list(model.parameters())
    loss = mu_mis_loss(model, x[forget], y[forget], irrelevant)
    grads = torch.autograd.grad(loss, params, allow_unused=True)  # the last bias leaves input gradients alone
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    before_f, before_r = margins(model, x[forget], y[forget]), margins(model, x[retain], y[retain])
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= step * g / norm
    after_f, after_r = margins(model, x[forget], y[forget]), margins(model, x[retain], y[retain])
    with torch.no_grad():
        for p, g in zip(params, grads):
            p += step * g / norm
    return float((after_r - before_r).abs().mean() / (after_f - before_f).abs().mean())


def logit_shift(model: torch.nn.Module, train: UnlearnData, forget: np.ndarray) -> np.ndarray:
    """Mean change of each class's logit over the training set after MU-Mis with its default hyperparameters:
    does it lower the forgotten class's logit, or move the others?"""
    unlearned = METHODS["mu_mis"](model, train, forget, seed=0).model
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
        ref = accuracies(retrained.logits, y, forget, retain, n)
        label = f"{arch}{'' if args.width is None else args.width} ({n_params} params)"
        print(f"{label + ': full':<22} {' '.join(f'{a:6.3f}' for a in accuracies(full.logits, y, forget, retain, n))}")
        print(f"{'  retrain':<22} {' '.join(f'{a:6.3f}' for a in ref)}")
        models = [load_state_vector(task.build_model(data.num_classes, 0), v).eval() for v in full.params]
        train = UnlearnData(data.x_train, data.y_train)
        x_targets = data.x_targets
        for delta in args.deltas:
            accs, steps = [], []
            for i, model in enumerate(models):
                result = METHODS["mu_mis"](model, train, forget, seed=i, delta=delta)
                with torch.no_grad():
                    accs.append(accuracies(result.model(x_targets).numpy(), y, forget, retain, n))
                steps.append(result.info["steps"])
            acc = np.mean(accs, axis=0)
            gap = np.abs(acc[1:] - ref[1:]).max()
            print(f"{f'  MU-Mis delta {delta:g}':<22} {' '.join(f'{a:6.3f}' for a in acc)} {gap:9.3f} "
                  f"{np.mean(steps):6.1f}")
        ratio = interference_ratio(models[0], data, torch.from_numpy(forget), torch.from_numpy(retain))
        print(f"  interference ratio (retain / forget margin change, one small MU-Mis step): {ratio:.3f}")
        shift = logit_shift(models[0], train, forget)
        others = np.delete(shift, args.forget_class)
        print(f"  mean logit change on the training set, first model, default MU-Mis: class {args.forget_class} "
              f"{shift[args.forget_class]:+.2f}, other classes {others.min():+.2f} to {others.max():+.2f} "
              f"(logit std {logit_std(models[0], train):.1f})")


if __name__ == "__main__":
    main()
