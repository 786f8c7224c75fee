"""Tractograms in the wrong space are stopped where the mistake is made: the builder refuses
streamlines outside their reference volume (unless --allow-outside) and a .trk whose
voxel_order disagrees with its vox_to_ras; training stops when its first batch's inputs are
mostly zeros (unless --allow-zero-inputs true)."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tractrain.data.build_config import validate_config
from tractrain.data.space_check import check_inside, voxel_order_mismatch
from tractrain.engine.contract import ZeroInputsCheck
from tractrain.errors import ConfigError, StoreError

TRAIN = ["--max-epochs", "1", "--max-batches-train", "2", "--max-batches-valid", "1",
         "--batch-size", "400", "--model-config", '{"hidden_size": 8}', "--device", "cpu",
         "--progress", "false"]


def cli(module: str, *args) -> tuple[int, str]:
    """``(exit status, stderr)`` of ``tractrain.bin.<module>.main(args)``, in this process."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        status = importlib.import_module(f"tractrain.bin.{module}").main([str(a) for a in args])
    return status, err.getvalue()


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    from tractrain.data.phantom import make_phantom

    root = tmp_path_factory.mktemp("space") / "raw"
    make_phantom(root, n_subjects=2, shape=(16, 16, 10), n_bundles=2,
                 streamlines_per_subject=12, snr=None,
                 splits={"train": ["sub-00"], "valid": ["sub-01"]})
    return root


def shifted_copy(raw: Path, tmp: Path, subjects=("sub-01",), mm: float = 100.0) -> Path:
    """A copy of the phantom whose ``subjects``' streamlines are moved by ``mm`` in x (same
    header: the classic shifted-header mistake)."""
    root = tmp / "raw"
    shutil.copytree(raw, root)
    for subject in subjects:
        path = root / subject / "bundles.trk"
        trk = nib.streamlines.load(str(path))
        lines = [np.array(s) + np.float32([mm, 0, 0]) for s in trk.streamlines]
        tractogram = nib.streamlines.Tractogram(
            lines, data_per_streamline=trk.tractogram.data_per_streamline,
            affine_to_rasmm=np.eye(4))
        nib.streamlines.save(tractogram, str(path), header=trk.header)
    return root


def test_check_inside_counts_points_by_voxel_and_applies_the_tolerance():
    shape = (10, 10, 10)
    edge = np.array([[-0.5, 0, 0], [9.5, 9.5, 9.5], [5, 5, 5]], np.float32)
    assert check_inside(edge, shape, "s", "f.trk") == 0.0  # voxel centres at integers
    points = np.full((100, 3), 5.0, np.float32)
    points[0] = [-0.6, 5, 5]
    assert check_inside(points, shape, "s", "f.trk") == pytest.approx(0.01)  # 1 %: allowed
    points[1] = [5, 5, np.nan]
    with pytest.raises(StoreError) as err:
        check_inside(points, shape, "sub-07", "sub-07/bundles.trk", reference="dwi.nii.gz")
    message = str(err.value)
    assert "\n" not in message
    for part in ("sub-07", "bundles.trk", "2.0%", "(2 of 100)", "dwi.nii.gz", "10x10x10",
                 "LPS/RAS", "--allow-outside"):
        assert part in message, part


def test_build_refuses_a_shifted_tractogram_and_allow_outside_builds_it(raw, tmp_path):
    root = shifted_copy(raw, tmp_path)
    out = tmp_path / "s.zarr"
    status, err = cli("build_store", root / "config.json", out, "--quiet")
    assert status == 2
    assert err.count("\n") == 1, err
    assert "subject sub-01:" in err and "bundles.trk" in err and "100.0% of streamline" in err
    assert "wrong reference" in err and "LPS/RAS" in err and "shifted header" in err
    assert not out.exists()
    status, err = cli("build_store", root / "config.json", out, "--quiet", "--allow-outside")
    assert status == 0, err
    provenance = json.loads((out / "zarr.json").read_text())["attributes"]["provenance"]
    assert provenance["config"]["groups"]["bundles"]["allow_outside"] is True


def test_config_key_allow_outside(raw, tmp_path):
    root = shifted_copy(raw, tmp_path)
    config = json.loads((root / "config.json").read_text())
    config["groups"]["bundles"]["allow_outside"] = True
    (root / "config.json").write_text(json.dumps(config))
    status, err = cli("build_store", root / "config.json", tmp_path / "s.zarr", "--quiet")
    assert status == 0, err
    config["groups"]["bundles"]["allow_outside"] = "yes"
    with pytest.raises(ConfigError, match=r"groups.bundles.allow_outside: expected true or"):
        validate_config(config)


def test_trk_whose_voxel_order_disagrees_with_its_matrix_is_refused(raw, tmp_path):
    root = tmp_path / "raw"
    shutil.copytree(raw, root)
    path = root / "sub-00" / "bundles.trk"
    before = nib.streamlines.load(str(path)).streamlines.get_data()
    data = bytearray(path.read_bytes())
    assert data[948:951] == b"RAS"  # the header's voxel_order field
    data[948:952] = b"LPS\0"
    path.write_bytes(bytes(data))
    # what nibabel does with it: the streamlines come back mirrored in x and y
    after = nib.streamlines.load(str(path)).streamlines.get_data()
    assert not np.allclose(before[:, :2], after[:, :2]) and np.allclose(before[:, 2],
                                                                        after[:, 2])
    status, err = cli("build_store", root / "config.json", tmp_path / "s.zarr", "--quiet")
    assert status == 2 and err.count("\n") == 1, err
    assert "sub-00/bundles.trk" in err and "voxel_order 'LPS'" in err and "'RAS'" in err
    assert voxel_order_mismatch("RAS", np.diag([2.0, 2.0, 2.0, 1.0])) is None
    assert voxel_order_mismatch("LAS", np.diag([-2.0, 2.0, 2.0, 1.0])) is None


class _Batch:
    def __init__(self, inputs):
        self.inputs = inputs


def test_zero_inputs_check_decides_on_the_first_batches():
    half = torch.zeros(10, 3)
    half[:5, 0] = 1.0
    assert ZeroInputsCheck()(_Batch(half)) is True  # exactly half: allowed, done
    check = ZeroInputsCheck(batches=2, hint="do X")
    assert check(_Batch(torch.zeros(4, 3))) is False  # undecided after one of two
    with pytest.raises(ConfigError) as err:
        check(_Batch(torch.ones(2, 3)))  # 4 of 6 points all zero
    assert "first training 2 batches: 66.7% of 6 points have all-zero inputs" in str(err.value)
    assert str(err.value).endswith("; do X")
    assert ZeroInputsCheck()(_Batch(None)) is True


def test_the_batch_check_runs_on_the_first_batches_only(one_thread):
    from tractrain.engine.trainer import TrainStep

    calls = []

    def check(batch) -> bool:
        calls.append(batch)
        return len(calls) == 2

    model = torch.nn.Linear(1, 1)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1),
                     lambda m, b: (m(b).pow(2).mean(), 1), batch_check=check,
                     prepare_batch=lambda b, device: b)
    step.create_engine().run([torch.ones(2, 1)] * 5, max_epochs=1)
    assert len(calls) == 2


def test_training_on_points_outside_stops_and_the_override_trains(raw, tmp_path):
    root = shifted_copy(raw, tmp_path, subjects=("sub-00", "sub-01"))
    store = tmp_path / "out.zarr"
    assert cli("build_store", root / "config.json", store, "--quiet", "--allow-outside")[0] == 0
    args = ("--store", store, "--experiments", tmp_path / "exps", *TRAIN)
    status, err = cli("train", *args, "--name", "zeros")
    assert status == 2 and err.count("\n") == 1, err
    assert "100.0%" in err and "all-zero inputs" in err
    assert f"tractrain-store-info {store} --check" in err and "--allow-zero-inputs true" in err
    status, err = cli("train", *args, "--name", "allowed", "--allow-zero-inputs", "true")
    assert status == 0, err
