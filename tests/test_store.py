"""Store builder and reader: round trip, bad input, lazy/non-lazy, cache, forked workers."""

from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import zarr
from nibabel.streamlines import Tractogram

from tractrain.data import builder
from tractrain.data.builder import build_store
from tractrain.data.cache import ByteLRU
from tractrain.data.store import expand_ranges, open_store
from tractrain.errors import ConfigError, StoreError

AFFINE = np.array([[2.0, 0, 0, -30], [0, 2.0, 0, -40], [0, 0, 2.5, -10], [0, 0, 0, 1]])
SHAPE = (10, 12, 8)


def _streamlines(rng, n=20):
    out = []
    for _ in range(n):
        k = int(rng.integers(3, 15))
        start = rng.uniform([2, 2, 2], [8, 10, 6])
        vox = start + np.cumsum(rng.normal(0, 0.3, (k, 3)), axis=0)
        vox = np.clip(vox, 0, np.array(SHAPE) - 1)  # inside the volume: builds refuse others
        out.append(nib.affines.apply_affine(AFFINE, vox).astype(np.float32))
    return out


def write_subject(folder, rng, n_features=3, affine=AFFINE, shape=SHAPE, tck=False):
    folder.mkdir(parents=True)
    dwi = rng.normal(5, 2, shape + (n_features,)).astype(np.float32)
    nib.save(nib.Nifti1Image(dwi, affine), folder / "dwi.nii.gz")
    fa = rng.uniform(0, 1, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(fa, affine), folder / "fa.nii.gz")
    mask = np.zeros(shape, np.uint8)
    mask[2:8, 2:10, 1:7] = 1
    nib.save(nib.Nifti1Image(mask, affine), folder / "mask.nii.gz")
    streamlines = _streamlines(rng)
    tractogram = Tractogram(streamlines, affine_to_rasmm=np.eye(4))
    if tck:
        nib.streamlines.save(tractogram, str(folder / "bundle.tck"))
    else:
        header = {"voxel_to_rasmm": affine, "dimensions": shape,
                  "voxel_sizes": nib.affines.voxel_sizes(affine)}
        nib.streamlines.save(nib.streamlines.TrkFile(tractogram, header=header),
                             str(folder / "bundle.trk"))
    return {"dwi": dwi, "fa": fa, "mask": mask.astype(bool), "streamlines": streamlines}


def make_config(**groups):
    config = {
        "groups": {
            "input": {"type": "volume", "files": ["dwi.nii.gz", "fa.nii.gz"],
                      "standardization": "independent", "mask": "mask.nii.gz"},
            "tracts": {"type": "streamlines", "files": ["bundle.trk"], "reference": "dwi.nii.gz"},
        },
        "subjects": {"train": ["s1", "s2"], "valid": ["s3"], "test": []},
    }
    config["groups"].update(groups)
    return config


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    raw = {s: write_subject(tmp_path / "raw" / s, rng) for s in ("s1", "s2", "s3")}
    return tmp_path / "raw", raw


@pytest.fixture
def built(dataset, tmp_path):
    root, raw = dataset
    out = build_store(make_config(), tmp_path / "store.zarr", root, progress=False)
    return out, raw


def test_round_trip(built):
    path, raw = built
    store = open_store(path)
    assert store.subjects == ["s1", "s2", "s3"]
    assert store.splits == {"train": ["s1", "s2"], "valid": ["s3"], "test": []}
    assert store.volume_groups["input"]["feature_names"] == ["dwi_0", "dwi_1", "dwi_2", "fa"]
    assert store.provenance["tool"].startswith("tractrain ")
    for subject, data in raw.items():
        info = store.volume_info(subject, "input")
        np.testing.assert_allclose(info["affine"], AFFINE)
        np.testing.assert_allclose(info["voxel_sizes"], [2.0, 2.0, 2.5])
        full = np.concatenate([data["dwi"], data["fa"][..., None]], axis=3)
        inside = full[data["mask"]].astype(np.float64)
        stats = info["standardization"]
        np.testing.assert_allclose(stats["means"], inside.mean(0), rtol=1e-6)
        np.testing.assert_allclose(stats["stds"], inside.std(0), rtol=1e-6)
        volume = store.volume(subject, "input")
        expected = np.zeros_like(full)
        expected[data["mask"]] = (inside - inside.mean(0)) / inside.std(0)
        np.testing.assert_allclose(volume, expected, atol=1e-5)
        index = store.streamline_index(subject, "tracts")
        lengths = [len(s) for s in data["streamlines"]]
        np.testing.assert_array_equal(index.lengths, lengths)
        np.testing.assert_array_equal(index.offsets, np.concatenate([[0], np.cumsum(lengths)]))
        ids = np.array([5, 0, 17, 3])
        points, got_lengths = store.gather(subject, "tracts", ids)
        vox = [nib.affines.apply_affine(np.linalg.inv(AFFINE), data["streamlines"][i])
               for i in ids]
        np.testing.assert_allclose(points, np.concatenate(vox), atol=1e-4)
        np.testing.assert_array_equal(got_lengths, [lengths[i] for i in ids])
        mm = [np.linalg.norm(np.diff(data["streamlines"][i], axis=0), axis=1).sum() for i in ids]
        np.testing.assert_allclose(index.lengths_mm[ids], mm, rtol=1e-5)


@pytest.mark.parametrize("budget", [None, 64])  # points cached, or read per batch (oindex)
def test_lazy_and_eager_agree(built, budget):
    path, _ = built
    lazy, eager = open_store(path, lazy=True, cache_bytes=budget), open_store(path, lazy=False)
    rng = np.random.default_rng(1)
    for subject in lazy.subjects:
        np.testing.assert_array_equal(lazy.volume(subject, "input"),
                                      eager.volume(subject, "input"))
        ids = rng.permutation(20)[:9]
        for a, b in zip(lazy.gather(subject, "tracts", ids), eager.gather(subject, "tracts", ids),
                        strict=True):
            np.testing.assert_array_equal(a, b)


def test_lazy_cache_respects_byte_budget(built):
    path, _ = built
    one = open_store(path, lazy=False).volume("s1", "input").nbytes
    store = open_store(path, lazy=True, cache_bytes=int(one * 2.5))  # room for two volumes
    for subject in ("s1", "s2", "s1", "s3"):
        store.volume(subject, "input")
        assert store.cache.nbytes <= one * 2.5
    assert (store.cache.hits, store.cache.misses, store.cache.evictions) == (1, 3, 1)
    assert store.cache.keys() == [("s1", "input"), ("s3", "input")]  # s2 least recently used


def test_byte_lru_evicts_least_recent():
    cache = ByteLRU(max_bytes=250)
    arrays = {k: np.zeros(100, np.uint8) for k in "abc"}
    cache.get("a", lambda: arrays["a"])
    cache.get("b", lambda: arrays["b"])
    cache.get("a", lambda: arrays["a"])  # a is now most recent
    cache.get("c", lambda: arrays["c"])  # evicts b
    assert cache.keys() == ["a", "c"] and cache.nbytes == 200
    big = np.zeros(300, np.uint8)
    assert cache.get("big", lambda: big) is big and "big" not in cache


def test_expand_ranges_matches_loop():
    starts, lengths = np.array([5, 0, 9]), np.array([2, 3, 0])
    expected = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)])
    np.testing.assert_array_equal(expand_ranges(starts, lengths), expected)


def _read_in_child(args):
    store, subject = args
    points, _ = store.gather(subject, "tracts", [1, 2, 3])
    return float(points.sum()), float(store.volume(subject, "input").sum())


def test_store_opened_in_parent_works_in_forked_workers(built):
    path, _ = built
    store = open_store(path, lazy=True)
    expected = [_read_in_child((store, s)) for s in store.subjects]  # parent handles are open
    with mp.get_context("fork").Pool(2) as pool:
        got = pool.map(_read_in_child, [(store, s) for s in store.subjects])
    assert got == expected


def test_tck_with_reference_and_compress(dataset, tmp_path):
    root, raw = dataset
    rng = np.random.default_rng(3)
    for s in ("t1", "t2"):
        write_subject(root / s, rng, tck=True)
    config = make_config(tracts={"type": "streamlines", "files": ["*.tck"],
                                 "reference": "dwi.nii.gz"})
    config["subjects"] = {"train": ["t1"], "valid": ["t2"]}
    store = open_store(build_store(config, tmp_path / "tck.zarr", root, progress=False))
    assert len(store.streamline_index("t1", "tracts")) == 20
    assert store.streamline_info("t1", "tracts")["reference"] == "dwi.nii.gz"


def _expect_error(config, root, out, match, exc=ConfigError):
    with pytest.raises(exc, match=match):
        build_store(config, out, root, progress=False)
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_bad_inputs_are_refused_and_nothing_is_written(dataset, tmp_path):
    root, _ = dataset
    out = tmp_path / "bad.zarr"
    rng = np.random.default_rng(5)

    _expect_error(make_config(input={"type": "volume", "files": ["nope*.nii.gz"]}), root, out,
                  "nope\\*.nii.gz: no file matches")
    config = make_config()
    config["groups"]["input"]["standardization"] = "zscore"
    _expect_error(config, root, out, "unknown mode 'zscore'")
    config = make_config()
    config["subjects"]["valid"] = ["s1"]
    _expect_error(config, root, out, "'s1' is listed in both 'train' and 'valid'")
    config = make_config()
    config["subjects"]["test"] = ["ghost"]
    _expect_error(config, root, out, "'ghost'.*has no folder")
    _expect_error({"groups": {}}, root, out, "missing key 'subjects'")
    config = make_config()
    config["groups"]["input"]["standardisation"] = "all"
    _expect_error(config, root, out, "did you mean 'standardization'")

    bad = root / "s2"
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.float32), AFFINE * 1.1), bad / "fa.nii.gz")
    _expect_error(make_config(), root, out, "fa.nii.gz: shape .* differ")
    nib.save(nib.Nifti1Image(np.ones(SHAPE + (1, 2), np.float32), AFFINE), bad / "fa.nii.gz")
    _expect_error(make_config(), root, out, "expected a 3-D or 4-D volume, got 5-D")
    nib.save(nib.Nifti1Image(np.ones(SHAPE + (0,), np.float32), AFFINE), bad / "fa.nii.gz")
    _expect_error(make_config(), root, out, "empty volume")
    nan = np.ones(SHAPE, np.float32)
    nan[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(nan, AFFINE), bad / "fa.nii.gz")
    _expect_error(make_config(), root, out, "1 NaN/inf voxels")
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.float32), AFFINE), bad / "fa.nii.gz")

    header = {"voxel_to_rasmm": AFFINE, "dimensions": SHAPE}
    nib.streamlines.save(nib.streamlines.TrkFile(Tractogram([], affine_to_rasmm=np.eye(4)),
                                                 header=header), str(bad / "bundle.trk"))
    _expect_error(make_config(), root, out, "bundle.trk: empty tractogram")
    write_subject(root / "c1", rng, tck=True)
    config = make_config(tracts={"type": "streamlines", "files": ["bundle.tck"]})
    config["subjects"] = {"train": ["c1"]}
    _expect_error(config, root, out, "bundle.tck: a .tck file needs a 'reference'")


def test_interrupted_build_leaves_no_store(dataset, tmp_path, monkeypatch):
    root, _ = dataset
    out = tmp_path / "int.zarr"
    real, calls = builder.build_subject, []

    def crash_on_second(*args):
        calls.append(args[-1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(builder, "build_subject", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        build_store(make_config(), out, root, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".int.zarr.tmp-*"))


def test_open_refuses_bad_stores(built, tmp_path):
    path, _ = built
    with pytest.raises(StoreError, match="no such store"):
        open_store(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="not a tractrain store"):
        open_store(tmp_path / "plain")
    other = zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    other.attrs["format"] = "something-else"
    with pytest.raises(StoreError, match="not a tractrain store"):
        open_store(tmp_path / "other.zarr")
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["version"] = 99
    with pytest.raises(StoreError, match="version 99 is not supported"):
        open_store(path)
    group.attrs["version"] = 1
    group["s2/input"].attrs["feature_names"] = ["a", "b", "c", "d"]
    with pytest.raises(StoreError, match="s2/input: features .* differ"):
        open_store(path)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tractrain.bin.build_store", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


def test_cli_builds_refuses_existing_and_reports_bad_config(dataset, tmp_path):
    root, _ = dataset
    config = tmp_path / "config.json"
    config.write_text(json.dumps(make_config()))
    out = tmp_path / "cli.zarr"
    done = _cli(config, out, "--root", root, "--quiet")
    assert done.returncode == 0, done.stderr
    assert open_store(out).subjects == ["s1", "s2", "s3"]
    again = _cli(config, out, "--root", root, "--quiet")
    assert again.returncode == 2 and "already exists" in again.stderr
    assert "Traceback" not in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert _cli(config, out, "--root", root, "--quiet", "--force").returncode == 0
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    bad = _cli(broken, tmp_path / "b.zarr")
    assert bad.returncode == 2 and "broken.json: not valid JSON" in bad.stderr
    assert not (tmp_path / "b.zarr").exists()
