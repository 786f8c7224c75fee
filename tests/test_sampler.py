"""Tests for tractrain.data.packing (epoch batches, pure) and data.sampler (BatchSampler)."""

from __future__ import annotations

import json
import pickle
import time
from collections import Counter
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tractrain.data.packing import SamplerConfig, batch_rng, epoch_batches
from tractrain.data.sampler import BatchSampler, BatchSpec
from tractrain.data.split_index import SplitIndex, split_index
from tractrain.errors import ConfigError

UNITS = ["streamlines", "points", "length_mm"]


def make_index(counts, seed=0, min_points=2, max_points=120) -> SplitIndex:
    rng = np.random.default_rng(seed)
    lengths = [rng.integers(min_points, max_points + 1, n) for n in counts]
    mm = [((n - 1) * rng.uniform(0.2, 1.5, n.size)).astype(np.float32) for n in lengths]
    names = tuple(f"sub-{i:02d}" for i in range(len(counts)))
    return SplitIndex("train", "wm", names, tuple(lengths), tuple(mm))


def costs_of(index: SplitIndex, units: str) -> dict[str, np.ndarray]:
    """Reference cost per streamline, computed here from the raw lengths."""
    out = {}
    for name, n, mm in zip(index.subjects, index.lengths, index.lengths_mm, strict=True):
        out[name] = {"streamlines": np.ones(n.size), "points": n, "length_mm": mm}[units]
        out[name] = np.asarray(out[name], dtype=np.float64)
    return out


def flat(batches) -> list[tuple[str, int]]:
    return [(s, int(i)) for batch in batches for s, ids in batch for i in ids]


def same(a, b) -> bool:
    """Two lists of batches are identical."""
    return len(a) == len(b) and all(
        [s for s, _ in x] == [s for s, _ in y]
        and all(np.array_equal(i, j) for (_, i), (_, j) in zip(x, y, strict=True))
        for x, y in zip(a, b, strict=True)
    )


def check_batches(index: SplitIndex, config: SamplerConfig, batches, complete=True) -> None:
    """The guarantees every epoch must satisfy."""
    costs = costs_of(index, config.units)
    items = flat(batches)
    assert len(items) == len(set(items)), "a streamline appears twice in the epoch"
    if complete:
        expected = {
            (s, i)
            for s, n in zip(index.subjects, index.lengths, strict=True)
            for i in range(n.size)
        }
        assert set(items) == expected
    for batch in batches:
        assert batch, "empty batch"
        names = [s for s, _ in batch]
        assert len(names) == len(set(names)), "subject listed twice in a batch"
        assert names == sorted(names, key=index.subjects.index), "subjects not in split order"
        if config.subjects_per_batch is not None:
            assert len(names) <= config.subjects_per_batch
        total, count = 0.0, 0
        for s, ids in batch:
            assert ids.dtype == np.int64 and ids.ndim == 1 and ids.size > 0
            total += costs[s][ids].sum()
            count += ids.size
        assert count == 1 or total <= config.batch_size * (1 + 1e-9)


counts_st = st.lists(st.integers(0, 60), min_size=1, max_size=5).filter(lambda c: sum(c) > 0)
config_st = st.builds(
    SamplerConfig,
    batch_size=st.one_of(st.integers(1, 80), st.floats(0.5, 3000.0)),
    units=st.sampled_from(UNITS),
    subjects_per_batch=st.one_of(st.none(), st.integers(1, 4)),
    cycles=st.integers(1, 3),
)


@settings(max_examples=50, deadline=None)
@given(counts_st, config_st, st.integers(0, 2**32), st.integers(0, 50), st.booleans())
def test_epoch_covers_split_once_within_budget(counts, config, seed, epoch, shuffle):
    index = make_index(counts, seed=seed % 1000)
    batches = epoch_batches(index, config, seed, epoch, shuffle=shuffle)
    check_batches(index, config, batches)
    assert same(batches, epoch_batches(index, config, seed, epoch, shuffle=shuffle))


@settings(max_examples=50, deadline=None)
@given(counts_st, config_st, st.integers(1, 5), st.one_of(st.none(), st.integers(1, 30)))
def test_sharding_and_cap(counts, config, world_size, max_batches):
    index = make_index(counts, seed=len(counts))
    config = replace(config, max_batches=max_batches)
    full = epoch_batches(index, replace(config, max_batches=None), 7, 3)
    capped = epoch_batches(index, config, 7, 3)
    assert len(capped) == (len(full) if max_batches is None else min(max_batches, len(full)))
    assert same(capped, full[: len(capped)])
    check_batches(index, config, capped, complete=max_batches is None)
    shards = [epoch_batches(index, config, 7, 3, r, world_size) for r in range(world_size)]
    for r, shard in enumerate(shards):
        assert same(shard, capped[r::world_size])
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(capped)
    assert Counter(flat(capped)) == Counter(x for s in shards for x in flat(s))


def reference_unshuffled(index: SplitIndex, config: SamplerConfig) -> list[list[tuple[str, list]]]:
    """Slow per-streamline model of the documented algorithm, without shuffle: subjects are
    merged by their cumulative cost (ties in group order), batches filled greedily."""
    cost = [costs_of(index, config.units)[name] for name in index.subjects]
    count = [c.size for c in cost]
    pos = [0] * len(cost)
    cap = config.max_batches or float("inf")
    k = config.subjects_per_batch
    out: list[list[tuple[str, list]]] = []
    while len(out) < cap and any(p < n for p, n in zip(pos, count, strict=True)):
        group = [s for s in range(len(cost)) if pos[s] < count[s]][:k]
        used = dict.fromkeys(group, 0.0)
        made, ran_out = 0, False
        while len(out) < cap and made < (config.cycles if k else float("inf")) and not ran_out:
            batch: dict[int, list] = {}
            total = 0.0
            while True:
                live = [(r, s) for r, s in enumerate(group) if pos[s] < count[s]]
                left = [(used[s] + cost[s][pos[s]], r, s) for r, s in live]
                if not left:
                    break
                key, _, s = min(left)
                c = cost[s][pos[s]]
                if batch and total + c > config.batch_size:
                    break
                batch.setdefault(s, []).append(pos[s])
                total, used[s], pos[s] = total + c, key, pos[s] + 1
                ran_out |= k is not None and pos[s] == count[s]
            if not batch:
                break
            out.append([(index.subjects[s], batch[s]) for s in sorted(batch)])
            made += 1
    return out


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(0, 25), min_size=1, max_size=4).filter(lambda c: sum(c) > 0),
    st.sampled_from(UNITS),
    st.sampled_from([0.5, 1, 3, 7, 40, 150, 1000]),
    st.one_of(st.none(), st.integers(1, 3)),
    st.integers(1, 3),
    st.one_of(st.none(), st.integers(1, 12)),
    st.integers(0, 100),
)
def test_unshuffled_epoch_matches_a_per_streamline_model(counts, units, size, k, cycles, cap, s):
    rng = np.random.default_rng(s)
    # mm lengths in steps of 0.5 (sums are exact), some zero; a few very long streamlines
    lengths = [rng.choice([2, 3, 5, 9, 60, 400], n) for n in counts]
    mm = [np.where(rng.random(n.size) < 0.2, 0, n - 1) * np.float32(0.5) for n in lengths]
    index = SplitIndex("valid", "wm", tuple("abcd"[: len(counts)]), tuple(lengths), tuple(mm))
    config = SamplerConfig(size, units, k, cycles, cap)
    got = [
        [(n, ids.tolist()) for n, ids in b]
        for b in epoch_batches(index, config, 0, 0, shuffle=False)
    ]
    assert got == reference_unshuffled(index, config)


def test_seed_and_epoch_change_the_order_but_validation_is_fixed():
    index = make_index([300, 200, 100])
    for config in [SamplerConfig(64), SamplerConfig(2000, "points", subjects_per_batch=2)]:
        base = epoch_batches(index, config, 1, 0)
        assert same(base, epoch_batches(index, config, 1, 0))
        assert not same(base, epoch_batches(index, config, 1, 1))
        assert not same(base, epoch_batches(index, config, 2, 0))
        valid = epoch_batches(index, config, 1, 0, shuffle=False)
        for seed, epoch in [(2, 0), (1, 5), (99, 3)]:
            assert same(valid, epoch_batches(index, config, seed, epoch, shuffle=False))
        check_batches(index, config, valid)
        for name in index.subjects:  # natural order within each subject
            ids = np.concatenate([i for b in valid for s, i in b if s == name])
            assert np.array_equal(ids, np.arange(ids.size))


def test_budget_is_split_evenly_and_tail_batches_stay_full():
    index = make_index([100, 100, 100, 100])
    batches = epoch_batches(index, SamplerConfig(40), 0, 0)
    assert len(batches) == 10
    assert all([ids.size for _, ids in b] == [10, 10, 10, 10] for b in batches)
    # Unequal subjects: once the small ones run out the rest share the whole budget.
    index = make_index([10, 30, 200])
    batches = epoch_batches(index, SamplerConfig(24), 3, 0)
    sizes = [sum(ids.size for _, ids in b) for b in batches]
    assert sizes[:-1] == [24] * (len(sizes) - 1) and sizes[-1] == 240 - 24 * (len(sizes) - 1)
    first = {s: ids.size for s, ids in batches[0]}
    assert first == {"sub-00": 8, "sub-01": 8, "sub-02": 8}
    assert [s for s, _ in batches[-1]] == ["sub-02"]
    # Cost units: each subject gets about the same number of points per batch.
    index = make_index([400, 400], min_points=10, max_points=50)
    pts = costs_of(index, "points")
    for b in epoch_batches(index, SamplerConfig(2000, "points"), 0, 0)[:5]:
        share = [pts[s][ids].sum() for s, ids in b]
        assert len(share) == 2 and abs(share[0] - share[1]) <= 100 and sum(share) > 2000 - 50


def test_oversized_streamlines_get_their_own_batch():
    index = make_index([30, 20], min_points=10, max_points=40)
    for units, size in [("points", 5), ("length_mm", 0.01), ("streamlines", 0.5)]:
        config = SamplerConfig(size, units)
        batches = epoch_batches(index, config, 0, 0)
        assert len(batches) == 50 and all(sum(i.size for _, i in b) == 1 for b in batches)
        check_batches(index, config, batches)
    # Mixed: the long ones alone, the short ones still packed.
    lengths = (np.array([5] * 40 + [500] * 3), np.array([5] * 40))
    index = SplitIndex("t", "g", ("a", "b"), lengths, tuple(n.astype(np.float32) for n in lengths))
    config = SamplerConfig(100, "points")
    batches = epoch_batches(index, config, 0, 0)
    check_batches(index, config, batches)
    for b in batches:
        if any(s == "a" and (i >= 40).any() for s, i in b):
            assert sum(i.size for _, i in b) == 1
    assert len(batches) <= 3 + 4 + 3  # each long one can leave at most one batch part-filled


def test_subjects_per_batch_cycles_and_weighting():
    index = make_index([1000] * 5)
    config = SamplerConfig(10, subjects_per_batch=1, cycles=3)
    batches = epoch_batches(index, config, 4, 0)
    check_batches(index, config, batches)
    for g in range(10):  # no subject can run out this early: groups of exactly 3 batches
        group = batches[3 * g : 3 * g + 3]
        assert len({b[0][0] for b in group}) == 1 and all(len(b) == 1 for b in group)
    assert len({b[0][0] for b in batches[:30]}) > 1
    config = SamplerConfig(40, subjects_per_batch=2, cycles=2)
    batches = epoch_batches(index, config, 4, 0)
    shapes = [[i.size for _, i in b] for b in batches]
    assert all(s in ([20, 20], [40]) for s in shapes) and shapes.count([20, 20]) >= 100
    # Subjects are drawn in proportion to their streamlines: 900 vs 100.
    index = make_index([900, 100])
    config = SamplerConfig(10, subjects_per_batch=1, max_batches=1)
    first = [epoch_batches(index, config, seed, 0)[0][0][0] for seed in range(200)]
    assert 160 <= first.count("sub-00") <= 196


def test_epoch_rng_is_apart_from_batch_rngs():
    index = make_index([500])
    ids = epoch_batches(index, SamplerConfig(1000), 11, 2)[0][0][1]
    assert sorted(ids.tolist()) == list(range(500)) and not np.array_equal(ids, np.arange(500))
    for i in range(3):  # SeedSequence([s, e]) == SeedSequence([s, e, 0]) must not be reused
        assert not np.array_equal(ids, batch_rng(11, 2, i).permutation(500))
    ref = np.random.default_rng(np.random.SeedSequence([11, 2, 3])).random(4)
    assert np.array_equal(batch_rng(11, 2, 3).random(4), ref)


def test_epoch_is_fast():
    index = make_index([20_000] * 4, max_points=200)
    for config in [
        SamplerConfig(1000),
        SamplerConfig(50_000, "points"),
        SamplerConfig(1000, subjects_per_batch=2, cycles=2),
    ]:
        best = min(_cpu_time(lambda c=config: epoch_batches(index, c, 0, 1)) for _ in range(3))
        assert best < 0.1, f"{config}: {best:.3f} s"


def _cpu_time(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def test_batch_sampler_iterates_epochs_and_resumes():
    index = make_index([60, 40, 25])
    config = SamplerConfig(300, "points")
    sampler = BatchSampler(index, config, seed=5, rank=1, world_size=2)
    expected = epoch_batches(index, config, 5, 0, 1, 2)
    assert len(sampler) == sampler.epoch_length() == len(expected) >= 6
    specs = list(sampler)
    assert [s.index for s in specs] == [1 + 2 * j for j in range(len(expected))]
    assert all(s.epoch == 0 and s.seed == 5 for s in specs)
    assert same([list(s.ids) for s in specs], expected)
    assert sampler.state_dict() == {"seed": 5, "epoch": 1, "start": 0}
    assert same([list(s.ids) for s in sampler], epoch_batches(index, config, 5, 1, 1, 2))
    # Interrupted after 3 batches of epoch 2, resumed in a fresh sampler.
    it = iter(sampler)
    head = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(sampler.state_dict()))
    assert state == {"seed": 5, "epoch": 2, "start": 3}
    resumed = BatchSampler(index, config, seed=0, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert len(resumed) == sampler.epoch_length(2) - 3
    uninterrupted = BatchSampler(index, config, seed=5, rank=1, world_size=2)
    uninterrupted.set_epoch(2)
    assert head + list(resumed) == list(uninterrupted)
    assert resumed.state_dict() == {"seed": 5, "epoch": 3, "start": 0}


def test_set_epoch_and_bad_start():
    index = make_index([50, 50])
    sampler = BatchSampler(index, SamplerConfig(20), seed=1)
    sampler.set_epoch(4, start=2)
    specs = list(sampler)
    assert [s.index for s in specs] == list(range(2, 5)) and {s.epoch for s in specs} == {4}
    assert sampler.state_dict()["epoch"] == 5
    sampler.set_epoch(3, start=5)  # an epoch already finished: nothing left, then epoch 4
    assert len(sampler) == 0 and list(sampler) == [] and sampler.state_dict()["epoch"] == 4
    with pytest.raises(ConfigError, match="start"):
        sampler.set_epoch(0, start=6)
    with pytest.raises(ConfigError, match="missing"):
        sampler.load_state_dict({"epoch": 0})


def test_rank_without_batches_moves_on():
    index = make_index([5])
    sampler = BatchSampler(index, SamplerConfig(10), seed=0, rank=2, world_size=3)
    assert len(sampler) == 0 and list(sampler) == []
    assert sampler.state_dict() == {"seed": 0, "epoch": 1, "start": 0}


def test_batch_spec_pickles_and_works_with_a_dataloader():
    index = make_index([30, 30])
    sampler = BatchSampler(index, SamplerConfig(16), seed=3)
    spec = next(iter(sampler))
    copy = pickle.loads(pickle.dumps(spec))
    assert copy == spec and hash(copy) == hash(spec) and len({spec, copy}) == 1
    assert np.array_equal(copy.rng().random(3), batch_rng(3, 0, 0).random(3))
    assert spec.num_streamlines == 16

    class Dataset(torch.utils.data.Dataset):
        def __getitem__(self, spec: BatchSpec):
            return spec.index, spec.num_streamlines

        def __len__(self):
            return 0

    sampler.set_epoch(0)
    loader = torch.utils.data.DataLoader(Dataset(), sampler=sampler, batch_size=None)
    assert len(loader) == 4
    got = [(int(i), int(n)) for i, n in loader]
    assert got == [(0, 16), (1, 16), (2, 16), (3, 12)]
    assert [int(i) for i, _ in loader] == [0, 1, 2, 3] and sampler.state_dict()["epoch"] == 2


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": float("nan")}, "batch_size"),
        ({"units": "voxels"}, "units"),
        ({"subjects_per_batch": 0}, "subjects_per_batch"),
        ({"cycles": 0}, "cycles"),
        ({"cycles": 1.5}, "cycles"),
        ({"max_batches": 0}, "max_batches"),
    ],
)
def test_bad_config(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        SamplerConfig(**kwargs)


def test_bad_arguments():
    index = make_index([5])
    with pytest.raises(ConfigError, match="rank"):
        epoch_batches(index, SamplerConfig(), 0, 0, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="seed"):
        BatchSampler(index, SamplerConfig(), seed=-1)
    with pytest.raises(ConfigError, match="lengths_mm"):
        SplitIndex("t", "g", ("a",), (np.array([3, 4]),), (np.array([1.0]),))


class FakeStore:
    def __init__(self, splits, counts):
        self.splits = splits
        self.counts = counts

    def streamline_index(self, subject, group):
        assert group == "wm"
        n = np.arange(2, 2 + self.counts[subject])
        return SimpleNamespace(lengths=n, lengths_mm=(n * 0.5).astype(np.float32))


def test_split_index_from_a_store():
    store = FakeStore({"train": ["b", "a"], "valid": ["c"], "test": []}, {"a": 3, "b": 4, "c": 0})
    index = split_index(store, "train", "wm")
    assert index.split == "train" and index.group == "wm" and index.subjects == ("b", "a")
    assert [n.tolist() for n in index.lengths] == [[2, 3, 4, 5], [2, 3, 4]]
    assert index.lengths[0].dtype == np.int64 and index.lengths_mm[0].dtype == np.float32
    assert np.allclose(index.lengths_mm[1], [1.0, 1.5, 2.0])
    copy = pickle.loads(pickle.dumps(index))
    assert copy.subjects == index.subjects and np.array_equal(copy.lengths[0], index.lengths[0])
    with pytest.raises(ConfigError, match=r"'nope'.*\['test', 'train', 'valid'\]"):
        split_index(store, "nope", "wm")
    with pytest.raises(ConfigError, match="'test'.*no"):
        split_index(store, "test", "wm")
    with pytest.raises(ConfigError, match="'valid'.*streamlines"):
        split_index(store, "valid", "wm")
