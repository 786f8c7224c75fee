"""Run the evaluator after training epochs and publish ``valid_loss`` on the trainer."""

from __future__ import annotations

from ignite.engine import Engine, Events


class Validation:
    """Run ``evaluator`` on ``loader`` every ``every`` epochs; write ``trainer.state.metrics
    [metric]``. Attach it before hooks that consume the metric (logs, best model, patience)."""

    def __init__(self, evaluator: Engine, loader, metric: str = "valid_loss", every: int = 1):
        self.evaluator, self.loader, self.metric, self.every = evaluator, loader, metric, every

    def attach(self, trainer: Engine) -> Validation:
        trainer.add_event_handler(Events.EPOCH_COMPLETED(every=self.every), self.run)
        return self

    def run(self, trainer: Engine) -> float:
        self.evaluator.run(self.loader, max_epochs=1)
        value = float(self.evaluator.state.metrics["loss"])
        trainer.state.metrics[self.metric] = value
        return value

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
