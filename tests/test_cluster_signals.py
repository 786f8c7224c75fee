"""Cluster stops: SIGTERM to the whole process group (what SLURM, systemd and Kubernetes send)
of a run with DataLoader workers finishes the iteration, checkpoints, exits 143, and the
resumed run ends bit-identical to an uninterrupted one; a worker killed by SIGKILL is one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_kill_anywhere import assert_same_result, child_env

MARK_ENV = "SIGNAL_TEST_MARK"
_calls = {"train": 0}


def marking_loss(model, batch):
    """The demo loss; at training batch ``SIGNAL_TEST_AT`` it creates the file named by
    ``SIGNAL_TEST_MARK`` (the test then signals the group) and waits until the test says it
    has sent the signal (``<mark>.sent``), so that the stop lands at this very batch with the
    workers alive, however loaded the machine."""
    from tractrain.examples.next_direction import loss_fn

    if model.training:
        _calls["train"] += 1
        if (mark := os.environ.get(MARK_ENV)) and _calls["train"] == int(
                os.environ.get("SIGNAL_TEST_AT", "0")):
            Path(mark).write_text(str(os.getpid()))
            deadline = time.time() + 60
            while not Path(mark + ".sent").exists() and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(0.1)
    return loss_fn(model, batch)


def args(store, experiments, workers: int) -> list[str]:
    return ["--store", str(store), "--experiments", str(experiments), "--name", "run",
            "--max-epochs", "2", "--max-batches-train", "6", "--max-batches-valid", "2",
            "--batch-size", "1000", "--model-config", '{"hidden_size": 8}', "--device", "cpu",
            "--progress", "false", "--num-workers", str(workers),
            "--loss", "test_cluster_signals:marking_loss"]


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _kill_leftovers():
    """Whatever happens, no child process group outlives its test."""
    yield
    while _started:
        proc = _started.pop()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()


def start(argv: list[str], **extra) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", *argv], env=child_env(**extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, like a job
    _started.append(proc)
    return proc


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"child ended (exit {proc.returncode}) before the mark:\n{err}")
        if time.time() > deadline:
            pytest.fail(f"no mark after {timeout} s")
        time.sleep(0.05)


def test_sigterm_to_process_group_checkpoints_and_resumes_exactly(phantom_store, tmp_path):
    from tractrain.bin.train import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the uninterrupted run, in this process (batches do not depend on the workers)
        assert main(args(phantom_store.path, tmp_path / "ref", workers=0)) == 0
    finally:
        torch.set_num_threads(threads)
    mark, exp = tmp_path / "mark", tmp_path / "exps" / "run"
    proc = start(["tractrain.bin.train", *args(phantom_store.path, tmp_path / "exps", 2)],
                 SIGNAL_TEST_MARK=str(mark), SIGNAL_TEST_AT="8")  # epoch 2, batch 2 of 6
    wait_for(mark, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # the main process and both workers
    Path(str(mark) + ".sent").touch()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.count("SIGTERM received") == 1, err
    assert "Traceback" not in err and "killed by signal" not in err, err
    assert "stopped at epoch 2, iteration 8" in err, err
    assert (exp / "checkpoint" / "state.pt").is_file()
    done = start(["tractrain.bin.resume", str(exp), "--trust-experiment"])  # its test loss
    out, err = done.communicate(timeout=60)
    assert done.returncode == 0, err
    assert_same_result(exp, tmp_path / "ref" / "run")


def test_killed_worker_is_one_line(phantom_store, tmp_path):
    mark = tmp_path / "mark"
    proc = start(["tractrain.bin.train", *args(phantom_store.path, tmp_path / "exps", 2)],
                 SIGNAL_TEST_MARK=str(mark), SIGNAL_TEST_AT="2")
    wait_for(mark, proc)
    main_pid = int(mark.read_text())
    workers = subprocess.run(["pgrep", "-P", str(main_pid)], capture_output=True, text=True)
    victim = int(workers.stdout.split()[0])
    os.kill(victim, signal.SIGKILL)
    Path(str(mark) + ".sent").touch()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "Traceback" not in err, err
    # ignite's own logger lines ("Engine run is terminating...") are issue 15 item 8's
    lines = [line for line in err.splitlines() if line.startswith("tractrain-train")]
    assert len(lines) == 1, err
    assert f"DataLoader worker (pid {victim}) is killed by signal: Killed" in lines[0], err
    assert "tractrain-resume" in lines[0] and "--num-workers" in lines[0]


@pytest.mark.parametrize("sig, status", [("SIGTERM", 143)])  # SIGUSR1 (138): the same path
def test_signal_to_the_launcher_alone_reaches_every_rank(phantom_store, tmp_path, sig, status):
    """``kill <pid>`` of a ``--nproc-per-node 2`` launcher (not its group): the launcher passes
    the signal on, every rank stops at the same iteration with a checkpoint, and the launcher
    exits with rank 0's status (128 + the signal)."""
    mark, exp = tmp_path / "mark", tmp_path / "exps" / "run"
    proc = start(["tractrain.bin.train", *args(phantom_store.path, tmp_path / "exps", 0),
                  "--nproc-per-node", "2"], SIGNAL_TEST_MARK=str(mark), SIGNAL_TEST_AT="5")
    wait_for(mark, proc, timeout=120)
    os.kill(proc.pid, getattr(signal, sig))  # the launcher only
    Path(str(mark) + ".sent").touch()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    assert err.count(f"{sig} received") == 2, err  # each rank, once
    assert "Traceback" not in err, err
    meta = json.loads((exp / "checkpoint" / "meta.json").read_text())
    assert (meta["epoch"], meta["iteration"]) == (2, 5), meta  # mid-epoch 2, agreed
