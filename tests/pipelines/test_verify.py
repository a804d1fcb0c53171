"""`dmu info --verify RUN`: re-reads every store of a run by blocks; a clean run verifies, and a
corrupt or truncated chunk file, a flipped mask bit, a NaN in a done row, an edited config each give exit 2
with one line naming store, array and chunk or rows. A corrupt chunk read by a stage is the same one line."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import zarr

from attribution.store import CorruptChunkError, read
from pipelines.cli import main
from pipelines.config import DatamodelsConfig, UnlearnConfig, to_dict
from tests.conftest import small_config
from tests.pipelines.conftest import stage_config


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """A tiny run through every stage but the report: 24 subset models, LASSO datamodels, forget sets, K = 2
    full models and their oracles, two unlearning methods. Tests copy it before damaging it."""
    root = tmp_path_factory.mktemp("verify")
    cfg = stage_config(root, methods=("do_nothing", "dm_direct"), full_class=None)
    cfg = dataclasses.replace(
        cfg, subsets=small_config(root, n_models=24, block=4).subsets,
        datamodels=DatamodelsConfig(n_val=4, n_lds=4, target_chunk=128, n_lambdas=4, lambda_ratio=0.3),
        unlearn=UnlearnConfig(methods=("do_nothing", "dm_direct")),
        task=dataclasses.replace(cfg.task, recipe=dataclasses.replace(cfg.task.recipe, epochs=2)))
    (root / "cfg.yaml").write_text(json.dumps(to_dict(cfg)))
    stages = "subsets,datamodels,forget_sets,models,unlearn"
    assert main(["run", str(root / "cfg.yaml"), "--stages", stages]) == 0
    return cfg.resolved_run_dir()


@pytest.fixture
def run_copy(clean_run, tmp_path):
    dest = tmp_path / "run"
    shutil.copytree(clean_run, dest)
    return dest


def verify(run_dir, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(["info", "--verify", str(run_dir)])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("dmu:")]


def test_clean_run_verifies(clean_run, capsys):
    capsys.readouterr()
    assert main(["info", "--verify", str(clean_run)]) == 0
    out, err = capsys.readouterr()
    assert "dmu:" not in err
    for store in ("subsets.zarr", "models.zarr", "datamodels/lasso.zarr",
                  "unlearned/random_10/dm_direct.zarr"):
        assert f"{store}: ok" in out
    assert "no problems" in out


@pytest.mark.parametrize("how", ["garbage", "truncate"])
def test_corrupt_chunk_is_one_line(run_copy, capsys, how):
    chunk = run_copy / "subsets.zarr" / "logits" / "c" / "1" / "0" / "0"
    data = chunk.read_bytes()
    chunk.write_bytes(b"\x07" * len(data) if how == "garbage" else data[: len(data) // 2])
    code, errors = verify(run_copy, capsys)
    assert code == 2 and len(errors) == 1, errors
    assert "subsets.zarr" in errors[0] and "array logits, chunk file logits/c/1/0/0 (rows 4..7)" in errors[0]
    assert "corrupt or truncated" in errors[0]
    # a stage that reads the chunk says the same, in one line, not a codec's traceback
    with pytest.raises(CorruptChunkError, match=r"chunk file logits/c/1/0/0"):
        read(zarr.open_group(str(run_copy / "subsets.zarr"), mode="r")["logits"])
    cfg_path = run_copy / "cfg.yaml"
    cfg = json.loads((run_copy / "config.json").read_text())
    cfg["run_dir"] = str(run_copy)
    cfg_path.write_text(json.dumps(cfg))
    # undeclared, so that the datamodels stage runs again and reads subsets.zarr
    (run_copy / "datamodels" / "lasso.zarr" / "zarr.json").unlink()
    capsys.readouterr()
    assert main(["run", str(cfg_path), "--stages", "datamodels"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dmu:")]
    assert len(err) == 1 and "chunk file logits/c/1/0/0" in err[0], err


def test_corrupt_uncompressed_chunk_of_models_store(run_copy, capsys):
    chunk = run_copy / "models.zarr" / "full" / "params" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    code, errors = verify(run_copy, capsys)
    assert code == 2 and len(errors) == 1, errors
    assert "models.zarr" in errors[0] and "array full/params, chunk file full/params/c/0/0" in errors[0]


def test_flipped_mask_bit(run_copy, capsys):
    masks = zarr.open_group(str(run_copy / "subsets.zarr"), mode="r+")["masks"]
    masks[6, 17] = not masks[6, 17]
    code, errors = verify(run_copy, capsys)
    assert code == 2 and len(errors) == 1, errors
    assert "subsets.zarr: array masks: rows 6 differ from the masks of seed 7" in errors[0]


def test_nan_in_a_done_row(run_copy, capsys):
    logits = zarr.open_group(str(run_copy / "models.zarr"), mode="r+")["oracle/random_10/logits"]
    logits[3, 5, 2] = np.nan
    code, errors = verify(run_copy, capsys)
    assert code == 2 and len(errors) == 1, errors
    assert "models.zarr: array oracle/random_10/logits: done rows 3 hold non-finite values" in errors[0]


def test_row_both_done_and_failed(run_copy, capsys):
    zarr.open_group(str(run_copy / "subsets.zarr"), mode="r+")["failed"][2] = True
    code, errors = verify(run_copy, capsys)
    assert code == 2 and len(errors) == 1, errors
    assert "subsets.zarr: array failed: rows 2 are both done and failed" in errors[0]


def test_edited_config_and_hash(run_copy, capsys):
    group = zarr.open_group(str(run_copy / "subsets.zarr"), mode="r+")
    group.attrs["config_hash"] = "0123456789abcdef"
    config = json.loads((run_copy / "config.json").read_text())
    config["datamodels"]["n_lambdas"] = 5
    (run_copy / "config.json").write_text(json.dumps(config))
    code, errors = verify(run_copy, capsys)
    assert code == 2 and len(errors) == 3, errors
    assert any("subsets.zarr: config_hash 0123456789abcdef does not match its config" in e for e in errors)
    # subsets.zarr's stored config still equals the one config.json gives; its edited hash differs from it
    assert any("subsets.zarr: made with another config than the run's config.json (its hash)" in e
               for e in errors)
    assert any("lasso.zarr: made with another config than the run's config.json (n_lambdas (4 -> 5))" in e
               for e in errors)
    # one store alone is checked against the config.json of its run directory, two levels up here
    code, errors = verify(run_copy / "datamodels" / "lasso.zarr", capsys)
    assert code == 2 and len(errors) == 1 and "(n_lambdas (4 -> 5))" in errors[0], errors
    assert verify(run_copy / "unlearned" / "random_10" / "dm_direct.zarr", capsys) == (0, [])


def test_read_gives_the_stored_slices(clean_run):
    """Stage reads go through `read`: on a clean store it is plain indexing."""
    g = zarr.open_group(str(clean_run / "subsets.zarr"), mode="r")
    np.testing.assert_array_equal(read(g["logits"], (slice(2, 9), slice(100, 240))),
                                  g["logits"][2:9, 100:240])
    np.testing.assert_array_equal(read(g["masks"], 3), g["masks"][3])


def test_corrupt_chunk_read_by_unlearn_and_report_is_one_line(run_copy, capsys):
    """The unlearn stage (a unit reading its full models' parameters) and the report (reading the unlearned
    logits) meet a corrupt chunk file: one line naming store, array and file, exit 2, no traceback."""
    logits = run_copy / "unlearned" / "random_10" / "dm_direct.zarr" / "logits" / "c" / "0" / "0" / "0"
    logits.write_bytes(logits.read_bytes()[:100])
    capsys.readouterr()
    assert main(["report", str(run_copy)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "dm_direct.zarr" in lines[0] and "chunk file logits/c/0/0/0" in lines[0], err
    params = run_copy / "models.zarr" / "full" / "params" / "c" / "0" / "0"
    params.write_bytes(params.read_bytes()[:100])
    shutil.rmtree(run_copy / "unlearned" / "random_10" / "do_nothing.zarr")  # so that the stage runs its units
    cfg = json.loads((run_copy / "config.json").read_text())
    cfg["run_dir"] = str(run_copy)
    (run_copy / "cfg.yaml").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["run", str(run_copy / "cfg.yaml"), "--stages", "unlearn"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dmu:")]
    assert len(lines) == 1 and "models.zarr" in lines[0] and "chunk file full/params/c/0/0" in lines[0], err
    assert "Traceback" not in err
