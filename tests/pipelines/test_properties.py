"""Property tests (hypothesis) through the `dmu` CLI: any config or forget-id input either works
(exit 0) or gets one clear line `dmu: error: ...` and exit 2, never a traceback, and a deletion request never
changes the run's stores.

Configs go through `dmu run` (load_config, the run lock, run_stages' stage check and config.json) with the
stages replaced by no-ops, except that `unlearn` runs what the real stage does before any work (check_methods),
so nothing trains. Forget ids go through `dmu unlearn` on one tiny real run (tests/pipelines/conftest.py's
build_run), with the cheap methods only.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import pipelines.stages
from pipelines.cli import main
from pipelines.config import validate
from tests.pipelines.conftest import build_run

# ---- helpers -----------------------------------------------------------------------------------------------


def call(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) -> (exit status, stdout, stderr); argparse's SystemExit counts as its code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse
            rc = exc.code if isinstance(exc.code, int) else 2
    return rc, out.getvalue(), err.getvalue()


def assert_works_or_one_clear_error(rc: int, stdout: str, stderr: str) -> None:
    assert rc in (0, 2), (rc, stderr)
    assert "Traceback" not in stderr and "Traceback" not in stdout
    if rc == 2:
        lines = stderr.strip("\n").splitlines()
        assert len(lines) == 1 and lines[0].startswith("dmu: error: ") and lines[0][len("dmu: error: "):].strip(), \
            stderr


# ---- configs through `dmu run` -----------------------------------------------------------------------------

# tests/conftest.py's small_config / tests/pipelines/conftest.py's stage_config, as YAML would hold it
BASE = {
    "name": "t", "seed": 7, "stages": ["forget_sets", "models", "unlearn"],
    "task": {"name": "mnist1d", "arch": "cnn", "n_train": 200, "n_test": 50,
             "recipe": {"epochs": 8, "batch_size": 32, "lr": 1.0e-3}},
    "subsets": {"n_models": 12, "alpha": 0.5, "block_size": 4, "keep_params": 0, "logits_dtype": "float32"},
    "datamodels": {"methods": ["lasso"], "n_lds": 4, "n_val": 4, "target_chunk": 128, "lds_curve": [4]},
    "forget_sets": {"random_sizes": [10], "full_class": 0, "pc_top_k": 0, "pc_ends": 0},
    "models": {"k": 2, "om_target": "mean", "om_oracles": 1, "floor_oracles": True, "block_size": 2},
    "unlearn": {"methods": ["do_nothing", "dm_direct"], "datamodels": ["lasso"],
                "hparams": {"mu_mis": {"max_steps": 20}, "gradient_ascent": {"lr": 1.0e-2}}},
    "executor": {"kind": "serial", "cpus_per_unit": 1},
}


def key_paths(d: dict, prefix: tuple = ()) -> list[tuple]:
    paths = []
    for k, v in d.items():
        paths.append(prefix + (k,))
        if isinstance(v, dict):
            paths += key_paths(v, prefix + (k,))
    return paths


KNOWN_PATHS = key_paths(BASE) + [("run_dir",), ("task", "recipe", "optimizer"), ("task", "recipe", "schedule"),
                                 ("executor", "num_cpus"), ("executor", "gpus_per_unit"),
                                 ("unlearn", "hparams", "dm_matching"), ("unlearn", "hparams", "dm_matching", "epochs")]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.sampled_from([0, -1, 1, 2**63, -(2**63), 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 1.5]),
    st.text(max_size=12),
    st.sampled_from(["do_nothing", "dm_direct", "retrain", "lasso", "trak", "ray", "serial", "float16", "report",
                     "forget_sets", "cnn", "mlp", "mnist1d", "2001-12-14", "0x10", "1e3", "~", "yes", "on"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.text(max_size=8), st.integers(), st.booleans(), st.none()), inner, max_size=4)),
    max_leaves=8)
unknown_keys = st.one_of(st.text(max_size=10), st.integers(), st.booleans(), st.none(), st.floats())
paths = st.one_of(
    st.sampled_from(KNOWN_PATHS),
    st.tuples(st.sampled_from([()] + [p for p in KNOWN_PATHS]), unknown_keys).map(lambda t: t[0] + (t[1],)),
)
# a mutation: (path, value) sets it (creating mappings on the way), (path, None-marker) deletes it
DELETE = object()
mutations = st.lists(st.tuples(paths, st.one_of(values, st.just(DELETE))), min_size=0, max_size=4)


def mutate(base: dict, changes: list) -> object:
    data = json.loads(json.dumps(base))
    for path, value in changes:
        node = data
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        if value is DELETE:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    return data


def to_yaml(data) -> str:
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


config_texts = st.one_of(
    st.builds(mutate, st.just(BASE), mutations).map(to_yaml),
    # the whole document of another type, or random text (mostly not YAML, or YAML of the wrong shape)
    values.map(to_yaml),
    st.text(max_size=80),
    st.sampled_from(["", "---\n", "a: [1, 2\n", "{", ": :", "stages: !!python/tuple [1]\n", "\t- x\n",
                     "name: &a [*a]\n", "task: {recipe: {lr: .nan}}\n", "unlearn: {hparams: {dm_direct: 3}}\n",
                     "unlearn: {hparams: {dm_direct: [[1]]}}\n", "unlearn: {hparams: {x: 2001-12-14}}\n",
                     "unlearn: {hparams: {dm_matching: {epochs: 2001-12-14}}}\n", "1: 2\n", "null: 1\n",
                     "true: 1\n", "task: {1.5: x}\n", "seed: !!binary aGVsbG8=\n", "name: !!binary aGVsbG8=\n"]),
    # a valid config with random text appended or spliced in
    st.tuples(st.builds(mutate, st.just(BASE), mutations).map(to_yaml), st.text(max_size=20),
              st.integers(0, 400)).map(lambda t: t[0][:t[2]] + t[1] + t[0][t[2]:]),
)


def fake_stages() -> dict:
    """The real stage names; each a no-op except `unlearn`, which does what the real stage does before any work."""
    stages = {name: (lambda ctx: None) for name in pipelines.stages.STAGES}
    stages["unlearn"] = lambda ctx: validate(ctx.cfg)
    return stages


@pytest.mark.slow
@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=config_texts, stages=st.one_of(st.none(), st.just("unlearn"), st.just("forget_sets,unlearn"),
                                           st.just("bogus"), st.text(max_size=10).filter(lambda s: s[:1] != "-")))
def test_any_config_works_or_is_one_error_line(text, stages):
    with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(pipelines.stages.STAGES, fake_stages()):
        path = Path(tmp) / "config.yaml"
        path.write_text(text, encoding="utf-8")
        argv = ["run", str(path), "--run-dir", str(Path(tmp) / "run")] + ([f"--stages={stages}"] if stages else [])
        rc, out, err = call(argv)
        event(f"exit {rc}")
        assert_works_or_one_clear_error(rc, out, err)
        if rc == 0:  # the run's config.json was written, and reads back
            assert json.loads((Path(tmp) / "run" / "config.json").read_text())["name"] is not None
        assert not (Path(tmp) / "run" / ".dmu.lock").exists()  # the lock is released either way


def test_config_property_base_is_valid(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(BASE))
    with mock.patch.dict(pipelines.stages.STAGES, fake_stages()):
        assert call(["run", str(path), "--run-dir", str(tmp_path / "run")])[0] == 0


# ---- forget ids through `dmu unlearn` ----------------------------------------------------------------------

N_TRAIN = 200


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny run of the stage tests (forget sets, K = 2 full models, oracles, a hand datamodel store) and the hash
    of every file under it."""
    _, ctx, _ = build_run(tmp_path_factory.mktemp("props"), unlearn=False)
    return ctx.run_dir, tree_hash(ctx.run_dir)


def tree_hash(root) -> dict[str, str]:
    root = Path(str(root))
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


in_range = st.integers(0, N_TRAIN - 1)
some_ints = st.one_of(in_range, st.integers(), st.sampled_from([-1, N_TRAIN, 2**63, -(2**63) - 1, 10**40]))
id_lists = st.one_of(st.lists(in_range, max_size=12), st.lists(in_range, min_size=1, max_size=6).map(lambda x: x + x),
                     st.lists(some_ints, max_size=8), st.just(list(range(N_TRAIN))))
separators = st.sampled_from([" ", ",", "\n", ", ", "\t", ",,", " , "])
json_items = st.one_of(some_ints, st.floats(), st.text(max_size=4), st.none(), st.booleans(),
                       st.lists(in_range, max_size=3))

text_contents = st.one_of(
    st.tuples(id_lists, separators).map(lambda t: t[1].join(str(i) for i in t[0])),
    id_lists.map(json.dumps),
    st.lists(json_items, max_size=6).map(lambda x: json.dumps(x)),
    st.lists(st.floats(), max_size=5).map(lambda x: " ".join(map(str, x))),
    st.text(max_size=40),
    st.sampled_from(["", "\n", "[]", "[[1, 2], [3]]", "{\"ids\": [1]}", "1e3", "0x1f", "1_000", "+5", "-0",
                     "٣", "１２", "nan", "inf", "[1, 2,]", "1\x002", "\ufeff1 2"]),
).map(lambda s: s.encode("utf-8"))

npy_dtypes = st.one_of(hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(), hnp.floating_dtypes(),
                       hnp.boolean_dtypes(), hnp.complex_number_dtypes(), hnp.datetime64_dtypes(),
                       hnp.timedelta64_dtypes(), hnp.byte_string_dtypes(max_len=3),
                       hnp.unicode_string_dtypes(max_len=3))


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


npy_arrays = st.one_of(
    hnp.arrays(npy_dtypes, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)),
    hnp.arrays(st.sampled_from([np.int64, np.int32, np.uint8, np.int8, np.uint64]),
               hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=6), elements=st.integers(0, 127)),
    st.just(np.array([1, "a"], dtype=object)),
    st.just(np.zeros(3, dtype=[("a", "i8"), ("b", "f4")])),
)
npy_contents = st.one_of(
    npy_arrays.map(npy_bytes),
    st.binary(max_size=64),
    st.tuples(npy_arrays.map(npy_bytes), st.integers(0, 200)).map(lambda t: t[0][:t[1]]),  # truncated
)

# requests that should work: unique in-range ids as text, JSON or .npy of an integer dtype
valid_ids = st.lists(st.integers(0, 127), min_size=1, max_size=20, unique=True)
valid_files = st.one_of(
    st.tuples(valid_ids, separators).map(lambda t: (t[1].join(map(str, t[0])).encode(), ".txt")),
    valid_ids.map(lambda ids: (json.dumps(ids).encode(), ".json")),
    st.tuples(valid_ids, st.sampled_from([np.int64, np.int32, np.uint8, np.int8, np.uint16])).map(
        lambda t: (npy_bytes(np.array(t[0], dtype=t[1])), ".npy")),
)
forget_files = st.one_of(
    valid_files, valid_files,
    st.tuples(text_contents, st.sampled_from([".txt", ".json", "", ".npy", ".NPY"])),
    st.tuples(npy_contents, st.sampled_from([".npy", ".npy", ".txt", ".json", ""])),
)
CHEAP_METHODS = ["do_nothing", "dm_direct", "gradient_ascent"]
methods = st.one_of(st.sampled_from(CHEAP_METHODS), st.sampled_from(CHEAP_METHODS),
                    st.sampled_from(["retrain", "oracle_matching", "dm_matchin", "", " do_nothing", "DO_NOTHING"]),
                    st.text(max_size=12))
models = st.one_of(st.just(0), st.just(1), st.sampled_from([2, -1, 2**70]))


@pytest.mark.slow
@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(forget=forget_files, method=methods, model=models)
def test_any_request_works_or_is_one_error_line_and_keeps_the_stores(tiny_run, forget, method, model):
    run_dir, before = tiny_run
    content, suffix = forget
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"ids{suffix}"
        path.write_bytes(content)
        out = Path(tmp) / "out" / "unlearned.pt"
        rc, stdout, stderr = call(["unlearn", "--run", str(run_dir), f"--forget={path}", f"--method={method}",
                                   f"--model={model}", f"--out={out}"])
        event(f"exit {rc}, method {method if method in CHEAP_METHODS else 'other'}")
        assert_works_or_one_clear_error(rc, stdout, stderr)
        assert out.exists() == (rc == 0)
    assert tree_hash(run_dir) == before


@pytest.mark.parametrize("make", ["directory", "missing"])
def test_forget_path_that_is_no_file_is_one_error_line(tiny_run, tmp_path, make):
    run_dir, before = tiny_run
    path = tmp_path / "ids"
    if make == "directory":
        path.mkdir()
    rc, stdout, stderr = call(["unlearn", "--run", str(run_dir), "--forget", str(path), "--method", "do_nothing",
                               "--out", str(tmp_path / "out.pt")])
    assert_works_or_one_clear_error(rc, stdout, stderr)
    assert rc == 2 and tree_hash(run_dir) == before
