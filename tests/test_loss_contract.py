"""The loss contract ``loss_fn(model, batch) -> (mean_loss, n)`` is checked on the first
training batch (TrainStep), the first validation batch (create_evaluator) and the first batch
of `tractrain.evaluate`: a breach is one `LossContractError` line naming the contract and what
came back; a valid loss (n == 0 included) trains as before."""

from __future__ import annotations

import pytest
import torch

from tractrain.engine.contract import CONTRACT
from tractrain.engine.evaluate import evaluate
from tractrain.engine.evaluator import create_evaluator
from tractrain.engine.trainer import TrainStep
from tractrain.errors import ConfigError, LossContractError


class Batch:
    def __init__(self, n=8):
        self.x = torch.linspace(-1, 1, n * 2).reshape(n, 2)

    def to(self, device, non_blocking=False):
        return self


def per_point(model, batch):
    return ((model(batch.x) - 1) ** 2).squeeze(1)


BREACHES = {
    "bare tensor": (lambda m, b: per_point(m, b).mean(), ["expected a tuple", "Tensor(shape=()"]),
    "detached loss": (lambda m, b: (per_point(m, b).mean().detach(), 8),
                      ["require grad", "requires_grad=False"]),
    "item()": (lambda m, b: (per_point(m, b).mean().item(), 8), ["floating-point tensor"]),
    "(B,) loss": (lambda m, b: (per_point(m, b), 8), ["scalar", "shape (8,)"]),
    "three values": (lambda m, b: (per_point(m, b).mean(), 8, {}), ["tuple of 3"]),
    "negative n": (lambda m, b: (per_point(m, b).mean(), -1), ["n >= 0", "-1"]),
    "n not a number": (lambda m, b: (per_point(m, b).mean(), "8"), ["n to be a number", "str"]),
    "n a vector": (lambda m, b: (per_point(m, b).mean(), torch.ones(8)), ["0-d"]),
}


def train_once(loss_fn):
    model = torch.nn.Linear(2, 1)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn)
    engine = step.create_engine()
    engine.run([Batch(), Batch()], max_epochs=1)
    return engine


@pytest.mark.parametrize("name", list(BREACHES))
def test_training_refuses_a_breach_in_one_line(name):
    loss_fn, fragments = BREACHES[name]
    with pytest.raises(LossContractError) as info:
        train_once(loss_fn)
    message = str(info.value)
    assert isinstance(info.value, ConfigError)
    assert "\n" not in message and message.startswith(CONTRACT), message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("name", [k for k in BREACHES if k != "detached loss"])
def test_validation_and_evaluate_refuse_a_breach(name):
    loss_fn, fragments = BREACHES[name]
    model = torch.nn.Linear(2, 1)
    with pytest.raises(LossContractError, match=fragments[0].replace("(", r"\(")):
        create_evaluator(model, loss_fn).run([Batch()])
    with pytest.raises(LossContractError, match=fragments[0].replace("(", r"\(")):
        evaluate(model, loss_fn, [Batch()])


def test_a_detached_loss_is_fine_for_evaluation():
    def loss_fn(model, batch):  # under no_grad every loss is detached
        return per_point(model, batch).mean(), torch.tensor(8)

    model = torch.nn.Linear(2, 1)
    assert evaluate(model, loss_fn, [Batch()])["n"] == 8


def test_valid_losses_train_n_zero_included():
    calls = []

    def loss_fn(model, batch):  # a batch with nothing to predict weighs 0 (demo's 1-point)
        calls.append(1)
        loss = per_point(model, batch).mean()
        return (loss, 0) if len(calls) == 1 else [loss, torch.tensor(8)]

    engine = train_once(loss_fn)
    assert len(calls) == 2 and engine.state.metrics["train_loss"] > 0


def test_only_the_first_batch_is_checked():
    """Later batches cost nothing extra: loss_fn is called directly, unchecked."""
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        loss = per_point(model, batch).mean()
        return (loss, 8) if len(calls) == 1 else (loss, -8)  # a breach no check sees

    train_once(loss_fn)
    assert len(calls) == 2
