"""``tractrain-make-phantom OUTDIR``: write synthetic diffusion-MRI subjects and their
store-builder ``config.json`` (see `tractrain.data.phantom.make_phantom`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tractrain.bin.common import ArgumentParser, run
from tractrain.bin.flags import path_arg
from tractrain.errors import ConfigError


def make_parser() -> ArgumentParser:
    """The command-line options of ``tractrain-make-phantom``."""
    parser = ArgumentParser(
        prog="tractrain-make-phantom",
        description="Write a deterministic synthetic dataset (dwi.nii.gz, mask.nii.gz, "
        "bundles.trk per subject) and its store-builder config.json into OUTDIR.",
    )
    parser.add_argument("outdir", metavar="OUTDIR", type=path_arg,
                        help="output folder (missing or empty)")
    parser.add_argument("--subjects", type=int, default=3, help="number of subjects (3)")
    parser.add_argument("--shape", type=int, nargs=3, default=(32, 32, 20),
                        metavar=("X", "Y", "Z"), help="volume shape in voxels (32 32 20)")
    parser.add_argument("--voxel-size", type=float, default=2.0, help="voxel size in mm (2.0)")
    parser.add_argument("--streamlines", type=int, default=300,
                        help="streamlines per subject (300)")
    parser.add_argument("--bundles", type=int, default=6,
                        help="bundles per subject, 1 to 6 from the catalogue: arc, crossing, "
                             "kissing pair, S-shape, fan (6)")
    parser.add_argument("--step", type=float, default=0.5, help="streamline step in mm (0.5)")
    parser.add_argument("--features", choices=("dwi", "sh"), default="dwi",
                        help="dwi: b0-normalised signal (64 features); sh: its SH fit (dwi)")
    parser.add_argument("--sh-order", type=int, default=8, help="SH order for --features sh (8)")
    parser.add_argument("--snr", type=float, default=30.0, help="signal-to-noise ratio (30)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument("--force", action="store_true",
                        help="replace OUTDIR even if it is not empty")
    return parser


def make(args: argparse.Namespace) -> int:
    """Write the phantom of ``args``; a non-empty OUTDIR without ``--force`` is refused."""
    outdir = Path(args.outdir)
    if outdir.exists() and (not outdir.is_dir() or any(outdir.iterdir())) and not args.force:
        raise ConfigError(f"OUTDIR {outdir} exists and is not empty (use --force to replace it)")
    from tractrain.data.phantom import make_phantom  # heavy imports after the checks

    start = time.perf_counter()
    summary = make_phantom(
        outdir, n_subjects=args.subjects, shape=tuple(args.shape),
        voxel_size=args.voxel_size, n_bundles=args.bundles,
        streamlines_per_subject=args.streamlines, step_mm=args.step,
        features=args.features, sh_order=args.sh_order, snr=args.snr, seed=args.seed,
        overwrite=args.force, progress=lambda line: print(line, flush=True),
    )
    splits = ", ".join(f"{k} {len(v)}" for k, v in summary["splits"].items())
    print(
        f"wrote {len(summary['subjects'])} subjects ({splits}), {summary['n_features']} "
        f"{summary['features']} features, to {outdir} in {time.perf_counter() - start:.1f} s; "
        f"builder config: {summary['config']}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (2 for a refused OUTDIR or bad option)."""
    args = make_parser().parse_args(argv)
    return run(make, args)


if __name__ == "__main__":
    sys.exit(main())
