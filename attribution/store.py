"""Zarr store schema: create, open, validate and track completion of the run's stores (design.md, "Run directory").

A store is declared up front (name -> shape, dtype, chunks), with one `done` flag per work row written after the
row's data. Only the driver writes metadata (attrs); work units return arrays and the driver writes whole chunks,
so no locks and no shared filesystem are needed. Reopening a store with a different config refuses, naming the keys.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from upath import UPath

# 2: subsets.zarr logits sharded by model block with inner chunks along targets; datamodel stores hold the masks'
# Gram sums (changed in issue 9)
SCHEMA_VERSION = 2


class StoreError(ValueError):
    """A store does not match what the caller expects; the message names the difference and what to do."""


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: str
    # the unit of reading; with `shards`, the inner chunks of each shard
    chunks: tuple[int, ...]
    fill_value: float | int | bool = 0
    # the unit of writing (one file / object each), a multiple of `chunks`; None: every chunk is its own object
    shards: tuple[int, ...] | None = None


def as_path(path: str | Path) -> UPath:
    """A run directory or store as a path: local (`runs/demo`) or an object-store URL (`s3://bucket/runs/demo`,
    `gs://...`, through fsspec; credentials and endpoint from the environment, as the cloud SDKs read them)."""
    return path if isinstance(path, UPath) else UPath(path)


def location(path: str | Path) -> str:
    """`path` as a string any process can open: an absolute local path, or the URL (for work units on other
    nodes, which need a shared filesystem or an object store)."""
    path = as_path(path)
    return str(path.absolute()) if path.protocol in ("", "file", "local") else str(path)


def zarr_store(path: str | Path):
    """What zarr.open_group takes for `path`: the local path, or an fsspec store for a URL."""
    path = as_path(path)
    if path.protocol in ("", "file", "local"):
        return str(path)
    return zarr.storage.FsspecStore.from_url(str(path), storage_options=dict(path.storage_options))


def open_group(path: str | Path, mode: str = "r") -> zarr.Group:
    """Open a Zarr group at a local path or URL (mode as zarr: r, r+, w)."""
    return zarr.open_group(zarr_store(path), mode=mode)


def exists(path: str | Path) -> bool:
    """Whether a Zarr store has been declared at `path` (its metadata is written)."""
    return (as_path(path) / "zarr.json").exists()


def bytes_on_disk(path: str | Path) -> int:
    """Bytes a store takes on its filesystem or object store (compressed chunks and metadata)."""
    path = as_path(path)
    return int(path.fs.du(path.path, total=True))


def normalise_config(config: dict) -> dict:
    """A config as the store keeps it in its attrs (JSON: tuples become lists), so it compares equal on reload."""
    return json.loads(json.dumps(config))


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def diff_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts, with both values."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += diff_keys(a, b, prefix + key + ".")
        elif a != b:
            keys.append(f"{prefix}{key} ({a!r} -> {b!r})")
    return keys


def open_or_create(path: str | Path, arrays: dict[str, ArraySpec], *, kind: str, config: dict,
                   attrs: dict | None = None) -> zarr.Group:
    """Open the store at `path` if it was made with the same `config`, else create it with `arrays` and attrs.

    Refuses (StoreError) to reuse a store whose kind, schema version or config differ, naming the differing keys,
    so that finished work is never mixed with work done under other settings, and nothing is overwritten.
    """
    path = as_path(path)
    config = normalise_config(config)
    if exists(path):
        group = open_group(path, mode="r+")
        check_store(group, path, kind=kind, config=config)
        missing = [name for name in arrays if name not in group]
        if missing:
            raise StoreError(f"store {path} lacks arrays {missing}: it is damaged; move it away to start it again")
        return group
    group = open_group(path, mode="w")
    for name, spec in arrays.items():
        group.create_array(name, shape=spec.shape, dtype=spec.dtype, chunks=spec.chunks, shards=spec.shards,
                           fill_value=spec.fill_value)
    group.attrs.update({"kind": kind, "schema_version": SCHEMA_VERSION, "config": config,
                        "config_hash": config_hash(config), **(attrs or {})})
    return group


def check_store(group: zarr.Group, path: Path, *, kind: str, config: dict | None = None) -> None:
    stored_kind = group.attrs.get("kind")
    if stored_kind != kind:
        raise StoreError(f"{path} is a {stored_kind!r} store, not {kind!r}: point at the run's {kind} store")
    if group.attrs.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(f"{path} has schema version {group.attrs.get('schema_version')}, this dmu writes "
                         f"{SCHEMA_VERSION}: recompute it in a new run directory")
    if config is not None and group.attrs.get("config") != config:
        keys = diff_keys(group.attrs.get("config", {}), config)
        raise StoreError(f"{path} was made with a different config ({'; '.join(keys)}): restore those settings "
                         "to resume it, or use a new run directory (--run-dir) for the new settings")


def open_store(path: str | Path, kind: str) -> zarr.Group:
    """Open an existing store read-only, checking its kind."""
    path = as_path(path)
    if not exists(path):
        raise StoreError(f"no store at {path}: run the stage that writes it first (dmu run CONFIG)")
    group = open_group(path, mode="r")
    check_store(group, path, kind=kind)
    return group


def done_rows(group: zarr.Group) -> np.ndarray:
    return np.asarray(group["done"][:], dtype=bool)


def summary(path: str | Path) -> dict:
    """What a store holds and how complete it is (for `dmu info`)."""
    path = as_path(path)
    if not exists(path):
        raise StoreError(f"no Zarr store at {path}")
    group = open_group(path, mode="r")
    info: dict = {"path": str(path), "kind": group.attrs.get("kind"), "arrays": {}, "completion": {},
                  "bytes_on_disk": bytes_on_disk(path)}
    for name, arr in sorted(group.members(max_depth=None)):
        if not isinstance(arr, zarr.Array):
            continue
        info["arrays"][name] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "chunks": list(arr.chunks),
                                **({"shards": list(arr.shards)} if arr.shards else {})}
        if name == "done" or name.endswith("/done"):  # completion of each block of rows
            done = np.asarray(arr[:], dtype=bool)
            info["completion"][name.removesuffix("done").rstrip("/") or "."] = [int(done.sum()), int(done.size)]
    info["attrs"] = dict(group.attrs)
    return info
