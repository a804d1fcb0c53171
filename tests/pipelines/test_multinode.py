"""The pipeline on a two-node Ray cluster (ray.cluster_utils.Cluster, one CPU per node, on this machine): the
subsets, datamodels, models and unlearn stages run their units on both nodes and store exactly the numbers of an
in-process (serial) run."""

import dataclasses

import numpy as np
import pytest
import zarr

from pipelines.config import DatamodelsConfig, ExecutorConfig, ForgetSetsConfig, ModelsConfig, UnlearnConfig
from pipelines.stages import RunContext, run_stages
from tests.conftest import small_config

STAGES = ["subsets", "datamodels", "forget_sets", "models", "unlearn"]


def tiny_config(tmp_path, kind: str):
    cfg = small_config(tmp_path, kind=kind, n_models=24, block=4, epochs=4)
    return dataclasses.replace(
        cfg,
        datamodels=DatamodelsConfig(n_val=4, n_lds=4, n_lambdas=4, lambda_ratio=0.5, target_chunk=128),
        forget_sets=ForgetSetsConfig(random_sizes=(10,), full_class=None),
        models=ModelsConfig(k=2, om_target="mean", om_oracles=0, floor_oracles=False, block_size=1),
        unlearn=UnlearnConfig(methods=("dm_direct", "dm_matching", "gradient_descent"),
                              hparams={"dm_matching": {"epochs": 1}, "gradient_descent": {"epochs": 1}}),
        executor=ExecutorConfig(kind=kind, cpus_per_unit=1))


def arrays(run_dir) -> dict[str, np.ndarray]:
    """Every array of every store of a run, by store and array name."""
    out = {}
    for store in sorted(run_dir.glob("**/*.zarr")):
        group = zarr.open_group(str(store), mode="r")
        for name, arr in group.members(max_depth=None):
            if isinstance(arr, zarr.Array) and not name.endswith("seconds"):  # wall-clock times differ
                out[f"{store.relative_to(run_dir)}/{name}"] = arr[:]
    return out


@pytest.mark.ray
def test_two_node_cluster_equals_serial_bit_for_bit(tmp_path, ray_cluster):
    cluster, node_ids = ray_cluster
    serial_cfg = tiny_config(tmp_path / "serial", "serial")
    run_stages(RunContext(cfg=serial_cfg, run_dir=serial_cfg.resolved_run_dir()), STAGES)

    cfg = tiny_config(tmp_path / "cluster", "ray")
    ctx = RunContext(cfg=cfg, run_dir=cfg.resolved_run_dir(), address=cluster.address)
    try:
        run_stages(ctx, STAGES)
        stats = list(ctx.executor.unit_stats)
    finally:
        ctx.close()

    nodes_by_fn: dict[str, set] = {}
    for s in stats:
        nodes_by_fn.setdefault(s["fn"], set()).add(s["node"])
        assert s["peak_rss_bytes"] and s["peak_rss_bytes"] > 0  # measured inside the unit
    for fn in ("train_subset_block", "fit_lasso_chunk", "train_ensemble_block", "unlearn_block"):
        assert nodes_by_fn[fn] == set(node_ids), (fn, nodes_by_fn)  # units ran on both worker nodes
    assert "gram_rows" not in nodes_by_fn  # LASSO in masks form: 20 fit + validation models for N = 200, no Gram

    a, b = arrays(serial_cfg.resolved_run_dir()), arrays(cfg.resolved_run_dir())
    assert sorted(a) == sorted(b)
    assert any(k.startswith("unlearned/") for k in a) and any(k.startswith("datamodels/") for k in a)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
