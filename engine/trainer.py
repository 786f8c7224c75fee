"""The training engine: an ignite `Engine` whose process function is a `TrainStep`.

User contract (checked on the first batch: `tractrain.engine.contract`)::

    def loss_fn(model, batch) -> tuple[torch.Tensor, int | torch.Tensor]:
        ...  # forward pass
        return mean_loss, n  # 0-d tensor; n >= 0 weights this batch (e.g. its points)

Each iteration returns ``{"loss", "n", "grad_norm", "unclipped_grad_norm"}`` (detached). At
EPOCH_COMPLETED the step writes ``train_loss`` (n-weighted mean over the epoch) and ``lr``
into ``trainer.state.metrics``.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Callable

import torch
from ignite.engine import Engine, Events

from tractrain.engine.contract import FirstCallChecked
from tractrain.engine.distributed import (
    all_gather_objects,
    all_reduce_sum,
    any_rank,
    is_distributed,
)
from tractrain.engine.loop import TrainerEngine
from tractrain.engine.precision import Precision
from tractrain.errors import ConfigError

log = logging.getLogger(__name__)
LossFn = Callable[[torch.nn.Module, object], tuple[torch.Tensor, int | torch.Tensor]]
NAN_POLICIES = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """A loss or gradient was NaN/inf and the policy is ``stop``."""


class EpochMean:
    """n-weighted running mean of the training loss over an epoch; resumes mid-epoch.

    `TrainStep` resets it after writing ``train_loss`` at EPOCH_COMPLETED, so a checkpoint
    taken mid-epoch carries the partial sums.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the epoch's sums and skipped-batch counts."""
        self.total: float | torch.Tensor = 0.0
        self.count = 0.0
        self.skipped = 0  # batches dropped by nan_policy "skip"
        self.amp_skipped: int | torch.Tensor = 0  # steps the AMP scaler skipped (overflow)

    def update(self, loss: float | torch.Tensor, n: float | torch.Tensor) -> None:
        """Add a batch; a loss (or weight) on a GPU is summed there and read once per epoch."""
        if isinstance(loss, torch.Tensor):
            loss = loss.item() if loss.device.type == "cpu" else loss.detach().double()
        self.total += loss * n
        self.count += n

    def compute_global(self) -> float:
        """The mean over every rank of a distributed run (all_reduce of the sums). Every rank
        must call it."""
        total, count = all_reduce_sum([float(self.total), self.count])
        return total / count if count else math.nan

    def state_dict(self) -> dict:
        return {"total": float(self.total), "count": float(self.count), "skipped": self.skipped,
                "amp_skipped": int(self.amp_skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.count = float(state["total"]), float(state["count"])
        self.skipped = int(state.get("skipped", 0))
        self.amp_skipped = int(state.get("amp_skipped", 0))


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def total_grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """L2 norm of all gradients together (a tensor where they live; 0 without gradients)."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def clipped_norm(norm: float | torch.Tensor, max_norm: float) -> float | torch.Tensor:
    """The total norm after `clip_grads_with_norm_` scaled the gradients by
    ``min(1, max_norm / (norm + 1e-6))`` (that factor in float64, the product in the norm's
    float32): a float for a norm read on the host (no tensor op per batch), else a tensor where
    ``norm`` is."""
    if isinstance(norm, torch.Tensor):
        return norm * torch.clamp(max_norm / (norm.double() + 1e-6), max=1.0).to(norm.dtype)
    factor = max_norm / (norm + 1e-6)
    if factor >= 1.0:  # not clipped: the (float32) norm itself
        return norm
    # a float32 norm times a float32 factor is exact in float64: one rounding, as float32's
    return _to_float32(norm * _to_float32(factor))


_FLOAT32 = struct.Struct("f")


def _to_float32(value: float) -> float:
    """``value`` rounded to the nearest float32 (as a Python float)."""
    return _FLOAT32.unpack(_FLOAT32.pack(value))[0]


def _weight(n: int | float | torch.Tensor) -> float | torch.Tensor:
    """A batch's weight ``n``: a float, or the tensor itself on a GPU (no host read)."""
    if isinstance(n, torch.Tensor) and n.device.type != "cpu":
        return n.detach().double()
    return float(n)


def _to_device(batch, device: torch.device):
    return batch.to(device, non_blocking=True)


def _skipped_output() -> dict:
    nan = torch.tensor(math.nan)
    return {"loss": nan, "n": 0.0, "grad_norm": nan, "unclipped_grad_norm": nan, "skipped": True}


class TrainStep:
    """One optimisation step per batch: the process function ``(engine, batch) -> dict`` of the
    trainer. Holds the model, the optimizer, the `Precision` (``precision``, with the AMP
    ``scaler``) and the epoch's loss mean (``mean``); checkpoint those with the model to
    resume exactly.

    fp16 AMP is torch's recipe: ``scale(loss).backward()``, ``unscale_`` (once: the norm and
    clipping see true gradients), clip, ``scaler.step``, ``update``. Overflow steps are skipped
    by the scaler, which backs off: normal, counted in ``amp_skipped_steps``, never errors.

    Args:
        device: where batches are moved (``batch.to(device, non_blocking=True)``).
        clip_grad_norm: max total L2 norm of the gradients (None: no clipping).
        amp: alias of ``precision="16-mixed"``.
        precision: ``"32"``, ``"16-mixed"`` or ``"bf16-mixed"`` (CUDA only: fp32 with a
            warning elsewhere), or a `Precision` shared with the evaluator.
        scaler: a `GradScaler` to use (e.g. an enabled CPU one, to emulate fp16 on CPU).
        prepare_batch: ``f(batch, device) -> batch`` replacing the default ``.to(device)``
            (e.g. to interpolate inputs on the GPU).
        nan_policy: what to do with a non-finite loss, or non-finite gradients the scaler does
            not own (any in fp32): ``"stop"`` raises `NonFiniteError` naming the epoch and
            iteration (the last checkpoint is left untouched); ``"skip"`` drops the batch's
            update. In a distributed run the ranks agree: all stop or skip the same step.
        check_every: how often the loss and gradient norm are read on the host to check them.
            Default: every iteration on CPU (free), every 50 on other devices, so the GPU runs
            ahead without a host sync per batch: the values stay on the device (first bad
            iteration recorded there), are checked every N iterations, at the end of the
            epoch and before any checkpoint (`check_finite`), and the epoch means are read
            once. ``nan_policy="skip"`` needs a decision per batch, so it checks every one.
        batch_check: ``f(prepared batch) -> done``, called on the first batches until it
            returns True (e.g. `tractrain.engine.contract.ZeroInputsCheck`); it may raise.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        *,
        device: str | torch.device = "cpu",
        clip_grad_norm: float | None = None,
        amp: bool = False,
        precision: str | Precision | None = None,
        scaler: torch.amp.GradScaler | None = None,
        prepare_batch: Callable | None = None,
        nan_policy: str = "stop",
        check_every: int | None = None,
        batch_check: Callable | None = None,
    ) -> None:
        if nan_policy not in NAN_POLICIES:
            raise ConfigError(f"nan_policy: expected one of {NAN_POLICIES}, got {nan_policy!r}")
        if clip_grad_norm is not None and clip_grad_norm <= 0:
            raise ConfigError(f"clip_grad_norm: expected a positive number, got {clip_grad_norm}")
        self.device = torch.device(device)
        if check_every is None:
            check_every = 1 if self.device.type == "cpu" else 50
        if nan_policy == "skip":
            check_every = 1
        if check_every < 1:
            raise ConfigError(f"check_every: expected >= 1, got {check_every}")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.clip, self.nan_policy, self.check_every = clip_grad_norm, nan_policy, check_every
        self.precision = precision if isinstance(precision, Precision) else Precision(
            precision, self.device, amp=amp, scaler=scaler)
        self.scaler = self.precision.scaler
        self.amp = self.precision.scaling
        self.autocast = self.precision.autocast()  # reusable: entered once per step
        self.mean = EpochMean()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._prepare = prepare_batch or _to_device
        self.batch_check = batch_check
        self.prepare = self._prepare if batch_check is None else self._prepare_checked
        self._first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)
        self._engine: Engine | None = None
        self._distributed: bool | None = None  # read once per run (at its first check)
        self._loss = FirstCallChecked(loss_fn, training=True)  # the contract, first batch

    def _prepare_checked(self, batch, device: torch.device):
        """Prepare a first batch and run ``batch_check`` on it until it reports done; later
        batches go straight to the preparation (no per-iteration cost)."""
        batch = self._prepare(batch, device)
        if self.batch_check(batch):
            self.prepare = self._prepare
        return batch

    def __call__(self, engine: Engine, batch) -> dict:
        """Train on one batch: forward, backward, finiteness check, clipping, update."""
        self.model.train()
        batch = self.prepare(batch, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            loss, n = self._loss.call(self.model, batch)
        if self.amp:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # once per step, before norm and clipping
        else:
            loss.backward()
        loss, n, norm = loss.detach(), _weight(n), total_grad_norm(self.params)
        checked = self._check(engine, loss, norm)
        if checked is None:  # a non-finite batch under nan_policy "skip"
            return _skipped_output()
        loss_value, norm_value, overflow = checked  # host values, or tensors (deferred)
        clipped = norm_value
        if self.clip is not None:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.clip, norm)
            clipped = clipped_norm(norm_value, self.clip)
        if self.amp:
            self.scaler.step(self.optimizer)  # skipped by the scaler on overflow
            self.scaler.update()  # ... which then backs off the scale
        else:
            self.optimizer.step()
        self.mean.update(loss_value, n)
        output = {"loss": loss, "n": n, "grad_norm": clipped, "unclipped_grad_norm": norm_value}
        if overflow is True:
            output["skipped"] = True  # no update: its (inf) norms are not the epoch's
        return output

    def _check(self, engine: Engine, loss: torch.Tensor, norm: torch.Tensor) -> tuple | None:
        """``(loss, norm, overflow)`` read on the host and checked; with deferred checks the
        tensors themselves (the first non-finite iteration noted on the device for
        `check_finite`) and None. ``overflow``: the scaler skips this step. None: a non-finite
        batch to skip (nan_policy "skip"; "stop" raises)."""
        if self.check_every > 1:
            first = self._first_bad
            bad = ~torch.isfinite(loss if self.amp else loss + norm)  # NaN/inf in either
            first.masked_fill_((first < 0) & bad, engine.state.iteration)
            if self.amp:
                self.mean.amp_skipped = self.mean.amp_skipped + (~torch.isfinite(norm)).long()
            return loss, norm, None
        value, norm_value = loss.item(), norm.item()  # one host read each, reused below
        bad_loss, bad_norm = not math.isfinite(value), not math.isfinite(norm_value)
        bad = bad_loss or (bad_norm and not self.amp)  # the scaler owns overflowed gradients
        if self._distributed is None:
            self._distributed = is_distributed()
        if self._distributed:
            bad = any_rank(bad)  # every rank skips or stops the same step
        state = engine.state
        if not bad:
            if self.amp and bad_norm:
                self.mean.amp_skipped += 1
                log.debug("iteration %d: fp16 overflow, step skipped", state.iteration)
            return value, norm_value, self.amp and bad_norm
        what = (f"non-finite loss ({value})" if bad_loss else "non-finite gradient norm"
                if bad_norm else "non-finite loss or gradient on another rank")
        self.optimizer.zero_grad(set_to_none=True)
        message = f"{what} at epoch {state.epoch}, iteration {state.iteration}"
        if self.nan_policy == "stop":
            raise NonFiniteError(message + " (use nan_policy='skip' to drop such batches)")
        if self.amp:
            self.scaler.update()  # after unscale_ without step: resets it (backs off if inf)
        self.mean.skipped += 1
        return None

    def check_finite(self, engine: Engine | None = None) -> None:
        """Raise `NonFiniteError` if a batch since the last check had a NaN/inf (one host read
        with deferred checks, agreed by every rank; nothing to do otherwise)."""
        if self.check_every == 1:
            return
        bad = int(self._first_bad)
        if is_distributed():  # every rank stops together, at the earliest bad iteration
            bad = min((b for b in all_gather_objects(bad) if b >= 0), default=-1)
        if bad >= 0:
            self._first_bad.fill_(-1)
            self.optimizer.zero_grad(set_to_none=True)
            epoch = self._engine.state.epoch if self._engine is not None else "?"
            raise NonFiniteError(f"non-finite loss or gradient norm at iteration {bad} (epoch "
                                 f"{epoch}; checked every {self.check_every} iterations)")

    def _started(self, engine: Engine) -> None:
        self._distributed = None  # a new run may be in another process group

    def _epoch_completed(self, engine: Engine) -> None:
        self.check_finite()
        metrics = engine.state.metrics
        metrics["train_loss"] = self.mean.compute_global()
        metrics["lr"] = current_lr(self.optimizer)
        if self.nan_policy == "skip":
            metrics["skipped_batches"] = float(self.mean.skipped)
        if self.amp:
            metrics["amp_skipped_steps"] = float(self.mean.amp_skipped)
            metrics["amp_scale"] = float(self.scaler.get_scale())
        self.mean.reset()

    def attach(self, engine: Engine) -> TrainStep:
        """Register the epoch metrics (and the deferred checks) on ``engine``, whose process
        function is this step."""
        self._engine = engine
        engine.add_event_handler(Events.STARTED, self._started)
        if self.check_every > 1:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.check_every),
                                     self.check_finite)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        return self

    def create_engine(self) -> TrainerEngine:
        """A `TrainerEngine` that runs this step on every batch."""
        engine = TrainerEngine(self)
        self.attach(engine)
        return engine


def create_trainer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn,
                   **options) -> TrainerEngine:
    """Engine that trains ``model`` with ``loss_fn`` on each batch; ``options`` are
    `TrainStep`'s (``device``, ``clip_grad_norm``, ``amp``, ``prepare_batch``, ``nan_policy``,
    ``check_every``).

    To reach the step's ``scaler`` and epoch ``mean`` (e.g. to checkpoint them), build it
    yourself: ``step = TrainStep(model, optimizer, loss_fn, ...)``, then
    ``trainer = step.create_engine()``.
    """
    return TrainStep(model, optimizer, loss_fn, **options).create_engine()
