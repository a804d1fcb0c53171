"""The datamodels stage on an imported margin-only subsets.zarr (the datamodels release's masks and margins, files
written here in its layout): LASSO on the margins alone against scikit-learn, DM-Direct on the bench's imported
margins with those datamodels, and what such a store refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.linear_model import Lasso

from attribution.store import StoreError, open_store
from pipelines.api import open_run
from pipelines.cli import main
from pipelines.interchange import datamodels as release
from pipelines.interchange import edub
from pipelines.interchange.stores import write_margin_datamodels
from pipelines.rundir.layout import datamodel_store
from tests.pipelines.interchange.test_interchange_edub import N, NT, SETS, write_bench

M, N_VAL, N_LDS = 90, 10, 10
FIT_VAL = slice(0, M - N_LDS)  # LASSO refits on the fit and validation models at the λ validation chose


def write_planted_release(folder, seed=0):
    """A release whose margins are linear in the masks (plus noise), as float16: masks (M, N), margins (M, N + NT),
    the planted weights (N, N + NT)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    masks = rng.random((M, N)) < 0.5
    weights = rng.normal(size=(N, N + NT)) * (rng.random((N, N + NT)) < 0.2)
    outputs = (masks @ weights + rng.normal(size=(M, N + NT)) * 0.1 + 1).astype(np.float16)
    np.save(folder / "train_masks_50pct.npy", masks)
    np.save(folder / "train_margins_50pct.npy", outputs[:, :N])
    np.save(folder / "test_margins_50pct.npy", outputs[:, N:])
    return masks, outputs.astype(np.float32), weights


def config(path, methods="[lasso]", stages="[datamodels]", extra=""):
    path.write_text(f"task: {{name: cifar10}}\nstages: {stages}\nexecutor: {{kind: serial}}\n"
                    f"datamodels: {{methods: {methods}, n_val: {N_VAL}, n_lds: {N_LDS}, n_lambdas: 8, "
                    f"lds_curve: [20, 40]}}\n{extra}")
    return str(path)


def test_lasso_on_imported_margins_equals_sklearn(tmp_path):
    masks, y, planted = write_planted_release(tmp_path / "release")
    run = tmp_path / "run"
    assert main(["import", "datamodels-release", str(tmp_path / "release"), "--run-dir", str(run)]) == 0
    assert main(["run", config(tmp_path / "c.yaml"), "--run-dir", str(run)]) == 0
    g = open_store(run / "datamodels" / "lasso.zarr", "datamodels")
    assert "weights" not in g and g.attrs["margin_only"] and g.attrs["n_fit"] == M - N_VAL - N_LDS
    w, bias, lam = g["margin_weights"][:], g["margin_bias"][:], g["margin_lambda"][:]
    assert w.shape == (N, N + NT) and np.asarray(g["done"][:]).all()
    assert np.corrcoef(w.ravel(), planted.ravel())[0, 1] > 0.95
    x = masks.astype(np.float64)
    for t in (0, 17, N + NT - 1):  # a training point's margin, the last training point, the last test point
        ref = Lasso(alpha=float(lam[t]), tol=1e-10, max_iter=100000).fit(x[FIT_VAL], y[FIT_VAL, t])
        np.testing.assert_allclose(w[:, t], ref.coef_, atol=2e-3)
        assert bias[t] == pytest.approx(ref.intercept_, abs=2e-3)
        # LDS: Spearman correlation of the predictions with the outputs of the held-out models
        held = slice(M - N_LDS, M)
        expected = spearmanr(x[held] @ w[:, t] + bias[t], y[held, t]).statistic
        assert g["margin_lds"][t] == pytest.approx(expected, abs=1e-5)
    assert "lds_mean" not in g.attrs  # no logits: the margins' summary only
    assert g.attrs["lds_margin_test_mean"] == pytest.approx(float(np.nanmean(g["margin_lds"][N:])))
    assert [n for n, _ in g.attrs["lds_curve"]] == [20, 40]


def test_dm_direct_on_bench_margins_with_lasso_fit_on_the_imported_release(tmp_path):
    """The whole CIFAR-10 path from public stores with dmu's own LASSO: the release's masks and margins, the bench's
    full models and oracles, then datamodels, unlearn and report."""
    full, _, oracles = write_bench(tmp_path / "bench")
    write_planted_release(tmp_path / "release")
    run = tmp_path / "run"
    assert main(["import", "datamodels-release", str(tmp_path / "release"), "--run-dir", str(run)]) == 0
    assert main(["import", "edub", str(tmp_path / "bench"), "--run-dir", str(run)]) == 0
    extra = ("forget_sets: {random_sizes: [], full_class: null}\nmodels: {k: 6, floor_oracles: false}\n"
             "unlearn: {methods: [do_nothing, dm_direct], datamodels: [lasso]}\n")
    assert main(["run", config(tmp_path / "c.yaml", stages="[datamodels, unlearn, report]", extra=extra),
                 "--run-dir", str(run)]) == 0
    w = open_store(run / "datamodels" / "lasso.zarr", "datamodels")["margin_weights"][:]
    unlearned = open_store(run / "unlearned" / "forget_set_2" / "dm_direct.zarr", "unlearned")["margins"][:]
    np.testing.assert_array_equal(unlearned, (full - w[SETS[2]].astype(np.float64).sum(0)).astype(np.float32))
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    assert "dm_direct" in metrics["forget_sets"]["forget_set_5"]["methods"]
    assert oracles[2].shape[1] == N + NT
    assert main(["info", "--verify", str(run)]) == 0  # the LASSO store's config names the import it was fit on
    api = open_run(run)  # the analysis API reads the same weights; logits it refuses in one line
    np.testing.assert_allclose(api.predicted_effect(SETS[2]), -w[np.sort(SETS[2])].astype(np.float64).sum(0),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="margin datamodels only .* ask for output='margin'"):
        api.predicted_effect(SETS[2], output="logits")


@pytest.mark.parametrize("methods, stages, message", [
    ("[lasso, trak]", "[datamodels]", "holds imported margins, no model parameters: TRAK needs them"),
    ("[lasso]", "[subsets, datamodels]", "holds imported margins: leave the subsets stage out"),
])
def test_what_imported_margins_cannot_serve_is_refused_in_one_line(tmp_path, capsys, methods, stages, message):
    write_planted_release(tmp_path / "release")
    run = tmp_path / "run"
    assert main(["import", "datamodels-release", str(tmp_path / "release"), "--run-dir", str(run)]) == 0
    capsys.readouterr()
    before = sorted(p.name for p in run.iterdir())
    keep = "subsets: {keep_params: 10}\n"  # TRAK's checkpoints, as a config for trained subsets would have
    assert main(["run", config(tmp_path / "c.yaml", methods, stages, keep), "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert sorted(p.name for p in run.iterdir()) == before


def test_too_few_imported_models_for_the_held_out_ones_is_one_line(tmp_path, capsys):
    write_planted_release(tmp_path / "release")
    run = tmp_path / "run"
    assert main(["import", "datamodels-release", str(tmp_path / "release"), "--run-dir", str(run)]) == 0
    capsys.readouterr()
    path = tmp_path / "c.yaml"
    path.write_text("task: {name: cifar10}\nstages: [datamodels]\nexecutor: {kind: serial}\n"
                    "datamodels: {methods: [lasso], n_val: 50, n_lds: 40}\n")
    assert main(["run", str(path), "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds 90 imported models, too few" in err
    assert not (run / "datamodels").exists()


def test_class_logit_methods_refuse_a_margin_only_datamodel_store(tmp_path):
    write_margin_datamodels(tmp_path, "lasso", n_train=N, n_targets=N + NT,
                            read_rows=lambda a, b: np.zeros((b - a, N + NT)), per_target={}, config={}, attrs={})
    with pytest.raises(StoreError, match="holds margin datamodels only .* need class-logit datamodels") as err:
        datamodel_store(tmp_path, "lasso", data=None)
    assert "\n" not in str(err.value)
