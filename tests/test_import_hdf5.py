"""dwi_ml in: `tractrain-import-hdf5` on a real dwi_ml HDF5 file (tests/data/dwi_ml-a1ee02d,
written by dwi_ml's own script) against `tractrain-build-store` on the same NIfTI/trk files
and dwi_ml group config, its refusals, and training on the imported store."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import zarr

from tractrain.bin.build_store import main as build_main
from tractrain.bin.import_hdf5 import main as import_main
from tractrain.bin.train import main as train_main
from tractrain.data import import_hdf5 as importer
from tractrain.data.dwi_ml_config import translate
from tractrain.data.dwi_ml_hdf5 import subject_list
from tractrain.data.store import open_store
from tractrain.errors import ConfigError, StoreError

FIXTURE = Path(__file__).resolve().parent / "data" / "dwi_ml-a1ee02d"
SUBJECTS = ["sub-00", "sub-01", "sub-03", "sub-02"]
SPLITS = {"train": ["sub-00", "sub-01"], "valid": ["sub-03"], "test": ["sub-02"]}


def _cli(module: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"tractrain.bin.{module}", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def _main(main, capsys, *args) -> tuple[int, str]:
    """``(exit status, stderr)`` of a command run in this process (no interpreter start-up)."""
    capsys.readouterr()
    status = main([str(a) for a in args])
    return status, capsys.readouterr().err


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "imp.zarr"
    done = _cli("import_hdf5", FIXTURE / "phantom.hdf5", out, "--progress", "false")
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The same inputs through build-store with dwi_ml's group config and subject lists."""
    out = tmp_path_factory.mktemp("built") / "built.zarr"
    lists = [a for split in ("train", "valid", "test")
             for a in (f"--{split}-subjects", FIXTURE / f"{split}.txt")]
    assert build_main([str(a) for a in (FIXTURE / "config_dwiml.json", out, "--root",
                                        FIXTURE / "phantom", "--quiet", *lists)]) == 0
    return out


def _ras(group) -> np.ndarray:
    return nib.affines.apply_affine(np.asarray(group.attrs["affine"]), group["points"][...])


def test_import_matches_build_store_on_the_same_files(imported, built):
    a, b = zarr.open_group(str(imported), mode="r"), zarr.open_group(str(built), mode="r")
    for path in (imported, built):  # both open as valid stores, with dwi_ml's splits
        opened = open_store(path)
        assert opened.subjects == SUBJECTS and opened.splits == SPLITS
    assert a.attrs["volume_groups"] == b.attrs["volume_groups"]
    assert a.attrs["streamline_groups"] == b.attrs["streamline_groups"] == {
        "bundles": {"dps_keys": ["bundle"]}}
    for s in SUBJECTS:
        ga, gb = a[f"{s}/bundles"], b[f"{s}/bundles"]
        trk = nib.streamlines.load(str(FIXTURE / "phantom" / s / "bundles.trk"))
        # the same streamlines in world (RAS+ mm) coordinates as the .trk file: dwi_ml's
        # corner-origin voxels were shifted by half a voxel to our centre origin
        np.testing.assert_allclose(_ras(ga), trk.streamlines.get_data(), atol=1e-4)
        np.testing.assert_allclose(_ras(ga), _ras(gb), atol=1e-4)
        for key in ("offsets", "lengths", "dps/bundle"):
            np.testing.assert_array_equal(ga[key][...], gb[key][...])
        np.testing.assert_allclose(ga["lengths_mm"][...], gb["lengths_mm"][...], rtol=1e-5)
        assert ga.attrs["origin"] == "center" and ga.attrs["dimensions"] == [12, 12, 8]
        # volumes: equal inside the standardization mask; outside it tractrain writes zeros
        # while dwi_ml standardized those voxels too, with the same in-mask statistics
        va, vb = a[f"{s}/dwi"], b[f"{s}/dwi"]
        assert va.attrs["feature_names"] == vb.attrs["feature_names"]
        np.testing.assert_allclose(va.attrs["affine"], vb.attrs["affine"])
        mask = nib.load(str(FIXTURE / "phantom" / s / "mask.nii.gz")).get_fdata() > 0
        da, db = va[...], vb[...]
        np.testing.assert_allclose(da[mask], db[mask], atol=1e-5)
        assert not db[~mask].any()
        stats = vb.attrs["standardization"]
        raw = nib.load(str(FIXTURE / "phantom" / s / "dwi.nii.gz")).get_fdata()
        expected = (raw - np.asarray(stats["means"])) / np.asarray(stats["stds"])
        np.testing.assert_allclose(da[~mask], expected[~mask], atol=1e-5)
        assert va.attrs["standardization"]["mode"] == "independent"
        assert va.attrs["standardization"]["applied_by"] == "dwi_ml"
    source = a.attrs["provenance"]["source"]
    assert source["path"] == str((FIXTURE / "phantom.hdf5").resolve())
    assert source["attributes"]["step_size"] == "Not defined by user"
    assert source["groups_config"]["dwi"]["std_mask"] == ["mask.nii.gz"]


def test_training_runs_on_the_imported_store(imported, tmp_path):
    assert train_main([str(a) for a in (
        "--store", imported, "--experiments", tmp_path, "--name", "imp", "--max-epochs", "1",
        "--max-batches-train", "2", "--max-batches-valid", "1", "--batch-size", "200",
        "--progress", "false")]) == 0
    assert (tmp_path / "imp" / "checkpoint").exists()


def test_streamed_import_in_small_batches_and_slabs_is_identical(imported, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setattr(importer, "BATCH_POINTS", 7)
    monkeypatch.setattr(importer, "VOLUME_CHUNK", 5)
    seen: list = []
    out = importer.import_hdf5(FIXTURE / "phantom.hdf5", tmp_path / "small.zarr",
                               progress=False, check_points=lambda *a: seen.append(a))
    a, b = zarr.open_group(str(imported), mode="r"), zarr.open_group(str(out), mode="r")
    for s in SUBJECTS:
        for key in ("dwi", "bundles/points", "bundles/lengths_mm", "bundles/offsets"):
            np.testing.assert_array_equal(a[f"{s}/{key}"][...], b[f"{s}/{key}"][...])
    # the hook the space check plugs into sees every point once, then None per group
    for s in SUBJECTS:
        calls = [c for c in seen if c[0] == s]
        assert calls[-1][2] is None and all(c[2] is not None for c in calls[:-1])
        got = np.concatenate([c[2] for c in calls[:-1]])
        np.testing.assert_allclose(got, a[f"{s}/bundles/points"][...], atol=1e-6)


@pytest.mark.parametrize("space, origin", [("Space.VOX", "Origin.NIFTI"),
                                           ("Space.VOXMM", "Origin.TRACKVIS"),
                                           ("Space.RASMM", "Origin.NIFTI")])
def test_recorded_space_and_origin_are_converted_exactly(imported, tmp_path, space, origin):
    path = tmp_path / "moved.hdf5"
    shutil.copy(FIXTURE / "phantom.hdf5", path)
    with h5py.File(path, "r+") as f:
        for s in SUBJECTS:
            grp = f[f"{s}/bundles"]
            voxels = grp["data"][()].astype(np.float64) - 0.5  # centre origin
            if space == "Space.RASMM":
                points = nib.affines.apply_affine(grp.attrs["affine"], voxels)
            elif space == "Space.VOXMM":
                points = (voxels + 0.5) * grp.attrs["voxel_sizes"]
            else:
                points = voxels
            grp["data"][...] = points.astype(np.float32)
            grp.attrs["space"], grp.attrs["origin"] = space, origin
    out = importer.import_hdf5(path, tmp_path / "moved.zarr", progress=False)
    a, b = zarr.open_group(str(imported), mode="r"), zarr.open_group(str(out), mode="r")
    for s in SUBJECTS:
        np.testing.assert_allclose(_ras(b[f"{s}/bundles"]), _ras(a[f"{s}/bundles"]), atol=1e-4)


def _broken(tmp_path: Path, how: str) -> Path:
    path = tmp_path / "in.hdf5"
    if how == "not hdf5":
        path.write_text("subject,dwi\n")
    elif how == "no dwi_ml layout":
        with h5py.File(path, "w") as f:
            f["x"] = np.zeros(3)
    else:
        shutil.copy(FIXTURE / "phantom.hdf5", path)
        with h5py.File(path, "r+") as f:
            if how == "unknown group type":
                f["sub-01/dwi"].attrs["type"] = "peaks"
            else:  # inconsistent offsets
                f["sub-01/bundles/offsets"][3] += 1
    return path


@pytest.mark.parametrize("how, message", [
    ("not hdf5", "in.hdf5: not an HDF5 file"),
    ("no dwi_ml layout", "in.hdf5: not a dwi_ml HDF5 file (root attributes"),
    ("unknown group type", "in.hdf5: sub-01/dwi: group of unknown type 'peaks'"),
    ("inconsistent offsets", "in.hdf5: sub-01/bundles: offsets and lengths are inconsistent "
                             "at streamline 2"),
])
def test_bad_files_are_refused_in_one_line_and_nothing_is_written(tmp_path, capsys, how,
                                                                   message):
    status, err = _main(import_main, capsys, _broken(tmp_path, how), tmp_path / "out.zarr")
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and message in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.hdf5"]  # no OUT, no temp folder


def test_existing_out_is_kept_without_force_and_only_a_store_is_replaced(imported, tmp_path,
                                                                         capsys):
    out = tmp_path / "out.zarr"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    for extra in ((), ("--force",)):
        status, err = _main(import_main, capsys, FIXTURE / "phantom.hdf5", out, *extra)
        assert status == 2 and "already exists" in err and len(err.strip().splitlines()) == 1
        assert (out / "precious.txt").read_text() == "keep"
    store = tmp_path / "store.zarr"
    shutil.copytree(imported, store)
    (store / "stale").mkdir()  # replaced as a whole
    status, err = _main(import_main, capsys, FIXTURE / "phantom.hdf5", store, "--force",
                        "--progress", "false")
    assert status == 0, err
    assert open_store(store).subjects == SUBJECTS and not (store / "stale").exists()


def test_split_attributes_are_parsed_without_eval():
    assert subject_list(np.array(["a", "b"], dtype=object), "x") == ["a", "b"]
    assert subject_list(np.array([b"a"]), "x") == ["a"]
    assert subject_list(np.array([]), "x") == []
    assert subject_list("['sub-01' 'sub-02']", "x") == ["sub-01", "sub-02"]
    assert subject_list("['sub-01', \"sub-02\"]", "x") == ["sub-01", "sub-02"]
    for bad in ("[__import__('os').system('true')]", "['a' + 'b']", "sub-01", "['../x']"):
        with pytest.raises(StoreError, match="^x: "):
            subject_list(bad, "x")


def _groups() -> dict:
    return json.loads((FIXTURE / "config_dwiml.json").read_text())


def test_dwi_ml_config_translation_and_its_refusals():
    config = translate(_groups(), SPLITS, "c.json")
    assert config["groups"]["dwi"] == {"type": "volume", "files": ["dwi.nii.gz"],
                                       "standardization": "independent",
                                       "mask": "mask.nii.gz", "dtype": "float32"}
    assert config["groups"]["bundles"]["reference"] == "dwi.nii.gz"
    assert config["groups"]["bundles"]["dps_keys"] == ["bundle"]
    groups = _groups()
    del groups["bundles"]["dps_keys"]
    assert translate(groups, SPLITS)["groups"]["bundles"]["dps_keys"] == []  # dwi_ml's default
    cases = [("dwi", "nb_points", 1, r"c.json: dwi: unknown dwi_ml keys \['nb_points'\]"),
             ("bundles", "connectivity_matrix", "m.npy",
              r"c.json: bundles: dwi_ml keys \['connectivity_matrix'\] not supported"),
             ("dwi", "std_mask", ["a.nii.gz", "b.nii.gz"], r"c.json: dwi.std_mask: expected one")]
    for group, key, value, message in cases:
        groups = _groups()
        groups[group][key] = value
        with pytest.raises(ConfigError, match=message):
            translate(groups, SPLITS, "c.json")


def test_build_store_with_dwi_ml_config_needs_the_subject_lists(tmp_path, capsys):
    status, err = _main(build_main, capsys, FIXTURE / "config_dwiml.json", tmp_path / "o.zarr",
                        "--train-subjects", FIXTURE / "train.txt")
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "needs its subject lists: --valid-subjects, --test-subjects FILE missing" in err
    groups = _groups()
    groups["dwi"]["nb_points"] = 1
    (tmp_path / "c.json").write_text(json.dumps(groups))
    lists = [a for split in ("train", "valid", "test")
             for a in (f"--{split}-subjects", FIXTURE / f"{split}.txt")]
    status, err = _main(build_main, capsys, tmp_path / "c.json", tmp_path / "o.zarr", *lists)
    assert status == 2 and "c.json: dwi: unknown dwi_ml keys ['nb_points']" in err
    assert not (tmp_path / "o.zarr").exists()
    (tmp_path / "o.zarr").mkdir()  # --force replaces a store only, in build-store too
    status, err = _main(build_main, capsys, FIXTURE / "config_dwiml.json", tmp_path / "o.zarr",
                        "--force", *lists)
    assert status == 2 and "already exists and is not a tractrain store" in err
    assert (tmp_path / "o.zarr").is_dir()


def test_points_outside_the_volume_are_refused_at_import_unless_allowed(tmp_path, capsys):
    """The classic wrong-space bug in a dwi_ml file (points shifted by a whole volume): one
    line naming the subject, the file and the share outside; `--allow-outside` imports it."""
    path = tmp_path / "shifted.hdf5"
    shutil.copy(FIXTURE / "phantom.hdf5", path)
    with h5py.File(path, "r+") as f:
        grp = f["sub-01/bundles"]
        grp["data"][...] = grp["data"][()] + np.asarray(grp.attrs["dimensions"], np.float32)
    status, err = _main(import_main, capsys, path, tmp_path / "out.zarr", "--progress", "false")
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, err
    assert "subject sub-01" in lines[0] and "shifted.hdf5" in lines[0]
    assert "100.0% of streamline points" in lines[0] and "--allow-outside" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shifted.hdf5"]
    status, err = _main(import_main, capsys, path, tmp_path / "out.zarr", "--progress", "false",
                        "--allow-outside")
    assert status == 0, err
    assert open_store(tmp_path / "out.zarr").subjects == SUBJECTS


@pytest.mark.parametrize("flags, bar", [(["--progress", "true"], True), (["--quiet"], False),
                                        ([], False), (["--progress", "no"], False)])
def test_build_store_progress_flag(tmp_path, capsys, flags, bar):
    """`--progress true` draws the bar even into a log file (a batch job that wants it);
    by default it shows only on a terminal; `--quiet` is `--progress false`."""
    lists = [a for split in ("train", "valid", "test")
             for a in (f"--{split}-subjects", FIXTURE / f"{split}.txt")]
    status, err = _main(build_main, capsys, FIXTURE / "config_dwiml.json", tmp_path / "o.zarr",
                        "--root", FIXTURE / "phantom", *lists, *flags)
    assert status == 0, err
    assert ("build-store" in err and "subject/s" in err) is bar, err


def test_build_store_bad_progress_value(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:  # refused while parsing: one usage line
        build_main([str(FIXTURE / "config_dwiml.json"), str(tmp_path / "o.zarr"),
                    "--progress", "maybe"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--progress: expected true or false, got 'maybe'" in err
    assert not (tmp_path / "o.zarr").exists()
