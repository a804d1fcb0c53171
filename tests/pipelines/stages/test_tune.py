"""The tune stage and the unlearn stage's variants on a tiny MNIST-1D run (tests/pipelines/conftest.py's):
tuning sets disjoint from every evaluated set, with their own full models and half of the test targets; a choice
that is the argmin of KLOM recomputed here from the stores, grids widened where a choice sits at an end, a
tune.json byte for byte unchanged when everything the report evaluates is poisoned, used by `unlearn`; budgets and
datamodel variants as their own stores with scaled costs."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import zarr

from attribution.store import StoreError
from pipelines.config import TuneConfig, UnlearnConfig
from pipelines.report.evaluate import json_safe
from pipelines.rundir import layout
from pipelines.rundir.variants import Variant, parse_store_name, store_name_of
from pipelines.stages import tune as tune_stage
from tests.pipelines.conftest import run, stage_config, write_datamodels
from unlearning import METHODS as ALL
from unlearning.klom import klom, margins

METHODS = ("do_nothing", "gradient_ascent", "dm_matching")
GRID = {"gradient_ascent": {"lr": [1.0e-4, 2.0e-2]}, "dm_matching": {"lr": [1.0e-4, 5.0e-3], "epochs": [2]}}


def tune_config(tmp_path, **unlearn):
    cfg = stage_config(tmp_path, methods=METHODS)
    return dataclasses.replace(cfg, tune=TuneConfig(random_sizes=(10,), full_class=1, k=2, grid=GRID, widen=1),
                               unlearn=UnlearnConfig(methods=METHODS, **unlearn))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    cfg = tune_config(tmp, budgets=(0.5, 1.0, 2.0))
    ctx = run(cfg, ["forget_sets", "models"])
    write_datamodels(ctx)
    run(cfg, ["tune", "unlearn"])
    return cfg, ctx


def test_tuning_sets_are_disjoint_from_every_evaluated_set(tuned):
    cfg, ctx = tuned
    evaluated = layout.load_forget_sets(ctx.run_dir)
    tuning = layout.load_forget_sets(ctx.run_dir, "tuning")
    assert set(tuning) == {"tune_random_10", "tune_class_1"}
    used = np.concatenate(list(evaluated.values()))
    for name, idx in tuning.items():
        assert len(idx) and not np.intersect1d(idx, used).size, name
    labels = ctx.data.y_train.numpy()
    assert (labels[tuning["tune_class_1"]] == 1).all()
    assert len(tuning["tune_class_1"]) == (np.setdiff1d(np.flatnonzero(labels == 1), used)).size
    # its own oracles in models.zarr: tune.k reference + tune.k OM oracles (one per tuned model, om_target "own"),
    # trained without the tuning set
    models = zarr.open_group(str(ctx.run_dir / "models.zarr"), mode="r")
    shape = (2 * cfg.tune.k,)
    assert models["tuning/tune_random_10/done"][:].all() and models["tuning/tune_random_10/done"].shape == shape
    # its own full models: trained on every point, from another seed stream than the evaluated full models
    own, evaluated_full = models["tuning_full/params"][:], models["full/params"][:]
    assert own.shape == (cfg.tune.k, evaluated_full.shape[1]) and models["tuning_full/done"][:].all()
    assert not np.isclose(own[:, None], evaluated_full[None]).all(-1).any()
    # the test targets split once: the tune stage's half and the report's, disjoint, covering them all
    n, t = ctx.data.n_train, ctx.data.n_targets
    tuning_half = layout.validation_points(ctx.run_dir, "tuning", n, t)
    reporting = layout.validation_points(ctx.run_dir, "reporting", n, t)
    assert len(tuning_half) == (t - n) // 2 and len(reporting) == t - n - len(tuning_half)
    np.testing.assert_array_equal(np.sort(np.concatenate([tuning_half, reporting])), np.arange(n, t))


def test_choice_is_the_argmin_of_klom_recomputed_from_the_stores(tuned):
    cfg, ctx = tuned
    result = json.loads((ctx.run_dir / "tune.json").read_text())
    models = zarr.open_group(str(ctx.run_dir / "models.zarr"), mode="r")
    labels = ctx.data.y_targets.numpy()
    n, t = ctx.data.n_train, ctx.data.n_targets
    validation = layout.validation_points(ctx.run_dir, "tuning", n, t)
    for method, entries in result["candidates"].items():
        added = len(result["widened"].get(method, []))
        assert len(entries) == 2 + added and added <= cfg.tune.widen
        scores = []
        for entry in entries:
            per_set = []
            for fs, idx in layout.load_forget_sets(ctx.run_dir, "tuning").items():
                oracle = margins(models[f"tuning/{fs}/logits"][:2], labels)
                store = ctx.run_dir / "tune" / fs / f"{method}__g{entry['grid_point']}.zarr"
                logits = zarr.open_group(str(store), mode="r")["logits"][:]
                if not np.isfinite(logits).all():  # a diverged grid point: never chosen
                    per_set.append(np.inf)
                    continue
                values = klom(margins(logits, labels), oracle)
                sets = [idx, np.setdiff1d(np.arange(n), idx), validation]
                per_set.append(np.mean([np.percentile(values[s], 95) for s in sets]))
            scores.append(np.mean(per_set))
            assert (entry["score"] or np.inf) == pytest.approx(scores[-1], rel=1e-12)  # JSON null: inf
        assert result["chosen"][method] == entries[int(np.argmin(scores))]["hparams"]
    assert result["untuned"] == []


def test_unlearn_uses_the_choice_and_budgets_scale_it(tuned):
    cfg, ctx = tuned
    chosen = json.loads((ctx.run_dir / "tune.json").read_text())["chosen"]
    folder = ctx.run_dir / "unlearned" / "random_10"
    for method in ("gradient_ascent", "dm_matching"):
        epochs = chosen[method].get("epochs", ALL[method].Hyperparameters().epochs)
        passes = {}
        for budget, suffix in ((0.5, "__x0.5"), (1.0, ""), (2.0, "__x2")):
            g = zarr.open_group(str(folder / f"{method}{suffix}.zarr"), mode="r")
            hparams = dict(g.attrs["hparams"])
            assert hparams.pop("epochs", epochs) == max(1, round(epochs * budget))
            assert hparams == {k: v for k, v in chosen[method].items() if k != "epochs"}
            assert g.attrs["budget"] == budget and g["done"][:].all()
            passes[budget] = g["example_passes"][:]
        forward = 250 / 3 if method == "dm_matching" else 0.0  # the original model's logits on T targets
        ratio = (passes[2.0] - forward) / (passes[1.0] - forward)
        np.testing.assert_allclose(ratio, round(epochs * 2) / epochs)
    # no budgets for do_nothing: one store; diagnostics stored per model
    assert sorted(p.name for p in folder.glob("do_nothing*")) == ["do_nothing.zarr"]
    dmm = zarr.open_group(str(folder / "dm_matching.zarr"), mode="r")
    assert np.isfinite(dmm["final_loss"][:]).all() and (dmm["stopped_by"][:] == -1).all()
    timing = zarr.open_group(str(folder / "_retrain_timing.zarr"), mode="r")
    assert timing["done"][0] and timing["seconds"][0] > 0


def test_widening_goes_one_step_past_the_end_it_chose():
    assert tune_stage.beyond([1e-4, 2e-2], 2e-2) == 4.0
    assert tune_stage.beyond([3e-4, 1e-3, 3e-3], 3e-4) == pytest.approx(9e-5)
    assert tune_stage.beyond([2, 4], 2) is None and tune_stage.beyond([2, 4], 4) == 6  # integers stay >= 1
    assert tune_stage.beyond([1e-3, 3e-3, 1e-2], 3e-3) is None  # inside: no widening
    assert tune_stage.beyond([5], 5) is None and tune_stage.beyond([True, False], True) is None
    # MU-Mis's δ <= 1 stops at the first check whatever its value: the grid does not widen below 1
    assert tune_stage.beyond([1.02, 1.05], 1.02, "delta") is None
    assert tune_stage.beyond([1.1, 1.2], 1.1, "delta") == 1.01 and tune_stage.beyond([1.02, 1.05], 1.02) == 0.991


def test_widened_grid_is_scored_and_recorded(tuned):
    cfg, ctx = tuned
    result = json.loads((ctx.run_dir / "tune.json").read_text())
    for method, added in result["widened"].items():
        for w in added:
            values = result["grid"][method][w["hyperparameter"]]
            assert values[-1] == w["value"] and w["value"] not in GRID[method][w["hyperparameter"]]
            assert any(e["hparams"][w["hyperparameter"]] == w["value"] for e in result["candidates"][method])
    # a choice at an end after the widening is listed; one inside is not
    for method, chosen in result["chosen"].items():
        for key, values in result["grid"][method].items():
            at_end = len(set(values)) > 1 and chosen[key] in (min(values), max(values))
            assert (key in result["at_edge"].get(method, {})) == at_end


def test_poisoning_everything_reported_leaves_tune_json_byte_equal(tuned, tmp_path):
    """Every evaluated forget set's oracles, the evaluated full models, the evaluated forget sets themselves and
    the reporting half of the test targets (in every stored model's logits) replaced by garbage: the tune
    stage, rerun from scratch, writes the same bytes."""
    cfg, ctx = tuned
    copy = tmp_path / "run"
    shutil.copytree(ctx.run_dir, copy)
    shutil.rmtree(copy / "tune")
    before = (copy / "tune.json").read_bytes()
    (copy / "tune.json").unlink()
    models = zarr.open_group(str(copy / "models.zarr"), mode="r+")
    rng = np.random.default_rng(0)

    def garbage(array, columns=None):
        if columns is None:
            array[:] = (rng.standard_normal(array.shape) * 100).astype(np.float32)
        else:  # every row, some targets
            shape = (array.shape[0], len(columns), *array.shape[2:])
            array.oindex[:, columns] = (rng.standard_normal(shape) * 100).astype(np.float32)

    for fs in layout.load_forget_sets(copy):
        garbage(models[f"oracle/{fs}/logits"])
        garbage(models[f"oracle/{fs}/params"])
    garbage(models["full/logits"])
    garbage(models["full/params"])
    reporting = layout.validation_points(copy, "reporting", ctx.data.n_train, ctx.data.n_targets)
    for fs in layout.load_forget_sets(copy, "tuning"):
        garbage(models[f"tuning/{fs}/logits"], reporting)
    stored = json.loads((copy / "forget_sets.json").read_text())
    for entry in stored["sets"].values():
        entry["indices"] = rng.choice(ctx.data.n_train, len(entry["indices"]), replace=False).tolist()
    (copy / "forget_sets.json").write_text(json.dumps(stored, indent=1))
    run(dataclasses.replace(cfg, run_dir=str(copy)), ["tune"])
    assert (copy / "tune.json").read_bytes() == before


def test_unlearn_refuses_without_the_tune_stage(tmp_path):
    cfg = tune_config(tmp_path)
    ctx = run(cfg, ["forget_sets", "models"])
    write_datamodels(ctx)
    with pytest.raises(StoreError, match=r"no tuned hyperparameters .*run the tune stage first"):
        run(cfg, ["unlearn"])
    other = dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, grid={"gradient_ascent": {"lr": [1e-3]}}))
    run(cfg, ["tune"])
    with pytest.raises(StoreError, match=r"tune\.json was made with a different config \(.*grid"):
        layout.load_tune(ctx.run_dir, other)


@pytest.mark.slow
def test_lasso_and_trak_datamodels_side_by_side(tmp_path):
    """unlearn.datamodels [lasso, trak]: DM-Direct once per datamodel store, each its own store and label, each
    the original logits minus the sum of its own store's forget rows."""
    cfg = dataclasses.replace(stage_config(tmp_path, methods=("do_nothing", "dm_direct")),
                              unlearn=UnlearnConfig(methods=("do_nothing", "dm_direct"), datamodels=("lasso", "trak")))
    ctx = run(cfg, ["forget_sets", "models"])
    weights = {name: write_datamodels(ctx, seed=seed, name=name) for seed, name in ((0, "lasso"), (1, "trak"))}
    run(cfg, ["unlearn", "report"])
    full = zarr.open_group(str(ctx.run_dir / "models.zarr"), mode="r")["full/logits"][:]
    idx = layout.load_forget_sets(ctx.run_dir)["random_10"]
    for name, w in weights.items():
        g = zarr.open_group(str(ctx.run_dir / "unlearned" / "random_10" / f"dm_direct__{name}.zarr"), mode="r")
        assert g.attrs["label"] == f"dm_direct[{name}]" and g.attrs["datamodel"] == name
        np.testing.assert_allclose(g["logits"][:], full - w[idx].astype(np.float64).sum(0), atol=1e-5)
    metrics = json.loads((ctx.run_dir / "report" / "metrics.json").read_text())
    assert list(metrics["forget_sets"]["random_10"]["methods"]) == ["do_nothing", "dm_direct[lasso]",
                                                                     "dm_direct[trak]"]
    md = (ctx.run_dir / "report" / "report.md").read_text()
    assert "| dm_direct[trak] |" in md and "| dm_direct[lasso] |" in md


@pytest.mark.parametrize("method, datamodel, budget, show, point", [
    ("dm_matching", "trak", 3.0, True, None), ("dm_matching", "lasso", 1.0, False, None),
    ("scrub", None, 0.33, False, None), ("mu_mis", None, 1.0, False, 2), ("dm_direct", "lasso", 1.0, True, 0)])
def test_variant_names_parse_back(method, datamodel, budget, show, point):
    """The report reads a store name back into (method, datamodel, budget), `open_run(...).unlearned` a label
    into its store name: both are the inverses of Variant's naming."""
    v = Variant(method, {}, datamodel, budget, show, point)
    assert parse_store_name(v.store_name) == (method, datamodel if show else "", budget)
    if point is None:
        assert store_name_of(v.label) == v.store_name


def test_a_diverging_grid_point_scores_infinite():
    """A grid point where any model's unlearning diverged (non-finite logits) is never chosen: its score is inf,
    and tune.json stores it as null."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 12)
    oracle = margins(rng.normal(size=(4, 12, 3)), labels)
    sets = {"forget": np.arange(3), "retain": np.arange(3, 8), "validation": np.arange(8, 12)}
    logits = rng.normal(size=(4, 12, 3))
    finite_score, _ = tune_stage.score(logits, oracle, labels, sets)
    logits[2, 5, 1] = np.nan
    score, per_set = tune_stage.score(logits, oracle, labels, sets)
    assert np.isfinite(finite_score) and score == np.inf and set(per_set.values()) == {np.inf}
    assert json.loads(json.dumps(json_safe({"score": score})))["score"] is None
