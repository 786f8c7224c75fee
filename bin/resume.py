"""``tractrain-resume EXPERIMENT``: continue a run exactly where its checkpoint left it (a run
that stopped before its first checkpoint starts from scratch with its recorded config)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tractrain.atomic import atomic_write_bytes, atomic_write_json
from tractrain.bin.common import ArgumentParser, run
from tractrain.bin.options import convert
from tractrain.errors import CheckpointError
from tractrain.experiment import ExperimentDir, is_unstarted, read_config

OVERRIDES = ("max_epochs", "patience", "store", "num_workers", "device", "progress")


def make_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="tractrain-resume",
        description="Continue training from EXPERIMENT/checkpoint (model, optimizer, sampler "
        "position, RNG and every hook's state are restored, so the result is the same as an "
        "uninterrupted run). A run that reached max_epochs or its patience continues only if "
        "the limit is raised. A run that stopped before its first checkpoint starts from "
        "scratch with its recorded config.",
    )
    parser.add_argument("experiment", help="experiment folder written by tractrain-train")
    parser.add_argument("--max-epochs", dest="max_epochs", metavar="N",
                        help="new total number of epochs (extends a finished run)")
    parser.add_argument("--patience", metavar="N", help="new patience (extends a stopped run)")
    parser.add_argument("--store", metavar="PATH", help="the store, if it moved")
    parser.add_argument("--num-workers", dest="num_workers", metavar="N",
                        help="DataLoader workers (does not change the batches)")
    parser.add_argument("--device", metavar="DEV", help="cpu | cuda | cuda:N | auto")
    parser.add_argument("--progress", metavar="BOOL", help="progress bars on/off")
    return parser


def resume(args: argparse.Namespace) -> int:
    from tractrain.bin.train import train_to_end
    from tractrain.hooks.checkpoint import read_meta

    exp_dir = Path(args.experiment)
    config = read_config(exp_dir)
    from_scratch = is_unstarted(exp_dir)
    if not from_scratch:
        read_meta(exp_dir)  # a clear error now if there is no usable checkpoint
    for name in OVERRIDES:
        value = getattr(args, name)
        if value is not None:
            config[name] = convert(name, value, "--" + name.replace("_", "-"))
    config_path = ExperimentDir(exp_dir).config
    before = config_path.read_bytes()
    atomic_write_json(config_path, config)  # the extended limits, for next time
    if from_scratch:
        print(f"{exp_dir}: no checkpoint yet (the run stopped before its first one): starting "
              "from scratch with its recorded config", flush=True)
    try:
        return train_to_end(config, exp_dir, resume=not from_scratch, debug=args.debug,
                            prog="tractrain-resume")
    except CheckpointError:  # refused before training: keep the folder as it was
        atomic_write_bytes(config_path, before)
        raise


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return run(resume, args)


if __name__ == "__main__":
    sys.exit(main())
