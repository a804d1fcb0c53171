"""Reuse across runs (pipelines.rundir.reuse): a run reads, read-only, the stores of another run whose config
matches and computes only what differs. A tiny base run (every stage to unlearn, serial executor), then runs that
reuse it: a changed unlearning hyperparameter retrains nothing upstream (links.json, no such stores in the new
directory, training spied on) and recomputes only that method; a changed models.k recomputes the models (and drops
a link made before) while still reusing subsets, datamodels and forget sets; chains resolve to the final store;
an incomplete store is never linked; the base run's files stay byte for byte as they were; `dmu info` lists the
links; a base on the object store is reused from a local run.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from attribution.store import location, normalise_config
from pipelines import open_run
from pipelines.stages import linear
from pipelines.cli import main
from pipelines.config import (
    DatamodelsConfig,
    ForgetSetsConfig,
    ModelsConfig,
    UnlearnConfig,
    to_dict,
)
from pipelines.rundir.reuse import read_links, reuse_store, store_path
from pipelines.stages import RunContext
from tests.conftest import small_config
from tests.pipelines.conftest import run

UPSTREAM = ["subsets", "datamodels", "forget_sets", "models"]
STAGES = UPSTREAM + ["unlearn"]
METHODS = ("do_nothing", "dm_direct", "gradient_ascent")
SETS = ("pc1_top5", "pc2_top5")
CHEAP_LINEAR = functools.partial(linear.linear_experiment, iters=200, seeds=(0,))
UPSTREAM_LINKS = {"subsets.zarr", "datamodels/lasso.zarr", "forget_sets.json", "models.zarr"}


def base_config(run_dir, *, methods=METHODS, **changes):
    """As tests/pipelines/test_object_store.py's tiny run: 200 + 50 MNIST-1D examples, 12 subset models, LASSO
    on 2 target chunks, the two PC top-5 forget sets, K = 2, three methods."""
    cfg = small_config(Path("unused"), n_models=12, block=4, epochs=4)
    return dataclasses.replace(
        cfg, run_dir=str(run_dir),
        datamodels=DatamodelsConfig(n_val=2, n_lds=2, target_chunk=128, n_lambdas=2, lambda_ratio=0.5),
        forget_sets=ForgetSetsConfig(random_sizes=(), full_class=None, pc_top_k=5),
        models=ModelsConfig(k=2, om_target="mean", om_oracles=0, floor_oracles=False, block_size=2),
        unlearn=UnlearnConfig(methods=methods), **changes)


def tree_digest(root) -> dict[str, str]:
    """Every file under `root` (a local directory): relative path -> sha256 of its bytes."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reuse") / "base"
    run(base_config(run_dir), STAGES)
    return run_dir


@pytest.fixture
def no_upstream_training(monkeypatch):
    """Training subset models or full / oracle models fails the test (the serial executor runs units here)."""
    def refuse(*args, **kwargs):
        raise AssertionError("an upstream stage trained models although its store is reused")

    for module in ("subsets", "models"):
        monkeypatch.setattr(f"pipelines.stages.{module}.train_models", refuse)


def refuse_training(*args, **kwargs):
    raise AssertionError("subset models trained although subsets.zarr is reused")


def config_yaml(cfg, path: Path) -> str:
    data = to_dict(cfg)
    del data["run_dir"]
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.slow
def test_changed_hyperparameter_reuses_every_upstream_store(base, tmp_path, monkeypatch, capsys,
                                                            no_upstream_training):
    """Through the CLI: `dmu run CONFIG --reuse BASE` with another gradient_ascent lr."""
    before = tree_digest(base)
    new = tmp_path / "lr"
    hparams = {"gradient_ascent": {"lr": 1e-3}}
    cfg = dataclasses.replace(base_config(new), stages=(*STAGES, "report"),
                              unlearn=UnlearnConfig(methods=METHODS, hparams=hparams))
    monkeypatch.setattr(linear, "linear_experiment", CHEAP_LINEAR)
    assert main(["run", config_yaml(cfg, tmp_path / "lr.yaml"), "--run-dir", str(new), "--reuse", str(base)]) == 0

    links = read_links(new)
    unchanged = {f"unlearned/{fs}/{m}.zarr" for fs in SETS for m in ("do_nothing", "dm_direct")}
    assert set(links) == UPSTREAM_LINKS | unchanged
    assert all(target == location(base / rel) for rel, target in links.items())
    for rel in UPSTREAM_LINKS:  # nothing upstream computed here
        assert not (new / rel).exists(), rel
    assert json.loads((new / "config.json").read_text())["reuse"] == [str(base)]
    for fs in SETS:
        mine = zarr.open_group(str(new / "unlearned" / fs / "gradient_ascent.zarr"), mode="r")
        theirs = zarr.open_group(str(base / "unlearned" / fs / "gradient_ascent.zarr"), mode="r")
        assert mine.attrs["config"]["hparams"]["lr"] == 1e-3 and theirs.attrs["config"]["hparams"] == {}
        assert mine["done"][:].all()
        assert not np.allclose(mine["logits"][:], theirs["logits"][:])
        for m in ("do_nothing", "dm_direct"):
            assert not (new / "unlearned" / fs / f"{m}.zarr").exists()

    metrics = json.loads((new / "report" / "metrics.json").read_text())
    for fs in SETS:
        assert set(METHODS) <= set(metrics["forget_sets"][fs]["methods"])
    assert "lasso" in metrics["datamodels"]
    run_api = open_run(new)
    assert run_api.links == links and run_api.models["full/done"][:].all()
    assert run_api.subsets["masks"].shape == (12, 200) and set(run_api.forget_sets) == set(SETS)
    assert tree_digest(base) == before  # the reused run is only read

    capsys.readouterr()
    assert main(["info", str(new)]) == 0
    out = capsys.readouterr().out
    assert f"{new} reuses, read-only:" in out
    assert f"  models.zarr -> {location(base / 'models.zarr')}" in out
    assert f"  forget_sets.json -> {location(base / 'forget_sets.json')}" in out
    assert "(reused as datamodels/lasso.zarr)" in out
    assert main(["info", "--verify", str(new)]) == 0  # the run's own stores and the reused ones
    out = capsys.readouterr().out
    assert f"{location(base / 'models.zarr')}: ok" in out and "no problems" in out
    ids = tmp_path / "ids.txt"  # a deletion request served from the reused models and datamodels
    ids.write_text("3 17 42")
    assert main(["unlearn", "--run", str(new), "--forget", str(ids), "--method", "dm_direct",
                 "--out", str(tmp_path / "model.pt")]) == 0
    assert "dm_direct on full model 0" in capsys.readouterr().out

    # a third run reusing the second: the links resolve to the base run's stores (a chain), and its own
    # gradient_ascent store is reused from the second run
    third = tmp_path / "third"
    run(dataclasses.replace(cfg, run_dir=str(third), reuse=(str(new),)), STAGES)
    chained = read_links(third)
    for rel in UPSTREAM_LINKS | unchanged:
        assert chained[rel] == location(base / rel), rel
    for fs in SETS:
        assert chained[f"unlearned/{fs}/gradient_ascent.zarr"] == location(new / "unlearned" / fs /
                                                                          "gradient_ascent.zarr")
    assert tree_digest(base) == before


@pytest.mark.slow
def test_changed_models_section_recomputes_models_only(base, tmp_path, monkeypatch):
    before = tree_digest(base)
    new = tmp_path / "k3"
    # first with the base's settings: models.zarr linked too
    run(base_config(new, reuse=(str(base),)), UPSTREAM)
    assert set(read_links(new)) == UPSTREAM_LINKS
    # then models.k = 3 in the same run directory: the models link is dropped and the models trained here,
    # while subsets, datamodels and forget sets stay reused (no subset model trained)
    monkeypatch.setattr("pipelines.stages.subsets.train_models", refuse_training)
    cfg = dataclasses.replace(base_config(new, reuse=(str(base),)),
                              models=ModelsConfig(k=3, om_target="mean", om_oracles=0, floor_oracles=False, block_size=2))
    run(cfg, STAGES)
    links = read_links(new)
    assert set(links) == UPSTREAM_LINKS - {"models.zarr"}
    models = zarr.open_group(str(new / "models.zarr"), mode="r")
    assert models.attrs["k"] == 3 and models["full/done"][:].all()
    assert store_path(new, "models.zarr") == new / "models.zarr"
    for fs in SETS:  # the unlearned stores depend on the models: computed here, for K = 3
        for m in METHODS:
            assert zarr.open_group(str(new / "unlearned" / fs / f"{m}.zarr"), mode="r")["done"].shape == (3,)
    assert not (new / "subsets.zarr").exists() and not (new / "datamodels").exists()
    assert tree_digest(base) == before


@pytest.mark.slow
def test_an_incomplete_or_different_store_is_not_linked(base, tmp_path):
    """A copy of the base run's models.zarr with one model not done: not linked (a stage would resume it, and
    a reused store is never written); done again, it is. Another config: not linked."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(base / "models.zarr", copy / "models.zarr")
    shutil.copy(base / "config.json", copy / "config.json")
    zarr.open_group(str(copy / "models.zarr"), mode="r+")["full/done"][1] = False
    config = zarr.open_group(str(copy / "models.zarr"), mode="r").attrs["config"]
    new = tmp_path / "new"
    ctx = RunContext(cfg=base_config(new, reuse=(str(copy),)), run_dir=new)
    new.mkdir()
    assert not reuse_store(ctx, "models.zarr", config)
    assert not (new / "links.json").exists()
    zarr.open_group(str(copy / "models.zarr"), mode="r+")["full/done"][1] = True
    assert not reuse_store(ctx, "models.zarr", {**config, "seed": 8})
    assert reuse_store(ctx, "models.zarr", normalise_config(config))
    assert read_links(new) == {"models.zarr": location(copy / "models.zarr")}


def test_a_reuse_that_is_no_run_is_one_line(tmp_path, capsys):
    cfg = base_config(tmp_path / "x")
    path = config_yaml(cfg, tmp_path / "x.yaml")
    assert main(["run", path, "--run-dir", str(tmp_path / "x"), "--reuse", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"dmu: error: reuse: {tmp_path / 'nowhere'} is not a run directory (no config.json): name a "
                   "run made by `dmu run`"]
    assert main(["run", path, "--run-dir", str(tmp_path / "x"), "--reuse", str(tmp_path / "x")]) == 2
    assert "is this run's own directory" in capsys.readouterr().err


@pytest.mark.slow
def test_a_base_on_the_object_store_is_reused_from_a_local_run(s3_server, tmp_path, capsys):
    """Subsets, datamodels and forget sets on s3:// (moto); a local run reuses them and computes its models and
    DM-Direct, whose work units read the datamodel rows from the bucket."""
    url = f"s3://{s3_server['bucket']}/reuse-base"
    run(base_config(url, methods=("dm_direct",)), UPSTREAM[:3])
    new = tmp_path / "local"
    run(base_config(new, methods=("dm_direct",), reuse=(url,)), STAGES)
    links = read_links(new)
    assert links == {rel: f"{url}/{rel}" for rel in ("subsets.zarr", "datamodels/lasso.zarr", "forget_sets.json")}
    for fs in SETS:
        assert zarr.open_group(str(new / "unlearned" / fs / "dm_direct.zarr"), mode="r")["done"][:].all()
    assert main(["info", str(new)]) == 0
    assert f"  datamodels/lasso.zarr -> {url}/datamodels/lasso.zarr" in capsys.readouterr().out
