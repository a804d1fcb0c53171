"""Reuse across runs: a run reads the stores of other runs, read-only, where they hold what it would
compute, so that a change of later settings (an unlearning hyperparameter, models.k) never retrains the earlier,
expensive stages.

`reuse: [runs/base]` in the config, or `dmu run CONFIG --reuse runs/base` (repeatable), names the run directories
to read from (paths or object-store URLs). Before a stage creates one of its stores it calls `reuse_store` with the
config the store would record: where this run has no such store and a reused run holds one that is complete and
made with the same config (compared as `attribution.store.open_or_create` compares them), the store is linked
instead of computed. Links live in the run directory's links.json, {relative name: location}, e.g.
{"models.zarr": "/abs/runs/base/models.zarr", "unlearned/random_10/dm_direct.zarr": "s3://b/base/unlearned/..."};
a link always names the store itself (a chain, base linking to base0, resolves to base0's store when linked).

Everything that reads a run's store goes through `store_path` (or `stores_in` for a folder of stores), which returns
the linked location where there is one. A stage never writes a linked store: it returns before opening its own
store (the store is complete), and a link whose store no longer matches the config (or is gone) is dropped, the
stage then computing the store in this run directory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Protocol

import zarr
from upath import UPath

from attribution.store import (
    SCHEMA_VERSION,
    StoreError,
    as_path,
    check_reachable,
    diff_keys,
    exists,
    is_local,
    location,
    normalise_config,
    open_group,
    open_store,
    write_text,
)
from pipelines.config import ConfigError, RunConfig


class RunContext(Protocol):
    """What reuse reads of a stage's context (pipelines.stages.context.RunContext): the config, the run
    directory and the task's data (for its fingerprint)."""

    cfg: RunConfig
    run_dir: UPath
    data: object

log = logging.getLogger("dmu")

LINKS_NAME = "links.json"


def read_links(run_dir: str | Path) -> dict[str, str]:
    """A run directory's links.json: {relative store name: location of the store it reuses} ({} where none)."""
    path = as_path(run_dir) / LINKS_NAME
    try:
        links = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path} is not readable JSON ({exc}): restore it, or delete it to compute the reused "
                         "stores in this run directory") from None
    if not isinstance(links, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in links.items()):
        raise StoreError(f"{path} must map store names to locations: restore it, or delete it to compute the "
                         "reused stores in this run directory")
    return links


def _write_links(run_dir: UPath, links: dict[str, str]) -> None:
    write_text(run_dir / LINKS_NAME, json.dumps(dict(sorted(links.items())), indent=1))


def store_path(run_dir: str | Path, rel: str) -> UPath:
    """Where run `run_dir` keeps its store `rel` ("subsets.zarr", "datamodels/lasso.zarr", "forget_sets.json",
    "unlearned/<fs>/<method>.zarr"): the reused run's store where links.json links it, else run_dir/rel."""
    run_dir = as_path(run_dir)
    target = read_links(run_dir).get(rel)
    return as_path(target) if target is not None else run_dir / rel


def stores_in(run_dir: str | Path, folder: str) -> dict[str, UPath]:
    """The Zarr stores (folders named *.zarr) directly in `folder` of a run ("datamodels", "unlearned/<fs>"),
    its own and the linked ones: {name ("lasso.zarr"): location}, sorted by name."""
    run_dir = as_path(run_dir)
    base = run_dir / folder
    found: dict[str, UPath] = {}
    if is_local(base):
        if base.is_dir():
            found = {p.name: p for p in base.glob("*.zarr") if p.is_dir()}
    else:
        try:
            entries = base.fs.ls(base.path, detail=True)
        except FileNotFoundError:
            entries = []
        for entry in entries:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry["type"] == "directory" and name.endswith(".zarr"):
                found[name] = base / name
    prefix = folder.strip("/") + "/"
    for rel, target in read_links(run_dir).items():  # a link exists only where the run has no declared store
        name = rel[len(prefix):]
        if rel.startswith(prefix) and "/" not in name:
            found[name] = as_path(target)
    return dict(sorted(found.items()))


def check_sources(run_dir: str | Path, sources: tuple[str, ...] | list[str]) -> None:
    """Each reused run is a run directory (holds config.json) that answers, and not `run_dir` itself; else
    ConfigError naming it."""
    own = location(run_dir)
    for source in sources:
        path = as_path(source)
        if location(path) == own:
            raise ConfigError(f"reuse: {source} is this run's own directory: name other runs to reuse")
        check_reachable(path)
        if not (path / "config.json").exists():
            raise ConfigError(f"reuse: {source} is not a run directory (no config.json): name a run made by "
                              "`dmu run`")


def _present(path: UPath) -> bool:
    """Whether this run holds the store at `path` (a declared Zarr store, or a JSON file)."""
    return path.exists() if path.name.endswith(".json") else exists(path)


def _mismatch(path: UPath, config: dict, ctx: RunContext) -> str | None:
    """Why the store at `path` cannot stand for the one this run would make with `config`; None where it can,
    "" where there is no store at all. It must be complete, so that its stage has nothing left to write: every
    done flag set and, in a datamodel store, the LDS summary (and curve, where the config asks for one) written.
    A store with failed rows is not complete (its stage would retrain them)."""
    if path.name.endswith(".json"):
        if not path.exists():
            return ""
        stored = json.loads(path.read_text()).get("config")
        if stored != config:
            return f"made with another config ({'; '.join(diff_keys(stored or {}, config))})"
        return None
    if not exists(path):
        return ""
    group = open_group(path, mode="r")
    attrs = group.attrs
    if attrs.get("schema_version") != SCHEMA_VERSION:
        return f"schema version {attrs.get('schema_version')}, this dmu writes {SCHEMA_VERSION}"
    if attrs.get("config") != config:
        return f"made with another config ({'; '.join(diff_keys(attrs.get('config') or {}, config))})"
    fingerprint = attrs.get("dataset_fingerprint")
    if fingerprint is not None and fingerprint != ctx.data.fingerprint():
        return f"made on another dataset (fingerprint {fingerprint})"
    for name, arr in group.members(max_depth=None):
        if isinstance(arr, zarr.Array) and (name in ("done", "gram_done") or name.endswith("/done")):
            done = arr[...]
            if not done.all():
                return f"not complete ({name}: {int(done.sum())}/{done.size})"
    if attrs.get("kind") == "datamodels":  # the stage writes its LDS summary (and curve) last
        curve = ctx.cfg.datamodels.lds_curve and "fit_models" not in config  # a curve store has no curve itself
        if "lds_margin_mean" not in attrs or (curve and "lds_curve" not in attrs):
            return "not complete (no LDS summary)"
    return None


def reuse_store(ctx: RunContext, rel: str, config: dict) -> bool:
    """Whether this run reads its store `rel` from a reused run instead of computing it: called by a stage
    before it opens the store it writes, with the config the store records. True: the store is linked (kept, or
    newly recorded in links.json, with one log line), complete, and the stage has nothing to do for it. False:
    compute it in this run directory as usual (this run already holds it, or no reused run holds a complete
    store made with `config`; a link that no longer matches is dropped)."""
    run_dir = ctx.run_dir
    config = normalise_config(config)
    links = read_links(run_dir)
    current = links.get(rel)
    if current is None and not ctx.cfg.reuse:  # a run that reuses nothing computes its own
        return False
    if _present(run_dir / rel):
        if current is not None:  # made here after all (e.g. by hand): the run's own store wins
            del links[rel]
            _write_links(run_dir, links)
        return False
    candidates = ([current] if current is not None else []) + [location(store_path(src, rel))
                                                                for src in ctx.cfg.reuse]
    reasons: dict[str, str] = {}
    for target in dict.fromkeys(candidates):
        why = _mismatch(as_path(target), config, ctx)
        if why is None:
            if target != current:
                links[rel] = target
                _write_links(run_dir, links)
            log.info("reusing %s from %s", rel, target)
            return True
        reasons[target] = why
    if current is not None:
        del links[rel]
        _write_links(run_dir, links)
        log.warning("no longer reusing %s from %s (%s): computing it in %s", rel, current,
                    reasons[current] or "it is gone", run_dir)
        return False
    reasons = {target: why for target, why in reasons.items() if why}
    if reasons:
        log.info("not reusing %s (%s): computing it in %s", rel,
                 "; ".join(f"{t}: {why}" for t, why in reasons.items()), run_dir)
    return False


def relative_name(run_dir: str | Path, path: str | Path) -> str:
    """The name of store `path` relative to `run_dir` ("unlearned/random_10/dm_direct.zarr")."""
    base, full = location(run_dir).rstrip("/") + "/", location(path)
    if not full.startswith(base):
        raise ValueError(f"{path} is not under the run directory {run_dir}")
    return full[len(base):]


def open_reused(ctx: RunContext, path: str | Path, config: dict, kind: str) -> zarr.Group | None:
    """`reuse_store` for a store given by its path under the run directory: the reused store, opened read-only,
    where it is linked; None where the stage computes it in this run directory."""
    rel = relative_name(ctx.run_dir, path)
    if not reuse_store(ctx, rel, config):
        return None
    return open_store(store_path(ctx.run_dir, rel), kind)
