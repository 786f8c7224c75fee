"""The loss contract, checked on the first batch of a run: ``loss_fn(model, batch) ->
(mean_loss, n)``, ``mean_loss`` a 0-d floating tensor (requiring grad when training), ``n`` a
number or 0-d tensor >= 0 weighting the batch (0: a batch with nothing to predict).

A breach is a one-line `LossContractError` naming the contract and what came back, raised
before ``backward`` would fail with a traceback that never mentions the contract.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch

from tractrain.errors import ConfigError, LossContractError

CONTRACT = "loss_fn(model, batch) -> (mean_loss, n)"


def describe(value: object) -> str:
    """``value`` in a few words: type, and for a tensor its shape, dtype and requires_grad."""
    if isinstance(value, torch.Tensor):
        return (f"Tensor(shape={tuple(value.shape)}, dtype={str(value.dtype).split('.')[-1]}, "
                f"requires_grad={value.requires_grad})")
    if isinstance(value, tuple | list):
        return f"{type(value).__name__} of {len(value)}: ({', '.join(map(describe, value))})"
    if isinstance(value, numbers.Number):
        return f"{type(value).__name__} {value!r}"
    return type(value).__name__


def _name(loss_fn: Callable) -> str:
    """``name (file:line)`` of a function, else the callable's type name."""
    code = getattr(loss_fn, "__code__", None)
    name = getattr(loss_fn, "__qualname__", None) or type(loss_fn).__name__
    return f"{name} ({code.co_filename}:{code.co_firstlineno})" if code is not None else name


def check_loss_result(result: object, loss_fn: Callable, *, training: bool) -> None:
    """Raise `LossContractError` unless ``result`` keeps the loss contract (``training``: the
    loss must also require grad)."""
    problem = _problem(result, training)
    if problem is not None:
        raise LossContractError(f"{CONTRACT}: {_name(loss_fn)} returned {describe(result)}; "
                                f"{problem}")


def _problem(result: object, training: bool) -> str | None:
    if not isinstance(result, tuple | list) or len(result) != 2:
        return "expected a tuple (mean_loss, n)"
    loss, n = result
    if not isinstance(loss, torch.Tensor) or not loss.is_floating_point():
        return "expected mean_loss to be a floating-point tensor"
    if loss.ndim != 0:
        return (f"expected mean_loss to be a scalar (0-d) tensor, got shape "
                f"{tuple(loss.shape)} (reduce it, e.g. with .mean())")
    if training and not loss.requires_grad:
        return ("expected mean_loss to require grad (was it detached, or computed under "
                "torch.no_grad()?)")
    return _n_problem(n)


def _n_problem(n: object) -> str | None:
    if isinstance(n, torch.Tensor):
        if n.ndim != 0 or n.is_complex() or n.dtype == torch.bool:
            return "expected n to be a number or a 0-d real tensor"
        n = n.item()
    if isinstance(n, bool) or not isinstance(n, numbers.Real):
        return "expected n to be a number (the batch's weight, e.g. its number of points)"
    if not math.isfinite(n) or n < 0:
        return f"expected n >= 0 (the batch's weight), got {n}"
    return None


class FirstCallChecked:
    """``loss_fn`` whose first call's result is checked (`check_loss_result`); the owner calls
    ``self.call`` per batch, which is ``loss_fn`` itself after the first call (no cost)."""

    def __init__(self, loss_fn: Callable, *, training: bool) -> None:
        self.loss_fn, self.training = loss_fn, training
        self.call: Callable = self._first

    def _first(self, model, batch):
        result = self.loss_fn(model, batch)
        check_loss_result(result, self.loss_fn, training=self.training)
        self.call = self.loss_fn
        return result


ZERO_INPUTS_LIMIT = 0.5  # share of the first batches' points with all-zero inputs


class ZeroInputsCheck:
    """A first-batches check (`TrainStep`'s ``batch_check``): stops a run whose first
    ``batches`` batches have more than ``max_share`` of their points with all-zero inputs
    (streamlines outside their volume: a wrong reference, LPS/RAS, a shifted header), which
    would otherwise train to the end on zeros. ``hint`` ends the one-line `ConfigError`
    (what to run, how to override). Returns True once decided, so the step stops calling it.
    """

    def __init__(self, max_share: float = ZERO_INPUTS_LIMIT, batches: int = 1,
                 hint: str = "") -> None:
        self.max_share, self.batches, self.hint = max_share, batches, hint
        self.zero = self.total = self.seen = 0

    def __call__(self, batch) -> bool:
        inputs = getattr(batch, "inputs", None)
        if not isinstance(inputs, torch.Tensor) or inputs.ndim != 2:
            return True  # no per-point inputs: nothing to check
        self.zero += int((inputs == 0).all(dim=1).sum())  # one host read per checked batch
        self.total += int(inputs.shape[0])
        self.seen += 1
        if self.seen < self.batches:
            return False
        share = self.zero / self.total if self.total else 0.0
        if share > self.max_share:
            what = "batch" if self.seen == 1 else f"{self.seen} batches"
            raise ConfigError(
                f"first training {what}: {100 * share:.1f}% of {self.total} points have "
                f"all-zero inputs (limit {100 * self.max_share:g}%): the streamlines likely "
                f"lie outside their volume (wrong reference, LPS/RAS, shifted header)"
                + (f"; {self.hint}" if self.hint else ""))
        return True
