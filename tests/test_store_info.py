"""``tractrain-store-info``: the summary and its JSON agree with the store; ``--check`` passes
on the phantom and fails (exit 1, one line per failure naming subject/group/what) on stores
with points outside, all-zero inputs, NaN/inf or inconsistent offsets; a bad path exits 2."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
import zarr

from tractrain.bin.store_info import main
from tractrain.data.inspect_store import stats


def store_info(*args) -> tuple[int, str, str]:
    """``(exit status, stdout, stderr)`` of ``tractrain-store-info ARGS``, in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(a) for a in args])
    return status, out.getvalue(), err.getvalue()


def test_summary_names_what_the_store_holds(phantom_store):
    status, out, err = store_info(phantom_store.path)
    assert status == 0, err
    assert "tractrain-store v1, 4 subjects" in out
    assert "splits: train 2 (sub-00, sub-01), valid 1 (sub-03), test 1 (sub-02)" in out
    assert "volume group dwi: " in out and "streamline group bundles: " in out
    for subject in phantom_store.subjects:
        n = len(phantom_store.streamline_index(subject, "bundles"))
        line = next(x for x in out.splitlines() if x.startswith(subject + " ("))
        assert f"bundles {n} streamlines" in line and "x2 mm" in line and "mm (min" in line
    assert "check" not in out


def test_json_matches_the_store(phantom_store):
    status, out, _ = store_info(phantom_store.path, "--json", "--quiet")
    assert status == 0
    doc = json.loads(out)
    assert {"path", "format", "version", "provenance", "subjects", "splits", "volume_groups",
            "streamline_groups", "subject_info", "stored_bytes"} == set(doc)
    assert doc["version"] == 1 and doc["splits"]["valid"] == ["sub-03"]
    assert doc["volume_groups"]["dwi"]["n_features"] == phantom_store.volume_groups["dwi"][
        "n_features"]
    for subject in phantom_store.subjects:
        info = doc["subject_info"][subject]
        index = phantom_store.streamline_index(subject, "bundles")
        group = info["streamlines"]["bundles"]
        assert group["n_streamlines"] == len(index)
        assert group["n_points"] == int(index.lengths.sum())
        assert group["points_per_streamline"] == stats(index.lengths)
        assert group["length_mm"]["max"] == pytest.approx(float(index.lengths_mm.max()))
        assert info["volumes"]["dwi"]["shape"] == list(phantom_store.volume(subject, "dwi").shape)
        assert info["stored_bytes"] > 0
    assert doc["stored_bytes"] == sum(i["stored_bytes"] for i in doc["subject_info"].values())


def test_check_passes_on_the_phantom(phantom_store, one_thread):
    status, out, err = store_info(phantom_store.path, "--check", "--json")
    assert status == 0, err
    check = json.loads(out)["check"]
    assert check["passed"] and check["failures"] == []
    for result in check["subjects"].values():
        bundles = result["streamlines"]["bundles"]
        assert bundles["consistent"] and bundles["non_finite_points"] == 0
        assert bundles["outside_share"] == 0.0
        assert bundles["zero_input_share"]["dwi"] < 0.01


def _damage(store, kind: str) -> None:
    root = zarr.open_group(str(store), mode="r+")
    if kind == "outside":
        points = root["sub-01/bundles/points"]
        points[...] = points[...] + 1000.0
    elif kind == "nan_point":
        root["sub-01/bundles/points"][3, 1] = np.nan
    elif kind == "nan_volume":
        root["sub-01/dwi"][0, 0, 0, 0] = np.inf
    elif kind == "offsets":
        lengths = root["sub-01/bundles/lengths"]
        lengths[0] = lengths[0] + 1
    elif kind == "zero_inputs":  # one voxel left, far from the bundles: its chunk is kept
        volume = np.zeros(root["sub-01/dwi"].shape, np.float32)
        volume[0, 0, 0, 0] = 1.0
        root["sub-01/dwi"][...] = volume
    elif kind == "missing_chunk":
        (store / "sub-01" / "bundles" / "lengths_mm" / "c" / "0").unlink()


@pytest.mark.parametrize("kind, expected", [
    ("outside", ["sub-01/bundles: 100.0% of points lie outside the reference volume",
                 "sub-01/bundles: 100.0% of points have all-zero inputs in volume group 'dwi'"]),
    ("zero_inputs", ["sub-01/bundles: 100.0% of points have all-zero inputs"]),
    ("nan_point", ["sub-01/bundles: 1 points with NaN/inf coordinates"]),
    ("nan_volume", ["sub-01/dwi: 1 NaN/inf values in the volume"]),
    ("offsets", ["sub-01/bundles: offsets and lengths disagree at streamline 0"]),
    ("missing_chunk", ["sub-01/bundles/lengths_mm: 1 of 1 chunks missing"]),
])
def test_check_fails_on_a_damaged_store(phantom_store, tmp_path, kind, expected, one_thread):
    store = tmp_path / "s.zarr"
    shutil.copytree(phantom_store.path, store)
    _damage(store, kind)
    status, out, err = store_info(store, "--check", "--quiet")
    assert status == 1, err
    lines = err.splitlines()
    assert len(lines) == len(expected), err
    for line, part in zip(lines, expected, strict=True):
        assert line.startswith("tractrain-store-info: check failed: ") and part in line, line
    assert "check FAILED" in out and "check sub-00: " in out


def test_bad_store_path_exits_2(tmp_path):
    status, out, err = store_info(tmp_path / "missing.zarr")
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and "no such store" in err
    status, _, err = store_info(tmp_path, "--check", "--max-outside", "2")
    assert status == 2 and "--max-outside: expected a share in [0, 1]" in err


def test_summary_starts_without_torch(phantom_store):
    """A summary (no --check) never imports torch: it answers in a fraction of a second."""
    import subprocess
    import sys

    code = ("import sys; from tractrain.bin.store_info import main; "
            f"status = main([{str(phantom_store.path)!r}]); "
            "print('torch' in sys.modules, status)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.splitlines()[-1] == "False 0", done.stdout + done.stderr


def test_check_progress_bar_on_request(phantom_store, one_thread):
    """`--check --progress true` shows the bar off a terminal (a batch job's log); a bad
    value is one line, exit 2."""
    status, out, err = store_info(phantom_store.path, "--check", "--progress", "true")
    assert status == 0, err
    assert "store-info" in err and "subject/s" in err, err
    with pytest.raises(SystemExit) as stop:
        store_info(phantom_store.path, "--check", "--progress", "maybe")
    assert stop.value.code == 2
