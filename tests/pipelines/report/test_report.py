"""The report on a hand-built run dir (K=6, N=30, T=40, C=3, two forget sets): KLOM against klom.klom and a
per-point np.histogram reference, accuracies against a hand count, cost against its formula, MIA against
population_mia, the oracle floor (K floor oracles vs the K reference oracles, or two halves of the reference where
the floor oracles are missing), the markdown rows, what each plot drew, and incomplete stores skipped and named."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr
from scipy.stats import entropy

from attribution.store import ArraySpec, StoreError, open_or_create
from pipelines.report.evaluate import INTERVAL_LEVEL, N_SUBSAMPLES, POINT_SETS, evaluate_run, grid_edges
from pipelines.stages.linear import linear_experiment
from pipelines.report import build_report
from pipelines.report.plots import plot_klom_distributions, plot_lds_curve
from pipelines.rundir.layout import stored_oracle_rows
from unlearning.klom import N_BINS, klom, klom_intervals, klom_summary, margins, oracle_floor
from unlearning.metrics import lira_mia, per_example_loss, population_mia

K, OM, N, T, C, EPOCHS = 6, 2, 30, 40, 3, 5
SEED = 3
FORGET_SETS = {"random_5": [1, 4, 9, 17, 22], "random_8": [0, 3, 5, 8, 13, 21, 25, 29]}
# random_5's floor oracles are trained; random_8's are not all done, so its floor falls back to the half split.
FLOOR_DONE = {"random_5": True, "random_8": False}
METHODS = ("do_nothing", "perfect", "bad")
# (budget, LDS) per datamodel store
LDS_CURVES = {"lasso": [[300, 0.27], [600, 0.37], [1200, 0.45]], "trak": [[10, 0.32], [50, 0.48]]}


def draw_logits(rng, labels, trained: np.ndarray, n_models: int) -> np.ndarray:
    """Noisy logits with a boost on the label class: large on the points a model trained on (memorised),
    small elsewhere, so removing a point moves its margin as retraining would."""
    boost = np.full(T, 0.5)
    boost[trained] = 4.0
    z = rng.normal(0.0, 1.0, (n_models, T, C))
    z[:, np.arange(T), labels] += boost
    return z.astype(np.float32)


def write_store(path, arrays: dict[str, np.ndarray], kind: str, attrs: dict):
    specs = {name: ArraySpec(a.shape, str(a.dtype), a.shape) for name, a in arrays.items()}
    group = open_or_create(path, specs, kind=kind, config={}, attrs=attrs)
    for name, a in arrays.items():
        group[name][...] = a


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    rng = np.random.default_rng(0)
    run_dir = tmp_path_factory.mktemp("report") / "tiny"
    run_dir.mkdir()
    labels = rng.integers(0, C, T)
    sets = {name: {"indices": idx, "size": len(idx), "how": f"{len(idx)} points by hand"}
            for name, idx in FORGET_SETS.items()}
    sets["no_oracles"] = {"indices": [2, 7], "size": 2, "how": "its oracles were never trained"}
    (run_dir / "forget_sets.json").write_text(json.dumps({"config": {}, "sets": sets}))
    train = np.arange(N)
    arrays = {"full/logits": draw_logits(rng, labels, train, K), "full/seconds": np.full(K, 2.0),
              "full/done": np.ones(K, bool)}
    truth = {"labels": labels, "oracles": {}, "floor_oracles": {}, "unlearned": {}}
    floor_rng = np.random.default_rng(1)  # apart from rng, so the other draws do not depend on the floor oracles
    for fs, idx in FORGET_SETS.items():
        retain = np.setdiff1d(train, idx)
        oracles = draw_logits(rng, labels, retain, K)
        # OM's oracles (rows K..K+OM) are wildly different: any use of them would change every number.
        om = oracles[:OM] + 50.0 * np.eye(C, dtype=np.float32)[(labels + 1) % C]
        floor = draw_logits(floor_rng, labels, retain, K)  # rows K+OM..2K+OM: fresh oracles
        arrays[f"oracle/{fs}/logits"] = np.concatenate([oracles, om, floor])
        arrays[f"oracle/{fs}/seconds"] = np.concatenate([1.5 + 0.1 * np.arange(K), np.full(OM + K, 1e3)])
        arrays[f"oracle/{fs}/done"] = np.r_[np.ones(K + OM, bool), np.arange(K) < (K if FLOOR_DONE[fs] else 2)]
        truth["oracles"][fs] = oracles
        truth["floor_oracles"][fs] = floor
        bad = oracles.copy()
        bad[:, np.arange(T), (labels + 1) % C] += 3.0  # a wrong class pushed up everywhere
        methods = {
            "do_nothing": (arrays["full/logits"], np.zeros(K)),
            # model k gets oracle k-1's logits: the same margin sample, so KLOM is only the eps floor
            "perfect": (np.roll(oracles, 1, axis=0), np.full(K, 30.0)),
            "bad": (bad, 10.0 * np.arange(1, K + 1)),
        }
        truth["unlearned"][fs] = {}
        for method, (logits, passes) in methods.items():
            seconds = 0.01 + 0.2 * rng.random(K)
            write_store(run_dir / "unlearned" / fs / f"{method}.zarr",
                        {"logits": logits, "seconds": seconds, "example_passes": passes,
                         "done": np.ones(K, bool)}, "unlearned", {"method": method, "forget_set": fs})
            truth["unlearned"][fs][method] = {"logits": logits, "seconds": seconds, "passes": passes}
    # Oracle Matching (its cost adds its OM oracles' training), MU-Mis (diagnostics) and a budget variant of
    # "perfect" (a second point on its curve), on random_5 only
    om_logits = np.roll(truth["oracles"]["random_5"], 2, axis=0)
    extra = {"oracle_matching": ({"final_loss": np.full(K, 0.25)}, {}),
             "mu_mis": ({"stopped_by": np.array([0, 0, 1, 0, 2, 1], np.int8), "steps": np.arange(K) + 3.0}, {}),
             "perfect__x3": ({}, {"method": "perfect", "budget": 3.0, "label": "perfect@3x"})}
    for name, (diag, attrs) in extra.items():
        passes, seconds = np.full(K, 40.0), np.full(K, 0.05)
        write_store(run_dir / "unlearned" / "random_5" / f"{name}.zarr",
                    {"logits": om_logits, "seconds": seconds, "example_passes": passes, "done": np.ones(K, bool),
                     **diag}, "unlearned", {"method": name, "forget_set": "random_5", **attrs})
        truth["unlearned"]["random_5"][attrs.get("label", name)] = {"logits": om_logits, "seconds": seconds,
                                                                    "passes": passes}
    # random_8's retraining timed one model alone (the unlearn stage's timing store): the seconds basis
    write_store(run_dir / "unlearned" / "random_8" / "_retrain_timing.zarr",
                {"seconds": np.array([0.9]), "done": np.ones(1, bool)}, "retrain_timing", {})
    # An unfinished store: half its models done.
    write_store(run_dir / "unlearned" / "random_5" / "gradient_ascent.zarr",
                {"logits": np.zeros((K, T, C), np.float32), "seconds": np.zeros(K),
                 "example_passes": np.zeros(K), "done": np.arange(K) < 3},
                "unlearned", {"method": "gradient_ascent", "forget_set": "random_5"})
    write_store(run_dir / "models.zarr", arrays, "models",
                {"k": K, "om_oracles": OM, "floor_oracles": True, "epochs": EPOCHS, "n_train": N, "n_targets": T, "num_classes": C,
                 "targets": {"train": [0, N], "test": [N, T]}})
    write_store(run_dir / "datamodels" / "lasso.zarr", {}, "datamodels",
                {"lds_mean": 0.41, "lds_margin_mean": 0.45, "lds_margin_test_mean": 0.312,
                 "lds_test_mean": 0.287, "lds_margin_train_mean": 0.623, "lds_curve": LDS_CURVES["lasso"]})
    write_store(run_dir / "datamodels" / "trak.zarr", {}, "datamodels",
                {"lds_mean": 0.3, "lds_curve": LDS_CURVES["trak"]})
    linear = linear_experiment(iters=200, seeds=(0,))
    metrics = build_report(run_dir, labels, seed=SEED, linear=linear)
    return run_dir, metrics, truth


def point_sets(fs):
    forget = np.array(FORGET_SETS[fs])
    return {"forget": forget, "retain": np.setdiff1d(np.arange(N), forget), "validation": np.arange(N, T)}


def slow_klom_point(u: np.ndarray, o: np.ndarray) -> float:
    """docs/methods.md §4 for one point, with np.histogram (last bin closed), independent of unlearning.klom."""
    u, o = np.clip(u, -100, 100), np.clip(o, -100, 100)
    lo, hi = min(u.min(), o.min()), max(u.max(), o.max())
    if lo == hi:
        return 0.0
    p = np.histogram(u, bins=N_BINS, range=(lo, hi))[0] / len(u)
    q = np.maximum(np.histogram(o, bins=N_BINS, range=(lo, hi))[0] / len(o), 1e-5)
    return float(entropy(p, q / q.sum()))


def test_klom_matches_an_independent_computation(run):
    _, metrics, truth = run
    labels = truth["labels"]
    for fs in FORGET_SETS:
        oracle_m = margins(truth["oracles"][fs], labels)
        for method in METHODS:
            u = margins(truth["unlearned"][fs][method]["logits"], labels)
            expected = klom_summary(klom(u, oracle_m), point_sets(fs))
            got = metrics["forget_sets"][fs]["methods"][method]["klom"]
            for s in expected:
                for stat in ("p95", "p99", "mean"):
                    assert got[s][stat] == pytest.approx(expected[s][stat], rel=1e-12, abs=1e-12)
            # per-point reference from np.histogram, summarised with np.percentile
            forget = point_sets(fs)["forget"]
            slow = np.array([slow_klom_point(oracle_m[:, j], u[:, j]) for j in forget])  # p = the oracles
            assert got["forget"]["p95"] == pytest.approx(np.percentile(slow, 95), rel=1e-9, abs=1e-12)
            assert got["forget"]["mean"] == pytest.approx(slow.mean(), rel=1e-9, abs=1e-12)
            # the headline's bootstrap interval, recomputed with the evaluation's seed and replicates
            ci = metrics["forget_sets"][fs]["methods"][method]["klom_interval"]
            again = klom_intervals(u, oracle_m, point_sets(fs), n_rep=N_SUBSAMPLES, level=INTERVAL_LEVEL, seed=SEED)
            for name, entry in again.items():
                for stat, interval in entry.items():
                    assert ci[name][stat] == pytest.approx(interval, rel=1e-12)
            avg = np.mean([got[s]["p99"] for s in POINT_SETS])
            assert ci["p99_avg"]["p99"][0] <= avg * 1.5 and ci["p99_avg"]["p99"][1] >= avg / 1.5


def assert_same_klom(got: dict, expected: dict):
    assert got.keys() == expected.keys()
    for s in expected:
        for stat in ("p95", "p99", "mean"):
            assert got[s][stat] == pytest.approx(expected[s][stat], rel=1e-12, abs=1e-12)


def test_oracle_floor_scores_the_floor_oracles_against_the_reference(run):
    """random_5: its K floor oracles (rows K+OM..) in the unlearned models' place, against the K reference
    oracles (rows ..K), from the stored logits; random_8 (floor oracles unfinished): two halves of the reference,
    and a note saying so."""
    run_dir, metrics, truth = run
    labels = truth["labels"]
    stored = zarr.open_group(str(run_dir / "models.zarr"), mode="r")
    for fs in FORGET_SETS:
        logits = stored[f"oracle/{fs}/logits"][:]
        reference = margins(logits[:K], labels)
        got = metrics["forget_sets"][fs]["oracle_floor"]
        if FLOOR_DONE[fs]:
            expected = klom(margins(logits[K + OM:], labels), reference)
            assert got["kind"] == "floor_oracles" and got["n_models_per_side"] == K
            # the floor in the other direction: the floor oracles' histogram first
            reverse = klom(reference, margins(logits[K + OM:], labels))
            assert_same_klom(got["klom_reverse"], klom_summary(reverse, point_sets(fs)))
            np.testing.assert_array_equal(logits[K + OM:], truth["floor_oracles"][fs])
        else:
            expected = oracle_floor(reference, SEED)
            assert got["kind"] == "half_split" and got["n_models_per_side"] == K // 2
        assert_same_klom(got["klom"], klom_summary(expected, point_sets(fs)))
        assert set(got["klom_interval"]) == {*POINT_SETS, "p99_avg"}
    assert any(s.startswith("forget set random_8: its floor oracles are not all trained") and "(3 vs 3)" in s
               for s in metrics["skipped"])
    assert not any(s.startswith("forget set random_5: its floor") for s in metrics["skipped"])


def test_oracle_floor_falls_back_to_the_half_split_without_floor_oracles(run, tmp_path):
    """The same run with models.floor_oracles off: every floor splits the reference oracles, K/2 vs K/2, whatever
    the rows after them hold. A store from before the floor oracles (no such attr) reads as off. (No unlearned
    stores in the copy: the floor needs only the oracles, and the report stays quick.)"""
    run_dir, _, truth = run
    copy = tmp_path / "off"
    shutil.copytree(run_dir / "models.zarr", copy / "models.zarr")
    shutil.copy(run_dir / "forget_sets.json", copy)
    group = zarr.open_group(str(copy / "models.zarr"), mode="r+")
    group.attrs["floor_oracles"] = False
    metrics = build_report(copy, truth["labels"], seed=SEED)
    for fs in FORGET_SETS:
        got = metrics["forget_sets"][fs]["oracle_floor"]
        assert got["kind"] == "half_split" and got["n_models_per_side"] == K // 2
        expected = oracle_floor(margins(truth["oracles"][fs], truth["labels"]), SEED)
        assert_same_klom(got["klom"], klom_summary(expected, point_sets(fs)))
    assert not any("floor oracles" in s for s in metrics["skipped"])
    md = (copy / "report" / "report.md").read_text()
    assert f"| oracle floor ({K // 2} vs {K // 2}) |" in md and f"oracle floor ({K} vs {K})" not in md.lower()
    del group.attrs["floor_oracles"]
    assert stored_oracle_rows(group) == {"reference": slice(0, K), "om": slice(K, K + OM),
                                         "floor": slice(K + OM, K + OM)}


def test_more_models_per_side_lower_the_floor():
    """Why the report wants the floor oracles: samples of one distribution, K vs K (the floor oracles against the
    reference) score lower than K/2 vs K/2 (two halves of the reference) at almost every quantile, from
    sampling noise alone; a method that retrains with fresh seeds scores the K-vs-K floor, not the half split."""
    rng = np.random.default_rng(0)
    k, n_points = 40, 400
    centre, spread = rng.normal(0, 3, n_points), rng.uniform(0.5, 2.0, n_points)  # one distribution per point
    reference, fresh = (rng.normal(centre, spread, (k, n_points)) for _ in range(2))
    full = klom(fresh, reference)
    half = oracle_floor(reference, seed=0)
    assert full.mean() < 0.7 * half.mean()
    assert np.percentile(full, 95) < np.percentile(half, 95)


def test_perfect_method_scores_the_floor_and_doing_nothing_does_not(run):
    _, metrics, _ = run
    for fs in FORGET_SETS:
        m = metrics["forget_sets"][fs]["methods"]
        # identical samples: KLOM = log(1 + (empty bins) eps) <= log(1 + 20e-5)
        assert all(m["perfect"]["klom"][s]["p99"] <= np.log1p(N_BINS * 1e-5) for s in point_sets(fs))
        assert m["do_nothing"]["klom"]["forget"]["p95"] > 5.0
        assert m["bad"]["klom"]["validation"]["mean"] > 5.0


def test_accuracies_mia_and_cost_match_hand_computation(run):
    _, metrics, truth = run
    labels = truth["labels"]
    for fs in FORGET_SETS:
        sets = point_sets(fs)
        f = metrics["forget_sets"][fs]
        oracle_seconds = np.mean(1.5 + 0.1 * np.arange(K))  # the first K oracles only
        retrain_passes = EPOCHS * (N - len(FORGET_SETS[fs]))
        for method in METHODS:
            t = truth["unlearned"][fs][method]
            got = f["methods"][method]
            for name, s in (("forget", "forget"), ("retain", "retain"), ("test", "validation")):
                correct = sum(int(np.argmax(t["logits"][m, j]) == labels[j])
                              for m in range(K) for j in sets[s])
                assert got["accuracy"][name] == pytest.approx(correct / (K * len(sets[s])), rel=1e-12)
            cost = got["cost"]
            assert cost["passes_fraction"] == pytest.approx(t["passes"].mean() / retrain_passes, rel=1e-12)
            basis = 0.9 if fs == "random_8" else oracle_seconds
            assert cost["seconds_fraction"] == pytest.approx(t["seconds"].mean() / basis, rel=1e-9)
            assert got["cost"]["seconds"] == pytest.approx(t["seconds"].mean(), rel=1e-9)
            if fs != "random_8":
                continue  # one forget set is enough for the MIA (each attack is 5 cross-validated fits)
            losses = per_example_loss(t["logits"], labels)
            mia = np.mean([population_mia(losses[m, sets["forget"]], losses[m, sets["validation"]], SEED + m)
                           for m in range(K)])
            assert got["mia"] == pytest.approx(mia, rel=1e-12)
        r = f["retrain"]
        # random_8 has its retraining timed alone (the basis of every method's seconds); random_5 falls back
        # to the packed oracles' seconds per model
        timed = 0.9 if fs == "random_8" else oracle_seconds
        assert r["cost"]["passes_fraction"] == 1.0 and r["cost"]["seconds"] == pytest.approx(timed)
        correct = (truth["oracles"][fs].argmax(-1)[:, sets["retain"]] == labels[sets["retain"]]).mean()
        assert r["accuracy"]["retain"] == pytest.approx(correct)


def test_shift_and_spread_match_an_independent_computation(run):
    _, metrics, truth = run
    labels = truth["labels"]
    for fs in FORGET_SETS:
        o = margins(truth["oracles"][fs], labels).astype(np.float64)
        for method in METHODS:
            u = margins(truth["unlearned"][fs][method]["logits"], labels).astype(np.float64)
            got = metrics["forget_sets"][fs]["methods"][method]["margins"]
            for name, idx in point_sets(fs).items():
                shift = (u[:, idx].mean(0) - o[:, idx].mean(0)).mean()
                assert got[name]["mean_shift"] == pytest.approx(shift, rel=1e-9, abs=1e-12)
                assert got[name]["spread"] == pytest.approx(np.median(u[:, idx].std(0) / o[:, idx].std(0)), rel=1e-9)
        # "perfect" holds the oracles' own margins, rolled across models: no shift, the same spread
        perfect = metrics["forget_sets"][fs]["methods"]["perfect"]["margins"]
        for name in ("forget", "retain", "validation"):
            assert perfect[name]["spread"] == pytest.approx(1.0, abs=1e-12)
            assert perfect[name]["mean_shift"] == pytest.approx(0.0, abs=1e-6)


def test_metrics_json_and_markdown(run):
    run_dir, metrics, _ = run
    out = run_dir / "report"
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == metrics and on_disk["k"] == K
    assert on_disk["forget_sets"]["random_5"]["size"] == 5
    assert on_disk["datamodels"]["lasso"]["lds_mean"] == 0.41
    assert on_disk["linear"]["methods"]["om"]["label"] == "OM (all points)"
    md = (out / "report.md").read_text()
    # LDS on test targets first, training targets in their own column; TRAK lacks them: dashes
    assert "| lasso | 0.312 | 0.287 | 0.623 | 300: 0.27, 600: 0.37, 1200: 0.45 |" in md
    assert "| trak | – | – | – | 10: 0.32, 50: 0.48 |" in md
    for fs in FORGET_SETS:
        assert f"## Forget set `{fs}`" in md
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    for method in (*METHODS, "retrain (oracles)"):
        assert sum(line.startswith(f"| {method} |") for line in rows) == len(FORGET_SETS), method
    # random_5 scores its floor oracles (K vs K), random_8 falls back to the half split; the prose names both
    for floor in (f"oracle floor ({K} vs {K})", f"oracle floor ({K // 2} vs {K // 2})"):
        assert sum(line.startswith(f"| {floor} |") for line in rows) == 1, floor
        assert f"\n{floor.capitalize()}" in md
    assert on_disk["forget_sets"]["random_5"]["oracle_floor"]["kind"] == "floor_oracles"
    do_nothing = next(line for line in rows if line.startswith("| do_nothing |"))
    entry = metrics["forget_sets"]["random_5"]["methods"]["do_nothing"]
    p99s = [entry["klom"][s]["p99"] for s in POINT_SETS]
    p95s = [entry["klom"][s]["p95"] for s in POINT_SETS]
    lo, hi = entry["klom_interval"]["p99_avg"]["p99"]
    cells = do_nothing.split(" | ")
    assert cells[1] == f"{np.mean(p99s):.3g} [{lo:.3g}, {hi:.3g}]"  # the headline: the paper's p99 average
    floor_lo, floor_hi = metrics["forget_sets"]["random_5"]["oracle_floor"]["klom_interval"]["p99_avg"]["p99"]
    assert cells[2] == ("above" if lo > floor_hi else "below" if hi < floor_lo else "≈")
    assert cells[3] == " / ".join(f"{v:.3g}" for v in p99s)
    assert cells[4] == " / ".join(f"{v:.3g}" for v in p95s)
    assert cells[5] == f"{np.mean([entry['klom_reverse'][s]['p99'] for s in POINT_SETS]):.3g}"
    assert cells[9] == f"{entry['margins']['retain']['spread']:.3g}"
    # method against method: the symbol of each pair from the two headline intervals
    intervals = {name: m["klom_interval"]["p99_avg"]["p99"]
                 for name, m in metrics["forget_sets"]["random_5"]["methods"].items()}
    section = md[md.index("## Forget set `random_5`"):md.index("## Forget set `random_8`")]
    header = next(line for line in section.splitlines() if line.startswith("| | "))
    names = header.strip("| ").split(" | ")
    assert set(names) == set(intervals)
    for line in (line for line in section.splitlines() if line.startswith("| **")):
        a, *symbols = [c.strip() for c in line.strip("|").split("|")]
        a = a.strip("*")
        for b, got in zip(names, symbols):
            (lo_a, hi_a), (lo_b, hi_b) = intervals[a], intervals[b]
            want = "" if a == b else "<" if hi_a < lo_b else ">" if lo_a > hi_b else "≈"
            assert got == want, (a, b)


def test_incomplete_store_is_skipped_and_reported(run):
    run_dir, metrics, _ = run
    assert "gradient_ascent" not in metrics["forget_sets"]["random_5"]["methods"]
    assert any("random_5/gradient_ascent" in s and "3 of 6" in s for s in metrics["skipped"])
    assert "random_5/gradient_ascent: 3 of 6 models done" in (run_dir / "report" / "report.md").read_text()
    assert "no_oracles" not in metrics["forget_sets"]
    assert any(s.startswith("forget set no_oracles: its first 6 oracles") for s in metrics["skipped"])


PNGS = ["klom_vs_cost.png", "klom_distributions.png", "lds_curve.png", "linear.png"]


def test_every_plot_linked_from_the_report_is_written(run):
    run_dir, _, _ = run
    md = (run_dir / "report" / "report.md").read_text()
    for name in PNGS:
        assert f"]({name})" in md and (run_dir / "report" / name).stat().st_size > 0


def drawn_box(values: np.ndarray) -> dict:
    """A horizontal box of `values` as matplotlib draws it with whis=(5, 95): quartiles and median by
    np.percentile, each whisker ending at the last value inside its percentile (the box edge if none)."""
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    lo, hi = np.percentile(values, [5, 95])
    return {"p5": min(q1, values[values >= lo].min()), "q1": q1, "median": median, "q3": q3,
            "p95": max(q3, values[values <= hi].max())}


def test_klom_distributions_draw_the_per_point_klom(run, tmp_path):
    """One box per method and the oracle floor (last) per forget set, of the per-point KLOM on the forget points
    recomputed here: with np.histogram for the methods, from the floor oracles (random_5) or two halves of the
    reference (random_8) for the floor. The right whisker is at most the headline p95."""
    run_dir, metrics, truth = run
    labels = truth["labels"]
    _, per_point = evaluate_run(run_dir, labels, seed=SEED)
    drawn = plot_klom_distributions(per_point, metrics, tmp_path / "klom_distributions.png")
    assert list(drawn) == list(FORGET_SETS)
    for fs, boxes in drawn.items():
        assert list(boxes)[-1] == "oracle floor" and set(boxes) == {*truth["unlearned"][fs], "oracle floor"}
        forget = point_sets(fs)["forget"]
        oracle_m = margins(truth["oracles"][fs], labels)
        for name, box in boxes.items():
            if name == "oracle floor":
                floor_m = margins(truth["floor_oracles"][fs], labels)
                values = (np.array([slow_klom_point(oracle_m[:, j], floor_m[:, j]) for j in forget])
                          if FLOOR_DONE[fs] else oracle_floor(oracle_m, SEED)[forget])
                headline = metrics["forget_sets"][fs]["oracle_floor"]["klom"]["forget"]["p95"]
            else:
                u = margins(truth["unlearned"][fs][name]["logits"], labels)
                values = np.array([slow_klom_point(oracle_m[:, j], u[:, j]) for j in forget])
                headline = metrics["forget_sets"][fs]["methods"][name]["klom"]["forget"]["p95"]
            assert box == pytest.approx(drawn_box(values), rel=1e-9, abs=1e-12), (fs, name)
            assert box["p95"] <= headline + 1e-12


def test_lds_curve_draws_each_stored_curve_in_budget_order(run, tmp_path):
    """The stores' (budget, LDS) points, one curve per datamodel, in budget order whatever the order given; a
    datamodel without a curve is not drawn."""
    _, metrics, _ = run
    drawn = plot_lds_curve(metrics["datamodels"], tmp_path / "lds_curve.png")
    assert drawn == LDS_CURVES
    assert plot_lds_curve({"lasso": {"lds_curve": [[8, 0.5], [4, 0.25]]}, "trak": {"lds_mean": 0.3}},
                          tmp_path / "one.png") == {"lasso": [[4, 0.25], [8, 0.5]]}


def test_bad_input_is_a_clear_error(run, tmp_path):
    run_dir, _, truth = run
    with pytest.raises(ValueError, match=r"shape \(40,\)"):
        build_report(run_dir, truth["labels"][:-1])
    with pytest.raises(ValueError, match="integer"):
        build_report(run_dir, truth["labels"].astype(float))
    with pytest.raises(StoreError, match="no store"):
        build_report(tmp_path, truth["labels"])


def test_cost_counts_everything_a_request_needs(run):
    """Oracle Matching's cost: its own passes and seconds plus, per OM oracle, a retraining (EPOCHS x |retain|
    passes and the retraining seconds) and its forward passes on the N training points (1/3 pass each)."""
    _, metrics, truth = run
    om = metrics["forget_sets"]["random_5"]["methods"]["oracle_matching"]["cost"]
    retain = N - len(FORGET_SETS["random_5"])
    oracle_seconds = np.mean(1.5 + 0.1 * np.arange(K))
    assert om["example_passes"] == pytest.approx(40.0 + OM * (EPOCHS * retain + N / 3), rel=1e-12)
    assert om["passes_fraction"] == pytest.approx((40.0 + OM * (EPOCHS * retain + N / 3)) / (EPOCHS * retain))
    assert om["seconds"] == pytest.approx(0.05 + OM * oracle_seconds, rel=1e-12)
    assert om["method_passes"] == 40.0 and om["oracle_passes"] == pytest.approx(OM * (EPOCHS * retain + N / 3))
    # the others: what their stores say, nothing added
    perfect = metrics["forget_sets"]["random_5"]["methods"]["perfect"]["cost"]
    assert perfect["example_passes"] == 30.0 and perfect["oracle_passes"] == 0.0


def test_diagnostics_lira_and_the_bench_convention(run):
    _, metrics, truth = run
    methods = metrics["forget_sets"]["random_5"]["methods"]
    assert methods["mu_mis"]["diagnostics"] == {"stopped_by": {"delta": 3, "max_steps": 2, "non_finite": 1, "gap_closed": 0},
                                                "steps": {"mean": 5.5, "min": 3.0, "max": 8.0}}
    om = methods["oracle_matching"]["diagnostics"]
    assert om["final_matching_loss"] == 0.25
    # its residuals to its own targets, brute force: the mean logits of the store's OM oracles (om_target mean)
    z = truth["unlearned"]["random_5"]["oracle_matching"]["logits"][:, :N].astype(np.float64)
    om_oracles = truth["oracles"]["random_5"][:OM] + 50.0 * np.eye(C, dtype=np.float32)[(truth["labels"] + 1) % C]
    target = np.broadcast_to(om_oracles[:, :N].astype(np.float64).mean(0), z.shape)
    forget5 = np.array(FORGET_SETS["random_5"])
    retain5 = np.setdiff1d(np.arange(N), forget5)
    for name, idx in (("forget_mse", forget5), ("retain_mse", retain5)):
        expected = [float(((z[m][idx] - target[m][idx]) ** 2).mean()) for m in range(K)]
        np.testing.assert_allclose(om["residuals"][name], expected, rtol=1e-6)  # targets: float32 mean
    full_z = truth["unlearned"]["random_5"]["do_nothing"]["logits"][:, :N].astype(np.float64)
    y = truth["labels"][forget5]
    m, m0, mt = (margins(a[:, forget5], y) for a in (z, full_z, target))
    expected = [float(np.dot(m[i] - m0[i], mt[i] - m0[i]) / np.dot(mt[i] - m0[i], mt[i] - m0[i])) for i in range(K)]
    np.testing.assert_allclose(om["residuals"]["forget_margin_progress"], expected, rtol=1e-6)
    assert methods["perfect"]["diagnostics"] == {}
    labels, forget = truth["labels"], np.array(FORGET_SETS["random_5"])
    oracle = margins(truth["oracles"]["random_5"], labels)
    full = margins(truth["unlearned"]["random_5"]["do_nothing"]["logits"], labels)
    floor = margins(truth["floor_oracles"]["random_5"], labels)
    for name in ("do_nothing", "perfect"):
        u = margins(truth["unlearned"]["random_5"][name]["logits"], labels)
        expected = lira_mia(u[:, forget], floor[:, forget], full[:, forget], oracle[:, forget])
        assert methods[name]["lira"] == pytest.approx(expected, rel=1e-12)
        edub = klom_summary(klom(u, oracle, convention="edub"), point_sets("random_5"))
        reverse = klom_summary(klom(oracle, u), point_sets("random_5"))  # KL(unlearned || oracle), written out
        for s in POINT_SETS:
            assert methods[name]["klom_edub"][s] == pytest.approx(edub[s], rel=1e-12)
            assert methods[name]["klom_reverse"][s] == pytest.approx(reverse[s], rel=1e-12)
    assert methods["do_nothing"]["lira"]["auc"] > 0.8  # the full models: members, and the test sees it
    # random_8 has no floor oracles: no held-out negatives, no LiRA
    assert metrics["forget_sets"]["random_8"]["methods"]["do_nothing"]["lira"] is None


def test_plotted_data_is_metrics_json(run):
    """klom_vs_cost.json, what the Figure-2 plot drew, against metrics.json: per forget set and panel, one
    curve per method through its budgets at (passes fraction, KLOM p99), the floor's p99 as the band."""
    run_dir, _, _ = run
    on_disk = json.loads((run_dir / "report" / "metrics.json").read_text())
    drawn = json.loads((run_dir / "report" / "klom_vs_cost.json").read_text())
    assert set(drawn) == set(on_disk["forget_sets"])
    for fs, panels in drawn.items():
        m = on_disk["forget_sets"][fs]
        assert list(panels) == ["forget", "retain", "validation", "average"]
        for panel, d in panels.items():
            def p99(k):
                return np.mean([k[s]["p99"] for s in POINT_SETS]) if panel == "average" else k[panel]["p99"]
            assert d["floor"] == pytest.approx(p99(m["oracle_floor"]["klom"]))
            points = sum(len(c) for c in d["curves"].values())
            assert points == len(m["methods"])
            for label, entry in m["methods"].items():
                curve = d["curves"][label.split("@")[0]]
                assert [entry["cost"]["passes_fraction"], pytest.approx(p99(entry["klom"]))] in curve
    # "perfect" at budgets 1 and 3: one curve of two points, in cost order
    curve = drawn["random_5"]["forget"]["curves"]["perfect"]
    assert len(curve) == 2 and curve[0][0] <= curve[1][0]


def test_grid_edges_name_choices_at_an_end_of_their_grid():
    grid = {"scrub": {"lr": [2e-3, 8e-3, 3e-2]}, "gd": {"lr": [0.1, 0.01, 0.03], "epochs": [5]},
            "mu_mis": {"delta": [1.02, 1.05, 1.1]}, "om": {"lr": [1e-3, 1e-2]}}
    chosen = {"scrub": {"lr": 3e-2, "max_steps": 5}, "gd": {"lr": 0.01, "epochs": 5}, "mu_mis": {"delta": 1.05},
              "om": {"lr": 1e-2}}
    # gd's grid is unordered in the config: its lowest value is 0.01; a one-value axis has no edge
    assert grid_edges(grid, chosen) == {"scrub": {"lr": "highest"}, "gd": {"lr": "lowest"}, "om": {"lr": "highest"}}


@pytest.mark.slow
def test_diverged_models_are_left_out_and_named(run, tmp_path):
    """Unlearning that diverged (non-finite logits: gradient ascent past its budget) is scored over the models that
    did not diverge, and the report says how many did; a variant whose models all diverged is skipped, named."""
    run_dir, _, truth = run
    copy = tmp_path / "diverged"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "report")
    labels, fs = truth["labels"], "random_8"
    logits = np.roll(truth["oracles"][fs], 3, axis=0) + 0.3
    logits[[1, 4], 5] = np.nan
    logits[4, 7, 0] = np.inf
    for name, values in (("neggrad_plus__x3", logits), ("gradient_ascent__x3", np.full_like(logits, np.nan))):
        method = name.split("__")[0]
        write_store(copy / "unlearned" / fs / f"{name}.zarr",
                    {"logits": values, "seconds": np.full(K, 0.1), "example_passes": np.full(K, 9.0),
                     "done": np.ones(K, bool)}, "unlearned",
                    {"method": method, "forget_set": fs, "budget": 3.0, "label": f"{method}@3x"})
    metrics = build_report(copy, labels, seed=SEED)
    got = metrics["forget_sets"][fs]["methods"]["neggrad_plus@3x"]
    assert got["diagnostics"]["diverged"] == 2
    kept = logits[[0, 2, 3, 5]]
    expected = klom_summary(klom(margins(kept, labels), margins(truth["oracles"][fs], labels)), point_sets(fs))
    assert got["klom"]["forget"]["p95"] == pytest.approx(expected["forget"]["p95"], rel=1e-12)
    assert got["accuracy"]["forget"] == pytest.approx(
        float((kept[:, point_sets(fs)["forget"]].argmax(-1) == labels[point_sets(fs)["forget"]]).mean()))
    assert "gradient_ascent@3x" not in metrics["forget_sets"][fs]["methods"]
    assert any(f"{fs}/gradient_ascent@3x: all {K} models diverged" in s for s in metrics["skipped"])
    report = (copy / "report" / "report.md").read_text()
    assert "| neggrad_plus@3x (2 diverged) |" in report and "2 models diverged (non-finite logits)" in report


def test_every_curve_has_its_own_colour_and_marker():
    """mnist1d.yaml draws 11 curves (two datamodels for DM-Direct and DMM): no two may look alike."""
    from pipelines.report.plots import MARKERS, method_colors

    names = ["do_nothing", "dm_direct[lasso]", "dm_direct[trak]", "dm_matching[lasso]", "dm_matching[trak]",
             "oracle_matching", "mu_mis", "gradient_descent", "gradient_ascent", "neggrad_plus", "scrub"]
    colors = method_colors({"forget_sets": {"a": {"methods": {n: {} for n in names}}}})
    assert len(colors) == 11 and len(set(colors.values())) == 11 and len(MARKERS) >= 11


def test_draws_summary_over_random_forget_set_draws():
    """Per random size drawn several times: each method's headline per draw, their mean and sd (brute force)."""
    from pipelines.report.evaluate import draws_summary
    from pipelines.report.markdown import _draws_section

    rng = np.random.default_rng(0)

    def entry():
        return {"klom": {s: {"p99": float(rng.random() * 5)} for s in POINT_SETS}}

    forget_sets = {name: {"methods": {"dm_direct": entry(), "scrub": entry()}, "oracle_floor": entry()}
                   for name in ("random_50", "random_50_d1", "random_50_d2", "random_10", "class_0")}
    got = draws_summary(forget_sets)
    assert list(got) == ["random_50"] and got["random_50"]["draws"] == ["random_50", "random_50_d1", "random_50_d2"]
    for label in ("dm_direct", "scrub", "oracle floor"):
        values = [np.mean([(forget_sets[n]["methods"].get(label) or forget_sets[n]["oracle_floor"])["klom"][s]["p99"]
                           for s in POINT_SETS]) for n in got["random_50"]["draws"]]
        row = got["random_50"]["rows"][label]
        np.testing.assert_allclose(list(row["values"].values()), values, rtol=1e-12)
        assert row["mean"] == pytest.approx(np.mean(values)) and row["sd"] == pytest.approx(np.std(values, ddof=1))
    table = _draws_section(got)
    assert table[0] == "## Over 3 draws of `random_50`"
    assert any(line.startswith("| dm_direct | ") for line in table)
