"""A torch DataLoader over a `BatchSampler`: bit-identical batches for any worker count.

Each batch is built by `load_batch` from its `BatchSpec` alone, with the RNG
``batch_rng(seed, epoch, index)``, so it does not matter which process builds it.
"""

from __future__ import annotations

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


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)  # workers run side by side; don't oversubscribe the cores


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
) -> DataLoader:
    """DataLoader yielding `Batch`es for ``sampler``'s specs.

    ``interpolate="workers"`` interpolates inputs on the CPU while loading; ``"device"``
    leaves ``batch.inputs`` empty, to be filled on the training device by
    `tractrain.data.batch.DeviceInputs` (pass it as the trainer's ``prepare_batch``).
    """
    if interpolate not in INTERPOLATE:
        raise ConfigError(f"interpolate: expected one of {INTERPOLATE}, got {interpolate!r}")
    if num_workers < 0:
        raise ConfigError(f"num_workers: expected >= 0, got {num_workers}")
    dataset = BatchDataset(store, group, augment, inputs if interpolate == "workers" else None)
    extra = {}
    if num_workers > 0:
        extra.update(persistent_workers=persistent_workers, worker_init_fn=_worker_init)
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
