"""`Monitor`: tracks the best value of one epoch metric (shared by BestModel and Patience).

Also `require_metric`, the one place that turns a missing metric into a `ConfigError` that
says which producer hook to attach before the consumer.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

from tractrain.errors import CheckpointError, ConfigError
from tractrain.util import to_float

# Which hook (or engine) writes each standard metric into ``trainer.state.metrics``.
PRODUCERS = {
    "train_loss": "the trainer's epoch metrics (tractrain.engine.trainer.create_trainer)",
    "lr": "the trainer's epoch metrics (tractrain.engine.trainer.create_trainer)",
    "valid_loss": "the Validation hook (tractrain.hooks.validation)",
    "grad_norm": "the GradNorm hook (tractrain.hooks.grad_norm)",
    "unclipped_grad_norm": "the GradNorm hook (tractrain.hooks.grad_norm)",
    "epoch_time": "the Timing hook (tractrain.hooks.timing)",
    "data_wait_share": "the Timing hook (tractrain.hooks.timing)",
    "gen_endpoint_dist": "the GenerationValidation hook (tractrain.hooks.generation)",
    "gen_within": "the GenerationValidation hook (tractrain.hooks.generation)",
    "gen_length": "the GenerationValidation hook (tractrain.hooks.generation)",
}

MODES = ("min", "max")


def producer_of(metric: str) -> str:
    """Human name of the hook that produces ``metric``."""
    return PRODUCERS.get(metric, f"the hook that produces '{metric}'")


def require_metric(metrics: Mapping, name: str, hook: str) -> float:
    """``metrics[name]`` as a float; `ConfigError` naming the producer hook if it is missing."""
    if name not in metrics:
        raise ConfigError(
            f"{hook} monitors '{name}' but trainer.state.metrics has only "
            f"{sorted(metrics)}: attach {producer_of(name)} before {hook}"
        )
    value = to_float(metrics[name])
    if value is None:
        raise ConfigError(
            f"{hook} monitors '{name}' but trainer.state.metrics['{name}'] is "
            f"{type(metrics[name]).__name__}, expected a real scalar"
        )
    return value


def check_mode(mode: str, min_delta: float) -> None:
    """`ConfigError` unless ``mode`` is 'min'/'max' and ``min_delta`` is finite and >= 0."""
    if mode not in MODES:
        raise ConfigError(f"mode must be 'min' or 'max', got {mode!r}")
    if not (isinstance(min_delta, numbers.Real) and math.isfinite(min_delta) and min_delta >= 0):
        raise ConfigError(f"min_delta must be a finite number >= 0, got {min_delta!r}")


class Monitor:
    """Best value of one metric: ``update`` says whether an epoch improved it.

    ``metric=None`` resolves at the first ``update`` to ``"valid_loss"`` if present, else
    ``"train_loss"``, and stays fixed. An epoch improves when its value beats the best by more
    than ``min_delta`` (strictly); a non-finite value never improves and counts as a bad epoch.
    """

    def __init__(
        self, metric: str | None = None, mode: str = "min", min_delta: float = 0.0,
        *, owner: str = "Monitor",
    ) -> None:
        check_mode(mode, min_delta)
        self.metric = metric
        self.mode = mode
        self.min_delta = float(min_delta)
        self.owner = owner
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0

    def resolve(self, metrics: Mapping) -> str:
        """The monitored metric's name, fixing it on first use when it was None."""
        if self.metric is None:
            self.metric = "valid_loss" if "valid_loss" in metrics else "train_loss"
        return self.metric

    def improves(self, value: float) -> bool:
        """True if ``value`` beats the current best by more than ``min_delta``."""
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, metrics: Mapping, epoch: int) -> bool:
        """Record epoch ``epoch``'s value of the monitored metric; True if it improved."""
        value = require_metric(metrics, self.resolve(metrics), self.owner)
        if self.improves(value):
            self.best, self.best_epoch, self.bad_epochs = value, int(epoch), 0
            return True
        self.bad_epochs += 1
        return False

    def state_dict(self) -> dict:
        return {
            "metric": self.metric,
            "mode": self.mode,
            "min_delta": self.min_delta,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore best/best_epoch/bad_epochs (and the resolved metric). The constructor's
        ``min_delta`` is kept, so a resumed run may change it; metric and mode must agree."""
        metric, mode = state.get("metric"), state.get("mode", self.mode)
        if self.metric is not None and metric is not None and metric != self.metric:
            raise CheckpointError(
                f"{self.owner} state monitors '{metric}' but this run monitors '{self.metric}'"
            )
        if mode != self.mode:
            raise CheckpointError(
                f"{self.owner} state has mode '{mode}' but this run uses mode '{self.mode}'"
            )
        if metric is not None:
            self.metric = metric
        best = state.get("best")
        self.best = None if best is None else float(best)
        best_epoch = state.get("best_epoch")
        self.best_epoch = None if best_epoch is None else int(best_epoch)
        self.bad_epochs = int(state.get("bad_epochs", 0))
