"""SIGINT/SIGTERM/SIGUSR1: finish the current iteration, write a checkpoint, stop cleanly.

SIGUSR1 is what SLURM sends ahead of a job's time limit (``sbatch --signal=B:USR1@120``);
what happens after the stop (requeue) is the command line's business (`tractrain.bin.cluster`).
"""

from __future__ import annotations

import logging
import signal
import threading

import ignite.distributed as idist
from ignite.engine import Engine, Events

from tractrain.util import reraise_if_last

log = logging.getLogger(__name__)


class GracefulStop:
    """On SIGINT, SIGTERM or SIGUSR1, let the running iteration finish, save ``checkpoint``
    (mid-epoch) and terminate the trainer with a message saying how to resume. A second SIGINT
    aborts at once (KeyboardInterrupt). ``self.received`` holds the signal number once one arrived.

    In a single process nothing runs per iteration until a signal arrives; in a distributed
    run every iteration asks all ranks (one all_reduce), so they stop at the same one."""

    def __init__(self, checkpoint, resume_hint: str | None = None,
                 signals=(signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)) -> None:
        self.checkpoint = checkpoint
        self.resume_hint = resume_hint
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict = {}
        self._trainer: Engine | None = None

    def attach(self, trainer: Engine) -> GracefulStop:
        trainer.add_event_handler(Events.STARTED, self._install)
        trainer.add_event_handler(Events.COMPLETED, self._uninstall)
        trainer.add_event_handler(Events.EXCEPTION_RAISED, self._on_exception)
        return self

    def _on_exception(self, trainer: Engine, error: BaseException) -> None:
        self._uninstall(trainer)
        reraise_if_last(trainer, self._on_exception, error)

    def _watch(self) -> None:
        """Check for a stop at every ITERATION_COMPLETED from now on."""
        trainer = self._trainer
        if trainer is not None and not trainer.has_event_handler(self._maybe_stop,
                                                                 Events.ITERATION_COMPLETED):
            trainer.add_event_handler(Events.ITERATION_COMPLETED, self._maybe_stop)

    def _install(self, trainer: Engine) -> None:
        self._trainer = trainer
        if self.received is not None or idist.get_world_size() > 1:
            self._watch()
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _uninstall(self, trainer: Engine, *args) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        log.warning("%s received: finishing the current iteration, then saving a checkpoint "
                    "(press Ctrl-C again to abort without saving)", signal.Signals(signum).name)
        self._watch()  # the trainer stops after the running iteration

    def _maybe_stop(self, trainer: Engine) -> None:
        if idist.get_world_size() > 1:  # every rank stops (and saves) at the same iteration
            flag = idist.all_reduce(0.0 if self.received is None else float(self.received),
                                    op="MAX")
            if self.received is None and flag > 0:
                self.received = int(flag)
        if self.received is None:
            return
        path = self.checkpoint.save(trainer)  # every rank collects, rank 0 writes
        hint = f"; resume with: {self.resume_hint}" if self.resume_hint else ""
        if idist.get_rank() == 0:
            log.warning("stopped at epoch %d, iteration %d: checkpoint written to %s%s",
                        trainer.state.epoch, trainer.state.iteration, path, hint)
        trainer.state.stopped_by_signal = signal.Signals(self.received).name
        trainer.terminate()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
