"""Import and export of the Easy Data Unlearning Bench layout (easydub/EasyDUB-code, easydub/data.py): small files
written here in exactly that layout, never downloaded; the report's KLOM on the imported margins; the refusal of
methods that need class logits on a margin-only models.zarr."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attribution.store import open_group, open_store
from pipelines.config import ConfigError, load_config, validate
from pipelines.interchange import edub
from pipelines.rundir.layout import load_forget_sets
from tests.klom_reference import edub_klom_point

N, NT, K, KO = 40, 12, 6, 8  # training points, test points, pretrain models, oracles per forget set
SETS = {2: np.array([31, 4, 17, 9, 22], dtype=np.int64), 5: np.array([0, 39, 11], dtype=np.int64)}


def write_bench(root, k=K, ko=KO, sets=SETS, seed=0, dtype=np.float32):
    """The bench's files for `sets`: forget sets, pretrain margins (retain = all training points, val, forget_<ID>)
    and per forget set the oracles' retain / forget / val margins. Returns the margins as dmu's targets see them:
    full (k, T), full_forget {ID: (k, |F|)}, oracles {ID: (ko, T)}."""
    rng = np.random.default_rng(seed)
    base = root / "margins" / "cifar10"
    (root / "forget_sets" / "cifar10").mkdir(parents=True, exist_ok=True)
    full = (rng.normal(size=(k, N + NT)) * 3).astype(dtype)
    full_forget, oracles = {}, {}
    for m in range(k):
        for split, row in (("retain", full[m, :N]), ("val", full[m, N:])):
            (base / "pretrain" / split / "resnet9").mkdir(parents=True, exist_ok=True)
            np.save(base / "pretrain" / split / "resnet9" / f"id_{m}_epoch_23.npy", row)
    for fid, idx in sets.items():
        np.save(root / "forget_sets" / "cifar10" / f"forget_set_{fid}.npy", idx)
        # the bench keeps the full models' forget margins apart: a different sample, to see which one is used
        full_forget[fid] = (rng.normal(size=(k, idx.size)) + 5).astype(dtype)
        folder = base / "pretrain" / f"forget_{fid}" / "resnet9"
        folder.mkdir(parents=True, exist_ok=True)
        for m in range(k):
            np.save(folder / f"id_{m}_epoch_23.npy", full_forget[fid][m])
        oracle = (rng.normal(size=(ko, N + NT)) * 3 - 1).astype(dtype)
        retain = np.setdiff1d(np.arange(N), idx)
        for split, cols in (("retain", retain), ("forget", idx), ("val", np.arange(N, N + NT))):
            folder = base / "oracle" / f"forget_{fid}" / split / "resnet9"
            folder.mkdir(parents=True, exist_ok=True)
            for m in range(ko):
                np.save(folder / f"id_{m}_epoch_23.npy", oracle[m, cols])
        oracles[fid] = oracle
    return full, full_forget, oracles


def bench_files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*.npy"))


def test_import_maps_the_bench_splits_onto_dmu_targets(tmp_path):
    full, full_forget, oracles = write_bench(tmp_path / "src")
    path = edub.import_edub(tmp_path / "src", tmp_path / "run", block_size=4)
    models = open_store(path, "models")
    assert models.attrs["margin_only"] and models.attrs["k"] == K and models.attrs["n_targets"] == N + NT
    assert models.attrs["bench_forget_ids"] == {"forget_set_2": 2, "forget_set_5": 5}
    np.testing.assert_array_equal(models["full/margins"][:], full)
    sets = load_forget_sets(tmp_path / "run")
    assert list(sets) == ["forget_set_2", "forget_set_5"]
    for fid, idx in SETS.items():
        np.testing.assert_array_equal(sets[f"forget_set_{fid}"], idx)  # the file's order, kept
        np.testing.assert_array_equal(models[f"oracle/forget_set_{fid}/margins"][:], oracles[fid])
        np.testing.assert_array_equal(models[f"full_forget/forget_set_{fid}/margins"][:], full_forget[fid])
        assert np.asarray(models[f"oracle/forget_set_{fid}/done"][:]).all()
    assert np.asarray(models["full/done"][:]).all()
    assert models.attrs["checkpoints"] == {"files": [], "missing": list(range(K))}
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["models"]["k"] == K and cfg["unlearn"]["methods"] == ["do_nothing", "dm_direct"]


def test_target_maps_are_explicit():
    maps = edub.target_maps(np.array([3, 0]), 5, 2)
    assert maps["retain"].tolist() == [1, 2, 4] and maps["forget"].tolist() == [3, 0]
    assert maps["val"].tolist() == [5, 6]


def test_round_trip_import_export_import_is_bit_for_bit(tmp_path):
    write_bench(tmp_path / "src")
    edub.import_edub(tmp_path / "src", tmp_path / "run", block_size=4)
    edub.export_edub(tmp_path / "run", tmp_path / "out")
    assert bench_files(tmp_path / "out") == bench_files(tmp_path / "src")
    for rel in bench_files(tmp_path / "src"):
        a, b = np.load(tmp_path / "src" / rel), np.load(tmp_path / "out" / rel)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), rel
    edub.import_edub(tmp_path / "out", tmp_path / "run2", block_size=3)
    one, two = (open_store(p / "models.zarr", "models") for p in (tmp_path / "run", tmp_path / "run2"))
    for name in ("full/margins", "oracle/forget_set_2/margins", "full_forget/forget_set_5/margins"):
        assert one[name][:].tobytes() == two[name][:].tobytes()


def test_n_models_imports_the_first_models_and_lists_their_checkpoints(tmp_path):
    full, _, oracles = write_bench(tmp_path / "src")
    folder = tmp_path / "src" / "models" / "cifar10" / "pretrain" / "resnet9"
    folder.mkdir(parents=True)
    for m in (0, 2, 5):
        (folder / f"id_{m}_epoch_23.pt").write_bytes(b"")
    models = open_store(edub.import_edub(tmp_path / "src", tmp_path / "run", n_models=4), "models")
    np.testing.assert_array_equal(models["full/margins"][:], full[:4])
    np.testing.assert_array_equal(models["oracle/forget_set_5/margins"][:], oracles[5][:4])
    assert models.attrs["checkpoints"] == {"files": [str(folder.resolve() / f"id_{m}_epoch_23.pt") for m in (0, 2)],
                                           "missing": [1, 3]}
    with pytest.raises(ConfigError, match="holds 6 pretrain models; import at most 6"):
        edub.import_edub(tmp_path / "src", tmp_path / "run3", n_models=7)
    with pytest.raises(ConfigError, match="--n-models must be at least 1, got 0"):
        edub.import_edub(tmp_path / "src", tmp_path / "run3", n_models=0)


def test_interrupted_import_resumes_at_the_first_block_not_done(tmp_path):
    full, _, oracles = write_bench(tmp_path / "src")
    path = edub.import_edub(tmp_path / "src", tmp_path / "run", block_size=4)
    g = open_group(path, mode="r+")
    g["full/done"][4:] = False  # as a kill after the first block leaves it
    g["full/margins"][4:] = np.nan
    g["oracle/forget_set_2/done"][:] = False
    g["oracle/forget_set_2/margins"][:] = np.nan
    edub.import_edub(tmp_path / "src", tmp_path / "run", block_size=4)
    np.testing.assert_array_equal(g["full/margins"][:], full)
    np.testing.assert_array_equal(g["oracle/forget_set_2/margins"][:], oracles[2])


def _break(root, what):
    base = root / "margins" / "cifar10"
    if what == "missing folder":
        for p in (base / "pretrain" / "val" / "resnet9").iterdir():
            p.unlink()
        (base / "pretrain" / "val" / "resnet9").rmdir()
    elif what == "no forget sets":
        for p in (root / "forget_sets" / "cifar10").iterdir():
            p.unlink()
    elif what == "incomplete model":
        (base / "oracle" / "forget_2" / "val" / "resnet9" / "id_3_epoch_23.npy").unlink()
    elif what == "model gap":
        for split in ("retain", "forget", "val"):
            (base / "oracle" / "forget_5" / split / "resnet9" / "id_2_epoch_23.npy").unlink()
    elif what == "wrong split size":
        np.save(base / "oracle" / "forget_2" / "retain" / "resnet9" / "id_1_epoch_23.npy",
                np.zeros(N, np.float32))  # the full training set where N - |F| belongs
    elif what == "wrong val size":
        np.save(base / "pretrain" / "val" / "resnet9" / "id_4_epoch_23.npy", np.zeros(NT + 1, np.float32))
    elif what == "index out of range":
        np.save(root / "forget_sets" / "cifar10" / "forget_set_2.npy", np.array([31, 4, 17, 9, N]))
    elif what == "forget set mismatches split":
        np.save(root / "forget_sets" / "cifar10" / "forget_set_2.npy", np.array([31, 4, 17, 9]))
    elif what == "repeated index":
        np.save(root / "forget_sets" / "cifar10" / "forget_set_5.npy", np.array([0, 39, 0]))
    elif what == "float forget set":
        np.save(root / "forget_sets" / "cifar10" / "forget_set_5.npy", np.array([0.0, 39.0, 11.0]))
    elif what == "other dtype":
        np.save(base / "pretrain" / "retain" / "resnet9" / "id_5_epoch_23.npy", np.zeros(N, np.float64))


@pytest.mark.parametrize("what, message", [
    ("missing folder", r"missing .*pretrain/val/resnet9: download that folder"),
    ("no forget sets", r"no forget sets in .*forget_sets/cifar10 \(forget_set_<ID>.npy\)"),
    ("incomplete model", r"incomplete forget set 2's oracle models: .*forget_2/val/resnet9 lacks id_3_epoch_23.npy"),
    ("model gap", r"incomplete forget set 5's oracle models: id_2_epoch_23.npy is missing in every split"),
    ("wrong split size", r"wrong split size: .*forget_2/retain/resnet9/id_1_epoch_23.npy holds 40 margins, "
                         r"forget set 2's retain split .* has 35"),
    ("wrong val size", r"wrong split size: .*pretrain/val/resnet9/id_4_epoch_23.npy holds 13 margins"),
    ("index out of range", r"forget_set_2.npy holds index 40 outside the 40 training points"),
    ("forget set mismatches split", r"wrong split size: .*pretrain/forget_2/resnet9/id_0_epoch_23.npy holds 5 "
                                    r"margins, forget set 2 has 4"),
    ("repeated index", r"forget_set_5.npy repeats a training index"),
    ("float forget set", r"forget_set_5.npy must be a non-empty 1-D integer array"),
    ("other dtype", r"id_5_epoch_23.npy holds float64 margins, the other files float32"),
])
def test_every_source_problem_is_one_line_before_anything_is_written(tmp_path, what, message):
    write_bench(tmp_path / "src")
    _break(tmp_path / "src", what)
    with pytest.raises(ConfigError, match=message) as err:
        edub.import_edub(tmp_path / "src", tmp_path / "run")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_imported_config_validates():
    cfg = load_config("pipelines/configs/cifar10_imported.yaml")
    validate(cfg, cfg.stages)
    assert cfg.stages == ("unlearn", "report") and cfg.unlearn.methods == ("do_nothing", "dm_direct")


# ----------------------------------------------------------------------------------------------------------
# the report and the stages on a margin-only models.zarr


def report(run_dir):
    from pipelines.cli import main

    assert main(["report", str(run_dir)]) == 0
    return json.loads((run_dir / "report" / "metrics.json").read_text())


def test_report_scores_doing_nothing_in_the_bench_convention(tmp_path):
    full, full_forget, oracles = write_bench(tmp_path / "src")
    edub.import_edub(tmp_path / "src", tmp_path / "run")
    metrics = report(tmp_path / "run")
    assert metrics["margin_only"] and set(metrics["forget_sets"]) == {"forget_set_2", "forget_set_5"}
    for fid, idx in SETS.items():
        entry = metrics["forget_sets"][f"forget_set_{fid}"]["methods"]["do_nothing"]
        # the bench's splits, from its own files: pretrain retain minus F, its pretrain forget file, pretrain val
        retain = np.setdiff1d(np.arange(N), idx)
        splits = {"retain": (full[:, retain], oracles[fid][:, retain]),
                  "forget": (full_forget[fid], oracles[fid][:, idx]),
                  "validation": (full[:, N:], oracles[fid][:, N:])}
        for split, (u, o) in splits.items():
            # EasyDUB (eval_pretrain.py, README): KL(unlearned || oracle); data-unlearning-bench run.py: the other
            easydub = [edub_klom_point(u[:, j], o[:, j]) for j in range(u.shape[1])]
            run_py = [edub_klom_point(o[:, j], u[:, j]) for j in range(u.shape[1])]
            assert entry["klom_edub_reverse"][split]["p95"] == pytest.approx(np.percentile(easydub, 95), rel=1e-12)
            assert entry["klom_edub"][split]["p95"] == pytest.approx(np.percentile(run_py, 95), rel=1e-12)
        assert entry["accuracy"] == "n/a (margins only)" and entry["mia"] == "n/a (margins only)"
    text = (tmp_path / "run" / "report" / "report.md").read_text()
    p95 = metrics["forget_sets"]["forget_set_2"]["methods"]["do_nothing"]["klom_edub_reverse"]
    row = " / ".join(f"{p95[s]['p95']:.4f}" for s in ("retain", "forget", "validation"))  # the README's format
    assert f"| do_nothing | {row} |" in text and "n/a (margins only)" in text


def test_dm_direct_on_margins_is_scored_by_the_report(tmp_path):
    """The CIFAR-10 preset on imported stores only: the bench's margins (`dmu import edub`) and the datamodels
    release's fitted datamodels (`dmu import datamodels-weights`, {train,test}_{PCT}pct.pt as torch.save files)."""
    import torch

    from pipelines.cli import main

    full, full_forget, oracles = write_bench(tmp_path / "src")
    run = tmp_path / "run"
    assert main(["import", "edub", str(tmp_path / "src"), "--run-dir", str(run)]) == 0
    g = torch.Generator().manual_seed(1)
    fits = {split: {"weight": torch.randn(N, t, generator=g), "bias": torch.randn(t, generator=g),
                    "lam": torch.rand(t, generator=g)} for split, t in (("train", N), ("test", NT))}
    (tmp_path / "release").mkdir()
    for split, fit in fits.items():
        torch.save(fit, tmp_path / "release" / f"{split}_50pct.pt")
    assert main(["import", "datamodels-weights", str(tmp_path / "release"), "--run-dir", str(run)]) == 0
    w = torch.cat([fits["train"]["weight"], fits["test"]["weight"]], dim=1).numpy()  # targets: train, then test
    assert main(["run", "pipelines/configs/cifar10_imported.yaml", "--run-dir", str(run)]) == 0
    store = open_store(run / "unlearned" / "forget_set_2" / "dm_direct.zarr", "unlearned")
    expected = (full - w[SETS[2]].astype(np.float64).sum(0)).astype(np.float32)
    np.testing.assert_array_equal(store["margins"][:], expected)
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    entry = metrics["forget_sets"]["forget_set_2"]["methods"]["dm_direct"]
    o = oracles[2]
    values = [edub_klom_point(expected[:, j], o[:, j]) for j in range(N, N + NT)]
    assert entry["klom_edub_reverse"]["validation"]["p95"] == pytest.approx(np.percentile(values, 95), rel=1e-12)
    assert main(["info", "--verify", str(run)]) == 0  # imported stores are checked against their own configs


@pytest.mark.parametrize("methods, stages, message", [
    (["do_nothing", "dm_matching"], "unlearn", r"unlearn.methods dm_matching need class logits and the full models' "
                                               r"parameters, which it lacks; keep only do_nothing and dm_direct"),
    (["oracle_matching", "gradient_ascent"], "unlearn", r"unlearn.methods oracle_matching, gradient_ascent need"),
    (["dm_direct"], "models,unlearn", r"stages models need trained models' logits and parameters"),
    (["dm_direct"], "tune", r"stages tune need"),
])
def test_methods_needing_logits_are_refused_before_any_stage_runs(tmp_path, methods, stages, message):
    from pipelines.cli import main
    from pipelines.stages import RunContext, run_stages

    write_bench(tmp_path / "src")
    run = tmp_path / "run"
    edub.import_edub(tmp_path / "src", run)
    (tmp_path / "cfg.yaml").write_text(f"task: {{name: cifar10}}\nunlearn: {{methods: [{', '.join(methods)}]}}\n"
                                       "executor: {kind: serial}\n")
    with pytest.raises(ConfigError, match=message) as err:
        run_stages(RunContext(cfg=load_config(tmp_path / "cfg.yaml"), run_dir=run), stages.split(","))
    assert "\n" not in str(err.value)
    assert not (run / "unlearned").exists()
    assert main(["run", str(tmp_path / "cfg.yaml"), "--run-dir", str(run), "--stages", stages]) != 0
    assert not (run / "unlearned").exists()


def test_dm_direct_on_margins_without_margin_datamodels_is_refused_before_any_stage_runs(tmp_path):
    from pipelines.stages import RunContext, run_stages

    write_bench(tmp_path / "src")
    run = tmp_path / "run"
    edub.import_edub(tmp_path / "src", run)
    cfg = load_config("pipelines/configs/cifar10_imported.yaml")
    with pytest.raises(ConfigError, match=r"no datamodel store at .*datamodels/lasso.zarr: DM-Direct on a "
                                          r"margin-only models.zarr reads its margin_weights"):
        run_stages(RunContext(cfg=cfg, run_dir=run), cfg.stages)
    assert not (run / "unlearned").exists() and not (run / "report").exists()


def test_a_deletion_request_is_refused_on_margins(tmp_path):
    from pipelines.stages.unlearn import serve_request

    write_bench(tmp_path / "src")
    edub.import_edub(tmp_path / "src", tmp_path / "run")
    cfg = load_config("pipelines/configs/demo.yaml")
    with pytest.raises(ConfigError, match="holds margins only .*no full model's parameters"):
        serve_request(tmp_path / "run", cfg, np.array([1, 2]), "gradient_ascent", 0, tmp_path / "out.pt")


def test_export_of_a_trained_run_writes_margins_of_its_logits(tmp_path):
    """A models.zarr with logits (the models stage's layout): its full models and reference oracles (the first K
    rows) exported as margins, and imported back equal to unlearning.klom.margins of those logits."""
    from attribution.store import ArraySpec, open_or_create
    from pipelines.rundir.layout import oracle_rows
    from unlearning.klom import margins

    rng = np.random.default_rng(3)
    run, c, k = tmp_path / "run", 4, 3
    labels = rng.integers(0, c, N + NT)
    sets = {"random_5": np.array([3, 8, 1, 30, 12]), "forget_set_7": np.array([20, 2])}
    rows = oracle_rows(k, k, True)  # reference, OM's own oracles, floor: 3 K rows
    arrays = {"full/logits": ArraySpec((k, N + NT, c), "float32", (2, N + NT, c), float("nan")),
              "full/done": ArraySpec((k,), "bool", (2,), False)}
    for fs in sets:
        arrays[f"oracle/{fs}/logits"] = ArraySpec((rows["floor"].stop, N + NT, c), "float32", (2, N + NT, c),
                                                  float("nan"))
        arrays[f"oracle/{fs}/done"] = ArraySpec((rows["floor"].stop,), "bool", (2,), False)
    g = open_or_create(run / "models.zarr", arrays, kind="models", config={"test": 1},
                       attrs={"k": k, "n_train": N, "n_targets": N + NT, "num_classes": c, "epochs": 2})
    logits = {name: rng.normal(size=arrays[f"{name}/logits"].shape).astype(np.float32)
              for name in ["full"] + [f"oracle/{fs}" for fs in sets]}
    for name, values in logits.items():
        g[f"{name}/logits"][:] = values
        g[f"{name}/done"][:] = True
    (run / "forget_sets.json").write_text(json.dumps(
        {"sets": {fs: {"indices": idx.tolist(), "size": len(idx), "how": "test"} for fs, idx in sets.items()}}))
    edub.export_edub(run, tmp_path / "out", labels=labels)
    names = json.loads((tmp_path / "out" / "forget_sets" / "cifar10" / "names.json").read_text())
    assert names == {"7": "forget_set_7", "8": "random_5"}  # a bench ID kept, the other numbered after it
    models = open_store(edub.import_edub(tmp_path / "out", tmp_path / "back"), "models")
    assert models.attrs["k"] == k
    np.testing.assert_array_equal(models["full/margins"][:], margins(logits["full"], labels))
    for fid, fs in names.items():
        reference = margins(logits[f"oracle/{fs}"][:k], labels)  # KLOM's reference rows only
        np.testing.assert_array_equal(models[f"oracle/forget_set_{fid}/margins"][:], reference)
        np.testing.assert_array_equal(models[f"full_forget/forget_set_{fid}/margins"][:],
                                      margins(logits["full"], labels)[:, sets[fs]])
