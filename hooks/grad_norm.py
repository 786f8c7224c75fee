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
        self.batch_values: dict[str, list[float]] = {k: [] for k in self.KEYS}

    def attach(self, trainer: Engine) -> GradNorm:
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._publish)
        return self

    def _collect(self, trainer: Engine) -> None:
        output = trainer.state.output
        if not isinstance(output, dict) or output.get("skipped"):
            return
        for key in self.KEYS:  # tensors kept as they are: read once per epoch (`_to_floats`)
            value = output[key]
            self.batch_values[key].append(value.detach() if isinstance(value, torch.Tensor)
                                          else float(value))

    def _to_floats(self) -> None:
        """Read the values kept on a device, one transfer per metric."""
        for values in self.batch_values.values():
            where = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
            if where:
                read = torch.stack([values[i] for i in where]).tolist()
                for i, value in zip(where, read, strict=True):
                    values[i] = float(value)

    def _publish(self, trainer: Engine) -> None:
        self._to_floats()
        for key, values in self.batch_values.items():  # an AMP overflow step's inf left out
            values = [v for v in values if math.isfinite(v)]
            self.batch_values[key] = values
            trainer.state.metrics[key] = math.fsum(values) / len(values) if values else math.nan
        values = self.batch_values["unclipped_grad_norm"]
        trainer.state.metrics["unclipped_grad_norm_max"] = max(values) if values else math.nan
        self.batch_values = {k: [] for k in self.KEYS}

    def state_dict(self) -> dict:
        self._to_floats()
        return {"batch_values": {k: list(v) for k, v in self.batch_values.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.batch_values = {k: [float(x) for x in state["batch_values"].get(k, [])]
                             for k in self.KEYS}
