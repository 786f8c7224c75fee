"""`Progress`: tqdm bars for epochs and for the iterations of the current epoch."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO

from ignite.engine import Engine, Events
from tqdm.auto import tqdm

from tractrain.util import reraise_if_last, to_float

EPOCH_METRICS = ("train_loss", "valid_loss")


class Progress:
    """Progress bars: one over epochs (with train/valid loss), one over the current epoch's
    iterations (with an exponential moving average of ``engine.state.output[name]`` for each
    name in ``metric_names``).

    Args:
        enabled: None -> on only when ``file`` (default stderr) is a terminal.
        metric_names: keys of the iteration output to show.
        ema: weight of the newest value in the moving average (1.0 shows the raw value).
        file: stream the bars write to (default ``sys.stderr``).
        read_every: read the output values (a host sync for values on a GPU) only every N
            iterations and at an epoch's first; the bar shows the last value read between.
    """

    def __init__(
        self,
        enabled: bool | None = None,
        metric_names: Iterable[str] = ("loss",),
        ema: float = 0.1,
        file: IO[str] | None = None,
        read_every: int = 1,
    ) -> None:
        self.file = file
        stream = sys.stderr if file is None else file
        self.enabled = bool(enabled) if enabled is not None else _isatty(stream)
        self.metric_names = tuple(metric_names)
        self.ema = float(ema)
        self.read_every = max(1, int(read_every))
        self.running: dict[str, float] = {}
        self._epoch_bar: tqdm | None = None
        self._iter_bar: tqdm | None = None

    def attach(self, trainer: Engine) -> Progress:
        """Add the bar handlers (none when disabled); returns self."""
        if not self.enabled:
            return self
        trainer.add_event_handler(Events.STARTED, self._on_started)
        trainer.add_event_handler(Events.EPOCH_STARTED, self._on_epoch_started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._on_iteration_completed)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._on_epoch_completed)
        trainer.add_event_handler(Events.COMPLETED, self.close)
        trainer.add_event_handler(Events.TERMINATE, self.close)
        trainer.add_event_handler(Events.EXCEPTION_RAISED, self._on_exception)
        return self

    def _bar(self, **kwargs) -> tqdm:
        return tqdm(file=self.file, dynamic_ncols=True, **kwargs)

    def _on_started(self, engine: Engine) -> None:
        self.close()
        state = engine.state
        self._epoch_bar = self._bar(
            total=state.max_epochs, initial=state.epoch, desc="epochs", unit="epoch", position=0
        )

    def _on_epoch_started(self, engine: Engine) -> None:
        self._close_iter_bar()
        self.running = {}
        state = engine.state
        done = state.iteration % state.epoch_length if state.epoch_length else 0
        self._iter_bar = self._bar(
            total=state.epoch_length, initial=done, desc=f"epoch {state.epoch}", unit="it",
            leave=False, position=1,
        )

    def _on_iteration_completed(self, engine: Engine) -> None:
        if self._iter_bar is None:
            return
        output = engine.state.output
        due = not self.running or engine.state.iteration % self.read_every == 0
        if due and isinstance(output, dict):
            for name in self.metric_names:
                value = to_float(output.get(name))
                if value is None:
                    continue
                old = self.running.get(name)
                self.running[name] = value if old is None else old + self.ema * (value - old)
            if self.running:
                self._iter_bar.set_postfix(
                    {k: f"{v:.4g}" for k, v in self.running.items()}, refresh=False
                )
        self._iter_bar.update(1)

    def _on_epoch_completed(self, engine: Engine) -> None:
        self._close_iter_bar()
        if self._epoch_bar is None:
            return
        metrics = engine.state.metrics
        shown = {k: to_float(metrics[k]) for k in EPOCH_METRICS if k in metrics}
        shown = {k: f"{v:.4g}" for k, v in shown.items() if v is not None}
        if shown:
            self._epoch_bar.set_postfix(shown, refresh=False)
        self._epoch_bar.update(1)

    def _close_iter_bar(self) -> None:
        if self._iter_bar is not None:
            self._iter_bar.close()
            self._iter_bar = None

    def close(self, engine: Engine | None = None) -> None:
        """Close both bars (safe to call more than once)."""
        self._close_iter_bar()
        if self._epoch_bar is not None:
            self._epoch_bar.close()
            self._epoch_bar = None

    def _on_exception(self, engine: Engine, error: BaseException) -> None:
        self.close()
        reraise_if_last(engine, self._on_exception, error)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
