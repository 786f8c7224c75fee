"""Per-batch gradient norms (before and after clipping), aggregated per epoch."""

from __future__ import annotations

import math

from ignite.engine import Engine, Events


class GradNorm:
    """Reads ``grad_norm``/``unclipped_grad_norm`` from every iteration's output and writes
    their epoch means (``grad_norm``, ``unclipped_grad_norm``) and the epoch maximum before
    clipping (``unclipped_grad_norm_max``) into ``trainer.state.metrics``. The per-batch values
    of the current epoch are in ``self.batch_values``. Resumes mid-epoch via ``state_dict``."""

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
        for key in self.KEYS:
            self.batch_values[key].append(float(output[key]))

    def _publish(self, trainer: Engine) -> None:
        for key, values in self.batch_values.items():
            trainer.state.metrics[key] = math.fsum(values) / len(values) if values else math.nan
        values = self.batch_values["unclipped_grad_norm"]
        trainer.state.metrics["unclipped_grad_norm_max"] = max(values) if values else math.nan
        self.batch_values = {k: [] for k in self.KEYS}

    def state_dict(self) -> dict:
        return {"batch_values": {k: list(v) for k, v in self.batch_values.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.batch_values = {k: [float(x) for x in state["batch_values"].get(k, [])]
                             for k in self.KEYS}
