"""The evaluation engine: the n-weighted mean of ``loss_fn`` over a loader, in ``eval()`` mode
under ``torch.no_grad()``, with the training run's precision."""

from __future__ import annotations

from collections.abc import Callable

import torch
from ignite.engine import Engine, Events

from tractrain.engine.contract import FirstCallChecked
from tractrain.engine.precision import Precision
from tractrain.engine.trainer import EpochMean, LossFn, _to_device, _weight


def create_evaluator(
    model: torch.nn.Module,
    loss_fn: LossFn,
    *,
    device: str | torch.device = "cpu",
    prepare_batch: Callable | None = None,
    amp: bool = False,
    precision: str | Precision | None = None,
) -> Engine:
    """Engine computing the n-weighted mean loss in ``eval()`` mode under ``torch.no_grad()``
    (the first batch's result is checked against the loss contract).

    The result is ``evaluator.state.metrics["loss"]`` after ``evaluator.run(loader)``.
    """
    device = torch.device(device)
    prepare = prepare_batch or _to_device
    mean = EpochMean()
    if not isinstance(precision, Precision):
        precision = Precision(precision, device, amp=amp)
    mixed_precision = precision.autocast()
    checked = FirstCallChecked(loss_fn, training=False)

    def step(engine: Engine, batch) -> dict:
        model.eval()
        with torch.no_grad(), mixed_precision:
            loss, n = checked.call(model, prepare(batch, device))
        n = _weight(n)
        mean.update(loss.detach(), n)  # on a GPU: summed there, read once at the end
        return {"loss": loss.detach(), "n": n}

    evaluator = Engine(step)
    evaluator.add_event_handler(Events.STARTED, lambda engine: mean.reset())

    @evaluator.on(Events.COMPLETED)
    def _write(engine: Engine) -> None:
        engine.state.metrics["loss"] = mean.compute_global()
        model.train()

    return evaluator
