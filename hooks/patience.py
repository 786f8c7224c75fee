"""`Patience`: stop training after ``patience`` epochs without improvement.

Written instead of ignite's EarlyStopping, which resets its counter on ``STARTED`` (so a resumed
run forgets the restored count) or on every evaluator run.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping

from ignite.engine import Engine, Events

from tractrain.errors import ConfigError
from tractrain.hooks.monitor import Monitor

log = logging.getLogger(__name__)


def _check_patience(patience) -> float:
    if patience is None:
        return math.inf
    if isinstance(patience, bool) or not isinstance(patience, numbers.Real):
        raise ConfigError(f"patience must be an integer >= 1 or None, got {patience!r}")
    if patience == math.inf:
        return math.inf
    if patience != int(patience) or patience < 1:
        raise ConfigError(f"patience must be an integer >= 1 or None, got {patience!r}")
    return int(patience)


class Patience:
    """Terminate the trainer once the monitored metric has not improved by more than
    ``min_delta`` for ``patience`` consecutive epochs. ``patience=None`` or ``inf`` never stops.

    A resumed run whose restored state is already exhausted stops at ``STARTED`` (construct
    with a larger ``patience`` to extend it: the constructor's patience wins over the state's).
    Publishes the count of epochs without improvement as ``state.metrics["bad_epochs"]`` and
    logs why it stopped (at ``TERMINATE``, after the epoch's other handlers).
    """

    def __init__(
        self,
        patience: int | None,
        min_delta: float = 0.0,
        metric: str | None = None,
        mode: str = "min",
    ) -> None:
        self.patience = _check_patience(patience)
        self.monitor = Monitor(metric, mode, min_delta, owner="Patience")
        self._stopping = False

    @property
    def exhausted(self) -> bool:
        """True once ``patience`` consecutive epochs passed without improvement."""
        return self.monitor.bad_epochs >= self.patience

    def attach(self, trainer: Engine) -> Patience:
        trainer.add_event_handler(Events.STARTED, self._on_started)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._on_epoch_completed)
        trainer.add_event_handler(Events.TERMINATE, self._on_terminate)
        return self

    def _stop(self, trainer: Engine) -> None:
        self._stopping = True
        trainer.terminate()

    def _on_terminate(self, trainer: Engine) -> None:
        if not self._stopping:
            return  # stopped by something else (a signal)
        self._stopping = False
        m = self.monitor
        log.info(
            "early stop at epoch %d: patience exhausted (no improvement of '%s' by more than "
            "%g for %d epochs, patience %d; best %g at epoch %s)",
            trainer.state.epoch, m.metric, m.min_delta, m.bad_epochs, self.patience,
            m.best if m.best is not None else math.nan, m.best_epoch,
        )

    def _on_started(self, trainer: Engine) -> None:
        if self.exhausted:
            self._stop(trainer)

    def _on_epoch_completed(self, trainer: Engine) -> None:
        self.monitor.update(trainer.state.metrics, trainer.state.epoch)
        trainer.state.metrics["bad_epochs"] = self.monitor.bad_epochs
        if self.exhausted:
            self._stop(trainer)

    def state_dict(self) -> dict:
        patience = None if self.patience == math.inf else self.patience
        return {"patience": patience, "monitor": self.monitor.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore the counters; the constructor's ``patience`` and ``min_delta`` are kept."""
        self.monitor.load_state_dict(state["monitor"])
