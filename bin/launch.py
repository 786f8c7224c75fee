"""``tractrain-train`` and ``tractrain-resume`` under ``torchrun``: the ranks meet, then rank 0
alone prepares the experiment.

Every node runs the same command. The ranks first join the process group
(``--dist-timeout`` bounds the rendezvous and every collective); then rank 0 creates,
replaces (``--force``) or opens the experiment folder, under its writer lock, while the other
ranks check their own node (the store exists there, the model and loss import); the outcomes
are exchanged in one collective (`tractrain.engine.distributed.agree`), so a failure anywhere
ends every rank with the same one line and a non-zero status, and a folder that never got a
checkpoint is removed again. The other ranks never read or write the experiment folder: rank 0
broadcasts the config and, on resume, the checkpoint. The folder therefore need not be on a
filesystem shared by the nodes; when it is not, rank 0 (node rank 0) must run where it is.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

from tractrain.errors import ConfigError

# options that may differ between the nodes of one run: the demo cache sits under each HOME
PER_NODE = ("cache_dir",)


def _as_rank(body: Callable[[], int], prog: str, debug: bool) -> int:
    """``body()``; a collective that failed because a peer was lost is one line, status 1."""
    from tractrain.engine.distributed import lost_peer

    try:
        return body()
    except RuntimeError as err:
        line = lost_peer(err)
        if line is None or debug:
            raise
        print(f"{prog}: error: {line}", file=sys.stderr, flush=True)
        return 1


def _backend(device: str) -> str:
    from tractrain.bin.compose import resolve_device
    from tractrain.engine.distributed import default_backend

    return default_backend(resolve_device(device))


def _same_options(configs: list[dict]) -> None:
    """Refuse (on every rank) a run whose nodes were given different options."""
    def shared(config: dict) -> dict:
        return {k: v for k, v in config.items() if k not in PER_NODE}

    first = shared(configs[0])
    for rank, config in enumerate(configs[1:], start=1):
        other = shared(config)
        differ = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        if differ:
            raise ConfigError(f"rank {rank}: options differ from rank 0's ({', '.join(differ)})"
                              ": run the same command on every node")


def _node_check(config: dict) -> None:
    """What a rank other than 0 needs on its own node: the store, the model and loss code."""
    from tractrain.imports import import_object

    import_object(config["model"], "model")
    import_object(config["loss"], "loss")
    if config["store"] is not None and not Path(config["store"]).exists():
        raise FileNotFoundError(f"--store {config['store']}: no such store on this node "
                                "(every node must see the store at the same path)")


def torchrun_train(args: argparse.Namespace, config: dict, given: set[str]) -> int:
    """`tractrain.bin.train.train` on one rank of a torchrun launch; with ``--resume auto``
    rank 0 continues a started experiment (``given``: the options set by the user, which
    `tractrain.bin.cluster.auto_config` checks against the recorded ones)."""
    from tractrain.bin.cluster import is_started, prepare_continue
    from tractrain.bin.compose import open_run_store
    from tractrain.bin.resume import keep_config
    from tractrain.bin.train import (
        EXIT_FAILED,
        drop_if_unstarted,
        preflight,
        prepare_experiment,
        train_to_end,
    )
    from tractrain.engine.distributed import agree, is_main, process_group
    from tractrain.experiment import ExperimentDir

    prepared: dict = {}
    exp = ExperimentDir(Path(config["experiments"]) / config["name"])

    def prepare() -> dict:
        preflight(config)
        if not is_main():
            return {"config": config, "continue": None}
        if args.resume == "auto" and is_started(exp):
            prepared.update(prepare_continue(config, given, exp))
            return {"config": config, "continue": (prepared["config"],
                                                   prepared["from_scratch"])}
        exp_dir, prepared["lock"] = prepare_experiment(config, args.force)
        print(f"experiment: {exp_dir}  (config: {ExperimentDir(exp_dir).config})", flush=True)
        open_run_store(config)  # the demo store, built before the other ranks open it
        return {"config": config, "continue": None}

    def body() -> int:
        status = EXIT_FAILED
        try:
            outcomes = agree(prepare)
            _same_options([outcome["config"] for outcome in outcomes])
            if outcomes[0]["continue"] is None:
                status = train_to_end(config, exp.root, resume=False, debug=args.debug,
                                      prog="tractrain-train")
                return status
            recorded, from_scratch = outcomes[0]["continue"]
            agree(lambda: None if is_main() else _node_check(recorded))
            status = train_to_end(recorded, exp.root, resume=not from_scratch,
                                  debug=args.debug, prog="tractrain-train")
            return status
        finally:
            lock = prepared.get("lock")
            if lock is not None:
                with lock:
                    if "before" in prepared:  # continued: record its config once it saved
                        keep_config(exp, prepared["config"], prepared["before"])
                    elif status != 0:
                        drop_if_unstarted(exp, lock)

    with process_group(_backend(config["device"]), config["dist_timeout"]):
        return _as_rank(body, "tractrain-train", args.debug)


def _recorded(args: argparse.Namespace) -> dict:
    """The experiment's recorded options if this node sees them (for the process group's
    backend and timeout, needed before rank 0 can send them), else ``{}``."""
    from tractrain.experiment import read_config

    try:
        return read_config(args.experiment)
    except (OSError, ValueError):
        return {}


def torchrun_resume(args: argparse.Namespace) -> int:
    """`tractrain.bin.resume.resume` on one rank of a torchrun launch."""
    from tractrain.bin.options import convert
    from tractrain.bin.resume import keep_config, prepare_resume
    from tractrain.bin.train import train_to_end
    from tractrain.engine.distributed import DEFAULT_TIMEOUT_S, agree, is_main, process_group
    from tractrain.experiment import ExperimentDir

    recorded = _recorded(args)
    device = args.device or recorded.get("device") or "auto"
    timeout = (convert("dist_timeout", args.dist_timeout, "--dist-timeout")
               if args.dist_timeout is not None else
               recorded.get("dist_timeout") or DEFAULT_TIMEOUT_S)
    exp = ExperimentDir(args.experiment)
    prepared: dict = {}

    def prepare():
        if not is_main():
            return None
        config, from_scratch, before, prepared["lock"] = prepare_resume(args)
        prepared["before"], prepared["config"] = before, config
        return config, from_scratch

    def body() -> int:
        try:
            config, from_scratch = agree(prepare)[0]
            agree(lambda: None if is_main() else _node_check(config))
            return train_to_end(config, exp.root, resume=not from_scratch, debug=args.debug,
                                prog="tractrain-resume")
        finally:
            with prepared.get("lock") or contextlib.nullcontext():
                if "config" in prepared:
                    keep_config(exp, prepared["config"], prepared["before"])

    with process_group(_backend(device), float(timeout)):
        return _as_rank(body, "tractrain-resume", args.debug)
