"""`datamodels.drop_failed`: a subsets store with failed rows is refused (one line, exit 2, naming
the rows and both ways out); with drop_failed the datamodels are fit without them and equal a fit on a store
that holds only the surviving models (LASSO on a planted problem, TRAK on real subset models), and the stores
record what they dropped."""

import dataclasses
import json
import logging

import numpy as np
import pytest
import zarr
from sklearn.linear_model import Lasso

from attribution import subsets as subsets_store
from attribution.masks import model_seeds
from attribution.store import StoreError, read
from pipelines.cli import main
from pipelines.config import DatamodelsConfig, to_dict
from pipelines.stages import RunContext, datamodel_io, run_stages
from pipelines.rundir.layout import split
from pipelines.rundir.seeds import SUBSET_TRAIN_STREAM
from pipelines.stages.datamodel_io import SubsetSource
from pipelines.stages.subsets import subsets_config
from tests.conftest import small_config
from tests.pipelines.conftest import C, N_TRAIN, planted_run

# planted runs: 160 models in blocks of 32, fit rows 0..95, validation 96..127, LDS 128..159
FAILED = [3, 40, 41, 100, 150]  # in the fit split (two across a block boundary), validation and LDS
DM = dict(n_val=32, n_lds=32, target_chunk=64, n_lambdas=8)


def fail(run_dir, rows) -> None:
    """Record `rows` as the subsets stage records diverged models: NaN logits, failed, not done."""
    g = zarr.open_group(str(run_dir / "subsets.zarr"), mode="r+")
    for r in rows:
        g["logits"][r] = np.nan
        g["failed"][r] = True
        g["done"][r] = False


def lasso(run_dir) -> zarr.Group:
    return zarr.open_group(str(run_dir / "datamodels" / "lasso.zarr"), mode="r")


def test_failed_rows_refused_in_one_line(tmp_path, capsys):
    ctx, *_ = planted_run(tmp_path)
    fail(ctx.run_dir, FAILED)
    config = tmp_path / "cfg.yaml"
    config.write_text(json.dumps(to_dict(ctx.cfg)))
    capsys.readouterr()
    assert main(["run", str(config), "--stages", "datamodels"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dmu:")]
    assert len(err) == 1, err
    assert "5 failed models (non-finite outputs; rows 3, 40..41, 100, 150)" in err[0]
    assert "rerun the subsets stage" in err[0] and "datamodels.drop_failed: true" in err[0]
    assert not (ctx.run_dir / "datamodels" / "lasso.zarr").exists()


def surviving_run(root, masks, logits, keep, dm: DatamodelsConfig) -> RunContext:
    """A run whose subsets store holds only the models `keep` (their masks and logits), with the held-out
    splits shrunk by the models dropped from them."""
    cfg = small_config(root, n_models=int(keep.sum()), block=32)
    cfg = dataclasses.replace(cfg, datamodels=dm)
    ctx = RunContext(cfg=cfg, run_dir=cfg.resolved_run_dir())
    group = subsets_store.create_store(
        ctx.run_dir / "subsets.zarr", n_models=int(keep.sum()), n_train=N_TRAIN, n_targets=ctx.data.n_targets,
        n_classes=C, alpha=0.5, seed=cfg.seed, block_size=32, keep_params=0, n_params=1,
        config=subsets_config(cfg), attrs=ctx.dataset_attrs())
    group["masks"][:] = masks[keep]
    group["logits"][:] = logits[keep].astype(np.float32)
    group["done"][:] = True
    return ctx


@pytest.mark.slow
def test_lasso_with_drop_failed_equals_a_fit_on_the_surviving_models(tmp_path, caplog):
    dm = DatamodelsConfig(**DM, lds_curve=(40, 93), drop_failed=True)
    ctx, masks, logits, _ = planted_run(tmp_path / "drop", datamodels=dm)
    fail(ctx.run_dir, FAILED)
    with caplog.at_level(logging.WARNING, logger="dmu"):
        run_stages(ctx, ["datamodels"])
    warnings = [r.getMessage() for r in caplog.records if "drop_failed" in r.getMessage()]
    assert len(warnings) == 1 and "dropping 5 failed subset models (rows 3, 40..41, 100, 150)" in warnings[0]
    g = lasso(ctx.run_dir)
    seeds = model_seeds(160, ctx.cfg.seed, SUBSET_TRAIN_STREAM)
    assert g.attrs["dropped_rows"] == FAILED and g.attrs["dropped_seeds"] == [int(seeds[r]) for r in FAILED]
    assert (g.attrs["n_fit"], g.attrs["n_val"], g.attrs["n_lds"]) == (93, 31, 31)
    assert g.attrs["config"]["drop_failed"] is True

    # the same stage on a store of the 155 surviving models only, without drop_failed: the same numbers
    keep = np.ones(160, dtype=bool)
    keep[FAILED] = False
    ref_ctx = surviving_run(tmp_path / "ref", masks, logits, keep,
                            DatamodelsConfig(**{**DM, "n_val": 31, "n_lds": 31}, lds_curve=(40, 93)))
    run_stages(ref_ctx, ["datamodels"])
    ref = lasso(ref_ctx.run_dir)
    assert "drop_failed" not in ref.attrs["config"] and ref.attrs["dropped_rows"] == []
    for name in ("weights", "bias", "lambda", "val_mse", "lds", "margin_weights", "margin_bias", "margin_lds",
                 "xtx_fit", "xtx_val", "x_sum_fit", "x_sum_val"):
        np.testing.assert_allclose(g[name][:], ref[name][:], rtol=1e-6, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(g.attrs["lds_curve"], ref.attrs["lds_curve"], rtol=1e-6)
    assert g.attrs["lds_mean"] == pytest.approx(ref.attrs["lds_mean"], rel=1e-6)

    # and scikit-learn's Lasso at the stored λ on the surviving fit + validation models
    fitval = np.setdiff1d(np.arange(128), FAILED)
    w = g["weights"]
    for t, c in [(0, 0), (7, 3), (230, 9)]:
        ref_fit = Lasso(alpha=float(g["lambda"][t, c]), tol=1e-10, max_iter=100000).fit(
            masks[fitval], logits[fitval, t, c])
        np.testing.assert_allclose(w[:, t, c], ref_fit.coef_, atol=2e-3)


@pytest.mark.slow
def test_resuming_with_other_failed_rows_refused(tmp_path):
    ctx, *_ = planted_run(tmp_path, datamodels=DatamodelsConfig(**DM, drop_failed=True))
    fail(ctx.run_dir, [3])
    run_stages(ctx, ["datamodels"])
    fail(ctx.run_dir, [4])  # another model failed since (or one was retrained): the store would mix model sets
    with pytest.raises(StoreError, match=r"fit without the failed subset models 3, but the failed ones are now "
                                         r"3\.\.4: move it away"):
        run_stages(ctx, ["datamodels"])


def test_a_split_left_empty_is_refused(tmp_path):
    with pytest.raises(StoreError, match=r"only 0 of the 2 validation models \(rows 6\.\.7\) did not fail"):
        split(10, 2, 2, np.array([1, 6, 7]))
    fit, val, held = split(10, 2, 2, np.array([1, 7]))
    assert fit.tolist() == [0, 2, 3, 4, 5] and val.tolist() == [6] and held.tolist() == [8, 9]


def test_index_reads_go_block_by_block(tmp_path, monkeypatch):
    """SubsetSource reads scattered rows one block of stored rows at a time, each block once."""
    ctx, masks, logits, _ = planted_run(tmp_path)
    source = SubsetSource(path=str(ctx.run_dir / "subsets.zarr"), n_models=160, n_train=N_TRAIN,
                          n_targets=ctx.data.n_targets, n_classes=C, labels=ctx.data.y_targets.numpy(),
                          splits=split(160, 32, 32))
    reads = []

    def spy(arr, selection=slice(None), *, store=None):
        reads.append(selection)
        return read(arr, selection, store=store)

    monkeypatch.setattr(datamodel_io, "read", spy)
    rows = np.array([1, 5, 33, 34, 90, 159])
    np.testing.assert_array_equal(source.masks(rows), masks[rows])
    np.testing.assert_array_equal(source.logits(rows, slice(64, 128)),
                                  logits[rows, 64:128].astype(np.float32))
    spans = [(s[0].start, s[0].stop) for s in reads]
    assert spans == [(1, 6), (33, 35), (90, 91), (159, 160)] * 2
    reads.clear()
    source.masks(np.arange(10, 40))  # contiguous rows: one slice
    assert [s[0] for s in reads] == [slice(10, 40)]


@pytest.mark.slow
def test_trak_with_drop_failed_equals_trak_on_the_surviving_models(tmp_path):
    """Real subset models (keep_params 6): a failed checkpoint is replaced by the next model, and TRAK equals
    TRAK on a store of the surviving models only."""
    dm = dict(methods=("trak",), target_chunk=128, trak_checkpoints=4, trak_proj_dim=32)
    cfg = small_config(tmp_path / "drop", n_models=32, block=8, keep_params=6, epochs=3)
    cfg = dataclasses.replace(cfg, datamodels=DatamodelsConfig(**dm, n_val=8, n_lds=8, drop_failed=True))
    ctx = RunContext(cfg=cfg, run_dir=cfg.resolved_run_dir())
    run_stages(ctx, ["subsets"])
    failed = [1, 17, 28]  # a checkpoint, a validation and an LDS model
    src = zarr.open_group(str(ctx.run_dir / "subsets.zarr"), mode="r")
    masks, logits, params = src["masks"][:], src["logits"][:], src["params"][:]
    fail(ctx.run_dir, failed)
    run_stages(ctx, ["datamodels"])
    trak = zarr.open_group(str(ctx.run_dir / "datamodels" / "trak.zarr"), mode="r")
    assert trak.attrs["dropped_rows"] == failed and trak.attrs["n_calibration"] == 7 and trak.attrs["n_lds"] == 7

    keep = np.ones(32, dtype=bool)
    keep[failed] = False
    ref_cfg = small_config(tmp_path / "ref", n_models=29, block=8, keep_params=5, epochs=3)
    ref_cfg = dataclasses.replace(ref_cfg, datamodels=DatamodelsConfig(**dm, n_val=7, n_lds=7))
    ref_ctx = RunContext(cfg=ref_cfg, run_dir=ref_cfg.resolved_run_dir())
    group = subsets_store.create_store(
        ref_ctx.run_dir / "subsets.zarr", n_models=29, n_train=N_TRAIN, n_targets=ref_ctx.data.n_targets,
        n_classes=C, alpha=0.5, seed=ref_cfg.seed, block_size=8, keep_params=5, n_params=params.shape[1],
        config=subsets_config(ref_cfg), attrs=ref_ctx.dataset_attrs())
    group["masks"][:] = masks[keep]
    group["logits"][:] = logits[keep]
    group["params"][:] = params[keep[:6]][:5]
    group["done"][:] = True
    run_stages(ref_ctx, ["datamodels"])
    ref = zarr.open_group(str(ref_ctx.run_dir / "datamodels" / "trak.zarr"), mode="r")
    for name in ("weights", "bias", "lds", "margin_weights", "margin_bias", "margin_lds"):
        np.testing.assert_allclose(trak[name][:], ref[name][:], rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(trak.attrs["lds_curve"], ref.attrs["lds_curve"], rtol=1e-5)
