"""Stores outside a plain local folder: a .zip of the store (opened lazily in each process)
and fsspec URLs; every read equals the folder's, validation errors stay the same."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tractrain.data.dataloader import make_dataloader
from tractrain.data.interpolation import InputConfig
from tractrain.data.packing import SamplerConfig
from tractrain.data.sampler import BatchSampler
from tractrain.data.split_index import split_index
from tractrain.data.store import open_store
from tractrain.errors import StoreError


def zip_folder(folder: Path, out: Path, prefix: str = "", skip: str | None = None) -> Path:
    """Zip ``folder``'s files (uncompressed), names relative to it under ``prefix``."""
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder).as_posix()
            if path.is_file() and not (skip and rel.startswith(skip)):
                archive.write(path, prefix + rel)
    return out


@pytest.fixture(scope="module")
def local(phantom_store):
    return open_store(phantom_store.path)


@pytest.fixture(scope="module")
def zipped(local, tmp_path_factory):
    return zip_folder(Path(local.path), tmp_path_factory.mktemp("zip") / "store.zip")


def assert_same_store(a, b):
    assert (a.subjects, a.splits) == (b.subjects, b.splits)
    assert (a.volume_groups, a.streamline_groups) == (b.volume_groups, b.streamline_groups)
    rng = np.random.default_rng(0)
    for subject in a.subjects:
        for group in a.streamline_groups:
            ia, ib = a.streamline_index(subject, group), b.streamline_index(subject, group)
            for field in ("offsets", "lengths", "lengths_mm"):
                np.testing.assert_array_equal(getattr(ia, field), getattr(ib, field))
            ids = rng.permutation(len(ia))[:25]
            for x, y in zip(a.gather(subject, group, ids), b.gather(subject, group, ids),
                            strict=True):
                np.testing.assert_array_equal(x, y)
            for key in a.streamline_groups[group].get("dps_keys", []):
                np.testing.assert_array_equal(a.dps(subject, group, key, ids),
                                              b.dps(subject, group, key, ids))
            assert a.streamline_info(subject, group).keys() == b.streamline_info(
                subject, group).keys()
        for group in a.volume_groups:
            np.testing.assert_array_equal(a.volume(subject, group), b.volume(subject, group))
            np.testing.assert_array_equal(a.volume_info(subject, group)["affine"],
                                          b.volume_info(subject, group)["affine"])


def test_zip_reads_equal_the_folder(local, zipped):
    store = open_store(zipped)
    assert store.path == str(zipped)
    assert_same_store(local, store)


def test_zip_of_the_folder_itself_opens(local, tmp_path):
    """``zip -r store.zip store.zarr`` puts everything under one top folder."""
    path = zip_folder(Path(local.path), tmp_path / "x.zip", prefix="store.zarr/")
    assert_same_store(local, open_store(path, lazy=False))


def test_zip_store_pickles_without_its_handle_and_reopens(local, zipped):
    store = open_store(zipped)
    store.volume(store.subjects[0], "dwi")  # opens the zip and fills the cache
    clone = pickle.loads(pickle.dumps(store))
    assert clone._group is None and clone.cache.nbytes == 0  # opened again on first read
    assert len(pickle.dumps(store)) < 50_000
    assert_same_store(local, clone)


@pytest.mark.parametrize("workers", [0, 2])
def test_zip_store_feeds_dataloader_workers_like_the_folder(local, zipped, workers):
    batches = []
    for store in (local, open_store(zipped)):
        sampler = BatchSampler(split_index(store, "train", "bundles"),
                               SamplerConfig(batch_size=40, max_batches=3), seed=1)
        loader = make_dataloader(store, sampler, group="bundles", num_workers=workers,
                                 inputs=InputConfig("dwi"))
        batches.append(list(loader))
    assert len(batches[0]) == 3
    for a, b in zip(*batches, strict=True):
        assert torch.equal(a.points, b.points) and torch.equal(a.inputs, b.inputs)


def test_fsspec_url_opens(local):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    fs.put(local.path, "/tractrain-test/store.zarr", recursive=True)
    try:
        store = open_store("memory://tractrain-test/store.zarr")
        assert store.path == "memory://tractrain-test/store.zarr"
        assert_same_store(local, store)
    finally:
        fs.rm("/tractrain-test", recursive=True)


def test_file_url_is_the_local_path(local):
    store = open_store("file://" + str(local.path))
    assert store.path == local.path
    assert store.subjects == local.subjects


def test_zip_validation_errors_match_the_folder(local, tmp_path):
    subject = local.subjects[0]
    broken = tmp_path / "broken.zip"
    zip_folder(Path(local.path), broken, skip=f"{subject}/dwi")
    with pytest.raises(StoreError, match=f"{subject}/dwi: volume group missing"):
        open_store(broken)
    not_zip = tmp_path / "fake.zip"
    not_zip.write_text("hello")
    with pytest.raises(StoreError, match="fake.zip: no such store"):
        open_store(not_zip)
    with pytest.raises(StoreError, match="missing.zip: no such store"):
        open_store(tmp_path / "missing.zip")
    empty = tmp_path / "empty.zip"
    zipfile.ZipFile(empty, "w").close()
    with pytest.raises(StoreError, match="empty.zip: not a tractrain store"):
        open_store(empty)


def test_zip_lists_chunks_per_array(local, zipped):
    """``lengths`` must not also count ``lengths_mm``'s chunks (zarr's ZipStore prefix bug)."""
    store = open_store(zipped)
    subject = store.subjects[0]
    for name in ("lengths", "lengths_mm", "offsets", "points"):
        arr, ref = store._array(subject, "bundles", name), local._array(subject, "bundles", name)
        assert arr.nchunks_initialized == ref.nchunks_initialized == arr.nchunks
