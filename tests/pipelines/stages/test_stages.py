"""The stages forget_sets, models and unlearn on a tiny MNIST-1D run (200 training + 50 test examples,
K = 2), checked against hand computations: numpy / scikit-learn for the forget sets, direct retraining with
the training engine for the models (and the floor oracles leaving the other rows bit for bit as they were), the
datamodel formula for DM-Direct. The run (`build_run`, tests/pipelines/conftest.py) is the one the CLI, tune and
property tests build too.
"""

import dataclasses
import json

import numpy as np
import pytest
import zarr
from sklearn.decomposition import PCA

from attribution.masks import model_seeds
from attribution.store import StoreError
from pipelines.cli import main
from pipelines.config import ConfigError, ForgetSetsConfig, ModelsConfig, UnlearnConfig
from pipelines.stages import RunContext, run_stages
from attribution.svd import principal_component_scores
from pipelines.rundir import layout
from pipelines.rundir.layout import om_targets, oracle_rows
from pipelines.rundir.seeds import FULL_STREAM, oracle_stream
from pipelines.stages.forget_sets import class_forget_set, pc_forget_sets, random_forget_set
from pipelines.tasks import get_task
from pipelines.engine.training import load_state_vector, predict_logits, train_models
from tests.pipelines.conftest import (ALL_METHODS, K, InterruptAfter, build_run, run, stage_config,
                                     write_datamodels)

OM_ORACLES = K  # models.om_target "own": one Oracle Matching oracle per full model
N_ORACLES = 2 * K + OM_ORACLES  # per forget set: K reference, OM_ORACLES for Oracle Matching, K floor oracles


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("stages"))


def models_store(ctx):
    return zarr.open_group(str(ctx.run_dir / "models.zarr"), mode="r")


def unlearned_store(ctx, fs, method):
    return zarr.open_group(str(ctx.run_dir / "unlearned" / fs / f"{method}.zarr"), mode="r")


# ---- forget_sets -------------------------------------------------------------------------------------------


def test_random_forget_sets_are_seeded_sorted_unique():
    a, b = random_forget_set(200, 50, seed=7), random_forget_set(200, 50, seed=7)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, random_forget_set(200, 50, seed=8))
    assert len(a) == 50 and (np.diff(a) > 0).all()  # sorted and unique
    assert 0 <= a.min() and a.max() < 200
    for size in (0, 200):
        with pytest.raises(ValueError, match="0 < size < 200"):
            random_forget_set(200, size, seed=7)


def test_forget_sets_stage_writes_sizes_and_class_set(tmp_path):
    cfg = stage_config(tmp_path, random_sizes=(5, 20), full_class=3)
    ctx = run(cfg, ["forget_sets"])
    sets = layout.load_forget_sets(ctx.run_dir)
    assert list(sets) == ["random_5", "random_20", "class_3"]
    labels = ctx.data.y_train.numpy()
    assert sets["class_3"].tolist() == [i for i in range(200) if labels[i] == 3]  # by hand
    for size in (5, 20):
        np.testing.assert_array_equal(sets[f"random_{size}"], random_forget_set(200, size, seed=7))
    stored = json.loads((ctx.run_dir / "forget_sets.json").read_text())["sets"]
    sizes = {n: s["size"] for n, s in stored.items()}
    assert sizes == {"random_5": 5, "random_20": 20, "class_3": len(sets["class_3"])}
    with pytest.raises(ValueError, match="class 10"):
        class_forget_set(labels, 10)


def planted_matrix(n: int = 200, seed: int = 0):
    """(n, n) noise, a strong component on rows 30..44, a weaker one on rows 100..114 (disjoint columns)."""
    rng = np.random.default_rng(seed)
    matrix = 0.1 * rng.standard_normal((n, n))
    v1, v2 = np.zeros(n), np.zeros(n)
    v1[:50], v2[50:100] = 1.0, 1.0
    block1, block2 = np.arange(30, 45), np.arange(100, 115)
    matrix[block1] += 3.0 * v1
    matrix[block2] += 2.0 * v2
    return matrix, block1, block2


def test_principal_component_scores_match_sklearn_pca():
    matrix, block1, block2 = planted_matrix()
    scores = principal_component_scores(matrix.T, matrix.shape[0], 2)  # the store holds margin_weights (N, T)
    reference = PCA(n_components=2, svd_solver="full").fit_transform(matrix)
    for c in range(2):  # a component's sign is arbitrary: align, then compare
        sign = np.sign(scores[:, c] @ reference[:, c])
        np.testing.assert_allclose(scores[:, c], sign * reference[:, c], rtol=1e-6, atol=1e-8)
        assert scores[np.abs(scores[:, c]).argmax(), c] > 0  # the project's sign rule
    sets = pc_forget_sets(scores, top_k=15, ends=5)
    np.testing.assert_array_equal(sets["pc1_top15"][0], block1)  # the planted block is PC1's top
    np.testing.assert_array_equal(sets["pc2_top15"][0], block2)
    order = np.argsort(-scores[:, 0])
    np.testing.assert_array_equal(sets["pc1_ends5"][0], np.sort(np.r_[order[:5], order[-5:]]))


def test_forget_sets_stage_reads_the_margin_datamodel_matrix(tmp_path):
    """Rows of the PCA = training points as targets: margin_weights (N features, T targets) transposed."""
    cfg = stage_config(tmp_path, random_sizes=(), full_class=None, pc_top_k=15)
    ctx = RunContext(cfg=cfg, run_dir=cfg.resolved_run_dir())
    matrix, block1, block2 = planted_matrix()
    margin_weights = np.zeros((200, 250), np.float32)
    margin_weights[:, :200] = matrix.T
    write_datamodels(ctx, margin_weights=margin_weights)
    run(cfg, ["forget_sets"])
    sets = layout.load_forget_sets(ctx.run_dir)
    assert set(sets) == {"pc1_top15", "pc2_top15"}
    np.testing.assert_array_equal(sets["pc1_top15"], block1)
    np.testing.assert_array_equal(sets["pc2_top15"], block2)


def test_changed_forget_sets_config_is_refused(tmp_path):
    cfg = stage_config(tmp_path)
    run(cfg, ["forget_sets"])
    path = layout.forget_sets_path(cfg.resolved_run_dir())
    before = path.read_bytes()
    changed = dataclasses.replace(cfg, forget_sets=ForgetSetsConfig(random_sizes=(20,), full_class=0))
    with pytest.raises(StoreError, match=r"forget_sets\.random_sizes \(\[10\] -> \[20\]\)"):
        run(changed, ["forget_sets"])
    assert path.read_bytes() == before


# ---- models ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_models_train_on_the_right_examples(pipeline):
    """Retrain the first block of each ensemble directly with the engine and the same seeds: identical params.
    Full models use every training example; oracles every example but the forget set."""
    cfg, ctx, _ = pipeline
    task, data, g = get_task(cfg.task), ctx.data, models_store(ctx)
    forget = layout.load_forget_sets(ctx.run_dir)["class_0"]
    oracle_mask = np.ones(200, bool)
    oracle_mask[forget] = False
    full = train_models(task, data, np.ones((2, 200), bool), model_seeds(2, cfg.seed, FULL_STREAM),
                        epoch_size=200, return_params=True)
    oracle = train_models(task, data, np.repeat(oracle_mask[None], 2, 0),
                          model_seeds(2, cfg.seed, oracle_stream("class_0")),
                          epoch_size=int(oracle_mask.sum()), return_params=True)
    np.testing.assert_array_equal(g["full/params"][:2], full.params)
    np.testing.assert_array_equal(g["oracle/class_0/params"][:2], oracle.params)
    # control: the oracles' seeds with every example give other models, so the check above sees the mask
    assert not np.array_equal(train_models(task, data, np.ones((1, 200), bool),
                                           model_seeds(1, cfg.seed, oracle_stream("class_0")),
                                           return_params=True).params[0], g["oracle/class_0/params"][0])
    # the stored logits are exactly those of the stored params through the task's module
    for name in ("full", "oracle/class_0", "oracle/random_10"):
        params, logits = g[f"{name}/params"][:], g[f"{name}/logits"][:]
        assert g[f"{name}/done"][:].all() and len(params) == (K if name == "full" else N_ORACLES)
        for p, lg in zip(params, logits):
            np.testing.assert_array_equal(predict_logits(load_state_vector(task.build_model(10, 0), p),
                                                         data.x_targets), lg)
    labels = data.y_targets.numpy()
    full_train_acc = (g["full/logits"][:, :200].argmax(-1) == labels[:200]).mean()
    oracle_forget_acc = (g["oracle/class_0/logits"][:, forget].argmax(-1) == 0).mean()
    # a model that never saw class 0 never predicts it
    assert full_train_acc > 0.5 and oracle_forget_acc == 0.0


def test_models_resume_after_interruption(tmp_path, pipeline):
    cfg = stage_config(tmp_path)
    run(cfg, ["forget_sets"])
    with pytest.raises(KeyboardInterrupt):
        run(cfg, ["models"], InterruptAfter(1))
    assert models_store(RunContext(cfg, cfg.resolved_run_dir()))["full/done"][:].all()
    second = InterruptAfter(None)
    ctx = run(cfg, ["models"], second)
    # reference + OM rows [0, 4) in blocks of 2 as without the floor oracles, then the floor rows [4, 6)
    assert sorted(second.units) == [("oracle/class_0", 0, 2), ("oracle/class_0", 2, 4), ("oracle/class_0", 4, 6),
                                    ("oracle/random_10", 0, 2), ("oracle/random_10", 2, 4),
                                    ("oracle/random_10", 4, 6)]
    reference = models_store(pipeline[1])
    for name in ("full", "oracle/class_0", "oracle/random_10"):
        np.testing.assert_array_equal(models_store(ctx)[f"{name}/logits"][:], reference[f"{name}/logits"][:])


def test_floor_oracles_follow_and_leave_the_other_rows_unchanged(tmp_path, pipeline):
    """Rows [K + OM, 2K + OM) are the floor oracles: seeds K + OM.. of the oracle stream (trained here directly),
    without the forget set. The same run with models.floor_oracles off has K + OM oracles per set, equal bit for bit
    to the first K + OM rows here (same seeds, same packs), and full models equal too."""
    cfg, ctx, _ = pipeline
    g = models_store(ctx)
    assert g.attrs["floor_oracles"] is True and oracle_rows(K, OM_ORACLES, True)["floor"] == slice(4, 6)
    task, data = get_task(cfg.task), ctx.data
    forget = layout.load_forget_sets(ctx.run_dir)["random_10"]
    mask = np.ones(200, bool)
    mask[forget] = False
    floor = train_models(task, data, np.repeat(mask[None], K, 0),
                         model_seeds(K, cfg.seed, oracle_stream("random_10"), start=K + OM_ORACLES),
                         epoch_size=int(mask.sum()), return_params=True)
    np.testing.assert_array_equal(g["oracle/random_10/params"][K + OM_ORACLES:], floor.params)

    off = dataclasses.replace(stage_config(tmp_path), models=ModelsConfig(k=K, block_size=2, floor_oracles=False))
    without = models_store(run(off, ["forget_sets", "models"]))
    assert without.attrs["floor_oracles"] is False
    for name in ("full", "oracle/class_0", "oracle/random_10"):
        for array in ("params", "logits"):
            rows = without[f"{name}/{array}"][:]
            assert len(rows) == (K if name == "full" else K + OM_ORACLES)
            np.testing.assert_array_equal(rows, g[f"{name}/{array}"][:len(rows)])


# ---- unlearn -----------------------------------------------------------------------------------------------


def test_oracle_matching_targets_each_models_own_oracle(pipeline):
    """models.om_target "own": full model i matches oracle row K + i (a distinct seed), never a mean; "mean" (a
    store from before "own", or the option) gives every model the mean of the OM rows."""
    _, ctx, _ = pipeline
    g = zarr.open_group(str(ctx.run_dir / "models.zarr"), mode="r+")
    assert g.attrs["om_target"] == "own" and g.attrs["om_oracles"] == K
    logits = g["oracle/random_10/logits"][:]
    got = om_targets(g, "random_10", slice(0, K), 200)
    for i in range(K):
        np.testing.assert_array_equal(got[i], logits[K + i, :200])
    assert not np.array_equal(got[0], got[1])
    np.testing.assert_array_equal(om_targets(g, "random_10", slice(1, 2), 200)[0], logits[K + 1, :200])
    g.attrs["om_target"] = "mean"
    try:
        mean = om_targets(g, "random_10", slice(0, K), 200)
        np.testing.assert_allclose(mean[1], logits[K:K + OM_ORACLES, :200].mean(0), rtol=1e-6)
    finally:
        g.attrs["om_target"] = "own"


def test_unlearn_writes_every_store(pipeline):
    cfg, ctx, _ = pipeline
    for fs in ("random_10", "class_0"):
        for method in ALL_METHODS:
            g = unlearned_store(ctx, fs, method)
            assert g.attrs["forget_set"] == fs and g.attrs["method"] == method
            assert g["done"][:].all() and g["logits"].shape == (K, 250, 10)
            assert np.isfinite(g["logits"][:]).all(), (fs, method)
            assert (g["seconds"][:] >= 0).all()
            passes = g["example_passes"][:]
            if method == "do_nothing":
                assert (passes == 0).all()
            elif method == "dm_direct":  # one forward pass of the original model on each of the T targets
                np.testing.assert_allclose(passes, 250 / 3)
            else:  # DMM: the same forward passes and its fine-tuning
                assert (passes > (250 / 3 if method == "dm_matching" else 0)).all(), method
    # a rerun finds every store done and runs no unit
    executor = InterruptAfter(None)
    run(cfg, ["unlearn"], executor)
    assert executor.units == []


def test_do_nothing_and_dm_direct_logits(pipeline):
    cfg, ctx, weights = pipeline
    full = models_store(ctx)["full/logits"][:]
    for fs, idx in layout.load_forget_sets(ctx.run_dir).items():
        np.testing.assert_array_equal(unlearned_store(ctx, fs, "do_nothing")["logits"][:], full)
        # DM-Direct (docs/methods.md §3): full logits minus the summed datamodel weights of the forget points
        expected = full.astype(np.float64) - weights[idx].astype(np.float64).sum(0)
        np.testing.assert_allclose(unlearned_store(ctx, fs, "dm_direct")["logits"][:], expected,
                                   rtol=0, atol=1e-5)
        # the fine-tuning methods move the model
        assert not np.allclose(unlearned_store(ctx, fs, "dm_matching")["logits"][:], full)


def test_dm_matching_residuals_to_its_own_targets(pipeline):
    """The report's DMM diagnostics against a brute-force computation: its targets are DM-Direct's stored
    predictions, its residuals the logits' MSE to them on the forget and retain points, per model."""
    from pipelines.report.evaluate import evaluate_run

    cfg, ctx, _ = pipeline
    metrics, _ = evaluate_run(ctx.run_dir, ctx.data.y_targets.numpy())
    n = ctx.data.n_train
    for fs, idx in layout.load_forget_sets(ctx.run_dir).items():
        got = metrics["forget_sets"][fs]["methods"]["dm_matching"]["diagnostics"]["residuals"]
        z = unlearned_store(ctx, fs, "dm_matching")["logits"][:, :n].astype(np.float64)
        target = unlearned_store(ctx, fs, "dm_direct")["logits"][:, :n].astype(np.float64)
        retain = np.setdiff1d(np.arange(n), idx)
        np.testing.assert_allclose(got["forget_mse"], ((z[:, idx] - target[:, idx]) ** 2).mean(axis=(1, 2)),
                                   rtol=1e-4)
        np.testing.assert_allclose(got["retain_mse"], ((z[:, retain] - target[:, retain]) ** 2).mean(axis=(1, 2)),
                                   rtol=1e-4)
        assert all(-1 < p < 2 for p in got["forget_margin_progress"])


def test_unlearn_is_reproducible_in_a_new_dir(tmp_path, pipeline):
    """... and Oracle Matching's targets are rows [K, K + OM) only: the floor oracles after them, spoilt here,
    change nothing."""
    methods = ("dm_matching", "oracle_matching", "mu_mis", "scrub")
    cfg, ctx, _ = build_run(tmp_path, methods=methods, unlearn=False)
    for fs in ("random_10", "class_0"):
        zarr.open_group(str(ctx.run_dir / "models.zarr"), mode="r+")[f"oracle/{fs}/logits"][K + OM_ORACLES:] = 1e3
    run(cfg, ["unlearn"])
    for fs in ("random_10", "class_0"):
        for method in methods:
            np.testing.assert_array_equal(unlearned_store(ctx, fs, method)["logits"][:],
                                          unlearned_store(pipeline[1], fs, method)["logits"][:])


@pytest.mark.parametrize("unlearn, match", [
    (UnlearnConfig(methods=("do_nothing", "dm_direkt")),
     r"unknown unlearn\.methods entry 'dm_direkt'.*dm_direct"),
    (UnlearnConfig(methods=("scrub",), hparams={"scrub": {"learning_rate": 1e-3}}),
     r"unknown config key 'unlearn\.hparams\.scrub\.learning_rate'; scrub has: epochs, max_steps, lr"),
    (UnlearnConfig(methods=("scrub",), hparams={"mumis": {"lr": 1e-3}}), r"unknown method 'mumis'.*mu_mis"),
    (UnlearnConfig(methods=("retrain",)), r"'retrain' is the oracle ensemble"),
])
def test_bad_unlearn_config_is_refused_before_any_work(tmp_path, unlearn, match):
    cfg = dataclasses.replace(stage_config(tmp_path), unlearn=unlearn)
    with pytest.raises(ConfigError, match=match):
        run(cfg, ["unlearn"])  # the run dir has no stores: the check comes first


def test_bad_unlearn_config_from_yaml_is_one_cli_line(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("name: x\nexecutor: {kind: serial}\nunlearn: {hparams: {dm_matching: {epoch: 2}}}\n")
    assert main(["run", str(config), "--stages", "unlearn", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unlearn.hparams.dm_matching.epoch" in err[0], err



def test_unknown_unlearning_method_refused_before_any_stage_runs(tmp_path):
    cfg = stage_config(tmp_path, methods=("do_nothing", "dm_drect"))
    ctx = RunContext(cfg=cfg, run_dir=cfg.resolved_run_dir())
    with pytest.raises(ConfigError, match="unknown unlearn.methods entry 'dm_drect'"):
        run_stages(ctx, ["subsets", "unlearn"])
    assert not (ctx.run_dir / "subsets.zarr").exists()  # nothing trained before the refusal


def test_forget_set_draws_are_independent_and_keep_the_first(tmp_path):
    """forget_sets.draws 3: random_10, random_10_d1, random_10_d2, distinct, seeded; the first is the set a
    single draw gives."""
    cfg = stage_config(tmp_path, random_sizes=(10,), full_class=None)
    one = layout.load_forget_sets(run(cfg, ["forget_sets"]).run_dir)
    cfg3 = dataclasses.replace(cfg, run_dir=str(tmp_path / "three"),
                               forget_sets=dataclasses.replace(cfg.forget_sets, draws=3))
    three = layout.load_forget_sets(run(cfg3, ["forget_sets"]).run_dir)
    assert list(three) == ["random_10", "random_10_d1", "random_10_d2"]
    np.testing.assert_array_equal(three["random_10"], one["random_10"])
    for j in (1, 2):
        np.testing.assert_array_equal(three[f"random_10_d{j}"], random_forget_set(200, 10, seed=7, draw=j))
        assert not np.array_equal(three[f"random_10_d{j}"], three["random_10"])
    assert not np.array_equal(three["random_10_d1"], three["random_10_d2"])
