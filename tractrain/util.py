"""Small helpers used across engine, hooks and CLI: one place each."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import numpy as np
import torch
from ignite.engine import Engine, Events


def to_float(value) -> float | None:
    """``value`` as a Python float if it is a real scalar (number, 0-d/1-element tensor or
    array), else None. Booleans are not metrics."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Tensor | np.ndarray):
        count = value.numel() if isinstance(value, torch.Tensor) else value.size
        if count == 1:
            item = value.item()
            if isinstance(item, numbers.Real) and not isinstance(item, bool):
                return float(item)
    return None


def iteration_values(trainer: Engine, optimizer=None) -> dict[str, float]:
    """``{"loss", "grad_norm", "lr"}`` of the trainer's last iteration (NaN where unknown;
    reading a device tensor here syncs, so call it every N iterations only)."""
    output = trainer.state.output if isinstance(trainer.state.output, Mapping) else {}
    values = {}
    for key in ("loss", "grad_norm"):
        value = to_float(output.get(key))
        values[key] = math.nan if value is None else value
    lr = None
    if optimizer is not None and optimizer.param_groups:
        lr = to_float(optimizer.param_groups[0].get("lr"))
    values["lr"] = math.nan if lr is None else lr
    return values


def reraise_if_last(engine: Engine, handler, error: BaseException) -> None:
    """Re-raise ``error`` if ``handler`` is the last EXCEPTION_RAISED handler of ``engine``.

    ignite swallows an exception once any EXCEPTION_RAISED handler exists; the last handler
    re-raises it so that cleanup handlers registered before it still run.
    """
    handlers = engine._event_handlers.get(Events.EXCEPTION_RAISED, [])
    if not handlers or handlers[-1][0] == handler:
        raise error


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DataParallel/DistributedDataParallel/torch.compile wrappers."""
    while True:
        if isinstance(model, torch.nn.DataParallel | torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model
