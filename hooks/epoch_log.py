"""`EpochLog`: one log line per epoch (and, at DEBUG, every N iterations) on the
``tractrain`` logger, for runs with no terminal (batch jobs) as much as for those with one."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import ignite.distributed as idist
from ignite.engine import Engine, Events

from tractrain.util import to_float

log = logging.getLogger(__name__)

# (metric, label, format) in the order of the epoch line
FIELDS = (("train_loss", "train_loss", "{:.4g}"), ("valid_loss", "valid_loss", "{:.4g}"),
          ("lr", "lr", "{:.1e}"), ("grad_norm", "grad_norm", "{:.3g}"))


class EpochLog:
    """Log ``epoch 7/50  train_loss 0.0123  valid_loss 0.0101 (best)  lr 1.0e-03
    grad_norm 0.21  12.3 s  data wait 4%  patience 1/5`` at every EPOCH_COMPLETED (rank 0),
    and ``resumed from epoch E, iteration I`` at the STARTED of a resumed run.

    Reads ``state.metrics`` (``bad_epochs`` from `Patience`, ``skipped_batches`` with the skip
    NaN policy, ``amp_skipped_steps`` with fp16 AMP) and ``state.best_epoch`` (from
    `BestModel`): attach it after those hooks.
    ``patience`` is the limit shown beside ``bad_epochs``. With ``log_every`` N, a DEBUG line
    gives the iteration loss every N iterations (read only then, and only when DEBUG is on).
    """

    def __init__(self, patience: int | None = None, log_every: int | None = None) -> None:
        self.patience = patience
        self.log_every = log_every

    def attach(self, trainer: Engine) -> EpochLog:
        trainer.add_event_handler(Events.STARTED, self._on_started)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._on_epoch_completed)
        if self.log_every:
            trainer.add_event_handler(Events.ITERATION_COMPLETED(every=self.log_every),
                                      self._on_iteration)
        return self

    def _on_started(self, trainer: Engine) -> None:
        state = trainer.state
        if state.iteration and idist.get_rank() == 0:
            log.info("resumed from epoch %d, iteration %d (max_epochs %d)", state.epoch,
                     state.iteration, state.max_epochs)

    def _on_iteration(self, trainer: Engine) -> None:
        if idist.get_rank() != 0 or not log.isEnabledFor(logging.DEBUG):
            return
        state = trainer.state
        output = state.output if isinstance(state.output, Mapping) else {}
        loss = to_float(output.get("loss"))
        text = "nan" if loss is None else f"{loss:.4g}"
        log.debug("epoch %d/%d  iteration %d  loss %s", state.epoch, state.max_epochs,
                  state.iteration, text)

    def _on_epoch_completed(self, trainer: Engine) -> None:
        if idist.get_rank() == 0:
            log.info("%s", self.line(trainer))

    def line(self, trainer: Engine) -> str:
        """The epoch line for the trainer's current state."""
        state = trainer.state
        metrics = state.metrics
        best = getattr(state, "best_epoch", None)
        best_metric = best["metric"] if best and best.get("epoch") == state.epoch else None
        parts = [f"epoch {state.epoch}/{state.max_epochs}"]
        for name, label, form in FIELDS:
            value = to_float(metrics.get(name))
            if value is not None:
                parts.append(f"{label} {form.format(value)}"
                             + (" (best)" if name == best_metric else ""))
        if best_metric is not None and best_metric not in {f[0] for f in FIELDS}:
            parts.append(f"best {best_metric} {best['value']:.4g}")
        seconds = to_float(metrics.get("epoch_time"))
        if seconds is not None:
            parts.append(f"{seconds:.1f} s")
        wait = to_float(metrics.get("data_wait_share"))
        if wait is not None:
            parts.append(f"data wait {wait:.0%}")
        skipped = to_float(metrics.get("skipped_batches"))
        if skipped:
            parts.append(f"skipped {int(skipped)} non-finite batches")
        overflows = to_float(metrics.get("amp_skipped_steps"))
        if overflows:  # normal in fp16 AMP: the scaler skipped them and backed off
            parts.append(f"amp skipped {int(overflows)} overflow steps (scale "
                         f"{to_float(metrics.get('amp_scale')) or 0:g})")
        bad = to_float(metrics.get("bad_epochs"))
        if self.patience is not None and bad is not None:
            parts.append(f"patience {int(bad)}/{self.patience}")
        return "  ".join(parts)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
