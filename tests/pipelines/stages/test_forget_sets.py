"""`principal_component_scores`, Halko et al.'s randomized SVD reading the margin-datamodel store in row
blocks, checked against an independent reference: numpy's dense SVD of the whole centred matrix (the stage's
former implementation, kept here only), on matrices written to real zarr arrays on disk."""

import logging
import tracemalloc

import numpy as np
import pytest
import zarr

from attribution.svd import principal_component_scores
from pipelines.stages.forget_sets import pc_forget_sets


def dense_scores(weights, n: int, n_components: int = 2) -> np.ndarray:
    """The reference: A = weights[:, :n].T (targets x training points) whole, centred over the targets, dense
    float64 SVD, scores U S with the largest |score| of each component positive."""
    a = np.asarray(weights[:, :n], dtype=np.float64).T
    u, s, _ = np.linalg.svd(a - a.mean(axis=0, keepdims=True), full_matrices=False)
    scores = u[:, :n_components] * s[:n_components]
    flip = np.sign(scores[np.abs(scores).argmax(axis=0), np.arange(n_components)])
    return scores * flip


def to_zarr(path, weights: np.ndarray, target_chunk: int = 500) -> zarr.Array:
    """`weights` (N, T) as the datamodel store keeps margin_weights: float32, chunks of 256 rows and
    target_chunk targets, reopened read-only."""
    zarr.create_array(str(path), data=weights.astype(np.float32), chunks=(256, target_chunk))
    return zarr.open_array(str(path), mode="r")


def low_rank_plus_noise(n: int = 600, n_test: int = 100, seed: int = 0) -> np.ndarray:
    """weights (n, n + n_test): A = rank 5 with singular values 40, 25, 12, 8, 5 (a clear gap after the top
    2) + 0.01 noise + a large mean per training point (so the centring matters); random test columns."""
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((n, 5)))[0]
    v = np.linalg.qr(rng.standard_normal((n, 5)))[0]
    a = (u * [40.0, 25.0, 12.0, 8.0, 5.0]) @ v.T + 0.01 * rng.standard_normal((n, n))
    a += 5 * rng.standard_normal(n)
    return np.concatenate([a.T, rng.standard_normal((n, n_test))], axis=1)


def decaying_factors(n: int = 1000, n_test: int = 200, seed: int = 1) -> np.ndarray:
    """Demo-like (N = 1,000): random Gaussian factors with a power-law spectrum 3 / i (i = 1..100) plus
    noise (s_1..s_3 = 2.92, 1.49, 1.01)."""
    rng = np.random.default_rng(seed)
    f, g = rng.standard_normal((n, 100)) / np.sqrt(n), rng.standard_normal((n, 100)) / np.sqrt(n)
    a = (f * (3.0 / np.arange(1, 101))) @ g.T + 0.005 * rng.standard_normal((n, n))
    return np.concatenate([a.T, 0.005 * rng.standard_normal((n, n_test))], axis=1)


def sparse_datamodel(n: int = 1000, n_test: int = 200, seed: int = 0) -> np.ndarray:
    """Demo-like (N = 1,000), shaped like LASSO margin datamodels: heavy-tailed self-influences on the
    diagonal, weak positive same-class influences (10 classes, of decaying strength), 3% sparse Laplace noise.
    The diagonal flattens the spectrum (s_1..s_3 = 2.01, 1.84, 1.81, s_13 = 1.41): the hard case for power
    iterations."""
    rng = np.random.default_rng(seed)
    labels, t = rng.integers(0, 10, n), n + n_test
    target_labels = np.r_[labels, rng.integers(0, 10, n_test)]
    strength = 0.02 * 0.8 ** np.arange(10)
    a = (target_labels[:, None] == labels) * strength[labels] * rng.random((t, n))
    a[np.arange(n), np.arange(n)] += rng.exponential(0.3, n)
    a += (rng.random((t, n)) < 0.03) * rng.laplace(0, 0.02, (t, n))
    return a.T


def assert_scores_match(scores: np.ndarray, reference: np.ndarray, rtol: float) -> None:
    """Component by component, |scores - reference| / |reference| (Euclidean norms) <= rtol; the signs agree
    without aligning them (both fix the largest |score| positive)."""
    assert scores.shape == reference.shape
    rel = np.linalg.norm(scores - reference, axis=0) / np.linalg.norm(reference, axis=0)
    assert (rel <= rtol).all(), rel


class RecordingArray:
    """A zarr array that records the rows and shape of every read."""

    def __init__(self, array):
        self.array, self.reads = array, []

    @property
    def shape(self):
        return self.array.shape

    @property
    def chunks(self):
        return self.array.chunks

    def __getitem__(self, key):
        out = self.array[key]
        self.reads.append((key[0].start, key[0].stop, out.shape))
        return out


def test_scores_match_the_dense_svd_on_a_low_rank_plus_noise_store(tmp_path):
    weights = to_zarr(tmp_path / "m.zarr", low_rank_plus_noise())
    reference = dense_scores(weights, 600)
    scores = principal_component_scores(weights, 600, 2, block_rows=300, rng=np.random.default_rng(3))
    assert_scores_match(scores, reference, rtol=1e-6)
    # block_rows 300 reads whole chunks (256 rows): a numpy array in blocks of 256 gives the same bits; and
    # any seed the same scores, as they are the SVD's, not the test matrix's
    in_blocks = principal_component_scores(weights[:], 600, 2, block_rows=256, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(in_blocks, scores)
    other_seed = principal_component_scores(weights, 600, 2, rng=np.random.default_rng(4))
    assert_scores_match(other_seed, reference, rtol=1e-6)


def test_same_forget_sets_as_the_dense_svd(tmp_path):
    weights = to_zarr(tmp_path / "m.zarr", low_rank_plus_noise())
    dense = pc_forget_sets(dense_scores(weights, 600), top_k=50, ends=25)
    randomized = pc_forget_sets(principal_component_scores(weights, 600, 2), top_k=50, ends=25)
    assert set(randomized) == {"pc1_top50", "pc1_ends25", "pc2_top50", "pc2_ends25"} == set(dense)
    for name in dense:
        np.testing.assert_array_equal(randomized[name][0], dense[name][0])


@pytest.mark.parametrize(("block_rows", "read_rows"), [(600, 512), (256, 256), (100, 100)])
def test_reads_one_block_of_rows_at_a_time(tmp_path, block_rows, read_rows):
    """Every read is one block: at most block_rows rows (whole chunks of 256 where block_rows allows, so 512
    of the 600 for block_rows = 600) of the n train-target columns, never the (N, N) matrix; each pass reads
    every row once, in order."""
    stored = to_zarr(tmp_path / "m.zarr", low_rank_plus_noise())
    weights = RecordingArray(stored)
    scores = principal_component_scores(weights, 600, 2, block_rows=block_rows)
    shapes = [shape for _, _, shape in weights.reads]
    assert max(rows for rows, _ in shapes) == read_rows <= block_rows
    assert all(rows < 600 and cols == 600 for rows, cols in shapes)
    one_pass = [(j0, min(j0 + read_rows, 600)) for j0 in range(0, 600, read_rows)]
    passes, rest = divmod(len(weights.reads), len(one_pass))
    assert rest == 0 and passes >= 9  # the first pass, 7 power iterations, the Rayleigh-Ritz pass
    assert [(j0, j1) for j0, j1, _ in weights.reads] == one_pass * passes
    np.testing.assert_array_equal(scores, principal_component_scores(stored, 600, 2, block_rows=block_rows))


@pytest.mark.slow
def test_peak_memory_is_the_formula_not_the_dense_matrix(tmp_path):
    """Traced peak (numpy's and zarr's allocations) while scoring a (3000, 3100) store in blocks of 256 rows:
    within the docstring's 8 (4 n l + N l + N) + 20 block n bytes (+10% for zarr's buffers, which depend on
    the compression), and under a third of the dense float64 N x N matrix alone (72 MB; measured: 16.6 MB)."""
    n, block_rows, width = 3000, 256, 12  # width = l = n_components + 10
    weights = to_zarr(tmp_path / "m.zarr", decaying_factors(n, 100), target_chunk=512)
    tracemalloc.start()
    try:
        principal_component_scores(weights, n, 2, block_rows=block_rows)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 1.1 * (8 * (4 * n * width + n * width + n) + 20 * block_rows * n), peak
    assert peak < 8 * n * n / 3


@pytest.mark.slow
@pytest.mark.parametrize("make", [decaying_factors, sparse_datamodel])
def test_demo_like_matrix_gives_the_dense_forget_sets(tmp_path, make):
    """N = 1,000 (the demo's): pc1_top50, pc2_top50, pc1_ends25, pc2_ends25 as from the dense SVD."""
    weights = to_zarr(tmp_path / "m.zarr", make(), target_chunk=200)
    reference = dense_scores(weights, 1000)
    scores = principal_component_scores(weights, 1000, 2, rng=np.random.default_rng(0))
    assert_scores_match(scores, reference, rtol=1e-6)
    dense, randomized = (pc_forget_sets(s, top_k=50, ends=25) for s in (reference, scores))
    assert set(randomized) == {"pc1_top50", "pc2_top50", "pc1_ends25", "pc2_ends25"}
    for name in dense:
        np.testing.assert_array_equal(randomized[name][0], dense[name][0])


def test_flat_spectrum_needs_more_than_scikit_learns_seven_iterations(tmp_path, caplog):
    """On the diagonal-dominated datamodel, stopping after scikit-learn's 7 power iterations (max_iter = 8
    passes after the first) leaves both components about 1% off and PC2's top 50 not the dense SVD's, and says
    so; the convergence test goes on until they match (previous test)."""
    weights = to_zarr(tmp_path / "m.zarr", sparse_datamodel(), target_chunk=200)
    reference = dense_scores(weights, 1000)
    with caplog.at_level(logging.WARNING, logger="dmu"):
        seven = principal_component_scores(weights, 1000, 2, max_iter=8)
    assert "angle bound" in caplog.text
    rel = np.linalg.norm(seven - reference, axis=0) / np.linalg.norm(reference, axis=0)
    assert (rel > 1e-3).all(), rel
    assert not np.array_equal(pc_forget_sets(seven, 50, 0)["pc2_top50"][0],
                              pc_forget_sets(reference, 50, 0)["pc2_top50"][0])


def test_rejects_impossible_arguments():
    with pytest.raises(ValueError, match="n_components"):
        principal_component_scores(np.zeros((5, 8)), 5, 6)
    with pytest.raises(ValueError, match="block_rows"):
        principal_component_scores(np.zeros((5, 8)), 5, 2, block_rows=0)
    with pytest.raises(ValueError, match="max_iter"):
        principal_component_scores(np.zeros((5, 8)), 5, 2, max_iter=0)
