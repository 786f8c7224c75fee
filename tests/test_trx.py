"""TRX tractograms: built without a reference volume (the header holds the space), with the
space checks of the other formats, and written by tractrain-track."""

from __future__ import annotations

import zipfile

import nibabel as nib
import numpy as np
import pytest
from nibabel.streamlines import Tractogram
from trx import trx_file_memmap

from tractrain.data.builder import build_store
from tractrain.data.store import open_store
from tractrain.data.trx_io import header_space
from tractrain.errors import ConfigError, StoreError

AFFINE = np.array([[2.0, 0, 0, -30], [0, 2.0, 0, -40], [0, 0, 2.5, -10], [0, 0, 0, 1]])
SHAPE = (10, 12, 8)


def _subject(folder, rng, n=25):
    """dwi.nii.gz and bundle.trk (a data-per-streamline key 'bundle') in ``folder``."""
    folder.mkdir(parents=True)
    nib.save(nib.Nifti1Image(rng.normal(5, 2, SHAPE + (2,)).astype(np.float32), AFFINE),
             folder / "dwi.nii.gz")
    lines = []
    for _ in range(n):
        vox = rng.uniform([1, 1, 1], [8, 10, 6]) + np.cumsum(rng.normal(0, 0.3, (8, 3)), 0)
        lines.append(nib.affines.apply_affine(AFFINE, np.clip(vox, 0, np.array(SHAPE) - 1)))
    tractogram = Tractogram([s.astype(np.float32) for s in lines], affine_to_rasmm=np.eye(4),
                            data_per_streamline={"bundle": rng.integers(0, 3, (n, 1))})
    header = {"voxel_to_rasmm": AFFINE, "dimensions": SHAPE,
              "voxel_sizes": nib.affines.voxel_sizes(AFFINE)}
    nib.streamlines.save(nib.streamlines.TrkFile(tractogram, header=header),
                         str(folder / "bundle.trk"))


def _trx_from_trk(trk, out, compression=zipfile.ZIP_STORED, shift_mm=0.0):
    """``out``.trx made by trx-python itself from ``trk`` (its header as the reference)."""
    tractogram = nib.streamlines.load(str(trk)).tractogram
    if shift_mm:
        tractogram.streamlines._data += shift_mm
    trx = trx_file_memmap.TrxFile.from_tractogram(tractogram, reference=str(trk))
    trx_file_memmap.save(trx, str(out), compression_standard=compression)
    trx.close()


def _config(**tracts):
    return {"groups": {"dwi": {"type": "volume", "files": ["dwi.nii.gz"]},
                       "tracts": {"type": "streamlines", **tracts}},
            "subjects": {"train": ["s1"], "valid": ["s2"]}}


@pytest.fixture
def raw(tmp_path):
    rng = np.random.default_rng(7)
    for subject in ("s1", "s2"):
        _subject(tmp_path / "raw" / subject, rng)
    return tmp_path / "raw"


def test_trx_without_reference_builds_the_store_a_trk_with_reference_does(raw, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv("TRX_TMPDIR", str(tmp_path / "trx_tmp"))  # where trx-python unpacks
    (tmp_path / "trx_tmp").mkdir()
    _trx_from_trk(raw / "s1" / "bundle.trk", raw / "s1" / "bundle.trx")
    _trx_from_trk(raw / "s2" / "bundle.trk", raw / "s2" / "bundle.trx", zipfile.ZIP_DEFLATED)
    from_trk = open_store(build_store(_config(files=["bundle.trk"], reference="dwi.nii.gz"),
                                      tmp_path / "trk.zarr", raw, progress=False))
    from_trx = open_store(build_store(_config(files=["bundle.trx"]), tmp_path / "trx.zarr", raw,
                                      progress=False))
    for subject in ("s1", "s2"):
        a, b = (s.streamline_info(subject, "tracts") for s in (from_trk, from_trx))
        np.testing.assert_allclose(b["affine"], a["affine"], atol=1e-5)
        assert b["dimensions"] == a["dimensions"] == list(SHAPE)
        assert b["reference"] is None
        ids = np.arange(a["n_streamlines"])
        (pa, la), (pb, lb) = (s.gather(subject, "tracts", ids) for s in (from_trk, from_trx))
        np.testing.assert_array_equal(lb, la)
        mm = [nib.affines.apply_affine(np.asarray(i["affine"]), p) for i, p in ((a, pa), (b, pb))]
        assert np.abs(mm[1] - mm[0]).max() < 1e-4  # the same points in RAS+ mm
        np.testing.assert_array_equal(from_trx.dps(subject, "tracts", "bundle", ids),
                                      from_trk.dps(subject, "tracts", "bundle", ids))
    assert list((tmp_path / "trx_tmp").iterdir()) == []  # the unpacked file was cleaned up


def test_trx_space_checks_and_bad_files(raw, tmp_path):
    _trx_from_trk(raw / "s1" / "bundle.trk", raw / "s1" / "bundle.trx", shift_mm=40.0)
    _trx_from_trk(raw / "s2" / "bundle.trk", raw / "s2" / "bundle.trx")
    with pytest.raises(StoreError, match=r"subject s1: .*bundle\.trx: 100\.0% of streamline "
                                         r"points .* outside the reference volume"):
        build_store(_config(files=["bundle.trx"]), tmp_path / "out.zarr", raw, progress=False)
    assert not (tmp_path / "out.zarr").exists()
    build_store(_config(files=["bundle.trx"]), tmp_path / "out.zarr", raw, progress=False,
                allow_outside=True)  # accepted when asked

    # files of a group without reference must share their header's space
    moved = AFFINE.copy()
    moved[0, 3] += 1.0
    header = {"voxel_to_rasmm": moved, "dimensions": SHAPE, "voxel_sizes": [2.0, 2.0, 2.5]}
    for subject in ("s1", "s2"):
        lines = nib.streamlines.load(str(raw / subject / "bundle.trk")).tractogram
        nib.streamlines.save(nib.streamlines.TrkFile(lines, header=header),
                             str(raw / subject / "more.trk"))
    with pytest.raises(ConfigError, match=r"more\.trk: header space .* differs from "
                                          r"bundle\.trx's .* give the group a 'reference'"):
        build_store(_config(files=["bundle.trx", "more.trk"]), tmp_path / "two.zarr", raw,
                    progress=False, allow_outside=True)

    (raw / "s2" / "bundle.trx").write_bytes(b"not a zip file")
    with pytest.raises(ConfigError, match=r"bundle\.trx: cannot read as TRX") as err:
        build_store(_config(files=["bundle.trx"]), tmp_path / "bad.zarr", raw, progress=False,
                    allow_outside=True)
    assert "\n" not in str(err.value)
    for bad, field in (({"DIMENSIONS": [10, 12, 8]}, "VOXEL_TO_RASMM"),
                       ({"VOXEL_TO_RASMM": np.zeros((4, 4)), "DIMENSIONS": [1, 2, 3]},
                        "VOXEL_TO_RASMM"),
                       ({"VOXEL_TO_RASMM": AFFINE, "DIMENSIONS": [10, 0, 8]}, "DIMENSIONS")):
        with pytest.raises(ConfigError, match=field):
            header_space(bad, "x.trx")


def test_track_writes_a_trx_with_the_points_of_the_trk(trained_experiment, phantom_store,
                                                       tmp_path, one_thread):
    from tractrain.bin.track import main as track_main

    subject = phantom_store.splits["valid"][0]
    outs = [tmp_path / "tracks.trk", tmp_path / "tracks.trx"]
    for out in outs:
        assert track_main([str(trained_experiment), "--subject", subject, "--seeds", "15",
                           "--device", "cpu", "--out", str(out)]) == 0
    trk = nib.streamlines.load(str(outs[0]))
    trx = trx_file_memmap.load(str(outs[1]))
    try:
        info = phantom_store.streamline_info(subject, "bundles")
        np.testing.assert_allclose(trx.header["VOXEL_TO_RASMM"], info["affine"], atol=1e-5)
        assert [int(d) for d in trx.header["DIMENSIONS"]] == info["dimensions"]
        assert len(trx.streamlines) == len(trk.streamlines) == 15
        for a, b in zip(trk.streamlines, trx.streamlines, strict=True):
            assert a.shape == b.shape and np.abs(np.asarray(b) - a).max() < 1e-4
    finally:
        trx.close()
    # dipy reads it back too (through trx-python), in RAS+ mm
    from dipy.io.streamline import load_tractogram

    sft = load_tractogram(str(outs[1]), "same")
    sft.to_rasmm()
    points = np.concatenate(list(sft.streamlines))
    assert np.abs(points - np.concatenate(list(trk.streamlines))).max() < 1e-4
