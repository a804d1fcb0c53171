"""TRAK in the datamodels stage, in bounded memory: chunks of targets in two passes, resumable in either pass.

Real MNIST-1D subset models (trained once for the module) and one reference run in chunks of 64 of the 250
targets; the others copy the subsets store and differ only in their TRAK settings or in being interrupted.
"""

import dataclasses
import shutil

import numpy as np
import pytest
import zarr

from attribution.trak import TrakScorer
from pipelines.config import DatamodelsConfig
from pipelines.stages import RunContext, run_stages
from pipelines.stages import trak as trak_stage
from pipelines.stages.datamodel_io import store_arrays
from tests.conftest import small_config

pytestmark = pytest.mark.slow  # 128 real subset models trained for the module

N_TRAIN, N_TEST, C, CHUNK = 200, 50, 10, 64
T = N_TRAIN + N_TEST
STORED = ("weights", "margin_weights", "bias", "margin_bias", "lds", "margin_lds", "done")


def config(root, target_chunk: int):
    cfg = small_config(root, n_models=128, block=32, keep_params=8)
    return dataclasses.replace(cfg, datamodels=DatamodelsConfig(
        methods=("trak",), n_val=32, n_lds=32, target_chunk=target_chunk, trak_checkpoints=8,
        trak_proj_dim=64))


@pytest.fixture(scope="module")
def subsets_dir(tmp_path_factory):
    cfg = config(tmp_path_factory.mktemp("subsets"), CHUNK)
    ctx = RunContext(cfg=cfg, run_dir=cfg.resolved_run_dir())
    run_stages(ctx, ["subsets"])
    return ctx.run_dir


def trak_run(subsets_dir, root, target_chunk: int = CHUNK) -> RunContext:
    """A run directory with a copy of the trained subsets store."""
    cfg = config(root, target_chunk)
    run_dir = cfg.resolved_run_dir()
    run_dir.mkdir(parents=True)
    shutil.copytree(subsets_dir / "subsets.zarr", run_dir / "subsets.zarr")
    return RunContext(cfg=cfg, run_dir=run_dir)


def spy(monkeypatch) -> dict:
    """Record every featurization (checkpoints) and every scored chunk (outputs, targets) of TrakScorer."""
    calls = {"featurized": [], "both": [], "scores": []}
    init, both, scores = TrakScorer.__init__, TrakScorer.logit_and_margin_scores, TrakScorer.scores

    def spy_init(self, model, checkpoints, *args, **kw):
        calls["featurized"].append(len(checkpoints))
        init(self, model, checkpoints, *args, **kw)

    def spy_both(self, target_x, target_y):
        calls["both"].append(len(target_x))
        return both(self, target_x, target_y)

    def spy_scores(self, target_x, target_y=None, *, outputs="logits"):
        calls["scores"].append((outputs, len(target_x)))
        return scores(self, target_x, target_y, outputs=outputs)

    monkeypatch.setattr(TrakScorer, "__init__", spy_init)
    monkeypatch.setattr(TrakScorer, "logit_and_margin_scores", spy_both)
    monkeypatch.setattr(TrakScorer, "scores", spy_scores)
    return calls


def stored(ctx: RunContext) -> zarr.Group:
    return zarr.open_group(str(ctx.run_dir / "datamodels" / "trak.zarr"), mode="r")


@pytest.fixture(scope="module")
def reference(subsets_dir, tmp_path_factory):
    """The uninterrupted run in chunks of 64 targets: its store and what TrakScorer was asked."""
    ctx = trak_run(subsets_dir, tmp_path_factory.mktemp("reference"))
    with pytest.MonkeyPatch.context() as mp:
        calls = spy(mp)
        run_stages(ctx, ["datamodels"])
    return stored(ctx), calls


def assert_same_store(group: zarr.Group, ref: zarr.Group) -> None:
    for name in STORED:
        np.testing.assert_array_equal(group[name][:], ref[name][:], err_msg=name)
    for key in ("lds_curve", "scale", "margin_scale", "lds_mean", "lds_margin_mean"):
        assert group.attrs[key] == ref.attrs[key], key


def test_chunked_store_equals_one_chunk_and_keeps_the_lasso_schema(subsets_dir, reference, tmp_path):
    ref, _ = reference
    whole = trak_run(subsets_dir, tmp_path, target_chunk=512)  # >= T: one chunk
    run_stages(whole, ["datamodels"])
    one = stored(whole)
    assert one["done"].shape == (1,) and ref["done"].shape == (4,) and ref["done"][:].all()
    # TRAK is linear per target and the scale pools per-target sums: chunks change float rounding at most
    for name in ("weights", "margin_weights", "bias", "margin_bias"):
        a, b = ref[name][:], one[name][:]
        assert np.isfinite(a).all(), name
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max(), err_msg=name)
    for name in ("lds", "margin_lds"):
        np.testing.assert_allclose(ref[name][:], one[name][:], atol=1e-6, err_msg=name)
    assert ref.attrs["scale"] == pytest.approx(one.attrs["scale"], rel=1e-6)
    assert ref.attrs["lds_curve"] == one.attrs["lds_curve"]  # the curve does not depend on the chunks
    assert [n for n, _ in ref.attrs["lds_curve"]] == [2, 4, 8]
    # the scratch arrays of the two passes are gone: the same arrays as a LASSO store (less its Gram sums)
    assert set(ref.array_keys()) == set(store_arrays(N_TRAIN, T, C, CHUNK))
    assert ref.attrs["lds_margin_mean"] > 0.05


def test_one_featurization_one_chunk_at_a_time_curve_on_test_margins(reference):
    _, calls = reference
    # pass 1 featurizes once with the 8 checkpoints; the curve's smaller points with 2 and 4
    assert sorted(calls["featurized"]) == [2, 4, 8]
    assert calls["both"] == [64, 64, 64, 58]
    # the curve never scores logits, only the 50 test targets' margins, once per point
    assert calls["scores"] == [("margin", N_TEST)] * 3


def test_interrupted_calibration_resumes_and_scales_once(subsets_dir, reference, tmp_path, monkeypatch):
    ctx = trak_run(subsets_dir, tmp_path)
    original, runs = trak_stage.calibrate_chunk, []

    def fail_second(unit, **kw):
        runs.append(unit)
        if len(runs) == 2:
            raise RuntimeError("interrupted")
        return original(unit, **kw)

    monkeypatch.setattr(trak_stage, "calibrate_chunk", fail_second)
    with pytest.raises(RuntimeError, match="interrupted"):
        run_stages(ctx, ["datamodels"])
    group = stored(ctx)
    assert group["scored"][:].all() and group["done"][:].tolist() == [True, False, False, False]
    assert np.isnan(group["raw_weights"][:, :CHUNK]).all()  # a done chunk's raw scores are cleared
    monkeypatch.setattr(trak_stage, "calibrate_chunk", original)
    calls = spy(monkeypatch)
    run_stages(ctx, ["datamodels"])
    assert calls["featurized"] == []  # pass 1 and the curve were complete: nothing is scored again
    assert_same_store(stored(ctx), reference[0])


def test_interrupted_scoring_resumes_from_the_next_chunk(subsets_dir, reference, tmp_path, monkeypatch):
    ctx = trak_run(subsets_dir, tmp_path)
    original, runs = TrakScorer.logit_and_margin_scores, []

    def fail_third(self, target_x, target_y):
        runs.append(len(target_x))
        if len(runs) == 3:
            raise RuntimeError("interrupted")
        return original(self, target_x, target_y)

    monkeypatch.setattr(TrakScorer, "logit_and_margin_scores", fail_third)
    with pytest.raises(RuntimeError, match="interrupted"):
        run_stages(ctx, ["datamodels"])
    group = stored(ctx)
    assert group["scored"][:].tolist() == [True, True, False, False] and not group["done"][:].any()
    monkeypatch.setattr(TrakScorer, "logit_and_margin_scores", original)
    calls = spy(monkeypatch)
    run_stages(ctx, ["datamodels"])
    assert calls["featurized"] == [8] and calls["both"] == [64, 58]  # the curve's 2 and 4 were kept
    assert_same_store(stored(ctx), reference[0])


@pytest.mark.ray
def test_ray_equals_serial(subsets_dir, reference, tmp_path, ray_local):
    # the pass-1 unit writes its chunks from a Ray worker; the driver only reads them back
    ctx = trak_run(subsets_dir, tmp_path)
    executor = dataclasses.replace(ctx.cfg.executor, kind="ray")
    ctx = RunContext(cfg=dataclasses.replace(ctx.cfg, executor=executor), run_dir=ctx.run_dir)
    try:
        run_stages(ctx, ["datamodels"])
    finally:
        ctx.close()
    assert_same_store(stored(ctx), reference[0])
