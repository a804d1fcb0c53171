"""A run directory on an object store: the whole pipeline with run_dir s3://..., against a local
S3-compatible server (moto's standalone server on 127.0.0.1, the `s3_server` fixture), writes the same stores
bit for bit as a local run; plain zarr reads them; `dmu info / report / unlearn` take the URL; the datamodels
stage reads and writes the store from Ray worker processes; an unreachable endpoint, missing credentials or a
missing bucket end in one error line and exit status 2.

Credentials and endpoint reach every process through the environment only (AWS_* variables), as on a cluster.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import os
import socket

import aiohttp
import numpy as np
import pytest
import s3fs
import zarr

from attribution.store import as_path, close_object_stores, find_stores, open_group
from pipelines.stages import linear
from pipelines.cli import main
from pipelines.config import DatamodelsConfig, ForgetSetsConfig, ModelsConfig, UnlearnConfig
from pipelines.stages import RunContext, run_stages
from tests.conftest import small_config

STAGES = ["subsets", "datamodels", "forget_sets", "models", "unlearn", "report"]
METHODS = ("do_nothing", "dm_direct", "gradient_ascent")
# The report stage's linear-model experiment, cut to one seed and few iterations (its plot is still written)
CHEAP_LINEAR = functools.partial(linear.linear_experiment, iters=200, seeds=(0,))


def run_config(run_dir: str, tmp_path, *, kind: str = "serial"):
    """small_config (seed 7, 200 + 50 MNIST-1D examples, 12 subset models) through every stage, kept cheap:
    LASSO on 2 target chunks (a short, strongly regularised path), the two PC top-5 forget sets (the PCA reads
    the datamodel store in row blocks), K = 2 full models and oracles, three methods."""
    cfg = small_config(tmp_path, kind=kind, n_models=12, block=4, epochs=4)
    return dataclasses.replace(
        cfg, run_dir=run_dir,
        datamodels=DatamodelsConfig(n_val=2, n_lds=2, target_chunk=128, n_lambdas=2, lambda_ratio=0.5),
        forget_sets=ForgetSetsConfig(random_sizes=(), full_class=None, pc_top_k=5),
        models=ModelsConfig(k=2, om_target="mean", om_oracles=0, floor_oracles=False, block_size=2),
        unlearn=UnlearnConfig(methods=METHODS),
        executor=dataclasses.replace(cfg.executor, num_cpus=2))


def run(cfg, stages) -> RunContext:
    ctx = RunContext(cfg=cfg, run_dir=cfg.resolved_run_dir())
    try:
        run_stages(ctx, stages)
    finally:
        ctx.close()
    return ctx


def plain_zarr(url: str, s3: dict) -> zarr.Group:
    """A store opened as an offline script would, with plain zarr and explicit s3fs options."""
    return zarr.open_group(url, mode="r", storage_options={
        "key": s3["env"]["AWS_ACCESS_KEY_ID"], "secret": s3["env"]["AWS_SECRET_ACCESS_KEY"],
        "client_kwargs": {"endpoint_url": s3["endpoint_url"], "region_name": "us-east-1"}})


def arrays(group: zarr.Group) -> dict[str, zarr.Array]:
    return {name: a for name, a in group.members(max_depth=None) if isinstance(a, zarr.Array)}


@pytest.fixture(scope="module")
def runs(s3_server, tmp_path_factory):
    """The same config run locally (up to unlearn) and on the object store: every stage, the report by
    `dmu report URL` (which runs the report stage on the run's config.json)."""
    tmp = tmp_path_factory.mktemp("object_store")
    url = f"s3://{s3_server['bucket']}/run"
    remote = run(run_config(url, tmp), STAGES[:-1])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(linear, "linear_experiment", CHEAP_LINEAR)
        report_rc = main(["report", url])
    local = run(run_config(str(tmp / "local"), tmp), STAGES[:-1])
    return {"url": url, "remote": remote, "local": local, "s3": s3_server, "report_rc": report_rc}


@pytest.mark.slow
def test_stores_on_s3_equal_a_local_run_bit_for_bit(runs):
    s3, local = runs["s3"], runs["local"].run_dir
    stores = find_stores(local)
    names = sorted(str(p.relative_to(local)) for p in stores)
    assert names == ["datamodels/lasso.zarr", "models.zarr", "subsets.zarr"] + [
        f"unlearned/{fs}/{m}.zarr" for fs in ("pc1_top5", "pc2_top5") for m in sorted(("_retrain_timing", *METHODS))]
    # the object store holds the same stores (found by listing the bucket), complete
    assert sorted(str(p)[len(runs["url"]) + 1:] for p in find_stores(runs["url"])) == names
    for name in names:
        mine = zarr.open_group(str(local / name), mode="r")
        theirs = plain_zarr(f"{runs['url']}/{name}", s3)
        assert dict(theirs.attrs) == dict(mine.attrs), name
        a, b = arrays(mine), arrays(theirs)
        assert sorted(a) == sorted(b), name
        for key in a:
            assert (b[key].shape, b[key].dtype, b[key].chunks, b[key].shards) == \
                (a[key].shape, a[key].dtype, a[key].chunks, a[key].shards), f"{name}/{key}"
            if key == "seconds" or key.endswith("/seconds"):  # wall-clock times
                continue
            np.testing.assert_array_equal(b[key][...], a[key][...], err_msg=f"{name}/{key}")
        done = [key for key in a if key == "done" or key.endswith("/done")]
        assert done and all(np.asarray(b[key][...]).all() for key in done), name
    fs = s3fs.S3FileSystem()
    bucket_run = runs["url"].removeprefix("s3://")
    assert json.loads(fs.cat(f"{bucket_run}/forget_sets.json")) == json.loads(
        (local / "forget_sets.json").read_text())
    config = json.loads(fs.cat(f"{bucket_run}/config.json"))
    assert config["run_dir"] == runs["url"]
    assert not fs.exists(f"{bucket_run}/forget_sets.tmp")  # written in one PUT, no temporary object


@pytest.mark.slow
def test_report_written_to_the_bucket(runs):
    assert runs["report_rc"] == 0
    fs = s3fs.S3FileSystem()
    report = runs["url"].removeprefix("s3://") + "/report"
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(report)) == [
        "klom_distributions.png", "klom_vs_cost.json", "klom_vs_cost.png", "linear.png", "metrics.json", "report.md"]
    metrics = json.loads(fs.cat(f"{report}/metrics.json"))
    assert metrics["run"] == "run" and sorted(metrics["forget_sets"]) == ["pc1_top5", "pc2_top5"]
    assert sorted(metrics["forget_sets"]["pc1_top5"]["methods"]) == sorted(METHODS)
    assert "pc1_top5" in fs.cat(f"{report}/report.md").decode()
    # the Figure-2 plot's data beside it: per method, (cost fraction, forget KLOM p99) from metrics.json
    drawn = json.loads(fs.cat(f"{report}/klom_vs_cost.json"))
    for name, entry in metrics["forget_sets"].items():
        curves = drawn[name]["forget"]["curves"]
        assert sorted(curves) == sorted(METHODS)
        for method, m in entry["methods"].items():
            assert curves[method] == [[m["cost"]["passes_fraction"], pytest.approx(m["klom"]["forget"]["p99"])]]
    for png in ("klom_distributions.png", "klom_vs_cost.png", "linear.png"):
        assert fs.size(f"{report}/{png}") > 0
    assert not fs.exists(f"{report}/metrics.tmp")


@pytest.mark.slow
def test_dmu_info_and_unlearn_take_the_url(runs, tmp_path, capsys):
    assert main(["info", runs["url"]]) == 0
    out = capsys.readouterr().out
    assert f"{runs['url']}/subsets.zarr  [subsets]" in out
    assert "complete: 12/12 rows (100.0%)" in out  # subsets
    assert "complete full: 2/2 rows (100.0%)" in out  # models
    assert out.count("  [unlearned]") == 6
    assert main(["info", "--json", f"{runs['url']}/datamodels/lasso.zarr"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["completion"]["."] == [2, 2] and info["bytes_on_disk"] > 0
    # a deletion request served from the stores on the object store (the checkpoint is a local file)
    ids = tmp_path / "ids.txt"
    ids.write_text("3 17 42")
    out = tmp_path / "model.pt"
    assert main(["unlearn", "--run", runs["url"], "--forget", str(ids), "--method", "dm_direct",
                 "--out", str(out)]) == 0
    assert out.exists() and "dm_direct on full model 0" in capsys.readouterr().out


@pytest.fixture
def ray_with_s3_env(s3_server, request):
    """The ray_local instance, started after the object store's variables are in the environment: Ray's
    worker processes inherit the environment of the process that started Ray, so a Ray already running (from an
    earlier test, without the AWS variables) is shut down and started again; it is shut down afterwards, so
    later tests start one without them."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield request.getfixturevalue("ray_local")
    ray.shutdown()


@pytest.mark.ray
def test_datamodels_on_ray_workers_read_and_write_s3(runs, ray_with_s3_env, tmp_path):
    """The LASSO datamodels of the run's subset models, fit again by Ray workers that read subsets.zarr and
    write their own chunks of datamodels/lasso.zarr on the object store: the same bits as the serial fit."""
    fs = s3fs.S3FileSystem()
    bucket = runs["s3"]["bucket"]
    fs.copy(f"{bucket}/run/subsets.zarr", f"{bucket}/ray/subsets.zarr", recursive=True)
    cfg = run_config(f"s3://{bucket}/ray", tmp_path, kind="ray")
    ctx = RunContext(cfg=cfg, run_dir=cfg.resolved_run_dir())
    try:
        run_stages(ctx, ["datamodels"])
        stats = ctx.executor.unit_stats
    finally:
        ctx.close()
    # LASSO target chunks (2 units; masks form: 10 fit + validation models for 200 points, no Gram units), each in
    # a Ray worker process, not the driver
    assert sorted(s["fn"] for s in stats) == ["fit_lasso_chunk", "fit_lasso_chunk"]
    assert all(s["pid"] != os.getpid() for s in stats)
    serial = plain_zarr(f"s3://{bucket}/run/datamodels/lasso.zarr", runs["s3"])
    on_ray = plain_zarr(f"s3://{bucket}/ray/datamodels/lasso.zarr", runs["s3"])
    assert on_ray["done"][:].all() and on_ray.attrs["solver"]["form"] == "masks"
    for key in arrays(serial):
        np.testing.assert_array_equal(on_ray[key][...], serial[key][...], err_msg=key)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


@pytest.fixture
def fresh_s3fs():
    """s3fs filesystems built from the environment as a test changes it (fsspec caches them per process)."""
    close_object_stores()
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    close_object_stores()
    s3fs.S3FileSystem.clear_instance_cache()


def config_file(tmp_path) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text("name: tiny\ntask: {n_train: 200, n_test: 50}\nsubsets: {n_models: 4, block_size: 4}\n"
                    "executor: {kind: serial}\n")
    return str(path)


@pytest.mark.parametrize("problem", ["missing bucket", "wrong endpoint", "no credentials"])
def test_unreachable_store_is_one_line_and_exit_2(s3_server, tmp_path, monkeypatch, capsys, fresh_s3fs,
                                                  problem):
    bucket = s3_server["bucket"]
    if problem == "missing bucket":
        bucket, expected = "no-such-bucket", "bucket 'no-such-bucket' does not exist"
    elif problem == "wrong endpoint":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's retries: seconds each otherwise
        expected = "not reachable (EndpointConnectionError: Could not connect to the endpoint URL"
    else:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(key)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        expected = "not reachable (NoCredentialsError: Unable to locate credentials)"
    url = f"s3://{bucket}/nowhere"
    for argv in (["run", config_file(tmp_path), "--run-dir", url], ["info", url], ["report", url],
                 ["unlearn", "--run", url, "--forget", "ids.txt", "--method", "dm_direct", "--out", "m.pt"]):
        assert main(argv) == 2, argv
        line = error_line(capsys)
        assert line.startswith(f"dmu: error: object store {url}") and expected in line, line
        assert "AWS_ENDPOINT_URL" in line and "AWS_ACCESS_KEY_ID" in line, line
    if problem == "missing bucket":
        assert not s3fs.S3FileSystem().exists("no-such-bucket")  # never created by dmu


def test_info_of_an_empty_prefix(s3_server, capsys):
    url = f"s3://{s3_server['bucket']}/empty"
    assert main(["info", url]) == 2
    assert error_line(capsys) == f"dmu: error: no Zarr store at or under {url}: pass a store " \
                                 "(runs/demo/subsets.zarr) or a run dir"
    assert main(["report", url]) == 2
    assert "is not a run directory (no config.json)" in error_line(capsys)


def test_object_store_sessions_are_closed_not_left_to_finalizers(s3_server, fresh_s3fs):
    """s3fs's own finalizer gives a session 0.1 s to close, and a loaded machine then left it open: aiohttp printed
    "Unclosed client session" at exit. close_object_stores (run at exit once an object store was used) closes
    every session of the filesystems dmu opened, as_path's and zarr's alike."""

    def open_sessions() -> int:
        gc.collect()
        return sum(type(o) is aiohttp.ClientSession and not o.closed for o in gc.get_objects())

    before = open_sessions()
    url = f"s3://{s3_server['bucket']}/sessions/s.zarr"
    as_path(url).fs.ls(s3_server["bucket"])  # as_path's filesystem
    group = open_group(url, mode="w")  # zarr's own (asynchronous) filesystem
    group.create_array("x", shape=(2,), dtype="float32")[:] = 1.0
    assert open_sessions() > before
    close_object_stores()
    assert open_sessions() == before
    np.testing.assert_array_equal(open_group(url, mode="r")["x"][:], 1.0)  # a later use opens a new session
    close_object_stores()
