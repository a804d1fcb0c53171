"""Margins and KLOM (KL divergence of margins): per point, how close unlearning came to retraining.

Data flow: logits of unlearned models and of oracle models (retrained without the forget set) -> `margins` ->
`klom` per point -> `klom_summary` per point set (forget / retain / validation), next to `oracle_floor`;
`shift_and_spread` splits what KLOM measures into a mean shift and a spread ratio.
Numpy only; the binning is the project's exact recipe, reference.md §4.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# reference.md §4: both samples clipped to [-100, 100] before binning.
MARGIN_CLIP = 100.0
# reference.md §4: 20 equal-width bins over the pooled [min, max] of both samples.
N_BINS = 20
# reference.md §4: the oracle histogram is floored at 1e-5, then renormalised; KLOM <= about log(1e5) = 11.5.
EPS = 1e-5


def _as_array(x, name: str) -> np.ndarray:
    """A numpy view of an array-like; torch tensors (any device) are detached and copied to the host."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as err:  # pragma: no cover - exotic inputs
        raise ValueError(f"{name} must be array-like, got {type(x).__name__}") from err


def _check_logits_labels(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    """Validate (..., n_points, C) float logits against (n_points,) integer labels; return them as arrays."""
    z = _as_array(logits, "logits")
    y = _as_array(labels, "labels")
    if z.ndim < 2:
        raise ValueError(f"logits must have shape (..., n_points, n_classes), got shape {z.shape}")
    if y.ndim != 1 or y.shape[0] != z.shape[-2]:
        raise ValueError(
            f"labels must have shape (n_points,) = ({z.shape[-2]},) to match logits {z.shape}, got {y.shape}"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers (class indices), got dtype {y.dtype}")
    n_classes = z.shape[-1]
    if n_classes < 2:
        raise ValueError(f"logits need at least 2 classes for a margin, got {n_classes}")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}), got range [{y.min()}, {y.max()}]")
    if not np.issubdtype(z.dtype, np.floating):
        z = z.astype(np.float64)
    elif z.dtype.itemsize < 4:
        z = z.astype(np.float32)  # half precision is too coarse for a log-sum-exp
    if not np.isfinite(z).all():
        raise ValueError("logits contain NaN or inf; check the model outputs before computing margins")
    return z, y


def margins(logits, labels) -> np.ndarray:
    """Margin m = z_y - logsumexp_{k != y} z_k of every point (reference.md §4).

    logits: (..., n_points, C) (e.g. (n_models, n_points, C)); labels: (n_points,) ints.
    Returns (..., n_points) in the logits' float precision. Stable: the log-sum-exp subtracts the largest
    other logit before exponentiating.
    """
    z, y = _check_logits_labels(logits, labels)
    points = np.arange(y.shape[0])
    correct = z[..., points, y]
    others = z.copy()
    others[..., points, y] = -np.inf  # leave the labelled class out of the log-sum-exp
    top = others.max(axis=-1)
    lse = top + np.log(np.exp(others - top[..., None]).sum(axis=-1))
    return correct - lse


def _check_margin_matrix(x, name: str) -> np.ndarray:
    m = _as_array(x, name)
    if m.ndim != 2:
        raise ValueError(f"{name} margins must have shape (n_models, n_points), got shape {m.shape}")
    if m.shape[0] < 1 or m.shape[1] < 1:
        raise ValueError(f"{name} margins need at least one model and one point, got shape {m.shape}")
    m = m.astype(np.float64)
    if np.isnan(m).any():
        raise ValueError(f"{name} margins contain NaN; check the logits they were computed from")
    return m


def _bin_counts(samples: np.ndarray, lo: np.ndarray, hi: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts (n_points, N_BINS) of samples (n_models, n_points) in each point's equal-width bins.

    Bins are [e_b, e_{b+1}) with the last one closed, so the maximum is counted. The index is
    floor((x - lo) / width), then corrected by one against the actual edges where rounding put it a bin off
    (np.histogram's rule), so results agree with np.histogram(range=(lo, hi), bins=N_BINS) bin for bin.
    """
    n_points = samples.shape[1]
    idx = ((samples - lo) / (hi - lo) * N_BINS).astype(np.intp)
    np.minimum(idx, N_BINS - 1, out=idx)  # the maximum lies on the last edge: put it in the last bin
    cols = np.broadcast_to(np.arange(n_points), samples.shape)
    idx -= samples < edges[cols, idx]
    idx += (samples >= edges[cols, idx + 1]) & (idx != N_BINS - 1)
    # One bincount over (point, bin) pairs flattened as point * N_BINS + bin: no loop over points.
    flat = (cols * N_BINS + idx).ravel()
    return np.bincount(flat, minlength=n_points * N_BINS).reshape(n_points, N_BINS)


def _paired_margins(unlearned, oracle) -> tuple[np.ndarray, np.ndarray]:
    u = _check_margin_matrix(unlearned, "unlearned")
    o = _check_margin_matrix(oracle, "oracle")
    if u.shape[1] != o.shape[1]:
        raise ValueError(
            f"unlearned and oracle margins must cover the same points: got {u.shape[1]} and {o.shape[1]} "
            "columns"
        )
    return u, o


def klom(unlearned, oracle) -> np.ndarray:
    """KLOM per point: KL(unlearned || oracle) between histograms of margins (reference.md §4).

    unlearned: (n_models_u, n_points) margins of unlearned models; oracle: (n_models_o, n_points) margins of
    oracle models. Returns (n_points,) float64. Binning: clip to [-100, 100]; 20 equal-width bins over the
    pooled [min, max] of both samples, every sample counted; p, q normalised; q floored at 1e-5 and
    renormalised; sum over p_b > 0 of p_b log(p_b / q_b); a point where all samples of both groups are equal
    scores 0.
    """
    u, o = _paired_margins(unlearned, oracle)
    u = np.clip(u, -MARGIN_CLIP, MARGIN_CLIP)
    o = np.clip(o, -MARGIN_CLIP, MARGIN_CLIP)
    lo = np.minimum(u.min(axis=0), o.min(axis=0))
    hi = np.maximum(u.max(axis=0), o.max(axis=0))
    all_equal = hi == lo
    hi = np.where(all_equal, lo + 1.0, hi)  # any width will do there; those points are set to 0 below
    edges = np.linspace(lo, hi, N_BINS + 1, axis=-1)  # (n_points, N_BINS + 1)
    p = _bin_counts(u, lo, hi, edges) / u.shape[0]
    q = _bin_counts(o, lo, hi, edges) / o.shape[0]
    q = np.maximum(q, EPS)
    q /= q.sum(axis=1, keepdims=True)
    has_mass = p > 0
    terms = np.where(has_mass, p * np.log(np.where(has_mass, p, 1.0) / q), 0.0)
    values = terms.sum(axis=1)
    values[all_equal] = 0.0
    return values


def shift_and_spread(unlearned, oracle) -> tuple[np.ndarray, np.ndarray]:
    """Two of the ways a point's margin distribution can differ from retraining's, which KLOM folds into one
    number: per point, the shift of the mean margin (unlearned minus oracle) and the spread ratio, the standard
    deviation over models of the unlearned margins over that of the oracles' (1: the models vary as retrained
    models do; below 1: the method pulls the models together, which KLOM penalises even where the means agree).

    unlearned, oracle: (n_models, n_points) margins, as for `klom`. Returns two (n_points,) float64 arrays; the
    ratio is NaN where the oracles' margins do not vary."""
    u, o = (m.astype(np.float64) for m in _paired_margins(unlearned, oracle))
    shift = u.mean(axis=0) - o.mean(axis=0)
    o_std = o.std(axis=0)
    spread = np.divide(u.std(axis=0), o_std, out=np.full(o_std.shape, np.nan), where=o_std > 0)
    return shift, spread


def klom_summary(values, point_sets: Mapping[str, object]) -> dict[str, dict[str, float]]:
    """The 95th (headline) and 99th percentiles and the mean of KLOM over each named point set.

    values: (n_points,) from `klom`; point_sets: name -> integer indices or a boolean mask over the points
    (e.g. {"forget": ..., "retain": ..., "validation": ...}).
    Returns name -> {"p95", "p99", "mean", "n_points"}.
    Percentiles are numpy's default (linear interpolation).
    """
    v = _as_array(values, "values").astype(np.float64)
    if v.ndim != 1:
        raise ValueError(f"values must be KLOM per point, shape (n_points,), got shape {v.shape}")
    summary = {}
    for name, index in point_sets.items():
        idx = _as_array(index, f"point set {name!r}")
        if idx.dtype == bool:
            if idx.shape != v.shape:
                raise ValueError(f"boolean point set {name!r} has shape {idx.shape}, values have {v.shape}")
            idx = np.flatnonzero(idx)
        elif idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"point set {name!r} must be integer indices or a boolean mask, got {idx.dtype}")
        idx = idx.astype(np.intp).ravel()
        if idx.size == 0:
            raise ValueError(f"point set {name!r} is empty; drop it or give it points")
        if idx.min() < -v.size or idx.max() >= v.size:
            raise ValueError(f"point set {name!r} has indices outside [0, {v.size})")
        chosen = v[idx]
        summary[name] = {
            "p95": float(np.percentile(chosen, 95)),
            "p99": float(np.percentile(chosen, 99)),
            "mean": float(chosen.mean()),
            "n_points": int(idx.size),
        }
    return summary


def oracle_floor(oracle_margins, seed: int) -> np.ndarray:
    """KLOM between two disjoint random halves of the oracle models: what a perfect unlearner scores here.

    oracle_margins: (n_models, n_points), n_models >= 2; the models are split at random (seeded) into two
    halves of n_models // 2 (one is left out when n_models is odd). The floor uses half as many models per
    side as a method's KLOM, so it reads higher than the true floor at n_models (reference.md §8: 1.5-1.9 at
    p95 for 50 vs 50); compare methods and floors at the same number of models where possible. Where n_models
    further oracles exist (fresh seeds, trained alike), `klom(fresh, oracle_margins)` is that floor, scored
    exactly as a method is; this half split is the fallback without them.
    """
    o = _check_margin_matrix(oracle_margins, "oracle")
    if o.shape[0] < 2:
        raise ValueError(f"oracle_floor needs at least 2 oracle models to split, got {o.shape[0]}")
    order = np.random.default_rng(seed).permutation(o.shape[0])
    half = o.shape[0] // 2
    return klom(o[order[:half]], o[order[half : 2 * half]])
