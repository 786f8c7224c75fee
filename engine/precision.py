"""Numeric precision of training: ``32``, ``16-mixed`` (fp16 autocast + `GradScaler`) or
``bf16-mixed`` (bf16 autocast, no scaler), the one owner of autocast and the AMP scaler.

Mixed precision runs on CUDA only. On another device it warns once (per `Precision`, i.e.
per run) and trains in fp32: CPU autocast is rarely faster than fp32 for these small models
and would change the numbers users compare against. A `GradScaler` passed in (e.g. an
enabled ``torch.amp.GradScaler("cpu")``) is used as given on any device: that is how the
fp16 path is emulated and tested without a GPU.

The scaler is checkpointed through `Precision.state_dict`. A checkpoint of an fp32 run holds
an empty scaler state (or none): resuming it with ``16-mixed`` starts a fresh scaler with one
warning instead of failing.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext

import torch

from tractrain.errors import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = ("32", "16-mixed", "bf16-mixed")
DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


def resolve_precision(precision: str | int | None = None, amp: bool = False) -> str:
    """The precision name of ``precision`` (``32``, ``16-mixed``, ``bf16-mixed``; None means
    ``32``, or ``16-mixed`` when the older ``amp`` flag is true, its alias)."""
    if precision is None:
        return "16-mixed" if amp else "32"
    name = str(precision).strip().lower()
    if name not in PRECISIONS:
        raise ConfigError(f"precision: expected one of {', '.join(PRECISIONS)}, got "
                          f"{precision!r}")
    if amp and name != "16-mixed":
        raise ConfigError(f"precision {name} contradicts amp true (an alias of precision "
                          "16-mixed): give one of them")
    return name


class Precision:
    """Autocast context and `GradScaler` of one run.

    Args:
        precision: a name of `PRECISIONS` (see `resolve_precision`; ``amp`` is its alias).
        device: the training device; mixed precision off CUDA warns once and runs in fp32.
        scaler: a `GradScaler` to use instead of the default one (its own device and
            settings; e.g. an enabled CPU scaler to emulate fp16 on CPU).
    """

    def __init__(self, precision: str | None = None, device: str | torch.device = "cpu", *,
                 amp: bool = False, scaler: torch.amp.GradScaler | None = None) -> None:
        self.requested = resolve_precision(precision, amp)
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        self.name = self.requested if on_cuda else "32"
        if self.requested != "32" and not on_cuda:
            log.warning("precision %s needs a CUDA device; training on %s in fp32",
                        self.requested, self.device.type)
        if scaler is None:
            scaler = torch.amp.GradScaler("cuda", enabled=self.name == "16-mixed")
        self.scaler = scaler

    @property
    def scaling(self) -> bool:
        """True when gradients go through the scaler (fp16 AMP, or an injected scaler)."""
        return self.scaler.is_enabled()

    def autocast(self) -> AbstractContextManager:
        """The context of a forward pass (a reusable no-op in fp32)."""
        if self.name == "32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.name])

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        """The scaler's state; an empty one (fp32 run) leaves an enabled scaler fresh."""
        if not state:
            if self.scaling:
                log.warning("the checkpoint has no GradScaler state (written without fp16 "
                            "AMP): starting with a fresh scaler (scale %g)",
                            self.scaler.get_scale())
            return
        self.scaler.load_state_dict(state)
