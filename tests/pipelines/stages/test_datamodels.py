"""The datamodels stage on a planted linear problem written into a real subsets.zarr (no training needed)."""

import dataclasses

import numpy as np
import pytest
import zarr
from sklearn.linear_model import Lasso

from attribution import subsets as subsets_store
from attribution.store import StoreError
from pipelines.config import ConfigError, DatamodelsConfig
from pipelines.stages import RunContext, run_stages
from tests.conftest import small_config
from tests.pipelines.conftest import C, N_TEST, N_TRAIN, planted_run
from unlearning.klom import margins

@pytest.mark.slow
def test_lasso_stage_recovers_planted_weights_and_matches_sklearn(tmp_path):
    ctx, masks, logits, weights = planted_run(tmp_path)
    run_stages(ctx, ["datamodels"])
    g = zarr.open_group(str(ctx.run_dir / "datamodels" / "lasso.zarr"), mode="r")
    w = g["weights"][:]
    assert w.shape == (N_TRAIN, N_TRAIN + N_TEST, C) and g["done"][:].all()
    # planted effects are recovered (noise 0.1, 128 fit+val models)
    assert np.abs(w - weights).max() < 0.35
    assert np.corrcoef(w.ravel(), weights.ravel())[0, 1] > 0.97
    # at the stored λ, every column equals scikit-learn's Lasso on the fit + validation models
    fitval = slice(0, 128)
    for t, c in [(0, 0), (7, 3), (230, 9)]:
        ref = Lasso(alpha=float(g["lambda"][t, c]), tol=1e-10, max_iter=100000).fit(masks[fitval],
                                                                                       logits[fitval, t, c])
        np.testing.assert_allclose(w[:, t, c], ref.coef_, atol=2e-3)
        assert g["bias"][t, c] == pytest.approx(ref.intercept_, abs=2e-3)
    # LDS on the 32 held-out models is high for a noiseless-ish linear problem
    assert g.attrs["lds_mean"] > 0.8
    margin_lds = g["margin_lds"][:]  # the summary splits test and training targets (0..N-1 are training points)
    assert g.attrs["lds_margin_test_mean"] == pytest.approx(float(np.nanmean(margin_lds[N_TRAIN:])))
    assert g.attrs["lds_margin_train_mean"] == pytest.approx(float(np.nanmean(margin_lds[:N_TRAIN])))
    assert g.attrs["lds_test_mean"] == pytest.approx(float(np.nanmean(g["lds"][N_TRAIN:])))
    # margins are fit too
    y = margins(logits, ctx.data.y_targets.numpy())
    assert g["margin_weights"].shape == (N_TRAIN, N_TRAIN + N_TEST) and np.isfinite(g["margin_lds"][:]).mean() > 0.9
    assert np.isfinite(y).all()


@pytest.mark.ray
def test_ray_equals_serial(tmp_path, ray_local):
    serial, *_ = planted_run(tmp_path / "s")
    run_stages(serial, ["datamodels"])
    ray_ctx, *_ = planted_run(tmp_path / "r", kind="ray")
    run_stages(ray_ctx, ["datamodels"])
    a = zarr.open_group(str(serial.run_dir / "datamodels" / "lasso.zarr"), mode="r")
    b = zarr.open_group(str(ray_ctx.run_dir / "datamodels" / "lasso.zarr"), mode="r")
    np.testing.assert_array_equal(a["weights"][:], b["weights"][:])


def test_nan_outputs_refused_and_nothing_written(tmp_path):
    def corrupt(logits):
        logits[5, 3, 2] = np.nan

    ctx, *_ = planted_run(tmp_path, corrupt=corrupt)
    with pytest.raises(StoreError, match=r"non-finite logits in models \[5\]"):
        run_stages(ctx, ["datamodels"])
    assert not (ctx.run_dir / "datamodels" / "lasso.zarr").exists()


def test_empty_or_too_large_held_out_slices(tmp_path):
    ctx, *_ = planted_run(tmp_path, datamodels=DatamodelsConfig(n_val=0, n_lds=32))
    with pytest.raises(ConfigError, match="n_val"):
        run_stages(ctx, ["datamodels"])
    ctx, *_ = planted_run(tmp_path / "b", datamodels=DatamodelsConfig(n_val=100, n_lds=100))
    with pytest.raises(ConfigError, match="leaves -40 models"):
        run_stages(ctx, ["datamodels"])


def test_store_of_another_dataset_refused(tmp_path):
    ctx, *_ = planted_run(tmp_path)
    other = dataclasses.replace(ctx.cfg, task=dataclasses.replace(ctx.cfg.task, n_test=40))
    with pytest.raises(StoreError, match="another dataset"):
        run_stages(RunContext(cfg=other, run_dir=ctx.run_dir), ["datamodels"])


def test_mismatched_model_counts_refused(tmp_path):
    ctx, *_ = planted_run(tmp_path)
    g = zarr.open_group(str(ctx.run_dir / "subsets.zarr"), mode="r+")
    g["masks"].resize((150, N_TRAIN))
    with pytest.raises(StoreError, match="150 masks but 160 rows of logits"):
        run_stages(ctx, ["datamodels"])


@pytest.mark.slow
def test_trak_stage_end_to_end_on_real_subset_models(tmp_path):
    """Real subset models -> LASSO and TRAK stores in one schema (TRAK in 2 target chunks, its scratch arrays
    gone once done); calibrated TRAK agrees in sign with LASSO."""
    cfg = small_config(tmp_path, n_models=128, block=32, keep_params=8)
    cfg = dataclasses.replace(cfg, datamodels=DatamodelsConfig(
        methods=("lasso", "trak"), n_val=32, n_lds=32, target_chunk=128, n_lambdas=8, trak_checkpoints=8,
        trak_proj_dim=64, lambda_ratio=0.05))  # 64 fit models for 200 points: the dense end of a longer path is
    # slow to converge in float32 (and never chosen on so few models)
    ctx = RunContext(cfg=cfg, run_dir=cfg.resolved_run_dir())
    run_stages(ctx, ["subsets", "datamodels"])
    lasso = zarr.open_group(str(ctx.run_dir / "datamodels" / "lasso.zarr"), mode="r")
    trak = zarr.open_group(str(ctx.run_dir / "datamodels" / "trak.zarr"), mode="r")
    for name in ("weights", "bias", "lds", "margin_weights", "margin_lds"):
        assert trak[name].shape == lasso[name].shape
    assert trak["done"].shape == (2,) and trak["done"][:].all()
    gram = {"xtx_fit", "xtx_val", "x_sum_fit", "x_sum_val", "gram_done"}
    assert set(trak.array_keys()) == set(lasso.array_keys()) - gram
    assert np.isfinite(trak["weights"][:]).all()
    a, b = lasso["margin_weights"][:].ravel(), trak["margin_weights"][:].ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.1
    assert [n for n, _ in trak.attrs["lds_curve"]] == [2, 4, 8]
    assert trak.attrs["lds_margin_mean"] > 0.05


def test_trak_needs_kept_checkpoints(tmp_path):
    ctx, *_ = planted_run(tmp_path, datamodels=DatamodelsConfig(methods=("trak",), n_val=32, n_lds=32))
    with pytest.raises(ConfigError, match="keep_params"):
        run_stages(ctx, ["datamodels"])


@pytest.mark.slow
def test_units_read_only_their_own_targets_and_weights_in_float16(tmp_path, monkeypatch):
    """Bounded memory: every read of subset logits by a work unit covers at most one target chunk (the whole
    (M, T, C) array is never read); float16 weights are the float32 fit rounded once."""
    from pipelines.stages.datamodel_io import SubsetSource

    reads = []
    original = SubsetSource.logits

    def spy(self, rows, targets):
        reads.append(targets)
        return original(self, rows, targets)

    monkeypatch.setattr(SubsetSource, "logits", spy)
    config = dict(n_val=32, n_lds=32, target_chunk=64, n_lambdas=8)
    ctx16, *_ = planted_run(tmp_path / "f16", datamodels=DatamodelsConfig(**config, weights_dtype="float16"))
    run_stages(ctx16, ["datamodels"])
    n_targets = ctx16.data.n_targets
    assert len(reads) == -(-n_targets // 64)  # one read per target chunk
    assert all(t.stop - t.start <= 64 for t in reads)
    ctx32, *_ = planted_run(tmp_path / "f32", datamodels=DatamodelsConfig(**config))
    run_stages(ctx32, ["datamodels"])
    w16 = zarr.open_group(str(ctx16.run_dir / "datamodels" / "lasso.zarr"), mode="r")["weights"]
    w32 = zarr.open_group(str(ctx32.run_dir / "datamodels" / "lasso.zarr"), mode="r")["weights"][:]
    assert w16.dtype == np.float16
    np.testing.assert_array_equal(w16[:], w32.astype(np.float16))


def test_float16_logits_are_stored_half_and_read_as_float32(tmp_path):
    group = subsets_store.create_store(
        tmp_path / "subsets.zarr", n_models=4, n_train=10, n_targets=300, n_classes=C, alpha=0.5, seed=0,
        block_size=2, keep_params=0, n_params=1, config={"t": 1}, attrs={}, logits_dtype="float16")
    logits = np.random.default_rng(0).normal(0, 10, (2, 300, C)).astype(np.float32)
    subsets_store.write_block(group, 0, logits, None)
    assert group["logits"].dtype == np.float16 and group["logits"].shards == (2, 384, C)
    assert group["logits"].chunks == (2, 128, C)  # read by 128 targets, written by whole shards
    np.testing.assert_array_equal(group["logits"][:2], logits.astype(np.float16))


def test_subset_logits_are_scanned_for_finiteness_once(tmp_path, monkeypatch):
    from pipelines.stages import datamodel_io

    ctx, *_ = planted_run(tmp_path)
    scans = []
    real = datamodel_io.check_finite
    monkeypatch.setattr(datamodel_io, "check_finite", lambda *a: (scans.append(1), real(*a)))
    first = datamodel_io.open_subsets(ctx)
    again = datamodel_io.open_subsets(ctx)
    assert len(scans) == 1 and first.splits[0].tolist() == again.splits[0].tolist()
    group = zarr.open_group(str(ctx.run_dir / "subsets.zarr"), mode="r+")
    assert group.attrs[datamodel_io.CHECKED_ATTR] == group["done"].shape[0]
    # a store whose done models changed since (the subsets stage finished more) is scanned again
    group.attrs[datamodel_io.CHECKED_ATTR] = 0
    datamodel_io.open_subsets(ctx)
    assert len(scans) == 2


def test_masks_form_stage_writes_no_gram_and_equals_the_gram_form(tmp_path, monkeypatch):
    """120 models (56 fit + 32 validation) for 200 training points: 2·M < N, so the stage fits on the masks
    (no N x N arrays in the store, no Gram units); forced into the Gram form, the same shapes give the same
    datamodels to float32 tolerance."""
    from pipelines.stages import datamodels as stage

    config = DatamodelsConfig(n_val=32, n_lds=32, target_chunk=128, n_lambdas=6, lambda_ratio=0.05)
    masks_ctx, *_ = planted_run(tmp_path / "masks", n_models=120, datamodels=config)
    run_stages(masks_ctx, ["datamodels"])
    monkeypatch.setattr(stage, "choose_form", lambda n_models, n_train: ("gram", "forced by the test"))
    gram_ctx, *_ = planted_run(tmp_path / "gram", n_models=120, datamodels=config)
    run_stages(gram_ctx, ["datamodels"])
    a = zarr.open_group(str(masks_ctx.run_dir / "datamodels" / "lasso.zarr"), mode="r")
    b = zarr.open_group(str(gram_ctx.run_dir / "datamodels" / "lasso.zarr"), mode="r")
    assert a.attrs["solver"]["form"] == "masks" and b.attrs["solver"]["form"] == "gram"
    gram = {"xtx_fit", "xtx_val", "x_sum_fit", "x_sum_val", "gram_done"}
    assert not gram & set(a.array_keys()) and gram <= set(b.array_keys())
    assert a["done"][:].all()
    np.testing.assert_array_equal(a["lambda"][:], b["lambda"][:])  # the same λ chosen for every target
    for name in ("weights", "margin_weights", "bias", "margin_bias"):
        # both solves stop at a duality gap of 1e-4·‖yc‖²/M in float32: weights agree to about 1e-2 at worst
        np.testing.assert_allclose(a[name][:], b[name][:], atol=1.5e-2, err_msg=name)
        if name.endswith("weights"):
            assert np.mean(np.abs(a[name][:] - b[name][:]) <= 1e-3) > 0.999, name
    assert np.abs(a["weights"][:]).max() > 0.5  # real effects, not all-zero weights
