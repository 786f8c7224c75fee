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
    (mid-epoch) and terminate the trainer with a message saying how to resume. A signal that
    arrives during an epoch's end (validation, logs) stops there, once the epoch's own
    checkpoint is written (not saved twice), unless that was the last epoch: the run then
    ends as it would have. A second SIGINT aborts at once (KeyboardInterrupt).
    ``self.received`` holds the signal number once one arrived. ``checkpoint``: a `Checkpoint`
    (``save(trainer)``, ``saved_iteration``). A signal ignored when the run starts stays ignored
    (a shell starts ``cmd &`` with SIGINT ignored, so that Ctrl-C stops only the foreground
    job; Python itself keeps it so).

    In a single process nothing runs per iteration until a signal arrives. In a distributed
    run a signal may reach any rank (or all, from the launcher): the ranks agree on one stop
    iteration by an all-reduce (max) of the received signal every ``check_every`` iterations
    and at each epoch's end (never per iteration on the GPU path: use the trainer's
    ``check_every``), so they stop, and save, at the same one."""

    def __init__(self, checkpoint, resume_hint: str | None = None,
                 signals=(signal.SIGINT, signal.SIGTERM, signal.SIGUSR1),
                 check_every: int = 1) -> None:
        self.checkpoint = checkpoint
        self.resume_hint = resume_hint
        self.signals = tuple(signals)
        self.check_every = max(1, int(check_every))
        self.received: int | None = None
        self._previous: dict = {}
        self._trainer: Engine | None = None

    def attach(self, trainer: Engine) -> GracefulStop:
        trainer.add_event_handler(Events.STARTED, self._install)
        trainer.add_event_handler(Events.COMPLETED, self._uninstall)
        trainer.add_event_handler(Events.EXCEPTION_RAISED, self._on_exception)
        if idist.get_world_size() > 1:  # the same iterations on every rank: no rank waits
            trainer.add_event_handler(Events.ITERATION_COMPLETED(every=self.check_every),
                                      self._agree)
            trainer.add_event_handler(Events.EPOCH_COMPLETED, self._agree)
        return self

    def _on_exception(self, trainer: Engine, error: BaseException) -> None:
        self._uninstall(trainer)
        reraise_if_last(trainer, self._on_exception, error)

    def _watch(self) -> None:
        """Check for a stop at every ITERATION_COMPLETED and EPOCH_COMPLETED from now on (one
        process; a handler added while an event fires runs after that event's others)."""
        trainer = self._trainer
        if trainer is None or idist.get_world_size() > 1:
            return
        for event in (Events.ITERATION_COMPLETED, Events.EPOCH_COMPLETED):
            if not trainer.has_event_handler(self._maybe_stop, event):
                trainer.add_event_handler(event, self._maybe_stop)

    def _install(self, trainer: Engine) -> None:
        self._trainer = trainer
        if self.received is not None:
            self._watch()
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.signals:
            if signal.getsignal(sig) is not signal.SIG_IGN:  # ignored by the parent: stays so
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

    def _agree(self, trainer: Engine) -> None:
        """Distributed: every rank learns the largest signal any rank received (one
        all-reduce, one host read); then all of them stop here, or none."""
        if trainer.should_terminate:  # already stopped at this iteration (by this hook)
            return
        flag = idist.all_reduce(0.0 if self.received is None else float(self.received),
                                op="MAX")
        if flag > 0:
            self.received = max(self.received or 0, int(flag))
            self._maybe_stop(trainer)

    def _maybe_stop(self, trainer: Engine) -> None:
        state = trainer.state
        if self.received is None or (trainer.last_event_name == Events.EPOCH_COMPLETED and
                                     state.max_epochs is not None and
                                     state.epoch >= state.max_epochs):
            return  # no signal, or the run's last epoch just ended: it finishes as planned
        path = self.checkpoint.path
        if self.checkpoint.saved_iteration != state.iteration:  # not saved at this one yet
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
