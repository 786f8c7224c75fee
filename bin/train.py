"""``tractrain-train [CONFIG] [--option VALUE ...]``: train a model; no arguments = the demo.

With no arguments it builds (once, cached) the demo phantom store and trains the example GRU
of `tractrain.examples.next_direction` for a few epochs with validation.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from tractrain.atomic import atomic_write_json
from tractrain.bin.common import ArgumentParser, add_verbosity_flags, run
from tractrain.bin.flags import path_arg
from tractrain.bin.options import (
    OPTIONS,
    SECTIONS,
    absolute_paths,
    add_option_flags,
    read_config_file,
    resolve,
)
from tractrain.errors import ConfigError
from tractrain.experiment import ExperimentDir, check_name, has_checkpoint, is_unstarted

EXIT_FAILED = 1


def make_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="tractrain-train",
        description="Train a model on a tractrain store, with checkpoints, best model, "
        "patience, logs, plots and optional Comet. With no arguments, trains the demo model "
        "on the built-in phantom. Options come from CONFIG (YAML or JSON, same names with "
        "underscores) and are overridden by flags.",
        epilog="Sections: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in SECTIONS.items()),
    )
    parser.add_argument("config", nargs="?", type=path_arg, help="YAML or JSON config file")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing experiment folder of the same name")
    parser.add_argument("--resume", choices=("never", "auto"), default="never",
                        help="auto: continue the experiment if it exists (as tractrain-resume "
                        "does; options that differ from its config.json are refused, but "
                        "those tractrain-resume may change), else start it: one command for "
                        "the first start and every requeued one (default: never, an existing "
                        "experiment is refused)")
    add_verbosity_flags(parser)
    add_option_flags(parser)
    return parser


def writer_lock(exp: ExperimentDir):
    """The experiment's writer lock (a no-op in the other ranks of a torchrun launch)."""
    if os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext()
    return exp.lock()


def prepare_experiment(config: dict, force: bool):
    """Create ``<experiments>/<name>`` with the resolved config; refuse an existing one, unless
    its run stopped before its first checkpoint (nothing to lose: it is replaced).

    Returns ``(folder, lock)``: the folder's writer lock, held until released. ``--force``
    empties only a tractrain experiment that no other process is writing (never a symbolic
    link, a foreign folder or anything outside ``--experiments``).
    """
    exp_dir = Path(config["experiments"]) / check_name(config["name"])
    exp = ExperimentDir(exp_dir)
    if exp_dir.is_symlink():
        raise ConfigError(f"{exp_dir}: is a symbolic link; choose another --name")
    if exp_dir.exists():
        unstarted = exp_dir.is_dir() and is_unstarted(exp_dir)
        if not force and not unstarted:
            raise FileExistsError(
                f"{exp_dir}: experiment exists; continue it with 'tractrain-resume {exp_dir}' "
                "or start over with --force"
            )
        why = exp.foreign_entry()
        if why is not None:
            raise ConfigError(f"{exp_dir}: not removed by --force: {why}")
        lock = writer_lock(exp)
        if unstarted and not force:
            print(f"{exp_dir}: replaced (its run stopped before its first checkpoint)",
                  flush=True)
        try:
            exp.clear()
        except BaseException:
            lock.__exit__(None, None, None)
            raise
    else:
        exp_dir.mkdir(parents=True)
        lock = writer_lock(exp)
    atomic_write_json(exp.config, config)
    return exp_dir, lock


def finish(trainer, exp_dir: Path, config: dict) -> int:
    """Plot, print where everything is, requeue a SLURM job stopped by SIGUSR1 if asked
    (`tractrain.bin.cluster.after_stop`), and return the exit status."""
    from tractrain.bin.cluster import after_stop
    from tractrain.bin.report import summary, write_plot

    plot = write_plot(exp_dir)
    print(summary(trainer, exp_dir, plot), flush=True)
    stopped = getattr(trainer.state, "stopped_by_signal", None)
    return after_stop(stopped, bool(config.get("requeue")), exp_dir) if stopped else 0


def preflight(config: dict) -> None:
    """Check what can be checked before creating the experiment folder."""
    from tractrain.bin.compose import check_options, resolve_device
    from tractrain.imports import import_object

    check_name(config["name"])
    check_options(config)
    import_object(config["model"], "model")
    import_object(config["loss"], "loss")
    resolve_device(config["device"])
    if config["store"] is not None and not Path(config["store"]).exists():
        raise FileNotFoundError(f"--store {config['store']}: no such store")


def _rank_main(local_rank: int, config: dict, exp_dir: str, resume: bool,
               debug: bool = False) -> None:
    """One process of a distributed run; rank 0 prints the summary."""
    from tractrain.bin.common import quiet_ignite
    from tractrain.bin.compose import run_training
    from tractrain.engine.distributed import is_main
    from tractrain.log import configure

    # a spawned rank starts without the launcher's logging set-up
    with configure(), quiet_ignite(debug):
        trainer = run_training(config, Path(exp_dir), resume=resume)
    if is_main():
        status = finish(trainer, Path(exp_dir), config)
        if status:  # stopped by a signal (not requeued): the launcher exits with it
            sys.exit(status)


def signal_status(trainer) -> int:
    """128 + the signal's number for a run stopped by a signal (130 SIGINT, 143 SIGTERM), else
    0: the status of a rank other than 0 (rank 0 may requeue: `finish`)."""
    from tractrain.bin.cluster import signal_status as status_of

    stopped = getattr(trainer.state, "stopped_by_signal", None)
    return status_of(stopped) if stopped else 0


def train_to_end(config: dict, exp_dir: Path, *, resume: bool, debug: bool, prog: str) -> int:
    """Train (or resume), then plot and print the summary; a NaN stop is one line, status 1.

    With ``nproc_per_node > 1`` every rank runs `run_training` through
    ``ignite.distributed``; the demo store is built once here first. In a process group
    already joined (a torchrun rank, `tractrain.bin.launch`) this process is one rank: it
    trains and rank 0 prints the summary.
    """
    from torch.multiprocessing import ProcessExitedException

    from tractrain.bin.compose import open_run_store, resolve_device, run_training
    from tractrain.engine.distributed import (
        DEFAULT_TIMEOUT_S,
        default_backend,
        is_distributed,
        is_main,
        run_distributed,
    )
    from tractrain.engine.trainer import NonFiniteError

    nproc = int(config.get("nproc_per_node") or 1)
    if nproc > 1 and not is_distributed():
        open_run_store(config)  # build and cache the demo store before the ranks start
        backend = default_backend(resolve_device(config["device"]))
        try:
            run_distributed(_rank_main, nproc, backend,
                            args=(config, str(exp_dir), resume, debug),
                            timeout_s=float(config.get("dist_timeout") or DEFAULT_TIMEOUT_S))
        except ProcessExitedException as err:  # rank 0 stopped by a signal: its status
            from tractrain.bin.cluster import STOP_STATUSES

            if err.error_index == 0 and err.exit_code in STOP_STATUSES:
                return err.exit_code
            raise
        return 0
    try:
        trainer = run_training(config, exp_dir, resume=resume)
    except NonFiniteError as err:
        if debug:
            raise
        if not is_main():
            return EXIT_FAILED  # rank 0 says it, once
        if has_checkpoint(exp_dir):
            print(f"{prog}: stopped: {err}; last good checkpoint kept in "
                  f"{ExperimentDir(exp_dir).checkpoint}", file=sys.stderr)
        else:
            print(f"{prog}: stopped before the first checkpoint: {err}; nothing was saved: fix "
                  "the cause, then run the same command again", file=sys.stderr)
        return EXIT_FAILED
    return finish(trainer, exp_dir, config) if is_main() else signal_status(trainer)


def drop_if_unstarted(exp: ExperimentDir, lock) -> None:
    """After a failed run: remove the folder if it holds nothing but its config (the run
    stopped before its first checkpoint), so that the same command works again."""
    if is_unstarted(exp.root):
        exp.clear()
        exp.config.unlink(missing_ok=True)
        lock.release()
        exp.root.rmdir()


def train(args: argparse.Namespace) -> int:
    file_options = read_config_file(args.config) if args.config else {}
    config = absolute_paths(resolve(file_options, vars(args), source=args.config or
                                    "config file"))
    if config["store"] is None:  # recorded, so that eval and track find the same demo store
        from tractrain.bin.compose import demo_cache

        config["cache_dir"] = str(demo_cache(config))
    if args.force and args.resume == "auto":
        raise ConfigError("--force and --resume auto: choose one (start over, or continue)")
    from tractrain.bin.cluster import is_started
    from tractrain.engine.distributed import launched_by_torchrun

    given = set(file_options) | {k for k, v in vars(args).items()
                                 if v is not None and k in OPTIONS}
    if launched_by_torchrun():  # the ranks meet first, then rank 0 prepares the folder
        from tractrain.bin.launch import torchrun_train

        return torchrun_train(args, config, given)
    preflight(config)
    if args.resume == "auto":
        exp_dir = Path(config["experiments"]) / config["name"]
        if is_started(ExperimentDir(exp_dir)):
            return continue_auto(config, given, exp_dir, args.debug)
    exp_dir, lock = prepare_experiment(config, args.force)
    exp = ExperimentDir(exp_dir)
    print(f"experiment: {exp_dir}  (config: {exp.config})", flush=True)
    status = EXIT_FAILED
    with lock:
        try:
            status = train_to_end(config, exp_dir, resume=False, debug=args.debug,
                                  prog="tractrain-train")
            return status
        finally:
            if status != 0:
                drop_if_unstarted(exp, lock)


def continue_auto(config: dict, given: set[str], exp_dir: Path, debug: bool) -> int:
    """``--resume auto`` on a started experiment: continue it like tractrain-resume, with the
    recorded config and this command's allowed changes (`tractrain.bin.cluster.auto_config`)."""
    from tractrain.bin.cluster import prepare_continue
    from tractrain.bin.resume import keep_config

    exp = ExperimentDir(exp_dir)
    prepared = prepare_continue(config, given, exp)
    with prepared["lock"]:
        try:
            return train_to_end(prepared["config"], exp.root,
                                resume=not prepared["from_scratch"], debug=debug,
                                prog="tractrain-train")
        finally:
            keep_config(exp, prepared["config"], prepared["before"])


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return run(train, args)


if __name__ == "__main__":
    sys.exit(main())
