"""`NpyLogs`: one ``<exp>/logs/<metric>.npy`` per epoch metric, plus ``logs.csv``.

Each ``.npy`` is a 1-D float64 array with one value per logged epoch (NaN where the metric
was missing that epoch); ``logs.csv`` has the column ``epoch`` then the metrics sorted, an empty
cell for a missing value. Every file is rewritten atomically at each EPOCH_COMPLETED.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import ignite.distributed as idist
import numpy as np
from ignite.engine import Engine, Events

from tractrain.atomic import atomic_write_files, remove_stale_temps
from tractrain.errors import CheckpointError, ConfigError
from tractrain.experiment import ExperimentDir
from tractrain.util import to_float


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ConfigError(f"NpyLogs metric name must be a plain file name, got {name!r}")
    if name == "epoch":
        raise ConfigError("NpyLogs metric name 'epoch' is reserved for the CSV's first column")
    return name


class NpyLogs:
    """Append the trainer's epoch metrics to a history and write it under ``<exp>/logs/``.

    Args:
        exp_dir: experiment folder.
        metrics: names to log; None logs every real-scalar metric found each epoch (a metric
            first seen later gets NaN for the earlier epochs). A listed metric missing in an
            epoch is logged as NaN.
    """

    def __init__(self, exp_dir: str | os.PathLike, metrics: Iterable[str] | None = None) -> None:
        self.exp_dir = ExperimentDir(exp_dir)
        self.metrics = None if metrics is None else [_check_name(m) for m in metrics]
        self.epochs: list[int] = []
        self.values: dict[str, list[float]] = {m: [] for m in self.metrics or []}

    @property
    def logs_dir(self) -> Path:
        return self.exp_dir.logs

    def attach(self, trainer: Engine) -> NpyLogs:
        trainer.add_event_handler(Events.STARTED, self._on_started)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._on_epoch_completed)
        return self

    def _on_started(self, trainer: Engine) -> None:
        """A resumed run rewrites the files from its restored history at once, so logs that a
        kill left out of step (between two renames) agree again before training goes on."""
        if self.epochs and idist.get_rank() == 0:
            self.write()

    def _on_epoch_completed(self, trainer: Engine) -> None:
        self.record(trainer.state.metrics, trainer.state.epoch)
        if idist.get_rank() == 0:
            self.write()

    def _select(self, metrics: Mapping) -> dict[str, float]:
        if self.metrics is None:
            out = {}
            for name, value in metrics.items():
                value = to_float(value)
                if value is not None and isinstance(name, str) and name != "epoch":
                    out[_check_name(name)] = value
            return out
        out = {}
        for name in self.metrics:
            if name in metrics:
                value = to_float(metrics[name])
                if value is None:
                    raise ConfigError(
                        f"NpyLogs logs '{name}' but trainer.state.metrics['{name}'] is "
                        f"{type(metrics[name]).__name__}, expected a real scalar"
                    )
                out[name] = value
        return out

    def record(self, metrics: Mapping, epoch: int) -> None:
        """Append epoch ``epoch``; an epoch already in the history replaces it and all later
        ones (a run restarted from an older state overwrites what came after)."""
        epoch = int(epoch)
        if epoch in self.epochs:
            keep = self.epochs.index(epoch)
            self.epochs = self.epochs[:keep]
            self.values = {k: v[:keep] for k, v in self.values.items()}
        row = self._select(metrics)
        for name in row.keys() - self.values.keys():
            self.values[name] = [math.nan] * len(self.epochs)
        self.epochs.append(epoch)
        for name, history in self.values.items():
            history.append(row.get(name, math.nan))

    def arrays(self) -> dict[str, np.ndarray]:
        """The history as ``{metric: float64 array}``."""
        return {k: np.asarray(v, dtype=np.float64) for k, v in self.values.items()}

    def write(self) -> None:
        """Write every ``<metric>.npy`` and ``logs.csv`` together (`atomic_write_files`): a
        failed write (disk full, I/O error) replaces none of them, so all logs keep the same
        epochs; the error propagates. Files are renamed into place (never half-written, even
        if the process is killed) but not fsynced: the logs are a mirror of this hook's state,
        which the (fsynced) checkpoint holds and a resumed run writes again.
        """
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        files = {}
        for name, array in self.arrays().items():
            buf = io.BytesIO()
            np.save(buf, array, allow_pickle=False)
            files[f"{name}.npy"] = buf.getvalue()
        names = sorted(self.values)
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["epoch", *names])
        for i, epoch in enumerate(self.epochs):
            cells = (self.values[n][i] for n in names)
            writer.writerow([epoch, *("" if math.isnan(v) else repr(v) for v in cells)])
        files[self.exp_dir.logs_csv.name] = text.getvalue().encode()
        atomic_write_files(self.logs_dir, files, durable=False)

    def state_dict(self) -> dict:
        """``{"epochs": [...], "values": {metric: [...]}}``; NaN is stored as None (strict JSON)."""
        return {
            "epochs": list(self.epochs),
            "values": {
                k: [None if math.isnan(x) else x for x in v] for k, v in self.values.items()
            },
        }

    def load_state_dict(self, state: Mapping) -> None:
        epochs = [int(e) for e in state["epochs"]]
        values = {
            str(k): [math.nan if x is None else float(x) for x in v]
            for k, v in state["values"].items()
        }
        bad = [k for k, v in values.items() if len(v) != len(epochs)]
        if bad:
            raise CheckpointError(f"NpyLogs state: metrics {bad} do not have {len(epochs)} values")
        for name in self.metrics or []:
            values.setdefault(name, [math.nan] * len(epochs))
        self.epochs, self.values = epochs, values
        if idist.get_rank() == 0:
            remove_stale_temps(self.logs_dir)  # left by a process killed while writing

