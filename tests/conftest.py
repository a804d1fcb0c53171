"""Shared fixtures: a real local Ray instance (session-wide), small configs on the embedded MNIST-1D task."""

from __future__ import annotations

import os

import pytest
import torch

from pipelines.config import ExecutorConfig, RecipeConfig, RunConfig, SubsetsConfig, TaskConfig

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
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
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
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


def small_config(tmp_path, *, kind: str = "serial", n_models: int = 12, block: int = 4, epochs: int = 15,
                 keep_params: int = 0) -> RunConfig:
    """A tiny subset run: 200 training + 50 test MNIST-1D examples, a few epochs."""
    return RunConfig(
        name="t", seed=7, run_dir=str(tmp_path / "run"),
        task=TaskConfig(n_train=200, n_test=50, recipe=RecipeConfig(epochs=epochs, batch_size=32)),
        subsets=SubsetsConfig(n_models=n_models, block_size=block, keep_params=keep_params),
        executor=ExecutorConfig(kind=kind, cpus_per_unit=1))
