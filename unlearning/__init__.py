"""Unlearning methods and their metrics, model-agnostic: each method takes an nn.Module, the training set as
tensors (`UnlearnData`) and forget-set indices, and returns an `UnlearnResult` (a new model + its `Cost`).

    result = unlearning.METHODS[name](model, data, forget_idx, **inputs, seed=0, **hyperparameter_overrides)

Each entry carries `.Hyperparameters` (its frozen dataclass of defaults) and `.inputs` (the keyword inputs it
needs, e.g. `oracle_logits`); both come from `base.unlearning_method`, the decorator every entry is written
with. The input model is never mutated. dm_direct returns a `DatamodelPredictor`, not a module.
"""

from collections.abc import Callable

from unlearning.base import Cost, UnlearnData, UnlearnResult, check_forget_idx
from unlearning.datamodel import DatamodelPredictor, dm_direct, dm_matching
from unlearning.gradient import gradient_ascent, gradient_descent, neggrad_plus
from unlearning.mumis import mu_mis, mu_mis_gap_method, mu_mis_method
from unlearning.oracle_matching import oracle_matching
from unlearning.reference_points import do_nothing, retrain
from unlearning.scrub import scrub

METHODS: dict[str, Callable[..., UnlearnResult]] = {
    "oracle_matching": oracle_matching,
    "dm_direct": dm_direct,
    "dm_matching": dm_matching,
    "mu_mis": mu_mis_method,
    "mu_mis_gap": mu_mis_gap_method,
    "gradient_descent": gradient_descent,
    "gradient_ascent": gradient_ascent,
    "neggrad_plus": neggrad_plus,
    "scrub": scrub,
    "retrain": retrain,
    "do_nothing": do_nothing,
}


def get_method(name: str) -> Callable[..., UnlearnResult]:
    """The method called `name`; an unknown name is a ValueError listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise ValueError(f"unknown unlearning method {name!r}; known methods: {known}.") from None


__all__ = [
    "METHODS",
    "Cost",
    "DatamodelPredictor",
    "UnlearnData",
    "UnlearnResult",
    "check_forget_idx",
    "get_method",
    "mu_mis",
]
