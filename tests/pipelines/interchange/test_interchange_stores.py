"""Import and export of a MadryLab/datamodels store, the release's fitted datamodels (.pt) and traker's saved
scores: files written here in exactly those layouts (traker's own saver for its layout), never downloaded."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from attribution.store import location, open_group, open_store
from pipelines.config import ConfigError
from pipelines.interchange import datamodels as dm
from pipelines.interchange import datamodels_store as dms
from pipelines.interchange import files, stores, trak_scores
from pipelines.rundir.layout import dm_direct_margins

M, N, T = 10, 12, 7


def write_store(folder, m=M, n=N, keys=(("margins", (T,), "float16"),), completed=None, seed=0):
    """A datamodels store as initialize_store + worker.py leave it: spec.json, <key>.npy, _completed.npy."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    schema = {"masks": {"shape": [n], "dtype": "bool_"}}
    data = {"masks": rng.random((m, n)) < 0.5}
    for key, shape, dtype in keys:
        schema[key] = {"shape": list(shape), "dtype": dtype}
        data[key] = rng.normal(size=(m, *shape)).astype(dtype)
    (folder / "spec.json").write_text(json.dumps({"num_models": m, "schema": schema}))
    for key, values in data.items():
        np.save(folder / f"{key}.npy", values)
    np.save(folder / "_completed.npy", np.ones(m, bool) if completed is None else completed)
    return data


def subsets(run):
    return open_store(run / "subsets.zarr", stores.KIND)


def test_store_round_trip_is_bit_for_bit(tmp_path):
    data = write_store(tmp_path / "src")
    dms.import_store(tmp_path / "src", tmp_path / "run", block_size=4)
    group = subsets(tmp_path / "run")
    assert np.asarray(group["done"][:]).all() and group.attrs["margin_only"]
    assert group["margins"][:].tobytes() == data["margins"].tobytes()
    np.testing.assert_array_equal(group["masks"][:], data["masks"])
    dms.export_store(tmp_path / "run", tmp_path / "out")
    for name in ("masks.npy", "margins.npy", "_completed.npy"):  # the files themselves, header included
        assert (tmp_path / "src" / name).read_bytes() == (tmp_path / "out" / name).read_bytes()
    assert (json.loads((tmp_path / "out" / "spec.json").read_text())
            == json.loads((tmp_path / "src" / "spec.json").read_text()))
    dms.import_store(tmp_path / "out", tmp_path / "run2", block_size=4)
    again = subsets(tmp_path / "run2")
    for name in ("masks", "margins", "source_row"):
        assert again[name][:].tobytes() == group[name][:].tobytes()


def test_several_margin_keys_are_concatenated_and_exported_under_their_keys(tmp_path):
    data = write_store(tmp_path / "src", keys=(("train_margins", (N,), "float16"), ("margins", (T,), "float16")))
    dms.import_store(tmp_path / "src", tmp_path / "run", margins_key="train_margins,margins")
    group = subsets(tmp_path / "run")
    np.testing.assert_array_equal(group["margins"][:], np.concatenate([data["train_margins"], data["margins"]], 1))
    dms.export_store(tmp_path / "run", tmp_path / "out")
    for key in ("train_margins", "margins"):
        assert np.load(tmp_path / "out" / f"{key}.npy").tobytes() == data[key].tobytes()


def test_incomplete_rows_are_left_out_and_the_rest_kept_in_order(tmp_path):
    completed = np.ones(M, bool)
    completed[[1, 4, 5]] = False
    data = write_store(tmp_path / "src", completed=completed)
    dms.import_store(tmp_path / "src", tmp_path / "run", block_size=3)
    group = subsets(tmp_path / "run")
    kept = np.flatnonzero(completed)
    np.testing.assert_array_equal(group["source_row"][:], kept)
    np.testing.assert_array_equal(group["masks"][:], data["masks"][kept])
    assert group["margins"][:].tobytes() == data["margins"][kept].tobytes()
    assert group.attrs["skipped_incomplete"] == 3


def test_a_store_completed_further_is_refused_in_the_same_run(tmp_path):
    completed = np.ones(M, bool)
    completed[-1] = False
    write_store(tmp_path / "src", completed=completed)
    dms.import_store(tmp_path / "src", tmp_path / "run")
    np.save(tmp_path / "src" / "_completed.npy", np.ones(M, bool))
    with pytest.raises(Exception, match="different config") as info:
        dms.import_store(tmp_path / "src", tmp_path / "run")
    assert "n_models" in str(info.value) and "\n" not in str(info.value)


def test_logits_import_and_export_margins_by_their_formula(tmp_path):
    data = write_store(tmp_path / "src", keys=(("logits", (T, 3), "float32"),))
    dms.import_store(tmp_path / "src", tmp_path / "run", margins_key="logits", block_size=4)
    group = subsets(tmp_path / "run")
    assert not group.attrs["margin_only"]
    assert group["logits"][:].tobytes() == data["logits"].tobytes()
    labels = np.arange(T) % 3
    dms.export_store(tmp_path / "run", tmp_path / "out", labels=labels)
    z = data["logits"].astype(np.float64)
    correct = z[:, np.arange(T), labels]
    others = z.copy()
    others[:, np.arange(T), labels] = -np.inf
    np.testing.assert_allclose(np.load(tmp_path / "out" / "margins.npy"), correct - logsumexp(others, axis=-1),
                               rtol=1e-5, atol=1e-5)


def test_exporting_logits_without_labels_or_a_run_config_gives_one_line(tmp_path):
    write_store(tmp_path / "src", keys=(("logits", (T, 3), "float32"),))
    dms.import_store(tmp_path / "src", tmp_path / "run", margins_key="logits")
    with pytest.raises(ConfigError, match="not a run directory") as info:
        dms.export_store(tmp_path / "run", tmp_path / "out")
    assert "\n" not in str(info.value)


def test_an_interrupted_import_resumes_and_reads_one_block_at_a_time(tmp_path, monkeypatch):
    data = write_store(tmp_path / "src", m=23)
    path = dms.import_store(tmp_path / "src", tmp_path / "run", block_size=4)
    g = open_group(path, mode="r+")
    g["done"][8:] = False  # as a kill after two blocks leaves it
    g["margins"][8:] = np.nan
    reads = []
    rows = files.NpyRows.rows
    monkeypatch.setattr(files.NpyRows, "rows",
                        lambda self, a, b: reads.append((self.path.name, b - a)) or rows(self, a, b))
    dms.import_store(tmp_path / "src", tmp_path / "run", block_size=4)
    assert subsets(tmp_path / "run")["margins"][:].tobytes() == data["margins"].tobytes()
    blocks = [r for r in reads if r[0] == "margins.npy"]
    assert len(blocks) == 4 and max(b for _, b in blocks) == 4  # rows 8..22 only, 4 models per read


def _bad_store(folder, what):
    data = write_store(folder)
    spec = json.loads((folder / "spec.json").read_text())
    if what == "no spec":
        (folder / "spec.json").unlink()
    elif what == "bad spec":
        (folder / "spec.json").write_text(json.dumps({"schema": spec["schema"]}))
    elif what == "missing key file":
        (folder / "margins.npy").unlink()
    elif what == "missing completed":
        (folder / "_completed.npy").unlink()
    elif what == "shape":
        np.save(folder / "margins.npy", data["margins"][:, :-1])
    elif what == "models":
        np.save(folder / "margins.npy", data["margins"][:-1])
    elif what == "dtype":
        np.save(folder / "margins.npy", data["margins"].astype(np.float32))
    elif what == "masks dtype":
        spec["schema"]["masks"]["dtype"] = "uint8"
        (folder / "spec.json").write_text(json.dumps(spec))
        np.save(folder / "masks.npy", data["masks"].astype(np.uint8))
    elif what == "margins int":
        spec["schema"]["margins"]["dtype"] = "int32"
        (folder / "spec.json").write_text(json.dumps(spec))
        np.save(folder / "margins.npy", data["margins"].astype(np.int32))
    elif what == "no key":
        del spec["schema"]["margins"]
        (folder / "spec.json").write_text(json.dumps(spec))
    elif what == "none completed":
        np.save(folder / "_completed.npy", np.zeros(M, bool))
    elif what == "completed shape":
        np.save(folder / "_completed.npy", np.ones(M + 1, bool))


@pytest.mark.parametrize("what, words", [
    ("no spec", "missing .*spec.json"), ("bad spec", "not a datamodels spec"),
    ("missing key file", "missing .*margins.npy"), ("missing completed", "missing .*_completed.npy"),
    ("shape", "spec.json declares"), ("models", "spec.json declares"), ("dtype", "spec.json declares"),
    ("masks dtype", "bool masks"), ("margins int", "float type"), ("no key", "no key 'margins'"),
    ("none completed", "no completed model"), ("completed shape", "expected bool")])
def test_bad_store_gives_one_line(tmp_path, what, words):
    _bad_store(tmp_path / "src", what)
    with pytest.raises(ConfigError, match=words) as info:
        dms.import_store(tmp_path / "src", tmp_path / "run")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run" / "subsets.zarr").exists()


def test_cli_imports_and_exports_a_store_and_refuses_a_flag_of_another_kind(tmp_path, capsys):
    from pipelines.cli import main

    data = write_store(tmp_path / "src", keys=(("margins_test", (T,), "float16"),))
    assert main(["import", "datamodels-store", str(tmp_path / "src"), "--run-dir", str(tmp_path / "run"),
                 "--margins-key", "margins_test"]) == 0
    assert main(["export", "datamodels-store", "--run-dir", str(tmp_path / "run"), "--out",
                 str(tmp_path / "out")]) == 0
    assert np.load(tmp_path / "out" / "margins_test.npy").tobytes() == data["margins_test"].tobytes()
    capsys.readouterr()
    assert main(["import", "datamodels-store", str(tmp_path / "src"), "--run-dir", str(tmp_path / "r2"),
                 "--experiment", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--experiment does not apply to datamodels-store" in err


# ----------------------------------------------------------------------------------------------------------
# the release's fitted datamodels, {train,test}_{PCT}pct.pt


def write_weights(folder, n=300, n_test=40, pct="50", seed=0, **override):
    """train_{pct}pct.pt (targets: the n training points) and test_{pct}pct.pt, as compute_datamodels saves them."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    fits = {}
    for split, t in (("train", n), ("test", n_test)):
        fits[split] = {"weight": torch.randn(n, t, generator=g), "bias": torch.randn(t, generator=g),
                       "lam": torch.rand(t, generator=g)}
        fits[split].update(override.get(split, {}))
        torch.save(fits[split], folder / f"{split}_{pct}pct.pt")
    return fits


def test_release_datamodels_import_equals_torch_load(tmp_path):
    write_weights(tmp_path / "src")
    path = dm.import_weights(tmp_path / "src", tmp_path / "run")
    group = open_store(path, stores.DATAMODELS_KIND)
    ref = [torch.load(tmp_path / "src" / f"{s}_50pct.pt", mmap=True, weights_only=True) for s in ("train", "test")]
    np.testing.assert_array_equal(group["margin_weights"][:], torch.cat([r["weight"] for r in ref], 1).numpy())
    np.testing.assert_array_equal(group["margin_bias"][:], torch.cat([r["bias"] for r in ref]).numpy())
    np.testing.assert_array_equal(group["margin_lambda"][:], torch.cat([r["lam"] for r in ref]).numpy())
    assert np.asarray(group["done"][:]).all() and group.attrs["margin_only"] and "weights" not in group


def test_half_precision_and_parameter_fits_import_as_float32(tmp_path):
    fits = write_weights(tmp_path / "src", test={"weight": torch.nn.Parameter(torch.randn(300, 40).half()),
                                                 "bias": torch.randn(40).half()})
    group = open_store(dm.import_weights(tmp_path / "src", tmp_path / "run"), stores.DATAMODELS_KIND)
    np.testing.assert_array_equal(group["margin_weights"][:, 300:], fits["test"]["weight"].detach().float().numpy())
    np.testing.assert_array_equal(group["margin_bias"][300:], fits["test"]["bias"].float().numpy())


def test_dm_direct_on_imported_release_datamodels_is_bias_plus_the_kept_weights(tmp_path):
    fits = write_weights(tmp_path / "src")
    path = dm.import_weights(tmp_path / "src", tmp_path / "run", name="release")
    w = torch.cat([fits["train"]["weight"], fits["test"]["weight"]], 1).double().numpy()
    bias = torch.cat([fits["train"]["bias"], fits["test"]["bias"]]).double().numpy()
    forget = np.array([3, 77, 150, 299])
    original = bias + w.sum(0)  # the datamodel's prediction for the model trained on every point
    kept = np.setdiff1d(np.arange(300), forget)
    np.testing.assert_allclose(dm_direct_margins(location(path), forget, original), bias + w[kept].sum(0),
                               rtol=1e-4, atol=1e-3)


def test_interrupted_weights_import_resumes_at_the_rows_not_written(tmp_path, monkeypatch):
    fits = write_weights(tmp_path / "src")
    path = dm.import_weights(tmp_path / "src", tmp_path / "run")
    g = open_group(path, mode="r+")
    g["margin_weights"][256:] = np.nan  # as a kill after the first 256 rows leaves it
    g.attrs["imported_rows"] = 256
    g["done"][:] = False
    reads = []
    rows = files.PtTensors.rows
    monkeypatch.setattr(files.PtTensors, "rows", lambda self, k, a, b: reads.append((k, a, b)) or rows(self, k, a, b))
    dm.import_weights(tmp_path / "src", tmp_path / "run")
    assert [r for r in reads if r[0] == "weight"] == [("weight", 256, 300)] * 2  # train and test files
    np.testing.assert_array_equal(g["margin_weights"][:, :300], fits["train"]["weight"].numpy())
    assert np.asarray(g["done"][:]).all()


def _bad_weights(folder, what):
    if what == "missing":
        write_weights(folder)
        (folder / "test_50pct.pt").unlink()
    elif what == "1-D":
        write_weights(folder, test={"weight": torch.zeros(300)})
    elif what == "bias":
        write_weights(folder, test={"bias": torch.zeros(5)})
    elif what == "key":
        write_weights(folder)
        torch.save({"weight": torch.zeros(300, 40), "bias": torch.zeros(40)}, folder / "test_50pct.pt")
    elif what == "features":
        write_weights(folder, test={"weight": torch.zeros(299, 40)})
    elif what == "targets":
        write_weights(folder, train={"weight": torch.zeros(300, 299), "bias": torch.zeros(299),
                                     "lam": torch.zeros(299)})
    elif what == "transposed":
        write_weights(folder, test={"weight": torch.zeros(40, 300).t()})
    elif what == "int":
        write_weights(folder, test={"lam": torch.zeros(40, dtype=torch.int64)})
    elif what == "not zip":
        write_weights(folder)
        (folder / "test_50pct.pt").write_bytes(b"not a torch file")
    elif what == "two":
        write_weights(folder)
        write_weights(folder, pct="10")


@pytest.mark.parametrize("what, words", [
    ("missing", "missing .*test_50pct.pt"), ("1-D", "must be 2-D"), ("bias", "different fits"),
    ("key", r"lacks \['lam'\]"), ("features", "different releases"), ("targets", "must be the training points"),
    ("transposed", "transposed"), ("int", "not float tensors"), ("not zip", "not a torch.save zip file"),
    ("two", "exactly one")])
def test_bad_release_datamodels_give_one_line(tmp_path, what, words):
    _bad_weights(tmp_path / "src", what)
    with pytest.raises(ConfigError, match=words) as info:
        dm.import_weights(tmp_path / "src", tmp_path / "run")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run" / "datamodels").exists()


# ----------------------------------------------------------------------------------------------------------
# traker's save_dir


def write_trak(save_dir, experiments=(("test", 9),), n=N, finalize=True, seed=0):
    """Scores written through traker's own MmapSaver, as TRAKer.finalize_scores leaves them."""
    from trak.savers import MmapSaver

    saver = MmapSaver(save_dir, {"JL dimension": 8, "JL matrix type": "rademacher", "train set size": n},
                      train_set_size=n, proj_dim=8, load_from_save_dir=True, logging_level=logging.ERROR,
                      use_half_precision=True)
    saver.init_store(0)
    rng = np.random.default_rng(seed)
    scores = {}
    for name, t in experiments:
        saver.init_experiment(name, t, 0)
        scores[name] = rng.normal(size=(n, t)).astype(np.float16)
        saver.current_store[f"{name}_scores"][:] = scores[name]
        if finalize:
            saver.save_scores(name)
    return scores


def test_trak_scores_import_as_uncalibrated_margin_weights(tmp_path):
    scores = write_trak(tmp_path / "trak", experiments=(("train", N), ("test", 9)))
    path = trak_scores.import_scores(tmp_path / "trak", tmp_path / "run", experiment="train,test")
    group = open_store(path, stores.DATAMODELS_KIND)
    assert path.name == "trak.zarr" and group.attrs["calibrated"] is False
    np.testing.assert_array_equal(group["margin_weights"][:],
                                  np.concatenate([scores["train"], scores["test"]], 1).astype(np.float32))
    assert np.isnan(group["margin_bias"][:]).all() and np.asarray(group["done"][:]).all()


def _bad_trak(save_dir, what):
    if what == "two":
        write_trak(save_dir, experiments=(("a", 3), ("b", 4)))
    elif what == "not finalized":
        write_trak(save_dir, finalize=False)
    elif what == "no metadata":
        write_trak(save_dir)
        (save_dir / "metadata.json").unlink()
    elif what == "missing scores":
        write_trak(save_dir)
        (save_dir / "scores" / "test.mmap").unlink()
    elif what == "shape":
        write_trak(save_dir)
        np.save(save_dir / "scores" / "test.mmap.npy", np.zeros((N, 8), np.float16))
        (save_dir / "scores" / "test.mmap.npy").rename(save_dir / "scores" / "test.mmap")


@pytest.mark.parametrize("what, words", [
    ("two", "name them with --experiment"), ("not finalized", "not finalized"), ("no metadata", "missing .*metadata"),
    ("missing scores", "missing .*test.mmap"), ("shape", "different save_dirs")])
def test_bad_trak_save_dir_gives_one_line(tmp_path, what, words):
    _bad_trak(tmp_path / "trak", what)
    with pytest.raises(ConfigError, match=words) as info:
        trak_scores.import_scores(tmp_path / "trak", tmp_path / "run")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run" / "datamodels").exists()

