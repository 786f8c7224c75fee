"""The experiment folder: its layout, in one place, and the readers of what it holds.

Layout of ``<exp>/`` (written by `tractrain-train`'s hooks)::

    config.json         the resolved options of the run
    checkpoint/         the latest checkpoint (`tractrain.hooks.checkpoint`), with copies of
                        config.json and logs/
    checkpoints/epoch-<n>/  with --keep-checkpoints K: the last K epoch-end checkpoints
    best_model/         model.pt (weights), config.json (model config), best_epoch.json
    best_epoch.json     {"epoch", "metric", "value", "train_loss", "valid_loss"}
    logs/<metric>.npy   one value per epoch; logs/logs.csv the same table; logs/plot.png
    logs/iterations.csv iteration, epoch, loss, grad_norm, lr every ``log_every`` iterations
                        (logs/iterations.png: its plot)
    comet/              offline Comet archives
    tensorboard/        TensorBoard event files (``--trackers tensorboard``)
    mlruns/             MLflow file store (``--trackers mlflow``)
    wandb/              W&B run folders, offline unless ``WANDB_MODE`` says otherwise
    eval/<split>.json   `tractrain-eval` results (loss per subject and overall); also .csv
    .lock               held (``flock``) by the one process writing the experiment; holds its pid

Every hook and command takes its paths from `ExperimentDir`; every weights file is read by
`load_weights` (``torch.load(weights_only=True)``: plain tensors and values only).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tractrain.atomic import is_complete, swap_candidates
from tractrain.documents import load_mapping
from tractrain.errors import CheckpointError, ConfigError
from tractrain.lock import ExperimentLock

if TYPE_CHECKING:
    import numpy as np

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoint"
KEPT_DIR = "checkpoints"
KEPT_PREFIX = "epoch-"
BEST_MODEL_DIR = "best_model"
BEST_EPOCH_FILE = "best_epoch.json"
MODEL_FILE = "model.pt"
LOGS_DIR = "logs"
CSV_FILE = "logs.csv"
PLOT_FILE = "plot.png"
COMET_DIR = "comet"
ITERATIONS_FILE = "iterations.csv"
ITERATION_COLUMNS = ("iteration", "epoch", "loss", "grad_norm", "lr")
TENSORBOARD_DIR = "tensorboard"
MLRUNS_DIR = "mlruns"
WANDB_DIR = "wandb"
EVAL_DIR = "eval"
LOCK_FILE = ".lock"
LAYOUT = (CONFIG_FILE, CHECKPOINT_DIR, KEPT_DIR, BEST_MODEL_DIR, BEST_EPOCH_FILE, LOGS_DIR,
          COMET_DIR, EVAL_DIR, LOCK_FILE, TENSORBOARD_DIR, MLRUNS_DIR, WANDB_DIR)
MAX_NAME_LENGTH = 200
_BAD_NAME = re.compile(r"[/\\\x00-\x1f\x7f]")


def check_name(name: object, option: str = "--name") -> str:
    """``name`` if it is a plain experiment folder name: non-empty, at most 200 characters,
    no path separator or control character, not starting with ``.`` or ``-``."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH \
            or _BAD_NAME.search(name) or name[0] in ".-":
        shown = name[:40] + "..." if isinstance(name, str) and len(name) > 40 else name
        raise ConfigError(f"{option} {shown!r}: expected a plain folder name (1 to "
                          f"{MAX_NAME_LENGTH} characters, no '/', '\\' or control characters, "
                          "not starting with '.' or '-')")
    return name


def _layout_entry(name: str) -> bool:
    """True for the names tractrain writes in an experiment folder (and its swap debris)."""
    base = name[:-4] if name.endswith((".new", ".old")) else name
    return base in LAYOUT or (name.startswith(".") and ".tmp-" in name)


@dataclass(frozen=True)
class ExperimentDir:
    """Named paths of an experiment folder; usable wherever a path is (``os.fspath``)."""

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    def __fspath__(self) -> str:
        return str(self.root)

    def __str__(self) -> str:
        return str(self.root)

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def checkpoint(self) -> Path:
        return self.root / CHECKPOINT_DIR

    @property
    def checkpoints(self) -> Path:
        """``checkpoints/``: the epoch-end checkpoints kept by ``--keep-checkpoints``."""
        return self.root / KEPT_DIR

    def epoch_checkpoint(self, epoch: int) -> Path:
        """``checkpoints/epoch-<epoch>/``."""
        return self.checkpoints / f"{KEPT_PREFIX}{int(epoch)}"

    def kept_checkpoints(self) -> list[tuple[int, Path]]:
        """``[(epoch, folder)]`` of the complete kept checkpoints, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        kept = []
        for path in self.checkpoints.iterdir():
            number = path.name.removeprefix(KEPT_PREFIX)
            if path.name.startswith(KEPT_PREFIX) and number.isdigit() and is_complete(path):
                kept.append((int(number), path))
        return sorted(kept)

    @property
    def best_model(self) -> Path:
        return self.root / BEST_MODEL_DIR

    @property
    def best_epoch(self) -> Path:
        return self.root / BEST_EPOCH_FILE

    @property
    def logs(self) -> Path:
        return self.root / LOGS_DIR

    @property
    def logs_csv(self) -> Path:
        return self.logs / CSV_FILE

    @property
    def plot(self) -> Path:
        return self.logs / PLOT_FILE

    @property
    def iterations_csv(self) -> Path:
        return self.logs / ITERATIONS_FILE

    @property
    def iterations_plot(self) -> Path:
        return self.logs / "iterations.png"

    @property
    def comet(self) -> Path:
        return self.root / COMET_DIR

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD_DIR

    @property
    def mlruns(self) -> Path:
        return self.root / MLRUNS_DIR

    @property
    def wandb(self) -> Path:
        """W&B's own ``wandb/`` folder: ``wandb.init(dir=<exp>)`` writes its runs here."""
        return self.root / WANDB_DIR

    @property
    def eval(self) -> Path:
        return self.root / EVAL_DIR

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK_FILE

    def foreign_entry(self) -> str | None:
        """Why ``root`` is not a tractrain experiment (None if it is): a real folder (not a
        symlink) with a ``config.json`` mapping and nothing but tractrain's own entries."""
        if self.root.is_symlink() or not self.root.is_dir():
            return "not a folder (or a symbolic link)"
        try:
            config = json.loads(self.config.read_bytes())
        except (OSError, ValueError, RecursionError):
            return f"no readable {CONFIG_FILE}"
        if not isinstance(config, dict) or "model" not in config:
            return f"{CONFIG_FILE} is not a tractrain config"
        unknown = sorted(p.name for p in self.root.iterdir() if not _layout_entry(p.name))
        return f"holds {unknown[0]!r}, which tractrain did not write" if unknown else None

    def clear(self) -> None:
        """Remove everything tractrain wrote here but the lock file (for ``--force``); refuses
        a folder that is not a tractrain experiment. Symbolic links are removed, never
        followed."""
        why = self.foreign_entry()
        if why is not None:
            raise ConfigError(f"{self.root}: not removed by --force: {why}")
        for entry in sorted(self.root.iterdir()):
            if entry.name == LOCK_FILE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def lock(self) -> ExperimentLock:
        """Take the experiment's exclusive writer lock (`tractrain.lock.ExperimentLock`)."""
        return ExperimentLock(self.lock_file)


def load_weights(path: str | os.PathLike, what: str) -> dict:
    """The dict saved at ``path`` by ``torch.save``, on the CPU, loaded with
    ``weights_only=True``; a one-line `CheckpointError` (naming ``path`` and ``what``, e.g.
    "checkpoint") if it is missing, unreadable or holds anything but tensors and plain values."""
    import torch  # here, not at the top: commands that only need paths start faster

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about the pickle protocol
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (incomplete {what})") from None
    except OSError as err:
        raise CheckpointError(f"{path}: unreadable ({err.strerror or err})") from None
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, AttributeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: refused: not a plain tensor/JSON {what} "
                              f"(weights_only load failed: {first[:160]})") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors ({what})")
    return loaded


def read_config(exp_dir: str | os.PathLike) -> dict:
    """``config.json`` of an experiment; a one-line `CheckpointError` if there is none."""
    exp = ExperimentDir(exp_dir)
    if not exp.root.is_dir():
        raise CheckpointError(f"{exp}: no such experiment folder")
    if not exp.config.is_file():
        raise CheckpointError(f"{exp}: not a tractrain experiment (no {CONFIG_FILE})")
    try:
        text = exp.config.read_bytes().decode("utf-8")
    except ValueError:  # not UTF-8
        raise CheckpointError(f"{exp.config}: unreadable (not UTF-8 JSON)") from None
    return load_mapping(text, str(exp.config))


def read_best_model(exp_dir: str | os.PathLike) -> tuple[dict, dict | None]:
    """``(state_dict, model_config)`` of the best model saved in ``exp_dir``.

    Reads only: if a crash interrupted a folder swap, the complete copy
    (``best_model.new`` or ``best_model.old``) is read instead.
    """
    base = ExperimentDir(exp_dir).best_model
    folder = next((c for c in swap_candidates(base) if is_complete(c)), None)
    if folder is None:
        raise CheckpointError(f"{base}: no complete best model (expected {MODEL_FILE} there)")
    weights = load_weights(folder / MODEL_FILE, "best model")
    try:
        text = (folder / CONFIG_FILE).read_bytes().decode("utf-8")
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder / CONFIG_FILE}: unreadable model config ({err})") from None
    config = None if text.strip() == "null" else load_mapping(text, str(folder / CONFIG_FILE))
    return weights, config


def read_logs(exp_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{metric: 1-D float64 array}`` of an experiment (value ``i`` is epoch ``i + 1``)."""
    import numpy as np

    exp = ExperimentDir(exp_dir)
    if not exp.root.is_dir():
        raise ConfigError(f"{exp}: experiment folder not found")
    folder = exp.logs
    files = sorted(p for p in folder.glob("*.npy") if not p.name.startswith(".")) \
        if folder.is_dir() else []
    if not files:
        raise ConfigError(f"{exp}: no logs (expected {folder}/<metric>.npy files)")
    logs = {}
    for path in files:
        try:
            values = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: not a readable .npy file ({e})") from e
        if values.ndim != 1 or not np.issubdtype(values.dtype, np.number):
            raise ConfigError(f"{path}: expected a 1-D numeric array (one value per epoch), got "
                              f"{values.dtype} with shape {values.shape}")
        logs[path.stem] = values.astype(np.float64)
    return logs


def read_iterations(exp_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{column: 1-D float64 array}`` of ``<exp>/logs/iterations.csv`` (columns
    `ITERATION_COLUMNS`; an empty cell is NaN); a trailing line cut short by a kill is
    ignored. A one-line `ConfigError` if the file is missing or malformed."""
    import numpy as np

    path = ExperimentDir(exp_dir).iterations_csv
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no per-iteration log (written by runs with log_every "
                          "set)") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: unreadable ({err})") from None
    lines = text.split("\n")[:-1]  # the last piece is empty or a line cut short
    if not lines or lines[0].split(",") != list(ITERATION_COLUMNS):
        raise ConfigError(f"{path}: expected the header {','.join(ITERATION_COLUMNS)}")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        cells = line.split(",")
        try:
            if len(cells) != len(ITERATION_COLUMNS):
                raise ValueError(f"{len(cells)} cells")
            rows.append([float(c) if c else math.nan for c in cells])
        except ValueError as err:
            raise ConfigError(f"{path}: line {number}: expected {len(ITERATION_COLUMNS)} "
                              f"numbers ({err})") from None
    table = np.asarray(rows, dtype=np.float64).reshape(-1, len(ITERATION_COLUMNS))
    return {name: table[:, i] for i, name in enumerate(ITERATION_COLUMNS)}


def read_best_epoch(exp_dir: str | os.PathLike) -> dict | None:
    """``best_epoch.json`` of an experiment, or None if there is none."""
    path = ExperimentDir(exp_dir).best_epoch
    if not path.is_file():
        return None
    try:
        best = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    epoch = best.get("epoch") if isinstance(best, dict) else None
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
        raise ConfigError(f"{path}: expected a dict with an integer 'epoch' >= 1")
    return best


def has_checkpoint(exp_dir: str | os.PathLike, *, or_best_model: bool = False) -> bool:
    """Whether ``exp_dir`` holds a complete checkpoint (also one cut short mid-swap), or with
    ``or_best_model`` a complete best model."""
    exp = ExperimentDir(exp_dir)
    folders = (exp.checkpoint, exp.best_model) if or_best_model else (exp.checkpoint,)
    return any(is_complete(c) for f in folders for c in swap_candidates(f))


def is_unstarted(exp_dir: str | os.PathLike) -> bool:
    """True for an experiment folder (its config.json there) of a run that stopped before its
    first checkpoint: no complete checkpoint or best model, nothing but the layout's own
    entries (and hidden files). Replacing it, or starting it over, loses nothing."""
    exp = ExperimentDir(exp_dir)
    if not exp.config.is_file() or has_checkpoint(exp, or_best_model=True):
        return False
    return all(entry.name.startswith((".", *LAYOUT)) for entry in exp.root.iterdir())
