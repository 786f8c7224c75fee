"""Capped validation: a fixed, seeded sample spread over every subject and bundle."""

from __future__ import annotations

import numpy as np
import pytest

from tractrain.data.packing import SamplerConfig
from tractrain.data.sampler import BatchSampler
from tractrain.data.split_index import SplitIndex
from tractrain.data.valid_sample import (
    allocate,
    coverage,
    sample_size,
    stratified_order,
    stratified_sample,
)
from tractrain.errors import ConfigError


def stored_by_bundle(counts_per_subject: list[list[int]], seed: int = 0):
    """A valid split stored bundle by bundle (as tractograms are), and each streamline's
    bundle."""
    rng = np.random.default_rng(seed)
    names, lengths, strata = [], [], []
    for s, per_bundle in enumerate(counts_per_subject):
        names.append(f"sub-{s}")
        strata.append(np.repeat(np.arange(len(per_bundle)), per_bundle))
        lengths.append(rng.integers(20, 120, int(sum(per_bundle))))
    lengths_mm = [n.astype(np.float32) for n in lengths]
    return SplitIndex("valid", "bundles", tuple(names), tuple(lengths), tuple(lengths_mm)), strata


def evaluated(sampler: BatchSampler, epoch: int) -> dict[str, np.ndarray]:
    seen: dict[str, list] = {}
    for spec in list(iter(sampler)):
        assert spec.epoch == epoch
        for subject, ids in spec.ids:
            seen.setdefault(subject, []).append(ids)
    return {s: np.sort(np.concatenate(v)) for s, v in seen.items()}


def test_capped_validation_covers_every_subject_and_bundle_identically_each_epoch():
    index, strata = stored_by_bundle([[120, 80, 60], [50, 150, 40], [90, 90, 90]])
    config = SamplerConfig(batch_size=2000, units="points", max_batches=3)
    size = sample_size(index, max_cost=3 * 2000, units="points")
    sample = stratified_sample(index, size, seed=7, strata=strata)
    sampler = BatchSampler(sample, config, seed=7, shuffle=False)
    first = evaluated(sampler, 0)
    assert sampler.epoch == 1
    assert set(first) == set(index.subjects)  # every validation subject ...
    for s, name in enumerate(index.subjects):
        bundles = set(strata[s][first[name]].tolist())
        assert bundles == {0, 1, 2}  # ... and every one of its bundles
    share = sum(ids.size for ids in first.values()) / index.counts.sum()
    assert 0 < share < 0.25
    again = evaluated(sampler, 1)  # the next epoch: the same streamlines
    assert all(np.array_equal(first[k], again[k]) for k in first)
    # a resumed run rebuilds the sample from the saved seed and restores the position
    resumed = BatchSampler(stratified_sample(index, size, seed=7, strata=strata), config,
                           seed=7, shuffle=False)
    resumed.load_state_dict(sampler.state_dict())
    after = evaluated(resumed, 2)
    assert all(np.array_equal(first[k], after[k]) for k in first)


def test_first_batches_in_store_order_would_cover_one_bundle():
    """Why the sample exists: capping the unsampled split reads only the first bundle."""
    index, strata = stored_by_bundle([[120, 80, 60], [50, 150, 40]])
    capped = BatchSampler(index, SamplerConfig(batch_size=2000, units="points", max_batches=1),
                          seed=7, shuffle=False)
    seen = evaluated(capped, 0)
    assert {int(b) for s, name in enumerate(index.subjects) if name in seen
            for b in strata[s][seen[name]]} == {0}


def test_sample_is_seeded_proportional_and_uncapped_is_the_whole_split():
    index, strata = stored_by_bundle([[100, 100], [300, 100]])
    a = stratified_sample(index, 60, seed=1, strata=strata)
    b = stratified_sample(index, 60, seed=1, strata=strata)
    c = stratified_sample(index, 60, seed=2, strata=strata)
    assert all(np.array_equal(x, y) for x, y in zip(a.ids, b.ids, strict=True))
    assert not all(np.array_equal(np.sort(x), np.sort(y)) for x, y in zip(a.ids, c.ids,
                                                                         strict=True))
    assert a.counts.tolist() == [20, 40]  # in proportion to the subjects' streamlines
    assert np.bincount(strata[1][a.ids[1]]).tolist() == [30, 10]  # and to their bundles
    assert all(np.array_equal(n[i], m) for n, i, m in
               zip(index.lengths, a.ids, a.lengths, strict=True))  # lengths follow the ids
    assert stratified_sample(index, 600, seed=1) is index
    assert sample_size(index) == 600
    assert sample_size(index, fraction=0.1) == 60
    full = coverage(index, index, strata)
    assert full["streamlines"] == full["of_streamlines"] and full["strata"] == 2


def test_stratified_order_prefixes_and_allocation():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    order = stratified_order(labels, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(100))
    for k in (10, 20, 50):
        counts = np.bincount(labels[order[:k]], minlength=3)
        assert np.all(np.abs(counts - k * np.array([0.5, 0.3, 0.2])) <= 1)
    assert allocate(np.array([300, 0, 100]), 40).tolist() == [30, 0, 10]
    assert allocate(np.array([1000, 3]), 2).tolist() == [1, 1]  # every subject is drawn from
    assert allocate(np.array([5, 5]), 100).tolist() == [5, 5]


@pytest.mark.parametrize("kwargs", [{"fraction": 0.0}, {"fraction": 1.5}])
def test_bad_fraction_names_the_option(kwargs):
    index, _ = stored_by_bundle([[10]])
    with pytest.raises(ConfigError, match="valid_fraction"):
        sample_size(index, **kwargs)
