"""The `dmu` command: run the pipeline's stages, inspect stores, serve deletion requests, report.

Bad input ends with one line on stderr naming the problem and what to do, and exit status 2; nothing already
computed is lost (stores are written chunk by chunk, done flags last). Models that diverge are recorded as
failed and the stage ends with exit 2 naming them; `dmu info --verify RUN` re-reads a run's stores and names
what is wrong, one line per problem, exit 2. `dmu run` holds its run directory's lock
(pipelines.stages.RunLock) while it runs, and treats SIGTERM as Ctrl-C: one line, exit 143, finished work
kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from attribution.store import (
    FailedModelsError,
    StoreError,
    as_path,
    check_reachable,
    config_hash,
    diff_keys,
    exists,
    find_stores,
    normalise_config,
    open_group,
    summary,
    verify_store,
)
from pipelines.config import ConfigError, load_config
from pipelines.engine.executor import ClusterError, UnitError
from pipelines.rundir.reuse import read_links
from pipelines.tasks import DataError

USER_ERRORS = (ConfigError, StoreError, DataError, UnitError, ClusterError, FileNotFoundError,
               FailedModelsError)
# `dmu info` warns when the median test accuracy of a store's models is within this of chance (1 / classes)
CHANCE_MARGIN = 0.02


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so that it unwinds as Ctrl-C does (pending units cancelled, the
    lock released, finished units kept in the stores)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


def cmd_run(args: argparse.Namespace) -> None:
    from pipelines.rundir.lock import RunLock
    from pipelines.stages import RunContext, run_stages

    cfg = load_config(args.config)
    if args.run_dir:
        cfg = dataclasses.replace(cfg, run_dir=args.run_dir)
    if args.reuse:  # after the config's own `reuse` entries
        cfg = dataclasses.replace(cfg, reuse=tuple(dict.fromkeys(cfg.reuse + tuple(args.reuse))))
    stages = args.stages.split(",") if args.stages else list(cfg.stages)
    ctx = RunContext(cfg=cfg, run_dir=cfg.resolved_run_dir(), address=args.address)
    # signal handlers can only be set from the main thread (an embedding caller may run us elsewhere)
    previous = (signal.signal(signal.SIGTERM, _raise_terminated)
                if threading.current_thread() is threading.main_thread() else None)
    try:
        with RunLock(ctx.run_dir):
            try:
                run_stages(ctx, stages)
            finally:
                ctx.close()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(f"done: {', '.join(stages)} -> {ctx.run_dir}")


def cmd_info(args: argparse.Namespace) -> None:
    path = as_path(args.path)  # a local path or an object-store URL (s3://bucket/runs/demo)
    check_reachable(path)
    if args.verify:
        verify_run(path)
        return
    links = {} if exists(path) else read_links(path)  # stores reused from other runs (pipelines.rundir.reuse)
    reused = {str(as_path(target)): rel for rel, target in links.items() if rel.endswith(".zarr")
              and exists(target)}
    stores = [path] if exists(path) else find_stores(path) + [as_path(target) for target in reused]
    if not stores and not links:
        raise StoreError(f"no Zarr store at or under {path}: pass a store (runs/demo/subsets.zarr) or a run dir")
    if links and not args.json:
        print(f"{path} reuses, read-only:")
        for rel, target in links.items():
            present = as_path(target).exists() if not rel.endswith(".zarr") else exists(target)
            print(f"  {rel} -> {target}{'' if present else '  (gone)'}")
    for store in stores:
        info = summary(store)
        if str(store) in reused:
            info["reused_as"] = reused[str(store)]
        if args.json:
            print(json.dumps(info, indent=2, default=str))
            continue
        print(f"{info['path']}  [{info['kind']}]" + (f"  (reused as {info['reused_as']})" if "reused_as" in info
                                                     else ""))
        for name, a in info["arrays"].items():
            print(f"  {name:<24} {str(tuple(a['shape'])):<22} {a['dtype']:<8} chunks {tuple(a['chunks'])}")
        print(f"  on disk: {info['bytes_on_disk'] / 2**20:.1f} MiB ({info.get('bytes_uncompressed', 0) / 2**20:.1f} "
              "MiB of arrays uncompressed)")
        for part, (done, total) in info["completion"].items():
            where = "" if part == "." else f" {part}"
            print(f"  complete{where}: {done}/{total} rows ({100.0 * done / max(1, total):.1f}%)")
        for part, q in info.get("quality", {}).items():
            print_quality("" if part == "." else f" {part}", q)
        attrs = info["attrs"]
        for key in ("dataset", "dataset_fingerprint", "n_train", "n_targets", "config_hash"):
            if key in attrs:
                print(f"  {key}: {attrs[key]}")
        if "config" in attrs:
            print(f"  config: {json.dumps(attrs['config'], sort_keys=True)}")


def print_quality(where: str, q: dict) -> None:
    """`dmu info`'s lines on the models of one ensemble: test accuracy of the done ones, failed rows, and a
    warning when the median is within CHANCE_MARGIN of chance."""
    if "median" in q:
        print(f"  test accuracy{where} ({q['n_done']} done models): min {q['min']:.3f} / median "
              f"{q['median']:.3f} / max {q['max']:.3f}")
        chance = q.get("chance")
        if chance is not None and q["median"] - chance < CHANCE_MARGIN:
            print(f"  warning{where}: median test accuracy {q['median']:.3f} is within "
                  f"{100 * CHANCE_MARGIN:.0f} points of chance ({chance:.3f}): the models barely learn; "
                  "check the recipe (task.recipe: lr, epochs) and the data")
    if q["failed_rows"]:
        rows = q["failed_rows"]
        print(f"  failed{where}: {len(rows)} models (rows {rows[:10]}{' ...' if len(rows) > 10 else ''}), "
              "non-finite outputs: rerun the stage to retrain them")


def expected_store_config(run_dir, store, kind: str, cfg) -> dict | None:
    """The config that a store of `kind` at `store` holds when made from the run's config `cfg` (config.json);
    None where it cannot be derived (no forget sets yet, an unknown kind)."""
    from pipelines.rundir.layout import load_forget_sets, load_tuned, margin_only_models
    from pipelines.rundir.variants import variants
    from pipelines.stages.datamodel_io import datamodels_config, imported_margins
    from pipelines.stages.models import models_config
    from pipelines.stages.subsets import subsets_config
    from pipelines.stages.unlearn import unlearned_config

    try:
        if kind == "subsets":
            return subsets_config(cfg)
        if kind == "datamodels":
            return datamodels_config(cfg, store.name.removesuffix(".zarr"), imported_margins(run_dir))
        if kind == "models":
            return models_config(cfg, load_forget_sets(run_dir), load_forget_sets(run_dir, "tuning"))
        if kind == "unlearned":
            fs = store.parent.name
            sets = load_forget_sets(run_dir)
            if fs not in sets:
                return None
            chosen = {v.store_name: v for v in variants(cfg, load_tuned(run_dir, cfg))}
            variant = chosen.get(store.name.removesuffix(".zarr"))
            return (unlearned_config(cfg, fs, sets[fs], variant, margin_only_models(run_dir))
                    if variant is not None else None)
    except (StoreError, KeyError):
        return None
    return None


def verify_run(path) -> None:
    """`dmu info --verify`: re-read every store of a run (or one store) by blocks and check it
    (store.verify_store: chunks decode, done rows finite, shapes, config hash; subsets masks against their
    seed), and each store's config against the run's config.json. Prints one line per store; problems:
    StoreError, one line each."""
    from attribution.subsets import verify_masks
    from pipelines.rundir.layout import load_run_config

    stores = [path] if exists(path) else find_stores(path)
    # a single store: its run directory is the nearest folder above it with a config.json
    # (datamodels/lasso.zarr is one level down, unlearned/<set>/<method>.zarr two)
    run_dir = path
    if stores == [path]:
        run_dir = next((p for p in (path.parent, path.parent.parent, path.parent.parent.parent)
                        if (p / "config.json").exists()), path.parent)
    problems: list[str] = []
    if stores != [path]:  # a run directory: also the stores it reuses from other runs (pipelines.rundir.reuse)
        for rel, target in read_links(path).items():
            if rel.endswith(".zarr") and exists(target):
                stores.append(as_path(target))
            elif not as_path(target).exists():
                problems.append(f"{path}: {rel} is reused from {target}, which is gone: rerun `dmu run` on this "
                                "run (it computes the store here), or restore it")
    if not stores and not problems:
        raise StoreError(f"no Zarr store at or under {path}: pass a run directory (runs/demo) or a store")
    cfg = load_run_config(run_dir) if (run_dir / "config.json").exists() else None
    for store in stores:
        found = verify_store(store)
        if exists(store):
            group = open_group(store, mode="r")
            kind = group.attrs.get("kind")
            if kind == "subsets" and "masks" in group:
                try:
                    found += verify_masks(group, store)
                except StoreError as exc:  # a corrupt masks chunk: verify_store has named it already
                    if str(exc) not in found:
                        found.append(str(exc))
            # an imported store records its source, not the run's config
            imported = group.attrs.get("imported")
            expected = expected_store_config(run_dir, store, kind, cfg) if cfg is not None and not imported else None
            expected = normalise_config(expected) if expected is not None else None
            if expected is not None and config_hash(expected) != group.attrs.get("config_hash"):
                keys = "; ".join(diff_keys(group.attrs.get("config", {}), expected)) or "its hash"
                found.append(f"store {store}: made with another config than the run's config.json ({keys}): "
                             "rerun its stage with the run's config, or restore config.json")
        print(f"{store}: {'ok' if not found else f'{len(found)} problem(s)'}")
        problems += found
    if problems:
        raise StoreError("\n".join(problems))
    print(f"verified: {len(stores)} stores under {path}, no problems")


def cmd_unlearn(args: argparse.Namespace) -> None:
    from pipelines.rundir.layout import load_run_config
    from pipelines.stages.unlearn import read_forget_ids, serve_request

    run_dir = as_path(args.run)  # the run may be on an object store; --out is a local file
    cfg = load_run_config(run_dir)
    res = serve_request(run_dir, cfg, read_forget_ids(Path(args.forget)), args.method, args.model, Path(args.out))
    print(f"{args.method} on full model {args.model}: {res['seconds']:.2f} s, {res['example_passes']:.0f} "
          f"example passes -> {res['out']}")
    print(f"{'accuracy':<10} {'forget':>8} {'retain':>8} {'test':>8}")
    for when in ("before", "after"):
        a = res[when]
        print(f"{when:<10} {a['forget']:>8.3f} {a['retain']:>8.3f} {a['test']:>8.3f}")


def cmd_report(args: argparse.Namespace) -> None:
    from pipelines.rundir.layout import load_run_config
    from pipelines.stages import RunContext, run_stages

    run_dir = as_path(args.run)
    ctx = RunContext(cfg=load_run_config(run_dir), run_dir=run_dir)
    run_stages(ctx, ["report"])
    print(f"report: {run_dir / 'report' / 'report.md'}")


IMPORT_OPTIONS = ("masks_key", "margins_key", "experiment", "name", "n_models")  # `dmu import` flags passed on


def cmd_import(args: argparse.Namespace) -> None:
    from pipelines.interchange import IMPORTERS

    options = {key: getattr(args, key) for key in IMPORT_OPTIONS if getattr(args, key) is not None}
    known = inspect.signature(IMPORTERS[args.kind]).parameters
    for key in options:
        if key not in known:
            raise ConfigError(f"--{key.replace('_', '-')} does not apply to {args.kind}: leave it out")
    path = IMPORTERS[args.kind](Path(args.source), Path(args.run_dir), **options)
    print(f"imported {args.kind} {args.source} -> {path}")


def cmd_export(args: argparse.Namespace) -> None:
    from pipelines.interchange import EXPORTERS

    out = EXPORTERS[args.kind](Path(args.run_dir), Path(args.out))
    print(f"exported {args.run_dir} as {args.kind} -> {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmu", description="Machine unlearning by data attribution.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the pipeline's stages on a config (resumes finished work)")
    p.add_argument("config", help="YAML config, e.g. pipelines/configs/demo.yaml")
    p.add_argument("--stages", help="comma-separated stages to run (default: the config's `stages`)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--run-dir", help="run directory, a local path or an object-store URL such as "
                   "s3://bucket/runs/demo (default: the config's run_dir, else runs/<name>)")
    p.add_argument("--reuse", action="append", default=[], metavar="RUN_DIR",
                   help="read, read-only, the stores of this other run whose config matches this run's, "
                   "instead of computing them (repeatable; added to the config's `reuse`)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("info", help="what a store (or every store of a run dir) holds and how complete it is")
    p.add_argument("path", help="a store or a run directory (local, or a URL such as s3://bucket/runs/demo)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--verify", action="store_true", help="re-read every store of the run and check it: "
                   "chunks decode, done rows finite, shapes, config against config.json, subset masks "
                   "against the seed")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("unlearn", help="serve one deletion request from a run's precomputed stores")
    p.add_argument("--run", required=True, help="run directory, e.g. runs/demo or s3://bucket/runs/demo")
    p.add_argument("--forget", required=True, help="file of training indices to forget (.npy, JSON, or text)")
    p.add_argument("--method", required=True, help="unlearning method, e.g. dm_matching")
    p.add_argument("--model", type=int, default=0, help="which full model to unlearn (default 0)")
    p.add_argument("--out", required=True, help="where to write the unlearned checkpoint (.pt)")
    p.set_defaults(func=cmd_unlearn)

    p = sub.add_parser("report", help="(re)write a run's report: report.md, metrics.json, plots")
    p.add_argument("run", help="run directory, e.g. runs/demo or s3://bucket/runs/demo")
    p.set_defaults(func=cmd_report)

    from pipelines.interchange import EXPORTERS, IMPORTERS

    p = sub.add_parser("import", help="import a public precomputed store into a run directory (resumable)")
    p.add_argument("kind", choices=sorted(IMPORTERS), help="the source's layout")
    p.add_argument("source", help="folder holding the source's files")
    p.add_argument("--run-dir", required=True, help="run directory to write the dmu stores into")
    p.add_argument("--masks-key", help="datamodels-store: the key of the masks (default masks)")
    p.add_argument("--margins-key", help="datamodels-store: the key(s) of the margins or logits, comma-separated "
                                         "(default margins)")
    p.add_argument("--experiment", help="trak-scores: traker experiment(s), comma-separated (default: the only one)")
    p.add_argument("--name", help="datamodels-weights, trak-scores: datamodels/<name>.zarr (default lasso, trak)")
    p.add_argument("--n-models", type=int, help="edub: import the first n full models and oracles per forget set "
                   "(default: all)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", help="write a run's stores in a public layout")
    p.add_argument("kind", choices=sorted(EXPORTERS), help="the layout to write")
    p.add_argument("--run-dir", required=True, help="run directory to read")
    p.add_argument("--out", required=True, help="folder to write the files into")
    p.set_defaults(func=cmd_export)

    # `dmu linear ...` is dispatched to pipelines.stages.linear.main before parsing (it has its own options)
    sub.add_parser("linear", help="the linear-model experiment (seed paper Figure 3): dmu linear --help")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["linear"]:
        from pipelines.stages.linear import main as linear_main

        return linear_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not args.verbose:  # object-store clients log every session ("Found credentials in environment variables")
        for name in ("botocore", "aiobotocore", "s3fs", "gcsfs", "fsspec", "urllib3", "google"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        args.func(args)
    except USER_ERRORS as exc:
        # one line per problem (`dmu info --verify` may find several)
        for line in str(exc).splitlines() or [""]:
            print(f"dmu: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print(f"dmu: {'terminated (SIGTERM)' if terminated else 'interrupted'}; finished work is saved in the "
              "stores: rerun the same command to resume", file=sys.stderr)
        return 143 if terminated else 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
