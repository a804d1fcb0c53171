"""Evaluation metrics besides KLOM: accuracy, per-example cross-entropy, the population membership-inference
attack and cost as a fraction of retraining. They take logits / losses as arrays (numpy or torch) and return
numbers; the evaluate stage calls them on unlearned and oracle models' outputs for each point set.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from unlearning.klom import _as_array, _check_logits_labels

# reference.md §6: the population MIA of SCRUB / the NeurIPS 2023 kit uses 5-fold cross-validation.
MIA_FOLDS = 5


def _scalar_or_array(x: np.ndarray):
    return float(x) if np.ndim(x) == 0 else x


def accuracy(logits, labels):
    """Fraction of points whose top logit is the label. logits (..., n_points, C), labels (n_points,).

    Returns a float for one model's (n_points, C) logits, an array (...) for stacked models. Ties go to the
    lowest class index (np.argmax).
    """
    z, y = _check_logits_labels(logits, labels)
    if y.size == 0:
        raise ValueError("accuracy needs at least one point")
    return _scalar_or_array((z.argmax(axis=-1) == y).mean(axis=-1))


def per_example_loss(logits, labels) -> np.ndarray:
    """Cross-entropy of every point, logsumexp_k z_k - z_y (natural log), shape (..., n_points)."""
    z, y = _check_logits_labels(logits, labels)
    top = z.max(axis=-1)
    lse = top + np.log(np.exp(z - top[..., None]).sum(axis=-1))
    return lse - z[..., np.arange(y.shape[0]), y]


def _check_losses(x, name: str) -> np.ndarray:
    v = _as_array(x, name).astype(np.float64).ravel()
    if v.size < MIA_FOLDS:
        raise ValueError(f"{name} needs at least {MIA_FOLDS} losses for {MIA_FOLDS}-fold CV, got {v.size}")
    if not np.isfinite(v).all():
        raise ValueError(f"{name} contain NaN or inf; check the logits they were computed from")
    return v


def population_mia(forget_losses, test_losses, seed: int) -> float:
    """Population membership-inference attack: how well the per-example loss tells forget from test points.

    Logistic regression on the loss (forget = 1, test = 0), the larger group subsampled (seeded) to the size
    of the smaller so chance is 0.5, scored by 5-fold stratified cross-validated accuracy (reference.md §6;
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


def cost_fraction(cost, retrain_cost):
    """Cost of unlearning as a fraction of retraining (reference.md §3: DMM at |F| = 100 is about 0.008).

    Numbers (or arrays) are divided as they are; objects with an `example_passes` attribute
    (unlearning.base.Cost) are compared by example passes, the hardware-independent unit.
    """
    if hasattr(cost, "example_passes"):
        cost = cost.example_passes
    if hasattr(retrain_cost, "example_passes"):
        retrain_cost = retrain_cost.example_passes
    c = _as_array(cost, "cost").astype(np.float64)
    r = _as_array(retrain_cost, "retrain_cost").astype(np.float64)
    if not (np.isfinite(r).all() and (r > 0).all()):
        raise ValueError(f"retrain_cost must be positive and finite, got {retrain_cost!r}")
    if not (np.isfinite(c).all() and (c >= 0).all()):
        raise ValueError(f"cost must be non-negative and finite, got {cost!r}")
    return _scalar_or_array(c / r)
