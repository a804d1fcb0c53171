"""The `dmu` command: run the pipeline's stages, inspect stores, serve deletion requests, report.

Bad input ends with one line on stderr naming the problem and what to do, and exit status 2; nothing already
computed is lost (stores are written chunk by chunk, done flags last).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from attribution.store import StoreError, summary
from pipelines.config import ConfigError, load_config
from pipelines.executor import UnitError
from pipelines.tasks import DataError

USER_ERRORS = (ConfigError, StoreError, DataError, UnitError, FileNotFoundError)


def cmd_run(args: argparse.Namespace) -> None:
    from pipelines.stages import RunContext, run_stages

    cfg = load_config(args.config)
    if args.run_dir:
        cfg = dataclasses.replace(cfg, run_dir=args.run_dir)
    stages = args.stages.split(",") if args.stages else list(cfg.stages)
    ctx = RunContext(cfg=cfg, run_dir=cfg.resolved_run_dir(), address=args.address)
    try:
        run_stages(ctx, stages)
    finally:
        ctx.close()
    print(f"done: {', '.join(stages)} -> {ctx.run_dir}")


def cmd_info(args: argparse.Namespace) -> None:
    path = Path(args.path)
    stores = [path] if (path / "zarr.json").exists() else sorted(path.glob("**/*.zarr"))
    if not stores:
        raise StoreError(f"no Zarr store at or under {path}: pass a store (runs/demo/subsets.zarr) or a run dir")
    for store in stores:
        info = summary(store)
        if args.json:
            print(json.dumps(info, indent=2, default=str))
            continue
        print(f"{info['path']}  [{info['kind']}]")
        for name, a in info["arrays"].items():
            print(f"  {name:<10} {str(tuple(a['shape'])):<22} {a['dtype']:<8} chunks {tuple(a['chunks'])}")
        if "done" in info:
            pct = 100.0 * info["done"] / max(1, info["total"])
            print(f"  complete: {info['done']}/{info['total']} rows ({pct:.1f}%)")
        attrs = info["attrs"]
        for key in ("dataset", "dataset_fingerprint", "n_train", "n_targets", "config_hash"):
            if key in attrs:
                print(f"  {key}: {attrs[key]}")
        if "config" in attrs:
            print(f"  config: {json.dumps(attrs['config'], sort_keys=True)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmu", description="Machine unlearning by data attribution.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the pipeline's stages on a config (resumes finished work)")
    p.add_argument("config", help="YAML config, e.g. pipelines/configs/demo.yaml")
    p.add_argument("--stages", help="comma-separated stages to run (default: the config's `stages`)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--run-dir", help="run directory (default: the config's run_dir, else runs/<name>)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("info", help="what a store (or every store of a run dir) holds and how complete it is")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        args.func(args)
    except USER_ERRORS as exc:
        print(f"dmu: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dmu: interrupted; finished work is saved in the stores: rerun the same command to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
