"""The subset stage end to end: real Ray vs serial, interruption and resume, config drift, `dmu info`."""

import dataclasses

import numpy as np
import pytest
import zarr

from attribution.masks import sample_masks
from attribution.store import StoreError
from pipelines.cli import main
from pipelines.config import RecipeConfig
from tests.conftest import small_config
from tests.pipelines.conftest import InterruptAfter, run_subsets


@pytest.mark.ray
def test_ray_equals_serial(tmp_path, ray_local):
    ray_store = run_subsets(small_config(tmp_path / "ray", kind="ray", keep_params=4))
    serial_store = run_subsets(small_config(tmp_path / "serial", kind="serial", keep_params=4))
    assert ray_store["done"][:].all()
    np.testing.assert_array_equal(ray_store["logits"][:], serial_store["logits"][:])
    np.testing.assert_array_equal(ray_store["params"][:], serial_store["params"][:])


def test_store_reads_with_plain_zarr(tmp_path):
    cfg = small_config(tmp_path)
    run_subsets(cfg)
    g = zarr.open_group(str(tmp_path / "run" / "subsets.zarr"), mode="r")
    done, logits, masks = g["done"][:], g["logits"][:], g["masks"][:]
    assert done.all() and logits.shape == (12, 250, 10) and np.isfinite(logits[done]).all()
    np.testing.assert_array_equal(masks, sample_masks(12, 200, 0.5, seed=7))
    assert g.attrs["targets"] == {"train": [0, 200], "test": [200, 250]}
    # subset models learn: mean test accuracy well above chance (0.1)
    acc = (logits[:, 200:].argmax(-1) == np.load("data/mnist1d.npz")["y_test"][:50]).mean()
    assert acc > 0.15


def test_interrupted_run_resumes_without_retraining(tmp_path):
    full = run_subsets(small_config(tmp_path / "full"))
    cfg = small_config(tmp_path / "resumed")
    first = InterruptAfter(2)
    with pytest.raises(KeyboardInterrupt):
        run_subsets(cfg, first)
    partial = zarr.open_group(str(tmp_path / "resumed" / "run" / "subsets.zarr"), mode="r")
    assert partial["done"][:].sum() == 8
    second = InterruptAfter(None)
    resumed = run_subsets(cfg, second)
    assert second.units == [(8, 12)]  # only the block not done
    np.testing.assert_array_equal(resumed["logits"][:], full["logits"][:])


def test_config_drift_is_refused(tmp_path):
    cfg = small_config(tmp_path)
    run_subsets(cfg)
    before = zarr.open_group(str(tmp_path / "run" / "subsets.zarr"), mode="r")["logits"][:]
    drifted = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, recipe=RecipeConfig(epochs=4,
                                                                                               batch_size=32)))
    with pytest.raises(StoreError, match=r"task\.recipe\.epochs \(15 -> 4\)"):
        run_subsets(drifted)
    after = zarr.open_group(str(tmp_path / "run" / "subsets.zarr"), mode="r")["logits"][:]
    np.testing.assert_array_equal(before, after)


def test_dmu_info_reports_completion(tmp_path, capsys):
    cfg = small_config(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_subsets(cfg, InterruptAfter(1))
    assert main(["info", str(tmp_path / "run" / "subsets.zarr")]) == 0
    out = capsys.readouterr().out
    assert "complete: 4/12 rows (33.3%)" in out and "dataset: mnist1d" in out


def test_cli_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsubsets: {n_modles: 3}\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dmu: error: unknown config key 'subsets.n_modles' (did you mean 'subsets.n_models'?)"]
    assert main(["info", str(tmp_path / "nothing")]) == 2
    assert "no Zarr store" in capsys.readouterr().err
