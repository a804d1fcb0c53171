"""The run's seed streams: every random draw of a run is `attribution.masks.model_rng(cfg.seed, stream, index)` or
a SeedSequence over the seed and the unit's identity, so a seed fixes every mask, model and result however the work
is scheduled. Stream 0 is the subset masks' (attribution.masks.MASK_STREAM); the others are named here."""

from __future__ import annotations

import zlib

import numpy as np

SUBSET_TRAIN_STREAM = 1  # the subset models' training (minibatch order, initialisation)
FULL_STREAM = 2  # the full models; oracles use one stream per forget set (oracle_stream)
RETRAIN_TIMING_STREAM = 3  # the models per forget set that time retraining
FORGET_STREAM = 7  # the random forget sets
PCA_STREAM = 8  # the randomized SVD's Gaussian test matrix
TUNE_STREAM = 9  # the random tuning sets (the tune stage's, disjoint from the evaluated sets)
TUNING_FULL_STREAM = 10  # the tune stage's own full models (never evaluated)
VALIDATION_STREAM = 11  # the split of the test targets into tuning and reporting validation points


def oracle_stream(forget_set: str) -> int:
    """The oracles retrained without `forget_set` (reference, Oracle Matching's and floor rows alike)."""
    return 1000 + zlib.crc32(forget_set.encode())


def method_seed(seed: int, model: int, forget_set: str, method: str) -> int:
    """The seed of one method's run on one full model for one forget set."""
    ss = np.random.SeedSequence([seed, model, zlib.crc32(forget_set.encode()), zlib.crc32(method.encode())])
    return int(ss.generate_state(1)[0] & 0x7FFFFFFF)
