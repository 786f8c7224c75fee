"""Two nodes on localhost under torchrun (two ``torchrun --nnodes 2 --node-rank 0|1`` launches,
separate HOMEs, one shared experiments folder, gloo on CPU): ``--force`` from both nodes,
SIGTERM to a launcher (checkpoint, workers exit 143), resume from both nodes, and the result
bit-identical to a single ``torchrun --standalone --nproc-per-node 2`` run; a frozen peer
(slow) ends the survivor within ``--dist-timeout`` with one line, checkpoint intact.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_cluster_signals import wait_for
from test_kill_anywhere import assert_same_result, child_env

from tractrain.engine.distributed import free_port

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
STOP_AT = 5  # epoch 2, iteration 2 of 3 per rank


def args(store, experiments, *extra: str) -> list[str]:
    return ["--store", str(store), "--experiments", str(experiments), "--name", "run",
            "--max-epochs", "2", "--max-batches-train", "6", "--max-batches-valid", "2",
            "--batch-size", "1500", "--model-config", '{"hidden_size": 8}', "--device", "cpu",
            "--progress", "false", "--loss", "test_cluster_signals:marking_loss", *extra]


_started: list[subprocess.Popen] = []
_workers: list[int] = []  # pids of workers to kill at the end (torchrun starts them apart)


def _kill(pid: int, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(autouse=True)
def _kill_leftovers():
    """Whatever happens, no launcher or worker outlives its test (a worker holds its
    launcher's pipes: it is killed too, frozen or not)."""
    yield
    while _workers:
        _kill(_workers.pop())
    while _started:
        proc = _started.pop()
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                  text=True).stdout.split()
        for pid in children:
            _kill(int(pid))
        _kill(proc.pid, group=True)
        proc.communicate()


def launch(launcher: list[str], argv: list[str], home: Path, cwd: Path | None = None,
           **env) -> subprocess.Popen:
    home.mkdir(exist_ok=True)
    proc = subprocess.Popen([*TORCHRUN, *launcher, *argv], env=child_env(HOME=str(home), **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=cwd)
    _started.append(proc)
    return proc


def two_nodes(module: str, argv: list[str], tmp: Path, env0=None, env1=None, apart=False):
    """Node 0 and node 1 of one run (each its own HOME), started together; ``apart``: each
    in its own working folder (``tmp/home<rank>``), so that a relative path is a folder the
    other node does not see."""
    port = str(free_port())
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
              "--master-port", port, "--max-restarts", "0"]
    return [launch([*common, "--node-rank", str(rank), "-m", module], argv,
                   tmp / f"home{rank}", cwd=tmp / f"home{rank}" if apart else None, **(env or {}))
            for rank, env in ((0, env0), (1, env1))]


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def worker_lines(err: str) -> list[str]:
    """The lines tractrain's workers wrote to stderr (not torchrun's own report)."""
    return [line for line in err.splitlines() if line.startswith("tractrain-")]


def test_two_nodes_force_stop_and_resume_match_a_single_node_run(phantom_store, tmp_path):
    exps = tmp_path / "shared"
    reference = launch(["--standalone", "--nproc-per-node", "2", "-m", "tractrain.bin.train"],
                       args(phantom_store.path, exps), tmp_path / "home")
    code, err = finish(reference)
    assert code == 0, err
    ref = tmp_path / "ref"
    shutil.copytree(exps / "run", ref)

    mark = tmp_path / "mark"  # node 0's worker waits at training batch STOP_AT
    nodes = two_nodes("tractrain.bin.train", args(phantom_store.path, exps, "--force"),
                      tmp_path, env0={"SIGNAL_TEST_MARK": str(mark),
                                      "SIGNAL_TEST_AT": str(STOP_AT)})
    wait_for(mark, nodes[0], timeout=180)
    nodes[0].send_signal(signal.SIGTERM)  # to the launcher: torchrun forwards it
    Path(str(mark) + ".sent").touch()
    (code0, err0), (code1, err1) = finish(nodes[0]), finish(nodes[1])
    assert code0 != 0 and code1 != 0  # torchrun reports its stopped workers as a failure
    assert f"stopped at epoch 2, iteration {STOP_AT}" in err0, err0
    assert "exitcode  : 143" in err1, err1  # node 1's worker: the agreed stop
    for err in (err0, err1):
        assert "[rank0]:" not in err and "[rank1]:" not in err, err  # no worker traceback
    meta = (exps / "run" / "checkpoint" / "meta.json").read_text()
    assert f'"iteration": {STOP_AT}' in meta  # --force replaced the reference's run

    resume = ["--trust-experiment", str(exps / "run")]
    nodes = two_nodes("tractrain.bin.resume", resume, tmp_path)
    (code0, err0), (code1, err1) = finish(nodes[0]), finish(nodes[1])
    assert code0 == 0 and code1 == 0, err0 + err1
    assert_same_result(exps / "run", ref)
    state = torch.load(exps / "run" / "checkpoint" / "state.pt", weights_only=True)
    assert state["rng"]["world_size"] == 2 and state["position"]["epoch"] == 2


@pytest.mark.slow
def test_an_existing_experiment_is_one_line_on_both_nodes(phantom_store, tmp_path):
    """Without --force, node 0 refuses the existing folder and node 1 says the same."""
    exps = tmp_path / "shared"
    (exps / "run").mkdir(parents=True)
    (exps / "run" / "keep.txt").write_text("mine")
    nodes = two_nodes("tractrain.bin.train", args(phantom_store.path, exps), tmp_path)
    for proc in nodes:
        code, err = finish(proc)
        assert code != 0, err
        lines = worker_lines(err)
        assert lines == [f"tractrain-train: error: {exps / 'run'}: experiment exists; continue "
                         f"it with 'tractrain-resume {exps / 'run'}' or start over with --force"]
    assert (exps / "run" / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_a_frozen_peer_ends_the_survivor_within_the_timeout(phantom_store, tmp_path):
    exps, mark, timeout = tmp_path / "shared", tmp_path / "mark", 15
    nodes = two_nodes("tractrain.bin.train",
                      args(phantom_store.path, exps, "--dist-timeout", str(timeout)), tmp_path,
                      env1={"SIGNAL_TEST_MARK": str(mark), "SIGNAL_TEST_AT": str(STOP_AT)})
    wait_for(mark, nodes[1], timeout=180)
    before = (exps / "run" / "checkpoint" / "state.pt").read_bytes()  # of epoch 1
    _workers.append(int(mark.read_text()))
    os.kill(_workers[-1], signal.SIGSTOP)  # node 1's worker freezes
    Path(str(mark) + ".sent").touch()
    start = time.monotonic()
    code, err = finish(nodes[0], timeout=timeout + 120)
    waited = time.monotonic() - start
    assert code != 0
    assert waited < timeout + 60, waited
    lines = worker_lines(err)
    assert len(lines) == 1 and lines[0].startswith(
        "tractrain-train: error: rank 0: lost rank 1 (a collective timed out"), err
    assert "[rank0]:" not in err, err
    assert (exps / "run" / "checkpoint" / "state.pt").read_bytes() == before


@pytest.mark.slow
def test_without_a_shared_experiments_folder_rank_zero_sends_what_a_resume_needs(
        phantom_store, tmp_path):
    """``--experiments exps`` is a different folder on each node: only node 0's is written;
    node 1 resumes from what rank 0 broadcasts (config, checkpoint)."""
    first = args(phantom_store.path, "exps", "--max-epochs", "1")
    for proc in two_nodes("tractrain.bin.train", first, tmp_path, apart=True):
        code, err = finish(proc)
        assert code == 0, err
    assert not (tmp_path / "home1" / "exps").exists()
    resume = ["exps/run", "--trust-experiment", "--max-epochs", "2"]
    for proc in two_nodes("tractrain.bin.resume", resume, tmp_path, apart=True):
        code, err = finish(proc)
        assert code == 0, err
    assert not (tmp_path / "home1" / "exps").exists()
    state = torch.load(tmp_path / "home0" / "exps" / "run" / "checkpoint" / "state.pt",
                       weights_only=True)
    assert state["position"]["epoch"] == 2


def test_resume_auto_under_torchrun_continues_a_stopped_run(phantom_store, tmp_path):
    """The one sbatch command re-run after a stop (SIGTERM, requeue): rank 0 finds the
    started experiment and every rank continues it from its checkpoint."""
    exps = tmp_path / "shared"
    command = ["--standalone", "--nproc-per-node", "2", "-m", "tractrain.bin.train"]
    argv = args(phantom_store.path, exps, "--resume", "auto", "--log-every", "1")
    mark = tmp_path / "mark"
    first = launch(command, argv, tmp_path / "home", SIGNAL_TEST_MARK=str(mark),
                   SIGNAL_TEST_AT=str(STOP_AT))
    wait_for(mark, first, timeout=180)
    first.send_signal(signal.SIGTERM)
    Path(str(mark) + ".sent").touch()
    code, err = finish(first)
    assert code != 0 and f"stopped at epoch 2, iteration {STOP_AT}" in err, err

    again = launch(command, argv, tmp_path / "home")
    out, err = again.communicate(timeout=240)
    assert again.returncode == 0, err
    assert "exists: continuing it, --resume auto" in out, out + err
    state = torch.load(exps / "run" / "checkpoint" / "state.pt", weights_only=True)
    assert state["position"]["epoch"] == 2 and state["rng"]["world_size"] == 2
    rows = (exps / "run" / "logs" / "iterations.csv").read_text().splitlines()[1:]
    iterations = [int(row.split(",")[0]) for row in rows]
    assert iterations == list(range(1, iterations[-1] + 1)), rows  # continued: each once
