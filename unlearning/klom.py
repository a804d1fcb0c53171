"""Margins and KLOM (KL divergence of margins): per point, how close unlearning came to retraining.

Data flow: logits of unlearned models and of oracle models (retrained without the forget set) -> `margins` ->
`klom` per point -> `klom_summary` per point set (forget / retain / validation), next to `oracle_floor`;
`shift_and_spread` splits what KLOM measures into a mean shift and a spread ratio.
Numpy only; the binning is the project's exact recipe, docs/methods.md §4; `klom(..., convention="edub")` is the
public Easy Data Unlearning Bench's variant of it, for setting numbers beside that bench's published ones.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# docs/methods.md §4: both samples clipped to [-100, 100] before binning.
MARGIN_CLIP = 100.0
# docs/methods.md §4: 20 equal-width bins over the pooled [min, max] of both samples.
N_BINS = 20
# docs/methods.md §4: the second histogram of the KL (q) is floored at 1e-5, then renormalised; KLOM <= about
# log(1e5) = 11.5.
EPS = 1e-5
# `klom` conventions: this project's recipe (docs/methods.md §4) and the Easy Data Unlearning Bench's
# (RoyRin/data-unlearning-bench, unlearning_bench/eval.py: compute_binned_KL_div).
CONVENTIONS = ("dmu", "edub")
# `klom` directions. The default is the authors': the Easy Data Unlearning Bench's run.py calls
# kl_from_margins(oracle_margins, margins), so p is the oracles' histogram, KL(oracle || unlearned). The other
# direction rewards models less spread than retraining (see `klom`'s docstring) and stays for comparison.
DIRECTIONS = ("oracle||unlearned", "unlearned||oracle")


def as_array(x, name: str) -> np.ndarray:
    """A numpy view of an array-like; torch tensors (any device) are detached and copied to the host."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as err:  # pragma: no cover - exotic inputs
        raise ValueError(f"{name} must be array-like, got {type(x).__name__}") from err


def check_logits_labels(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    """Validate (..., n_points, C) float logits against (n_points,) integer labels; return them as arrays."""
    z = as_array(logits, "logits")
    y = as_array(labels, "labels")
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


def in_range(compute, z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """compute(z, y) in z's precision, or in float64 where that overflows: logits near the float32 limit (a model
    whose fine-tuning ran away, e.g. gradient ascent) still have finite margins and losses in float64."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = compute(z, y)
    if z.dtype != np.float64 and not np.isfinite(out).all():
        out = compute(z.astype(np.float64), y)
    return out


def margins(logits, labels) -> np.ndarray:
    """Margin m = z_y - logsumexp_{k != y} z_k of every point (docs/methods.md §4).

    logits: (..., n_points, C) (e.g. (n_models, n_points, C)); labels: (n_points,) ints.
    Returns (..., n_points) in the logits' float precision (float64 where that would overflow, `in_range`).
    Stable: the log-sum-exp subtracts the largest other logit before exponentiating.
    """
    return in_range(_margins, *check_logits_labels(logits, labels))


def _margins(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    points = np.arange(y.shape[0])
    correct = z[..., points, y]
    others = z.copy()
    others[..., points, y] = -np.inf  # leave the labelled class out of the log-sum-exp
    top = others.max(axis=-1)
    lse = top + np.log(np.exp(others - top[..., None]).sum(axis=-1))
    return correct - lse


def _check_margin_matrix(x, name: str, keep_float32: bool = False) -> np.ndarray:
    m = as_array(x, name)
    if m.ndim != 2:
        raise ValueError(f"{name} margins must have shape (n_models, n_points), got shape {m.shape}")
    if m.shape[0] < 1 or m.shape[1] < 1:
        raise ValueError(f"{name} margins need at least one model and one point, got shape {m.shape}")
    m = m.astype(np.float32 if keep_float32 and m.dtype == np.float32 else np.float64)
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


def _paired_margins(unlearned, oracle, keep_float32: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Both margin matrices, validated, as float64 (as float32 when keep_float32 and both are float32)."""
    u = _check_margin_matrix(unlearned, "unlearned", keep_float32)
    o = _check_margin_matrix(oracle, "oracle", keep_float32)
    if u.shape[1] != o.shape[1]:
        raise ValueError(
            f"unlearned and oracle margins must cover the same points: got {u.shape[1]} and {o.shape[1]} "
            "columns"
        )
    if u.dtype != o.dtype:
        u, o = u.astype(np.float64), o.astype(np.float64)
    return u, o


def klom(unlearned, oracle, *, convention: str = "dmu", direction: str = "oracle||unlearned") -> np.ndarray:
    """KLOM per point: KL(oracle || unlearned) between histograms of margins (docs/methods.md, KLOM).

    unlearned: (n_models_u, n_points) margins of unlearned models; oracle: (n_models_o, n_points) margins of
    oracle models. Returns (n_points,) float64. Binning: clip to [-100, 100]; 20 equal-width bins over the
    pooled [min, max] of both samples, every sample counted; p (the first distribution of the KL), q normalised;
    q floored at 1e-5 and renormalised; sum over p_b > 0 of p_b log(p_b / q_b); a point where all samples of
    both groups are equal scores 0.

    direction: "oracle||unlearned" (default) is the authors' direction: p is the oracles' histogram, so a
    method is penalised wherever retraining puts mass that the unlearned models do not reach. The bench's
    run.py calls kl_from_margins(oracle_margins, margins), whose first argument is p. "unlearned||oracle"
    swaps the roles; it rewards under-dispersed models: with Gaussian margins at 100 vs 100 models, a sample
    of the true distribution scores p95 about 0.68 there while one with 0.79x the spread scores about 0.49,
    so a method could "beat" retraining (tests/unlearning/test_klom.py, the Gaussian simulation).

    convention="edub" reproduces the Easy Data Unlearning Bench's function instead
    (RoyRin/data-unlearning-bench, unlearning_bench/eval.py: compute_binned_KL_div, called per point by
    kl_from_margins). Same clip, bins and eps, but its bins are np.digitize's half-open [e_b, e_{b+1})
    throughout, so samples equal to the pooled maximum are dropped and p, q are normalised over the samples
    kept; q is floored at 1e-5 only in bins where p > 0 (scipy.stats.entropy then renormalises it); and where
    every sample of p's group equals the pooled maximum (nothing kept) it returns NaN, scipy's 0/0, as does
    this. At 100 vs 100 models the p95/p99 of the two conventions differ by a few hundredths; at 8 vs 8
    single points differ by more than 2, one dropped sample being 1/8 of p. The bench bins float32 margins
    (its stored .pt files) with float32 edges, so when both inputs are float32 this convention bins in float32
    too and matches it exactly; otherwise it works in float64. With the default direction,
    klom(unlearned, oracle, convention="edub") is the bench's stored (published) number.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    edub = convention == "edub"
    u, o = _paired_margins(unlearned, oracle, keep_float32=edub)
    if direction == "oracle||unlearned":
        u, o = o, u  # below, u is p's sample (the first argument of the KL) and o is q's
    u = np.clip(u, -MARGIN_CLIP, MARGIN_CLIP)
    o = np.clip(o, -MARGIN_CLIP, MARGIN_CLIP)
    lo = np.minimum(u.min(axis=0), o.min(axis=0))
    hi = np.maximum(u.max(axis=0), o.max(axis=0))
    all_equal = hi == lo
    hi = np.where(all_equal, lo + 1, hi)  # the bench's width there; those points are set to 0 below
    edges = np.linspace(lo, hi, N_BINS + 1, axis=-1)  # (n_points, N_BINS + 1)
    p_counts = _bin_counts(u, lo, hi, edges)
    q_counts = _bin_counts(o, lo, hi, edges)
    if edub:
        # np.digitize's last bin is half-open too: samples on the last edge, the pooled maximum, are dropped.
        p_counts[:, -1] -= (u == hi).sum(axis=0)
        q_counts[:, -1] -= (o == hi).sum(axis=0)
        p_kept = p_counts.sum(axis=1, keepdims=True)
        q_kept = q_counts.sum(axis=1, keepdims=True)
        p = np.divide(p_counts, p_kept, out=np.zeros(p_counts.shape), where=p_kept > 0)
        q = np.divide(q_counts, q_kept, out=np.zeros(q_counts.shape), where=q_kept > 0)
        q = np.where(p > 0, np.maximum(q, EPS), q)  # floored only under p's mass
    else:
        p = p_counts / u.shape[0]
        q = np.maximum(q_counts / o.shape[0], EPS)
    # q sums to > 0 wherever the value is used (dmu: the floor; edub: p's mass is floored, or q counts all
    # kept oracle samples); the guard only keeps a 0 / 0 warning away from points that are overwritten below
    q /= np.maximum(q.sum(axis=1, keepdims=True), np.finfo(np.float64).tiny)
    has_mass = p > 0
    terms = np.where(has_mass, p * np.log(np.where(has_mass, p, 1.0) / np.where(has_mass, q, 1.0)), 0.0)
    values = terms.sum(axis=1)
    if edub:
        values[p_kept[:, 0] == 0] = np.nan
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
    v = as_array(values, "values").astype(np.float64)
    if v.ndim != 1:
        raise ValueError(f"values must be KLOM per point, shape (n_points,), got shape {v.shape}")
    summary = {}
    for name, index in point_sets.items():
        idx = as_array(index, f"point set {name!r}")
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


def klom_intervals(unlearned, oracle, point_sets: Mapping[str, object], *, n_rep: int = 200,
                   level: float = 0.95, seed: int = 0, **klom_kwargs) -> dict[str, dict[str, list[float]]]:
    """Confidence intervals over models for every statistic of `klom_summary`, and for the average of the
    p99s over the point sets (the headline of the datamodel-matching paper's Figure 2), by subsampling.

    Why not the bootstrap: drawing models with replacement repeats models, which sharpens every histogram and
    inflates KLOM far beyond its sampling noise (Gaussian margins, 40 vs 40 models, 2,000 points: p99 2.89,
    bootstrap replicates 4.96 +- 0.33, while fresh draws of 40 vs 40 give 2.88 +- 0.06). Half-samples without
    replacement keep every histogram a sample of distinct models: each of n_rep replicates draws half of the
    unlearned models and, independently, half of the oracles (numpy default_rng(seed): a permutation of the
    unlearned rows, then of the oracle rows, per replicate), and the spread of a statistic over replicates,
    centred on their median and scaled by sqrt(m / K) (m = K // 2 of the K unlearned models: the subsampling
    rate for a root-K statistic, Politis and Romano 1994), gives the interval
    [t - s (q_hi - median), t - s (q_lo - median)] around the full-sample value t, clipped at 0. In the same
    simulation its width is 1.3-1.6x what fresh draws show: conservative, never the bootstrap's 5x.
    klom_kwargs go to `klom` (convention, direction).
    Returns name -> {"p95": [lo, hi], "p99": [lo, hi], "mean": [lo, hi]}, plus "p99_avg": {"p99": [lo, hi]}.
    """
    u, o = _paired_margins(unlearned, oracle)
    if n_rep < 2 or not 0 < level < 1 or min(u.shape[0], o.shape[0]) < 2:
        raise ValueError(f"klom_intervals needs n_rep >= 2, 0 < level < 1 and 2 or more models per side, got "
                         f"{n_rep}, {level} and {u.shape[0]} / {o.shape[0]} models")
    point = _with_p99_average(klom_summary(klom(u, o, **klom_kwargs), point_sets))
    rng = np.random.default_rng(seed)
    m_u, m_o = u.shape[0] // 2, o.shape[0] // 2
    reps = []
    for _ in range(n_rep):
        u_rows = rng.permutation(u.shape[0])[:m_u]
        o_rows = rng.permutation(o.shape[0])[:m_o]
        reps.append(_with_p99_average(klom_summary(klom(u[u_rows], o[o_rows], **klom_kwargs), point_sets)))
    scale = np.sqrt(m_u / u.shape[0])
    out: dict[str, dict[str, list[float]]] = {}
    for name, entry in point.items():
        out[name] = {}
        for stat, value in entry.items():
            samples = np.array([rep[name][stat] for rep in reps])
            lo, mid, hi = np.nanpercentile(samples, [50 * (1 - level), 50, 50 * (1 + level)])
            out[name][stat] = [max(0.0, float(value - scale * (hi - mid))), float(value - scale * (lo - mid))]
    return out


def _with_p99_average(summary: dict) -> dict:
    """klom_summary's statistics per set (without n_points), and "p99_avg": the average of the sets' p99s."""
    out = {name: {stat: entry[stat] for stat in ("p95", "p99", "mean")} for name, entry in summary.items()}
    out["p99_avg"] = {"p99": float(np.mean([entry["p99"] for entry in summary.values()]))}
    return out


def oracle_floor(oracle_margins, seed: int) -> np.ndarray:
    """KLOM between two disjoint random halves of the oracle models: what a perfect unlearner scores here.

    oracle_margins: (n_models, n_points), n_models >= 2; the models are split at random (seeded) into two
    halves of n_models // 2 (one is left out when n_models is odd). The floor uses half as many models per
    side as a method's KLOM, so it reads higher than the true floor at n_models (docs/methods.md §8: 1.5-1.9 at
    p95 for 50 vs 50); compare methods and floors at the same number of models where possible. Where n_models
    further oracles exist (fresh seeds, trained alike), `klom(fresh, oracle_margins)` is that floor, scored
    exactly as a method is; this half split is the fallback without them.
    """
    return klom(*floor_halves(oracle_margins, seed))


def floor_halves(oracle_margins, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The two disjoint random halves of the oracle models that `oracle_floor` scores against each other (seeded;
    one model is left out when n_models is odd), for scoring them other ways (the other direction, intervals)."""
    o = _check_margin_matrix(oracle_margins, "oracle")
    if o.shape[0] < 2:
        raise ValueError(f"oracle_floor needs at least 2 oracle models to split, got {o.shape[0]}")
    order = np.random.default_rng(seed).permutation(o.shape[0])
    half = o.shape[0] // 2
    return o[order[:half]], o[order[half : 2 * half]]
