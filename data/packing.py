"""How streamlines are packed into batches: the pure ``epoch_batches(index, config, seed,
epoch)``, its `SamplerConfig` and the random streams of epochs and batches.

`tractrain.data.sampler.BatchSampler` wraps it as a resumable iterator; its input, the
`SplitIndex`, is built in `tractrain.data.split_index`.

Algorithm (epochs are 0-based):

1. **Cost.** A streamline costs 1 (``units="streamlines"``), its number of points
   (``"points"``) or its length in mm (``"length_mm"``). A batch holds streamlines whose total
   cost is <= ``batch_size``, except that a batch always holds at least one streamline: a
   streamline costing more than the whole budget gets a batch of its own (never dropped).
2. **Order.** With ``shuffle`` an epoch RNG, ``SeedSequence([seed, epoch],
   spawn_key=(EPOCH_SPAWN_KEY,))`` (a different stream from every ``batch_rng(seed, epoch, i)``),
   permutes each subject's ids, then decides subject ties and draws. Without ``shuffle`` the
   ids keep their natural order and subjects their split order: the epoch does not depend on
   ``seed`` or ``epoch``.
3. **Merging subjects.** Within a set of subjects every streamline gets a key: the cumulative
   cost of its subject's sequence up to and including it (relative to where the set started).
   A stable sort by key (ties in subject order) interleaves the subjects so that any prefix of
   the merged sequence gives every subject still in play the same share of the cost; a
   subject that runs out simply stops appearing and the others share the whole budget, so
   tail batches stay full. The merged cost sequence is cut greedily into batches with one
   ``cumsum`` and a ``searchsorted`` per batch (no Python loop per streamline).
4. **Subjects per batch.** ``subjects_per_batch=None``: one merge of all subjects for the
   whole epoch. ``subjects_per_batch=k``: draw k subjects without replacement (fewer if fewer
   remain) with probability proportional to their remaining streamlines (without shuffle: the
   first k remaining in split order), merge them and cut ``cycles`` batches from them, or fewer
   when one of them runs out (the batch where it runs out is completed from the others), then
   draw again.
5. **Cap and shards.** ``max_batches`` truncates the epoch's (global) batch list; rank ``r``
   of ``world_size`` gets ``batches[r::world_size]``: the ranks' lists are disjoint, their union
   is the epoch, and their lengths differ by at most one (rank r has one more batch than rank
   ``world_size - 1`` when ``r < len(batches) % world_size``). Code that needs equal counts
   across ranks (DDP) must stop at the smallest ``epoch_length`` or use a join context:
   ``BatchSampler(..., drop_uneven=True)`` does the former, giving every rank
   ``len(batches) // world_size`` batches (the last ``len(batches) % world_size`` of the
   epoch are left out that epoch).

Within a batch, subjects come in split order, once each, and a subject's ids keep their
epoch order (the index's order without shuffle). Ids are the index's store ids (``index.ids``:
a subset such as a validation sample packs only its own streamlines); id arrays are read-only
int64 views.
"""

from __future__ import annotations

import math
import numbers
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tractrain.data.split_index import SplitIndex
from tractrain.errors import ConfigError

BatchIds = list[tuple[str, np.ndarray]]
UNITS = ("streamlines", "points", "length_mm")
EPOCH_SPAWN_KEY = 0x5A3F  # spawn key of the epoch RNG: never equal to a batch_rng stream


def check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    """Raise `ConfigError` unless ``value`` is an integer >= ``minimum`` (or an allowed None)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        expected = f"an integer >= {minimum}" + (" or None" if allow_none else "")
        raise ConfigError(f"{name}: expected {expected}, got {value!r}")


@dataclass(frozen=True)
class SamplerConfig:
    """How batches are made; see the module docstring."""

    batch_size: float = 1000
    units: str = "streamlines"
    subjects_per_batch: int | None = None
    cycles: int = 1
    max_batches: int | None = None

    def __post_init__(self) -> None:
        bs = self.batch_size
        if (
            isinstance(bs, bool)
            or not isinstance(bs, numbers.Real)
            or not math.isfinite(bs)
            or bs <= 0
        ):
            raise ConfigError(f"SamplerConfig.batch_size: expected a finite number > 0, got {bs!r}")
        if self.units not in UNITS:
            raise ConfigError(f"SamplerConfig.units: expected one of {UNITS}, got {self.units!r}")
        check_int("SamplerConfig.subjects_per_batch", self.subjects_per_batch, 1, True)
        check_int("SamplerConfig.cycles", self.cycles, 1)
        check_int("SamplerConfig.max_batches", self.max_batches, 1, True)


# --------------------------------------------------------------------------------------------
# random streams


def batch_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The RNG of batch ``index`` of ``epoch`` (augmentation): ``SeedSequence([seed, epoch,
    index])``."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, index]))


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The RNG that orders an epoch; its spawn key keeps it apart from every ``batch_rng``."""
    return np.random.default_rng(
        np.random.SeedSequence([seed, epoch], spawn_key=(EPOCH_SPAWN_KEY,))
    )


def streamline_costs(index: SplitIndex, units: str) -> list[np.ndarray]:
    """Per subject, the cost of each streamline in ``units`` (int64, or float64 for mm)."""
    if units == "streamlines":
        return [np.ones(n.size, dtype=np.int64) for n in index.lengths]
    if units == "points":
        return [n for n in index.lengths]
    if units == "length_mm":
        return [mm.astype(np.float64) for mm in index.lengths_mm]
    raise ConfigError(f"units: expected one of {UNITS}, got {units!r}")


# --------------------------------------------------------------------------------------------
# the pure epoch


def _cut(costs: np.ndarray, budget: float, limit: float, stop_after: int) -> list[int]:
    """Greedy cut of a cost sequence: ends of at most ``limit`` batches, each of cost <= budget
    or a single item; stops after the batch that holds position ``stop_after``."""
    cum = np.concatenate(([0.0], np.cumsum(costs, dtype=np.float64))).tolist()
    n = costs.size
    ends: list[int] = []
    start = 0
    while start < n and len(ends) < limit:
        end = bisect_right(cum, cum[start] + budget, start + 1) - 1  # cheapest per-batch step
        if end <= start:
            end = start + 1
        ends.append(end)
        if end > stop_after:
            break
        start = end
    return ends


def _assemble(
    names: tuple[str, ...], labels: np.ndarray, ids: np.ndarray, ends: list[int]
) -> list[BatchIds]:
    """Turn a merged sequence (subject label, id per item) and batch ends into BatchIds."""
    if not ends:
        return []
    n_subjects = len(names)
    total = ends[-1]
    sizes = np.diff(np.concatenate(([0], ends)))
    batch_of = np.repeat(np.arange(len(ends), dtype=np.int64), sizes)
    key = batch_of * n_subjects + labels[:total]
    order = np.argsort(key, kind="stable")
    key = key[order]
    ids = ids[:total][order]
    ids.flags.writeable = False
    starts = np.concatenate(([0], np.flatnonzero(np.diff(key)) + 1)).tolist()
    stops = starts[1:] + [total]
    out: list[BatchIds] = [[] for _ in ends]
    for k, a, b in zip(key[starts].tolist(), starts, stops, strict=True):
        batch, subject = divmod(k, n_subjects)
        out[batch].append((names[subject], ids[a:b]))
    return out


class _Epoch:
    """Shuffled per-subject sequences of one epoch, and the merge/cut steps over them."""

    def __init__(self, index: SplitIndex, config: SamplerConfig, rng: np.random.Generator | None):
        self.names = index.subjects
        self.budget = float(config.batch_size)
        self.counts = index.counts
        costs = streamline_costs(index, config.units)
        self.ids, self.costs, self.cums = [], [], []
        for n, cost, store_ids in zip(self.counts.tolist(), costs, index.ids, strict=True):
            perm = rng.permutation(n) if rng is not None else np.arange(n, dtype=np.int64)
            perm = perm.astype(np.int64, copy=False)
            self.ids.append(store_ids[perm])
            self.costs.append(cost[perm])
            self.cums.append(np.concatenate(([0.0], np.cumsum(cost[perm], dtype=np.float64))))

    def merge(
        self, subjects: Sequence[int], pos: np.ndarray, stops: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[int]]:
        """Merge items ``pos[s]:stop`` of each of ``subjects`` (listed in tie order) by key.

        Returns the sorted keys, labels, ids and costs and, per subject, the merged position of
        its last item."""
        spans = [(s, int(pos[s]), int(e)) for s, e in zip(subjects, stops, strict=True)]
        keys = np.concatenate([self.cums[s][p + 1 : e + 1] - self.cums[s][p] for s, p, e in spans])
        ids = np.concatenate([self.ids[s][p:e] for s, p, e in spans])
        costs = np.concatenate([self.costs[s][p:e] for s, p, e in spans])
        sizes = [e - p for _, p, e in spans]
        labels = np.repeat(np.asarray(subjects, dtype=np.int64), sizes)
        order = np.argsort(keys, kind="stable")
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        lasts = inverse[np.cumsum(sizes) - 1].tolist()
        return keys[order], labels[order], ids[order], costs[order], lasts

    def all_subjects(self, order: Sequence[int], limit: float) -> list[BatchIds]:
        """The whole epoch as one merge of all subjects (``subjects_per_batch=None``)."""
        subjects = [s for s in order if self.counts[s] > 0]
        pos = np.zeros(len(self.names), dtype=np.int64)
        _, labels, ids, costs, _ = self.merge(subjects, pos, [self.counts[s] for s in subjects])
        ends = _cut(costs, self.budget, limit, costs.size)
        return _assemble(self.names, labels, ids, ends)

    def group(self, drawn: Sequence[int], pos: np.ndarray, limit: float) -> list[BatchIds]:
        """Up to ``limit`` batches from the ``drawn`` subjects, stopping after the batch in which
        one of them runs out; advances ``pos``."""
        window = limit * self.budget
        stops = []
        for s in drawn:
            t = int(np.searchsorted(self.cums[s], self.cums[s][pos[s]] + window, side="right"))
            stops.append(min(int(self.counts[s]), t))  # one item beyond the window's budget
        for attempt in range(2):
            keys, labels, ids, costs, lasts = self.merge(drawn, pos, stops)
            cut_off = [
                self.cums[s][e + 1] - self.cums[s][pos[s]]
                for s, e in zip(drawn, stops, strict=True)
                if e < self.counts[s]
            ]
            exhausted = [
                last for s, e, last in zip(drawn, stops, lasts, strict=True) if e == self.counts[s]
            ]
            stop_after = min(exhausted) if exhausted else costs.size
            ends = _cut(costs, self.budget, limit, stop_after)
            # The merge equals the full merge only below the smallest key left out; the last
            # batch's end must lie strictly inside that prefix to be the true greedy cut.
            valid = int(np.searchsorted(keys, min(cut_off), side="left")) if cut_off else None
            if valid is None or ends[-1] < valid or attempt == 1:
                break
            stops = [int(self.counts[s]) for s in drawn]  # rare: fall back to full sequences
        pos += np.bincount(labels[: ends[-1]], minlength=pos.size)
        return _assemble(self.names, labels, ids, ends)


def check_epoch_args(seed: Any, epoch: Any, rank: Any, world_size: Any) -> None:
    """Raise `ConfigError` unless seed, epoch >= 0 and 0 <= rank < world_size."""
    check_int("seed", seed, 0)
    check_int("epoch", epoch, 0)
    check_int("world_size", world_size, 1)
    check_int("rank", rank, 0)
    if rank >= world_size:
        raise ConfigError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")


def epoch_batches(
    index: SplitIndex,
    config: SamplerConfig,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
) -> list[BatchIds]:
    """The batches of ``epoch`` for ``rank``: ``[[(subject, int64 ids), ...], ...]``.

    Pure: depends only on the arguments (and not on seed/epoch when ``shuffle`` is False)."""
    check_epoch_args(seed, epoch, rank, world_size)
    rng = epoch_rng(seed, epoch) if shuffle else None
    state = _Epoch(index, config, rng)
    n_subjects = len(index.subjects)
    limit = config.max_batches if config.max_batches is not None else math.inf
    k = config.subjects_per_batch
    if k is None:
        order = rng.permutation(n_subjects).tolist() if rng is not None else range(n_subjects)
        batches = state.all_subjects(order, limit)
    else:
        batches = []
        pos = np.zeros(n_subjects, dtype=np.int64)
        while len(batches) < limit:
            left = state.counts - pos
            active = np.flatnonzero(left)
            if active.size == 0:
                break
            m = min(k, active.size)
            if rng is not None:
                p = left[active] / left[active].sum()
                drawn = rng.choice(active, size=m, replace=False, p=p).tolist()
            else:
                drawn = active[:m].tolist()
            batches.extend(state.group(drawn, pos, min(config.cycles, limit - len(batches))))
    return batches[rank::world_size]
