"""`BestModel`: keep the weights of the best epoch in ``<exp>/best_model/``.

Layout (written atomically, folder swapped in by `atomic_write_dir`)::

    <exp>/best_model/model.pt         torch.save(model.state_dict()), CPU tensors
    <exp>/best_model/config.json      the model_config given to BestModel (null if none)
    <exp>/best_model/best_epoch.json  same record as below, kept with the weights
    <exp>/best_epoch.json             {"epoch", "metric", "value", "train_loss", "valid_loss"}

Read it back with `tractrain.experiment.read_best_model`.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from tractrain.atomic import (
    atomic_write_dir,
    atomic_write_json,
    remove_stale_temps,
    repair_dir,
    write_file,
)
from tractrain.errors import ConfigError
from tractrain.experiment import (
    BEST_EPOCH_FILE,
    CONFIG_FILE,
    MODEL_FILE,
    ExperimentDir,
)
from tractrain.hooks.monitor import Monitor
from tractrain.util import to_float, unwrap


def cpu_state_dict(model: torch.nn.Module) -> dict:
    """``model.state_dict()`` with every tensor detached and copied to the CPU."""
    return {
        k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
        for k, v in unwrap(model).state_dict().items()
    }


def _finite_or_none(value) -> float | None:
    value = None if value is None else to_float(value)
    return value if value is not None and math.isfinite(value) else None


class BestModel:
    """Save the model whenever the monitored metric improves (see `Monitor`).

    Args:
        exp_dir: experiment folder.
        model: the trained module (wrappers are unwrapped before saving).
        model_config: JSON-able dict from which the model can be rebuilt.
        metric, mode, min_delta: what "best" means; ``metric=None`` -> valid_loss if the
            trainer has it, else train_loss.
    """

    def __init__(
        self,
        exp_dir: str | os.PathLike,
        model: torch.nn.Module,
        model_config: dict | None = None,
        metric: str | None = None,
        mode: str = "min",
        min_delta: float = 0.0,
    ) -> None:
        if model_config is not None:
            if not isinstance(model_config, Mapping):
                raise ConfigError(
                    f"BestModel model_config must be a dict, got {type(model_config).__name__}"
                )
            try:
                json.dumps(model_config, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"BestModel model_config must be JSON-serialisable: {e}") from e
        self.exp_dir = ExperimentDir(exp_dir)
        self.model = model
        self.model_config = None if model_config is None else dict(model_config)
        self.monitor = Monitor(metric, mode, min_delta, owner="BestModel")
        self.best: dict | None = None

    def attach(self, trainer: Engine) -> BestModel:
        trainer.add_event_handler(Events.STARTED, self._publish)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._on_epoch_completed)
        return self

    def _publish(self, trainer: Engine) -> None:
        """Expose the best record as ``trainer.state.best_epoch`` (None before any)."""
        trainer.state.best_epoch = None if self.best is None else dict(self.best)

    def _on_epoch_completed(self, trainer: Engine) -> None:
        self.step(trainer.state.metrics, trainer.state.epoch)
        self._publish(trainer)

    def step(self, metrics: Mapping, epoch: int) -> bool:
        """Update the monitor with one epoch's metrics; save the model if it improved."""
        if not self.monitor.update(metrics, epoch):
            return False
        self.best = {
            "epoch": int(epoch),
            "metric": self.monitor.metric,
            "value": self.monitor.best,
            "train_loss": _finite_or_none(metrics.get("train_loss")),
            "valid_loss": _finite_or_none(metrics.get("valid_loss")),
        }
        if idist.get_rank() == 0:
            self.save()
        return True

    def save(self) -> None:
        """Write ``best_model/`` and ``best_epoch.json`` for the current best record."""
        weights = cpu_state_dict(self.model)
        record = dict(self.best)

        def write(folder: Path) -> None:
            buffer = io.BytesIO()  # in memory first: a full disk raises OSError naming the folder
            torch.save(weights, buffer)
            write_file(folder / MODEL_FILE, buffer.getvalue())
            write_file(folder / CONFIG_FILE,
                       (json.dumps(self.model_config, indent=2) + "\n").encode())
            write_file(folder / BEST_EPOCH_FILE, (json.dumps(record, indent=2) + "\n").encode())

        self.exp_dir.root.mkdir(parents=True, exist_ok=True)
        atomic_write_dir(self.exp_dir.best_model, write)
        atomic_write_json(self.exp_dir.best_epoch, record)

    def state_dict(self) -> dict:
        return {"monitor": self.monitor.state_dict(), "best": self.best}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore the record; on rank 0 also finish a folder swap or write a kill cut short."""
        self.monitor.load_state_dict(state["monitor"])
        best = state.get("best")
        self.best = None if best is None else dict(best)
        if idist.get_rank() == 0 and self.exp_dir.root.is_dir():
            repair_dir(self.exp_dir.best_model)
            remove_stale_temps(self.exp_dir.root)
