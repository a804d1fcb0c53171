"""Unlearning quality against datamodel quality (unlearn.datamodel_curve): LASSO stores fit on the first n subset
models, the datamodel methods run on each with the hyperparameters tuned on the full store, and the report's
curve of KLOM against n, checked against scikit-learn, the DM-Direct formula and KLOM recomputed from the stores."""

import dataclasses
import json

import numpy as np
import pytest
import zarr
from sklearn.linear_model import Lasso

from pipelines.config import ConfigError, DatamodelsConfig, UnlearnConfig, validate
from pipelines.report.evaluate import POINT_SETS, datamodel_curve, validation_points
from pipelines.report.markdown import build_report
from pipelines.rundir import layout
from pipelines.rundir.variants import curve_models, curve_sizes, variants
from pipelines.stages import RunContext, run_stages
from tests.pipelines.conftest import planted_run
from tests.pipelines.conftest import K, run, stage_config, write_datamodels
from unlearning.klom import klom, margins


def curve_config(tmp_path, **unlearn):
    """stage_config with 12 subset models split 8 / 2 / 2 and curve sizes 4 and 8 (8: not below the fit models)."""
    cfg = stage_config(tmp_path, methods=unlearn.pop("methods", ("do_nothing", "dm_direct")), full_class=None)
    return dataclasses.replace(
        cfg, datamodels=DatamodelsConfig(n_val=2, n_lds=2, lds_curve=(4, 8)),
        unlearn=dataclasses.replace(cfg.unlearn, datamodel_curve=True, **unlearn))


@pytest.mark.parametrize("change, words", [
    ({"datamodels": DatamodelsConfig(n_val=2, n_lds=2, lds_curve=(8, 20))}, "lds_curve size below the 8 fit"),
    ({"datamodels": DatamodelsConfig(n_val=2, n_lds=2, lds_curve=(4,), methods=("trak",))}, "'lasso' in"),
])
def test_curve_without_what_it_needs_is_one_line(tmp_path, change, words):
    cfg = dataclasses.replace(curve_config(tmp_path), **change)
    with pytest.raises(ConfigError, match=words):
        validate(cfg)
    cfg = curve_config(tmp_path, methods=("do_nothing", "scrub"))
    with pytest.raises(ConfigError, match="dm_direct or dm_matching"):
        validate(cfg)


def test_curve_variants_take_the_hyperparameters_tuned_on_lasso(tmp_path):
    cfg = curve_config(tmp_path, methods=("do_nothing", "dm_direct", "dm_matching", "scrub"))
    assert curve_sizes(cfg) == (4,)  # 8 is every fit model: the run's own LASSO store
    tuned = {"dm_matching": {"lr": 0.5, "epochs": 3}, "scrub": {"lr": 0.1}}
    curve = [v for v in variants(cfg, tuned) if curve_models(v.datamodel) is not None]
    assert [(v.method, v.datamodel, v.store_name) for v in curve] == [
        ("dm_direct", "lasso_n4", "dm_direct__lasso_n4"), ("dm_matching", "lasso_n4", "dm_matching__lasso_n4")]
    assert curve[1].hparams == tuned["dm_matching"] and curve[1].label == "dm_matching[lasso_n4]"
    # with LASSO and TRAK side by side, the curve takes the choice made on LASSO (tuning key dm_matching[lasso])
    both = dataclasses.replace(cfg, unlearn=dataclasses.replace(cfg.unlearn, datamodels=("lasso", "trak")))
    tuned = {"dm_matching[lasso]": {"lr": 0.2}, "dm_matching[trak]": {"lr": 0.9}}
    (v,) = [v for v in variants(both, tuned) if v.method == "dm_matching" and v.datamodel == "lasso_n4"]
    assert v.hparams == {"lr": 0.2}
    off = dataclasses.replace(cfg, unlearn=dataclasses.replace(cfg.unlearn, datamodel_curve=False))
    assert not any(curve_models(v.datamodel) for v in variants(off, {}))


@pytest.mark.slow
def test_curve_store_is_lasso_on_the_first_n_fit_models(tmp_path):
    """The planted run of test_datamodels: 160 models split 96 fit / 32 validation / 32 LDS; the curve store at
    n = 48 is scikit-learn's Lasso at its stored λ on the first 48 fit models and the validation models."""
    ctx, masks, logits, _ = planted_run(tmp_path)
    cfg = dataclasses.replace(ctx.cfg, datamodels=dataclasses.replace(ctx.cfg.datamodels, lds_curve=(48,)),
                              unlearn=UnlearnConfig(datamodel_curve=True))
    ctx = dataclasses.replace(ctx, cfg=cfg)
    run_stages(ctx, ["datamodels"])
    g = zarr.open_group(str(ctx.run_dir / "datamodels" / "lasso_n48.zarr"), mode="r")
    full = zarr.open_group(str(ctx.run_dir / "datamodels" / "lasso.zarr"), mode="r")
    assert (g.attrs["n_fit"], g.attrs["n_val"], full.attrs["n_fit"]) == (48, 32, 96)
    assert g.attrs["config"]["fit_models"] == 48 and "lds_curve" not in g.attrs  # the curve is the full store's
    rows = np.r_[0:48, 96:128]
    for t, c in [(0, 0), (7, 3), (230, 9)]:
        ref = Lasso(alpha=float(g["lambda"][t, c]), tol=1e-10, max_iter=100000).fit(masks[rows], logits[rows, t, c])
        np.testing.assert_allclose(g["weights"][:, t, c], ref.coef_, atol=2e-3)
    # half the models recover the planted effects less well, on the same held-out LDS models
    assert g.attrs["lds_mean"] < full.attrs["lds_mean"]
    # a later run that reuses this one links both stores (complete: a curve store has no LDS curve of its own)
    from pipelines.rundir.reuse import read_links

    later = RunContext(cfg=dataclasses.replace(cfg, run_dir=str(tmp_path / "later"), reuse=(str(ctx.run_dir),)),
                       run_dir=tmp_path / "later")
    run_stages(later, ["datamodels"])
    assert set(read_links(later.run_dir)) >= {"datamodels/lasso.zarr", "datamodels/lasso_n48.zarr"}
    assert not (later.run_dir / "datamodels").exists()


def test_dm_direct_on_curve_stores_and_the_reports_curve(tmp_path):
    cfg = curve_config(tmp_path)
    ctx = run(cfg, ["forget_sets", "models"])
    weights = write_datamodels(ctx, seed=0)
    curve_weights = write_datamodels(ctx, seed=1, name="lasso_n4")
    zarr.open_group(str(ctx.run_dir / "datamodels" / "lasso.zarr"), mode="r+").attrs["n_fit"] = 8
    run(cfg, ["unlearn"])
    models = zarr.open_group(str(ctx.run_dir / "models.zarr"), mode="r")
    full = models["full/logits"][:].astype(np.float64)
    labels = ctx.data.y_targets.numpy()
    sets = layout.load_forget_sets(ctx.run_dir)
    for fs, idx in sets.items():
        store = zarr.open_group(str(ctx.run_dir / "unlearned" / fs / "dm_direct__lasso_n4.zarr"), mode="r")
        np.testing.assert_allclose(store["logits"][:], full - curve_weights[idx].astype(np.float64).sum(0), atol=1e-5)
        assert not np.allclose(store["logits"][:], full - weights[idx].astype(np.float64).sum(0), atol=1e-3)

    metrics = build_report(ctx.run_dir, labels)
    drawn = json.loads((ctx.run_dir / "report" / "klom_vs_models.json").read_text())
    n, t = ctx.data.n_train, ctx.data.n_targets
    for fs, idx in sets.items():
        points = metrics["datamodel_curve"][fs]["methods"]["dm_direct"]
        assert [p["n_models"] for p in points] == [4, 8]
        # the curve store's headline, recomputed from the stores: KLOM of its K models against the K reference
        # oracles, p99 over forget, retain and reporting validation points, averaged
        logits = zarr.open_group(str(ctx.run_dir / "unlearned" / fs / "dm_direct__lasso_n4.zarr"))["logits"][:]
        values = klom(margins(logits, labels), margins(models[f"oracle/{fs}/logits"][:K], labels))
        point_sets = layout.point_sets(idx, n, validation_points(ctx.run_dir, "reporting", n, t))
        expected = np.mean([np.percentile(values[point_sets[s]], 99) for s in POINT_SETS])
        assert points[0]["p99_avg"] == pytest.approx(expected, rel=1e-9)
        own = metrics["forget_sets"][fs]["methods"]["dm_direct"]["klom"]  # the run's own LASSO store, n = 8
        assert points[1]["p99_avg"] == pytest.approx(np.mean([own[s]["p99"] for s in POINT_SETS]))
        # what the plot drew is these numbers (x = n, y = the headline, its interval), and the floor
        assert [row[:2] for row in drawn[fs]["dm_direct"]] == [[p["n_models"], p["p99_avg"]] for p in points]
        assert [row[2:] for row in drawn[fs]["dm_direct"]] == [p["interval"] for p in points]
        assert drawn[fs]["oracle floor"][0][1] == metrics["datamodel_curve"][fs]["oracle_floor"]
        assert "dm_direct[lasso_n4]" not in json.loads(
            (ctx.run_dir / "report" / "klom_vs_cost.json").read_text())[fs]["average"]["curves"]
    report = (ctx.run_dir / "report" / "report.md").read_text()
    assert "## Unlearning against the number of subset models" in report and "| n = 4 | n = 8 |" in report


def test_curve_of_the_metrics_keeps_datamodel_methods_at_the_tuned_budget():
    def method(name, datamodel, budget, p99):
        return {"method": name, "datamodel": datamodel, "budget": budget,
                "klom": {s: {"p99": p99} for s in POINT_SETS}, "klom_interval": None}
    floor = {"klom": {s: {"p99": 1.0} for s in POINT_SETS}}
    forget_sets = {"a": {"oracle_floor": floor, "methods": {
        "dm_direct": method("dm_direct", "lasso", 1.0, 2.0),
        "dm_direct[lasso_n16]": method("dm_direct", "lasso_n16", 1.0, 3.0),
        "dm_matching@3x": method("dm_matching", "lasso", 3.0, 9.0),
        "scrub": method("scrub", None, 1.0, 5.0)}},
        "b": {"oracle_floor": None, "methods": {"dm_direct": method("dm_direct", "lasso", 1.0, 2.0)}}}
    curve = datamodel_curve(forget_sets, {"lasso": {"n_fit": 64}})
    assert list(curve) == ["a"]  # b has no curve store
    assert curve["a"]["oracle_floor"] == 1.0
    assert curve["a"]["methods"] == {"dm_direct": [
        {"n_models": 16, "p99_avg": 3.0, "interval": None, "curve_store": True},
        {"n_models": 64, "p99_avg": 2.0, "interval": None, "curve_store": False}]}
