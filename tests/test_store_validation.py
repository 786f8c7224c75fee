"""Crafted or damaged stores are refused in one line, fast, without large allocations: every
case opens the store and reads every subject in a child process limited to 2 GiB of address
space (a plain import of torch + tractrain peaks near 0.8 GiB)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tractrain.data.store import open_store
from tractrain.errors import ConfigError, StoreError

LIMIT = 2 * 2**30
CHILD = textwrap.dedent("""
    import resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
    from tractrain.data.store import open_store
    from tractrain.errors import StoreError
    start = time.perf_counter()
    try:
        store = open_store(sys.argv[1])
        for subject in store.subjects:  # a first read of everything
            for group in store.volume_groups:
                store.volume(subject, group)
            for group in store.streamline_groups:
                store.gather(subject, group, [0])
    except StoreError as err:
        print(f"{{time.perf_counter() - start:.3f}} {{err}}")
        sys.exit(3)
    print("opened and read")
""").format(limit=LIMIT)


def edit(path: Path, change) -> None:
    """Rewrite the JSON file ``path`` with ``change(meta)`` applied."""
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def refused(store: Path) -> str:
    """The one-line refusal of ``store``, after checking time and exit status."""
    done = subprocess.run([sys.executable, "-c", CHILD, str(store)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 3, done.stdout + done.stderr
    seconds, message = done.stdout.strip().split(" ", 1)
    assert "\n" not in message and float(seconds) < 5.0, done.stdout
    assert message.startswith(str(store)), message
    return message


@pytest.fixture
def copy(phantom_store, tmp_path) -> Path:
    out = tmp_path / "store.zarr"
    shutil.copytree(phantom_store.path, out)
    return out


def _root(meta, **attrs):
    meta["attributes"].update(attrs)


def _vol(meta, key, value):
    meta["attributes"][key] = value


CASES = {  # name: (file inside the store, change, expected part of the message)
    "subjects of dicts": ("zarr.json", lambda m: _root(m, subjects=[{"id": 1}]),
                          "'subjects': expected a list of strings"),
    "subject id escaping": ("zarr.json",
                            lambda m: _root(m, subjects=["../other.zarr/sub-00"], splits={}),
                            "'../other.zarr/sub-00' is not a plain name"),
    "no feature_names": ("zarr.json",
                         lambda m: m["attributes"]["volume_groups"]["dwi"].pop("feature_names"),
                         "volume_groups.dwi.feature_names: expected a list of strings"),
    "affine identity": ("sub-00/dwi/zarr.json", lambda m: _vol(m, "affine", "identity"),
                        "sub-00/dwi: attribute 'affine': expected a finite 4x4"),
    "voxel size 1e7": ("sub-00/dwi/zarr.json", lambda m: _vol(m, "voxel_sizes", [1e7, 1, 1]),
                       "sub-00/dwi: attribute 'voxel_sizes': expected 3 voxel sizes"),
    "singular streamline affine": (
        "sub-01/bundles/zarr.json",
        lambda m: _vol(m, "affine", [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]),
        "sub-01/bundles: attribute 'affine': affine is not invertible"),
    "negative shape": ("sub-00/dwi/zarr.json", lambda m: m.update(shape=[32, -32, 20, 64]),
                       "sub-00/dwi"),
    "1e5 cube volume": ("sub-00/dwi/zarr.json", lambda m: m.update(shape=[10**5] * 3 + [64]),
                        "exceeds the limit of"),
    "1e12 points": ("sub-00/bundles/points/zarr.json", lambda m: m.update(shape=[10**12, 3]),
                    "sub-00/bundles/points: declared shape (1000000000000, 3)"),
    "inflated chunk": (  # one chunk present, declaring ~5 GB: refused before decompressing
        "sub-00/dwi/zarr.json",
        lambda m: (m.update(shape=[1000, 1000, 20, 64]),
                   m["chunk_grid"]["configuration"].update(chunk_shape=[1000, 1000, 20, 64])),
        "is more than 1000x its"),
    "lengths shorter than offsets": (
        "sub-02/bundles/lengths/zarr.json",
        lambda m: (m.update(shape=[m["shape"][0] - 1]),
                   m["chunk_grid"]["configuration"].update(chunk_shape=[m["shape"][0]])),
        "sub-02/bundles/offsets: expected"),
}


@pytest.mark.parametrize("case", CASES)
def test_crafted_store_is_refused_in_one_line(copy, case):
    where, change, expected = CASES[case]
    edit(copy / where, change)
    assert expected in refused(copy)


def test_lost_volume_chunks_are_refused_not_read_as_zeros(copy):
    for chunk in (copy / "sub-02" / "dwi" / "c").rglob("*"):
        if chunk.is_file():
            chunk.unlink()
    assert "sub-02/dwi: 1 of 1 chunks missing" in refused(copy)


def test_lost_streamline_chunk_is_refused(copy):
    shutil.rmtree(copy / "sub-03" / "bundles" / "lengths_mm" / "c")
    assert "sub-03/bundles/lengths_mm: 1 of 1 chunks missing" in refused(copy)


def test_intact_copy_opens_under_the_same_limit(copy):
    done = subprocess.run([sys.executable, "-c", CHILD, str(copy)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "opened and read" in done.stdout, done.stderr


def test_max_array_bytes_is_configurable(copy):
    with pytest.raises(StoreError, match=r"sub-00/dwi: declared shape \(32, 32, 20, 64\) "
                                         r"\(5242880 bytes\) exceeds the limit of 1000000"):
        open_store(copy, max_array_bytes=10**6)


def test_trk_whose_n_count_disagrees_is_refused(tmp_path):
    from tractrain.data.builder import _load_tractogram, trk_counts

    rng = np.random.default_rng(0)
    lines = [rng.normal(size=(5, 3)).astype(np.float32) for _ in range(30)]
    path = tmp_path / "t.trk"
    nib.streamlines.save(nib.streamlines.Tractogram(lines, affine_to_rasmm=np.eye(4)),
                         str(path))
    assert trk_counts(path) == (30, 30)
    data = bytearray(path.read_bytes())
    data[988:992] = struct.pack("<i", 3)  # header n_count: 3, the file still holds 30
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"t\.trk: header n_count says 3 streamlines but "
                                          r"the file holds 30"):
        _load_tractogram(path, None)


def test_store_from_before_all_chunks_were_written_still_opens(copy):
    """Older builders let zarr skip all-zero chunks: without the ``all_chunks_written`` marker
    a volume's absent chunks read as zeros (as they were written), not as damage."""
    for chunk in (copy / "sub-02" / "dwi" / "c").rglob("*"):
        if chunk.is_file():
            chunk.unlink()
    edit(copy / "zarr.json", lambda m: m["attributes"].pop("all_chunks_written"))
    store = open_store(copy)
    assert not store.all_chunks
    assert not store.volume("sub-02", "dwi").any()
