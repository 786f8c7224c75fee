"""Drive a `BatchSampler` from the trainer's epochs, so that resuming is exact.

ignite restarts ``iter(dataloader)`` on resume and cannot skip the batches already seen; our
sampler is a pure function of (seed, epoch), so this handler tells it which epoch and
position to produce at every EPOCH_STARTED, and sets that epoch's length on the engine.
Position state comes from the engine's own counters (DataLoader workers prefetch ahead of
what the engine consumed, so the sampler's iterator position is not the truth).
"""

from __future__ import annotations

from ignite.engine import Engine, Events


class SamplerEpochs:
    """Keep ``sampler`` in step with ``trainer``: sampler epoch = trainer epoch - 1 (0-based).

    ``state_dict()`` gives ``{"epoch": completed epochs, "start": batches done in the next
    epoch, "iteration": total iterations, "seed"}``; attach first (before hooks that save
    checkpoints); after ``load_state_dict`` the next ``trainer.run`` starts exactly there.
    """

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        self.start = 0  # batches of the current epoch already consumed before this run
        self.epochs_done = 0
        self.trainer: Engine | None = None
        self._done = 0  # batches done in the current epoch, outside of an epoch
        self._origin: int | None = None  # in an epoch: trainer iteration before its 1st batch

    @property
    def done_in_epoch(self) -> int:
        """Batches of the current epoch done (read from the trainer's iteration counter, so
        no handler runs per iteration)."""
        if self._origin is None or self.trainer is None:
            return self._done
        return self.trainer.state.iteration - self._origin

    def attach(self, trainer: Engine) -> SamplerEpochs:
        trainer.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        self.trainer = trainer
        return self

    def _epoch_started(self, engine: Engine) -> None:
        epoch = engine.state.epoch - 1
        self.sampler.set_epoch(epoch, self.start)
        engine.state.epoch_length = self.sampler.epoch_length(epoch)
        engine._init_iter = self.start  # ignite counts this epoch's iterations from here
        self._origin = engine.state.iteration - self.start
        self.start = 0

    def _epoch_completed(self, engine: Engine) -> None:
        self.epochs_done = engine.state.epoch
        self._origin, self._done = None, 0

    def state_dict(self) -> dict:
        iteration = self.trainer.state.iteration if self.trainer is not None else 0
        return {"epoch": int(self.epochs_done), "start": int(self.done_in_epoch),
                "iteration": int(iteration), "seed": int(self.sampler.state_dict()["seed"])}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position; also moves an attached trainer's epoch/iteration counters."""
        self.epochs_done = int(state["epoch"])
        self.start = int(state["start"])
        self._origin, self._done = None, self.start
        self.sampler.set_epoch(self.epochs_done, self.start)
        if self.trainer is not None:
            self.trainer.state.epoch = self.epochs_done
            self.trainer.state.iteration = int(state["iteration"])
