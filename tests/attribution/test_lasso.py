"""The batched LASSO against scikit-learn's `Lasso`, target by target; the λ path against brute force."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso

from attribution import lasso
from attribution.lasso import LassoDatamodels, fit_lasso


def datamodel_problem(n_models: int, n_train: int, n_targets: int, seed: int):
    """Bernoulli(0.5) masks; outputs = a sparse linear function of the masks + noise, as datamodels assume."""
    rng = np.random.default_rng(seed)
    masks = rng.random((n_models, n_train)) < 0.5
    weights = np.zeros((n_train, n_targets))
    for j in range(n_targets):
        weights[rng.choice(n_train, 5, replace=False), j] = rng.normal(size=5)
    outputs = masks @ weights + rng.normal(size=n_targets) + 0.5 * rng.normal(size=(n_models, n_targets))
    return masks, outputs, weights, rng


def objective(X, y, w, b, lam):
    r = y - X @ w - b
    return 0.5 * np.mean(r * r) + lam * np.abs(w).sum()


def sklearn_lasso(X, y, lam):
    model = Lasso(alpha=lam, fit_intercept=True, tol=1e-14, max_iter=100_000).fit(X.astype(np.float64), y)
    return model.coef_, model.intercept_


def assert_matches_sklearn(X, Y, coef, intercept, lams, rel_gap=1e-6, coef_atol=1e-5):
    for j in range(Y.shape[1]):
        ref_coef, ref_b = sklearn_lasso(X, Y[:, j], lams[j])
        ours = objective(X, Y[:, j], coef[:, j].astype(np.float64), float(intercept[j]), lams[j])
        ref = objective(X, Y[:, j], ref_coef, ref_b, lams[j])
        assert abs(ours - ref) / ref <= rel_gap, f"target {j}: objective {ours} vs scikit-learn {ref}"
        np.testing.assert_allclose(coef[:, j], ref_coef, atol=coef_atol)
        np.testing.assert_allclose(intercept[j], ref_b, atol=coef_atol)


@pytest.fixture(params=[(64, 512), (16, 32)], ids=["one_block", "four_blocks_two_groups"])
def block_size(request, monkeypatch):
    """Run with the whole problem in one block, and split over blocks and groups of blocks (the Gauss-Seidel
    sweep across blocks, with the group-wise update of the gradient)."""
    monkeypatch.setattr(lasso, "BLOCK_SIZE", request.param[0])
    monkeypatch.setattr(lasso, "GROUP_SIZE", request.param[1])
    return request.param


FORMS = pytest.mark.parametrize("form", ["gram", "masks"])


@FORMS
def test_fit_lasso_scalar_lambda_equals_sklearn(block_size, form):
    X, Y, _, _ = datamodel_problem(300, 60, 8, seed=0)
    coef, intercept = fit_lasso(X, Y, 0.05, tol=1e-14, form=form)
    assert coef.shape == (60, 8) and intercept.shape == (8,) and coef.dtype == np.float64
    assert_matches_sklearn(X, Y, coef, intercept, np.full(8, 0.05), coef_atol=1e-7)
    assert 0 < np.count_nonzero(coef) < coef.size  # the sparse regime, not all-zero weights


@FORMS
def test_fit_lasso_per_target_lambda_equals_sklearn(block_size, form):
    X, Y, _, rng = datamodel_problem(300, 60, 8, seed=1)
    lams = rng.uniform(0.003, 0.3, size=8)
    coef, intercept = fit_lasso(X, Y, lams, tol=1e-14, form=form)
    assert_matches_sklearn(X, Y, coef, intercept, lams, coef_atol=1e-7)


@FORMS
def test_fit_lasso_warm_start_and_float32(form):
    X, Y, _, _ = datamodel_problem(300, 60, 8, seed=2)
    lams = np.full(8, 0.02)
    cold, _ = fit_lasso(X, Y, lams, tol=1e-14, form=form)
    warm, warm_b = fit_lasso(X, Y, lams, coef_init=fit_lasso(X, Y, 0.1, form=form)[0], tol=1e-14, form=form)
    np.testing.assert_allclose(warm, cold, atol=1e-8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float32 must still certify tol = 1e-6 without running out of sweeps
        coef32, b32 = fit_lasso(X, Y, lams, tol=1e-6, dtype="float32", form=form)
    assert coef32.dtype == np.float32
    assert_matches_sklearn(X, Y, coef32, b32, lams, rel_gap=1e-6, coef_atol=1e-3)


@FORMS
def test_fit_lasso_constant_columns_and_targets(form):
    X, Y, _, _ = datamodel_problem(200, 30, 3, seed=3)
    X[:, 4] = True  # a training point in every subset: no information, weight 0 as in scikit-learn
    X[:, 7] = False
    Y[:, 2] = 1.5  # a constant output: all weights 0, intercept = the constant
    coef, intercept = fit_lasso(X, Y, 0.01, coef_init=np.ones((30, 3)), tol=1e-14, form=form)
    assert np.all(coef[[4, 7]] == 0)
    assert np.all(coef[:, 2] == 0) and intercept[2] == pytest.approx(1.5)
    assert_matches_sklearn(X, Y[:, :2], coef[:, :2], intercept[:2], np.full(2, 0.01), coef_atol=1e-7)


@FORMS
@pytest.mark.parametrize("patience", [None, 2])
def test_lasso_datamodels_equals_brute_force_path(block_size, patience, form):
    X_all, Y_all, _, _ = datamodel_problem(400, 40, 6, seed=4)
    X, Y, X_val, Y_val = X_all[:300], Y_all[:300], X_all[300:], Y_all[300:]
    n_lambdas, ratio = 8, 1e-2
    dm = LassoDatamodels(n_lambdas=n_lambdas, lambda_ratio=ratio, patience=patience, tol=1e-14, form=form)
    dm.fit(X, Y, X_val, Y_val)
    assert dm.form_ == form

    Xc = X - X.mean(0)
    lam_max = np.abs(Xc.T @ (Y - Y.mean(0))).max(0) / len(X)  # smallest λ with all-zero weights
    grid = lam_max * ratio ** (np.arange(n_lambdas) / (n_lambdas - 1))[:, None]
    np.testing.assert_allclose(dm.path_lambdas_, grid, rtol=1e-12)
    for j in range(Y.shape[1]):
        val_mse = []
        for lam in grid[:, j]:
            coef, b = sklearn_lasso(X, Y[:, j], lam)
            val_mse.append(np.mean((Y_val[:, j] - X_val @ coef - b) ** 2))
        best = int(np.argmin(val_mse))
        # Early stopping leaves the path `patience` λ values after the best one.
        visited = n_lambdas if patience is None else min(n_lambdas, best + patience + 1)
        np.testing.assert_allclose(dm.path_val_mse_[:visited, j], val_mse[:visited], rtol=1e-7)
        assert np.all(np.isnan(dm.path_val_mse_[visited:, j]))
        assert dm.lambda_index_[j] == best and dm.lambda_[j] == pytest.approx(grid[best, j], rel=1e-12)
        assert dm.val_mse_[j] == pytest.approx(val_mse[best], rel=1e-7)
        # The final model: refit at the chosen λ on the fitting and validation models together.
        X_all, y_all = np.concatenate([X, X_val]), np.concatenate([Y[:, j], Y_val[:, j]])
        coef, b = sklearn_lasso(X_all, y_all, grid[best, j])
        np.testing.assert_allclose(dm.coef_[:, j], coef, atol=1e-7)
        assert dm.intercept_[j] == pytest.approx(b, abs=1e-7)
    print("chosen λ indices", dm.lambda_index_)
    assert len(set(dm.lambda_index_)) > 1 or 0 < dm.lambda_index_[0] < n_lambdas - 1  # a real choice was made


def test_lasso_datamodels_does_no_work_in_init():
    dm = LassoDatamodels(n_lambdas=3)
    assert not hasattr(dm, "coef_") and dm.n_lambdas == 3


@pytest.mark.parametrize("case, match", [
    ("row_mismatch", "rows"),
    ("nan_outputs", "NaN or inf"),
    ("inf_val_outputs", "NaN or inf"),
    ("empty_val", "empty"),
    ("one_dim_outputs", "2-D"),
    ("val_columns", "columns"),
    ("bad_ratio", "lambda_ratio"),
    ("bad_patience", "patience"),
])
def test_lasso_datamodels_bad_input(case, match):
    X, Y, _, _ = datamodel_problem(60, 10, 2, seed=5)
    X_val, Y_val = X[:10], Y[:10]
    kwargs = {}
    if case == "row_mismatch":
        Y = Y[:-1]
    elif case == "nan_outputs":
        Y = Y.copy()
        Y[3, 1] = np.nan
    elif case == "inf_val_outputs":
        Y_val = Y_val.copy()
        Y_val[0, 0] = np.inf
    elif case == "empty_val":
        X_val, Y_val = X[:0], Y[:0]
    elif case == "one_dim_outputs":
        Y = Y[:, 0]
    elif case == "val_columns":
        X_val = X_val[:, :-1]
    elif case == "bad_ratio":
        kwargs = {"lambda_ratio": 0.0}
    elif case == "bad_patience":
        kwargs = {"patience": 0}
    with pytest.raises(ValueError, match=match):
        LassoDatamodels(n_lambdas=3, **kwargs).fit(X, Y, X_val, Y_val)


@pytest.mark.parametrize("lam, match", [
    (0.0, "> 0"), (np.ones(3), "one value per target"), (np.nan, "finite"),
])
def test_fit_lasso_bad_lambda(lam, match):
    X, Y, _, _ = datamodel_problem(60, 10, 2, seed=6)
    with pytest.raises(ValueError, match=match):
        fit_lasso(X, Y, lam)


def test_fit_lasso_bad_coef_init():
    X, Y, _, _ = datamodel_problem(60, 10, 2, seed=7)
    with pytest.raises(ValueError, match="coef_init"):
        fit_lasso(X, Y, 0.1, coef_init=np.zeros((2, 10)))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@FORMS
def test_lasso_datamodels_on_cuda_equals_cpu(form):
    X_all, Y_all, _, _ = datamodel_problem(400, 100, 6, seed=8)
    X, Y, X_val, Y_val = X_all[:300], Y_all[:300], X_all[300:], Y_all[300:]
    settings = dict(n_lambdas=6, lambda_ratio=1e-2, tol=1e-12, form=form)
    cpu = LassoDatamodels(**settings, device="cpu").fit(X, Y, X_val, Y_val)
    gpu = LassoDatamodels(**settings, device="cuda").fit(X, Y, X_val, Y_val)
    np.testing.assert_array_equal(gpu.lambda_index_, cpu.lambda_index_)
    np.testing.assert_allclose(gpu.coef_, cpu.coef_, atol=1e-6)
    np.testing.assert_allclose(gpu.intercept_, cpu.intercept_, atol=1e-6)


def test_shared_mask_gram_gives_the_same_fit_and_matches_sklearn():
    """The datamodels stage computes XᵀX once (in row blocks, kept in a zarr array) and every target chunk reads
    it: the fit equals the one that builds its own Gram matrix and still solves scikit-learn's objective."""
    import zarr

    from attribution.lasso import MaskGram

    X_all, Y_all, _, _ = datamodel_problem(400, 40, 6, seed=5)
    X, Y, X_val, Y_val = X_all[:300], Y_all[:300], X_all[300:], Y_all[300:]
    # XᵀX in two blocks of rows, written into a zarr array and read back lazily (as the stage does)
    xtx = zarr.create_array(store={}, shape=(40, 40), chunks=(16, 40), dtype="float32")
    for rows in (slice(0, 25), slice(25, 40)):
        xtx[rows] = MaskGram.from_masks(X, rows=rows).xtx
    gram = MaskGram(xtx, MaskGram.from_masks(X).x_sum, len(X))
    np.testing.assert_array_equal(xtx[:], (X.T.astype(np.int64) @ X).astype(np.float32))  # exact counts
    own = LassoDatamodels(n_lambdas=6, lambda_ratio=1e-2, tol=1e-12).fit(X, Y, X_val, Y_val)
    shared = LassoDatamodels(n_lambdas=6, lambda_ratio=1e-2, tol=1e-12).fit(
        X, Y, X_val, Y_val, gram=gram, gram_val=MaskGram.from_masks(X_val))
    np.testing.assert_array_equal(shared.lambda_index_, own.lambda_index_)
    np.testing.assert_allclose(shared.coef_, own.coef_, atol=1e-9)
    assert_matches_sklearn(np.concatenate([X, X_val]), np.concatenate([Y, Y_val]), shared.coef_,
                           shared.intercept_, shared.lambda_, rel_gap=1e-8, coef_atol=1e-6)
    with pytest.raises(ValueError, match="MaskGram of these very masks"):
        LassoDatamodels().fit(X, Y, X_val, Y_val, gram=MaskGram.from_masks(X_val), gram_val=gram)


def test_masks_form_equals_gram_form_on_the_path_and_refit():
    """The two forms of one problem: the same λ path, the same choice of λ per target, the same weights."""
    X_all, Y_all, _, _ = datamodel_problem(260, 90, 10, seed=9)
    X, Y, X_val, Y_val = X_all[:200], Y_all[:200], X_all[200:], Y_all[200:]
    fits = {form: LassoDatamodels(n_lambdas=8, lambda_ratio=1e-2, tol=1e-12, form=form).fit(X, Y, X_val, Y_val)
            for form in ("gram", "masks")}
    gram, masks = fits["gram"], fits["masks"]
    assert (gram.form_, masks.form_) == ("gram", "masks")
    np.testing.assert_allclose(masks.path_lambdas_, gram.path_lambdas_, rtol=1e-12)
    np.testing.assert_array_equal(masks.lambda_index_, gram.lambda_index_)
    assert len(set(masks.lambda_index_)) > 1  # the targets choose different λ
    np.testing.assert_allclose(masks.path_val_mse_, gram.path_val_mse_, rtol=1e-8)
    np.testing.assert_allclose(masks.coef_, gram.coef_, atol=1e-8)
    np.testing.assert_allclose(masks.intercept_, gram.intercept_, atol=1e-8)


def test_masks_form_in_float32_reaches_tolerance_where_p_exceeds_m():
    """8 models, 200 features: Anderson steps with large coefficients, whose float32 states drift from their
    weights unless recomputed; every target still certifies its duality gap."""
    rng = np.random.default_rng(10)
    X = rng.random((10, 200)) < 0.5
    Y = X @ rng.normal(size=(200, 400)) * 0.3 + rng.normal(size=(10, 400)) + 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm = LassoDatamodels(n_lambdas=2, lambda_ratio=0.5, dtype="float32", form="masks").fit(
            X[:8], Y[:8], X[8:], Y[8:])
    for j in range(0, 400, 50):  # the refit solves scikit-learn's objective at the chosen λ
        ref_coef, ref_b = sklearn_lasso(X, Y[:, j], dm.lambda_[j])
        ours = objective(X, Y[:, j], dm.coef_[:, j].astype(np.float64), float(dm.intercept_[j]), dm.lambda_[j])
        assert ours <= objective(X, Y[:, j], ref_coef, ref_b, dm.lambda_[j]) * (1 + 1e-3)


@pytest.mark.parametrize("n_models, n_features, form", [
    (100, 1000, "masks"),  # 2·M < N: a sweep over the masks costs less
    (600, 1000, "gram"),
    (500, 1000, "gram"),  # 2·M = N: the Gram form
    (40_000, 50_000, "masks"),  # a 9.3 GiB Gram exceeds GRAM_MAX_BYTES
])
def test_auto_form_by_shape(n_models, n_features, form):
    assert lasso.choose_form(n_models, n_features)[0] == form
    assert lasso.choose_form(n_models, n_features, "gram")[0] == "gram"


def test_form_argument_checked():
    X, Y, _, _ = datamodel_problem(60, 10, 2, seed=11)
    with pytest.raises(ValueError, match="form must be one of auto, gram, masks"):
        fit_lasso(X, Y, 0.1, form="dense")
    with pytest.raises(ValueError, match="serve the Gram form"):
        LassoDatamodels(form="masks").fit(X[:50], Y[:50], X[50:], Y[50:], gram=lasso.MaskGram.from_masks(X[:50]),
                                          gram_val=lasso.MaskGram.from_masks(X[50:]))


PEAK_SCRIPT = """
import re, sys, warnings
import numpy as np, torch
from attribution.lasso import fit_lasso

def rss(field):  # kB in /proc/self/status
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

n_models, n_train, form = 200, 4000, sys.argv[1]
X = np.random.default_rng(0).random((n_models, n_train)) < 0.5
Y = X[:, :3] @ np.ones((3, 4)) + np.random.default_rng(1).normal(size=(n_models, 4))
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # 3 sweeps: memory, not convergence
    fit_lasso(X[:, :100], Y, 0.05, form=form, max_iter=3, dtype="float32", device="cpu")  # torch's own start-up
    base = rss("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from the current RSS
    fit_lasso(X, Y, 0.05, form=form, max_iter=3, dtype="float32", device="cpu")
print(rss("VmHWM") - base)
"""


def test_masks_form_allocates_no_n_by_n_array():
    """Peak memory of a fit in a fresh process, over its memory before the fit, at N = 4,000 points and M = 200
    models: an N x N float32 array is 64 MB, the masks 0.8 MB. The Gram form's peak holds one; the masks
    form's stays below a quarter of one."""
    import subprocess
    import sys

    n_train = 4000
    n_by_n = 4 * n_train ** 2
    peak = {}
    for form in ("masks", "gram"):
        done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, form], capture_output=True, text=True, check=True)
        peak[form] = int(done.stdout.strip().splitlines()[-1])
    assert peak["gram"] > n_by_n, peak  # the measurement sees an N x N array where there is one
    assert peak["masks"] < n_by_n / 4, peak
