"""The vectorised LDS against scipy.stats.spearmanr, one target at a time."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.stats import spearmanr

from attribution.lds import lds


def spearman_loop(coef, intercept, masks, outputs):
    predicted = masks @ coef + intercept
    out = []
    for j in range(coef.shape[1]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns (and returns NaN) on a constant input
            out.append(spearmanr(predicted[:, j], outputs[:, j]).statistic)
    return np.array(out)


def test_lds_equals_scipy_spearman():
    rng = np.random.default_rng(0)
    m, p, t = 50, 30, 7
    coef = rng.normal(size=(p, t)) * (rng.random((p, t)) < 0.3)
    intercept = rng.normal(size=t)
    masks = rng.random((m, p)) < 0.5
    outputs = masks @ coef + intercept + rng.normal(size=(m, t))
    outputs[:, 1] = np.round(outputs[:, 1])  # ties in the outputs: average ranks
    coef[:, 2] = 0.0  # constant prediction: NaN
    outputs[:, 3] = 4.0  # constant output: NaN
    coef[:, 4] = 0.0
    coef[0, 4] = 1.0  # two-valued prediction: many ties
    got = lds(coef, intercept, masks, outputs)
    expected = spearman_loop(coef, intercept, masks, outputs)
    assert np.isnan(got[2]) and np.isnan(got[3])
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert np.nanmean(got) > 0.3  # outputs follow the weights here


@pytest.mark.parametrize("case, match", [
    ("intercept", "intercept"),
    ("masks", "masks"),
    ("outputs", "outputs"),
    ("nan", "NaN"),
    ("one_model", "at least 2"),
])
def test_lds_bad_input(case, match):
    rng = np.random.default_rng(1)
    coef, intercept = rng.normal(size=(5, 3)), np.zeros(3)
    masks, outputs = rng.random((8, 5)) < 0.5, rng.normal(size=(8, 3))
    if case == "intercept":
        intercept = np.zeros(4)
    elif case == "masks":
        masks = masks[:, :4]
    elif case == "outputs":
        outputs = outputs[:, :2]
    elif case == "nan":
        outputs[0, 0] = np.nan
    elif case == "one_model":
        masks, outputs = masks[:1], outputs[:1]
    with pytest.raises(ValueError, match=match):
        lds(coef, intercept, masks, outputs)
