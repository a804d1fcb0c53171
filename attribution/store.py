"""Zarr store schema: create, open, validate and track completion of the run's stores (design.md, "Run directory").

A store is declared up front (name -> shape, dtype, chunks), with one `done` flag per work row written after the
row's data. Only the driver writes metadata (attrs); work units return arrays and the driver writes whole chunks,
so no locks and no shared filesystem are needed. Reopening a store with a different config refuses, naming the keys.
A store counts as declared only once its attrs (kind, config) are written, after its arrays and any contents that
are part of its creation (`open_or_create`'s `initialise`): a creation cut short is redone, never resumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from upath import UPath

log = logging.getLogger("dmu")

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
    # zstd (Zarr's default) pays on sparse or low-entropy arrays (LASSO weights 9x smaller, masks); dense float
    # outputs shrink about 13 % and read 1.6x slower (demo logits, README "Store sizes"), so they are stored raw
    compressed: bool = True


LOCAL_PROTOCOLS = ("", "file", "local")
# object stores whose first path component is a bucket (checked by `check_reachable`)
BUCKET_PROTOCOLS = ("s3", "s3a", "gs", "gcs")
# what a cluster node needs in its environment to reach an object store (dmu never reads secrets from configs)
OBJECT_STORE_ENV = ("AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), AWS_DEFAULT_REGION, and "
                    "AWS_ENDPOINT_URL for an S3-compatible server; GOOGLE_APPLICATION_CREDENTIALS for gs://")


def as_path(path: str | Path) -> UPath:
    """A run directory or store as a path: local (`runs/demo`) or an object-store URL (`s3://bucket/runs/demo`,
    `gs://...`, through fsspec; credentials and endpoint from the environment, as the cloud SDKs read them:
    OBJECT_STORE_ENV). An object store's directory listings are not cached: other processes (work units, other
    runs) write the stores, so a cached listing could miss a store and `open_or_create` would make it again."""
    if isinstance(path, UPath):
        return path
    upath = UPath(path)
    if upath.protocol in BUCKET_PROTOCOLS:
        upath = UPath(path, use_listings_cache=False)
    return upath


def is_local(path: str | Path) -> bool:
    """Whether `path` is on the local (or a mounted, shared) filesystem rather than an fsspec URL."""
    return as_path(path).protocol in LOCAL_PROTOCOLS


def location(path: str | Path) -> str:
    """`path` as a string any process can open: an absolute local path, or the URL (for work units on other
    nodes, which need a shared filesystem or an object store)."""
    path = as_path(path)
    return str(path.absolute()) if is_local(path) else str(path)


def zarr_store(path: str | Path):
    """What zarr.open_group takes for `path`: the local path, or an fsspec store for a URL (zarr needs an async
    filesystem there: s3fs and gcsfs are)."""
    path = as_path(path)
    if is_local(path):
        return str(path)
    return zarr.storage.FsspecStore.from_url(str(path), storage_options=dict(path.storage_options))


def check_reachable(path: str | Path) -> None:
    """For an object-store URL, that its bucket exists and answers with the credentials and endpoint in the
    environment; else one StoreError line naming the URL and what to check. Local paths: nothing to check (a
    bucket is never created: a typo in its name would otherwise start a run in a new bucket)."""
    path = as_path(path)
    if path.protocol not in BUCKET_PROTOCOLS:
        return
    bucket = path.path.strip("/").split("/")[0]
    try:
        path.fs.info(bucket)
    except FileNotFoundError:
        raise StoreError(f"object store {path}: bucket {bucket!r} does not exist (or these credentials cannot "
                         f"see it): create it, or fix the URL; credentials and endpoint come from the environment "
                         f"({OBJECT_STORE_ENV})") from None
    except Exception as exc:  # noqa: BLE001 (botocore / aiohttp / gcsfs errors: connection, credentials, ...)
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise StoreError(f"object store {path} is not reachable ({reason}): check the endpoint and credentials "
                         f"in the environment ({OBJECT_STORE_ENV})") from None


def make_dirs(path: str | Path) -> UPath:
    """Create a local directory (and its parents); an object store has no directories, so there only check
    that it is reachable (`check_reachable`)."""
    path = as_path(path)
    if is_local(path):
        path.mkdir(parents=True, exist_ok=True)
    else:
        check_reachable(path)
    return path


def write_text(path: str | Path, text: str) -> None:
    """Write a small text file so that readers see the old or the new contents, never half: locally through a
    temporary file renamed over it; on an object store one PUT of the whole object, which is atomic there (and
    object stores have no atomic rename)."""
    path = as_path(path)
    if is_local(path):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    else:
        with path.open("w") as f:
            f.write(text)


def find_stores(path: str | Path) -> list[UPath]:
    """The Zarr stores (folders named *.zarr) under a run directory, sorted. On an object store, one listing per
    folder, never descending into a store (a store holds one object per chunk)."""
    path = as_path(path)
    if is_local(path):
        return sorted(path.glob("**/*.zarr"))
    stores, folders = [], [path]
    while folders:
        folder = folders.pop()
        try:
            entries = folder.fs.ls(folder.path, detail=True)
        except FileNotFoundError:  # nothing under that prefix (as a local glob of a missing folder)
            entries = []
        for entry in entries:
            if entry["type"] != "directory":
                continue
            child = folder / entry["name"].rstrip("/").rsplit("/", 1)[-1]
            (stores if child.name.endswith(".zarr") else folders).append(child)
    return sorted(stores, key=str)


def open_group(path: str | Path, mode: str = "r") -> zarr.Group:
    """Open a Zarr group at a local path or URL (mode as zarr: r, r+, w). Zarr format 3, the one dmu writes: no
    probing for format 2's metadata files, which costs three requests per open on an object store."""
    return zarr.open_group(zarr_store(path), mode=mode, zarr_format=3)


def _metadata(path: str | Path) -> dict | None:
    """The group metadata (zarr.json) at `path`, or None where there is none (or it is not readable JSON)."""
    try:
        meta = json.loads((as_path(path) / "zarr.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def exists(path: str | Path) -> bool:
    """Whether a store has been declared at `path`: its metadata holds dmu's attrs (kind), written last by
    `open_or_create`. A zarr.json without them is a creation cut short (see `open_or_create`)."""
    meta = _metadata(path)
    return meta is not None and "kind" in (meta.get("attributes") or {})


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
                   attrs: dict | None = None, initialise: Callable[[zarr.Group], None] | None = None) -> zarr.Group:
    """Open the store at `path` if it was made with the same `config`, else create it with `arrays` and attrs.

    Refuses (StoreError) to reuse a store whose kind, schema version or config differ, naming the differing keys,
    so that finished work is never mixed with work done under other settings, and nothing is overwritten.

    Creation: the arrays, then `initialise(group)` (contents the store must have from the start, e.g. the subset
    masks), then the attrs, which declare the store. A crash before the attrs leaves a store that `exists` does not
    count: the next call creates it again from scratch (it holds no finished work: done flags come after).
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
    if _metadata(path) is not None:
        log.warning("dmu: %s was left unfinished by an interrupted creation: creating it again", path)
    group = open_group(path, mode="w")  # "w": removes what an interrupted creation left
    for name, spec in arrays.items():
        group.create_array(name, shape=spec.shape, dtype=spec.dtype, chunks=spec.chunks, shards=spec.shards,
                           compressors="auto" if spec.compressed else None,
                           fill_value=spec.fill_value)
    if initialise is not None:
        initialise(group)
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
        info["bytes_uncompressed"] = info.get("bytes_uncompressed", 0) + int(arr.nbytes)
        if name == "done" or name.endswith("/done"):  # completion of each block of rows
            done = np.asarray(arr[:], dtype=bool)
            info["completion"][name.removesuffix("done").rstrip("/") or "."] = [int(done.sum()), int(done.size)]
    info["attrs"] = dict(group.attrs)
    return info
