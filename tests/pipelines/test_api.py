"""pipelines.api (`open_run`) on the tiny digits run (tests/conftest.py), against independent numpy
computations on the stores and against the report's metrics.json."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from attribution.store import StoreError
from pipelines import Run, open_run
from pipelines.config import RunConfig
from tests.conftest import TINY_METHODS
from unlearning.klom import klom_summary


@pytest.fixture(scope="module")
def run(digits_run) -> Run:
    return open_run(digits_run)


def raw(run_dir, store: str) -> zarr.Group:
    return zarr.open_group(str(run_dir / store), mode="r")


@pytest.mark.slow
def test_open_run_exposes_the_stores(run, digits_run):
    assert isinstance(run.config, RunConfig) and run.config.task.name == "examples.digits_task:make_task"
    assert run.config.run_dir == str(run.run_dir)
    assert run.subsets["masks"].shape == (32, 200) and run.subsets["logits"].shape == (32, 300, 10)
    assert isinstance(run.subsets["logits"], zarr.Array)  # lazy: an array, not numpy
    assert run.datamodels("lasso")["weights"].shape == (200, 300, 10)
    assert run.models["full/logits"].shape == (2, 300, 10)
    assert set(run.forget_sets) == {"random_10", "class_0"} and len(run.forget_sets["random_10"]) == 10
    assert run.unlearned("random_10", "dm_direct")["logits"].shape == (2, 300, 10)
    assert run.metrics["k"] == 2
    np.testing.assert_array_equal(run.test_targets, np.arange(200, 300))
    assert run.lds_models == slice(24, 32)
    with pytest.raises(StoreError, match="trak.zarr"):
        run.datamodels("trak")


def test_open_run_refuses_a_directory_that_is_not_a_run(tmp_path):
    from pipelines.config import ConfigError

    with pytest.raises(ConfigError, match="not a run directory"):
        open_run(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("output", ["margin", "logits"])
def test_predicted_effect_is_minus_the_removed_rows(run, digits_run, output):
    name = "margin_weights" if output == "margin" else "weights"
    weights = np.asarray(raw(digits_run, "datamodels/lasso.zarr")[name][:])
    remove = [3, 17, 150, 17]  # a repeat counts once
    expected = -weights[[3, 17, 150]].sum(0)
    np.testing.assert_allclose(run.predicted_effect(remove, output=output), expected, rtol=1e-5, atol=1e-6)
    targets = [250, 5, 299]
    np.testing.assert_allclose(run.predicted_effect(remove, targets=targets, output=output), expected[targets],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run.predicted_effect(remove, targets=7, output=output), expected[7],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run.predicted_effect(remove, targets=slice(200, 300), output=output),
                               expected[200:], rtol=1e-5, atol=1e-6)
    assert not run.predicted_effect([], output=output).any()
    with pytest.raises(ValueError, match="training indices"):
        run.predicted_effect([200], output=output)


@pytest.mark.slow
def test_most_influential_is_an_argsort_of_the_column(run, digits_run):
    store = raw(digits_run, "datamodels/lasso.zarr")
    column = np.asarray(store["margin_weights"][:, 250])
    idx, w = run.most_influential(250, k=7)
    expected = np.argsort(-np.abs(column), kind="stable")[:7]
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_array_equal(w, column[expected])
    label = int(run.labels[250])
    column = np.asarray(store["weights"][:, 250, label])
    idx, w = run.most_influential(250, k=5, output="logits")
    np.testing.assert_array_equal(idx, np.argsort(-np.abs(column), kind="stable")[:5])
    idx3, _ = run.most_influential(250, k=5, output="logits", cls=3)
    np.testing.assert_array_equal(idx3, np.argsort(-np.abs(np.asarray(store["weights"][:, 250, 3])),
                                                   kind="stable")[:5])
    with pytest.raises(ValueError, match="output"):
        run.most_influential(250, output="loss")


@pytest.mark.slow
@pytest.mark.parametrize("forget_set", ["random_10", "class_0"])
def test_klom_matches_the_report(run, forget_set):
    metrics = run.metrics["forget_sets"][forget_set]["methods"]
    sets = run.point_sets(forget_set)
    np.testing.assert_array_equal(sets["forget"], np.sort(run.forget_sets[forget_set]))
    assert len(sets["forget"]) + len(sets["retain"]) == 200 and len(sets["validation"]) == 100
    for method in TINY_METHODS:
        values = run.klom(forget_set, method)
        assert {k: len(v) for k, v in values.items()} == {k: len(v) for k, v in sets.items()}
        # the report's summary of the same per-point values (klom_summary over each point set)
        got = {name: klom_summary(v, {name: np.arange(len(v))})[name] for name, v in values.items()}
        for name in sets:
            for stat in ("p95", "p99", "mean"):
                assert got[name][stat] == pytest.approx(metrics[method]["klom"][name][stat], rel=1e-9, abs=1e-12)
