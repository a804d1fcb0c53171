"""Applying an unlearning method to trained models: one deletion request on one model, or on a pack of models as
one computation; the method's inputs from the stores' arrays."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from pipelines.engine.training import load_state_vector, pack_size_for, predict_logits
from pipelines.rundir.variants import DATAMODEL_METHODS
from pipelines.tasks import Task, TaskData
from unlearning import METHODS, UnlearnData, get_method
from unlearning.base import FORWARD_PASS, Cost, PackedForward, StackedPack, Stopwatch


def unlearn_model(task: Task, data: TaskData, params: np.ndarray, method: str, forget_idx: np.ndarray, *,
                  seed: int, hparams: dict, inputs: dict, device: torch.device) -> tuple[nn.Module | object, np.ndarray,
                                                                                      Cost, dict]:
    """One deletion request on one model: returns (unlearned model or predictor, logits (T, C), cost, info).

    The cost counts everything the request needs from the model on: the datamodel methods' forward pass that
    gives the original model's logits on the targets (timed here, T forward passes) and the method itself.
    Only Oracle Matching's oracles are costed elsewhere (the report adds their retraining)."""
    model = load_state_vector(task.build_model(data.num_classes, 0), params).to(device)
    train = UnlearnData(data.x_train.to(device), data.y_train.to(device))
    cost = Cost(0.0, 0.0)
    if method in DATAMODEL_METHODS:
        start = time.perf_counter()
        original = predict_logits(model, data.x_targets.to(device))
        cost = Cost(time.perf_counter() - start, FORWARD_PASS * data.n_targets)
        inputs = {**inputs, "original_logits": original}
    result = get_method(method)(model, train, forget_idx, **inputs, seed=seed, **hparams)
    if isinstance(result.model, nn.Module):
        logits = predict_logits(result.model, data.x_targets.to(device))
    else:  # DM-Direct: its predictions on the datamodel targets
        logits = result.model.logits().detach().float().cpu().numpy()
    return result.model, logits, cost + result.cost, result.info


def unlearn_pack(task: Task, data: TaskData, params: np.ndarray, method: str, forget_idx: np.ndarray, *,
                 seeds: list[int], hparams: dict, inputs: dict, device: torch.device,
                 forward: PackedForward) -> list[tuple[np.ndarray, Cost, dict]]:
    """One deletion request on G models (rows of `params`) as one computation through `forward`, for a method
    that packs (`METHODS[method].packed`): per model (logits (T, C), cost, info), each as `unlearn_model`
    with seed seeds[g] gives it up to rounding. Seconds: the pack's, shared equally."""
    models = [load_state_vector(task.build_model(data.num_classes, 0), p).to(device) for p in params]
    train = UnlearnData(data.x_train.to(device), data.y_train.to(device))
    x_targets = data.x_targets.to(device)
    original = Cost(0.0, 0.0)
    if method in DATAMODEL_METHODS:
        watch = Stopwatch(device)
        logits = StackedPack(models, forward).predict(x_targets)
        original = Cost(watch.seconds() / len(models), FORWARD_PASS * data.n_targets)
        inputs = {**inputs, "original_logits": list(logits)}
    results = METHODS[method].packed(models, forward, train, forget_idx, seeds=seeds, **inputs, **hparams)
    logits = StackedPack([r.model for r in results], forward).predict(x_targets).cpu().numpy()
    return [(logits[g], original + r.cost, r.info) for g, r in enumerate(results)]


def models_inputs(method: str, inputs: dict, g: int | slice) -> dict:
    """The share of a block's inputs (`method_inputs`) of model g, or of the models in slice g: entry g of each
    per-model input (OM's own oracles), the rest (shared by every model) as is."""
    per_model = get_method(method).per_model
    return {name: v[g] if name in per_model and v is not None else v for name, v in inputs.items()}


def unlearn_packs(task: Task, data: TaskData, params: np.ndarray, method: str, forget_idx: np.ndarray, *,
                  seeds: list[int], hparams: dict, inputs: dict, device: torch.device,
                  forward: PackedForward) -> list[tuple[np.ndarray, Cost, dict]]:
    """`unlearn_pack` on a block of models in packs of `pack_size_for` models, each pack with its own models'
    share of the per-model inputs."""
    size = pack_size_for(device, len(params))
    return [r for i in range(0, len(params), size)
            for r in unlearn_pack(task, data, params[i:i + size], method, forget_idx, seeds=seeds[i:i + size],
                                  hparams=hparams, inputs=models_inputs(method, inputs, slice(i, i + size)),
                                  device=device, forward=forward)]


def method_inputs(method: str, *, oracle_targets: np.ndarray | None, weight_rows: np.ndarray | None) -> dict:
    """The method's inputs: OM's per-model targets (G, N, C) as a list of G arrays, the datamodel methods'
    forget rows."""
    if method == "oracle_matching":
        return {"oracle_logits": list(oracle_targets)}
    if method in DATAMODEL_METHODS:
        return {"datamodel_weights": weight_rows}
    return {}
