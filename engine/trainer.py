"""The training engine: an ignite `Engine` whose step calls the user's ``loss_fn``.

User contract::

    def loss_fn(model, batch) -> tuple[torch.Tensor, int | torch.Tensor]:
        ...  # forward pass
        return mean_loss, n  # n weights this batch in the epoch average (e.g. points)

Each iteration returns ``{"loss", "n", "grad_norm", "unclipped_grad_norm"}`` (detached). At
EPOCH_COMPLETED the trainer writes ``train_loss`` (n-weighted mean over the epoch) and ``lr``
into ``trainer.state.metrics``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import torch
from ignite.engine import Engine, Events, State

from tractrain.engine.distributed import all_reduce_sum
from tractrain.errors import ConfigError

LossFn = Callable[[torch.nn.Module, object], tuple[torch.Tensor, int | torch.Tensor]]
NAN_POLICIES = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """A loss or gradient was NaN/inf and the policy is ``stop``."""


class TrainerEngine(Engine):
    """An ignite Engine whose epochs may hold different numbers of iterations.

    ignite assumes a constant ``epoch_length``; our samplers cut epochs by a points or mm
    budget, so their length varies. `SamplerEpochs` sets ``state.epoch_length`` at every
    EPOCH_STARTED; the run ends on ``max_epochs`` (or ``max_iters``) only.
    """

    @staticmethod
    def _is_done(state: State) -> bool:
        if state.max_iters is not None and state.iteration >= state.max_iters:
            return True
        return state.max_epochs is not None and state.epoch >= state.max_epochs


class EpochMean:
    """n-weighted running mean of the training loss over an epoch; resumes mid-epoch.

    Resets after writing ``train_loss`` at EPOCH_COMPLETED, so a checkpoint taken mid-epoch
    carries the partial sums.
    """

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0.0
        self.skipped = 0

    def update(self, loss: float | torch.Tensor, n: float) -> None:
        """Add a batch; ``loss`` may be a device tensor (summed there, read once per epoch)."""
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().double()
        self.total += loss * n
        self.count += n

    def _total(self) -> float:
        return float(self.total)

    def compute(self) -> float:
        return self._total() / self.count if self.count else math.nan

    def compute_global(self) -> float:
        """The mean over every rank of a distributed run (all_reduce of the sums; the same as
        `compute` with one process). Every rank must call it."""
        total, count = all_reduce_sum([self._total(), self.count])
        return total / count if count else math.nan

    def state_dict(self) -> dict:
        return {"total": self._total(), "count": self.count, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.count = float(state["total"]), float(state["count"])
        self.skipped = int(state.get("skipped", 0))


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def _grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)


def create_trainer(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    *,
    device: str | torch.device = "cpu",
    clip_grad_norm: float | None = None,
    amp: bool = False,
    prepare_batch: Callable | None = None,
    nan_policy: str = "stop",
    check_every: int | None = None,
) -> TrainerEngine:
    """Engine that trains ``model`` with ``loss_fn`` on each batch.

    Args:
        device: where batches are moved (``batch.to(device, non_blocking=True)``).
        clip_grad_norm: max total L2 norm of the gradients (None: no clipping).
        amp: automatic mixed precision (CUDA only; ignored with a warning on CPU).
        prepare_batch: ``f(batch, device) -> batch`` replacing the default ``.to(device)``
            (e.g. to interpolate inputs on the GPU).
        nan_policy: ``"stop"`` raises `NonFiniteError` naming the epoch and iteration (the last
            checkpoint is left untouched); ``"skip"`` drops the batch's update.
        check_every: how often the loss and gradient norm are read on the host to check them.
            Default: every iteration on CPU (free), every 50 on other devices, so the GPU runs
            ahead without a host sync per batch: the values stay on the device (first bad
            iteration recorded there), are checked every N iterations, at the end of the
            epoch and before any checkpoint (`check_finite`), and the epoch means are read
            once. ``nan_policy="skip"`` needs a decision per batch, so it checks every one.
    """
    if nan_policy not in NAN_POLICIES:
        raise ConfigError(f"nan_policy: expected one of {NAN_POLICIES}, got {nan_policy!r}")
    if clip_grad_norm is not None and clip_grad_norm <= 0:
        raise ConfigError(f"clip_grad_norm: expected a positive number, got {clip_grad_norm}")
    device = torch.device(device)
    use_amp = bool(amp) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    params = [p for p in model.parameters() if p.requires_grad]
    prepare = prepare_batch or (lambda batch, dev: batch.to(dev, non_blocking=True))
    mean = EpochMean()
    if check_every is None:
        check_every = 1 if device.type == "cpu" else 50
    if nan_policy == "skip":
        check_every = 1
    if check_every < 1:
        raise ConfigError(f"check_every: expected >= 1, got {check_every}")
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    def deferred_step(engine: Engine, batch) -> dict:
        """Like `step`, without reading anything on the host (see ``check_every``)."""
        model.train()
        batch = prepare(batch, device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda") if use_amp else nullcontext():
            loss, n = loss_fn(model, batch)
        n = float(n)
        loss_value = loss.detach()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        unclipped = _grad_norm(params).to(device)
        bad = ~(torch.isfinite(loss_value) & torch.isfinite(unclipped))
        first_bad.copy_(torch.where(bad & (first_bad < 0), engine.state.iteration, first_bad))
        clipped = unclipped
        if clip_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, clip_grad_norm, unclipped)
            clipped = unclipped * torch.clamp(clip_grad_norm / (unclipped + 1e-6), max=1.0)
        scaler.step(optimizer)
        scaler.update()
        mean.update(loss_value, n)
        return {"loss": loss_value, "n": n, "grad_norm": clipped,
                "unclipped_grad_norm": unclipped}

    def check_finite(engine: Engine | None = None) -> None:
        """Raise `NonFiniteError` if a batch since the last check had a NaN/inf (one sync)."""
        bad = int(first_bad)
        if bad >= 0:
            first_bad.fill_(-1)
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(
                f"non-finite loss or gradient norm at iteration {bad} (epoch "
                f"{trainer.state.epoch}; checked every {check_every} iterations)")

    def step(engine: Engine, batch) -> dict:
        model.train()
        batch = prepare(batch, device)
        optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast("cuda") if use_amp else nullcontext()
        with autocast:
            loss, n = loss_fn(model, batch)
        n = float(n)
        # One host sync per value: each Python float serves both the finiteness check and
        # what follows (the epoch mean, the clipping factor).
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            return _non_finite(engine, f"non-finite loss ({loss_value})")
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        unclipped = _grad_norm(params)
        norm = float(unclipped)
        if not math.isfinite(norm):
            return _non_finite(engine, "non-finite gradient norm")
        clipped = unclipped
        if clip_grad_norm is not None:
            # Same as clip_grad_norm_(params, clip_grad_norm) without computing the norm again.
            torch.nn.utils.clip_grads_with_norm_(params, clip_grad_norm, unclipped)
            factor = clip_grad_norm / (norm + 1e-6)  # the factor the gradients were scaled by
            if factor < 1.0:
                clipped = unclipped * factor
        scaler.step(optimizer)
        scaler.update()
        mean.update(loss_value, n)
        return {"loss": loss.detach(), "n": n, "grad_norm": clipped.detach(),
                "unclipped_grad_norm": unclipped.detach()}

    def _non_finite(engine: Engine, what: str) -> dict:
        message = f"{what} at epoch {engine.state.epoch}, iteration {engine.state.iteration}"
        optimizer.zero_grad(set_to_none=True)
        if nan_policy == "stop":
            raise NonFiniteError(message + " (use nan_policy='skip' to drop such batches)")
        mean.skipped += 1
        nan = torch.tensor(math.nan)
        return {"loss": nan, "n": 0.0, "grad_norm": nan, "unclipped_grad_norm": nan,
                "skipped": True}

    trainer = TrainerEngine(step if check_every == 1 else deferred_step)
    trainer.check_finite = check_finite
    if check_every > 1:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=check_every), check_finite)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, check_finite)
    trainer.model, trainer.optimizer, trainer.scaler = model, optimizer, scaler
    trainer.loss_mean = mean
    trainer.device = device

    @trainer.on(Events.EPOCH_COMPLETED)
    def _write_epoch_metrics(engine: Engine) -> None:
        engine.state.metrics["train_loss"] = mean.compute_global()
        engine.state.metrics["lr"] = current_lr(optimizer)
        if nan_policy == "skip":
            engine.state.metrics["skipped_batches"] = float(mean.skipped)
        mean.total = mean.count = 0.0
        mean.skipped = 0

    return trainer


def create_evaluator(
    model: torch.nn.Module,
    loss_fn: LossFn,
    *,
    device: str | torch.device = "cpu",
    prepare_batch: Callable | None = None,
    amp: bool = False,
) -> Engine:
    """Engine computing the n-weighted mean loss in ``eval()`` mode under ``torch.no_grad()``.

    The result is ``evaluator.state.metrics["loss"]`` after ``evaluator.run(loader)``.
    """
    device = torch.device(device)
    use_amp = bool(amp) and device.type == "cuda"
    prepare = prepare_batch or (lambda batch, dev: batch.to(dev, non_blocking=True))
    mean = EpochMean()

    def step(engine: Engine, batch) -> dict:
        model.eval()
        with torch.no_grad(), (torch.autocast("cuda") if use_amp else nullcontext()):
            loss, n = loss_fn(model, prepare(batch, device))
        mean.update(float(loss), float(n))
        return {"loss": loss.detach(), "n": float(n)}

    evaluator = Engine(step)

    @evaluator.on(Events.STARTED)
    def _reset(engine: Engine) -> None:
        mean.total = mean.count = 0.0

    @evaluator.on(Events.COMPLETED)
    def _write(engine: Engine) -> None:
        engine.state.metrics["loss"] = mean.compute_global()
        model.train()

    return evaluator
