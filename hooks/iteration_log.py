"""`IterationLog`: the iteration loss, gradient norm and learning rate every ``log_every``
iterations, appended to ``<exp>/logs/iterations.csv`` (``tractrain-plot-logs --per-iteration``).

Written here rather than with a library: a plain append-only CSV line per row is what makes the
file crash-safe (a kill cuts at most the last line, which readers ignore) and cheap; the
trackers of `tractrain.hooks.trackers` carry the same values to TensorBoard, MLflow and W&B.
"""

from __future__ import annotations

import math
import os

import ignite.distributed as idist
from ignite.engine import Engine, Events

from tractrain.atomic import atomic_write_bytes
from tractrain.experiment import ITERATION_COLUMNS, ExperimentDir
from tractrain.util import iteration_values


def _cell(value: float) -> str:
    return "" if math.isnan(value) else repr(value)


class IterationLog:
    """Append ``iteration,epoch,loss,grad_norm,lr`` to ``<exp>/logs/iterations.csv`` every
    ``every`` iterations (rank 0 only).

    At STARTED the file is cut back to the rows at or before the trainer's iteration (0 for a
    new run, the checkpoint's for a resumed one) and to whole lines, so a run resumed after a
    crash has no duplicated or half-written rows. Keeps no state of its own.
    """

    def __init__(self, exp_dir: str | os.PathLike, every: int, optimizer=None) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"IterationLog: every must be an integer >= 1, got {every!r}")
        self.path = ExperimentDir(exp_dir).iterations_csv
        self.every = every
        self.optimizer = optimizer

    def attach(self, trainer: Engine) -> IterationLog:
        if idist.get_rank() != 0:
            return self
        trainer.add_event_handler(Events.STARTED, self._on_started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self._on_iteration)
        return self

    def _on_started(self, trainer: Engine) -> None:
        self.truncate(int(trainer.state.iteration))

    def truncate(self, iteration: int) -> None:
        """Keep the header and the whole rows with an iteration <= ``iteration`` (atomic)."""
        header = ",".join(ITERATION_COLUMNS) + "\n"
        try:
            text = self.path.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            text = ""
        kept = [header]
        for line in text.split("\n")[1:-1]:  # skip the header and a last line cut short
            first = line.split(",", 1)[0]
            if first.isdigit() and int(first) <= iteration:
                kept.append(line + "\n")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, "".join(kept).encode(), durable=False)

    def _on_iteration(self, trainer: Engine) -> None:
        values = iteration_values(trainer, self.optimizer)
        row = [str(trainer.state.iteration), str(trainer.state.epoch),
               *(_cell(values[k]) for k in ITERATION_COLUMNS[2:])]
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(",".join(row) + "\n")
