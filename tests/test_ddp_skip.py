"""nan_policy under DDP: 2 gloo processes on CPU, a NaN loss on rank 1 only (its gradients stay
finite, so without agreement rank 0 would step alone): both ranks skip, or stop at, the same
step, nothing hangs and the weights stay identical on both ranks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

WORLD = 2
NAN_AT = 3  # the iteration whose loss is NaN on rank 1


class Pair:
    def __init__(self, x, y) -> None:
        self.x, self.y = x, y

    def to(self, device, non_blocking=False):
        return self


def make_loss(rank: int):
    def loss_fn(model, batch):
        loss = torch.nn.functional.mse_loss(model(batch.x), batch.y)
        if rank == 1 and int(batch.x[0, 0]) == NAN_AT:  # a NaN the gradients do not see
            loss = loss + torch.tensor(float("nan"))
        return loss, int(batch.x.shape[0])
    return loss_fn


def data(rank: int, k: int = 6) -> list[Pair]:
    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for i in range(1, k + 1):
        x = torch.randn(4, 5, generator=g)
        x[0, 0] = i  # the iteration, read by the loss
        out.append(Pair(x, torch.randn(4, 2, generator=g)))
    return out


def _run(rank: int, policy: str, check_every: int | None = None) -> dict:
    from ignite.engine import Events

    from tractrain.engine.distributed import auto_model
    from tractrain.engine.trainer import NonFiniteError, TrainStep

    torch.manual_seed(0)
    model = auto_model(torch.nn.Linear(5, 2))
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), make_loss(rank),
                     nan_policy=policy, check_every=check_every)
    engine = step.create_engine()
    skipped: list[bool] = []
    engine.add_event_handler(Events.ITERATION_COMPLETED,
                             lambda e: skipped.append(bool(e.state.output.get("skipped"))))
    result: dict = {"error": None}
    try:
        engine.run(data(rank), max_epochs=1)
        result["skipped_batches"] = engine.state.metrics["skipped_batches"]
    except NonFiniteError as err:
        result["error"] = str(err)
    result["skipped"] = skipped
    result["weights"] = [p.detach().clone() for p in model.parameters()]
    return result


def _worker(local_rank: int, out: str) -> None:
    import ignite.distributed as idist

    torch.set_num_threads(1)
    rank = idist.get_rank()
    results = {"skip": _run(rank, "skip"), "stop": _run(rank, "stop"),
               "deferred": _run(rank, "stop", check_every=2)}
    torch.save(results, Path(out) / f"rank{rank}.pt")


def test_ranks_agree_to_skip_or_stop_the_same_step(tmp_path):
    done = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))

    expected = [i == NAN_AT for i in range(1, 7)]
    assert r0["skip"]["skipped"] == r1["skip"]["skipped"] == expected
    assert r0["skip"]["skipped_batches"] == r1["skip"]["skipped_batches"] == 1
    for a, b in zip(r0["skip"]["weights"], r1["skip"]["weights"], strict=True):
        assert torch.equal(a, b)

    assert "another rank" in r0["stop"]["error"] and f"iteration {NAN_AT}" in r0["stop"]["error"]
    assert "non-finite loss (nan)" in r1["stop"]["error"]
    assert len(r0["stop"]["skipped"]) == len(r1["stop"]["skipped"]) == NAN_AT - 1

    # deferred checks (every 2 iterations, as on a GPU): both stop at the same check
    assert r0["deferred"]["error"] and r1["deferred"]["error"]
    assert len(r0["deferred"]["skipped"]) == len(r1["deferred"]["skipped"]) == 3


if __name__ == "__main__":
    from tractrain.engine.distributed import run_distributed

    run_distributed(_worker, WORLD, "gloo", args=(sys.argv[1],))
