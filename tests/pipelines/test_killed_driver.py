"""Reliability: every stage survives a killed driver. `dmu run CFG --stages <stage>` runs on a
real local Ray in a subprocess (its own process group); once the stage's store has some units done and not all, the
whole group gets SIGKILL (driver, Ray's processes, workers: nothing unwinds, the lock stays). A rerun of the same
command takes the dead driver's lock over with a warning, redoes only the units not done, and leaves the stage's
store(s) bit for bit equal to an uninterrupted run of the same config (every array but `seconds`, wall-clock times).

The run (MNIST-1D, 100 training + 28 test examples) is built once per module in-process with the serial executor:
those stores are the uninterrupted reference (units are deterministic however they are scheduled, docs/design.md),
and each test copies the run into its own directory and deletes the store of the stage under test before running
it."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
import zarr

from pipelines.config import (
    DatamodelsConfig,
    ExecutorConfig,
    ForgetSetsConfig,
    ModelsConfig,
    UnlearnConfig,
    to_dict,
)
from pipelines.rundir.lock import LOCK_NAME
from pipelines.stages import RunContext, run_stages
from tests.conftest import small_config

REPO = Path(__file__).resolve().parents[2]
TARGET_CHUNK = 16  # 128 targets: 8 LASSO target chunks
METHODS = ("do_nothing", "dm_direct", "gradient_descent")
PROGRESS = {"datamodels": "LASSO datamodels (lasso)", "models": "full + oracle models", "unlearn": "unlearning"}

pytestmark = pytest.mark.ray


def tiny_config(run_dir: Path, kind: str):
    """40 subset models, LASSO in 8 target chunks, 3 forget sets, K = 4 with 1 OM oracle and the floor oracles
    (31 models, one per unit), 3 cheap unlearning methods (36 units, one model each)."""
    cfg = small_config(run_dir.parent, n_models=40, block=8, epochs=8)
    return dataclasses.replace(
        cfg, run_dir=str(run_dir),
        task=dataclasses.replace(cfg.task, n_train=100, n_test=28),
        datamodels=DatamodelsConfig(n_val=8, n_lds=8, n_lambdas=4, lambda_ratio=0.3, target_chunk=TARGET_CHUNK),
        forget_sets=ForgetSetsConfig(random_sizes=(10, 20), full_class=0),
        models=ModelsConfig(k=4, om_target="mean", om_oracles=1, block_size=1),
        unlearn=UnlearnConfig(methods=METHODS, hparams={"gradient_descent": {"epochs": 40}}),
        executor=ExecutorConfig(kind=kind, num_cpus=2, cpus_per_unit=1))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The whole run up to unlearn, uninterrupted, in-process (serial executor): the reference stores."""
    run_dir = tmp_path_factory.mktemp("killed_driver") / "reference"
    cfg = tiny_config(run_dir, "serial")
    ctx = RunContext(cfg=cfg, run_dir=cfg.resolved_run_dir())
    try:
        run_stages(ctx, ["subsets", "datamodels", "forget_sets", "models", "unlearn"])
    finally:
        ctx.close()
    return run_dir


def stage_stores(run_dir: Path, stage: str) -> list[Path]:
    if stage == "datamodels":
        return [run_dir / "datamodels" / "lasso.zarr"]
    if stage == "models":
        return [run_dir / "models.zarr"]
    return sorted(p for p in (run_dir / "unlearned").glob("*/*.zarr") if not p.name.startswith("_"))  # not timing


def progress(run_dir: Path, stage: str) -> tuple[int, int | None]:
    """(items done, items in all) of the stage's store(s) as the driver has flagged them so far (targets for
    datamodels, models for models and unlearn); total None while the stores are not all there yet."""
    if stage == "datamodels":
        group = zarr.open_group(str(run_dir / "datamodels" / "lasso.zarr"), mode="r")
        done = np.asarray(group["done"][:])
        n_targets = group["weights"].shape[1]
        sizes = np.minimum(TARGET_CHUNK, n_targets - TARGET_CHUNK * np.arange(len(done)))
        return int(sizes[done].sum()), n_targets
    if stage == "models":
        group = zarr.open_group(str(run_dir / "models.zarr"), mode="r")
        flags = [np.asarray(group["full/done"][:])]
        flags += [np.asarray(group[f"oracle/{fs}/done"][:]) for fs in group["oracle"].group_keys()]
        return int(sum(f.sum() for f in flags)), sum(len(f) for f in flags)
    stores = stage_stores(run_dir, stage)
    flags = [np.asarray(zarr.open_group(str(s), mode="r")["done"][:]) for s in stores]
    complete = len(stores) == 3 * len(METHODS)  # 3 forget sets: the stage creates every store before any unit
    return int(sum(f.sum() for f in flags)), sum(len(f) for f in flags) if complete else None


def arrays(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    out = {}
    for name, array in group.arrays():
        out[name] = np.asarray(array[...])
    for name, sub in group.groups():
        out.update({f"{name}/{k}": v for k, v in arrays(path / name).items()})
    return out


def assert_same_stores(run_dir: Path, reference: Path, stage: str) -> None:
    ours, theirs = stage_stores(run_dir, stage), stage_stores(reference, stage)
    assert [p.relative_to(run_dir) for p in ours] == [p.relative_to(reference) for p in theirs]
    for mine, ref in zip(ours, theirs):
        a, b = arrays(mine), arrays(ref)
        assert sorted(a) == sorted(b), mine
        for name in a:
            if name.split("/")[-1] == "seconds":  # wall-clock times
                continue
            assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, (mine, name)
            assert a[name].tobytes() == b[name].tobytes(), f"{mine.relative_to(run_dir)}/{name} differs from an " \
                                                           f"uninterrupted run"


def initial_count(stderr: str, stage: str) -> tuple[int, int]:
    """The first progress line of the stage's bar: (items already done when it started, items in all)."""
    match = re.search(re.escape(PROGRESS[stage]) + r":\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)", stderr)
    assert match, f"no progress line {PROGRESS[stage]!r} in the rerun's stderr:\n{stderr[-3000:]}"
    return int(match.group(1)), int(match.group(2))


def ray_processes(pid: int) -> dict[psutil.Process, str]:
    """The descendants of process `pid` (the local Ray it started: gcs_server, raylet, workers) and their names."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    out = {}
    for p in children:
        try:
            out[p] = p.name()
        except psutil.NoSuchProcess:
            pass
    return out


def prepare(tmp_path: Path, reference: Path, stage: str) -> tuple[Path, list[str], dict]:
    """A copy of the reference run without the stage's store(s), its config with executor.kind ray, the command
    and environment of `dmu run` for the stage."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    for store in stage_stores(run_dir, stage):
        shutil.rmtree(store)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(to_dict(tiny_config(run_dir, "ray"))))
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)  # a local Ray started by the driver (and killed with it)
    return run_dir, [sys.executable, "-m", "pipelines.cli", "run", str(cfg_path), "--stages", stage], env


def kill_mid_stage(command: list[str], env: dict, run_dir: Path, stage: str) -> tuple[int, int]:
    """Start the run in its own process group, SIGKILL the group once the stage has some units done and not all;
    check that nothing of it (Ray's processes included) is left. Returns the stage's (done, total) after the kill."""
    log = run_dir.parent / "killed.stderr"  # a file, not a pipe: a full pipe would stall the driver
    with log.open("w") as stderr:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                                start_new_session=True)
    children: dict[psutil.Process, str] = {}
    seen = (0, None)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            children.update(ray_processes(proc.pid))
            try:  # the driver may be creating the store or writing a flag as we read
                seen = progress(run_dir, stage)
            except Exception:  # noqa: BLE001 (not there yet, or half-written: read again)
                time.sleep(0.2)
                continue
            if seen[1] is not None and 0 < seen[0] < seen[1]:
                break
            time.sleep(0.2)
        assert proc.poll() is None, (f"inconclusive: the {stage} stage ended (exit {proc.returncode}, last seen "
                                     f"{seen}) before it could be killed mid-stage: make its workload larger\n"
                                     f"{log.read_text()[-3000:]}")
        children.update(ray_processes(proc.pid))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert "raylet" in children.values(), f"no local Ray started by the run? its processes: {set(children.values())}"
    # nothing of that run is left: Ray's processes (gcs_server, raylet, workers) were in the driver's group or die
    # with it; what lingers is ended here (by pid: they are this test's) and fails the test
    _, alive = psutil.wait_procs(list(children), timeout=20)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    assert not alive, f"processes of the killed run still alive: {[(p.pid, children[p]) for p in alive]}"
    assert (run_dir / LOCK_NAME).exists()  # SIGKILL: the lock was not released
    done, total = progress(run_dir, stage)
    assert total is not None and 0 < done < total, (f"inconclusive: the kill landed after the {stage} stage had "
                                                    f"finished ({done}/{total}): make its workload larger")
    return done, total


@pytest.mark.parametrize("stage", ["datamodels", "models", "unlearn"])
def test_killed_driver_then_rerun_equals_uninterrupted(tmp_path, reference, stage):
    run_dir, command, env = prepare(tmp_path, reference, stage)
    done, total = kill_mid_stage(command, env, run_dir, stage)
    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
                           start_new_session=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "taking over the lock" in rerun.stderr and "which is gone" in rerun.stderr
    assert not (run_dir / LOCK_NAME).exists()
    # only what was not done is redone: the bar starts at what the killed run had flagged done
    assert initial_count(rerun.stderr, stage) == (done, total)
    assert progress(run_dir, stage) == (total, total)
    assert_same_stores(run_dir, reference, stage)
