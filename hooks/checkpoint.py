"""Crash-safe checkpoints that resume exactly.

``<exp>/checkpoint/`` holds ``meta.json`` (format, position, the versions of tractrain, torch,
numpy, zarr and ignite that wrote it), ``state.pt`` (every
registered object's ``state_dict()``: tensors and plain values only, loaded with
``torch.load(weights_only=True)``), ``config.json`` and a copy of ``logs/``. It is written as a
new folder, fsynced, then swapped in by rename (`tractrain.atomic`); a swap cut short by
a crash is repaired when the checkpoint is next loaded or written.

With ``keep`` K > 0 each epoch-end checkpoint is also kept as ``<exp>/checkpoints/epoch-<n>/``
(hard links to the live files where the disk allows, else copies; written crash-safely too);
older ones are pruned once the new one is complete, leaving the last K.
"""

from __future__ import annotations

import datetime as _dt
import functools
import io
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from tractrain.atomic import (
    COMPLETE_MARKER,
    atomic_write_bytes,
    atomic_write_dir,
    is_complete,
    repair_dir,
    swap_candidates,
    write_file,
)
from tractrain.errors import CheckpointError
from tractrain.experiment import (
    CONFIG_FILE,
    KEPT_PREFIX,
    LOGS_DIR,
    MODEL_FILE,
    ExperimentDir,
    load_weights,
)

FORMAT_NAME = "tractrain-checkpoint"
FORMAT_VERSION = 1
# package -> distribution name: the versions recorded in meta.json["versions"]
VERSIONED = {"tractrain": "tractrain", "torch": "torch", "numpy": "numpy", "zarr": "zarr",
             "ignite": "pytorch-ignite"}
log = logging.getLogger(__name__)


class Checkpoint:
    """Save ``objects`` (``{name: obj with state_dict/load_state_dict}``) to ``<exp>/checkpoint``.

    Saves after every epoch and, if ``every_iterations`` is set, every that many iterations
    (mid-epoch). Attach it after the hooks whose state it saves have run for the epoch. In a
    distributed run only rank 0 writes. ``before_save`` runs first at every save (e.g.
    `TrainStep.check_finite`, so no weights a NaN/inf batch touched are saved).
    """

    def __init__(self, exp_dir, objects: dict, config: dict | None = None,
                 every_iterations: int | None = None,
                 before_save: Callable[[], None] | None = None, keep: int = 0) -> None:
        self.exp_dir = ExperimentDir(exp_dir)
        self.keep = int(keep or 0)
        self.path = self.exp_dir.checkpoint
        self.objects = dict(objects)
        self.config = config
        self.every_iterations = every_iterations
        self.trainer: Engine | None = None
        self.before_save = before_save
        self.saved_iteration: int | None = None  # the trainer iteration of the last save

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
        if self.keep > 0 and idist.get_rank() == 0:
            self.keep_epoch(int(trainer.state.epoch))

    def keep_epoch(self, epoch: int) -> Path:
        """Keep the live checkpoint as ``checkpoints/epoch-<epoch>/`` (crash-safe), then prune
        the kept ones of epochs up to ``epoch`` to the last ``keep``."""
        target = self.exp_dir.epoch_checkpoint(epoch)
        best = self.exp_dir.best_model

        def write(folder: Path) -> None:
            _link_tree(self.path, folder)
            if is_complete(best):  # the best model as it was then, for going back
                _link_tree(best, folder / best.name)

        target.parent.mkdir(exist_ok=True)
        for debris in target.parent.glob(f"{KEPT_PREFIX}*.*"):  # a keep cut short by a crash
            repair_dir(debris.with_suffix(""))
        atomic_write_dir(target, write)
        older = [p for n, p in self.exp_dir.kept_checkpoints() if n <= epoch]
        for path in older[:-self.keep]:
            shutil.rmtree(path)
        return target

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
            self.saved_iteration = int(trainer.state.iteration) if trainer else None
            return self.path
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "tractrain": _version(),
            "versions": package_versions(),
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
        self.saved_iteration = meta["iteration"]
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


def _link_tree(source: Path, folder: Path, skip: tuple[str, ...] = ()) -> None:
    """Hard-link every file of the complete folder ``source`` into ``folder`` (crash-safe
    folders' files are never rewritten in place, only replaced, so a link stays valid); copy
    where links are not possible (another disk). ``skip``: top-level names left out."""
    folder.mkdir(exist_ok=True)
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        out = folder / rel
        if rel.parts[0] in skip or path.name == COMPLETE_MARKER:
            continue
        if path.is_dir():
            out.mkdir()
            continue
        try:
            os.link(path, out)
        except OSError:
            shutil.copyfile(path, out)


def go_back(exp_dir, kept) -> dict:
    """Make the kept checkpoint ``kept`` (a ``<exp>/checkpoints/epoch-<n>`` folder of this
    experiment) the live one again, with the best model of that time; returns its meta.
    Each folder is swapped in crash-safely; run it again if it was interrupted."""
    exp = ExperimentDir(exp_dir)
    kept = Path(kept)
    choices = exp.kept_checkpoints()
    if not any(kept.resolve() == path.resolve() for _, path in choices):
        names = ", ".join(path.name for _, path in choices) or "none"
        raise CheckpointError(f"--from-checkpoint {kept}: not a kept checkpoint of {exp} "
                              f"(kept in {exp.checkpoints}: {names})")
    meta = read_meta(kept, repair=False)
    best = kept / exp.best_model.name
    atomic_write_dir(exp.checkpoint, lambda f: _link_tree(kept, f, skip=(best.name,)))
    if (best / MODEL_FILE).is_file():
        atomic_write_dir(exp.best_model, lambda f: _link_tree(best, f))
        atomic_write_bytes(exp.best_epoch, (best / exp.best_epoch.name).read_bytes())
    log.info("%s: back to the checkpoint of epoch %s (%s)", exp, meta.get("epoch"), kept)
    return meta


@functools.cache
def package_versions() -> dict[str, str]:
    """``{package: version}`` of `VERSIONED` in this environment (``"unknown"`` if missing)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name, dist in VERSIONED.items():
        try:
            found[name] = _version() if name == "tractrain" else version(dist)
        except PackageNotFoundError:
            found[name] = "unknown"
    return found


def _major(text: str) -> tuple[int, ...] | None:
    """The major version of ``text`` (``"2.13.0+cpu"`` -> (2,)); for 0.x the first two numbers
    (``"0.5.2"`` -> (0, 5)), as semantic versioning treats them. None if not a version."""
    match = re.match(r"(\d+)(?:\.(\d+))?", str(text))
    if match is None:
        return None
    first = int(match[1])
    return (0, int(match[2] or 0)) if first == 0 else (first,)


def version_changes(meta: dict) -> list[str]:
    """One line per package whose major version differs between the checkpoint ``meta`` and
    this environment (none for checkpoints that recorded no versions)."""
    recorded = meta.get("versions")
    recorded = dict(recorded) if isinstance(recorded, dict) else {}
    if "tractrain" not in recorded and isinstance(meta.get("tractrain"), str):
        recorded["tractrain"] = meta["tractrain"]  # checkpoints of tractrain <= 0.1
    lines = []
    for name, now in package_versions().items():
        then = recorded.get(name)
        if not isinstance(then, str):
            continue
        old, new = _major(then), _major(now)
        if old is not None and new is not None and old != new:
            lines.append(f"checkpoint written with {name} {then[:40]}, resumed with {name} "
                         f"{now} (another major version): the run continues, but may not "
                         "match an uninterrupted one")
    return lines


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
