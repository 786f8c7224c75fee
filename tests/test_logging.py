"""The ``tractrain`` logger on a run with no terminal (stderr a pipe): a line per epoch,
resume, early stop, ``-q`` and ``-v``."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

TINY = ["--max-batches-train", "3", "--max-batches-valid", "1", "--batch-size", "800",
        "--model-config", '{"hidden_size": 8}', "--progress", "false"]
EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+)  train_loss ", re.M)


def cli(module: str, *args) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", f"tractrain.bin.{module}", *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture
def train(phantom_store, tmp_path):
    def run(name: str, *args) -> tuple[subprocess.CompletedProcess, object]:
        exps = tmp_path / "exps"
        return cli("train", "--store", phantom_store.path, "--experiments", exps, *TINY,
                   "--name", name, *args), exps / name
    return run


def epochs(stderr: str) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in EPOCH_LINE.findall(stderr)]


def test_one_line_per_epoch_then_resumed(train):
    done, exp = train("a", "--max-epochs", "2")
    assert epochs(done.stderr) == [(1, 2), (2, 2)], done.stderr
    first = done.stderr.splitlines()[[i for i, line in enumerate(done.stderr.splitlines())
                                      if line.startswith("epoch 1/2")][0]]
    assert "valid_loss" in first and "(best)" in first and " s  data wait " in first, first
    assert "lr " in first and "grad_norm " in first
    resumed = cli("resume", exp, "--max-epochs", "3")
    assert "resumed from epoch 2, iteration 6" in resumed.stderr, resumed.stderr
    assert epochs(resumed.stderr) == [(3, 3)], resumed.stderr


def test_early_stop_is_logged(train):
    done, _ = train("b", "--max-epochs", "4", "--patience", "1", "--min-delta", "1e9")
    assert epochs(done.stderr) == [(1, 4), (2, 4)], done.stderr
    assert "patience 0/1" in done.stderr and "patience 1/1" in done.stderr
    stop = [line for line in done.stderr.splitlines() if line.startswith("early stop")]
    assert len(stop) == 1 and "at epoch 2: patience exhausted" in stop[0], done.stderr


def test_quiet_has_no_epoch_lines(train):
    done, _ = train("c", "--max-epochs", "1", "-q")
    assert epochs(done.stderr) == [] and "iteration" not in done.stderr, done.stderr


def test_verbose_logs_iterations(train):
    done, _ = train("d", "--max-epochs", "1", "-v", "--log-every", "2")
    lines = re.findall(r"^epoch 1/1  iteration (\d+)  loss \S+$", done.stderr, re.M)
    assert lines == ["2"], done.stderr
    assert epochs(done.stderr) == [(1, 1)]
