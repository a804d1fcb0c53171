"""Reliability: one `dmu run` per run directory (the lock), a bad cluster address fails fast, SIGTERM
unwinds as Ctrl-C and a rerun resumes, a store's creation is complete before it is declared, read-only arrays."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from attribution import subsets as subsets_store
from attribution.masks import sample_masks
from attribution.store import StoreError, exists
from pipelines.cli import main
from pipelines.config import to_dict
from pipelines.rundir.lock import LOCK_NAME, RunLock
from tests.conftest import small_config
from tests.pipelines.conftest import InterruptAfter, run_subsets

REPO = Path(__file__).resolve().parents[2]


def write_config(tmp_path, **kwargs) -> tuple[Path, object]:
    """small_config as a YAML file (what `dmu run` reads); returns the file and the config."""
    cfg = small_config(tmp_path, **kwargs)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return path, cfg


def write_lock(run_dir: Path, pid: int, host: str | None = None) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {"host": host or socket.gethostname(), "pid": pid, "started": "2026-01-01T00:00:00+0000"}
    (run_dir / LOCK_NAME).write_text(json.dumps(holder))
    return holder


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- 1. one run per directory ---------------------------------------------------------------------------------

def test_live_lock_refuses_with_one_line(tmp_path, capsys):
    cfg_path, cfg = write_config(tmp_path, n_models=4, epochs=1)
    run_dir = Path(cfg.run_dir)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        write_lock(run_dir, sleeper.pid)
        assert main(["run", str(cfg_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pid {sleeper.pid}" in err[0] and socket.gethostname() in err[0]
        assert "2026-01-01T00:00:00" in err[0]
        assert not exists(run_dir / "subsets.zarr")  # nothing was touched
        assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == sleeper.pid  # the holder's lock stays
    finally:
        sleeper.kill()
        sleeper.wait()


def test_lock_of_another_host_refuses(tmp_path, capsys):
    cfg_path, cfg = write_config(tmp_path, n_models=4, epochs=1)
    write_lock(Path(cfg.run_dir), 12345, host="some-other-node")
    assert main(["run", str(cfg_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "some-other-node" in err[0] and "12345" in err[0] and LOCK_NAME in err[0]


def test_stale_lock_is_taken_over_and_released(tmp_path, capsys, caplog):
    cfg_path, cfg = write_config(tmp_path, n_models=4, epochs=1)
    run_dir = Path(cfg.run_dir)
    pid = dead_pid()
    write_lock(run_dir, pid)
    assert main(["run", str(cfg_path)]) == 0
    warning = [r.getMessage() for r in caplog.records if "taking over" in r.getMessage()]
    assert len(warning) == 1 and f"pid {pid}" in warning[0]
    assert zarr.open_group(str(run_dir / "subsets.zarr"), mode="r")["done"][:].all()
    assert not (run_dir / LOCK_NAME).exists()  # released at the end of a normal run


def test_lock_released_after_an_error(tmp_path, capsys):
    cfg_path, cfg = write_config(tmp_path, n_models=4, epochs=1)
    assert main(["run", str(cfg_path), "--stages", "subsets,nonsense"]) == 2
    assert "unknown stage" in capsys.readouterr().err
    assert not (Path(cfg.run_dir) / LOCK_NAME).exists()


def test_lock_is_exclusive_in_process(tmp_path):
    with RunLock(tmp_path / "run") as lock:
        holder = json.loads(lock.path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["started"]
        with pytest.raises(StoreError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run" / LOCK_NAME).exists()


# --- 2. bad cluster address, SIGTERM --------------------------------------------------------------------------

def test_bad_cluster_address_fails_fast(tmp_path, capsys):
    import ray

    if ray.is_initialized():  # a Ray left by an earlier test would be used instead of joining (ray_local restarts)
        ray.shutdown()
    cfg_path, cfg = write_config(tmp_path, kind="ray", n_models=4, epochs=1)
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    assert main(["run", str(cfg_path), "--address", address]) == 2
    assert time.monotonic() - start < 60
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and address in err[0] and "ray status" in err[0] and "RAY_ADDRESS" in err[0]
    assert not (Path(cfg.run_dir) / LOCK_NAME).exists()


@pytest.mark.slow
def test_hanging_join_exits_within_its_timeout(tmp_path):
    """Something that is not a Ray head listens at the address: the probe passes, ray.init hangs; the watchdog
    prints one line, runs the exit hooks (the lock's release) and exits 2 (in a subprocess: it ends the process)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        address = f"127.0.0.1:{server.getsockname()[1]}"
        lock = tmp_path / "run" / LOCK_NAME
        code = (f"import ray; from pipelines.rundir.lock import RunLock; from pipelines.engine.executor import connect_ray\n"
                f"RunLock({str(tmp_path / 'run')!r}).acquire()\nconnect_ray(ray, {address!r}, timeout=5)\n"
                f"print('returned')")
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
                              env={**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""})
    assert proc.returncode == 2 and time.monotonic() - start < 60 and "returned" not in proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dmu: error: no Ray cluster answered at " + address) and "ray status" in last
    assert not lock.exists()


@pytest.mark.slow
def test_sigterm_unwinds_and_a_rerun_resumes(tmp_path):
    full = run_subsets(small_config(tmp_path / "full", n_models=16, epochs=40))
    cfg_path, cfg = write_config(tmp_path / "term", n_models=16, epochs=40)
    store = Path(cfg.run_dir) / "subsets.zarr"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", str(cfg_path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:  # the driver may be writing the flags as we read
                if zarr.open_group(str(store), mode="r")["done"][:].any():
                    break
            except Exception:  # noqa: BLE001, S110 (a half-written flag: read again)
                pass
            time.sleep(0.2)
        assert proc.poll() is None, "the run finished before it could be interrupted: make it longer"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("dmu: terminated (SIGTERM)")
    assert not (Path(cfg.run_dir) / LOCK_NAME).exists()
    done = zarr.open_group(str(store), mode="r")["done"][:]
    assert 0 < done.sum() < 16
    rerun = InterruptAfter(None)
    resumed = run_subsets(cfg, rerun)
    pending = [(s, s + 4) for s in range(0, 16, 4) if not done[s:s + 4].all()]
    assert rerun.units == pending  # only what was not done
    np.testing.assert_array_equal(resumed["logits"][:], full["logits"][:])
    np.testing.assert_array_equal(resumed["masks"][:], full["masks"][:])


# --- 3. crash-safe creation -----------------------------------------------------------------------------------

def create(path, **overrides):
    kwargs = {"n_models": 8, "n_train": 30, "n_targets": 40, "n_classes": 3, "alpha": 0.5, "seed": 3,
              "block_size": 4, "keep_params": 0, "n_params": 5, "config": {"seed": 3}, "attrs": {}, **overrides}
    return subsets_store.create_store(path, **kwargs)


def test_crash_during_creation_is_repaired(tmp_path, monkeypatch):
    path = tmp_path / "subsets.zarr"

    def crash(*args, **kwargs):
        raise RuntimeError("killed while writing the masks")

    monkeypatch.setattr(subsets_store, "sample_masks", crash)
    with pytest.raises(RuntimeError, match="killed"):
        create(path)
    assert (path / "zarr.json").exists() and not exists(path)  # there, but not declared
    monkeypatch.undo()
    group = create(path)
    np.testing.assert_array_equal(group["masks"][:], sample_masks(8, 30, 0.5, 3))
    assert group.attrs["kind"] == "subsets" and not group["done"][:].any()
    again = create(path)  # a declared store is opened, not recreated
    np.testing.assert_array_equal(again["masks"][:], sample_masks(8, 30, 0.5, 3))


# --- 4. read-only arrays --------------------------------------------------------------------------------------

def test_read_only_arrays_give_no_warning():
    # in a fresh process: torch warns about a non-writable array once per process, so an earlier test that
    # triggered it would hide the warning here
    code = """
import warnings

import numpy as np
import torch

from unlearning.base import UnlearnData, as_float_tensor, check_forget_idx

x = np.arange(12, dtype=np.float32).reshape(4, 3)
y = np.array([0, 1, 0, 1])
idx = np.array([2, 0])
for a in (x, y, idx):
    a.setflags(write=False)
with warnings.catch_warnings():
    warnings.simplefilter("error")
    data = UnlearnData(x, y)
    t = as_float_tensor("x", x, (None, 3), torch.device("cpu"))
    forget = check_forget_idx(idx, 4)
    sub = data.subset(idx)
assert torch.equal(data.x, torch.from_numpy(x.copy())) and torch.equal(t, data.x)
assert forget.tolist() == [2, 0] and sub.y.tolist() == [0, 0]
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
