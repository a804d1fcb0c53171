"""Zarr store schema: create, open, validate and track completion of the run's stores (design.md, "Run directory").

A store is declared up front (name -> shape, dtype, chunks), with one `done` flag per work row written after the
row's data. Only the driver writes metadata (attrs); work units return arrays and the driver writes whole chunks,
so no locks and no shared filesystem are needed. Reopening a store with a different config refuses, naming the keys.
A store counts as declared only once its attrs (kind, config) are written, after its arrays and any contents that
are part of its creation (`open_or_create`'s `initialise`): a creation cut short is redone, never resumed.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from upath import UPath

log = logging.getLogger("dmu")

# The stores' schema: subsets.zarr's logits sharded by model block with inner chunks along targets, datamodel
# stores holding the masks' Gram sums, and each model's quality (`train_loss`, `test_accuracy`, `failed`) per row
# of subsets.zarr and models.zarr. A store of another schema is refused with a message saying what to do.
SCHEMA_VERSION = 3


class StoreError(ValueError):
    """A store does not match what the caller expects; the message names the difference and what to do."""


class FailedModelsError(RuntimeError):
    """Some models of a training stage produced non-finite outputs: they are recorded as failed (not done),
    the stage finished the others, and a rerun retries them. The message names the rows and their seeds."""


class CorruptChunkError(StoreError):
    """A chunk (or shard) file of a store does not decode: corrupt or truncated. Names store, array, file."""


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
        _close_at_exit()
    return upath


_CLOSE_REGISTERED = False
SESSION_CLOSE_TIMEOUT = 10.0  # seconds to close one filesystem's HTTP session


def _close_at_exit() -> None:
    global _CLOSE_REGISTERED
    if not _CLOSE_REGISTERED:
        _CLOSE_REGISTERED = True
        atexit.register(close_object_stores)


def close_object_stores() -> None:
    """Close the HTTP sessions of the S3 filesystems this process opened (s3fs's instance cache: as_path's and
    zarr's), while their event loops still run. Left to s3fs's own finalizer, a close slower than its 0.1 s timeout
    (a loaded machine) leaves the session open, and aiohttp prints "Unclosed client session" when it is collected,
    at exit. Called at exit once an object-store path was used; tests call it before clearing s3fs's cache."""
    s3fs = sys.modules.get("s3fs")
    if s3fs is None:
        return
    from fsspec.asyn import sync
    from zarr.core.sync import sync as zarr_sync

    for fs in list(s3fs.S3FileSystem._cache.values()):
        creator, loop = getattr(fs, "_s3creator", None), getattr(fs, "loop", None)
        try:
            if creator is None:
                continue
            if fs.asynchronous:  # zarr's FsspecStore: the session lives on zarr's event loop (no loop of its own,
                # so s3fs's finalizer can only drop the socket and leaves the session open)
                zarr_sync(creator.__aexit__(None, None, None), timeout=SESSION_CLOSE_TIMEOUT)
            elif loop is not None and loop.is_running():
                sync(loop, creator.__aexit__, None, None, None, timeout=SESSION_CLOSE_TIMEOUT)
            else:
                continue
        except Exception:  # noqa: BLE001 (a session that cannot close now is left to s3fs's finalizer)
            continue
        fs._s3 = None  # the next call on this filesystem opens a new session


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
        remove_partial_writes(path)
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


def remove_partial_writes(path: str | Path) -> int:
    """Delete the temporary files (`*.partial`) that Zarr's local store writes before renaming them into place and
    that a killed writer leaves behind (Zarr would list them as unknown members, with a warning). Only for a store
    about to be resumed by the one process that writes it. Returns how many were removed."""
    if not is_local(path):
        return 0
    stale = list(Path(location(path)).rglob("*.partial"))
    for f in stale:
        f.unlink(missing_ok=True)
    return len(stale)


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
    return np.asarray(read(group["done"]), dtype=bool)


def _storage_shape(arr: zarr.Array) -> tuple[int, ...]:
    """The shape of one file (object) of `arr`: a shard where it is sharded, else a chunk."""
    return tuple(arr.shards or arr.chunks)


def _as_slices(arr: zarr.Array, selection) -> tuple[slice, ...]:
    """A basic selection (ints, slices, Ellipsis, or a tuple of them) as one slice per dimension."""
    sel = selection if isinstance(selection, tuple) else (selection,)
    if any(s is Ellipsis for s in sel):
        i = next(i for i, s in enumerate(sel) if s is Ellipsis)
        sel = sel[:i] + (slice(None),) * (arr.ndim - len(sel) + 1) + sel[i + 1:]
    sel = sel + (slice(None),) * (arr.ndim - len(sel))
    out = []
    for s, n in zip(sel, arr.shape):
        if isinstance(s, (int, np.integer)):
            s = slice(int(s) % n, int(s) % n + 1)
        start, stop, _ = s.indices(n)
        out.append(slice(start, stop))
    return tuple(out)


# What codecs raise on bytes that do not decode: ValueError (checksums, sizes that do not reshape),
# RuntimeError (zstd), struct.error, EOFError. Not OSError: a network or permission error is no corrupt
# chunk.
DECODE_ERRORS = (ValueError, RuntimeError, struct.error, EOFError)


def find_bad_chunk(arr: zarr.Array, selection=slice(None)) -> tuple[tuple[int, ...], Exception] | None:
    """The first file (chunk, or shard where sharded) of `arr` inside `selection` that cannot be read, with
    its error; None where every one reads. One read per file, so only for locating an error already seen."""
    region = _as_slices(arr, selection)
    shape = _storage_shape(arr)
    ranges = [range(r.start // c, -(-r.stop // c)) for r, c in zip(region, shape)]
    for key in np.ndindex(*[len(r) for r in ranges]):
        index = tuple(r[k] for r, k in zip(ranges, key))
        try:
            arr[tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, shape, arr.shape))]
        except DECODE_ERRORS as exc:
            return index, exc
    return None


def corrupt_chunk_error(store: str | Path, arr: zarr.Array, index: tuple[int, ...],
                        exc: Exception) -> StoreError:
    """One line naming the store, the array and the file of a chunk that does not decode, and what to do."""
    key = "c/" + "/".join(map(str, index))
    shape = _storage_shape(arr)
    reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
    last = min((index[0] + 1) * shape[0], arr.shape[0]) - 1 if index else 0
    rows = f"rows {index[0] * shape[0]}..{last}" if index else "all"
    return CorruptChunkError(f"store {store}: array {arr.path}, chunk file {arr.path}/{key} ({rows}) "
                             f"is corrupt or truncated ({reason}): restore the store from a copy, or move it "
                             "away and rerun the stage that writes it")


def read(arr: zarr.Array, selection=slice(None), *, store: str | Path | None = None) -> np.ndarray:
    """`arr[selection]` as a numpy array; a chunk that does not decode (a corrupt or truncated file) raises
    CorruptChunkError naming the store, the array and the file, instead of a codec's traceback. Other errors
    (a wrong selection, a network error) pass through unchanged."""
    try:
        return np.asarray(arr[selection])
    except DECODE_ERRORS as exc:
        try:
            bad = find_bad_chunk(arr, selection)
        except Exception:  # noqa: BLE001 (a network error, a selection it cannot walk: keep the first error)
            bad = None
        if bad is None:
            raise
        where = store if store is not None else str(arr.store_path.store).removeprefix("file://")
        raise corrupt_chunk_error(where, arr, *bad) from exc


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
            done = np.asarray(read(arr, store=path), dtype=bool)
            part = name.removesuffix("done").rstrip("/") or "."
            info["completion"][part] = [int(done.sum()), int(done.size)]
            quality = model_quality(group, part, done, path)
            if quality is not None:
                info.setdefault("quality", {})[part] = quality
    info["attrs"] = dict(group.attrs)
    return info


def model_quality(group: zarr.Group, part: str, done: np.ndarray, path: str | Path) -> dict | None:
    """Test accuracy of the done models of one ensemble (`part`: "." for the store's root) as min / median /
    max, the failed rows, and chance (1 / num_classes); None where the store records no model quality."""
    prefix = "" if part == "." else part + "/"
    if prefix + "test_accuracy" not in group:
        return None
    acc = np.asarray(read(group[prefix + "test_accuracy"], store=path), dtype=np.float64)[done]
    failed = np.flatnonzero(read(group[prefix + "failed"], store=path)) if prefix + "failed" in group else []
    classes = group.attrs.get("num_classes")
    out: dict = {"n_done": int(done.sum()), "failed_rows": [int(r) for r in failed],
                 "chance": 1.0 / classes if classes else None}
    acc = acc[np.isfinite(acc)]
    if len(acc):
        out.update(min=float(acc.min()), median=float(np.median(acc)), max=float(acc.max()))
    return out


# Bytes per read of `verify_store`: its memory does not grow with the store.
VERIFY_BYTES = 64 * 2**20
# Stores with one row per model and a `done` flag per row (per ensemble in models.zarr): their done rows must
# be finite in every float array.
ROW_KINDS = ("subsets", "models", "unlearned")


def _blocks(arr: zarr.Array):
    """Selections that cover `arr` in whole files (chunks or shards), about VERIFY_BYTES each at most: rows in
    steps of a file's rows, the second dimension in as many files as fit."""
    if arr.ndim == 0:
        yield ()
        return
    shape = _storage_shape(arr)
    if arr.ndim == 1:
        step = max(shape[0], VERIFY_BYTES // arr.dtype.itemsize // shape[0] * shape[0])
        for r0 in range(0, arr.shape[0], step):
            yield (slice(r0, r0 + step),)
        return
    rest = int(np.prod(arr.shape[2:], dtype=np.int64)) * arr.dtype.itemsize
    cols = max(shape[1], VERIFY_BYTES // max(1, shape[0] * rest) // shape[1] * shape[1])
    for r0 in range(0, arr.shape[0], shape[0]):
        for c0 in range(0, arr.shape[1], cols):
            yield (slice(r0, r0 + shape[0]), slice(c0, c0 + cols))


def row_ranges(rows: np.ndarray) -> str:
    """Row indices as short ranges: [3, 4, 5, 9] -> "3..5, 9" (at most 8 ranges, then a count)."""
    parts, start = [], None
    for i, r in enumerate(rows):
        if start is None:
            start = r
        if i + 1 == len(rows) or rows[i + 1] != r + 1:
            parts.append(str(start) if start == r else f"{start}..{r}")
            start = None
    more = f" and {len(parts) - 8} more ranges" if len(parts) > 8 else ""
    return ", ".join(parts[:8]) + more


def verify_store(path: str | Path) -> list[str]:
    """Re-read a whole store by blocks of whole files and return its problems, one line each (empty: none):
    declared, schema version, config hash of its config, chunk files that do not decode (CorruptChunkError's
    line), and in stores with a row per model (ROW_KINDS): array lengths that differ from `done`, done rows
    with non-finite values (except in the arrays its attrs list as `nan_allowed`), rows both done and failed. Memory: one block (VERIFY_BYTES) at a time."""
    path = as_path(path)
    if not exists(path):
        return [(f"store {path}: not declared (no dmu attrs): an interrupted creation; rerun its stage to "
                 "create it")]
    group = open_group(path, mode="r")
    attrs = group.attrs
    problems = []
    if attrs.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"store {path}: schema version {attrs.get('schema_version')}, this dmu writes "
                        f"{SCHEMA_VERSION}: recompute it in a new run directory")
    if "config" in attrs and attrs.get("config_hash") != config_hash(attrs["config"]):
        problems.append(f"store {path}: config_hash {attrs.get('config_hash')} does not match its config "
                        f"({config_hash(attrs['config'])}): its attrs were edited; restore them or recompute "
                        "it")
    arrays = {name: arr for name, arr in group.members(max_depth=None) if isinstance(arr, zarr.Array)}
    done_of: dict[str, np.ndarray] = {}  # ensemble prefix ("" or "full/") -> done flags
    if attrs.get("kind") in ROW_KINDS:
        for name, arr in arrays.items():
            if name == "done" or name.endswith("/done"):
                try:
                    done_of[name.removesuffix("done")] = np.asarray(read(arr, store=path), dtype=bool)
                except CorruptChunkError as exc:
                    problems.append(str(exc))
    for prefix, done in done_of.items():
        failed_name = prefix + "failed"
        if failed_name in arrays:
            try:
                both = np.flatnonzero(done & np.asarray(read(arrays[failed_name], store=path), dtype=bool))
            except CorruptChunkError:
                both = []  # reported below, with the other arrays
            if len(both):
                problems.append(f"store {path}: array {failed_name}: rows {row_ranges(both)} are both "
                                "done and failed: the store was edited; clear their done flags and rerun the "
                                "stage")
    for name, arr in sorted(arrays.items()):
        prefix = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
        done = done_of.get(prefix)
        if done is not None and name != prefix + "params" and arr.ndim and arr.shape[0] != len(done):
            problems.append(f"store {path}: array {name} has {arr.shape[0]} rows but {prefix}done has "
                            f"{len(done)}: the store is damaged; recompute it in a new run directory")
            done = None
        # arrays whose NaN means "not applicable" (the store lists them, e.g. MU-Mis's steps in another method)
        check_finite = done is not None and arr.dtype.kind in "fc" and name not in attrs.get("nan_allowed", [])
        bad_rows: set[int] = set()
        try:
            for sel in _blocks(arr):
                block = read(arr, sel, store=path)
                if check_finite and block.size:
                    rows = np.arange(arr.shape[0])[sel[0]]
                    finite = np.isfinite(block).reshape(len(rows), -1).all(1)
                    bad_rows.update(rows[~finite & done[rows]].tolist())
        except CorruptChunkError as exc:
            problems.append(str(exc))
        if bad_rows:
            problems.append(f"store {path}: array {name}: done rows {row_ranges(sorted(bad_rows))} hold "
                            "non-finite values: clear their done flags (and fix the cause) and rerun the "
                            "stage, or recompute the store")
    return problems
