"""Batch loading on a phantom store: contents, determinism, workers bit-identity, device
interpolation, lazy vs eager."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from tractrain.data.augment import AugmentConfig
from tractrain.data.batch import DeviceInputs, load_batch
from tractrain.data.dataloader import make_dataloader
from tractrain.data.interpolation import InputConfig
from tractrain.data.packing import SamplerConfig
from tractrain.data.sampler import BatchSampler
from tractrain.data.split_index import split_index
from tractrain.data.store import open_store
from tractrain.errors import ConfigError

GROUP = "bundles"
AUG = AugmentConfig(step_size=1.0, split_ratio=0.5, reverse_ratio=0.5, noise_mm=0.2)
INPUTS = InputConfig("dwi", neighborhood="axes", radius_mm=2.0)


def _sampler(store, split="train", shuffle=True):
    return BatchSampler(split_index(store, split, GROUP),
                        SamplerConfig(batch_size=2000, units="points"), seed=11, shuffle=shuffle)


def _batches(loader, n=None):
    out = []
    for batch in loader:
        out.append(batch)
        if n is not None and len(out) == n:
            break
    return out


def _assert_equal(a, b):
    assert a.subject_names == b.subject_names and (a.epoch, a.index) == (b.epoch, b.index)
    for name in ("points", "lengths", "subjects", "streamline_ids", "inputs"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y), name


def test_load_batch_contents_match_store_and_scipy(phantom_store):
    store = phantom_store
    ids = [("sub-00", np.array([4, 0, 9])), ("sub-01", np.array([2]))]
    batch = load_batch(store, ids, group=GROUP, inputs=INPUTS)
    assert batch.subject_names == ("sub-00", "sub-01")
    assert batch.subjects.tolist() == [0, 0, 0, 1] and batch.streamline_ids.tolist() == [4, 0, 9, 2]
    expected = np.concatenate([store.gather(s, GROUP, i)[0] for s, i in ids])
    np.testing.assert_array_equal(batch.points.numpy(), expected)
    n_features = store.volume_groups["dwi"]["n_features"]
    assert batch.inputs.shape == (batch.num_points, 7 * n_features)  # 2 mm radius, 2 mm voxels
    volume = store.volume("sub-00", "dwi")
    pts = batch.points[: int(batch.lengths[:3].sum())].numpy().T
    for f in (0, n_features // 2, n_features - 1):
        ref = ndimage.map_coordinates(volume[..., f], pts, order=1, mode="grid-constant")
        np.testing.assert_allclose(batch.inputs[: pts.shape[1], f].numpy(), ref, atol=1e-5)
    assert torch.equal(batch.offsets[1:], torch.cumsum(batch.lengths, 0))
    padded, lengths = batch.padded()
    assert padded.shape == (4, int(lengths.max()), 3)


def test_augmentation_is_a_pure_function_of_the_rng(phantom_store):
    ids = [("sub-00", np.arange(20)), ("sub-01", np.arange(5, 15))]
    one, two = (load_batch(phantom_store, ids, group=GROUP, augment=AUG,
                           rng=np.random.default_rng(5)) for _ in range(2))
    _assert_equal(one, two)
    other = load_batch(phantom_store, ids, group=GROUP, augment=AUG,
                       rng=np.random.default_rng(6))
    assert not torch.equal(one.points, other.points)
    assert len(one) > 30  # split ratio 0.5 of 30 streamlines added halves
    with pytest.raises(ConfigError, match="needs an rng"):
        load_batch(phantom_store, ids, group=GROUP, augment=AUG)


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_give_bit_identical_batches(phantom_store, workers):
    reference = _batches(make_dataloader(phantom_store, _sampler(phantom_store), group=GROUP,
                                         augment=AUG, inputs=INPUTS, num_workers=0))
    loader = make_dataloader(phantom_store, _sampler(phantom_store), group=GROUP, augment=AUG,
                             inputs=INPUTS, num_workers=workers, persistent_workers=True,
                             pin_memory=torch.cuda.is_available())
    got = _batches(loader)
    assert len(got) == len(reference) > 1
    for a, b in zip(reference, got, strict=True):
        _assert_equal(a, b)
    second_epoch = _batches(loader)  # persistent workers, next epoch
    assert second_epoch[0].epoch == 1 and not torch.equal(second_epoch[0].points, got[0].points)


def test_resumed_sampler_reproduces_the_rest_of_the_epoch(phantom_store):
    full = _batches(make_dataloader(phantom_store, _sampler(phantom_store), group=GROUP,
                                    augment=AUG))
    sampler = _sampler(phantom_store)
    sampler.set_epoch(0, start=2)
    rest = _batches(make_dataloader(phantom_store, sampler, group=GROUP, augment=AUG))
    for a, b in zip(full[2:], rest, strict=True):
        _assert_equal(a, b)


def test_device_interpolation_equals_worker_interpolation(phantom_store):
    workers = _batches(make_dataloader(phantom_store, _sampler(phantom_store), group=GROUP,
                                       augment=AUG, inputs=INPUTS), 2)
    plain = _batches(make_dataloader(phantom_store, _sampler(phantom_store), group=GROUP,
                                     augment=AUG, inputs=INPUTS, interpolate="device"), 2)
    prepare = DeviceInputs(phantom_store, GROUP, INPUTS)
    for a, b in zip(workers, plain, strict=True):
        assert b.inputs is None
        b = prepare(b, "cpu")
        torch.testing.assert_close(a.inputs, b.inputs, rtol=0, atol=1e-6)


def test_lazy_and_eager_stores_give_the_same_batches(phantom_store):
    eager = open_store(phantom_store.path, lazy=False)
    a = _batches(make_dataloader(phantom_store, _sampler(phantom_store), group=GROUP,
                                 augment=AUG, inputs=INPUTS), 2)
    b = _batches(make_dataloader(eager, _sampler(eager), group=GROUP, augment=AUG,
                                 inputs=INPUTS), 2)
    for x, y in zip(a, b, strict=True):
        _assert_equal(x, y)


def test_validation_batches_are_fixed_and_unaugmented(phantom_store):
    sampler = _sampler(phantom_store, "valid", shuffle=False)
    loader = make_dataloader(phantom_store, sampler, group=GROUP, augment=AUG.deterministic())
    first, second = _batches(loader), _batches(loader)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.points, b.points) and torch.equal(a.streamline_ids, b.streamline_ids)


def test_bad_feeding_options(phantom_store):
    with pytest.raises(ConfigError, match="unknown split|split"):
        split_index(phantom_store, "tets", GROUP)
    with pytest.raises(ConfigError, match="interpolate"):
        make_dataloader(phantom_store, _sampler(phantom_store), group=GROUP, interpolate="gpu")
