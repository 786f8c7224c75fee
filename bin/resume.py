"""``tractrain-resume EXPERIMENT``: continue a run exactly where its checkpoint left it (a run
that stopped before its first checkpoint starts from scratch with its recorded config)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tractrain.atomic import atomic_write_json
from tractrain.bin.common import ArgumentParser, add_verbosity_flags, run
from tractrain.bin.flags import path_arg
from tractrain.bin.options import (
    OPTIONS,
    RESUME_OVERRIDES,
    absolute_paths,
    add_flag,
    convert,
    flag_of,
)
from tractrain.experiment import ExperimentDir, is_unstarted, read_config
from tractrain.imports import absolute_spec, check_recorded

OVERRIDES = RESUME_OVERRIDES
# Their help here (else the option table's, the recorded value being the default).
HELP = {
    "max_epochs": "new total number of epochs (extends a finished run)",
    "patience": "new patience (extends a stopped run)",
    "store": "the store, if it moved",
    "num_workers": "DataLoader workers (does not change the batches)",
    "device": "cpu | cuda | cuda:N | auto",
    "progress": "progress bars on/off",
    "precision": "32 | 16-mixed | bf16-mixed (replaces the recorded --amp)",
    "pin_memory": "pinned DataLoader batches (default: on with CUDA)",
    "device_cache_gb": "volume budget on the device with --interpolate device (GiB)",
    "dist_timeout": "under torchrun: seconds to wait for a peer rank (default: the recorded one)",
}


def make_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="tractrain-resume",
        description="Continue training from EXPERIMENT/checkpoint (model, optimizer, sampler "
        "position, RNG and every hook's state are restored, so the result is the same as an "
        "uninterrupted run). A run that reached max_epochs or its patience continues only if "
        "the limit is raised. A run that stopped before its first checkpoint starts from "
        "scratch with its recorded config.",
    )
    parser.add_argument("experiment", type=path_arg,
                        help="experiment folder written by tractrain-train")
    for name in OVERRIDES:  # converted like tractrain-train's flags
        add_flag(parser, name, help=HELP.get(name, f"{OPTIONS[name][2]} (default: as recorded)"),
                 metavar={"store": "PATH", "device": "DEV"}.get(name))
    parser.add_argument("--from-checkpoint", dest="from_checkpoint", metavar="PATH",
                        type=path_arg,
                        help="go back first to this kept checkpoint, EXPERIMENT/checkpoints/"
                        "epoch-N (see tractrain-train --keep-checkpoints): it becomes the "
                        "live checkpoint again, with the best model of that time")
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
        if given is not None:  # named on this command line: trusted, recorded absolute
            config[option] = absolute_spec(given)
        else:
            spec = config.get(option)
            check_recorded(spec, option, source, args.trust_experiment,
                           f"pass --{option} {spec} or --trust-experiment")
    return config


def resume(args: argparse.Namespace) -> int:
    """Resume under the experiment's writer lock; ``config.json`` is rewritten (with the
    overrides, for next time) only once a checkpoint of the resumed run exists."""
    from tractrain.engine.distributed import launched_by_torchrun

    if launched_by_torchrun():  # the ranks meet first, then rank 0 reads the folder
        from tractrain.bin.launch import torchrun_resume

        return torchrun_resume(args)
    config, from_scratch, _, lock = prepare_resume(args)
    with lock:
        return continue_run(config, ExperimentDir(Path(args.experiment)),
                            from_scratch=from_scratch, debug=args.debug, prog="tractrain-resume")


def prepare_resume(args: argparse.Namespace):
    """``(config, from_scratch, checkpoint stamp, lock)``: the experiment's config with the
    overrides (after going back to a kept checkpoint if asked), under its writer lock (held
    until released), after the checks."""
    from tractrain.bin.train import writer_lock
    from tractrain.hooks.checkpoint import read_meta

    overrides = absolute_paths({name: convert(name, getattr(args, name), flag_of(name))
                                for name in OVERRIDES if getattr(args, name) is not None})
    exp_dir = Path(args.experiment)
    exp = ExperimentDir(exp_dir)
    read_config(exp_dir)  # refuses a missing folder before taking the lock
    lock = writer_lock(exp)
    try:
        config = trusted_code(args, read_config(exp_dir), str(exp.config))
        config.update(overrides)
        if args.from_checkpoint is not None:
            from tractrain.hooks.checkpoint import go_back

            go_back(exp_dir, args.from_checkpoint)
        from_scratch = is_unstarted(exp_dir)
        if not from_scratch:
            read_meta(exp_dir)  # a clear error now if there is no usable checkpoint
        if "precision" in overrides:
            config["amp"] = False  # its older alias no longer applies
    except BaseException:
        lock.__exit__(None, None, None)
        raise
    if from_scratch:
        print(f"{exp_dir}: no checkpoint yet (the run stopped before its first one): "
              "starting from scratch with its recorded config", flush=True)
    return config, from_scratch, checkpoint_stamp(exp), lock


def continue_run(config: dict, exp: ExperimentDir, *, from_scratch: bool, debug: bool,
                 prog: str) -> int:
    """Train ``exp`` on with ``config`` (the caller holds its lock); ``config.json`` is
    rewritten only once the run saved a checkpoint."""
    from tractrain.bin.train import train_to_end

    before = checkpoint_stamp(exp)
    try:
        return train_to_end(config, exp.root, resume=not from_scratch, debug=debug, prog=prog)
    finally:
        keep_config(exp, config, before)


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
