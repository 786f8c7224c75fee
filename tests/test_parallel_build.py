"""``--jobs N`` of tractrain-build-store and tractrain-import-hdf5 (tractrain.data.parallel_build):
the same store as ``--jobs 1``, one-line errors with nothing left at OUT, parse-time refusal of
bad values, and the memory cap of the default."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import logging
import os
import shutil
import sys
import time
from functools import partial
from pathlib import Path

import pytest

from tractrain.data import parallel_build as pb

FIXTURE = Path(__file__).resolve().parent / "data" / "dwi_ml-a1ee02d"
BENCH = Path(__file__).resolve().parents[1] / "bench" / "build.py"
GIB = 2**30
# top-level imports stay light: spawned workers of the run_subjects tests import this module


def _bench():
    """bench/ is not an installed package: load bench/build.py by path."""
    spec = importlib.util.spec_from_file_location("tractrain_bench_build", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def cli(module: str, *args) -> tuple[int, str]:
    """``(exit status, stderr)`` of ``tractrain.bin.<module>.main(args)``, in this process."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            status = importlib.import_module(f"tractrain.bin.{module}").main(
                [str(a) for a in args])
        except SystemExit as stop:  # argparse
            status = stop.code
    return status, err.getvalue()


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    from tractrain.data.phantom import make_phantom

    root = tmp_path_factory.mktemp("jobs") / "raw"
    make_phantom(root, n_subjects=3, shape=(16, 16, 10), n_bundles=2,
                 streamlines_per_subject=40, snr=None)
    return root


def test_build_with_two_jobs_writes_the_same_store_as_one(raw, tmp_path):
    stores = [tmp_path / f"jobs{n}.zarr" for n in (1, 2)]
    for n, out in zip((1, 2), stores, strict=True):
        status, err = cli("build_store", raw / "config.json", out, "--jobs", n, "--quiet")
        assert status == 0, err
    # every array chunk and attribute byte for byte; of the root's provenance only "created"
    assert _bench().store_differences(*stores) == []


def test_import_with_two_jobs_writes_the_same_store_as_one(tmp_path):
    stores = [tmp_path / f"jobs{n}.zarr" for n in (1, 2)]
    for n, out in zip((1, 2), stores, strict=True):
        status, err = cli("import_hdf5", FIXTURE / "phantom.hdf5", out, "--jobs", n,
                          "--progress", "false")
        assert status == 0, err
    assert _bench().store_differences(*stores) == []


def test_store_differences_sees_a_changed_chunk_and_attribute(raw, tmp_path):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    assert cli("build_store", raw / "config.json", a, "--jobs", 1, "--quiet")[0] == 0
    shutil.copytree(a, b)
    chunk = next(p for p in sorted((b / "sub-01" / "bundles" / "points").rglob("*"))
                 if p.is_file() and p.name != "zarr.json")
    data = chunk.read_bytes()
    chunk.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    meta = b / "sub-02" / "zarr.json"
    meta.write_text(meta.read_text().replace("{", '{"x": 1, ', 1))
    found = _bench().store_differences(a, b)
    assert len(found) == 2 and "points" in found[0] and "sub-02/zarr.json" in found[1], found


def test_a_failing_subject_with_two_jobs_is_one_line_and_nothing_is_written(raw, tmp_path):
    import nibabel as nib
    import numpy as np

    root = tmp_path / "raw"
    shutil.copytree(raw, root)
    path = root / "sub-01" / "bundles.trk"
    trk = nib.streamlines.load(str(path))
    moved = nib.streamlines.Tractogram(  # the shifted-header mistake: 100 mm off in x
        [s + np.float32([100, 0, 0]) for s in trk.streamlines], affine_to_rasmm=np.eye(4),
        data_per_streamline=trk.tractogram.data_per_streamline)
    nib.streamlines.save(moved, str(path), header=trk.header)
    out = tmp_path / "out.zarr"
    status, err = cli("build_store", root / "config.json", out, "--jobs", 2, "--quiet")
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, err
    assert "subject sub-01" in lines[0] and "outside the reference volume" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no OUT, no temp folder


def test_a_failing_subject_of_an_import_with_two_jobs(tmp_path):
    import h5py

    src = tmp_path / "in.hdf5"
    shutil.copy(FIXTURE / "phantom.hdf5", src)
    with h5py.File(src, "r+") as f:
        f["sub-03/bundles/data"][...] += 500.0  # far outside its volume
    status, err = cli("import_hdf5", src, tmp_path / "out.zarr", "--jobs", 2)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, err
    assert "subject sub-03" in lines[0] and "outside the reference volume" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.hdf5"]


@pytest.mark.parametrize("command", ["build_store", "import_hdf5"])
@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_bad_jobs_are_refused_at_parse_time(command, value, tmp_path):
    status, err = cli(command, tmp_path / "missing.json", tmp_path / "out.zarr",
                      "--jobs", value)
    assert status == 2 and err.strip().splitlines() == [
        f"tractrain-{command.replace('_', '-')}: error: --jobs: expected a number of processes "
        f"from 1 to 1024, got '{value}'"]
    assert list(tmp_path.iterdir()) == []


def _sleep_then_pid(delays: dict, subject: str) -> int:
    """Worker: sleep ``delays[subject]`` seconds; fail for a negative delay."""
    if delays[subject] < 0:
        raise ValueError(f"subject {subject}: broken")
    time.sleep(delays[subject])
    return os.getpid()


def test_workers_run_elsewhere_and_results_come_in_subject_order():
    seen = []
    pb.run_subjects(["a", "b", "c"], partial(_sleep_then_pid, {"a": 1.0, "b": 0, "c": 0}), 2,
                    lambda s, pid: seen.append((s, pid)), "test", progress=False)
    assert [s for s, _ in seen] == ["a", "b", "c"]  # "b" finished first
    assert all(pid != os.getpid() for _, pid in seen)


def test_a_worker_error_stops_the_running_workers():
    seen = []
    start = time.perf_counter()
    with pytest.raises(ValueError, match="subject b: broken"):
        pb.run_subjects(["a", "b", "c"], partial(_sleep_then_pid, {"a": 300, "b": -1, "c": 0}),
                        2, lambda s, pid: seen.append(s), "test", progress=False)
    assert time.perf_counter() - start < 60  # "a" (300 s) was terminated, not awaited
    assert seen == []  # "a" never finished, so nothing after it was handed on


def test_choose_jobs_caps_by_cores_subjects_and_memory(caplog):
    base = pb.WORKER_BASE_BYTES
    assert pb.choose_jobs(None, 10, base + 2 * GIB, 100 * GIB, cores=8) == 8
    assert pb.choose_jobs(None, 3, base + 2 * GIB, 100 * GIB, cores=8) == 3  # subjects
    assert pb.choose_jobs(None, 10, 2 * GIB, 5 * GIB, cores=8) == 2  # memory: 2 x 2 GiB fit
    assert pb.choose_jobs(None, 10, 2 * GIB, None, cores=4) == 4  # memory unknown
    assert pb.choose_jobs(None, 10, 8 * GIB, 1 * GIB, cores=4) == 1  # never below 1
    assert pb.choose_jobs(None, 4, base + 2**20, 100 * GIB, cores=8) == 1  # small: no workers
    with caplog.at_level(logging.WARNING, logger="tractrain"):
        assert pb.choose_jobs(6, 10, 4 * GIB, 9 * GIB, cores=2) == 2  # explicit, capped
    assert "2 parallel jobs instead of 6" in caplog.text
    assert pb.choose_jobs(3, 2, base + 2**20, 100 * GIB, cores=8) == 2  # explicit small: kept


def test_available_memory_without_psutil_reads_meminfo(monkeypatch):
    with_psutil = pb.available_memory()
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil -> ImportError
    without = pb.available_memory()
    assert isinstance(without, int) and without > 0
    assert abs(without - with_psutil) < 0.5 * with_psutil


def test_build_peak_counts_the_volumes(raw):
    from tractrain.data.build_config import validate_config

    config = validate_config(json.loads((raw / "config.json").read_text()), "config")
    peak = pb.build_peak_bytes(raw, ["sub-00"], config)
    dwi = pb._nifti_bytes(str(raw / "sub-00" / "dwi.nii.gz"))
    assert dwi > 0 and peak >= pb.WORKER_BASE_BYTES + pb.VOLUME_FACTOR * dwi


def test_subjects_whose_features_differ_give_the_same_error_with_any_jobs(raw, tmp_path):
    import nibabel as nib

    root = tmp_path / "raw"
    shutil.copytree(raw, root)
    img = nib.load(str(root / "sub-02" / "dwi.nii.gz"))
    nib.save(nib.Nifti1Image(img.get_fdata(dtype="float32")[..., :3], img.affine),
             str(root / "sub-02" / "dwi.nii.gz"))
    errors = []
    for n in (1, 2):
        status, err = cli("build_store", root / "config.json", tmp_path / "out.zarr",
                          "--jobs", n, "--quiet")
        assert status == 2 and len(err.strip().splitlines()) == 1, err
        errors.append(err)
    assert errors[0] == errors[1] and "sub-02: volume group 'dwi' has features" in errors[0]
    assert "other subjects have" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]
