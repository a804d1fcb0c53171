"""A randomized SVD (Halko, Martinsson & Tropp 2011) of a matrix read by blocks of rows from a store: the principal
component scores of A2D's sub-populations (docs/methods.md §4) at sizes where the dense matrix does not fit."""

from __future__ import annotations

import logging

import numpy as np
import zarr

from attribution.store import read

log = logging.getLogger("dmu")


def row_blocks(weights: zarr.Array | np.ndarray, block_rows: int) -> list[tuple[int, int]]:
    """Row ranges [j0, j1) of at most `block_rows` rows covering `weights`; on a chunked (zarr) array, whole
    chunks of rows where block_rows allows, so that no chunk is decompressed twice in one pass."""
    if block_rows < 1:
        raise ValueError(f"block_rows must be positive, got {block_rows}")
    chunk = (getattr(weights, "chunks", None) or (1,))[0]
    step = block_rows // chunk * chunk if block_rows >= chunk else block_rows
    return [(j0, min(j0 + step, weights.shape[0])) for j0 in range(0, weights.shape[0], step)]


def principal_component_scores(weights: zarr.Array | np.ndarray, n: int, n_components: int = 2, *,
                               block_rows: int = 256, rng: np.random.Generator | None = None,
                               tol: float = 1e-6,
                               max_iter: int = 50) -> np.ndarray:
    """Scores (n, n_components) of A2D's PCA: the rows of the (targets x training points) datamodel matrix
    A = weights[:, :n].T, centred over the targets, projected on the top principal components. Row t is
    training example t as a target, so a score ranks the training examples by how their predictions depend on
    the training set along that component (A2D).

    `weights` (N, T) is the store's `margin_weights` (rows: training points as features; a zarr array, or
    numpy). It is read in blocks of rows, W_b = weights[j0:j1, :n] (at most `block_rows` rows, whole zarr
    chunks), never whole: at CIFAR-10 scale (N = 50,000) the dense float64 A would be 20 GB and its SVD
    O(N^3). The components come from Halko, Martinsson & Tropp's (2011) randomized SVD, as scikit-learn's
    `randomized_svd`: a Gaussian test matrix of l = n_components + 10 columns (drawn from `rng`, default seed 0, so the
    result is deterministic), power iterations re-orthonormalised by QR, then the exact SVD of the small projection
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
    blocks = row_blocks(weights, block_rows)

    # one float64 block, reused: the previous block is not held while the next is read
    buffer = np.empty((max(j1 - j0 for j0, j1 in blocks), n))

    def block(j0: int, j1: int) -> np.ndarray:  # (j1 - j0, n): columns j0:j1 of A, transposed
        out = buffer[:j1 - j0]
        # a zarr array through attribution.store.read: a corrupt chunk is one line naming it
        out[...] = read(weights, (slice(j0, j1), slice(0, n))) if isinstance(weights, zarr.Array) else weights[j0:j1, :n]
        return out

    # first pass: mu and A_c @ Omega together (A_c @ X = A @ X - 1 (mu^T X))
    omega = (rng or np.random.default_rng(0)).standard_normal((p, width))
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
