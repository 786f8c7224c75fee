"""``tractrain-build-store CONFIG OUT.zarr``: build a store from NIfTI volumes and tractograms."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tractrain.bin.common import ArgumentParser, run
from tractrain.bin.flags import add_bool_flag, path_arg

MAX_JOBS = 1024


def jobs_count(text: str) -> int:
    """``--jobs``: a whole number of processes in 1..`MAX_JOBS` (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_JOBS:
        raise argparse.ArgumentTypeError(f"expected a number of processes from 1 to {MAX_JOBS}, "
                                         f"got {text!r}")
    return value


def add_jobs_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """``--jobs N`` of build-store and import-hdf5 (`tractrain.data.parallel_build`)."""
    parser.add_argument("--jobs", metavar="N", type=jobs_count, default=None,
                        help=f"{what} N subjects at a time, in parallel processes; the store is "
                        "the same for any N (default: one per core, fewer if that many subjects "
                        "would not fit in the available memory, and 1 when all subjects are "
                        "small; 1: in this process, no worker started)")


def make_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="tractrain-build-store",
        description="Build a tractrain store (Zarr, format v1) from per-subject NIfTI volumes "
        "and .trk/.tck/.trx tractograms described by a JSON config (every key: docs/builder.md), "
        "or by dwi_ml's group config and subject lists (see docs/coming-from-dwi_ml.md).",
    )
    parser.add_argument("config", type=path_arg,
                        help="JSON builder config ('groups' and 'subjects'), or "
                        "dwi_ml's group config with --train/--valid/--test-subjects")
    parser.add_argument("out", type=path_arg, help="output store folder, e.g. data.zarr")
    parser.add_argument("--root", type=path_arg, help="folder holding one sub-folder per subject "
                        "(default: the config's folder)")
    parser.add_argument("--force", action="store_true",
                        help="replace OUT if it is a store (never anything else)")
    add_bool_flag(parser, "--progress", "progress",
                  help="progress bar (default: when stderr is a terminal)")
    parser.add_argument("--quiet", dest="progress", action="store_const", const=False,
                        help="same as --progress false")
    parser.add_argument("--allow-outside", action="store_true",
                        help="build even when more than 1%% of a subject's streamline points "
                        "lie outside their reference volume (config key 'allow_outside' per "
                        "streamline group)")
    add_jobs_flag(parser, "build")
    lists = parser.add_argument_group(
        "dwi_ml config", "CONFIG may be dwi_ml's JSON group config (as for "
        "dwiml_create_hdf5_dataset); its subjects then come from dwi_ml's subject-list files")
    for split in ("train", "valid", "test"):
        lists.add_argument(f"--{split}-subjects", metavar="FILE", type=path_arg,
                           help=f"{split} subject ids, separated by white space")
    return parser


def _config(args: argparse.Namespace) -> dict:
    from tractrain.data.build_config import read_json, validate_config
    from tractrain.data.dwi_ml_config import is_dwi_ml_config, read_subject_list, translate
    from tractrain.errors import ConfigError

    raw = read_json(args.config)
    flags = {split: getattr(args, f"{split}_subjects") for split in ("train", "valid", "test")}
    if not is_dwi_ml_config(raw):
        given = [f"--{k}-subjects" for k, v in flags.items() if v]
        if given:
            raise ConfigError(f"{given[0]}: subject-list files go with a dwi_ml group config; "
                              f"{args.config} is a tractrain config (its 'subjects' key)")
        return validate_config(raw, str(args.config))
    missing = [f"--{k}-subjects" for k, v in flags.items() if not v]
    if missing:
        raise ConfigError(f"{args.config}: a dwi_ml group config needs its subject lists: "
                          f"{', '.join(missing)} FILE missing")
    subjects = {k: read_subject_list(v, f"--{k}-subjects") for k, v in flags.items()}
    return translate(raw, subjects, str(args.config))


def build(args: argparse.Namespace) -> int:
    from tractrain.data.builder import build_store

    config = _config(args)
    root = Path(args.root) if args.root else Path(args.config).resolve().parent
    out = build_store(config, args.out, root, force=args.force, progress=args.progress,
                      config_path=str(args.config), allow_outside=args.allow_outside,
                      jobs=args.jobs)
    print(f"store written: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return run(build, args)


if __name__ == "__main__":
    sys.exit(main())
