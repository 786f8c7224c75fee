"""fp16 AMP emulated on CPU: an enabled ``GradScaler("cpu")`` and a model whose backward casts
gradients to float16 (so they overflow as under fp16 autocast). TrainStep must behave exactly
as torch's plain recipe; precision options, the CPU warning and resume without scaler state."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from ignite.engine import Events
from test_engine import loss_fn as engine_loss
from test_engine import make_loaders, make_model

from tractrain.engine.fit import train_and_validate
from tractrain.engine.precision import Precision, resolve_precision
from tractrain.engine.trainer import NonFiniteError, TrainStep
from tractrain.errors import ConfigError
from tractrain.experiment import read_logs

CLIP = 1.0
SCALER = {"init_scale": 2.0**24, "growth_interval": 3}  # overflows, backs off, grows again


class HalfGrad(torch.autograd.Function):
    """Identity forward; the backward rounds the gradient to float16 (inf beyond 65504)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.half().float()


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                                        torch.nn.Linear(16, 3))

    def forward(self, x):
        return HalfGrad.apply(self.body(x))


class Pair:
    """A minimal batch: ``.to(device)`` as the trainer expects."""

    def __init__(self, x, y) -> None:
        self.x, self.y = x, y

    def to(self, device, non_blocking=False):
        return self


def loss_fn(model, batch):
    return torch.nn.functional.mse_loss(model(batch.x), batch.y), int(batch.x.shape[0])


def batches(k=24):
    g = torch.Generator().manual_seed(1)
    return [Pair(torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g) * (1 + i % 4))
            for i in range(k)]


def reference(data):
    """torch's recipe: scale(loss).backward, unscale_, clip_grad_norm_, step, update."""
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", **SCALER)
    scales, skipped = [], 0
    for batch in data:
        opt.zero_grad(set_to_none=True)
        loss, _ = loss_fn(model, batch)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped += scaler.get_scale() < before
        scales.append(scaler.get_scale())
    return model, scales, skipped


def test_step_matches_torch_recipe_overflows_skipped_scale_backs_off():
    data = batches()
    ref_model, ref_scales, ref_skipped = reference(data)
    assert 0 < ref_skipped < len(data) - 4  # the emulation overflows, and not always

    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    step = TrainStep(model, opt, loss_fn, clip_grad_norm=CLIP,  # nan_policy "stop"
                     scaler=torch.amp.GradScaler("cpu", **SCALER))
    engine = step.create_engine()
    scales, skipped_flags = [], []

    @engine.on(Events.ITERATION_COMPLETED)
    def _record(engine):
        scales.append(step.scaler.get_scale())
        skipped_flags.append(bool(engine.state.output.get("skipped")))

    engine.run(data, max_epochs=1)  # overflows are no errors
    assert scales == ref_scales
    assert sum(skipped_flags) == ref_skipped
    assert engine.state.metrics["amp_skipped_steps"] == ref_skipped
    assert engine.state.metrics["amp_scale"] == ref_scales[-1]
    assert math.isfinite(engine.state.metrics["train_loss"])
    for (name, p), q in zip(model.state_dict().items(), ref_model.state_dict().values(),
                            strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_loss_is_still_the_nan_policys_under_amp(policy):
    data = batches(6)
    data[2].y = data[2].y * math.nan
    model = Net()
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn,
                     nan_policy=policy, scaler=torch.amp.GradScaler("cpu", init_scale=8.0))
    engine = step.create_engine()
    if policy == "stop":
        with pytest.raises(NonFiniteError, match="non-finite loss .* iteration 3"):
            engine.run(data, max_epochs=1)
        return
    engine.run(data, max_epochs=1)  # the next steps run: the scaler was reset
    assert engine.state.metrics["skipped_batches"] == 1
    assert step.scaler.get_scale() == 4.0  # the NaN step backed the scale off once


def test_precision_names_alias_and_errors():
    assert resolve_precision(None) == "32"
    assert resolve_precision(None, amp=True) == "16-mixed"
    assert resolve_precision("BF16-mixed") == "bf16-mixed"
    assert resolve_precision(32) == "32"
    with pytest.raises(ConfigError, match="precision: expected one of 32, 16-mixed"):
        resolve_precision("fp16")
    with pytest.raises(ConfigError, match="contradicts amp"):
        resolve_precision("32", amp=True)


def test_mixed_precision_on_cpu_warns_once_per_run_and_trains_fp32(tmp_path, caplog):
    train, valid = make_loaders()
    model = make_model()
    with caplog.at_level(logging.WARNING, logger="tractrain"):
        trainer = train_and_validate(
            model, torch.optim.Adam(model.parameters(), lr=1e-2), engine_loss,
            train, valid_loader=valid, exp_dir=tmp_path / "e", max_epochs=1,
            precision="bf16-mixed", progress=False, config={}, model_config={})
    warnings = [r.getMessage() for r in caplog.records if "CUDA" in r.getMessage()]
    assert warnings == ["precision bf16-mixed needs a CUDA device; training on cpu in fp32"]
    assert "amp_skipped_steps" not in trainer.state.metrics  # no scaler: plain fp32
    assert Precision("16-mixed", "cpu").autocast().__class__.__name__ == "nullcontext"


def test_resume_without_scaler_state_starts_a_fresh_scaler_with_one_warning(tmp_path, caplog):
    def run(max_epochs, resume, scaler=None):
        train, valid = make_loaders()
        model = make_model()
        return train_and_validate(
            model, torch.optim.Adam(model.parameters(), lr=1e-2), engine_loss, train,
            valid_loader=valid, exp_dir=tmp_path / "e", max_epochs=max_epochs, scaler=scaler,
            resume=resume, progress=False, config={}, model_config={})

    run(1, resume=False)  # fp32: the checkpoint holds an empty scaler state
    with caplog.at_level(logging.WARNING, logger="tractrain"):
        trainer = run(2, resume=True, scaler=torch.amp.GradScaler("cpu", init_scale=256.0))
    warnings = [r.getMessage() for r in caplog.records if "GradScaler" in r.getMessage()]
    assert warnings == ["the checkpoint has no GradScaler state (written without fp16 AMP): "
                        "starting with a fresh scaler (scale 256)"]
    assert trainer.state.epoch == 2 and "amp_skipped_steps" in trainer.state.metrics
    assert len(read_logs(tmp_path / "e")["train_loss"]) == 2
