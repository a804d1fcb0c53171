"""examples/: the digits task (a task of one's own, through `task.name: package.module:make_task`) run end to end
on a tiny version of examples/digits.yaml, and the analysis scripts run on that run, their printed numbers
checked against pipelines.api. The tiny run (`digits_run`, tests/conftest.py) is built once per test session and
shared with tests/pipelines/test_api.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.config import ConfigError, RecipeConfig, TaskConfig
from pipelines.tasks import Task, get_task
from tests.conftest import ROOT, TINY_METHODS, tiny_digits_config

DIGITS = "examples.digits_task:make_task"


# ---- the digits task ---------------------------------------------------------------------------------------


def test_digits_task_loads_real_digits():
    task = get_task(TaskConfig(name=DIGITS))
    assert isinstance(task, Task) and task.name == "digits" and task.packed_forward is None
    data = task.load_data()
    assert (data.n_train, len(data.y_test), data.num_classes) == (1297, 500, 10)
    assert data.x_train.shape[1:] == (1, 8, 8) and str(data.x_train.dtype) == "torch.float32"
    assert 0.0 <= float(data.x_targets.min()) and float(data.x_targets.max()) <= 1.0
    assert data.fingerprint() == task.load_data().fingerprint()  # the seeded split is deterministic
    assert sorted(np.unique(data.y_test.numpy()).tolist()) == list(range(10))
    with pytest.raises(ConfigError, match="task.arch"):
        get_task(TaskConfig(name=DIGITS, arch="resnet"))


@pytest.mark.slow
def test_digits_pipeline_end_to_end(digits_run):
    for store in ("subsets.zarr", "datamodels/lasso.zarr", "models.zarr", "forget_sets.json", "config.json",
                  "report/metrics.json", "report/report.md"):
        assert (digits_run / store).exists(), store
    for fs in ("random_10", "class_0"):
        for method in TINY_METHODS:
            assert (digits_run / "unlearned" / fs / f"{method}.zarr").exists()
    import zarr

    models = zarr.open_group(str(digits_run / "models.zarr"), mode="r")
    assert models["full/done"][:].all()
    from pipelines.rundir.layout import load_run_config

    data = get_task(load_run_config(digits_run).task).load_data()
    logits = models["full/logits"][:, data.n_train:]
    accuracy = (logits.argmax(-1) == data.y_test.numpy()).mean(1)
    assert (accuracy > 0.5).all(), accuracy  # chance is 0.1; 4 epochs on 200 images reach about 0.86
    metrics = json.loads((digits_run / "report" / "metrics.json").read_text())
    assert set(metrics["forget_sets"]) == {"random_10", "class_0"}
    assert set(metrics["forget_sets"]["random_10"]["methods"]) == set(TINY_METHODS)


# ---- task.name as an import path ---------------------------------------------------------------------------


def test_import_path_errors_are_one_clear_line(tmp_path, monkeypatch):
    (tmp_path / "badtasks_for_dmu_test.py").write_text("def not_a_task(cfg):\n    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = {"no_such_module_for_dmu.tasks:make_task": "no module no_such_module_for_dmu.tasks",
             "badtasks_for_dmu_test:missing": "has no callable 'missing'",
             "badtasks_for_dmu_test:not_a_task": "returned int, not a pipelines.tasks.Task",
             "nosuchtask": "unknown task.name 'nosuchtask'", ":make_task": "package.module:make_task"}
    for name, message in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)) as err:
            get_task(TaskConfig(name=name))
        assert "\n" not in str(err.value)


def test_import_path_falls_back_to_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "cwdtasks_for_dmu_test.py").write_text(
        "from examples.digits_task import make_task as _make\n\n\ndef make_task(cfg):\n    return _make(cfg)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.delitem(sys.modules, "cwdtasks_for_dmu_test", raising=False)
    task = get_task(TaskConfig(name="cwdtasks_for_dmu_test:make_task", n_train=50,
                               recipe=RecipeConfig(epochs=3)))
    assert task.name == "digits" and task.n_train == 50 and task.recipe.epochs == 3
    assert sys.path[0] == str(tmp_path) and os.environ["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path)
    sys.modules.pop("cwdtasks_for_dmu_test", None)


@pytest.mark.slow
def test_dmu_console_script_imports_the_task_from_the_working_directory(tmp_path):
    """`dmu` (a console script: its sys.path lacks the working directory) resolves
    examples.digits_task:make_task from the repository root, and says what is missing elsewhere."""
    dmu = Path(sys.executable).parent / "dmu"
    if not dmu.exists():
        pytest.skip("no dmu console script beside this Python")
    config = tiny_digits_config(tmp_path / "tiny.yaml")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    ok = subprocess.run([str(dmu), "run", str(config), "--stages", "forget_sets", "--run-dir",
                         str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "run" / "forget_sets.json").read_text())["sets"]["class_0"]["size"] > 0
    bad = subprocess.run([str(dmu), "run", str(config), "--stages", "forget_sets", "--run-dir",
                          str(tmp_path / "run2")], cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("dmu: error: task.name 'examples.digits_task:make_task'")
    assert "no module examples" in bad.stderr


# ---- the analysis scripts ----------------------------------------------------------------------------------


def run_script(name: str, *args: str) -> str:
    """Run examples/<name> as a researcher would, from the repository root; its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
def test_influential_points_script(digits_run, tmp_path):
    from pipelines import open_run

    run = open_run(digits_run)
    nonzero = (np.asarray(run.datamodels()["margin_weights"][:]) != 0).sum(0)
    target = int(run.test_targets[np.argmax(nonzero[run.test_targets])])  # a test target with many weights
    out = tmp_path / "influential.png"
    stdout = run_script("influential_points.py", str(digits_run), "--target", str(target), "--k", "6",
                        "--out", str(out))
    rows = [line.split() for line in stdout.splitlines() if re.match(r"^\s+\d+\s+\d+\s+\d+\s+-?\d", line)]
    idx, weights = run.most_influential(target, k=6)
    assert [int(r[1]) for r in rows] == idx.tolist()
    assert [int(r[2]) for r in rows] == run.labels[idx].tolist()
    np.testing.assert_allclose([float(r[3]) for r in rows], weights, atol=1e-6)
    assert np.count_nonzero(weights) > 0
    assert out.exists()
    # what the script's plot draws: a bar per influential point, its height the point's weight
    from examples.influential_points import plot

    drawn = plot(run, target, idx, weights, "margin", tmp_path / "again.png")
    assert drawn["points"] == idx.tolist()
    np.testing.assert_allclose(drawn["weights"], weights, rtol=1e-6)


@pytest.mark.slow
def test_predicted_vs_actual_script(digits_run, tmp_path):
    from scipy.stats import pearsonr

    from pipelines import open_run
    from unlearning.klom import margins

    out = tmp_path / "scatter.png"
    stdout = run_script("predicted_vs_actual.py", str(digits_run), "--out", str(out))
    printed = {key: float(re.search(rf"{key}[^:]*: (-?[\d.]+)", stdout).group(1))
               for key in ("pearson", "spearman", "stored margin LDS")}
    # the same numbers from the API and the raw stores, computed here another way
    run = open_run(digits_run)
    test = run.test_targets
    labels = run.labels[test]
    masks = np.asarray(run.subsets["masks"][run.lds_models])
    weights = np.asarray(run.datamodels()["margin_weights"][:, test[0]:test[-1] + 1], dtype=np.float64)
    predicted = (masks - 1.0) @ weights  # minus the rows of the removed points
    full = margins(np.asarray(run.models["full/logits"][:, test[0]:test[-1] + 1]), labels).mean(0)
    actual = margins(np.asarray(run.subsets["logits"][run.lds_models, test[0]:test[-1] + 1]), labels) - full
    assert printed["pearson"] == pytest.approx(pearsonr(predicted.ravel(), actual.ravel()).statistic, abs=1e-4)
    stored = np.asarray(run.datamodels()["margin_lds"][test[0]:test[-1] + 1])
    assert printed["stored margin LDS"] == pytest.approx(float(np.nanmean(stored)), abs=1e-4)
    # the mean Spearman is the LDS of margins: offsets per target do not change ranks
    assert printed["spearman"] == pytest.approx(float(np.nanmean(stored)), abs=2e-3)
    assert "8 held-out LDS models x 100 test targets" in stdout
    assert out.exists()
    # what the script's plot draws: one point per (LDS model, target), x predicted, y actual
    from examples.predicted_vs_actual import plot

    drawn = plot(predicted, actual, "test", tmp_path / "again.png")
    np.testing.assert_allclose(drawn, np.c_[predicted.ravel(), actual.ravel()], rtol=1e-6)


@pytest.mark.slow
def test_compare_runs_script(digits_run, tmp_path):
    """Two runs' metrics.json side by side: A's numbers as reported, B - A as changed by hand in B's copy."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(digits_run, other)
    metrics = json.loads((other / "report" / "metrics.json").read_text())
    for entry in metrics["forget_sets"].values():
        entry["methods"]["dm_direct"]["klom"]["forget"]["p95"] += 1.0
    (other / "report" / "metrics.json").write_text(json.dumps(metrics))
    original = json.loads((digits_run / "report" / "metrics.json").read_text())
    stdout = run_script("compare_runs.py", str(digits_run), str(other))
    rows = {}
    for line in stdout.splitlines():
        parts = line.rsplit(maxsplit=3)
        if len(parts) == 4 and re.match(r"^[+-]\d", parts[3]):
            fs, method = parts[0].split(maxsplit=1)
            rows[(fs, method.strip())] = tuple(float(v) for v in parts[1:])
    for fs, entry in original["forget_sets"].items():
        for method in TINY_METHODS:
            a, b, diff = rows[(fs, method)]
            assert a == pytest.approx(entry["methods"][method]["klom"]["forget"]["p95"], abs=5e-4)
            assert diff == pytest.approx(1.0 if method == "dm_direct" else 0.0, abs=1e-3)
        assert rows[(fs, "oracle floor")][2] == pytest.approx(0.0, abs=1e-3)
