"""``tractrain-build-store CONFIG OUT.zarr``: build a store from NIfTI volumes and tractograms."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tractrain.bin.common import ArgumentParser, run


def make_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="tractrain-build-store",
        description="Build a tractrain store (Zarr, format v1) from per-subject NIfTI volumes "
        "and .trk/.tck/.trx tractograms described by a JSON config (see docs/store-format.md).",
    )
    parser.add_argument("config", help="JSON builder config ('groups' and 'subjects')")
    parser.add_argument("out", help="output store folder, e.g. data.zarr")
    parser.add_argument("--root", help="folder holding one sub-folder per subject "
                        "(default: the config's folder)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing OUT")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--allow-outside", action="store_true",
                        help="build even when more than 1%% of a subject's streamline points "
                        "lie outside their reference volume (config key 'allow_outside' per "
                        "streamline group)")
    return parser


def build(args: argparse.Namespace) -> int:
    from tractrain.data.build_config import load_config
    from tractrain.data.builder import build_store

    config = load_config(args.config)
    root = Path(args.root) if args.root else Path(args.config).resolve().parent
    out = build_store(config, args.out, root, force=args.force, progress=not args.quiet,
                      config_path=str(args.config), allow_outside=args.allow_outside)
    print(f"store written: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return run(build, args)


if __name__ == "__main__":
    sys.exit(main())
