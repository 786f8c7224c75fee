"""`train_and_validate`: the trainer, the evaluator and the default hooks in one call.

Read top to bottom, this is the whole training loop's wiring; every hook can also be attached
alone from your own script (see README.md). Producers of epoch metrics are attached before
their consumers, and the checkpoint last, so it saves the epoch's final state.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from ignite.engine import Engine

from tractrain.engine.distributed import (
    PerRank,
    auto_model,
    from_main,
    get_rank,
    get_world_size,
)
from tractrain.engine.epochs import SamplerEpochs
from tractrain.engine.evaluator import create_evaluator
from tractrain.engine.optim import EpochLR
from tractrain.engine.precision import Precision
from tractrain.engine.rng import GlobalRNG
from tractrain.engine.trainer import LossFn, TrainStep
from tractrain.errors import CheckpointError, ConfigError
from tractrain.hooks.best_model import BestModel
from tractrain.hooks.checkpoint import (
    Checkpoint,
    check_model_state,
    load_checkpoint,
    version_changes,
)
from tractrain.hooks.epoch_log import EpochLog
from tractrain.hooks.grad_norm import GradNorm
from tractrain.hooks.iteration_log import IterationLog
from tractrain.hooks.logs import NpyLogs
from tractrain.hooks.patience import Patience
from tractrain.hooks.progress import Progress
from tractrain.hooks.signals import GracefulStop
from tractrain.hooks.timing import Timing
from tractrain.hooks.trackers import Trackers
from tractrain.hooks.validation import Validation
from tractrain.util import unwrap

log = logging.getLogger(__name__)


def train_and_validate(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    train_loader,
    *,
    exp_dir: str | Path,
    max_epochs: int,
    valid_loader=None,
    train_sampler=None,
    device: str | torch.device = "cpu",
    amp: bool = False,
    precision: str | None = None,
    scaler: torch.amp.GradScaler | None = None,
    clip_grad_norm: float | None = None,
    lr_schedule=None,
    nan_policy: str = "stop",
    check_every: int | None = None,
    patience: int | None = None,
    min_delta: float = 0.0,
    monitor: str | None = None,
    monitor_mode: str = "min",
    producers: tuple = (),
    config: dict | None = None,
    model_config: dict | None = None,
    comet: dict | None = None,
    progress: bool | None = None,
    checkpoint_every: int | None = None,
    handle_signals: bool = True,
    resume: bool = False,
    prepare_batch=None,
    extra_state: dict | None = None,
    resume_hint: str | None = None,
    log_every: int | None = None,
    batch_check=None,
    keep_checkpoints: int = 0,
    trackers: tuple | list = (),
) -> Engine:
    """Train ``model`` for ``max_epochs`` epochs with validation, checkpoints, best model,
    patience, logs, optional Comet; returns the trainer (its ``state.metrics`` hold the last
    epoch's values).

    ``keep_checkpoints`` K > 0 also keeps the last K epoch-end checkpoints in
    ``<exp_dir>/checkpoints/epoch-<n>/``.

    ``train_loader`` iterates a `tractrain.data.sampler.BatchSampler` (``train_sampler``,
    default ``train_loader.sampler``), which makes mid-epoch resume exact. With
    ``resume=True`` every state is restored from ``<exp_dir>/checkpoint`` first.

    In a distributed run (``idist`` world size > 1, see `tractrain.engine.distributed`) call it
    on every rank: the model is wrapped in DDP, the sampler must be this rank's shard with
    ``drop_uneven=True``, losses are reduced over ranks and only rank 0 writes files.

    Progress goes to the ``tractrain`` logger (`EpochLog`): a line per epoch at INFO and, with
    ``log_every`` N, the iteration loss every N iterations at DEBUG; the iteration loss, grad
    norm and lr also go to ``<exp>/logs/iterations.csv`` and ``trackers``
    (`tractrain.hooks.trackers`: tensorboard, mlflow, wandb) every N iterations.
    ``batch_check`` runs on the first training batches (`TrainStep`), e.g. `ZeroInputsCheck`.

    ``precision`` is ``32``, ``16-mixed`` or ``bf16-mixed`` (``amp=True`` is ``16-mixed``;
    see `tractrain.engine.precision`); ``scaler`` replaces the default `GradScaler`.
    """
    exp_dir = Path(exp_dir)
    sampler = train_sampler if train_sampler is not None else train_loader.sampler
    world_size = get_world_size()
    if world_size > 1:
        _check_shard(sampler, get_rank(), world_size)
    net = unwrap(model)  # what is saved, validated and restored
    model = auto_model(model)  # DDP when distributed, else unchanged
    mixed = Precision(precision, device, amp=amp, scaler=scaler)  # warns once if no CUDA
    step = TrainStep(model, optimizer, loss_fn, device=device, precision=mixed,
                     clip_grad_norm=clip_grad_norm, prepare_batch=prepare_batch,
                     nan_policy=nan_policy, check_every=check_every, batch_check=batch_check)
    trainer = step.create_engine()
    position = SamplerEpochs(sampler).attach(trainer)
    objects: dict = {"model": net, "optimizer": optimizer, "scaler": mixed,
                     "position": position, "train_loss": step.mean}
    if lr_schedule is not None:
        objects["lr"] = EpochLR(lr_schedule, optimizer).attach(trainer)
    Timing().attach(trainer)
    objects["grad_norm"] = GradNorm().attach(trainer)
    if valid_loader is not None:
        evaluator = create_evaluator(net, loss_fn, device=device, precision=mixed,
                                     prepare_batch=prepare_batch)
        Validation(evaluator, valid_loader).attach(trainer)
    names = producer_names(producers, taken=(*STATE_NAMES, *(extra_state or {})))
    for name, producer in zip(names, producers, strict=True):  # e.g. GenerationValidation
        producer.attach(trainer)
        objects[name] = producer
    best = objects["best_model"] = BestModel(exp_dir, net, model_config, metric=monitor,
                                                 mode=monitor_mode)
    best.attach(trainer)
    stopper = objects["patience"] = Patience(patience, min_delta, metric=monitor,
                                                     mode=monitor_mode)
    stopper.attach(trainer)
    logs = objects["logs"] = NpyLogs(exp_dir)
    logs.attach(trainer)
    if log_every:
        IterationLog(exp_dir, log_every, optimizer).attach(trainer)
    if trackers:
        objects["trackers"] = Trackers(exp_dir, trackers, every=log_every, optimizer=optimizer,
                                       params=config).attach(trainer)
    if comet is not None:
        from tractrain.hooks.comet import CometLogger

        objects["comet"] = CometLogger(exp_dir, **{"params": config, "log_every": log_every,
                                                   "optimizer": optimizer, **comet})
        objects["comet"].attach(trainer)
    EpochLog(patience, log_every).attach(trainer)
    Progress(enabled=progress, read_every=step.check_every).attach(trainer)  # no sync per batch
    objects.update(extra_state or {})
    objects["rng"] = GlobalRNG(device)  # CUDA: this rank's own device only
    if world_size > 1:  # states that differ by rank: each rank resumes its own
        objects["train_loss"] = PerRank(step.mean, "train_loss")
        objects["rng"] = PerRank(objects["rng"], "rng")
    checkpoint = Checkpoint(exp_dir, objects, config=config, every_iterations=checkpoint_every,
                            before_save=step.check_finite,
                            keep=keep_checkpoints).attach(trainer)
    if handle_signals:
        GracefulStop(checkpoint, resume_hint=resume_hint,
                     check_every=step.check_every).attach(trainer)

    if resume:
        restore(checkpoint, net, renamed={f"producer_{i}": n for i, n in enumerate(names)})
        done = position.epochs_done
        if done >= max_epochs:  # past the limit, even inside the next epoch
            part = f" and {position.start} batches of epoch {done + 1}" if position.start else ""
            raise CheckpointError(
                f"{exp_dir}: already trained {done} epochs{part} (max_epochs {max_epochs}); "
                f"raise max_epochs above {done} to continue"
            )
        if stopper.exhausted:
            raise CheckpointError(
                f"{exp_dir}: patience exhausted ({stopper.monitor.bad_epochs} epochs without "
                f"improvement, patience {patience}); raise patience to continue"
            )
    trainer.state.max_epochs = max_epochs
    if trainer.state.epoch_length is None:
        trainer.state.epoch_length = max(1, sampler.epoch_length())
    trainer.run(train_loader, max_epochs=max_epochs)
    return trainer


# checkpoint keys of the objects train_and_validate saves besides the producers
STATE_NAMES = ("model", "optimizer", "scaler", "position", "train_loss", "lr", "grad_norm",
               "best_model", "patience", "logs", "trackers", "comet", "rng")
_SNAKE = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")  # CamelCase seams


def producer_names(producers, taken=()) -> list[str]:
    """Checkpoint keys of ``producers``: their class names in snake case, numbered from the
    second of a kind (``generation_validation``, ``generation_validation_2``) or when the name
    is ``taken``."""
    names: list[str] = []
    for producer in producers:
        base = _SNAKE.sub("_", type(producer).__name__).lower()
        name, k = base, 1
        while name in names or name in taken:
            k += 1
            name = f"{base}_{k}"
        names.append(name)
    return names


def restore(checkpoint: Checkpoint, model: torch.nn.Module,
            renamed: dict[str, str] | None = None) -> dict:
    """Load ``<exp>/checkpoint`` into every object of ``checkpoint``; returns its meta.

    ``renamed`` maps old state keys to current ones (checkpoints of tractrain <= 0.1 keyed
    producers ``producer_<i>``). Distributed: rank 0 reads it and broadcasts it."""
    meta, states = from_main(lambda: load_checkpoint(checkpoint.exp_dir))
    if get_rank() == 0:
        for line in version_changes(meta):  # once per resume, one line per package
            log.warning(line)
    for old, new in (renamed or {}).items():
        if old in states and new not in states:
            states[new] = states.pop(old)
    rng = states.get("rng")
    ranks = int(rng.get("world_size", 1)) if isinstance(rng, dict) else 1
    if get_world_size() == 1 and ranks != 1:
        raise CheckpointError(f"{checkpoint.path}: written by a run of {ranks} processes; "
                              f"resume it with as many (--nproc-per-node {ranks})")
    if "scaler" in checkpoint.objects:
        states.setdefault("scaler", {})  # none saved: a fresh scaler (`Precision`)
    if "model" in states:
        check_model_state(model, states["model"], str(checkpoint.path))
    checkpoint.restore(states, strict=False)
    missing = sorted(set(checkpoint.objects) - set(states) - {"comet", "trackers"})
    if missing:
        raise CheckpointError(f"{checkpoint.path}: checkpoint has no state for {missing} "
                              "(was it written with other options?)")
    return meta


def _check_shard(sampler, rank: int, world_size: int) -> None:
    """A distributed run needs this rank's shard with equal batch counts on every rank."""
    got = (getattr(sampler, "rank", None), getattr(sampler, "world_size", None),
           getattr(sampler, "drop_uneven", None))
    if got != (rank, world_size, True):
        raise ConfigError(
            f"train_sampler: a distributed run needs BatchSampler(..., rank={rank}, "
            f"world_size={world_size}, drop_uneven=True), got rank={got[0]}, "
            f"world_size={got[1]}, drop_uneven={got[2]}"
        )
    if sampler.epoch_length() < 1:
        raise ConfigError(f"train_sampler: fewer training batches than the {world_size} "
                          "processes; lower batch_size or use fewer processes")
