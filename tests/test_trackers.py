"""--trackers: TensorBoard, MLflow, W&B (offline), csv and Comet read back after a train and a
resume into the same runs; logs/iterations.csv; --comet modes and the offline fallback."""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tractrain.errors import ConfigError

EVERY = 2
EPOCH_ENDS = [3, 6, 9]  # 3 batches per epoch, 2 epochs, then resumed to 3
ITERATION_STEPS = [2, 4, 6, 8]


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WANDB_MODE", "MLFLOW_TRACKING_URI", "COMET_API_KEY")}
    done = subprocess.run([sys.executable, "-m", f"tractrain.bin.{module}", *args],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def tracked(phantom_store, tmp_path_factory):
    """``(exp, train run, resume run)``: 2 epochs with every tracker but Comet (tested in-process
    below, its import is slow), resumed to 3."""
    parent = tmp_path_factory.mktemp("tracked")
    first = _cli("train", "--store", str(phantom_store.path), "--experiments", str(parent),
                 "--name", "run", "--max-epochs", "2", "--max-batches-train", "3",
                 "--batch-size", "1500", "--progress", "false", "--log-every", str(EVERY),
                 "--trackers", "csv,tensorboard,mlflow,wandb")
    second = _cli("resume", str(parent / "run"), "--max-epochs", "3")
    return parent / "run", first, second


def test_start_line_and_summary_say_where_each_tracker_writes(tracked):
    exp, first, second = tracked
    line = next(x for x in first.stderr.splitlines() if x.startswith("trackers: "))
    for name, folder in (("csv", "logs"), ("tensorboard", "tensorboard"), ("mlflow", "mlruns"),
                         ("wandb", "wandb")):
        assert re.search(rf"{name} -> [^;]*{re.escape(str(exp / folder))}", line), name
    for run in (first, second):
        assert f"tensorboard: {exp / 'tensorboard'}" in run.stdout
        assert f"wandb:      offline {exp / 'wandb'} (run " in run.stdout


def test_tensorboard_holds_every_epoch_and_iteration_step_once(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    exp = tracked[0]
    assert len(list((exp / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one a process
    events = EventAccumulator(str(exp / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("epoch/train_loss")] == EPOCH_ENDS
    assert [e.step for e in events.Scalars("epoch/epoch")] == EPOCH_ENDS
    for tag in ("iteration/loss", "iteration/grad_norm", "iteration/lr"):
        assert [e.step for e in events.Scalars(tag)] == ITERATION_STEPS
    from tractrain.experiment import read_logs

    assert [e.value for e in events.Scalars("epoch/train_loss")] == \
        pytest.approx(read_logs(exp)["train_loss"].tolist())


def test_mlflow_file_store_holds_one_run_with_every_step(tracked, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # recent mlflow asks, to read it too
    exp = tracked[0]
    client = MlflowClient((exp / "mlruns").resolve().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "run"]
    (run,) = client.search_runs([experiment.experiment_id])
    history = {name: [m.step for m in client.get_metric_history(run.info.run_id, name)]
               for name in ("epoch train_loss", "epoch valid_loss", "iteration loss")}
    assert history == {"epoch train_loss": EPOCH_ENDS, "epoch valid_loss": EPOCH_ENDS,
                       "iteration loss": ITERATION_STEPS}
    assert run.data.params["max_batches_train"] == "3"


def _wandb_history(path: Path) -> list[dict]:
    """History rows of a W&B ``.wandb`` file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks, rows = 7, 32768, [], []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or its last piece
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_offline_runs_hold_the_metrics_under_one_run_id(tracked):
    exp = tracked[0]
    runs = sorted((exp / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1
    rows = [row for run in runs for row in _wandb_history(next(run.glob("run-*.wandb")))]
    steps = {}
    for row in rows:
        for key in row:
            if not key.startswith("_"):
                steps.setdefault(key, []).append(row["_step"])
    assert steps["epoch/train_loss"] == EPOCH_ENDS
    assert steps["iteration/loss"] == ITERATION_STEPS


def test_iterations_csv_continues_without_duplicates(tracked):
    from tractrain.bin.plot_logs import main as plot_main
    from tractrain.experiment import read_iterations

    exp = tracked[0]
    table = read_iterations(exp)
    assert table["iteration"].tolist() == ITERATION_STEPS
    assert table["epoch"].tolist() == [1, 2, 2, 3]
    assert (table["lr"] > 0).all() and (table["grad_norm"] > 0).all()
    assert plot_main([str(exp), "--per-iteration"]) == 0
    assert (exp / "logs" / "iterations.png").stat().st_size > 0


def test_iteration_log_cuts_rows_after_the_checkpoint_and_a_torn_line(tmp_path):
    from tractrain.hooks.iteration_log import IterationLog

    log = IterationLog(tmp_path, every=1)
    log.path.parent.mkdir()
    rows = "".join(f"{i},1,0.5,1.0,0.001\n" for i in range(1, 8))
    log.path.write_text("iteration,epoch,loss,grad_norm,lr\n" + rows + "8,1,0.")
    log.truncate(5)
    assert log.path.read_text().splitlines()[1:] == [f"{i},1,0.5,1.0,0.001" for i in range(1, 6)]


def test_comet_and_tracker_choices_parse():
    from tractrain.bin.options import comet_mode, convert, tracker_list

    assert [comet_mode(v) for v in (True, False, "true", "false", "OFFLINE", "online")] == \
        ["auto", "off", "auto", "off", "offline", "online"]
    assert tracker_list("tensorboard, mlflow,tensorboard") == ["tensorboard", "mlflow"]
    assert tracker_list(["wandb"]) == ["wandb"]
    with pytest.raises(ConfigError,
                       match="--comet: 'offlin' is not one of .*; did you mean 'offline'"):
        convert("comet", "offlin", "--comet")
    with pytest.raises(ConfigError,
                       match="'tensorbord' is not one of .*; did you mean 'tensorboard'"):
        convert("trackers", "csv,tensorbord", "--trackers")


def test_trackers_comet_with_comet_off_means_auto():
    from tractrain.bin.compose import tracking

    config = {"name": "x", "comet": "off", "trackers": ["comet"], "comet_project": "p",
              "comet_workspace": None}
    assert tracking(config)[1]["online"] is None  # auto
    assert tracking({**config, "trackers": None})[1] is None
    assert tracking({**config, "comet": "online"})[1]["online"] is True


def test_missing_extra_is_one_line_naming_pip_before_anything(tmp_path, monkeypatch, capsys):
    import importlib.util

    from tractrain.bin.train import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    status = main(["--experiments", str(tmp_path), "--name", "x", "--trackers", "mlflow"])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.endswith("--trackers mlflow: the mlflow package is not installed; pip install "
                        "'tractrain[mlflow]'") and "\n" not in err
    assert not (tmp_path / "x").exists()


class _DeadExperiment:
    """What comet_ml hands back when the server cannot be reached: not alive."""

    alive = False

    def end(self) -> None:
        pass


@pytest.mark.parametrize("failure", ["dead", "raises"])
def test_comet_online_without_server_falls_back_to_offline_archive(tmp_path, monkeypatch,
                                                                  caplog, failure):
    from ignite.engine import Engine, Events

    from tractrain.hooks.comet import CometLogger, import_comet

    key = "fakekey0123456789abcdef"
    monkeypatch.setenv("COMET_API_KEY", key)
    comet_ml = import_comet()
    real_start, calls = comet_ml.start, []

    def start(*args, online=None, **kwargs):  # no network: the online attempt is simulated
        calls.append(online)
        if online:
            if failure == "raises":
                raise ConnectionError("Failed to establish a connection")
            logging.getLogger("comet_ml").error("Failed to establish a connection to Comet")
            return _DeadExperiment()
        return real_start(*args, online=online, **kwargs)

    monkeypatch.setattr(comet_ml, "start", start)
    trainer = Engine(lambda engine, batch: {"loss": 0.25 * batch, "grad_norm": 1.0})

    @trainer.on(Events.EPOCH_COMPLETED)
    def produce(engine):
        engine.state.metrics["train_loss"] = 0.5

    hook = CometLogger(tmp_path / "exp", online=True, log_every=1).attach(trainer)
    with caplog.at_level(logging.WARNING, logger="tractrain"):
        trainer.run([0, 1], max_epochs=1)
    assert calls == [True, False]
    assert "Comet online failed" in caplog.text and "Failed to establish" in caplog.text
    assert hook.destination.startswith(f"offline archive in {tmp_path / 'exp' / 'comet'}")
    assert "online failed" in trainer.state.trackers["comet"]
    (archive,) = (tmp_path / "exp" / "comet").glob("*.zip")
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            assert key.encode() not in zf.read(name)
        records = [json.loads(line) for line in zf.read("messages.json").splitlines()]
    losses = {r["payload"]["metric"]["step"]: r["payload"]["metric"]["metricValue"]
              for r in records if r["type"] == "metric_msg"
              and r["payload"]["metric"]["metricName"] == "iteration_loss"}
    assert losses == {1: 0.0, 2: 0.25}  # every log_every=1 iterations, step = iteration
    assert hook.state_dict()["online"] is True  # a resume tries online again


def test_comet_online_without_a_key_and_bad_modes_stop_before_training(tmp_path, monkeypatch,
                                                                       capsys):
    from tractrain.bin.compose import check_options
    from tractrain.bin.options import defaults
    from tractrain.bin.train import main

    monkeypatch.delenv("COMET_API_KEY", raising=False)
    monkeypatch.setenv("COMET_CONFIG", str(tmp_path / "no.config"))
    with pytest.raises(ConfigError, match="--comet online: no Comet API key"):
        check_options({**defaults(), "comet": "online"})
    assert main(["--experiments", str(tmp_path), "--name", "x", "--comet", "maybe"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tractrain-train: error: --comet")
    assert err.endswith("--comet: 'maybe' is not one of off, offline, online, auto")
    assert "\n" not in err and not (tmp_path / "x").exists()
