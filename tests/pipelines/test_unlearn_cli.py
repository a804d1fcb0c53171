"""`dmu unlearn`: one deletion request served from a run's stores (the tiny run of
tests/pipelines/conftest.py's build_run, with a hand-written datamodel store). The printed accuracies are checked
against the written checkpoint loaded into the task's model; bad input ends with exit status 2 and one line
on stderr.
"""

import shutil

import numpy as np
import pytest
import torch
import zarr

from pipelines.cli import main
from pipelines.stages import RunContext
from pipelines.rundir import layout
from pipelines.tasks import get_task
from pipelines.engine.training import predict_logits
from tests.pipelines.conftest import build_run, write_datamodels


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A run with forget sets random_10 and class_0, K = 2 full models, their oracles, and datamodels."""
    cfg, ctx, weights = build_run(tmp_path_factory.mktemp("cli"), unlearn=False)
    return cfg, ctx, weights


def unlearn(run_dir, ids_file, method, out, model=0):
    return main(["unlearn", "--run", str(run_dir), "--forget", str(ids_file), "--method", method,
                 "--model", str(model), "--out", str(out)])


def printed_accuracies(out: str) -> dict[str, np.ndarray]:
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()[:1] in (["before"],
                                                                                                  ["after"])}
    return {when: np.array([float(v) for v in values]) for when, values in rows.items()}


def accuracies(logits, labels, forget) -> np.ndarray:
    """(forget, retain, test) accuracies, computed here with numpy."""
    retain = np.setdiff1d(np.arange(200), forget)
    sets = (forget, retain, np.arange(200, 250))
    return np.array([(logits[s].argmax(-1) == labels[s]).mean() for s in sets])


def test_request_prints_accuracies_and_writes_a_checkpoint(served, tmp_path, capsys):
    cfg, ctx, _ = served
    forget = np.array([150, 3, 77, 12, 199, 40, 8, 121])  # any order: the checkpoint keeps it
    ids = tmp_path / "forget.json"
    ids.write_text(str(forget.tolist()))
    out = tmp_path / "ckpt" / "unlearned.pt"
    assert unlearn(ctx.run_dir, ids, "dm_matching", out, model=1) == 0
    printed = printed_accuracies(capsys.readouterr().out)
    labels = ctx.data.y_targets.numpy()
    full = zarr.open_group(str(ctx.run_dir / "models.zarr"), mode="r")["full/logits"][1]
    np.testing.assert_allclose(printed["before"], accuracies(full, labels, forget), atol=5e-4)
    checkpoint = torch.load(out)
    assert checkpoint["method"] == "dm_matching" and checkpoint["model"] == 1
    assert checkpoint["forget_ids"] == forget.tolist() and checkpoint["example_passes"] > 0
    model = get_task(cfg.task).build_model(10, 0)
    model.load_state_dict(checkpoint["state_dict"])
    after = predict_logits(model, ctx.data.x_targets)
    assert not np.allclose(after, full)
    np.testing.assert_allclose(printed["after"], accuracies(after, labels, forget), atol=5e-4)


def test_dm_direct_request_writes_its_predicted_logits(served, tmp_path, capsys):
    _, ctx, weights = served
    ids = tmp_path / "forget.txt"
    ids.write_text("3, 17\n42\n")
    assert unlearn(ctx.run_dir, ids, "dm_direct", tmp_path / "dm.pt") == 0
    full = zarr.open_group(str(ctx.run_dir / "models.zarr"), mode="r")["full/logits"][0]
    predicted = torch.load(tmp_path / "dm.pt")["predicted_logits"].numpy()
    np.testing.assert_allclose(predicted, full - weights[[3, 17, 42]].astype(np.float64).sum(0), atol=1e-5)
    after = printed_accuracies(capsys.readouterr().out)["after"]
    expected = accuracies(predicted, ctx.data.y_targets.numpy(), [3, 17, 42])
    np.testing.assert_allclose(after, expected, atol=5e-4)


def test_oracle_matching_request_finds_the_runs_oracles(served, tmp_path):
    _, ctx, _ = served
    ids = tmp_path / "class0.npy"
    np.save(ids, layout.load_forget_sets(ctx.run_dir)["class_0"][::-1].copy())  # same set, other order
    assert unlearn(ctx.run_dir, ids, "oracle_matching", tmp_path / "om.pt") == 0
    assert "state_dict" in torch.load(tmp_path / "om.pt")


@pytest.mark.parametrize("ids, method, message", [
    ("0 5 200", "dm_matching", "bad forget ids: forget_idx has 1 index(es) out of range [0, 200)"),
    ("4 9 4", "dm_matching", "bad forget ids: forget_idx has duplicated indices [4]"),
    ("", "dm_matching", "bad forget ids: forget_idx is empty"),
    ("1 two 3", "dm_matching", "holds a non-integer id"),
    ("1.5", "dm_matching", "holds a non-integer id"),
    ("1 2 3", "dm_matchin", "unknown method 'dm_matchin'; known: dm_direct, dm_matching, do_nothing, "
     "gradient_ascent, gradient_descent, mu_mis, mu_mis_gap, neggrad_plus, oracle_matching, scrub"),
    ("1 2 3", "oracle_matching", "oracle_matching needs oracles retrained without this forget set"),
])
def test_bad_request_is_one_line_and_exit_2(served, tmp_path, capsys, ids, method, message):
    _, ctx, _ = served
    path = tmp_path / "ids.txt"
    path.write_text(ids)
    assert unlearn(ctx.run_dir, path, method, tmp_path / "out.pt") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dmu: error: ") and message in err[0], err
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("ids, message", [
    (np.zeros(200, bool), "bad forget ids: forget_idx is a boolean mask; pass the indices"),
    (np.array([1.0, 2.0]), "bad forget ids: forget_idx must hold integer indices"),
    (b"not an npy file", "is not a readable .npy array of integers"),
])
def test_bad_npy_request_is_one_line_and_exit_2(served, tmp_path, capsys, ids, message):
    _, ctx, _ = served
    path = tmp_path / "ids.npy"
    path.write_bytes(ids) if isinstance(ids, bytes) else np.save(path, ids)
    assert unlearn(ctx.run_dir, path, "gradient_descent", tmp_path / "out.pt") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("shape, fingerprint, message", [
    ((150, 250, 10), None, "has weights (150, 250, 10) but the task has (N, T, C) = (200, 250, 10)"),
    ((200, 200, 10), None, "has weights (200, 200, 10) but the task has (N, T, C) = (200, 250, 10)"),
    ((200, 250, 10), "0123456789abcdef", "was fit on another dataset (fingerprint 0123456789abcdef)"),
])
def test_mismatched_datamodel_store_is_refused(served, tmp_path, capsys, shape, fingerprint, message):
    cfg, ctx, _ = served
    run_dir = tmp_path / "copy"
    shutil.copytree(ctx.run_dir, run_dir)
    shutil.rmtree(run_dir / "datamodels")
    write_datamodels(RunContext(cfg=cfg, run_dir=run_dir), shape=shape, fingerprint=fingerprint)
    ids = tmp_path / "ids.txt"
    ids.write_text("1 2 3")
    assert unlearn(run_dir, ids, "dm_matching", tmp_path / "out.pt") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_model_index_out_of_range_is_refused(served, tmp_path, capsys):
    _, ctx, _ = served
    ids = tmp_path / "ids.txt"
    ids.write_text("1 2 3")
    assert unlearn(ctx.run_dir, ids, "gradient_descent", tmp_path / "out.pt", model=2) == 2
    assert "--model must name a trained full model in [0, 2), got 2" in capsys.readouterr().err
