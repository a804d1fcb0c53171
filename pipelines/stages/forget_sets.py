"""Stage `forget_sets`: the deletion requests a run evaluates, stored in runs/<name>/forget_sets.json.

Random sets of several sizes, a full class, and A2D's sub-populations from the train x train margin-datamodel matrix
(reference.md §4): the points that score highest on its first and second principal components, and both ends of
those components. Everything is seeded by the run seed, and each set records how it was made.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path

import numpy as np

from attribution.masks import model_rng
from attribution.store import StoreError, diff_keys, normalise_config, open_store
from pipelines.config import RunConfig, to_dict
from pipelines.stages import RunContext

log = logging.getLogger("dmu")

FORGET_STREAM = 7  # seed stream of the random forget sets


def random_forget_set(n_train: int, size: int, seed: int) -> np.ndarray:
    if not 0 < size < n_train:
        raise ValueError(f"a random forget set needs 0 < size < {n_train}, got {size}")
    return np.sort(model_rng(seed, FORGET_STREAM, size).choice(n_train, size, replace=False))


def class_forget_set(labels: np.ndarray, cls: int) -> np.ndarray:
    idx = np.flatnonzero(labels == cls)
    if len(idx) == 0:
        raise ValueError(f"no training example has class {cls}: choose forget_sets.full_class among the labels")
    return idx


def principal_component_scores(datamodel_matrix: np.ndarray, n_components: int = 2) -> np.ndarray:
    """Scores (n_points, n_components): each row of the (targets x training points) datamodel matrix, centred,
    projected on the top principal components. Row j is training example j as a target, so a score ranks the
    training examples by how their predictions depend on the training set along that component (A2D)."""
    centred = datamodel_matrix - datamodel_matrix.mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    scores = u[:, :n_components] * s[:n_components]
    # the sign of a singular vector is arbitrary: fix it so that the largest |score| is positive (reproducible)
    flip = np.sign(scores[np.abs(scores).argmax(axis=0), np.arange(n_components)])
    return scores * flip


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


def fingerprint(indices: np.ndarray) -> int:
    """A forget set's identity in the configs of the stores built on it (models, unlearned)."""
    return zlib.crc32(np.asarray(indices, np.int64).tobytes())


def forget_sets_config(cfg: RunConfig) -> dict:
    return {"seed": cfg.seed, "task": to_dict(cfg.task), "forget_sets": to_dict(cfg.forget_sets)}


def build(ctx: RunContext) -> dict[str, dict]:
    cfg, data = ctx.cfg, ctx.data
    fs = cfg.forget_sets
    sets: dict[str, dict] = {}
    for size in fs.random_sizes:
        sets[f"random_{size}"] = {"indices": random_forget_set(data.n_train, size, cfg.seed),
                                  "how": f"{size} training points drawn uniformly without replacement"}
    if fs.full_class is not None:
        sets[f"class_{fs.full_class}"] = {"indices": class_forget_set(data.y_train.numpy(), fs.full_class),
                                          "how": f"every training point of class {fs.full_class}"}
    if fs.pc_top_k or fs.pc_ends:
        store = open_store(ctx.run_dir / "datamodels" / "lasso.zarr", "datamodels")
        n = data.n_train
        # margin datamodels: rows = training points as targets, columns = training points as features
        matrix = np.asarray(store["margin_weights"][:, :n]).T
        for name, (idx, how) in pc_forget_sets(principal_component_scores(matrix), fs.pc_top_k, fs.pc_ends).items():
            sets[name] = {"indices": idx, "how": how + " of the train x train margin-datamodel matrix (LASSO)"}
    return {name: {"indices": [int(i) for i in s["indices"]], "size": len(s["indices"]), "how": s["how"]}
            for name, s in sets.items()}


def path(run_dir: Path) -> Path:
    return Path(run_dir) / "forget_sets.json"


def load(run_dir: Path) -> dict[str, np.ndarray]:
    p = path(run_dir)
    if not p.exists():
        raise StoreError(f"no forget sets at {p}: run the forget_sets stage first (dmu run CONFIG)")
    return {name: np.asarray(s["indices"], dtype=np.int64) for name, s in json.loads(p.read_text())["sets"].items()}


def run(ctx: RunContext) -> None:
    p = path(ctx.run_dir)
    config = normalise_config(forget_sets_config(ctx.cfg))
    if p.exists():
        stored = json.loads(p.read_text())
        if stored["config"] != config:
            raise StoreError(f"{p} was made with a different config ({'; '.join(diff_keys(stored['config'], config))})"
                             ": restore those settings, or use a new run directory (--run-dir)")
        log.info("forget sets: %s (already built)", ", ".join(stored["sets"]))
        return
    sets = build(ctx)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps({"config": config, "sets": sets}, indent=1))
    tmp.replace(p)
    log.info("forget sets: %s", ", ".join(f"{k} ({v['size']})" for k, v in sets.items()))
