"""What a torchrun launch relies on, checked fast with 2 forked gloo processes: an error while
rank 0 prepares the experiment (or on another rank) ends every rank with the same one line;
what rank 0 alone reads reaches every rank; a frozen peer ends the survivor within
``--dist-timeout`` with one line naming it; SIGTERM to one rank stops both at one iteration.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import ignite.distributed as idist
import pytest
import torch
from ignite.engine import Engine

from tractrain.engine import distributed
from tractrain.errors import ConfigError
from tractrain.hooks.signals import GracefulStop

TIMEOUT_S = 3.0


def _outcome(fn) -> tuple[str, str]:
    try:
        return "ok", repr(fn())
    except BaseException as err:
        return type(err).__name__, str(err)


def _fail_on(rank: int, error: BaseException):
    def fn():
        if distributed.get_rank() == rank:
            raise error
        return distributed.get_rank() * 10
    return fn


class _Saves:
    """A stand-in checkpoint: records the iteration of every save."""

    path = Path("checkpoint")

    def __init__(self) -> None:
        self.saved: list[int] = []
        self.saved_iteration: int | None = None

    def save(self, trainer) -> Path:
        self.saved.append(trainer.state.iteration)
        self.saved_iteration = trainer.state.iteration
        return self.path


def _signal_run(rank: int) -> dict:
    """Rank 1 gets SIGTERM during iteration 7 (epoch 2); both check every 3 iterations."""
    saves = _Saves()
    stop = GracefulStop(saves, check_every=3)

    def step(engine, batch):
        if rank == 1 and engine.state.iteration == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    trainer = Engine(step)
    stop.attach(trainer)
    trainer.run(list(range(5)), max_epochs=3)
    return {"saved": saves.saved, "iteration": trainer.state.iteration,
            "stopped": getattr(trainer.state, "stopped_by_signal", None)}


def _worker(local_rank: int, out: str) -> None:
    rank = distributed.get_rank()
    result = {
        "main_error": _outcome(lambda: distributed.agree(
            _fail_on(0, FileExistsError("/x/run: experiment exists")))),
        "other_error": _outcome(lambda: distributed.agree(
            _fail_on(1, ConfigError("--store /s: no such store")))),
        "os_error": _outcome(lambda: distributed.agree(
            _fail_on(1, FileNotFoundError(2, "No such file", "/s")))),
        "ok": _outcome(lambda: distributed.agree(_fail_on(5, ValueError()))),
        "from_main": _outcome(lambda: distributed.from_main(
            lambda: {"rank": distributed.get_rank(), "t": torch.arange(3)})),
        "from_main_error": _outcome(lambda: distributed.from_main(
            _fail_on(0, ConfigError("bad")))),
    }
    result["signals"] = _signal_run(rank)
    pids = distributed.all_gather_objects(os.getpid())
    if rank == 1:  # freeze: rank 0's next collective must time out
        torch.save(result, Path(out) / f"rank{rank}.pt")
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    time.sleep(0.5)
    start = time.monotonic()
    try:
        idist.all_reduce(1.0)
        result["lost"] = None
    except RuntimeError as err:
        result["lost"] = distributed.lost_peer(err)
    result["waited"] = time.monotonic() - start
    os.kill(pids[1], signal.SIGKILL)  # the frozen peer: ends so that the launcher returns
    torch.save(result, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("agree")
    try:
        distributed.run_distributed(_worker, 2, "gloo", args=(str(out),), start_method="fork",
                                    timeout_s=TIMEOUT_S)
    except Exception:  # rank 1 was killed on purpose; its results are saved
        pass
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_an_error_preparing_on_rank_zero_is_every_ranks_one_line(ranks):
    for res in ranks:
        assert res["main_error"] == ("FileExistsError", "/x/run: experiment exists")
        assert res["from_main_error"] == ("ConfigError", "bad")


def test_an_error_on_another_rank_names_it_on_every_rank(ranks):
    for res in ranks:
        assert res["other_error"] == ("ConfigError", "rank 1: --store /s: no such store")
    for res in ranks:
        assert res["os_error"] == ("FileNotFoundError", "rank 1: /s: no such file")
    for res in ranks:
        assert res["ok"] == ("ok", "[0, 10]")


def test_what_rank_zero_reads_reaches_every_rank(ranks):
    for res in ranks:
        assert res["from_main"] == ("ok", "{'rank': 0, 't': tensor([0, 1, 2])}")


def test_sigterm_to_one_rank_stops_both_at_the_same_checked_iteration(ranks):
    for res in ranks:  # the signal came during iteration 7: agreed at the check of 9
        assert res["signals"] == {"saved": [9], "iteration": 9, "stopped": "SIGTERM"}


def test_a_frozen_peer_ends_the_survivor_within_the_timeout_with_one_line(ranks):
    lost, waited = ranks[0]["lost"], ranks[0]["waited"]
    assert lost is not None and "\n" not in lost
    assert lost.startswith("rank 0: lost rank 1 (a collective timed out"), lost
    assert "tractrain-resume" in lost
    assert TIMEOUT_S - 0.5 <= waited < TIMEOUT_S + 10, waited


def test_lost_peer_ignores_errors_outside_a_distributed_run():
    assert distributed.lost_peer(RuntimeError("Connection closed by peer")) is None


def test_process_group_outside_torchrun_changes_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed.process_group("gloo", 1.0):
        assert not distributed.is_distributed()
    assert distributed.agree(lambda: 3) == [3] and distributed.from_main(lambda: 4) == 4
