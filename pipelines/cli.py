"""The `dmu` command: run the pipeline's stages, inspect stores, serve deletion requests, report.

Bad input ends with one line on stderr naming the problem and what to do, and exit status 2; nothing already
computed is lost (stores are written chunk by chunk, done flags last). `dmu run` holds its run directory's lock
(pipelines.stages.RunLock) while it runs, and treats SIGTERM as Ctrl-C: one line, exit 143, finished work kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from attribution.store import StoreError, as_path, check_reachable, exists, find_stores, summary
from pipelines.config import ConfigError, load_config
from pipelines.executor import ClusterError, UnitError
from pipelines.tasks import DataError

USER_ERRORS = (ConfigError, StoreError, DataError, UnitError, ClusterError, FileNotFoundError)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so that it unwinds as Ctrl-C does (pending units cancelled, the
    lock released, finished units kept in the stores)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


def cmd_run(args: argparse.Namespace) -> None:
    from pipelines.stages import RunContext, RunLock, run_stages

    cfg = load_config(args.config)
    if args.run_dir:
        cfg = dataclasses.replace(cfg, run_dir=args.run_dir)
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
    stores = [path] if exists(path) else find_stores(path)
    if not stores:
        raise StoreError(f"no Zarr store at or under {path}: pass a store (runs/demo/subsets.zarr) or a run dir")
    for store in stores:
        info = summary(store)
        if args.json:
            print(json.dumps(info, indent=2, default=str))
            continue
        print(f"{info['path']}  [{info['kind']}]")
        for name, a in info["arrays"].items():
            print(f"  {name:<24} {str(tuple(a['shape'])):<22} {a['dtype']:<8} chunks {tuple(a['chunks'])}")
        print(f"  on disk: {info['bytes_on_disk'] / 2**20:.1f} MiB ({info.get('bytes_uncompressed', 0) / 2**20:.1f} "
              "MiB of arrays uncompressed)")
        for part, (done, total) in info["completion"].items():
            where = "" if part == "." else f" {part}"
            print(f"  complete{where}: {done}/{total} rows ({100.0 * done / max(1, total):.1f}%)")
        attrs = info["attrs"]
        for key in ("dataset", "dataset_fingerprint", "n_train", "n_targets", "config_hash"):
            if key in attrs:
                print(f"  {key}: {attrs[key]}")
        if "config" in attrs:
            print(f"  config: {json.dumps(attrs['config'], sort_keys=True)}")


def cmd_unlearn(args: argparse.Namespace) -> None:
    from pipelines.stages import load_run_config
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
    from pipelines.stages import RunContext, load_run_config, run_stages

    run_dir = as_path(args.run)
    ctx = RunContext(cfg=load_run_config(run_dir), run_dir=run_dir)
    run_stages(ctx, ["report"])
    print(f"report: {run_dir / 'report' / 'report.md'}")


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
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("info", help="what a store (or every store of a run dir) holds and how complete it is")
    p.add_argument("path", help="a store or a run directory (local, or a URL such as s3://bucket/runs/demo)")
    p.add_argument("--json", action="store_true", help="print JSON")
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

    # `dmu linear ...` is dispatched to pipelines.linear.main before parsing (it has its own options)
    sub.add_parser("linear", help="the linear-model experiment (seed paper Figure 3): dmu linear --help")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["linear"]:
        from pipelines.linear import main as linear_main

        return linear_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not args.verbose:  # object-store clients log every session ("Found credentials in environment variables")
        for name in ("botocore", "aiobotocore", "s3fs", "gcsfs", "fsspec", "urllib3", "google"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        args.func(args)
    except USER_ERRORS as exc:
        print(f"dmu: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print(f"dmu: {'terminated (SIGTERM)' if terminated else 'interrupted'}; finished work is saved in the "
              "stores: rerun the same command to resume", file=sys.stderr)
        return 143 if terminated else 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
