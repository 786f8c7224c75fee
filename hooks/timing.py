"""Epoch wall time and the share of it spent waiting for data (ignite's GET_BATCH events)."""

from __future__ import annotations

import time

from ignite.engine import Engine, Events


class Timing:
    """Writes ``epoch_time`` (s), ``data_wait_share`` (0..1) and ``batches_per_s`` into
    ``trainer.state.metrics`` at EPOCH_COMPLETED."""

    def __init__(self) -> None:
        self._epoch_start = self._batch_start = 0.0
        self._wait = 0.0
        self._batches = 0

    def attach(self, trainer: Engine) -> Timing:
        trainer.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        trainer.add_event_handler(Events.GET_BATCH_STARTED, self._get_started)
        trainer.add_event_handler(Events.GET_BATCH_COMPLETED, self._get_completed)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._publish)
        return self

    def _epoch_started(self, trainer: Engine) -> None:
        self._epoch_start = time.perf_counter()
        self._wait, self._batches = 0.0, 0

    def _get_started(self, trainer: Engine) -> None:
        self._batch_start = time.perf_counter()

    def _get_completed(self, trainer: Engine) -> None:
        self._wait += time.perf_counter() - self._batch_start
        self._batches += 1

    def _publish(self, trainer: Engine) -> None:
        elapsed = max(time.perf_counter() - self._epoch_start, 1e-9)
        trainer.state.metrics["epoch_time"] = elapsed
        trainer.state.metrics["data_wait_share"] = min(self._wait / elapsed, 1.0)
        trainer.state.metrics["batches_per_s"] = self._batches / elapsed

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
