"""Stage `unlearn`: every configured method on every full model for every forget set, through the executor.

Reads models.zarr (full models and OM's oracles), forget_sets.json and the datamodel store (only the forget rows);
writes runs/<name>/unlearned/<forget_set>/<method>.zarr with the unlearned logits on all targets (K, T, C) and the
cost per model. DM-Direct's logits are its predictions. Work unit = (forget set, method, block of full models).
Also serves single deletion requests (`dmu unlearn`, `unlearn_one`).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch
import zarr
from torch import nn

from attribution.store import ArraySpec, StoreError, as_path, location, open_group, open_or_create, open_store
from pipelines.config import ConfigError, RunConfig, TaskConfig, to_dict
from pipelines.stages import RunContext, drive
from pipelines.stages import forget_sets as forget_sets_stage
from pipelines.stages.models import om_target, open_models
from pipelines.tasks import Task, TaskData, get_task
from pipelines.training import default_device, load_state_vector, predict_logits
from unlearning import METHODS, UnlearnData, get_method

KIND = "unlearned"
DATAMODEL_METHODS = ("dm_direct", "dm_matching")


def check_methods(cfg: RunConfig) -> None:
    """Unknown methods or hyperparameters are config errors, found before any work starts."""
    for name in cfg.unlearn.methods:
        if name not in METHODS:
            raise ConfigError(f"unknown unlearn.methods entry {name!r}; known: {', '.join(sorted(METHODS))}")
        if name == "retrain":
            raise ConfigError("unlearn.methods: 'retrain' is the oracle ensemble of the models stage; remove it")
    for name, overrides in cfg.unlearn.hparams.items():
        if name not in METHODS:
            raise ConfigError(f"unlearn.hparams has unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
        if not isinstance(overrides, dict):
            raise ConfigError(f"unlearn.hparams.{name} must be a mapping of hyperparameters, e.g. {{epochs: 2}}, "
                              f"got {overrides!r}")
        fields = METHODS[name].Hyperparameters.__dataclass_fields__
        for key in overrides:
            if key not in fields:
                raise ConfigError(f"unknown config key {f'unlearn.hparams.{name}.{key}'!r}; {name} has: "
                                  f"{', '.join(fields) or 'no hyperparameters'}")


def method_seed(seed: int, model: int, forget_set: str, method: str) -> int:
    ss = np.random.SeedSequence([seed, model, zlib.crc32(forget_set.encode()), zlib.crc32(method.encode())])
    return int(ss.generate_state(1)[0] & 0x7FFFFFFF)


def datamodel_store(run_dir: str | Path, datamodel: str, data: TaskData) -> str:
    """The location of the datamodel weight store, checked against the task (complete, same N, T, C, dataset)."""
    path = as_path(run_dir) / "datamodels" / f"{datamodel}.zarr"
    store = open_store(path, "datamodels")
    weights = store["weights"]
    if tuple(weights.shape) != (data.n_train, data.n_targets, data.num_classes):
        raise StoreError(f"datamodel store {datamodel}.zarr has weights {tuple(weights.shape)} but the task has "
                         f"(N, T, C) = {(data.n_train, data.n_targets, data.num_classes)}: it belongs to another "
                         "task or size; recompute the datamodels stage for this config")
    if "done" in store and not np.asarray(store["done"][:]).all():
        raise StoreError(f"datamodel store {datamodel}.zarr is not complete: finish the datamodels stage "
                         "first (dmu run CONFIG --stages datamodels resumes it)")
    fp = store.attrs.get("dataset_fingerprint")
    if fp is not None and fp != data.fingerprint():
        raise StoreError(f"datamodel store {datamodel}.zarr was fit on another dataset (fingerprint {fp}): "
                         "recompute it for this task")
    return location(path)


def read_datamodel_rows(store: str, forget_idx: np.ndarray) -> np.ndarray:
    """The forget rows (|F|, T, C) float32 of a datamodel store (only the row chunks that hold them are read)."""
    weights = open_group(store)["weights"]
    return np.asarray(weights.get_orthogonal_selection((np.sort(forget_idx), slice(None), slice(None))),
                      dtype=np.float32)


def datamodel_rows(run_dir: str | Path, datamodel: str, forget_idx: np.ndarray, data: TaskData) -> np.ndarray:
    """The forget rows (|F|, T, C) of the datamodel weight store, checked against the task."""
    return read_datamodel_rows(datamodel_store(run_dir, datamodel, data), forget_idx)


def unlearn_model(task: Task, data: TaskData, params: np.ndarray, method: str, forget_idx: np.ndarray, *,
                  seed: int, hparams: dict, inputs: dict, device: torch.device) -> tuple[nn.Module | object, np.ndarray,
                                                                                      float, float, dict]:
    """One deletion request on one model: returns (unlearned model or predictor, logits (T, C), seconds, passes,
    info)."""
    model = load_state_vector(task.build_model(data.num_classes, 0), params).to(device)
    train = UnlearnData(data.x_train.to(device), data.y_train.to(device))
    result = get_method(method)(model, train, forget_idx, **inputs, seed=seed, **hparams)
    if isinstance(result.model, nn.Module):
        logits = predict_logits(result.model, data.x_targets.to(device))
    else:  # DM-Direct: its predictions on the datamodel targets
        logits = result.model.logits().detach().float().cpu().numpy()
    return result.model, logits, result.cost.seconds, result.cost.example_passes, result.info


def method_inputs(method: str, k: int, *, full_logits: np.ndarray, oracle_mean: np.ndarray | None,
                  weight_rows: np.ndarray | None, n_train: int) -> dict:
    if method == "oracle_matching":
        return {"oracle_logits": oracle_mean[:n_train]}
    if method in DATAMODEL_METHODS:
        return {"datamodel_weights": weight_rows, "original_logits": full_logits[k]}
    return {}


def unlearn_block(unit: tuple[str, str, int, int], *, task_cfg: TaskConfig, data: TaskData, seed: int,
                  forget_sets: dict, models: str, oracle_means: dict, datamodels: str | None,
                  hparams: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Work unit: one method on full models start..stop-1 for one forget set. It reads its own full models' rows
    from models.zarr and, for the datamodel methods, its forget set's rows of the datamodel store, so no process
    holds every model or every forget set's rows (both stores at their locations, see `location`)."""
    fs, method, start, stop = unit
    task, device = get_task(task_cfg), default_device()
    full = open_group(models)["full"]
    full_params = np.asarray(full["params"][start:stop])
    full_logits = np.asarray(full["logits"][start:stop])
    weight_rows = read_datamodel_rows(datamodels, forget_sets[fs]) if method in DATAMODEL_METHODS else None
    logits, seconds, passes = [], [], []
    for i, k in enumerate(range(start, stop)):
        inputs = method_inputs(method, i, full_logits=full_logits, oracle_mean=oracle_means.get(fs),
                               weight_rows=weight_rows, n_train=data.n_train)
        _, lg, sec, p, _ = unlearn_model(task, data, full_params[i], method, forget_sets[fs],
                                         seed=method_seed(seed, k, fs, method), hparams=hparams.get(method, {}),
                                         inputs=inputs, device=device)
        logits.append(lg)
        seconds.append(sec)
        passes.append(p)
    return np.stack(logits), np.array(seconds), np.array(passes, dtype=np.float64)


def unlearned_config(cfg: RunConfig, fs: str, forget_idx: np.ndarray, method: str) -> dict:
    return {"seed": cfg.seed, "task": to_dict(cfg.task), "models": to_dict(cfg.models),
            "forget_set": {fs: forget_sets_stage.fingerprint(forget_idx)},
            "method": method, "hparams": cfg.unlearn.hparams.get(method, {}),
            "datamodel": cfg.unlearn.datamodel if method in DATAMODEL_METHODS else None}


def run(ctx: RunContext) -> None:
    cfg, data = ctx.cfg, ctx.data
    check_methods(cfg)
    sets = forget_sets_stage.load(ctx.run_dir)
    models = open_models(ctx.run_dir)
    k, block = cfg.models.k, cfg.models.block_size
    if not models["full/done"][:k].all():
        raise StoreError("models.zarr has full models not done: run the models stage first")
    stores: dict[tuple[str, str], zarr.Group] = {}
    units = []
    for fs, idx in sets.items():
        for method in cfg.unlearn.methods:
            arrays = {"logits": ArraySpec((k, data.n_targets, data.num_classes), "float32",
                                          (block, data.n_targets, data.num_classes), float("nan"), compressed=False),
                      "seconds": ArraySpec((k,), "float64", (block,), float("nan")),
                      "example_passes": ArraySpec((k,), "float64", (block,), float("nan")),
                      "done": ArraySpec((k,), "bool", (block,), False)}
            g = open_or_create(ctx.run_dir / "unlearned" / fs / f"{method}.zarr", arrays, kind=KIND,
                               config=unlearned_config(cfg, fs, idx, method),
                               attrs={**ctx.dataset_attrs(), "forget_set": fs, "method": method})
            stores[(fs, method)] = g
            done = g["done"][:]
            units += [(fs, method, s, min(s + block, k)) for s in range(0, k, block) if not done[s:s + block].all()]
    if not units:
        return
    needs_dm = any(m in DATAMODEL_METHODS for m in cfg.unlearn.methods)
    needs_om = "oracle_matching" in cfg.unlearn.methods
    if needs_om:
        if cfg.models.om_oracles < 1:
            raise ConfigError("oracle_matching needs models.om_oracles >= 1 (the oracles whose mean it "
                              "matches)")
        oracle_means = {fs: om_target(models, fs) for fs in sets}
        for fs, target in oracle_means.items():
            if target is None:
                raise StoreError(f"models.zarr has Oracle Matching's oracles for {fs!r} not done: run the "
                                 "models stage first")
    shared = {
        "task_cfg": cfg.task, "data": data, "seed": cfg.seed, "forget_sets": sets,
        "models": location(ctx.run_dir / "models.zarr"), "oracle_means": oracle_means if needs_om else {},
        "datamodels": datamodel_store(ctx.run_dir, cfg.unlearn.datamodel, data) if needs_dm else None,
        "hparams": cfg.unlearn.hparams,
    }
    total = len(sets) * len(cfg.unlearn.methods) * k

    def write(unit: tuple[str, str, int, int], result: tuple) -> None:
        fs, method, start, stop = unit
        g = stores[(fs, method)]
        for array, values in zip(("logits", "seconds", "example_passes"), result):
            g[array][start:stop] = values
        g["done"][start:stop] = True

    drive(ctx, unlearn_block, units, shared, write, total=total, desc="unlearning")


def read_forget_ids(path: Path) -> np.ndarray:
    """Forget-set ids from a file: .npy, a JSON list, or integers separated by whitespace or commas."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"forget-id file {path} does not exist: write the training indices to forget, one per line")
    if path.suffix == ".npy":
        try:
            ids = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:  # EOFError: an empty file
            raise ConfigError(f"forget-id file {path} is not a readable .npy array of integers "
                              f"({exc or type(exc).__name__})") from exc
    else:
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError) as exc:  # binary (a .npy under another name), a directory
            raise ConfigError(f"forget-id file {path} is not a text file of integers ({exc}): write the ids as "
                              "text or JSON, or save them with numpy.save under a .npy name") from exc
        text = text.replace(",", " ").replace("[", " ").replace("]", " ").split()
        try:
            ids = np.array([int(t) for t in text], dtype=np.int64)
        except ValueError as exc:
            raise ConfigError(f"forget-id file {path} holds a non-integer id ({exc}): write training indices "
                              "0..N-1 only") from exc
        except OverflowError as exc:  # beyond int64: no training index
            raise ConfigError(f"forget-id file {path} holds an id too large for a training index ({exc}): "
                              "write training indices 0..N-1 only") from exc
    return np.asarray(ids)


def serve_request(run_dir: str | Path, cfg: RunConfig, forget_ids: np.ndarray, method: str, model_index: int,
                  out: Path, *, hparams: dict | None = None) -> dict:
    """One deletion request from the precomputed stores: unlearn full model `model_index`, write the checkpoint
    (or, for DM-Direct, the predicted logits), and return accuracies before and after. `run_dir` may be an
    object-store URL; `out` is a local file."""
    from unlearning.base import check_forget_idx
    from unlearning.metrics import accuracy

    check_methods(cfg)
    task = get_task(cfg.task)
    data = task.load_data()
    if method not in METHODS or method == "retrain":
        raise ConfigError(f"unknown method {method!r}; known: {', '.join(sorted(set(METHODS) - {'retrain'}))}")
    try:
        idx = check_forget_idx(forget_ids, data.n_train).numpy()
    except ValueError as exc:
        raise ConfigError(f"bad forget ids: {exc}") from exc
    if len(idx) == data.n_train:
        raise ConfigError(f"bad forget ids: they name all {data.n_train} training examples, so nothing is "
                          "retained; forget a subset")
    models = open_models(run_dir)
    k = models.attrs["k"]
    if not 0 <= model_index < k or not models["full/done"][model_index]:
        raise ConfigError(f"--model must name a trained full model in [0, {k}), got {model_index}")
    full_logits = np.asarray(models["full/logits"][model_index])
    inputs: dict = {}
    if method in DATAMODEL_METHODS:
        inputs = {"datamodel_weights": datamodel_rows(run_dir, cfg.unlearn.datamodel, idx, data),
                  "original_logits": full_logits}
    elif method == "oracle_matching":
        sets = forget_sets_stage.load(run_dir)
        match = [fs for fs, f in sets.items() if np.array_equal(np.sort(f), np.sort(idx))]
        if not match:
            raise ConfigError("oracle_matching needs oracles retrained without this forget set, and the run has "
                              "none: use dm_matching, which needs only the datamodels")
        target = om_target(models, match[0])
        if target is None:
            raise ConfigError(f"oracle_matching needs Oracle Matching's oracles for {match[0]!r} "
                              "(models.om_oracles >= 1, trained by the models stage): finish the models "
                              "stage, or use dm_matching")
        inputs = {"oracle_logits": target[:data.n_train]}
    hp = {**cfg.unlearn.hparams.get(method, {}), **(hparams or {})}
    unlearned, logits, seconds, passes, _ = unlearn_model(
        task, data, models["full/params"][model_index], method, idx, seed=method_seed(cfg.seed, model_index, "request",
                                                                                      method),
        hparams=hp, inputs=inputs, device=default_device())
    labels = data.y_targets.numpy()
    retain = np.setdiff1d(np.arange(data.n_train), idx)
    test = np.arange(data.n_train, data.n_targets)

    def accs(lg: np.ndarray) -> dict:
        return {name: float(accuracy(lg[s], labels[s])) for name, s in
                (("forget", idx), ("retain", retain), ("test", test))}

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"run": str(run_dir), "method": method, "model": model_index, "forget_ids": idx.tolist(),
            "seconds": seconds, "example_passes": passes}
    if isinstance(unlearned, nn.Module):
        torch.save({"state_dict": unlearned.state_dict(), **meta}, out)
    else:
        torch.save({"predicted_logits": torch.as_tensor(logits), **meta}, out)
    return {"before": accs(full_logits), "after": accs(logits), "seconds": seconds, "example_passes": passes,
            "out": str(out)}
