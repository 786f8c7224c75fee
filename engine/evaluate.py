"""`evaluate`: the n-weighted mean loss of a model over a loader, outside any training run.

It computes what the validation hook reports as ``valid_loss`` (``sum(loss * n) / sum(n)``
over the batches, in eval mode, without gradients), and also returns the total weight ``n``
and the number of batches, so that partial results can be combined.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from tractrain.data.split_index import SplitIndex
from tractrain.engine.contract import FirstCallChecked
from tractrain.engine.trainer import LossFn, _to_device


def evaluate(model: torch.nn.Module, loss_fn: LossFn, loader: Iterable, *,
             device: str | torch.device | None = None, prepare_batch: Callable | None = None,
             progress: bool | None = False, desc: str = "eval") -> dict[str, float]:
    """``{"loss", "n", "batches"}`` of ``model`` on every batch of ``loader``.

    ``loss`` is the n-weighted mean of ``loss_fn(model, batch)`` (NaN if the total weight is
    0); the first batch's result is checked against the loss contract (`LossContractError`).
    ``device`` defaults to the model's; ``prepare_batch(batch, device)`` defaults to
    ``batch.to(device)``. ``progress``: a tqdm bar on stderr (None: only if it is a terminal).
    The model is left in the mode it was in."""
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    prepare = prepare_batch or _to_device
    show = sys.stderr.isatty() if progress is None else bool(progress)
    total = count = 0.0
    batches = 0
    checked = FirstCallChecked(loss_fn, training=False)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc=desc, disable=not show, leave=False):
                loss, n = checked.call(model, prepare(batch, device))
                total += float(loss) * float(n)  # the same sums as the validation hook
                count += float(n)
                batches += 1
    finally:
        model.train(was_training)
    return {"loss": total / count if count else math.nan, "n": count, "batches": batches}


def subject_index(index: SplitIndex, subject: str) -> SplitIndex:
    """The part of ``index`` that holds only ``subject``'s streamlines."""
    k = index.subjects.index(subject)
    return SplitIndex(index.split, index.group, (subject,), (np.asarray(index.lengths[k]),),
                      (np.asarray(index.lengths_mm[k]),))
