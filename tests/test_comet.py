"""CometLogger, offline: what reaches the archive, resume into the same experiment, lazy import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from ignite.engine import Engine, Events

from tractrain.errors import ConfigError
from tractrain.hooks.comet import CometLogger

LOSSES = [0.9, 0.7, 0.55, 0.5, 0.48]


def make_trainer(best_at: int | None = None) -> Engine:
    """A tiny trainer that publishes epoch metrics like the real producers do."""
    trainer = Engine(lambda engine, batch: None)

    @trainer.on(Events.EPOCH_COMPLETED)
    def produce(engine: Engine) -> None:
        epoch = engine.state.epoch
        engine.state.metrics.update(
            train_loss=LOSSES[epoch - 1],
            valid_loss=LOSSES[epoch - 1] + 0.1,
            lr=1e-3 / epoch,
            note="not a number",
        )
        if best_at is not None and epoch >= best_at:
            engine.state.best_epoch = {
                "epoch": best_at, "metric": "valid_loss", "value": LOSSES[best_at - 1] + 0.1,
                "train_loss": LOSSES[best_at - 1], "valid_loss": LOSSES[best_at - 1] + 0.1,
            }

    return trainer


def read_archives(folder: Path) -> list[tuple[dict, list[dict]]]:
    """(experiment.json, messages) of every offline archive in ``folder``, oldest first."""
    out = []
    for path in folder.glob("*.zip"):
        with zipfile.ZipFile(path) as zf:
            meta = json.loads(zf.read("experiment.json"))
            messages = [json.loads(line) for line in zf.read("messages.json").splitlines()]
        out.append((meta, messages))
    return sorted(out, key=lambda item: item[0]["start_time"])


def metrics_of(messages: list[dict]) -> dict[str, dict[int, float]]:
    """{metric name: {step: value}} from ``metric_msg`` records."""
    found: dict[str, dict[int, float]] = {}
    for record in messages:
        if record["type"] == "metric_msg":
            metric = record["payload"]["metric"]
            assert metric["step"] == metric["epoch"]
            found.setdefault(metric["metricName"], {})[metric["step"]] = metric["metricValue"]
    return found


def params_of(messages: list[dict]) -> dict:
    return {
        r["payload"]["param"]["paramName"]: r["payload"]["param"]["paramValue"]
        for r in messages
        if r["type"] == "parameter_msg" and r["payload"]["param"]["source"] == "manual"
    }


def others_of(messages: list[dict]) -> dict:
    return {r["payload"]["key"]: r["payload"]["value"] for r in messages
            if r["type"] == "log_other"}


def test_offline_run_then_resume_into_same_experiment(tmp_path):
    exp = tmp_path / "exp1"
    params = {"lr": 1e-3, "model": {"hidden": 32}, "store": tmp_path / "data.zarr"}
    hook = CometLogger(exp, params=params)
    trainer = make_trainer(best_at=2)
    hook.attach(trainer)
    trainer.run([0, 1], max_epochs=3)

    assert hook.experiment is None  # ended at COMPLETED
    state = hook.state_dict()
    assert state["online"] is False
    assert json.loads(json.dumps(state)) == state
    (meta, messages), = read_archives(exp / "comet")
    assert meta["offline_id"] == state["experiment_key"]
    assert meta["project_name"] == "tractrain"
    metrics = metrics_of(messages)
    assert metrics["train_loss"] == {e: LOSSES[e - 1] for e in (1, 2, 3)}
    assert metrics["lr"] == pytest.approx({e: 1e-3 / e for e in (1, 2, 3)})
    assert "note" not in metrics
    assert metrics["best_epoch"] == {2: 2, 3: 2}
    assert metrics["best_value"] == pytest.approx({2: LOSSES[1] + 0.1, 3: LOSSES[1] + 0.1})
    assert params_of(messages) == {"lr": 1e-3, "model|hidden": 32,
                                   "store": str(tmp_path / "data.zarr")}
    others = others_of(messages)
    assert others["Name"] == "exp1"
    assert others["best_metric"] == "valid_loss"

    # resume: a fresh hook and trainer, restored from the first hook's state
    resumed = CometLogger(exp, params=params)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    trainer2 = make_trainer(best_at=4)
    trainer2.load_state_dict({"epoch_length": 2, "max_epochs": 5, "iteration": 6})
    resumed.attach(trainer2)
    trainer2.run([0, 1])

    assert resumed.state_dict() == state
    archives = read_archives(exp / "comet")
    assert len(archives) == 2
    meta2, messages2 = archives[1]
    assert meta2["offline_id"] == state["experiment_key"]
    assert meta2["resume_strategy"] == "get"
    metrics2 = metrics_of(messages2)
    assert metrics2["train_loss"] == {4: LOSSES[3], 5: LOSSES[4]}
    assert metrics2["best_epoch"] == {4: 4, 5: 4}
    assert params_of(messages2) == {}  # params are logged once per experiment


def test_exception_ends_experiment_and_is_reraised(tmp_path, monkeypatch):
    monkeypatch.setenv("COMET_API_KEY", "secretkey0123456789")
    trainer = Engine(lambda engine, batch: 1 / 0 if engine.state.epoch == 2 else None)

    @trainer.on(Events.EPOCH_COMPLETED)
    def produce(engine: Engine) -> None:
        engine.state.metrics["train_loss"] = 1.0

    hook = CometLogger(tmp_path / "exp", online=False)
    hook.attach(trainer)
    with pytest.raises(ZeroDivisionError):
        trainer.run([0], max_epochs=3)
    assert hook.experiment is None
    (meta, messages), = read_archives(tmp_path / "exp" / "comet")
    assert metrics_of(messages)["train_loss"] == {1: 1.0}
    assert others_of(messages)["crashed"].startswith("ZeroDivisionError")
    # the API key is never written, neither in the archive nor in the hook's state
    for path in tmp_path.rglob("*"):
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as zf:
                for name in zf.namelist():
                    assert b"secretkey0123456789" not in zf.read(name)
    assert "secretkey0123456789" not in json.dumps(hook.state_dict())


def test_later_exception_handlers_still_run(tmp_path):
    trainer = Engine(lambda engine, batch: 1 / 0)
    hook = CometLogger(tmp_path / "exp", online=False)
    hook.attach(trainer)
    seen = []

    @trainer.on(Events.EXCEPTION_RAISED)
    def later(engine: Engine, error: BaseException) -> None:
        seen.append(type(error))
        raise error

    with pytest.raises(ZeroDivisionError):
        trainer.run([0], max_epochs=1)
    assert seen and set(seen) == {ZeroDivisionError}  # ignite may fire it twice
    assert hook.experiment is None


def test_online_default_follows_api_key_config(tmp_path, monkeypatch):
    from tractrain.hooks.comet import comet_online_default

    monkeypatch.delenv("COMET_START_ONLINE", raising=False)
    monkeypatch.delenv("COMET_API_KEY", raising=False)
    monkeypatch.setenv("COMET_CONFIG", str(tmp_path / "none.config"))
    assert comet_online_default() is False
    config = tmp_path / "comet.config"
    config.write_text("[comet]\napi_key=filekey0123456789\n")
    monkeypatch.setenv("COMET_CONFIG", str(config))
    assert comet_online_default() is True
    monkeypatch.setenv("COMET_START_ONLINE", "false")  # comet's own switch wins
    assert comet_online_default() is False


def test_online_without_key_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("COMET_CONFIG", str(tmp_path / "none.config"))
    trainer = make_trainer()
    CometLogger(tmp_path / "exp", online=True).attach(trainer)
    with pytest.raises(ConfigError, match="API key"):
        trainer.run([0], max_epochs=1)


@pytest.mark.parametrize(
    "kwargs", [{"params": [1, 2]}, {"project_name": ""}, {"online": "yes"}]
)
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        CometLogger(tmp_path, **kwargs)


def test_bad_state(tmp_path):
    hook = CometLogger(tmp_path, online=True)
    with pytest.raises(ConfigError):
        hook.load_state_dict({"online": False})
    with pytest.raises(ConfigError, match="offline"):
        hook.load_state_dict({"experiment_key": "a" * 32, "online": False})


def test_import_does_not_import_comet_ml():
    code = "import sys, tractrain.hooks.comet; print('comet_ml' in sys.modules)"
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True)
    assert out.stdout.strip() == "False"
