"""Crash-safe checkpoints that resume exactly.

``<exp>/checkpoint/`` holds ``meta.json`` (format, position, config), ``state.pt`` (every
registered object's ``state_dict()``: tensors and plain values only, loaded with
``torch.load(weights_only=True)``), ``config.json`` and a copy of ``logs/``. It is written as a
new folder, fsynced, then swapped in by rename (`tractrain.atomic`); a swap cut short by
a crash is repaired when the checkpoint is next loaded or written.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
from collections.abc import Callable
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from tractrain.atomic import atomic_write_dir, is_complete, repair_dir, swap_candidates, write_file
from tractrain.errors import CheckpointError
from tractrain.experiment import CONFIG_FILE, LOGS_DIR, ExperimentDir, load_weights

FORMAT_NAME = "tractrain-checkpoint"
FORMAT_VERSION = 1


class Checkpoint:
    """Save ``objects`` (``{name: obj with state_dict/load_state_dict}``) to ``<exp>/checkpoint``.

    Saves after every epoch and, if ``every_iterations`` is set, every that many iterations
    (mid-epoch). Attach it after the hooks whose state it saves have run for the epoch. In a
    distributed run only rank 0 writes. ``before_save`` runs first at every save (e.g.
    `TrainStep.check_finite`, so no weights a NaN/inf batch touched are saved).
    """

    def __init__(self, exp_dir, objects: dict, config: dict | None = None,
                 every_iterations: int | None = None,
                 before_save: Callable[[], None] | None = None) -> None:
        self.exp_dir = ExperimentDir(exp_dir)
        self.path = self.exp_dir.checkpoint
        self.objects = dict(objects)
        self.config = config
        self.every_iterations = every_iterations
        self.trainer: Engine | None = None
        self.before_save = before_save

    def attach(self, trainer: Engine) -> Checkpoint:
        self.trainer = trainer
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._on_epoch)
        if self.every_iterations:
            trainer.add_event_handler(
                Events.ITERATION_COMPLETED(every=self.every_iterations), self._on_iteration
            )
        return self

    def _on_epoch(self, trainer: Engine) -> None:
        self.save(trainer)

    def _on_iteration(self, trainer: Engine) -> None:
        position = self.objects.get("position")  # an engine.epochs.SamplerEpochs
        if position is not None and position.done_in_epoch >= (trainer.state.epoch_length or 0):
            return  # the epoch's last iteration: EPOCH_COMPLETED saves right after
        self.save(trainer)

    def save(self, trainer: Engine | None = None) -> Path:
        """Write the checkpoint now (crash-safe). Returns its folder.

        In a distributed run call it on every rank: all of them collect their states (some
        gather per-rank state), only rank 0 writes."""
        trainer = trainer or self.trainer
        if self.before_save is not None:
            self.before_save()
        states = {name: obj.state_dict() for name, obj in self.objects.items()}
        if idist.get_rank() != 0:
            return self.path
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "tractrain": _version(),
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "epoch": int(trainer.state.epoch) if trainer else None,
            "iteration": int(trainer.state.iteration) if trainer else None,
            "max_epochs": trainer.state.max_epochs if trainer else None,
            "objects": sorted(states),
        }
        if "position" in states:
            meta["position"] = states["position"]
        logs = self.exp_dir.logs

        def write(folder: Path) -> None:
            # serialised in memory first: a full disk then raises OSError, not torch's
            # RuntimeError, and names the checkpoint
            buffer = io.BytesIO()
            torch.save(states, buffer)
            write_file(folder / "state.pt", buffer.getvalue())
            write_file(folder / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
            write_file(folder / CONFIG_FILE, (json.dumps(self.config, indent=2) + "\n").encode())
            if logs.is_dir():
                (folder / LOGS_DIR).mkdir()
                for path in sorted(logs.iterdir()):
                    if path.is_file() and not path.name.startswith("."):
                        write_file(folder / LOGS_DIR / path.name, path.read_bytes())

        atomic_write_dir(self.path, write)
        return self.path

    def restore(self, states: dict, strict: bool = True) -> None:
        """Load saved ``states`` into this hook's objects (all of them when ``strict``)."""
        missing = sorted(set(self.objects) - set(states))
        if strict and missing:
            raise CheckpointError(f"{self.path}: checkpoint has no state for {missing}")
        for name, obj in self.objects.items():
            if name in states:
                obj.load_state_dict(states[name])


def _version() -> str:
    from tractrain import __version__

    return __version__


def read_meta(path, repair: bool = True) -> dict:
    """``meta.json`` of the checkpoint folder ``path`` (``<exp>`` or ``<exp>/checkpoint``).

    ``repair`` (writers) finishes a swap a crash interrupted; without it (readers, which
    hold no lock) nothing is changed and the complete copy is read wherever it is."""
    folder = Path(path)
    inner = ExperimentDir(folder).checkpoint
    if inner.is_dir() or not (folder / "meta.json").exists():
        if repair:
            repair_dir(inner)
        fallback = inner if inner.is_dir() else folder
        folder = fallback if repair else next(
            (c for c in swap_candidates(inner) if is_complete(c)), fallback)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: not a tractrain checkpoint (no {inner.name}/meta.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{meta_path}: unreadable (not JSON)") from None
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{meta_path}: not a tractrain checkpoint "
                              f"(format {meta.get('format')!r})")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: checkpoint format version {meta.get('version')!r} "
                              f"is not supported (this tractrain reads {FORMAT_VERSION})")
    meta["folder"] = str(folder)
    return meta


def load_checkpoint(path, repair: bool = True) -> tuple[dict, dict]:
    """``(meta, states)`` of a checkpoint; refuses anything but plain tensors and values.

    Without ``repair`` (a reader while a run may be writing) a copy swapped out while it was
    being read is read again, so meta and states always come from one complete save."""
    for attempt in range(5):
        meta = read_meta(path, repair)
        try:
            states = load_weights(Path(meta["folder"]) / "state.pt", "checkpoint")
        except CheckpointError:
            if repair or attempt == 4:
                raise
            continue
        if repair or read_meta(path, repair) == meta:
            return meta, states
    raise CheckpointError(f"{path}: the checkpoint kept changing while it was read; try again")


def check_model_state(model: torch.nn.Module, state: dict, where: str) -> None:
    """Raise `CheckpointError` if ``state`` does not fit ``model``'s parameters."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state)
                    if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}")
        if shapes:
            k = shapes[0]
            parts.append(f"shape of {k}: checkpoint {tuple(state[k].shape)} vs model "
                         f"{tuple(own[k].shape)}")
        raise CheckpointError(f"{where}: model parameters don't match the checkpoint ("
                              + "; ".join(parts) + ")")
