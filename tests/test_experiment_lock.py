"""One writer per experiment: train/resume hold ``<exp>/.lock`` (``flock``); a second writer
gets one line naming the holder's pid; a killed holder leaves no stale lock; readers (eval,
plot-logs, load_model) need no lock."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tractrain.bin.plot_logs import main as plot_main
from tractrain.bin.resume import main as resume_main
from tractrain.bin.train import main as train_main
from tractrain.errors import ExperimentBusyError
from tractrain.experiment import ExperimentDir

ARGS = ["--max-batches-train", "2", "--max-batches-valid", "1", "--batch-size", "800",
        "--model-config", '{"hidden_size": 8}', "--device", "cpu", "--progress", "false"]
HOLD = ("import sys, time\nfrom tractrain.experiment import ExperimentDir\n"
        "lock = ExperimentDir(sys.argv[1]).lock()\nprint('locked', flush=True)\n"
        "time.sleep(300)\n")


@pytest.fixture(scope="module")
def one_epoch(phantom_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("lock")
    assert train_main(["--store", phantom_store.path, "--experiments", str(root),
                       "--name", "exp", "--max-epochs", "1", *ARGS]) == 0
    return root / "exp"


@pytest.fixture
def holder(one_epoch, tmp_path):
    """A second real process holding the lock of a copy of the experiment."""
    exp = tmp_path / "exp"
    shutil.copytree(one_epoch, exp)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(exp)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield exp, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def files(exp: Path) -> dict[str, bytes]:
    return {str(p.relative_to(exp)): p.read_bytes() for p in sorted(exp.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_a_second_writer_is_refused_with_the_holders_pid(holder, capsys):
    exp, proc = holder
    before = files(exp)
    capsys.readouterr()
    assert resume_main([str(exp), "--max-epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"pid {proc.pid}" in err and "in use" in err
    assert train_main(["--experiments", str(exp.parent), "--name", exp.name, "--force",
                       *ARGS]) == 2  # --force does not delete a running experiment
    assert f"pid {proc.pid}" in capsys.readouterr().err
    assert files(exp) == before


def test_readers_need_no_lock(holder, capsys):
    exp, _ = holder
    from tractrain import load_model

    assert load_model(exp, "checkpoint") is not None
    assert plot_main([str(exp), "--out", str(exp.parent / "plot.png")]) == 0


def test_a_killed_holder_leaves_no_stale_lock(holder):
    exp, proc = holder
    with pytest.raises(ExperimentBusyError):
        ExperimentDir(exp).lock()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (exp / ".lock").exists()  # the file stays, the lock does not
    assert resume_main([str(exp), "--max-epochs", "2"]) == 0
    assert not (exp / ".lock").exists()


def test_two_concurrent_resumes_one_trains(one_epoch, tmp_path):
    exp = tmp_path / "exp"
    shutil.copytree(one_epoch, exp)
    cmd = [sys.executable, "-m", "tractrain.bin.resume", str(exp), "--max-epochs", "3"]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (exp / ".lock").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGSTOP)  # hold the first one mid-run, lock taken
    try:
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert second.returncode == 2, second.stderr
    assert f"pid {first.pid}" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
