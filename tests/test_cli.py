"""End to end through subprocesses: train, interrupt, resume, plot; bad input is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tractrain.experiment import read_logs

PY = [sys.executable, "-m"]
SMALL = ["--max-batches-train", "6", "--max-batches-valid", "2", "--batch-size", "1500",
         "--progress", "false"]


def cli(module, *args, cwd=None, timeout=300):
    return subprocess.run([*PY, f"tractrain.bin.{module}", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout)


def assert_one_line_error(done, *fragments):
    assert done.returncode == 2, done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def base(phantom_store, tmp_path):
    return ["--store", phantom_store.path, "--experiments", tmp_path / "exps", *SMALL]


def test_train_interrupt_resume_and_plot(base, tmp_path):
    exp = tmp_path / "exps" / "run"
    proc = subprocess.Popen([*PY, "tractrain.bin.train", *map(str, base), "--name", "run",
                             "--max-epochs", "4", "--checkpoint-every", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (exp / "logs" / "train_loss.npy").exists() and proc.poll() is None:
        assert time.time() < deadline, "first epoch never finished"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    assert "checkpoint written" in err and f"tractrain-resume {exp}" in err
    done_before = len(read_logs(exp)["train_loss"])
    assert 1 <= done_before < 4

    resumed = cli("resume", exp)
    assert resumed.returncode == 0, resumed.stderr
    assert "best model:" in resumed.stdout and "plot:" in resumed.stdout
    logs = read_logs(exp)
    assert len(logs["train_loss"]) == 4 and len(logs["valid_loss"]) == 4
    assert (exp / "best_model" / "model.pt").exists() and (exp / "best_epoch.json").exists()

    again = cli("resume", exp)
    assert_one_line_error(again, "already trained 4 epochs")
    extended = cli("resume", exp, "--max-epochs", "5")
    assert extended.returncode == 0, extended.stderr
    assert len(read_logs(exp)["train_loss"]) == 5
    assert json.loads((exp / "config.json").read_text())["max_epochs"] == 5

    png, table = tmp_path / "plot.png", tmp_path / "table.csv"
    plotted = subprocess.run([*PY, "tractrain.bin.plot_logs", str(exp), "--out", str(png),
                              "--csv", str(table)], capture_output=True, text=True)
    assert plotted.returncode == 0, plotted.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line.split(",") for line in table.read_text().strip().splitlines()]
    header = rows[0]
    column = [float(r[header.index("valid_loss")]) for r in rows[1:]]
    np.testing.assert_allclose(column, read_logs(exp)["valid_loss"])


def test_bad_input_is_one_line_exit_2_and_writes_nothing(base, tmp_path):
    exps = tmp_path / "exps"
    assert_one_line_error(cli("train", *base, "--max-epoch", "3"),
                          "unknown flag --max-epoch", "--max-epochs")
    config = tmp_path / "config.yaml"
    config.write_text("batchsize: 100\n")
    assert_one_line_error(cli("train", config, *base), "unknown option 'batchsize'",
                          "batch_size")
    assert_one_line_error(cli("train", *base, "--model", "no_such_pkg.mod:make"),
                          "--model", "cannot import")
    assert_one_line_error(cli("train", *base, "--model", "tractrain.errors:__doc__"),
                          "is not callable")
    assert_one_line_error(cli("train", *base[2:], "--store", tmp_path / "missing.zarr"),
                          "missing.zarr", "no such store")
    assert not exps.exists() or not any(exps.iterdir())
    (exps / "taken").mkdir(parents=True)
    (exps / "taken" / "notes.txt").write_text("keep me")
    assert_one_line_error(cli("train", *base, "--name", "taken"), "experiment exists",
                          "tractrain-resume")
    assert (exps / "taken" / "notes.txt").read_text() == "keep me"
    assert_one_line_error(cli("resume", exps / "taken"), "not a tractrain experiment")
    assert_one_line_error(cli("resume", tmp_path / "nowhere"), "no such experiment")
    debug = cli("train", *base, "--model", "no_such_pkg.mod:make", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_help_lists_every_option():
    from tractrain.bin.options import OPTIONS

    text = cli("train", "--help").stdout
    for name in OPTIONS:
        assert "--" + name.replace("_", "-") in text, name
    for module in ("resume", "plot_logs", "build_store", "make_phantom"):
        done = cli(module, "--help")
        assert done.returncode == 0 and "usage" in done.stdout


@pytest.mark.skipif(os.environ.get("TRACTRAIN_SKIP_DEMO") == "1", reason="demo disabled")
def test_demo_defaults_run_and_validation_loss_falls(tmp_path):
    """The no-argument demo's exact code path, shortened to 2 epochs of 8 batches."""
    done = cli("train", "--experiments", tmp_path, "--cache-dir", tmp_path / "cache",
               "--max-epochs", "2", "--max-batches-train", "8", "--progress", "false",
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    exp = tmp_path / "demo"
    for line in ("checkpoint:", "best model:", "logs:", "plot:"):
        assert line in done.stdout
    valid = read_logs(exp)["valid_loss"]
    assert valid[-1] < valid[0]


def test_two_process_training_and_resume_from_the_command_line(base, tmp_path):
    exp = tmp_path / "exps" / "ddp"
    first = cli("train", *base, "--name", "ddp", "--max-epochs", "1", "--nproc-per-node", "2")
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("best model:") == 1  # rank 0 reports, once
    # the launcher's log is tractrain's: not ignite's spawn parameters, at INFO, on stderr
    assert "ignite.distributed" not in first.stderr, first.stderr
    resumed = cli("resume", exp, "--max-epochs", "2")
    assert resumed.returncode == 0, resumed.stderr
    logs = read_logs(exp)
    assert len(logs["train_loss"]) == 2 and np.isfinite(logs["valid_loss"]).all()
