"""Shared fixtures and helpers: a real local Ray instance (session-wide), a local S3-compatible server, small
configs on the embedded MNIST-1D task, the tiny digits run of examples/ (`digits_run`)."""

from __future__ import annotations

import logging
import os
import socket
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from attribution.store import close_object_stores
from pipelines.config import ExecutorConfig, RecipeConfig, RunConfig, SubsetsConfig, TaskConfig

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """A test on a real Ray cluster (marker `ray`) is `slow` too: Ray's start-up alone takes seconds. Without a
    GPU, the `cuda` tests are skipped."""
    for item in items:
        if "ray" in item.keywords:
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def ray_local():
    """A real local Ray instance with 2 CPUs and no dashboard, shared by the tests that are about distribution
    (started once; a multi-node test that needs another cluster shuts it down, and the next user restarts it)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray


@pytest.fixture
def ray_cluster():
    """A two-node Ray cluster on this machine (ray.cluster_utils.Cluster): a head without CPUs, so every unit
    runs on one of two worker nodes with one CPU each."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, [n.node_id for n in nodes]
    if ray.is_initialized():
        ray.shutdown()
    cluster.shutdown()


S3_BUCKET = "dmu-test"


@pytest.fixture(scope="module")
def s3_server():
    """A local S3-compatible server for the module's tests: moto's standalone server on 127.0.0.1 (as s3fs's
    own tests use), with the bucket S3_BUCKET. While the module runs, the environment holds what a cluster node
    would: fake credentials, region and endpoint in the AWS variables (and no profile or other endpoint that
    could point elsewhere); restored afterwards. Yields {"endpoint_url", "bucket", "env"}.

    fsspec caches filesystem instances (with their endpoint) per process: a test that changes the environment
    clears `s3fs.S3FileSystem`'s instance cache before and after."""
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # moto keeps its buckets per process, not per server: start empty after another module's server
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).close()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3",
                        "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
                mp.delenv(key, raising=False)
            for key, value in env.items():
                mp.setenv(key, value)
            close_object_stores()
            s3fs.S3FileSystem.clear_instance_cache()
            s3fs.S3FileSystem().mkdir(S3_BUCKET)  # cached (this environment's): closed with the others
            yield {"endpoint_url": endpoint, "bucket": S3_BUCKET, "env": env}
            close_object_stores()  # before the cache forgets them (else aiohttp may complain at exit)
            s3fs.S3FileSystem.clear_instance_cache()
    finally:
        server.stop()


def small_config(tmp_path, *, kind: str = "serial", n_models: int = 12, block: int = 4, epochs: int = 15,
                 keep_params: int = 0) -> RunConfig:
    """A tiny subset run: 200 training + 50 test MNIST-1D examples, a few epochs."""
    return RunConfig(
        name="t", seed=7, run_dir=str(tmp_path / "run"),
        task=TaskConfig(n_train=200, n_test=50, recipe=RecipeConfig(epochs=epochs, batch_size=32)),
        subsets=SubsetsConfig(n_models=n_models, block_size=block, keep_params=keep_params),
        executor=ExecutorConfig(kind=kind, cpus_per_unit=1))


# ---- the tiny digits run (examples/), shared by tests/test_examples.py and tests/pipelines/test_api.py --------

ROOT = Path(__file__).resolve().parents[1]
TINY_METHODS = ["do_nothing", "dm_direct", "gradient_ascent"]

# What the tiny run changes in examples/digits.yaml: 200 + 100 images, 4 epochs, 32 subset models (20 fit, 4
# validation, 8 LDS), K = 2, two forget sets, three cheap methods, in-process.
TINY = {
    "task": {"n_train": 200, "n_test": 100, "recipe": {"epochs": 4}},
    "subsets": {"n_models": 32, "block_size": 8},
    # 20 fit models for 200 points: a short λ path (the dense end converges slowly and is never chosen here)
    "datamodels": {"n_val": 4, "n_lds": 8, "n_lambdas": 6, "lambda_ratio": 0.3, "target_chunk": 128},
    "forget_sets": {"random_sizes": [10], "full_class": 0, "pc_top_k": 0},
    "models": {"k": 2, "om_target": "mean", "om_oracles": 1, "block_size": 2},
    "unlearn": {"methods": TINY_METHODS},
    "executor": {"kind": "serial"},
}


def tiny_digits_config(path: Path) -> Path:
    """examples/digits.yaml with the TINY overrides, written to `path`."""
    cfg = yaml.safe_load((ROOT / "examples" / "digits.yaml").read_text())
    for section, values in TINY.items():
        for key, value in values.items():
            if isinstance(value, dict):
                cfg[section].setdefault(key, {}).update(value)
            else:
                cfg[section][key] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """The run directory of the tiny digits pipeline, every stage done through `dmu run` (built once)."""
    from pipelines.cli import main

    base = tmp_path_factory.mktemp("digits")
    run_dir = base / "run"
    assert main(["run", str(tiny_digits_config(base / "digits_tiny.yaml")), "--run-dir", str(run_dir)]) == 0
    return run_dir
