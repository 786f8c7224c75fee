"""A fixed, representative sample of a split: what a capped validation evaluates.

Tractograms are stored bundle by bundle, so the first streamlines of a split are one bundle of
one subject. A capped validation (``--max-batches-valid``, ``--valid-fraction``) or the seeds of
generation validation (``--gen-streamlines``) therefore use a seeded random sample, stratified:

1. **By subject.** Each subject gets its share of the sample in proportion to its streamlines
   (largest remainders; every subject with streamlines gets at least one when the sample has
   at least as many streamlines as there are subjects).
2. **By stratum** (e.g. the store's ``bundle`` data per streamline, when it has one). Within a
   subject, `stratified_order` ranks the streamlines so that every prefix holds each stratum
   in proportion to its size; a subject's sample is a prefix of that order.

Pure: the sample depends only on (index, size, seed, strata), never on the epoch, so it is
identical at every epoch and after a resume (which rebuilds it from the saved seed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tractrain.data.packing import check_int, streamline_costs
from tractrain.data.split_index import SplitIndex
from tractrain.errors import ConfigError

SAMPLE_SPAWN_KEY = 0x7A11  # keeps the sample's RNG apart from the epoch and batch streams
STRATUM_KEY = "bundle"  # data per streamline used as strata when the store has it


def sample_rng(seed: int, subject: int) -> np.random.Generator:
    """The RNG that orders subject number ``subject`` of a sample."""
    return np.random.default_rng(
        np.random.SeedSequence([seed, subject], spawn_key=(SAMPLE_SPAWN_KEY,))
    )


def stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Positions ``0..n-1`` ranked so that every prefix holds each label in proportion to its
    count: the k-th of m items of a label (in random order) gets key ``(k + u) / m``, ``u``
    uniform in [0, 1); positions are sorted by key."""
    labels = np.asarray(labels).ravel()
    n = labels.size
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    perm = rng.permutation(n)
    by_label = perm[np.argsort(inverse[perm], kind="stable")]  # random order within a label
    rank = np.empty(n, dtype=np.float64)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank[by_label] = np.arange(n) - np.repeat(starts, counts)
    keys = (rank + rng.uniform(0.0, 1.0, n)) / counts[inverse]
    return np.argsort(keys, kind="stable").astype(np.int64)


def allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """``total`` items shared among subjects in proportion to ``counts`` (largest remainders,
    ties to the first), at least one per non-empty subject when ``total`` allows."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(min(total, counts.sum()))
    floor = (counts > 0).astype(np.int64)
    if total < floor.sum():
        floor[:] = 0
    spare = counts - floor
    share = spare * (total - int(floor.sum())) / max(int(spare.sum()), 1)
    out = floor + np.floor(share).astype(np.int64)
    order = [i for i in np.argsort(-(share - np.floor(share)), kind="stable").tolist()
             if out[i] < counts[i]]
    out[order[: total - int(out.sum())]] += 1
    return out


def sample_size(index: SplitIndex, *, fraction: float | None = None,
                max_cost: float | None = None, units: str = "streamlines") -> int:
    """Streamlines in a sample holding ``fraction`` of the split's streamlines and at most
    about ``max_cost`` (in ``units``, as a batch budget) of its cost; the smaller wins."""
    n = int(index.counts.sum())
    size = n
    if fraction is not None:
        if not (isinstance(fraction, int | float) and 0 < fraction <= 1):
            raise ConfigError(f"valid_fraction: expected a number in (0, 1], got {fraction!r}")
        size = min(size, int(np.ceil(fraction * n)))
    if max_cost is not None:
        total = float(sum(c.sum() for c in streamline_costs(index, units)))
        size = min(size, max(1, int(round(n * min(1.0, max_cost / max(total, 1e-12))))))
    return size


def stratified_sample(index: SplitIndex, size: int, seed: int,
                      strata: Sequence[np.ndarray] | None = None) -> SplitIndex:
    """The sub-index of ``size`` streamlines of ``index``, stratified by subject and (when
    given, one label array per subject) by stratum. Each subject's ids come in their
    stratified order, so any prefix of them (a batch cap cutting the sample) stays spread over
    the strata. ``size`` >= the split's streamlines gives the whole index."""
    check_int("seed", seed, 0)
    check_int("sample size", size, 1)
    counts = index.counts
    if size >= counts.sum():
        return index
    if strata is not None and len(strata) != len(index.subjects):
        raise ConfigError(f"strata: expected one label array per subject "
                          f"({len(index.subjects)}), got {len(strata)}")
    taken = allocate(counts, size)
    positions = []
    for s, (n, k) in enumerate(zip(counts.tolist(), taken.tolist(), strict=True)):
        labels = np.zeros(n, dtype=np.int64) if strata is None else np.asarray(strata[s])
        if labels.shape != (n,):
            raise ConfigError(f"strata[{index.subjects[s]}]: expected {n} labels, got shape "
                              f"{labels.shape}")
        positions.append(stratified_order(labels, sample_rng(seed, s))[:k])
    return index.subset(tuple(positions))


def store_strata(store: Any, index: SplitIndex,
                 key: str = STRATUM_KEY) -> tuple[np.ndarray, ...] | None:
    """Per subject, the ``key`` data per streamline of the index's streamlines (e.g. their
    bundle), or None when the store's group does not have it."""
    if key not in store.streamline_groups[index.group].get("dps_keys", []):
        return None
    return tuple(np.asarray(store.dps(subject, index.group, key, ids)).reshape(len(ids), -1)[:, 0]
                 for subject, ids in zip(index.subjects, index.ids, strict=True))


def coverage(sample: SplitIndex, full: SplitIndex,
             strata: Sequence[np.ndarray] | None = None) -> dict:
    """What share of ``full`` the ``sample`` covers: streamlines, points, subjects and (with
    the full index's ``strata``) strata present."""
    out = {"streamlines": int(sample.counts.sum()), "of_streamlines": int(full.counts.sum()),
           "points": int(sum(n.sum() for n in sample.lengths)),
           "of_points": int(sum(n.sum() for n in full.lengths)),
           "subjects": int(np.count_nonzero(sample.counts)), "of_subjects": len(full.subjects)}
    if strata is not None:
        seen, every = set(), set()
        for labels, ids, all_ids in zip(strata, sample.ids, full.ids, strict=True):
            labels = np.asarray(labels)
            every.update(labels.tolist())
            seen.update(labels[np.searchsorted(all_ids, ids)].tolist())  # all_ids ascending
        out["strata"], out["of_strata"] = len(seen), len(every)
    return out


def describe(cover: dict) -> str:
    """One line: ``120 of 900 streamlines (13.3%), 5200 of 40000 points, 3 of 3 subjects``."""
    text = (f"{cover['streamlines']} of {cover['of_streamlines']} streamlines "
            f"({100 * cover['streamlines'] / max(cover['of_streamlines'], 1):.1f}%), "
            f"{cover['points']} of {cover['of_points']} points, "
            f"{cover['subjects']} of {cover['of_subjects']} subjects")
    if "strata" in cover:
        text += f", {cover['strata']} of {cover['of_strata']} bundles"
    return text
