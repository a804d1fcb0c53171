"""Evaluation metrics besides KLOM: accuracy, per-example cross-entropy, the population membership-inference
attack, a per-example (LiRA-style) membership test from the trained ensembles, and cost as a fraction of
retraining. They take logits / losses / margins as arrays (numpy or torch) and return numbers; the evaluate
stage calls them on unlearned and oracle models' outputs for each point set.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from unlearning.klom import as_array, check_logits_labels, in_range

# docs/methods.md §6: the population MIA of SCRUB / the NeurIPS 2023 kit uses 5-fold cross-validation.
MIA_FOLDS = 5
# `lira_scores`: floor on each fitted Gaussian's standard deviation, in margin (logit) units. Margins of
# trained networks spread over units to tens across models, so it only bites where a group's margins are
# (near) equal, where an unfloored zero variance would make the log-likelihood infinite.
LIRA_STD_FLOOR = 1e-3
# `lira_mia`: the false-positive rate at which the true-positive rate is reported.
LIRA_FPR = 0.01


def _scalar_or_array(x: np.ndarray):
    return float(x) if np.ndim(x) == 0 else x


def accuracy(logits, labels):
    """Fraction of points whose top logit is the label. logits (..., n_points, C), labels (n_points,).

    Returns a float for one model's (n_points, C) logits, an array (...) for stacked models. Ties go to the
    lowest class index (np.argmax).
    """
    z, y = check_logits_labels(logits, labels)
    if y.size == 0:
        raise ValueError("accuracy needs at least one point")
    return _scalar_or_array((z.argmax(axis=-1) == y).mean(axis=-1))


def per_example_loss(logits, labels) -> np.ndarray:
    """Cross-entropy of every point, logsumexp_k z_k - z_y (natural log), shape (..., n_points); in float64
    where the logits' precision would overflow (`unlearning.klom.in_range`)."""
    return in_range(_per_example_loss, *check_logits_labels(logits, labels))


def _per_example_loss(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    top = z.max(axis=-1)
    lse = top + np.log(np.exp(z - top[..., None]).sum(axis=-1))
    return lse - z[..., np.arange(y.shape[0]), y]


def _check_losses(x, name: str) -> np.ndarray:
    v = as_array(x, name).astype(np.float64).ravel()
    if v.size < MIA_FOLDS:
        raise ValueError(f"{name} needs at least {MIA_FOLDS} losses for {MIA_FOLDS}-fold CV, got {v.size}")
    if not np.isfinite(v).all():
        raise ValueError(f"{name} contain NaN or inf; check the logits they were computed from")
    return v


def population_mia(forget_losses, test_losses, seed: int) -> float:
    """Population membership-inference attack: how well the per-example loss tells forget from test points.

    Logistic regression on the loss (forget = 1, test = 0), the larger group subsampled (seeded) to the size
    of the smaller so chance is 0.5, scored by 5-fold stratified cross-validated accuracy (docs/methods.md §6;
    SCRUB and the NeurIPS 2023 unlearning kit). Ideal after unlearning: about 0.5 (forget points look unseen).
    The loss is standardised first so the default L2 penalty of LogisticRegression does not flatten
    small-scale losses (e.g. 1e-4 for memorised points) to a constant prediction.
    """
    forget = _check_losses(forget_losses, "forget_losses")
    test = _check_losses(test_losses, "test_losses")
    rng = np.random.default_rng(seed)
    n = min(forget.size, test.size)
    if forget.size > n:
        forget = rng.choice(forget, n, replace=False)
    if test.size > n:
        test = rng.choice(test, n, replace=False)
    x = np.concatenate([forget, test])[:, None]
    member = np.concatenate([np.ones(n, dtype=int), np.zeros(n, dtype=int)])
    folds = StratifiedKFold(n_splits=MIA_FOLDS, shuffle=True, random_state=seed)
    attack = make_pipeline(StandardScaler(), LogisticRegression())
    # the folds of cross_val_score, without its per-call overhead (~0.2 s, 12x the fits themselves): a report
    # makes K x methods x forget sets of these calls
    scores = [clone(attack).fit(x[a], member[a]).score(x[b], member[b]) for a, b in folds.split(x, member)]
    return float(np.mean(scores))


def _check_margins_2d(x, name: str, min_models: int, n_points: int | None = None) -> np.ndarray:
    m = as_array(x, name)
    if m.ndim != 2:
        raise ValueError(f"{name} must have shape (n_models, n_points), got shape {m.shape}")
    if m.shape[0] < min_models or m.shape[1] < 1:
        raise ValueError(f"{name} needs at least {min_models} model(s) and one point, got shape {m.shape}")
    if n_points is not None and m.shape[1] != n_points:
        raise ValueError(f"{name} must cover the same {n_points} points as in_margins, got {m.shape[1]}")
    m = m.astype(np.float64)
    if not np.isfinite(m).all():
        raise ValueError(f"{name} contain NaN or inf; check the logits they were computed from")
    return m


def lira_scores(margins, in_margins, out_margins) -> np.ndarray:
    """Per-example LiRA score: how much likelier each margin is under models trained with the point.

    Per point j, one Gaussian is fitted to in_margins[:, j] (models trained with j: the full models) and one
    to out_margins[:, j] (models trained without j: the oracles), each by the mean and the sample standard
    deviation (ddof=1) over models, the latter floored at LIRA_STD_FLOOR. The score of margins[k, j] is
    log N(m; mu_in, s_in) - log N(m; mu_out, s_out), higher where it looks trained on. The margin
    z_y - logsumexp_{k != y} z_k equals LiRA's logit-scaled confidence log(p_y / (1 - p_y)) (Carlini et al.
    2022), so it is used as it is.

    margins: (n_models, n_points) margins to score; in_margins: (n_in, n_points); out_margins:
    (n_out, n_points); n_in, n_out >= 2. Returns (n_models, n_points) float64.
    """
    m_in = _check_margins_2d(in_margins, "in_margins", 2)
    n_points = m_in.shape[1]
    m_out = _check_margins_2d(out_margins, "out_margins", 2, n_points)
    m = _check_margins_2d(margins, "margins", 1, n_points)

    def log_density(x, group):
        mu = group.mean(axis=0)
        sd = np.maximum(group.std(axis=0, ddof=1), LIRA_STD_FLOOR)
        return -0.5 * ((x - mu) / sd) ** 2 - np.log(sd) - 0.5 * np.log(2 * np.pi)

    return log_density(m, m_in) - log_density(m, m_out)


def lira_mia(method_margins, heldout_oracle_margins, in_margins, out_margins) -> dict[str, float]:
    """Per-example membership test of the forget points (docs/methods.md §6, beside the population MIA).

    Positives: `lira_scores` of every (model, forget point) of method_margins, the unlearned models;
    negatives: those of heldout_oracle_margins, oracles (trained without the forget set) that were NOT among
    out_margins: an oracle that helped fit the out-Gaussian looks more "out" than a fresh one, which would
    inflate the AUC. The Gaussians are fitted to in_margins (the full models) and out_margins (oracles). All
    are (n_models, n_points) over the same forget points.
    Returns {"auc": sklearn's roc_auc_score (ties count 1/2), "tpr_at_1pct_fpr": the largest TPR on sklearn's
    ROC curve at FPR <= 0.01, not interpolated (with under 100 negatives: the TPR at no false positive)}.
    Ideal after unlearning: AUC about 0.5 and TPR about 0.01; doing nothing: AUC near 1 on memorised points.
    """
    m_in = _check_margins_2d(in_margins, "in_margins", 2)
    n_points = m_in.shape[1]
    heldout = _check_margins_2d(heldout_oracle_margins, "heldout_oracle_margins", 1, n_points)
    positives = lira_scores(method_margins, m_in, out_margins).ravel()
    negatives = lira_scores(heldout, m_in, out_margins).ravel()
    scores = np.concatenate([positives, negatives])
    member = np.concatenate([np.ones(positives.size, dtype=int), np.zeros(negatives.size, dtype=int)])
    fpr, tpr, _ = roc_curve(member, scores, drop_intermediate=False)
    return {
        "auc": float(roc_auc_score(member, scores)),
        "tpr_at_1pct_fpr": float(tpr[fpr <= LIRA_FPR].max()),
    }


def cost_fraction(cost, retrain_cost):
    """Cost of unlearning as a fraction of retraining (docs/methods.md §3: DMM at |F| = 100 is about 0.008).

    Numbers (or arrays) are divided as they are; objects with an `example_passes` attribute
    (unlearning.base.Cost) are compared by example passes, the hardware-independent unit.
    """
    if hasattr(cost, "example_passes"):
        cost = cost.example_passes
    if hasattr(retrain_cost, "example_passes"):
        retrain_cost = retrain_cost.example_passes
    c = as_array(cost, "cost").astype(np.float64)
    r = as_array(retrain_cost, "retrain_cost").astype(np.float64)
    if not (np.isfinite(r).all() and (r > 0).all()):
        raise ValueError(f"retrain_cost must be positive and finite, got {retrain_cost!r}")
    if not (np.isfinite(c).all() and (c >= 0).all()):
        raise ValueError(f"cost must be non-negative and finite, got {cost!r}")
    return _scalar_or_array(c / r)
