"""Stage `forget_sets`: the deletion requests a run evaluates, stored in runs/<name>/forget_sets.json.

Random sets of several sizes, a full class, and A2D's sub-populations from the train x train margin-datamodel matrix
(docs/methods.md §4): the points that score highest on its first and second principal components, and both ends of
those components, found by a randomized SVD that reads the matrix from the datamodel store in row blocks (at
CIFAR-10 scale it does not fit in memory). Everything is seeded by the run seed, and each set records how it
was made.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path

import numpy as np
import zarr
from upath import UPath

from attribution.masks import model_rng
from attribution.store import StoreError, as_path, diff_keys, normalise_config, open_store, read, write_text
from pipelines.config import ConfigError, RunConfig, to_dict
from pipelines.reuse import reuse_store, store_path
from pipelines.stages import RunContext

log = logging.getLogger("dmu")

FORGET_STREAM = 7  # seed stream of the random forget sets
TUNE_STREAM = 9  # seed stream of the random tuning sets (the tune stage's, disjoint from the evaluated sets)
PCA_STREAM = 8  # seed stream of the randomized SVD's Gaussian test matrix


def random_forget_set(n_train: int, size: int, seed: int) -> np.ndarray:
    if not 0 < size < n_train:
        raise ValueError(f"a random forget set needs 0 < size < {n_train}, got {size}")
    return np.sort(model_rng(seed, FORGET_STREAM, size).choice(n_train, size, replace=False))


def class_forget_set(labels: np.ndarray, cls: int) -> np.ndarray:
    idx = np.flatnonzero(labels == cls)
    if len(idx) == 0:
        raise ValueError(f"no training example has class {cls}: choose forget_sets.full_class among the labels")
    return idx


def _row_blocks(weights: zarr.Array | np.ndarray, block_rows: int) -> list[tuple[int, int]]:
    """Row ranges [j0, j1) of at most `block_rows` rows covering `weights`; on a chunked (zarr) array, whole
    chunks of rows where block_rows allows, so that no chunk is decompressed twice in one pass."""
    if block_rows < 1:
        raise ValueError(f"block_rows must be positive, got {block_rows}")
    chunk = (getattr(weights, "chunks", None) or (1,))[0]
    step = block_rows // chunk * chunk if block_rows >= chunk else block_rows
    return [(j0, min(j0 + step, weights.shape[0])) for j0 in range(0, weights.shape[0], step)]


def principal_component_scores(weights: zarr.Array | np.ndarray, n: int, n_components: int = 2, *,
                               block_rows: int = 256, seed: int = 0, tol: float = 1e-6,
                               max_iter: int = 50) -> np.ndarray:
    """Scores (n, n_components) of A2D's PCA: the rows of the (targets x training points) datamodel matrix
    A = weights[:, :n].T, centred over the targets, projected on the top principal components. Row t is
    training example t as a target, so a score ranks the training examples by how their predictions depend on
    the training set along that component (A2D).

    `weights` (N, T) is the store's `margin_weights` (rows: training points as features; a zarr array, or
    numpy). It is read in blocks of rows, W_b = weights[j0:j1, :n] (at most `block_rows` rows, whole zarr
    chunks), never whole: at CIFAR-10 scale (N = 50,000) the dense float64 A would be 20 GB and its SVD
    O(N^3). The components come from Halko, Martinsson & Tropp's (2011) randomized SVD, as scikit-learn's
    `randomized_svd`: a Gaussian test matrix of l = n_components + 10 columns (seeded by `seed`, so the result
    is deterministic), power iterations re-orthonormalised by QR, then the exact SVD of the small projection
    B = Q^T A_c (Rayleigh-Ritz). A pass over the store forms A_c^T Q block by block, (A_c^T Q)[j0:j1] =
    W_b @ Q, and A_c @ X = sum_b W_b.T @ X[j0:j1], in float64, the centring A_c = A - 1 mu^T applied as a
    rank-one correction (mu[j] = mean over t < n of weights[j, t]).
    At least scikit-learn's 7 iterations (4 when n_components >= 0.1 min(n, N)), then more, up to `max_iter`,
    until the angle of each of the top components to the exact one is below `tol` (bounded by the Ritz
    residual over the gap to the other Ritz values): a datamodel matrix dominated by its diagonal (the
    self-influences) has a flat spectrum, on which 7 iterations can leave the components ~1% off and change
    their forget sets. A warning says when it stops short (nearly equal singular values: the component is
    ill-defined, for the dense SVD too).
    Peak memory: about 8 * (4 n l + N l + N) + 20 * block_rows * n bytes: the (n, l) and (N, l) float64
    matrices, one float64 block, and the float32 read of the next with zarr's compressed and decoded chunks
    (~280 MB at CIFAR-10 scale with the default block of 256 rows, the store's row chunk).
    """
    p = weights.shape[0]
    k = n_components
    if not 0 < k <= min(n, p):
        raise ValueError(f"n_components must be in [1, {min(n, p)}], got {k}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be positive, got {max_iter}")
    width = min(k + 10, n, p)  # l: scikit-learn's oversampling
    min_iter = 7 if k < 0.1 * min(n, p) else 4  # scikit-learn's choice
    blocks = _row_blocks(weights, block_rows)

    # one float64 block, reused: the previous block is not held while the next is read
    buffer = np.empty((max(j1 - j0 for j0, j1 in blocks), n))

    def block(j0: int, j1: int) -> np.ndarray:  # (j1 - j0, n): columns j0:j1 of A, transposed
        out = buffer[:j1 - j0]
        # a zarr array through attribution.store.read: a corrupt chunk is one line naming it
        out[...] = read(weights, (slice(j0, j1), slice(0, n))) if isinstance(weights, zarr.Array) else weights[j0:j1, :n]
        return out

    # first pass: mu and A_c @ Omega together (A_c @ X = A @ X - 1 (mu^T X))
    omega = model_rng(seed, PCA_STREAM, 0).standard_normal((p, width))
    mu, y = np.empty(p), np.zeros((n, width))
    for j0, j1 in blocks:
        w = block(j0, j1)
        mu[j0:j1] = w.mean(axis=1)
        y += w.T @ omega[j0:j1]
    y -= mu @ omega
    del omega
    q = np.linalg.qr(y)[0]
    # Each later pass gives both Z = A_c^T Q, whose transpose is the B of Q's Rayleigh-Ritz step, and
    # Y = A_c Z = A_c A_c^T Q, the next power iterate: one read of the store per iteration, not two (with a QR
    # between the products) plus one for B. Without that middle QR, float64 loses only the components below
    # ~1e-8 s_1, which the iterations are there to damp anyway.
    z = np.empty((p, width))
    for it in range(1, max_iter + 1):
        col_sums = q.sum(axis=0)
        y, mu_z = np.zeros((n, width)), np.zeros(width)
        for j0, j1 in blocks:
            w = block(j0, j1)
            z[j0:j1] = w @ q - np.outer(mu[j0:j1], col_sums)  # A_c^T Q = A^T Q - mu (1^T Q)
            y += w.T @ z[j0:j1]
            mu_z += mu[j0:j1] @ z[j0:j1]
        y -= mu_z
        u_b, s, _ = np.linalg.svd(z.T, full_matrices=False)  # B = Q^T A_c = u_b diag(s) v^T
        u = q @ u_b[:, :k]
        # Ritz pairs (u_i, s_i^2) of A_c A_c^T: sin(angle to the exact u_i) <= |A_c A_c^T u_i - s_i^2 u_i|
        # / gap_i, the gap to the rest of the spectrum estimated by the other Ritz values (and 0)
        theta = np.r_[s**2, 0.0]
        residual = np.linalg.norm(y @ u_b[:, :k] - u * theta[:k], axis=0)
        gap = np.array([np.delete(np.abs(theta - theta[i]), i).min() for i in range(k)])
        angle = residual / np.maximum(gap, np.finfo(np.float64).tiny)
        # width = min(n, N): Q spans A_c's columns after one pass, the Ritz pairs are exact
        if width == min(n, p) or (angle.max() <= tol and it > min(min_iter, max_iter - 1)):
            log.info("PCA of the margin-datamodel matrix: %d passes over the store", it + 1)
            break
        q = np.linalg.qr(y)[0]
    else:
        log.warning("PCA of the margin-datamodel matrix: after %d passes over the store, PC%d's angle bound "
                    "is %.1e (> %.0e); singular values %s: nearly equal ones make a component ill-defined "
                    "(for a dense SVD too)", max_iter + 1, angle.argmax() + 1, angle.max(), tol,
                    np.array2string(s[:k + 1], precision=4))
    scores = u * s[:k]
    # the sign of a singular vector is arbitrary: fix it so that the largest |score| is positive (reproducible)
    flip = np.sign(scores[np.abs(scores).argmax(axis=0), np.arange(k)])
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
    t = cfg.tune
    return {"seed": cfg.seed, "task": to_dict(cfg.task), "forget_sets": to_dict(cfg.forget_sets),
            "tuning": {"random_sizes": list(t.random_sizes), "full_class": t.full_class, "pc_top_k": t.pc_top_k}
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
        scores = principal_component_scores(store["margin_weights"], data.n_train, 3, seed=cfg.seed)[:, 2]
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
        sets[f"random_{size}"] = {"indices": random_forget_set(data.n_train, size, cfg.seed),
                                  "how": f"{size} training points drawn uniformly without replacement"}
    if fs.full_class is not None:
        sets[f"class_{fs.full_class}"] = {"indices": class_forget_set(data.y_train.numpy(), fs.full_class),
                                          "how": f"every training point of class {fs.full_class}"}
    if fs.pc_top_k or fs.pc_ends:
        store = open_store(store_path(ctx.run_dir, "datamodels/lasso.zarr"), "datamodels")
        # margin datamodels (N features, T targets), read in row blocks: the PCA's rows are the training points
        # as targets, its columns the training points as features
        scores = principal_component_scores(store["margin_weights"], data.n_train, seed=cfg.seed)
        for name, (idx, how) in pc_forget_sets(scores, fs.pc_top_k, fs.pc_ends).items():
            sets[name] = {"indices": idx, "how": how + " of the train x train margin-datamodel matrix (LASSO)"}
    return _as_json(sets)


def _as_json(sets: dict[str, dict]) -> dict[str, dict]:
    return {name: {"indices": [int(i) for i in s["indices"]], "size": len(s["indices"]), "how": s["how"]}
            for name, s in sets.items()}


def path(run_dir: str | Path) -> UPath:
    """runs/<name>/forget_sets.json (the run directory may be an object-store URL), or the reused run's where
    links.json links it (pipelines.reuse)."""
    return store_path(run_dir, "forget_sets.json")


def load(run_dir: str | Path, key: str = "sets") -> dict[str, np.ndarray]:
    """The evaluated forget sets (key "sets") or the tune stage's tuning sets (key "tuning"), name -> indices."""
    p = path(run_dir)
    if not p.exists():
        raise StoreError(f"no forget sets at {p}: run the forget_sets stage first (dmu run CONFIG)")
    return {name: np.asarray(s["indices"], dtype=np.int64)
            for name, s in json.loads(p.read_text()).get(key, {}).items()}


def run(ctx: RunContext) -> None:
    config = normalise_config(forget_sets_config(ctx.cfg))
    if reuse_store(ctx, "forget_sets.json", config):  # a reused run's, made with this config (pipelines.reuse)
        return
    p = as_path(ctx.run_dir) / "forget_sets.json"
    if p.exists():
        stored = json.loads(p.read_text())
        if stored["config"] != config:
            raise StoreError(f"{p} was made with a different config ({'; '.join(diff_keys(stored['config'], config))})"
                             ": restore those settings, or use a new run directory (--run-dir)")
        log.info("forget sets: %s (already built)", ", ".join(stored["sets"]))
        return
    sets = build(ctx)
    tune_sets = _as_json(tuning_sets(ctx, sets)) if tuning(ctx.cfg) else {}
    # locally: a temporary file renamed
    write_text(p, json.dumps({"config": config, "sets": sets, "tuning": tune_sets}, indent=1))
    log.info("forget sets: %s", ", ".join(f"{k} ({v['size']})" for k, v in sets.items()))
    if tune_sets:
        log.info("tuning sets: %s", ", ".join(f"{k} ({v['size']})" for k, v in tune_sets.items()))
