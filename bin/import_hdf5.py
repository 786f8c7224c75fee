"""``tractrain-import-hdf5 IN.hdf5 OUT.zarr``: convert a dwi_ml HDF5 file into a store."""

from __future__ import annotations

import argparse
import sys

from tractrain.bin.build_store import add_jobs_flag
from tractrain.bin.common import ArgumentParser, run
from tractrain.bin.flags import add_bool_flag, path_arg


def make_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="tractrain-import-hdf5",
        description="Convert a dwi_ml HDF5 file (written by dwiml_create_hdf5_dataset) into a "
        "tractrain store (Zarr, format v1): every subject and group, its train/valid/test "
        "splits, streamlines converted to voxel-centre coordinates (see docs/store-format.md).",
    )
    parser.add_argument("hdf5", metavar="IN.hdf5", type=path_arg, help="dwi_ml HDF5 file")
    parser.add_argument("out", metavar="OUT.zarr", type=path_arg, help="output store folder")
    parser.add_argument("--force", action="store_true",
                        help="replace OUT if it is a store (never anything else)")
    add_bool_flag(parser, "--progress", "progress",
                  help="progress bar (default: when stderr is a terminal)")
    parser.add_argument("--allow-outside", action="store_true",
                        help="import even when more than 1%% of a subject's streamline points "
                        "lie outside its volume (wrong space)")
    add_jobs_flag(parser, "import")
    return parser


def convert(args: argparse.Namespace) -> int:
    from tractrain.data.import_hdf5 import import_hdf5
    from tractrain.data.space_check import StreamedInsideCheck

    check = None if args.allow_outside else StreamedInsideCheck(args.hdf5)
    out = import_hdf5(args.hdf5, args.out, force=args.force, progress=args.progress,
                      check_points=check, jobs=args.jobs)
    print(f"store written: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return run(convert, args)


if __name__ == "__main__":
    sys.exit(main())
