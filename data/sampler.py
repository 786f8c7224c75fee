"""The batch sampler: `BatchSampler`, a resumable iterator of `BatchSpec` over epochs, for a
torch ``DataLoader(sampler=..., batch_size=None)``.

Each epoch's batches come from the pure `tractrain.data.packing.epoch_batches`; the sampler
only keeps the position (epoch, start) and saves/restores it with ``state_dict()``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from tractrain.data.packing import (
    BatchIds,
    SamplerConfig,
    batch_rng,
    check_epoch_args,
    check_int,
    epoch_batches,
)
from tractrain.data.split_index import SplitIndex
from tractrain.errors import ConfigError


@dataclass(frozen=True, eq=False)
class BatchSpec:
    """What a DataLoader worker receives: one batch of ids and what seeds its augmentation.

    ``index`` is the batch's global position in the epoch (unique across ranks). Equality
    compares ids by value; the hash uses ``(epoch, index, seed)``."""

    epoch: int
    index: int
    seed: int
    ids: tuple[tuple[str, np.ndarray], ...]

    def rng(self) -> np.random.Generator:
        """``batch_rng(seed, epoch, index)``."""
        return batch_rng(self.seed, self.epoch, self.index)

    @property
    def num_streamlines(self) -> int:
        return sum(int(ids.size) for _, ids in self.ids)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BatchSpec):
            return NotImplemented
        return (
            (self.epoch, self.index, self.seed) == (other.epoch, other.index, other.seed)
            and len(self.ids) == len(other.ids)
            and all(
                a == b and np.array_equal(x, y)
                for (a, x), (b, y) in zip(self.ids, other.ids, strict=True)
            )
        )

    def __hash__(self) -> int:
        return hash((self.epoch, self.index, self.seed))


class BatchSampler:
    """Resumable iterator of ``BatchSpec`` over epochs, for ``DataLoader(sampler=...,
    batch_size=None)``.

    ``iter()`` yields the current epoch's batches from position ``start`` (rank-local); after
    the epoch's last batch (or at once when there is none left) it moves itself to
    ``(epoch + 1, start=0)``. The current and last asked-for epochs' batches are cached.
    ``drop_uneven=True`` gives every rank the same number of batches, ``len(epoch) //
    world_size`` (for DDP, whose ranks must run the same number of steps)."""

    def __init__(
        self,
        index: SplitIndex,
        config: SamplerConfig,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_uneven: bool = False,
    ) -> None:
        check_epoch_args(seed, 0, rank, world_size)
        self.index = index
        self.config = config
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = bool(shuffle)
        self.drop_uneven = bool(drop_uneven)
        self.epoch = 0
        self.start = 0
        self._cache: OrderedDict[int, list[BatchIds]] = OrderedDict()

    def batches(self, epoch: int | None = None) -> list[BatchIds]:
        """This rank's batches of ``epoch`` (default: the current one); do not modify."""
        epoch = self.epoch if epoch is None else epoch
        if epoch in self._cache:
            self._cache.move_to_end(epoch)
            return self._cache[epoch]
        if self.drop_uneven and self.world_size > 1:  # equal counts on every rank (DDP)
            every = epoch_batches(self.index, self.config, self.seed, epoch, 0, 1, self.shuffle)
            batches = every[self.rank :: self.world_size][: len(every) // self.world_size]
        else:
            batches = epoch_batches(
                self.index, self.config, self.seed, epoch, self.rank, self.world_size,
                self.shuffle,
            )
        self._cache[epoch] = batches
        while len(self._cache) > 2:
            self._cache.popitem(last=False)
        return batches

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Go to ``epoch``, resuming at rank-local position ``start`` (0 <= start <= length)."""
        check_int("epoch", epoch, 0)
        check_int("start", start, 0)
        length = self.epoch_length(epoch)
        if start > length:
            raise ConfigError(
                f"start: expected 0 <= start <= {length} (batches of epoch {epoch} on rank "
                f"{self.rank}), got {start}"
            )
        self.epoch, self.start = int(epoch), int(start)

    def epoch_length(self, epoch: int | None = None) -> int:
        """Number of batches of ``epoch`` (default: current) on this rank."""
        return len(self.batches(epoch))

    def __len__(self) -> int:
        return max(0, self.epoch_length() - self.start)

    def __iter__(self) -> Iterator[BatchSpec]:
        epoch, start = self.epoch, self.start
        batches = self.batches(epoch)
        n = len(batches)
        if start >= n:
            self.epoch, self.start = epoch + 1, 0
            return
        for j in range(start, n):
            if j + 1 < n:
                self.start = j + 1
            else:
                self.epoch, self.start = epoch + 1, 0
            index = self.rank + j * self.world_size
            yield BatchSpec(epoch, index, self.seed, tuple(batches[j]))

    def state_dict(self) -> dict:
        """``{"seed", "epoch", "start"}``: where the next ``iter()`` begins."""
        return {"seed": self.seed, "epoch": self.epoch, "start": self.start}

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()`` (the seed included)."""
        missing = {"seed", "epoch", "start"} - set(state)
        if missing:
            raise ConfigError(f"sampler state: missing keys {sorted(missing)}")
        check_int("sampler state seed", state["seed"], 0)
        if int(state["seed"]) != self.seed:
            self.seed = int(state["seed"])
            self._cache.clear()
        self.set_epoch(state["epoch"], state["start"])
