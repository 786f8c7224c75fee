"""Per-batch gradient norms (before and after clipping), aggregated per epoch
(non-finite values, e.g. of steps the AMP scaler skipped, left out)."""

from __future__ import annotations

import math

import torch
from ignite.engine import Engine, Events


class GradNorm:
    """Reads ``grad_norm``/``unclipped_grad_norm`` from every iteration's output and writes
    their epoch means (``grad_norm``, ``unclipped_grad_norm``) and the epoch maximum before
    clipping (``unclipped_grad_norm_max``) into ``trainer.state.metrics``. The per-batch values
    of the current epoch are in ``self.batch_values``. Resumes mid-epoch via ``state_dict``.
    Tensor values stay where they are until the epoch ends (no host read per batch)."""

    KEYS = ("grad_norm", "unclipped_grad_norm")

    def __init__(self) -> None:
        self.batch_values: dict[str, list] = {k: [] for k in self.KEYS}

    def attach(self, trainer: Engine) -> GradNorm:
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._publish)
        return self

    def _collect(self, trainer: Engine) -> None:
        output = trainer.state.output
        if not isinstance(output, dict) or output.get("skipped"):
            return
        # as given (floats, or `TrainStep`'s detached tensors: read once per epoch)
        values = self.batch_values
        values["grad_norm"].append(output["grad_norm"])
        values["unclipped_grad_norm"].append(output["unclipped_grad_norm"])

    def _to_floats(self) -> None:
        """Make every kept value a float: those on a device read with one transfer per metric."""
        for values in self.batch_values.values():
            tensors = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
            if tensors:
                read = torch.stack([values[i].detach() for i in tensors]).tolist()
                for i, value in zip(tensors, read, strict=True):
                    values[i] = value
            values[:] = [float(v) for v in values]

    def _publish(self, trainer: Engine) -> None:
        self._to_floats()
        for key, values in self.batch_values.items():  # an AMP overflow step's inf left out
            values = [v for v in values if math.isfinite(v)]
            trainer.state.metrics[key] = math.fsum(values) / len(values) if values else math.nan
        values = [v for v in self.batch_values["unclipped_grad_norm"] if math.isfinite(v)]
        trainer.state.metrics["unclipped_grad_norm_max"] = max(values) if values else math.nan
        self.batch_values = {k: [] for k in self.KEYS}

    def state_dict(self) -> dict:
        self._to_floats()
        return {"batch_values": {k: list(v) for k, v in self.batch_values.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.batch_values = {k: [float(x) for x in state["batch_values"].get(k, [])]
                             for k in self.KEYS}
