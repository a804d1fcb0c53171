"""Subset masks: which training examples each subset model sees (docs/methods.md §1).

Row i is drawn from its own generator, seeded by (seed, i), so a mask does not depend on how many models a run has
or on which work unit trains it: growing a run keeps its earlier masks, and any worker can regenerate its rows.
"""

from __future__ import annotations

import numpy as np


def model_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The generator of model `index` in a named stream (masks, training seeds, ...) of a run with `seed`."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, index)))


MASK_STREAM = 0


def sample_masks(n_models: int, n_train: int, alpha: float = 0.5, seed: int = 0, start: int = 0) -> np.ndarray:
    """Bernoulli(alpha) masks (n_models, n_train) bool for models start .. start+n_models-1."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_models < 0 or n_train < 1:
        raise ValueError(f"need n_models >= 0 and n_train >= 1, got {n_models} and {n_train}")
    masks = np.empty((n_models, n_train), dtype=bool)
    for row in range(n_models):
        masks[row] = model_rng(seed, MASK_STREAM, start + row).random(n_train) < alpha
    return masks


def model_seeds(n_models: int, seed: int, stream: int, start: int = 0) -> np.ndarray:
    """One 31-bit training seed per model (initialisation, minibatch order) from the run seed."""
    return np.array([int(model_rng(seed, stream, start + i).integers(2**31 - 1)) for i in range(n_models)],
                    dtype=np.int64)
