"""Monitor, BestModel, Patience, NpyLogs and Progress on tiny ignite engines."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events

from tractrain.errors import CheckpointError, ConfigError
from tractrain.experiment import read_best_model, read_logs
from tractrain.hooks import best_model as best_model_module
from tractrain.hooks.best_model import BestModel
from tractrain.hooks.logs import NpyLogs
from tractrain.hooks.monitor import Monitor
from tractrain.hooks.patience import Patience
from tractrain.hooks.progress import Progress

EPOCH_LENGTH = 3


def make_trainer(per_epoch, model: torch.nn.Module | None = None) -> Engine:
    """A trainer whose output is the tractrain dict and whose producer handler replaces
    ``state.metrics`` with ``per_epoch(epoch)`` at EPOCH_COMPLETED. With a model, its weights
    are set to the epoch number during the epoch (so each epoch's weights are recognisable)."""

    def step(engine, batch):
        if model is not None:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float(engine.state.epoch))
        t = torch.tensor
        return {"loss": t(0.5), "n": t(4), "grad_norm": t(1.0), "unclipped_grad_norm": t(2.0)}

    trainer = Engine(step)

    @trainer.on(Events.EPOCH_COMPLETED)
    def produce(engine):
        engine.state.metrics.clear()
        engine.state.metrics.update(per_epoch(engine.state.epoch))

    return trainer


def run(trainer: Engine, max_epochs: int) -> Engine:
    trainer.run(list(range(EPOCH_LENGTH)), max_epochs=max_epochs)
    return trainer


def from_list(values: list[dict]):
    """Per-epoch metrics from a list; epochs past its end repeat the last entry."""
    return lambda epoch: values[min(epoch, len(values)) - 1]


def roundtrip(state: dict) -> dict:
    """What a checkpoint hook would store and read back (strict JSON)."""
    return json.loads(json.dumps(state, allow_nan=False))


# ---------------------------------------------------------------- Monitor


def test_monitor_nan_never_improves_and_counts_as_bad():
    m = Monitor(mode="min")
    assert not m.update({"train_loss": math.nan}, 1)
    assert (m.best, m.best_epoch, m.bad_epochs) == (None, None, 1)
    assert m.update({"train_loss": 2.0}, 2)
    assert (m.best, m.best_epoch, m.bad_epochs) == (2.0, 2, 0)
    for epoch, value in [(3, math.nan), (4, -math.inf), (5, math.inf)]:
        assert not m.update({"train_loss": torch.tensor(value)}, epoch)
    assert (m.best, m.best_epoch, m.bad_epochs) == (2.0, 2, 3)


def test_monitor_max_mode_min_delta_and_tensor_values():
    m = Monitor(metric="acc", mode="max", min_delta=0.25)
    assert m.update({"acc": torch.tensor(0.5)}, 1)
    assert not m.update({"acc": np.float32(0.75)}, 2)  # +0.25 is not *more* than min_delta
    assert m.update({"acc": 0.875}, 3)
    assert not m.update({"acc": 0.25}, 4)
    assert (m.best, m.best_epoch, m.bad_epochs) == (0.875, 3, 1)


def test_monitor_resolves_metric_once_and_reports_missing():
    m = Monitor()
    m.update({"train_loss": 1.0, "valid_loss": 3.0}, 1)
    assert m.metric == "valid_loss" and m.best == 3.0
    with pytest.raises(ConfigError, match=r"'valid_loss'.*\['train_loss'\].*Validation"):
        m.update({"train_loss": 0.5}, 2)
    assert Monitor().resolve({"train_loss": 1.0}) == "train_loss"


def test_monitor_state_roundtrip_and_checks():
    m = Monitor(min_delta=0.5)
    for epoch, value in enumerate([4.0, 3.0, 2.75, 2.625], start=1):
        m.update({"train_loss": value}, epoch)
    restored = Monitor(min_delta=0.5)
    restored.load_state_dict(roundtrip(m.state_dict()))
    assert restored.state_dict() == m.state_dict()
    assert restored.update({"train_loss": 2.25}, 5) == m.update({"train_loss": 2.25}, 5)
    with pytest.raises(CheckpointError, match="valid_loss"):
        Monitor(metric="valid_loss").load_state_dict(m.state_dict())
    with pytest.raises(CheckpointError, match="mode"):
        Monitor(mode="max").load_state_dict(m.state_dict())
    with pytest.raises(ConfigError, match="mode"):
        Monitor(mode="lowest")
    with pytest.raises(ConfigError, match="min_delta"):
        Monitor(min_delta=-1.0)


# ---------------------------------------------------------------- BestModel


def spy_writes(monkeypatch) -> list[str]:
    """Record every best_model folder write (the folder's name)."""
    written = []
    real = best_model_module.atomic_write_dir

    def spy(target, write):
        written.append(str(target))
        return real(target, write)

    monkeypatch.setattr(best_model_module, "atomic_write_dir", spy)
    return written


def test_best_model_saves_only_on_improvement(tmp_path, monkeypatch):
    written = spy_writes(monkeypatch)
    train = [5.0, 4.0, 4.5, 3.0, 3.0, 3.5]
    valid = [6.0, 5.0, 5.5, 4.0, 4.0, 4.5]
    # min of valid_loss: improved at epochs 1, 2, 4 (epoch 5 only ties)
    expected_best = {1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4}
    model = torch.nn.Linear(3, 2)
    config = {"name": "linear", "in": 3, "out": 2}
    trainer = make_trainer(
        lambda e: {"train_loss": train[e - 1], "valid_loss": valid[e - 1], "lr": 0.1}, model
    )
    hook = BestModel(tmp_path, model, config)
    hook.attach(trainer)
    seen = []

    @trainer.on(Events.EPOCH_COMPLETED)
    def check(engine):
        epoch = engine.state.epoch
        best = expected_best[epoch]
        record = json.loads((tmp_path / "best_epoch.json").read_text())
        assert record == {
            "epoch": best, "metric": "valid_loss", "value": valid[best - 1],
            "train_loss": train[best - 1], "valid_loss": valid[best - 1],
        }
        assert engine.state.best_epoch == record
        weights = torch.load(tmp_path / "best_model" / "model.pt", weights_only=True)
        for name, tensor in weights.items():
            assert torch.equal(tensor, torch.full_like(tensor, float(best))), name
        seen.append(epoch)

    run(trainer, max_epochs=6)
    assert seen == [1, 2, 3, 4, 5, 6]
    assert len(written) == 3  # epochs 1, 2 and 4
    state_dict, loaded_config = read_best_model(tmp_path)
    assert loaded_config == config
    rebuilt = torch.nn.Linear(config["in"], config["out"])
    rebuilt.load_state_dict(state_dict)
    assert torch.equal(rebuilt.weight, torch.full((2, 3), 4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_epoch.json", "best_model"]


def test_best_model_falls_back_to_train_loss(tmp_path):
    model = torch.nn.Linear(2, 1)
    trainer = make_trainer(from_list([{"train_loss": 2.0}, {"train_loss": 1.0}]), model)
    BestModel(tmp_path, model).attach(trainer)
    run(trainer, max_epochs=2)
    record = json.loads((tmp_path / "best_epoch.json").read_text())
    assert record == {
        "epoch": 2, "metric": "train_loss", "value": 1.0, "train_loss": 1.0, "valid_loss": None,
    }
    weights, config = read_best_model(tmp_path)
    assert config is None
    assert torch.equal(weights["bias"], torch.tensor([2.0]))


def test_best_model_missing_metric_message(tmp_path):
    model = torch.nn.Linear(2, 1)
    trainer = make_trainer(lambda e: {"train_loss": 1.0}, model)
    BestModel(tmp_path, model, metric="valid_loss").attach(trainer)
    with pytest.raises(ConfigError) as info:
        run(trainer, max_epochs=1)
    message = str(info.value)
    assert "\n" not in message
    assert "BestModel" in message and "'valid_loss'" in message
    assert "['train_loss']" in message
    assert "Validation hook (tractrain.hooks.validation) before BestModel" in message
    assert not (tmp_path / "best_model").exists()


def test_best_model_resumes_best_value(tmp_path, monkeypatch):
    written = spy_writes(monkeypatch)
    losses = [3.0, 1.0, 2.0, 1.5, 0.5]
    model = torch.nn.Linear(2, 1)
    first = make_trainer(from_list([{"train_loss": v} for v in losses]), model)
    hook = BestModel(tmp_path, model)
    hook.attach(first)
    run(first, max_epochs=2)
    state, engine_state = roundtrip(hook.state_dict()), first.state_dict()

    second = make_trainer(from_list([{"train_loss": v} for v in losses]), model)
    resumed = BestModel(tmp_path, model)
    resumed.load_state_dict(state)
    resumed.attach(second)
    published = []
    second.add_event_handler(Events.STARTED, lambda e: published.append(e.state.best_epoch))
    second.load_state_dict({**engine_state, "max_epochs": 5})
    run(second, max_epochs=5)
    assert published[0]["epoch"] == 2 and published[0]["value"] == 1.0
    # epochs 3 and 4 are worse than the restored best (epoch 2); epoch 5 improves
    assert len(written) == 3
    assert json.loads((tmp_path / "best_epoch.json").read_text())["epoch"] == 5
    with pytest.raises(CheckpointError, match="best_model"):
        read_best_model(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="model_config"):
        BestModel(tmp_path, model, {"activation": torch.nn.ReLU})


# ---------------------------------------------------------------- Patience


def run_patience(values, patience, min_delta=0.0, max_epochs=20):
    trainer = make_trainer(from_list([{"train_loss": v} for v in values]))
    hook = Patience(patience, min_delta=min_delta)
    hook.attach(trainer)
    run(trainer, max_epochs=max_epochs)
    return trainer, hook


LOSSES = [4.0, 3.0, 2.75, 2.5, 2.5, 2.25, 3.0, 2.5, 2.25, 2.0, 1.0, 1.0, 1.0]


def test_patience_stops_after_exactly_patience_bad_epochs():
    # min_delta 0: epoch 5 ties (bad, reset by 6); 7, 8 worse and 9 ties best 2.25: 3 bad
    trainer, hook = run_patience(LOSSES, patience=3)
    assert trainer.state.epoch == 9 and hook.exhausted
    assert (hook.monitor.best, hook.monitor.best_epoch) == (2.25, 6)
    # patience 4: epoch 10 improves, 12 and 13 tie -> runs to max_epochs
    trainer, hook = run_patience(LOSSES, patience=4, max_epochs=13)
    assert trainer.state.epoch == 13 and not hook.exhausted
    assert hook.monitor.bad_epochs == 2


def test_patience_respects_min_delta():
    # min_delta 0.25 (strict): epoch 3 (2.75) is only 0.25 below the best 3.0: bad
    trainer, hook = run_patience(LOSSES, patience=1, min_delta=0.25)
    assert trainer.state.epoch == 3
    # patience 2: epoch 4 (2.5 < 3.0 - 0.25) improves; 5 (2.5) and 6 (2.25, only 0.25
    # better) are bad -> stop at epoch 6
    trainer, hook = run_patience(LOSSES, patience=2, min_delta=0.25)
    assert trainer.state.epoch == 6 and hook.monitor.best_epoch == 4


def test_patience_none_never_stops():
    trainer, hook = run_patience([1.0] * 12, patience=None, max_epochs=12)
    assert trainer.state.epoch == 12 and not hook.exhausted
    assert hook.monitor.bad_epochs == 11
    trainer, _ = run_patience([1.0] * 12, patience=math.inf, max_epochs=12)
    assert trainer.state.epoch == 12
    for bad in (0, -2, 1.5, "3"):
        with pytest.raises(ConfigError, match="patience"):
            Patience(bad)


@pytest.mark.parametrize("interrupt_at", [2, 5, 7])
def test_patience_resumes_and_stops_at_the_same_epoch(interrupt_at):
    values = [{"train_loss": v} for v in LOSSES]
    full, _ = run_patience(LOSSES, patience=3)
    assert full.state.epoch == 9

    first = make_trainer(from_list(values))
    hook = Patience(3)
    hook.attach(first)
    run(first, max_epochs=interrupt_at)
    saved, engine_state = roundtrip(hook.state_dict()), first.state_dict()

    def resume(with_state: bool) -> Engine:
        trainer = make_trainer(from_list(values))
        restored = Patience(3)
        if with_state:
            restored.load_state_dict(saved)
        restored.attach(trainer)
        trainer.load_state_dict({**engine_state, "max_epochs": 20})
        return run(trainer, max_epochs=20)

    assert resume(with_state=True).state.epoch == 9
    if interrupt_at == 7:  # 2 bad epochs counted before the interruption: they matter
        assert resume(with_state=False).state.epoch > 9


def test_patience_exhausted_state_stops_at_start_unless_extended():
    first, hook = run_patience(LOSSES, patience=3)
    saved, engine_state = roundtrip(hook.state_dict()), first.state_dict()
    # patience 3: the restored state is exhausted -> no epoch runs. patience 5: epochs 10 and 11
    # improve, 12 and 13 tie -> runs to max_epochs 13
    for patience, expected_epoch in [(3, 9), (5, 13)]:
        trainer = make_trainer(from_list([{"train_loss": v} for v in LOSSES]))
        restored = Patience(patience)
        restored.load_state_dict(saved)
        restored.attach(trainer)
        trainer.load_state_dict({**engine_state, "max_epochs": 13})
        run(trainer, max_epochs=13)
        assert trainer.state.epoch == expected_epoch


# ---------------------------------------------------------------- NpyLogs


def fed_metrics(epoch: int) -> dict:
    """Deterministic per-epoch metrics; valid_loss only on even epochs, a non-scalar extra."""
    out = {
        "train_loss": 1.0 / epoch,
        "lr": torch.tensor(0.1 * 0.5**epoch),
        "grad_norm": np.float32(epoch) + 0.25,
        "confusion": torch.ones(2, 2),  # not a scalar: never logged
    }
    if epoch % 2 == 0:
        out["valid_loss"] = 2.0 / epoch
    return out


def expected_arrays(epochs: range) -> dict[str, np.ndarray]:
    return {
        "train_loss": np.array([1.0 / e for e in epochs]),
        "lr": np.array([float(torch.tensor(0.1 * 0.5**e)) for e in epochs]),
        "grad_norm": np.array([float(np.float32(e) + 0.25) for e in epochs]),
        "valid_loss": np.array([2.0 / e if e % 2 == 0 else np.nan for e in epochs]),
    }


def test_npy_logs_arrays_and_csv_equal_fed_values(tmp_path):
    trainer = make_trainer(fed_metrics)
    NpyLogs(tmp_path).attach(trainer)
    run(trainer, max_epochs=5)
    expected = expected_arrays(range(1, 6))
    logs = read_logs(tmp_path)
    assert sorted(logs) == sorted(expected)
    for name, array in expected.items():
        loaded = np.load(tmp_path / "logs" / f"{name}.npy")
        assert loaded.dtype == np.float64 and loaded.ndim == 1
        np.testing.assert_array_equal(loaded, array)
        np.testing.assert_array_equal(logs[name], array)
    with open(tmp_path / "logs" / "logs.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["epoch", "grad_norm", "lr", "train_loss", "valid_loss"]
    assert [int(r[0]) for r in rows[1:]] == [1, 2, 3, 4, 5]
    for column, name in enumerate(rows[0][1:], start=1):
        cells = [r[column] for r in rows[1:]]
        parsed = np.array([float(c) if c else np.nan for c in cells])
        np.testing.assert_array_equal(parsed, expected[name])
    assert rows[1][4] == "" and rows[2][4] != ""  # valid_loss missing on odd epochs


def test_npy_logs_listed_metrics_only(tmp_path):
    trainer = make_trainer(fed_metrics)
    NpyLogs(tmp_path, metrics=["valid_loss", "train_loss"]).attach(trainer)
    run(trainer, max_epochs=3)
    logs = read_logs(tmp_path)
    assert sorted(logs) == ["train_loss", "valid_loss"]
    np.testing.assert_array_equal(logs["valid_loss"], [np.nan, 1.0, np.nan])
    with pytest.raises(ConfigError, match="confusion"):
        NpyLogs(tmp_path / "x", metrics=["confusion"]).record(fed_metrics(1), 1)


def test_npy_logs_resume_continues_arrays_identically(tmp_path):
    uninterrupted = make_trainer(fed_metrics)
    NpyLogs(tmp_path / "a").attach(uninterrupted)
    run(uninterrupted, max_epochs=6)

    # run b: checkpoint after epoch 3, keeps training to epoch 4 (files now hold 4 epochs),
    # crashes, and resumes from the epoch-3 checkpoint
    first = make_trainer(fed_metrics)
    logs = NpyLogs(tmp_path / "b")
    logs.attach(first)
    saved = {}

    @first.on(Events.EPOCH_COMPLETED(once=3))
    def checkpoint(engine):
        saved["logs"], saved["engine"] = roundtrip(logs.state_dict()), engine.state_dict()

    run(first, max_epochs=4)
    assert len(read_logs(tmp_path / "b")["train_loss"]) == 4
    second = make_trainer(fed_metrics)
    resumed = NpyLogs(tmp_path / "b")
    resumed.load_state_dict(saved["logs"])
    resumed.attach(second)
    second.load_state_dict({**saved["engine"], "max_epochs": 6})
    run(second, max_epochs=6)

    a, b = read_logs(tmp_path / "a"), read_logs(tmp_path / "b")
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert (tmp_path / "a/logs/logs.csv").read_text() == (tmp_path / "b/logs/logs.csv").read_text()
    for name, array in expected_arrays(range(1, 7)).items():
        np.testing.assert_array_equal(b[name], array)


# ---------------------------------------------------------------- Progress


def handler_counts(engine: Engine) -> dict:
    return {event: len(handlers) for event, handlers in engine._event_handlers.items()}


def test_progress_disabled_attaches_nothing(capsys):
    trainer = make_trainer(fed_metrics)
    before = handler_counts(trainer)
    Progress(enabled=False).attach(trainer)
    assert handler_counts(trainer) == before
    assert not Progress(file=io.StringIO()).enabled  # not a terminal -> off by default
    run(trainer, max_epochs=2)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_progress_enabled_runs_and_closes(capsys):
    stream = io.StringIO()
    trainer = make_trainer(fed_metrics)
    bars = Progress(enabled=True, file=stream)
    bars.attach(trainer)
    run(trainer, max_epochs=3)
    text = stream.getvalue()
    assert "epochs" in text and "train_loss=" in text
    assert bars._epoch_bar is None and bars._iter_bar is None
    assert bars.state_dict() == {}


def test_progress_shows_moving_average_of_output_loss():
    losses = [1.0, 2.0, 4.0]

    def step(engine, batch):
        return {"loss": torch.tensor(losses[batch]), "n": torch.tensor(1)}

    trainer = Engine(step)
    bars = Progress(enabled=True, ema=0.5, file=io.StringIO())
    bars.attach(trainer)
    shown = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: shown.append(bars.running["loss"])
    )
    trainer.run([0, 1, 2], max_epochs=1)
    # ema 0.5: 1, then (1 + 2) / 2, then (1.5 + 4) / 2
    assert shown == [1.0, 1.5, 2.75]


def test_progress_does_not_swallow_exceptions():
    def failing(engine, batch):
        if engine.state.iteration == 2:
            raise RuntimeError("boom")
        return {"loss": torch.tensor(1.0)}

    trainer = Engine(failing)
    bars = Progress(enabled=True, file=io.StringIO())
    bars.attach(trainer)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.run([0, 1, 2], max_epochs=2)
    assert bars._epoch_bar is None and bars._iter_bar is None


def test_npy_logs_out_of_step_after_a_kill_agree_again_when_a_resumed_run_starts(tmp_path):
    values = [{"train_loss": 1.0 / e, "lr": 0.1} for e in range(1, 4)]
    trainer = make_trainer(from_list(values))
    first = NpyLogs(tmp_path)
    first.attach(trainer)
    run(trainer, 3)
    state = roundtrip(first.state_dict())
    np.save(tmp_path / "logs" / "lr.npy", np.array([0.1, 0.1]))  # killed between two renames
    assert len(read_logs(tmp_path)["lr"]) == 2
    resumed = NpyLogs(tmp_path)
    resumed.load_state_dict(state)
    seen = {}
    trainer = make_trainer(from_list(values))
    resumed.attach(trainer)

    @trainer.on(Events.STARTED)
    def look(engine):  # attached after NpyLogs: sees the files right after its STARTED
        seen.update({k: len(v) for k, v in read_logs(tmp_path).items()})

    trainer.run(list(range(EPOCH_LENGTH)), max_epochs=1)
    assert seen == {"train_loss": 3, "lr": 3}


# ---------------------------------------------------------------- attach


def test_every_hook_attach_returns_the_hook_for_chaining(tmp_path):
    from tractrain.engine.epochs import SamplerEpochs
    from tractrain.engine.optim import EpochLR
    from tractrain.engine.trainer import TrainStep
    from tractrain.hooks.checkpoint import Checkpoint
    from tractrain.hooks.comet import CometLogger
    from tractrain.hooks.grad_norm import GradNorm
    from tractrain.hooks.signals import GracefulStop
    from tractrain.hooks.timing import Timing
    from tractrain.hooks.validation import Validation

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpoint = Checkpoint(tmp_path, {"model": model})
    hooks = [
        TrainStep(model, optimizer, lambda m, b: (m(b).sum(), 1)), SamplerEpochs(None),
        EpochLR("0.1", optimizer), Timing(), GradNorm(), Validation(make_trainer(dict), []),
        BestModel(tmp_path, model), Patience(None), NpyLogs(tmp_path), Progress(enabled=False),
        Progress(enabled=True, file=io.StringIO()), CometLogger(tmp_path, online=False),
        checkpoint, GracefulStop(checkpoint),
    ]
    trainer = make_trainer(dict)
    for hook in hooks:
        assert hook.attach(trainer) is hook, type(hook).__name__


def test_graceful_stop_keeps_a_signal_the_parent_ignored(tmp_path):
    """``tractrain-train ... &`` from a script: the shell ignores SIGINT for it (Ctrl-C is for
    the foreground job); the run keeps it ignored, and still stops on SIGTERM."""
    import os
    import signal

    from tractrain.hooks.signals import GracefulStop

    class Saves:
        path, saved_iteration = tmp_path, None

        def save(self, trainer):
            self.saved_iteration = trainer.state.iteration
            return self.path

    seen = []

    def step(engine, batch):
        seen.append(signal.getsignal(signal.SIGINT))
        if engine.state.iteration == 2:
            os.kill(os.getpid(), signal.SIGINT)  # ignored: the run goes on
        if engine.state.iteration == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer = Engine(step)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        GracefulStop(Saves()).attach(trainer)
        trainer.run(list(range(5)), max_epochs=2)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen and all(h is signal.SIG_IGN for h in seen)
    assert trainer.state.stopped_by_signal == "SIGTERM" and trainer.state.iteration == 3
