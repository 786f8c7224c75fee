"""`BestModel`: keep the weights of the best epoch in ``<exp>/best_model/``.

Layout (written atomically, folder swapped in by `atomic_write_dir`)::

    <exp>/best_model/model.pt         torch.save(model.state_dict()), CPU tensors
    <exp>/best_model/config.json      the model_config given to BestModel (null if none)
    <exp>/best_model/best_epoch.json  same record as below, kept with the weights
    <exp>/best_epoch.json             {"epoch", "metric", "value", "train_loss", "valid_loss"}
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from tractrain.atomic import (
    atomic_write_dir,
    atomic_write_json,
    is_complete,
    remove_stale_temps,
    repair_dir,
    write_file,
)
from tractrain.errors import CheckpointError, ConfigError
from tractrain.hooks.monitor import Monitor
from tractrain.util import to_float, unwrap

BEST_DIR = "best_model"
BEST_EPOCH_FILE = "best_epoch.json"


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
        self.exp_dir = Path(exp_dir)
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
            write_file(folder / "model.pt", buffer.getvalue())
            write_file(folder / "config.json",
                       (json.dumps(self.model_config, indent=2) + "\n").encode())
            write_file(folder / BEST_EPOCH_FILE, (json.dumps(record, indent=2) + "\n").encode())

        self.exp_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_dir(self.exp_dir / BEST_DIR, write)
        atomic_write_json(self.exp_dir / BEST_EPOCH_FILE, record)

    def state_dict(self) -> dict:
        return {"monitor": self.monitor.state_dict(), "best": self.best}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore the record; on rank 0 also finish a folder swap or write a kill cut short."""
        self.monitor.load_state_dict(state["monitor"])
        best = state.get("best")
        self.best = None if best is None else dict(best)
        if idist.get_rank() == 0 and self.exp_dir.is_dir():
            repair_dir(self.exp_dir / BEST_DIR)
            remove_stale_temps(self.exp_dir)

    @staticmethod
    def load(exp_dir: str | os.PathLike) -> tuple[dict, dict | None]:
        """``(state_dict, model_config)`` of the best model saved in ``exp_dir``.

        Reads only: if a crash interrupted a folder swap, the complete copy
        (``best_model.new`` or ``best_model.old``) is read instead.
        """
        base = Path(exp_dir) / BEST_DIR
        candidates = [base, base.with_name(BEST_DIR + ".new"), base.with_name(BEST_DIR + ".old")]
        folder = next((c for c in candidates if is_complete(c)), None)
        if folder is None:
            raise CheckpointError(f"{base}: no complete best model (expected model.pt there)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns about the pickle protocol
                weights = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
            config = json.loads((folder / "config.json").read_text())
        except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise CheckpointError(f"{folder / 'model.pt'}: refused: not a plain tensor file "
                                  f"(weights_only load failed: {first})") from None
        if not isinstance(weights, dict):
            raise CheckpointError(f"{folder / 'model.pt'}: expected a dict of tensors")
        return weights, config
