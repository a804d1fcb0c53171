import warnings

import numpy as np
import pytest
import zarr

from attribution.store import ArraySpec, StoreError, open_or_create, open_store, summary

SPEC = {"x": ArraySpec((8, 3), "float32", (4, 3)), "done": ArraySpec((8,), "bool", (4,), False)}


def test_create_then_reopen_keeps_data(tmp_path):
    g = open_or_create(tmp_path / "s.zarr", SPEC, kind="k", config={"a": 1, "b": {"c": [1, 2]}})
    g["x"][:4] = 1.0
    g["done"][:4] = True
    g2 = open_or_create(tmp_path / "s.zarr", SPEC, kind="k", config={"a": 1, "b": {"c": (1, 2)}})
    np.testing.assert_array_equal(g2["x"][:4], 1.0)
    info = summary(tmp_path / "s.zarr")
    assert info["completion"] == {".": [4, 8]}
    # a plain zarr reader sees the same
    assert zarr.open_group(str(tmp_path / "s.zarr"), mode="r").attrs["config"]["b"]["c"] == [1, 2]


def test_config_drift_is_refused_naming_keys(tmp_path):
    g = open_or_create(tmp_path / "s.zarr", SPEC, kind="k", config={"a": 1, "b": {"c": 2}})
    g["x"][:] = 5.0
    with pytest.raises(StoreError, match=r"b\.c \(2 -> 3\)"):
        open_or_create(tmp_path / "s.zarr", SPEC, kind="k", config={"a": 1, "b": {"c": 3}})
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "s.zarr"))["x"][:], 5.0)  # nothing lost


def test_wrong_kind_and_missing(tmp_path):
    open_or_create(tmp_path / "s.zarr", SPEC, kind="k", config={})
    with pytest.raises(StoreError, match="not 'other'"):
        open_store(tmp_path / "s.zarr", "other")
    with pytest.raises(StoreError, match="no store"):
        open_store(tmp_path / "nope.zarr", "k")


def test_resume_removes_a_killed_writers_partial_files(tmp_path):
    """Zarr's local store writes `<name>.<uuid>.partial` and renames it into place; a writer killed in between
    leaves it, and listing the group would warn about an unknown member. Resuming the store removes it and keeps
    every finished write."""
    path = tmp_path / "s.zarr"
    g = open_or_create(path, {**SPEC, "sub/y": ArraySpec((4,), "float32", (4,))}, kind="k", config={})
    g["x"][:4] = 2.0
    (path / "zarr.1f2e.partial").write_bytes(b"{")  # a killed group-metadata write
    (path / "sub" / "y" / "c").mkdir(parents=True, exist_ok=True)
    (path / "sub" / "y" / "c" / "0.9a8b.partial").write_bytes(b"\0" * 3)  # a killed chunk write
    with pytest.warns(UserWarning, match="not recognized"):
        dict(zarr.open_group(str(path), mode="r").members(max_depth=None))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g2 = open_or_create(path, {**SPEC, "sub/y": ArraySpec((4,), "float32", (4,))}, kind="k", config={})
        members = dict(g2.members(max_depth=None))
    assert not list(path.rglob("*.partial"))
    assert {"x", "done", "sub", "sub/y"} <= set(members)
    np.testing.assert_array_equal(g2["x"][:4], 2.0)
