"""A torch DataLoader over a `BatchSampler`: bit-identical batches for any worker count.

Each batch is built by `load_batch` from its `BatchSpec` alone, with the RNG
``batch_rng(seed, epoch, index)``, so it does not matter which process builds it.

Workers ignore SIGINT, SIGUSR1 (SLURM's time-limit warning) and SIGTERM from anyone but the
main process: a signal sent to the whole process group (Ctrl-C, SLURM, systemd, Kubernetes) is
handled by the main process alone,
which finishes the current iteration, writes a checkpoint and then shuts the workers down
(multiprocessing terminates them with SIGTERM at exit, which they obey).
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from tractrain.data.augment import AugmentConfig
from tractrain.data.batch import load_batch
from tractrain.data.interpolation import InputConfig
from tractrain.data.sampler import BatchSampler, BatchSpec
from tractrain.errors import ConfigError

INTERPOLATE = ("workers", "device")


class BatchDataset(Dataset):
    """Map-style dataset whose keys are `BatchSpec`s (yielded by a `BatchSampler`)."""

    def __init__(self, store, group: str, augment: AugmentConfig | None = None,
                 inputs: InputConfig | None = None) -> None:
        self.store, self.group, self.augment, self.inputs = store, group, augment, inputs

    def __getitem__(self, spec: BatchSpec):
        rng = spec.rng() if self.augment is not None and self.augment.is_random else None
        return load_batch(self.store, spec.ids, group=self.group, augment=self.augment,
                          rng=rng, inputs=self.inputs, epoch=spec.epoch, index=spec.index)


def _identity(batch):
    return batch


def _sigterm_only_from(parents: set[int]) -> None:
    """Block SIGTERM in this thread; a daemon thread takes each one: sent by one of
    ``parents`` (multiprocessing terminating its workers at exit) the worker exits at once
    with status 0 (dying by the signal would make torch report a killed worker), from anyone
    else it is dropped."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid not in parents:
            pass
        os._exit(0)

    threading.Thread(target=wait, name="sigterm-from-parent", daemon=True).start()


def _worker_init(worker_id: int, user_init: Callable[[int], None] | None = None) -> None:
    """Ignore SIGINT, SIGUSR1, and SIGTERM not sent by the main process (it owns shutdown);
    use one torch thread; then call ``user_init(worker_id)`` if given."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    _sigterm_only_from({os.getppid()} | ({parent.pid} if parent is not None else set()))
    torch.set_num_threads(1)  # workers run side by side; don't oversubscribe the cores
    if user_init is not None:
        user_init(worker_id)


def make_dataloader(
    store,
    sampler: BatchSampler,
    *,
    group: str,
    augment: AugmentConfig | None = None,
    inputs: InputConfig | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    interpolate: str = "workers",
    prefetch_factor: int | None = None,
    worker_init_fn: Callable[[int], None] | None = None,
) -> DataLoader:
    """DataLoader yielding `Batch`es for ``sampler``'s specs.

    ``interpolate="workers"`` interpolates inputs on the CPU while loading; ``"device"``
    leaves ``batch.inputs`` empty, to be filled on the training device by
    `tractrain.data.batch.DeviceInputs` (pass it as the trainer's ``prepare_batch``).
    Workers ignore SIGINT/SIGTERM, then run ``worker_init_fn(worker_id)`` if given.
    """
    if interpolate not in INTERPOLATE:
        raise ConfigError(f"interpolate: expected one of {INTERPOLATE}, got {interpolate!r}")
    if num_workers < 0:
        raise ConfigError(f"num_workers: expected >= 0, got {num_workers}")
    dataset = BatchDataset(store, group, augment, inputs if interpolate == "workers" else None)
    extra = {}
    if num_workers > 0:
        init = functools.partial(_worker_init, user_init=worker_init_fn)
        extra.update(persistent_workers=persistent_workers, worker_init_fn=init)
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,
        collate_fn=_identity,
        num_workers=num_workers,
        pin_memory=pin_memory,
        # a private generator: creating an iterator must not consume the global torch RNG
        generator=torch.Generator().manual_seed(0),
        **extra,
    )
