"""Data-parallel training helpers around ``ignite.distributed`` (``idist``).

A distributed run is N processes (ranks) in one process group, started by `run_distributed`
(``idist.Parallel``: spawned here, or joined when launched by ``torchrun``), backend ``gloo``
on CPU, ``nccl`` on GPUs. Each rank reads its own shard of every epoch
(``BatchSampler(..., rank, world_size, drop_uneven=True)``), DDP (`auto_model`) averages the
gradients, and the epoch losses are reduced over ranks (`all_reduce_sum`). Only rank 0
reads or writes the experiment folder (`is_main`): what the other ranks need from it (the
outcome of preparing it, the checkpoint to resume) is broadcast (`agree`, `from_main`), so the
folder need not be on a filesystem every node shares. ``timeout`` bounds the rendezvous and
every collective (`process_group`); `lost_peer` turns a collective that failed because a peer
died or froze into one line. With one process nothing here changes anything: every helper is
the identity and no process group is created.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import re
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ignite.distributed as idist
import torch

from tractrain.errors import CheckpointError, ConfigError, TractrainError

BACKENDS = ("gloo", "nccl")
DEFAULT_TIMEOUT_S = 600.0


def get_rank() -> int:
    """This process's rank (0 when not distributed)."""
    return idist.get_rank()


def get_world_size() -> int:
    """Number of processes in the run (1 when not distributed)."""
    return idist.get_world_size()


def local_rank() -> int:
    """Rank of this process on its node (0 without distribution): its GPU index."""
    return int(idist.get_local_rank())


def is_main() -> bool:
    """True on the rank that writes files, prints and logs (rank 0)."""
    return idist.get_rank() == 0


def is_distributed() -> bool:
    return idist.get_world_size() > 1


def default_backend(device: str | torch.device = "cpu") -> str:
    """``nccl`` for a CUDA device, ``gloo`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def launched_by_torchrun() -> bool:
    """True in a process started by ``torchrun`` (or another ``env://`` launcher) with
    several ranks."""
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) and int(
        os.environ["WORLD_SIZE"]
    ) > 1


def free_port() -> int:
    """A TCP port free on this machine right now (for the process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_distributed(
    fn: Callable[..., Any],
    nproc: int = 1,
    backend: str | None = None,
    *,
    args: Sequence = (),
    kwargs: dict | None = None,
    init_method: str | None = None,
    start_method: str = "spawn",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Run ``fn(local_rank, *args, **kwargs)`` on every rank of a process group.

    Under ``torchrun`` the processes already exist: this joins the group (``nproc`` is
    ignored). Otherwise ``nproc == 1`` calls ``fn(0, ...)`` here without any process group,
    and ``nproc > 1`` spawns that many processes (``fn`` and its arguments must pickle) on a
    free local port, or ``init_method`` (e.g. ``file:///tmp/x``). Raises when a rank fails.
    ``start_method="fork"`` starts faster (CPU only: never fork a process that used CUDA).
    ``timeout_s`` bounds the rendezvous and every collective (`process_group`).

    Args:
        backend: ``gloo`` or ``nccl``; default `default_backend` of the visible devices.
    """
    kwargs = dict(kwargs or {})
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"nproc_per_node: expected an integer >= 1, got {nproc!r}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in BACKENDS:
        raise ConfigError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "nccl" and not launched_by_torchrun() and nproc > torch.cuda.device_count():
        raise ConfigError(f"nproc_per_node: {nproc} processes on nccl need as many GPUs, "
                          f"this machine has {torch.cuda.device_count()}")
    if launched_by_torchrun():
        with process_group(backend, timeout_s):
            fn(local_rank(), *args, **kwargs)
        return
    if nproc == 1:
        fn(0, *args, **kwargs)
        return
    spawn: dict[str, Any] = {"nproc_per_node": nproc, "start_method": start_method,
                             "timeout": datetime.timedelta(seconds=timeout_s)}
    if init_method is not None:
        spawn["init_method"] = init_method
    else:
        spawn["master_port"] = free_port()
    with idist.Parallel(backend=backend, **spawn) as parallel, forward_signals():
        parallel.run(fn, *args, **kwargs)


FORWARDED = ("SIGTERM", "SIGUSR1")  # SIGINT: a terminal's Ctrl-C reaches every process


@contextlib.contextmanager
def forward_signals(names: Sequence[str] = FORWARDED) -> Iterator[None]:
    """While the ``with`` block waits for spawned ranks: a SIGTERM or SIGUSR1 sent to this
    launcher alone (``kill <pid>``) is passed on to them, instead of killing it and leaving
    them to stop without it; each rank checkpoints and stops as if signalled itself (one
    received twice, also directly, is harmless). Main thread only."""
    import multiprocessing
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, frame) -> None:
        for child in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)

    sigs = [getattr(signal, name) for name in names if hasattr(signal, name)]
    previous = {sig: signal.signal(sig, forward) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def process_group(backend: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[None]:
    """Join the process group of a ``torchrun`` launch (``env://``) for the ``with`` block.

    ``timeout_s`` is ``init_process_group``'s timeout: it bounds the rendezvous and, on gloo,
    every collective, so a dead or frozen peer ends the others (`lost_peer`) instead of
    blocking them for torch's default 30 minutes. Already in a group: nothing changes."""
    if is_distributed() or not launched_by_torchrun():
        yield
        return
    if not timeout_s > 0:
        raise ConfigError(f"--dist-timeout: expected a positive number of seconds, got "
                          f"{timeout_s}")
    idist.initialize(backend, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        idist.finalize()


_RANK_IN_MESSAGE = re.compile(r"\brank (\d+)\b", re.IGNORECASE)
_PEER_FAILURE = re.compile(r"gloo|nccl|timed out|timeout|connection (closed|reset|refused)|"
                           r"broken pipe|socket|peer", re.IGNORECASE)


def lost_peer(error: BaseException) -> str | None:
    """One line for a collective that failed because a peer rank died, froze or lost the
    network (None for any other error, and outside a distributed run).

    Names the lost rank when it is knowable: the other one of two ranks, or a rank the
    error names; "a peer rank" otherwise."""
    if not is_distributed() or isinstance(error, TractrainError):
        return None
    dist_error = getattr(torch.distributed, "DistError", ())
    if not isinstance(error, dist_error) and not (
            isinstance(error, RuntimeError) and _PEER_FAILURE.search(str(error))):
        return None
    me, world = get_rank(), get_world_size()
    named = [int(r) for r in _RANK_IN_MESSAGE.findall(str(error)) if int(r) != me]
    if world == 2:
        peer = f"rank {1 - me}"
    elif named and named[0] < world:
        peer = f"rank {named[0]}"
    else:
        peer = "a peer rank"
    what = "timed out" if re.search(r"timed out|timeout", str(error), re.IGNORECASE) \
        else "failed"
    return (f"rank {me}: lost {peer} (a collective {what}: the process died, froze or lost "
            "the network); the last checkpoint is intact: continue with tractrain-resume")


def _portable(error: BaseException, rank: int) -> BaseException:
    """``error`` as it can travel to the other ranks (pickled), its message prefixed with
    ``rank N:`` when ``rank`` is not 0 (rank 0 owns the experiment: its errors are everyone's).
    """
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        message = f"{error.filename}: {error.strerror.lower()}"
    if rank:
        message = f"rank {rank}: {message}"
    try:
        copy = type(error)(message) if rank or isinstance(error, OSError) else error
        pickle.loads(pickle.dumps(copy))
        return copy
    except Exception:  # an exception type that does not rebuild from its message
        return TractrainError(message)


def agree(fn: Callable[[], Any]) -> list[Any]:
    """Every rank runs ``fn`` (each its own part: rank 0 prepares the experiment, the others
    check what they will need), then they exchange the outcomes (one collective).

    Returns ``[result of rank 0, of rank 1, ...]`` on every rank; if any rank failed, every
    rank raises the error of the lowest failing rank instead (named ``rank N:`` unless N is 0;
    chained to the original on rank N), so all of them end with the same one line.
    One process: ``[fn()]``."""
    if not is_distributed():
        return [fn()]
    rank, own = get_rank(), None
    try:
        mine: tuple = ("ok", fn())
    except BaseException as err:  # every rank must hear of it
        own, mine = err, ("error", _portable(err, rank))
    outcomes = all_gather_objects(mine)
    for source, (kind, value) in enumerate(outcomes):
        if kind == "error":
            if source == rank and own is not None:
                if rank == 0:
                    raise own
                raise value from own  # the same line as the other ranks print
            raise value
    return [value for _, value in outcomes]


def from_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` run on rank 0 only, its result (or its error) broadcast to every rank: how the
    other ranks get what only rank 0 reads (the checkpoint to resume). One process: ``fn()``.
    """
    if not is_distributed():
        return fn()
    box: list[Any] = [None]
    own = None
    if is_main():
        try:
            box[0] = ("ok", fn())
        except BaseException as err:  # broadcast, then re-raise
            own, box[0] = err, ("error", _portable(err, 0))
    torch.distributed.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise own if own is not None else value
    return value


# -- model ---------------------------------------------------------------------------------


def auto_model(model: torch.nn.Module) -> torch.nn.Module:
    """DDP-wrapped ``model`` (moved to this rank's device) in a distributed run; ``model``
    itself otherwise or when it is already wrapped."""
    if not is_distributed() or isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model
    return idist.auto_model(model)


# -- collectives (identity with one process) -------------------------------------------------


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sums of ``values`` over all ranks (float64; every rank must call it)."""
    values = [float(v) for v in values]
    if not is_distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=idist.device())
    return [float(x) for x in idist.all_reduce(tensor).cpu().tolist()]


def all_reduce_mean(value: float, weight: float = 1.0) -> float:
    """Weighted mean ``sum(value * weight) / sum(weight)`` over ranks (NaN if no weight)."""
    total, count = all_reduce_sum([float(value) * float(weight), float(weight)])
    return total / count if count else float("nan")


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    return all_reduce_sum([1.0 if flag else 0.0])[0] > 0


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (pickled; every rank must call it)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


class PerRank:
    """Checkpoint one object's state per rank (e.g. RNGs, partial epoch sums differ by rank).

    ``state_dict()`` gathers every rank's ``obj.state_dict()`` (a collective: call it on all
    ranks) into ``{"world_size", "ranks": [...]}``; ``load_state_dict`` gives each rank its own
    entry back. Resuming needs the same number of processes.
    """

    def __init__(self, obj: Any, name: str = "state") -> None:
        self.obj, self.name = obj, name

    def state_dict(self) -> dict:
        return {"world_size": get_world_size(), "ranks": all_gather_objects(self.obj.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        world = get_world_size()
        if not isinstance(state, dict) or "ranks" not in state:
            raise CheckpointError(f"{self.name}: the checkpoint was written by a single-process "
                                  f"run; resume it with 1 process, not {world}")
        if int(state["world_size"]) != world:
            raise CheckpointError(f"{self.name}: the checkpoint was written by "
                                  f"{state['world_size']} processes; resume it with as many, "
                                  f"not {world}")
        self.obj.load_state_dict(state["ranks"][get_rank()])
