"""Model quality recorded: every trained model's final training loss and test accuracy are
stored; a model with non-finite outputs is recorded as failed (not done), the stage finishes the others and
exits non-zero naming the rows and seeds, a rerun retrains them; `dmu info` shows the accuracies and warns
near chance; the datamodels stage refuses a store with failed rows."""

import dataclasses
import json

import numpy as np
import pytest
import zarr

from attribution import subsets as subsets_store
from attribution.masks import model_seeds
from attribution.store import StoreError
from pipelines.cli import main
from pipelines.config import DatamodelsConfig, RecipeConfig, to_dict
from pipelines.stages import RunContext, run_stages
from pipelines.rundir import seeds
from pipelines.rundir.seeds import SUBSET_TRAIN_STREAM
from pipelines.stages import models as models_stage
from pipelines.stages import subsets as subsets_stage
from tests.conftest import small_config
from tests.pipelines.conftest import stage_config

N_TRAIN, N_TEST = 200, 50


def write_config(cfg, path) -> str:
    path.write_text(json.dumps(to_dict(cfg)))  # JSON is YAML
    return str(path)


def poison(monkeypatch, module, bad_seeds):
    """Make `module.train_models` return NaN logits (and loss) for the models whose seed is in `bad_seeds`, as
    a diverged model does; the other models train as usual."""
    real = module.train_models

    def train(task, data, masks, seeds, **kwargs):
        result = real(task, data, masks, seeds, **kwargs)
        for i, s in enumerate(seeds):
            if int(s) in bad_seeds:
                result.logits[i] = np.nan
                result.train_loss[i] = np.nan
        return result

    monkeypatch.setattr(module, "train_models", train)


def error_lines(capsys) -> list[str]:
    """dmu's lines on stderr (the progress bars write there too)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("dmu:")]


def subsets_group(cfg):
    return zarr.open_group(str(cfg.resolved_run_dir() / "subsets.zarr"), mode="r")


def test_diverged_subset_model_is_failed_then_retried(tmp_path, monkeypatch, capsys):
    cfg = small_config(tmp_path, n_models=8, block=4, epochs=3)
    config = write_config(cfg, tmp_path / "cfg.yaml")
    seeds = model_seeds(8, cfg.seed, SUBSET_TRAIN_STREAM)
    poison(monkeypatch, subsets_stage, {int(seeds[5])})
    assert main(["run", config, "--stages", "subsets"]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and f"row 5 (seed {seeds[5]})" in err[0] and "1 of 8 models" in err[0], err
    g = subsets_group(cfg)
    done, failed = g["done"][:], g["failed"][:]
    assert failed.tolist() == [i == 5 for i in range(8)]
    assert done.tolist() == [i != 5 for i in range(8)]  # the other models of its block are saved
    assert np.isnan(g["test_accuracy"][5]) and np.isfinite(g["test_accuracy"][:5]).all()
    assert main(["info", str(cfg.resolved_run_dir())]) == 0
    assert "failed: 1 models (rows [5]), non-finite outputs" in capsys.readouterr().out
    # a failed row is not done: its NaN logits are no problem for --verify
    assert main(["info", "--verify", str(cfg.resolved_run_dir())]) == 0

    # the datamodels stage refuses the store, naming the failed rows and the fix
    dm_cfg = dataclasses.replace(cfg, datamodels=DatamodelsConfig(n_val=2, n_lds=2))
    with pytest.raises(StoreError, match=r"1 failed models .*rows 5\).*rerun the subsets stage"):
        run_stages(RunContext(cfg=dm_cfg, run_dir=dm_cfg.resolved_run_dir()), ["datamodels"])

    # a rerun with a sane engine retrains the failed model's block and completes, as a clean run does
    monkeypatch.undo()
    assert main(["run", config, "--stages", "subsets"]) == 0
    g = subsets_group(cfg)
    assert g["done"][:].all() and not g["failed"][:].any()
    clean_cfg = small_config(tmp_path / "clean", n_models=8, block=4, epochs=3)
    assert main(["run", write_config(clean_cfg, tmp_path / "clean.yaml"), "--stages", "subsets"]) == 0
    clean = subsets_group(clean_cfg)
    for name in ("logits", "train_loss", "test_accuracy"):
        np.testing.assert_array_equal(g[name][:], clean[name][:])

    # the recorded accuracies are those of the stored logits on the test targets
    labels = np.load("data/mnist1d.npz")["y_test"][:N_TEST]
    logits = g["logits"][:]
    np.testing.assert_array_equal(g["test_accuracy"][:], (logits[:, N_TRAIN:].argmax(-1) == labels).mean(1))
    loss = g["train_loss"][:]
    assert np.isfinite(loss).all() and (loss > 0).all() and (loss < 2 * np.log(10)).all()


def recipe_config(tmp_path, **recipe):
    """small_config with 4 models, 2 epochs at lr 1e4 (constant) and `recipe`'s other fields."""
    cfg = small_config(tmp_path, n_models=4, block=4, epochs=2)
    return dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, recipe=RecipeConfig(
        epochs=2, batch_size=32, lr=1e4, schedule="constant", **recipe)))


def test_diverging_recipe_fails_every_model_with_one_line(tmp_path, capsys):
    """A real divergence (SGD at lr 1e4): every model is recorded as failed, none done, one error line."""
    cfg = recipe_config(tmp_path, optimizer="sgd")
    assert main(["run", write_config(cfg, tmp_path / "cfg.yaml"), "--stages", "subsets"]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "4 of 4 models produced non-finite outputs" in err[0], err
    g = subsets_group(cfg)
    assert g["failed"][:].all() and not g["done"][:].any()


def test_float16_accuracy_is_that_of_the_stored_logits(tmp_path):
    group = subsets_store.create_store(
        tmp_path / "subsets.zarr", n_models=4, n_train=10, n_targets=40, n_classes=3, alpha=0.5, seed=0,
        block_size=4, keep_params=0, n_params=1, config={"t": 1}, attrs={"num_classes": 3},
        logits_dtype="float16")
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1, (4, 40, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 30)
    failed = subsets_store.write_block(group, 0, logits, None, np.ones(4), labels)
    assert len(failed) == 0 and group["done"][:].all()
    stored = group["logits"][:].astype(np.float32)
    np.testing.assert_array_equal(group["test_accuracy"][:], (stored[:, 10:].argmax(-1) == labels).mean(1))


def test_info_warns_for_a_real_run_of_chance_level_models(tmp_path, capsys):
    """Adam at lr 1e4 stays finite but learns nothing: the models are done, and `dmu info` warns."""
    cfg = recipe_config(tmp_path)
    assert main(["run", write_config(cfg, tmp_path / "cfg.yaml"), "--stages", "subsets"]) == 0
    assert subsets_group(cfg)["done"][:].all()
    capsys.readouterr()
    assert main(["info", str(cfg.resolved_run_dir())]) == 0
    out = capsys.readouterr().out
    assert "test accuracy (4 done models)" in out and "points of chance (0.100)" in out


def chance_store(path, n_models=8, classes=10, learn=False):
    """A subsets store of models whose logits are noise (chance level) or follow the labels (learn=True)."""
    group = subsets_store.create_store(
        path, n_models=n_models, n_train=20, n_targets=220, n_classes=classes, alpha=0.5, seed=0,
        block_size=4, keep_params=0, n_params=1, config={"t": 1}, attrs={"num_classes": classes})
    rng = np.random.default_rng(1)
    labels = rng.integers(0, classes, 200)
    for start in range(0, n_models, 4):
        logits = rng.normal(0, 1, (4, 220, classes)).astype(np.float32)
        if learn:
            logits[:, 20:][np.arange(4)[:, None], np.arange(200)[None], labels[None]] += 3.0
        subsets_store.write_block(group, start, logits, None, np.full(4, 2.3), labels)
    return group


def test_info_shows_accuracy_distribution_and_chance_warning(tmp_path, capsys):
    group = chance_store(tmp_path / "chance" / "subsets.zarr")
    acc = group["test_accuracy"][:]
    assert main(["info", str(tmp_path / "chance")]) == 0
    out = capsys.readouterr().out
    assert (f"test accuracy (8 done models): min {acc.min():.3f} / median {np.median(acc):.3f} / "
            f"max {acc.max():.3f}") in out
    assert "warning: median test accuracy" in out and "within 2 points of chance (0.100)" in out
    chance_store(tmp_path / "good" / "subsets.zarr", learn=True)
    assert main(["info", str(tmp_path / "good")]) == 0
    out = capsys.readouterr().out
    assert "test accuracy (8 done models)" in out and "warning" not in out


def test_diverged_full_and_oracle_models_are_failed_then_retried(tmp_path, monkeypatch, capsys):
    cfg = stage_config(tmp_path, random_sizes=(10,), full_class=None)
    cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, recipe=RecipeConfig(epochs=2,
                                                                                          batch_size=32)))
    config = write_config(cfg, tmp_path / "cfg.yaml")
    assert main(["run", config, "--stages", "forget_sets"]) == 0
    full_seed = int(model_seeds(2, cfg.seed, seeds.FULL_STREAM)[1])
    oracle_seed = int(model_seeds(6, cfg.seed, seeds.oracle_stream("random_10"))[3])
    poison(monkeypatch, models_stage, {full_seed, oracle_seed})
    assert main(["run", config, "--stages", "models"]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and f"full row 1 (seed {full_seed})" in err[0], err
    assert f"oracle/random_10 row 3 (seed {oracle_seed})" in err[0]
    g = zarr.open_group(str(cfg.resolved_run_dir() / "models.zarr"), mode="r")
    assert g["full/failed"][:].tolist() == [False, True] and g["full/done"][:].tolist() == [True, False]
    assert g["oracle/random_10/failed"][:].tolist() == [False, False, False, True, False, False]
    assert g["oracle/random_10/done"][:].tolist() == [True, True, True, False, True, True]
    monkeypatch.undo()
    assert main(["run", config, "--stages", "models"]) == 0
    g = zarr.open_group(str(cfg.resolved_run_dir() / "models.zarr"), mode="r")
    labels = np.load("data/mnist1d.npz")["y_test"][:N_TEST]
    for name in ("full", "oracle/random_10"):
        assert g[f"{name}/done"][:].all() and not g[f"{name}/failed"][:].any()
        logits = g[f"{name}/logits"][:]
        np.testing.assert_array_equal(g[f"{name}/test_accuracy"][:],
                                      (logits[:, N_TRAIN:].argmax(-1) == labels).mean(1))
        assert np.isfinite(g[f"{name}/train_loss"][:]).all()
    assert main(["info", str(cfg.resolved_run_dir() / "models.zarr")]) == 0
    out = capsys.readouterr().out
    assert "test accuracy full (2 done models)" in out
    assert "test accuracy oracle/random_10 (6 done models)" in out

