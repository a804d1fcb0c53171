"""Linear datamodeling score (LDS): how well datamodel weights rank the outputs of held-out subset models.

Data flow: datamodel weights and bias (LASSO or TRAK, from datamodels/<method>.zarr) + held-out subset masks
and the outputs of the models trained on them (subsets.zarr) -> one Spearman correlation per target
(docs/methods.md §2).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def lds(coef, intercept, masks, outputs) -> np.ndarray:
    """Per-target Spearman correlation between predicted and actual outputs of held-out subset models.

    coef: (p, t) datamodel weights; intercept: (t,); masks: (m, p) bool subsets of held-out models (disjoint
    from the models the weights were fit on); outputs: (m, t) their actual outputs. The prediction for model i
    and target j is intercept[j] + masks[i] @ coef[:, j]. Spearman = Pearson correlation of the ranks (ties
    get their average rank, as scipy.stats.spearmanr). A target whose predictions or outputs are constant over
    the m models has no defined correlation and gets NaN; average with np.nanmean and report how many were
    NaN. Returns (t,) float64.
    """
    coef, intercept = np.asarray(coef), np.asarray(intercept)
    masks, outputs = np.asarray(masks), np.asarray(outputs)
    if coef.ndim != 2:
        raise ValueError(f"coef must be 2-D (training points, targets), got shape {coef.shape}")
    p, t = coef.shape
    if intercept.shape != (t,):
        raise ValueError(f"intercept must have shape ({t},) (one per target), got {intercept.shape}")
    if masks.ndim != 2 or masks.shape[1] != p:
        raise ValueError(f"masks must have shape (models, {p}) to match coef, got {masks.shape}")
    if outputs.shape != (masks.shape[0], t):
        raise ValueError(f"outputs must have shape ({masks.shape[0]}, {t}) (held-out models, targets), got "
                         f"{outputs.shape}")
    if masks.shape[0] < 2:
        raise ValueError("LDS needs at least 2 held-out subset models")
    for name, a in (("coef", coef), ("intercept", intercept), ("outputs", outputs)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} contains NaN or inf: drop or repair those entries first")

    predicted = masks.astype(np.float64) @ coef.astype(np.float64) + intercept.astype(np.float64)
    rank_pred = rankdata(predicted, axis=0)
    rank_true = rankdata(outputs.astype(np.float64), axis=0)
    rank_pred -= rank_pred.mean(0)
    rank_true -= rank_true.mean(0)
    num = (rank_pred * rank_true).sum(0)
    den = np.sqrt((rank_pred ** 2).sum(0) * (rank_true ** 2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
