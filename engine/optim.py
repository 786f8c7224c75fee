"""Optimizer factory and per-epoch learning-rate schedules.

A schedule is written like dwi_ml's ``learning_rates``: ``"0.001*3 0.0001"`` (or
``"0.001*3,0.0001"``) means 1e-3 for epochs 1-3, then 1e-4 for every later epoch. Parsed, it is
a list of ``(lr, epochs)`` pairs whose last entry has ``epochs=None`` (it holds forever).
:class:`EpochLR` applies such a schedule at every ``EPOCH_STARTED``; the lr is a pure function
of the epoch number, so a resumed run gets exactly the lr it would have had.

For schedules that change within an epoch use ignite's param schedulers instead, attached at
``ITERATION_STARTED``, e.g.::

    from ignite.engine import Events
    from ignite.handlers import CosineAnnealingScheduler, PiecewiseLinear

    sched = CosineAnnealingScheduler(optimizer, "lr", start_value=1e-3, end_value=1e-5,
                                     cycle_size=len(train_loader) * max_epochs)
    # or: PiecewiseLinear(optimizer, "lr", milestones_values=[(0, 0.0), (500, 1e-3), ...])
    trainer.add_event_handler(Events.ITERATION_STARTED, sched)

They count iterations and expose ``state_dict()``/``load_state_dict()``: put them in the
checkpoint's ``{name: object}`` mapping so that a resumed run continues the schedule.
"""

from __future__ import annotations

import difflib
import math
import numbers
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events

from tractrain.errors import ConfigError

Schedule = list[tuple[float, int | None]]

OPTIMIZERS = ("adam", "adamw", "sgd", "radam")


def make_optimizer(
    params: Iterable[Any],
    name: str = "adam",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """Build an optimizer by (case-insensitive) name: ``adam``, ``adamw``, ``sgd``, ``radam``.

    ``weight_decay`` is L2 regularisation for adam/sgd/radam and decoupled decay for adamw;
    ``momentum`` is used by sgd only.
    """
    key = str(name).strip().lower()
    if key not in OPTIMIZERS:
        close = difflib.get_close_matches(key, OPTIMIZERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"optimizer: unknown name {name!r}; expected one of {', '.join(OPTIMIZERS)}{hint}"
        )
    lr = _positive_lr(lr, "optimizer lr")
    if not _is_number(weight_decay) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ConfigError(f"optimizer weight_decay: expected a number >= 0, got {weight_decay!r}")
    if key == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if key == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if key == "radam":
        return torch.optim.RAdam(params, lr=lr, weight_decay=weight_decay)
    if not _is_number(momentum) or not 0.0 <= momentum < 1.0:
        raise ConfigError(f"optimizer momentum: expected a number in [0, 1), got {momentum!r}")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def parse_lr_schedule(spec: str | float | Sequence[Any]) -> Schedule:
    """Parse a learning-rate schedule into ``[(lr, epochs), ..., (lr, None)]``.

    Accepted: a number (constant lr); a string of ``lr*epochs`` / ``lr`` items separated by
    spaces or commas, e.g. ``"1e-3*3 1e-4"``; a sequence of such strings, of numbers (one epoch
    each, as dwi_ml's per-epoch list) or of ``(lr, epochs)`` pairs (a parsed schedule, also
    after a JSON round trip). Only the last item may omit its epoch count; the last lr holds
    for every later epoch. Consecutive items with the same lr are merged.
    """
    if isinstance(spec, str):
        tokens: list[Any] = [t for t in re.split(r"[\s,;]+", spec.strip()) if t]
    elif _is_number(spec):
        tokens = [spec]
    elif isinstance(spec, Sequence):
        tokens = list(spec)
    else:
        raise ConfigError(
            f"lr schedule: expected a number, a string like '0.001*3 0.0001' or a list, "
            f"got {type(spec).__name__}"
        )
    if not tokens:
        raise ConfigError(f"lr schedule: empty schedule {spec!r}; expected e.g. '0.001*3 0.0001'")

    items: list[tuple[float, int | None]] = []
    for pos, token in enumerate(tokens):
        lr, count = _parse_item(token, spec)
        if count is None and _is_number(token):
            count = 1  # a bare number in a list is one epoch (the last one holds anyway)
        if count is None and pos < len(tokens) - 1:
            raise ConfigError(
                f"lr schedule {spec!r}: item {pos + 1} ({token!r}) needs an epoch count "
                f"'lr*epochs'; only the last item may omit it"
            )
        items.append((lr, count))

    merged: Schedule = []
    for lr, count in items:
        if merged and merged[-1][0] == lr:
            previous = merged[-1][1]
            merged[-1] = (lr, None if previous is None or count is None else previous + count)
        else:
            merged.append((lr, count))
    merged[-1] = (merged[-1][0], None)  # the last lr holds forever
    return merged


def lr_for_epoch(schedule: Schedule | str | float | Sequence[Any], epoch: int) -> float:
    """Learning rate of ``epoch`` (1-based, as ignite's ``engine.state.epoch``)."""
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 1:
        raise ConfigError(f"lr_for_epoch: epoch must be an int >= 1 (1-based), got {epoch!r}")
    end = 0
    for lr, count in parse_lr_schedule(schedule):
        if count is None:
            return lr
        end += count
        if epoch <= end:
            return lr
    raise AssertionError("unreachable: a parsed schedule ends with (lr, None)")


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the optimizer's first param group."""
    return float(optimizer.param_groups[0]["lr"])


class EpochLR:
    """Hook: set the lr of every param group from a per-epoch schedule at ``EPOCH_STARTED``.

    >>> EpochLR("0.001*3 0.0001", optimizer).attach(trainer)
    """

    def __init__(
        self, schedule: Schedule | str | float | Sequence[Any], optimizer: torch.optim.Optimizer
    ) -> None:
        self.schedule = parse_lr_schedule(schedule)
        self.optimizer = optimizer

    def __call__(self, engine: Engine) -> None:
        lr = lr_for_epoch(self.schedule, int(engine.state.epoch))
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def attach(self, trainer: Engine) -> EpochLR:
        """Register on ``trainer`` (EPOCH_STARTED); returns self."""
        trainer.add_event_handler(Events.EPOCH_STARTED, self)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": [[lr, count] for lr, count in self.schedule]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "schedule" not in state:
            raise ConfigError("EpochLR state: expected a dict with key 'schedule'")
        self.schedule = parse_lr_schedule(state["schedule"])


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _positive_lr(value: Any, what: str) -> float:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what}: expected a finite number > 0, got {value!r}")
    return float(value)


def _parse_item(token: Any, spec: Any) -> tuple[float, int | None]:
    """One schedule item -> (lr, epochs or None)."""
    where = f"lr schedule {spec!r}: item {token!r}"
    if _is_number(token):
        return _positive_lr(token, where + " lr"), None
    if isinstance(token, str):
        parts = [p.strip() for p in token.split("*")]
        if len(parts) > 2 or not all(parts):
            raise ConfigError(f"{where}: expected 'lr' or 'lr*epochs', e.g. '0.001*3'")
        try:
            lr: Any = float(parts[0])
        except ValueError:
            raise ConfigError(f"{where}: lr {parts[0]!r} is not a number") from None
        count: Any = None
        if len(parts) == 2:
            count = int(parts[1]) if re.fullmatch(r"[+-]?\d+", parts[1]) else parts[1]
        return _positive_lr(lr, where + " lr"), _count(count, where)
    if isinstance(token, Sequence) and len(token) == 2:
        lr, count = token
        return _positive_lr(lr, where + " lr"), _count(count, where)
    raise ConfigError(f"{where}: expected a number, 'lr*epochs' or a pair [lr, epochs]")


def _count(count: Any, where: str) -> int | None:
    if count is None:
        return None
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1:
        raise ConfigError(f"{where}: epoch count must be an integer >= 1, got {count!r}")
    return int(count)
