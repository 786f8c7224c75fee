"""``tractrain-resume EXPERIMENT``: continue a run exactly where its checkpoint left it (a run
that stopped before its first checkpoint starts from scratch with its recorded config)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tractrain.atomic import atomic_write_json
from tractrain.bin.common import ArgumentParser, add_verbosity_flags, run
from tractrain.bin.options import convert
from tractrain.experiment import ExperimentDir, is_unstarted, read_config
from tractrain.imports import check_recorded

OVERRIDES = ("max_epochs", "patience", "store", "num_workers", "device", "progress",
             "log_every", "dist_timeout")


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
    parser.add_argument("--log-every", dest="log_every", metavar="N",
                        help="with -v, log the training loss every N iterations")
    parser.add_argument("--dist-timeout", dest="dist_timeout", metavar="SECONDS",
                        help="under torchrun: seconds to wait for a peer rank (default: the "
                        "recorded one)")
    add_verbosity_flags(parser)
    add_trust_flags(parser, loss=True)
    return parser


def add_trust_flags(parser: ArgumentParser, loss: bool) -> None:
    """``--model``, ``--loss`` and ``--trust-experiment``: what code an experiment may run."""
    parser.add_argument("--model", metavar="PKG.MOD:NAME", default=None,
                        help="model factory to use instead of the one recorded in the "
                        "experiment (needed when that one is not tractrain's own)")
    if loss:
        parser.add_argument("--loss", metavar="PKG.MOD:NAME", default=None,
                            help="loss function to use instead of the one recorded in the "
                            "experiment (needed when that one is not tractrain's own)")
    parser.add_argument("--trust-experiment", dest="trust_experiment", action="store_true",
                        help="import and run the model/loss code the experiment folder names "
                        "(only for folders you trust: importing runs code)")


def trusted_code(args: argparse.Namespace, config: dict, source: str,
                 options: tuple[str, ...] = ("model", "loss")) -> dict:
    """``config`` with ``--model``/``--loss`` applied; refuses (before importing anything) a
    recorded name that is not tractrain's own, unless ``--trust-experiment``."""
    config = dict(config)
    for option in options:
        given = getattr(args, option, None)
        if given is not None:
            config[option] = given
        else:
            spec = config.get(option)
            check_recorded(spec, option, source, args.trust_experiment,
                           f"pass --{option} {spec} or --trust-experiment")
    return config


def resume(args: argparse.Namespace) -> int:
    """Resume under the experiment's writer lock; ``config.json`` is rewritten (with the
    overrides, for next time) only once a checkpoint of the resumed run exists."""
    from tractrain.bin.train import train_to_end
    from tractrain.engine.distributed import launched_by_torchrun

    if launched_by_torchrun():  # the ranks meet first, then rank 0 reads the folder
        from tractrain.bin.launch import torchrun_resume

        return torchrun_resume(args)
    exp_dir = Path(args.experiment)
    config, from_scratch, before, lock = prepare_resume(args)
    with lock:
        try:
            return train_to_end(config, exp_dir, resume=not from_scratch, debug=args.debug,
                                prog="tractrain-resume")
        finally:
            keep_config(ExperimentDir(exp_dir), config, before)


def prepare_resume(args: argparse.Namespace):
    """``(config, from_scratch, checkpoint stamp, lock)``: the experiment's config with the
    overrides, under its writer lock (held until released), after the checks."""
    from tractrain.bin.train import writer_lock
    from tractrain.hooks.checkpoint import read_meta

    exp_dir = Path(args.experiment)
    exp = ExperimentDir(exp_dir)
    read_config(exp_dir)  # refuses a missing folder before taking the lock
    lock = writer_lock(exp)
    try:
        config = trusted_code(args, read_config(exp_dir), str(exp.config))
        from_scratch = is_unstarted(exp_dir)
        if not from_scratch:
            read_meta(exp_dir)  # a clear error now if there is no usable checkpoint
        for name in OVERRIDES:
            value = getattr(args, name, None)
            if value is not None:
                config[name] = convert(name, value, "--" + name.replace("_", "-"))
    except BaseException:
        lock.__exit__(None, None, None)
        raise
    if from_scratch:
        print(f"{exp_dir}: no checkpoint yet (the run stopped before its first one): "
              "starting from scratch with its recorded config", flush=True)
    return config, from_scratch, checkpoint_stamp(exp), lock


def keep_config(exp: ExperimentDir, config: dict, before: bytes | None) -> None:
    """Record the resumed run's config once it has saved a checkpoint of its own."""
    if checkpoint_stamp(exp) != before:
        atomic_write_json(exp.config, config)


def checkpoint_stamp(exp: ExperimentDir) -> bytes | None:
    """The bytes of the checkpoint's ``meta.json`` (changes with every save), or None."""
    try:
        return (exp.checkpoint / "meta.json").read_bytes()
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return run(resume, args)


if __name__ == "__main__":
    sys.exit(main())
