import numpy as np
import pytest

from attribution.masks import model_seeds, sample_masks


def test_masks_are_bernoulli_alpha():
    masks = sample_masks(400, 500, alpha=0.3, seed=1)
    assert masks.dtype == bool and masks.shape == (400, 500)
    # mean of 200k Bernoulli(0.3) draws: sd = sqrt(.21/200000) ~ 0.001
    assert abs(masks.mean() - 0.3) < 0.005
    # rows are independent: off-diagonal correlation of centred masks is ~0 (docs/methods.md §1)
    c = np.corrcoef(masks[:, :50].T.astype(float))
    assert np.abs(c[~np.eye(50, dtype=bool)]).max() < 0.25


def test_masks_depend_only_on_seed_and_row():
    a = sample_masks(10, 100, 0.5, seed=3)
    b = sample_masks(25, 100, 0.5, seed=3)
    np.testing.assert_array_equal(a, b[:10])  # growing a run keeps its earlier masks
    np.testing.assert_array_equal(sample_masks(5, 100, 0.5, seed=3, start=4), b[4:9])  # any unit regenerates rows
    assert not np.array_equal(a, sample_masks(10, 100, 0.5, seed=4))


def test_model_seeds_distinct_per_stream():
    s1, s2 = model_seeds(50, 0, stream=1), model_seeds(50, 0, stream=2)
    assert len(set(s1)) == 50 and not set(s1) & set(s2)
    np.testing.assert_array_equal(model_seeds(5, 0, 1, start=10), s1[10:15])


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        sample_masks(2, 10, alpha)
