"""Stage `forget_sets`: the deletion requests a run evaluates, stored in runs/<name>/forget_sets.json.

Random sets of several sizes, a full class, and A2D's sub-populations from the train x train margin-datamodel matrix
(docs/methods.md §4): the points that score highest on its first and second principal components, and both ends of
those components, found by a randomized SVD that reads the matrix from the datamodel store in row blocks (at
CIFAR-10 scale it does not fit in memory). Where the run tunes, also the tune stage's own forget sets, disjoint
from these (`tuning_sets`), and the split of the test targets into the tune stage's validation points and the
report's (`validation_split`). Everything is seeded by the run seed, and each set records how it was made.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from attribution.masks import model_rng
from attribution.store import StoreError, as_path, diff_keys, normalise_config, open_store, write_text
from attribution.svd import principal_component_scores
from pipelines.config import ConfigError, RunConfig, to_dict
from pipelines.rundir.reuse import reuse_store, store_path
from pipelines.rundir.seeds import FORGET_STREAM, PCA_STREAM, TUNE_STREAM, VALIDATION_STREAM
from pipelines.stages.context import RunContext

log = logging.getLogger("dmu")


# Draw j of a size takes index size + j * DRAW_INDEX_STEP of the forget stream: draw 0 is index `size`, and no
# two (size, draw) pairs share an index while sizes stay below the step.
DRAW_INDEX_STEP = 1 << 24


def random_forget_set(n_train: int, size: int, seed: int, draw: int = 0) -> np.ndarray:
    if not 0 < size < n_train:
        raise ValueError(f"a random forget set needs 0 < size < {n_train}, got {size}")
    rng = model_rng(seed, FORGET_STREAM, size + draw * DRAW_INDEX_STEP)
    return np.sort(rng.choice(n_train, size, replace=False))


def draw_name(size: int, draw: int) -> str:
    """random_<size> for the first draw, random_<size>_d<j> for the others."""
    return f"random_{size}" + (f"_d{draw}" if draw else "")


def class_forget_set(labels: np.ndarray, cls: int) -> np.ndarray:
    idx = np.flatnonzero(labels == cls)
    if len(idx) == 0:
        raise ValueError(f"no training example has class {cls}: choose forget_sets.full_class among the labels")
    return idx


def pc_forget_sets(scores: np.ndarray, top_k: int, ends: int) -> dict[str, tuple[np.ndarray, str]]:
    sets = {}
    for c in range(scores.shape[1]):
        order = np.argsort(-scores[:, c], kind="stable")
        if top_k:
            sets[f"pc{c + 1}_top{top_k}"] = (np.sort(order[:top_k]),
                                             f"the {top_k} training points with the highest score on PC{c + 1}")
        if ends:
            sets[f"pc{c + 1}_ends{ends}"] = (np.sort(np.concatenate([order[:ends], order[-ends:]])),
                                             f"{ends} points from each end of PC{c + 1}")
    return sets


def forget_sets_config(cfg: RunConfig) -> dict:
    t = cfg.tune
    return {"seed": cfg.seed, "task": to_dict(cfg.task), "forget_sets": to_dict(cfg.forget_sets),
            "tuning": {"random_sizes": list(t.random_sizes), "full_class": t.full_class, "pc_top_k": t.pc_top_k,
                       "validation": "half of the test targets"}
            if tuning(cfg) else None}


def tuning(cfg: RunConfig) -> bool:
    """Whether the run tunes (tune.grid names a method): only then are tuning sets drawn and their oracles
    trained."""
    return bool(cfg.tune.grid)


def tuning_sets(ctx: RunContext, evaluated: dict[str, dict]) -> dict[str, dict]:
    """The tune stage's forget sets, of the evaluated kinds but disjoint from every evaluated set: random sets
    drawn from the points outside them (own seed stream), a class without them, and the top scores on PC3 of
    the margin-datamodel matrix among them. No evaluated set's points (or oracles) enter tuning."""
    cfg, data = ctx.cfg, ctx.data
    t = cfg.tune
    used = np.zeros(data.n_train, dtype=bool)
    for s in evaluated.values():
        used[s["indices"]] = True
    free = np.flatnonzero(~used)
    sets: dict[str, dict] = {}
    for size in t.random_sizes:
        if size >= len(free):
            raise ConfigError(f"tune.random_sizes: {size} points cannot be drawn from the {len(free)} training "
                             "points outside the evaluated forget sets; choose a smaller size")
        idx = np.sort(model_rng(cfg.seed, TUNE_STREAM, size).choice(free, size, replace=False))
        sets[f"tune_random_{size}"] = {"indices": idx, "how": f"{size} training points drawn uniformly from those "
                                                              "outside every evaluated forget set"}
    if t.full_class is not None:
        idx = np.intersect1d(class_forget_set(data.y_train.numpy(), t.full_class), free)
        sets[f"tune_class_{t.full_class}"] = {"indices": idx, "how": f"every training point of class "
                                                                     f"{t.full_class} outside the evaluated sets"}
    if t.pc_top_k:
        store = open_store(store_path(ctx.run_dir, "datamodels/lasso.zarr"), "datamodels")
        scores = principal_component_scores(store["margin_weights"], data.n_train, 3,
                                            rng=model_rng(cfg.seed, PCA_STREAM, 0))[:, 2]
        order = [i for i in np.argsort(-scores, kind="stable") if not used[i]]
        sets[f"tune_pc3_top{t.pc_top_k}"] = {"indices": np.sort(order[:t.pc_top_k]),
                                             "how": f"the {t.pc_top_k} highest scores on PC3 of the train x train "
                                                    "margin-datamodel matrix outside the evaluated sets"}
    for name, s in sets.items():
        if not 0 < len(s["indices"]) < data.n_train:
            raise ConfigError(f"tuning set {name} has {len(s['indices'])} points: choose other tune settings")
    return sets


def build(ctx: RunContext) -> dict[str, dict]:
    cfg, data = ctx.cfg, ctx.data
    fs = cfg.forget_sets
    sets: dict[str, dict] = {}
    for size in fs.random_sizes:
        for draw in range(fs.draws):
            sets[draw_name(size, draw)] = {
                "indices": random_forget_set(data.n_train, size, cfg.seed, draw),
                "how": f"{size} training points drawn uniformly without replacement"
                       + (f" (draw {draw + 1} of {fs.draws})" if fs.draws > 1 else "")}
    if fs.full_class is not None:
        sets[f"class_{fs.full_class}"] = {"indices": class_forget_set(data.y_train.numpy(), fs.full_class),
                                          "how": f"every training point of class {fs.full_class}"}
    if fs.pc_top_k or fs.pc_ends:
        store = open_store(store_path(ctx.run_dir, "datamodels/lasso.zarr"), "datamodels")
        # margin datamodels (N features, T targets), read in row blocks: the PCA's rows are the training points
        # as targets, its columns the training points as features
        scores = principal_component_scores(store["margin_weights"], data.n_train,
                                            rng=model_rng(cfg.seed, PCA_STREAM, 0))
        for name, (idx, how) in pc_forget_sets(scores, fs.pc_top_k, fs.pc_ends).items():
            sets[name] = {"indices": idx, "how": how + " of the train x train margin-datamodel matrix (LASSO)"}
    return _as_json(sets)


def validation_split(n_train: int, n_targets: int, seed: int) -> dict[str, list[int]]:
    """The test targets split once into the tune stage's validation points and the report's, at random (own seed
    stream), half each (the reporting half takes the odd one), so that tuning never reads a reported point."""
    test = model_rng(seed, VALIDATION_STREAM, 0).permutation(np.arange(n_train, n_targets))
    half = len(test) // 2
    return {"tuning": sorted(int(i) for i in test[:half]), "reporting": sorted(int(i) for i in test[half:])}


def _as_json(sets: dict[str, dict]) -> dict[str, dict]:
    return {name: {"indices": [int(i) for i in s["indices"]], "size": len(s["indices"]), "how": s["how"]}
            for name, s in sets.items()}


def run(ctx: RunContext) -> None:
    config = normalise_config(forget_sets_config(ctx.cfg))
    if reuse_store(ctx, "forget_sets.json", config):  # a reused run's, made with this config (pipelines.rundir.reuse)
        return
    p = as_path(ctx.run_dir) / "forget_sets.json"  # this run's own file (reuse_store found no link)
    if p.exists():
        stored = json.loads(p.read_text())
        if stored["config"] != config:
            raise StoreError(f"{p} was made with a different config ({'; '.join(diff_keys(stored['config'], config))})"
                             ": restore those settings, or use a new run directory (--run-dir)")
        log.info("forget sets: %s (already built)", ", ".join(stored["sets"]))
        return
    sets = build(ctx)
    stored = {"config": config, "sets": sets, "tuning": {}}
    if tuning(ctx.cfg):
        stored["tuning"] = _as_json(tuning_sets(ctx, sets))
        stored["validation"] = validation_split(ctx.data.n_train, ctx.data.n_targets, ctx.cfg.seed)
    tune_sets = stored["tuning"]
    # locally: a temporary file renamed
    write_text(p, json.dumps(stored, indent=1))
    log.info("forget sets: %s", ", ".join(f"{k} ({v['size']})" for k, v in sets.items()))
    if tune_sets:
        log.info("tuning sets: %s", ", ".join(f"{k} ({v['size']})" for k, v in tune_sets.items()))
