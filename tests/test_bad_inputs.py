"""Bad-input catalogue: malformed inputs to the store builder, store opening, configs, flags,
checkpoints and logs. Each gives exit status 2, one line on stderr naming what is wrong, no
traceback, and writes nothing over (every file present before is unchanged, none is added).

Data-driven: `CASES` holds ``(name, setup, fragments)``; ``setup(ctx, tmp)`` prepares the bad
input in ``tmp`` and returns the command ``(module, args)`` of ``tractrain.bin.<module>``, or
``("python", callable)`` for a library call that must raise a `TractrainError`. Commands run
in this process through the modules' ``main`` (stderr captured, any escaping exception counted
as a traceback) to avoid a torch import per case; ``REAL`` cases (and all of them with
``BAD_INPUTS_SUBPROCESS=1``) run as real subprocesses.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tractrain.errors import TractrainError

ALL_SUBPROCESS = os.environ.get("BAD_INPUTS_SUBPROCESS") == "1"
TRAIN = ["--max-batches-train", "1", "--max-batches-valid", "1", "--batch-size", "600",
         "--model-config", '{"hidden_size": 8}', "--device", "cpu", "--progress", "false"]


def cli(module: str, args, real: bool = False) -> tuple[int, str]:
    """``(exit status, stderr)`` of ``tractrain.bin.<module> ARGS`` (the one helper)."""
    if real or ALL_SUBPROCESS:
        argv = [os.fsencode(a) if isinstance(a, str | Path) else a for a in args]
        done = subprocess.run([sys.executable, "-m", f"tractrain.bin.{module}", *argv],
                              capture_output=True, timeout=300)
        return done.returncode, done.stderr.decode(errors="replace")
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            status = importlib.import_module(f"tractrain.bin.{module}").main(
                [os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args])
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # what the interpreter would print: a traceback, status 1
            traceback.print_exc(file=err)
            status = 1
    return status, err.getvalue()


def call(fn) -> tuple[int, str]:
    """A library call must raise a one-line `TractrainError` (reported like the CLI)."""
    try:
        fn()
    except TractrainError as e:
        return 2, f"error: {e}\n"
    except BaseException:
        return 1, traceback.format_exc()
    return 0, ""


# --- shared inputs, built once ----------------------------------------------------------------
@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    from tractrain.bin.train import main as train_main
    from tractrain.data.builder import build_store
    from tractrain.data.phantom import make_phantom

    root = tmp_path_factory.mktemp("bad")
    make_phantom(root / "raw", n_subjects=2, shape=(12, 12, 8), n_bundles=2,
                 streamlines_per_subject=20, splits={"train": ["sub-00"], "valid": ["sub-01"]})
    config = json.loads((root / "raw" / "config.json").read_text())
    build_store(config, root / "good.zarr", root / "raw", progress=False)
    with contextlib.redirect_stdout(io.StringIO()):
        assert train_main(["--store", str(root / "good.zarr"), "--experiments",
                           str(root / "exps"), "--name", "exp", "--max-epochs", "1",
                           *TRAIN]) == 0
    return {"raw": root / "raw", "store": root / "good.zarr", "exp": root / "exps" / "exp",
            "config": config}


def raw(ctx, tmp) -> Path:
    shutil.copytree(ctx["raw"], tmp / "raw")
    return tmp / "raw"


def build(tmp, config=None) -> tuple[str, list]:
    args = [tmp / "raw" / "config.json", tmp / "out.zarr", "--quiet"]
    if config is not None:
        (tmp / "raw" / "config.json").write_text(json.dumps(config))
    return "build_store", args


def store(ctx, tmp) -> Path:
    shutil.copytree(ctx["store"], tmp / "s.zarr")
    return tmp / "s.zarr"


def train_on(path, tmp, *extra) -> tuple[str, list]:
    return "train", ["--store", path, "--experiments", tmp / "exps", *TRAIN, *extra]


def experiment(ctx, tmp) -> Path:
    shutil.copytree(ctx["exp"], tmp / "exp")
    return tmp / "exp"


def edit_trk(path: Path, edit) -> None:
    """Rewrite a .trk with ``edit(list of (N, 3) arrays)`` applied (same header and dps)."""
    trk = nib.streamlines.load(str(path))
    lines = [np.array(s) for s in trk.streamlines]
    keep = edit(lines)
    dps = {k: np.asarray(v)[keep] for k, v in trk.tractogram.data_per_streamline.items()}
    tractogram = nib.streamlines.Tractogram([lines[i] for i in keep], data_per_streamline=dps,
                                            affine_to_rasmm=np.eye(4))
    nib.streamlines.save(tractogram, str(path), header=trk.header)


# --- the setups -------------------------------------------------------------------------------
def truncated_nifti(ctx, tmp):
    path = raw(ctx, tmp) / "sub-00" / "dwi.nii.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return build(tmp)


def nifti_not_nifti(ctx, tmp):
    (raw(ctx, tmp) / "sub-01" / "dwi.nii.gz").write_bytes(gzip.compress(b"not an image" * 50))
    return build(tmp)


def nifti_with_nan(ctx, tmp):
    path = raw(ctx, tmp) / "sub-00" / "dwi.nii.gz"
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    data[1, 2, 3, 0] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), str(path))
    return build(tmp)


def nifti_2d(ctx, tmp):
    path = raw(ctx, tmp) / "sub-00" / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4), np.float32), np.eye(4)), str(path))
    return build(tmp)


def mask_wrong_shape(ctx, tmp):
    path = raw(ctx, tmp) / "sub-01" / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.float32), np.eye(4)), str(path))
    return build(tmp)


def trk_broken_header(ctx, tmp):
    path = raw(ctx, tmp) / "sub-00" / "bundles.trk"
    data = bytearray(path.read_bytes())
    data[996:1000] = b"\xff\xff\xff\x7f"  # hdr_size: must be 1000
    path.write_bytes(bytes(data))
    return build(tmp)


def trk_bad_magic(ctx, tmp):
    path = raw(ctx, tmp) / "sub-00" / "bundles.trk"
    path.write_bytes(b"XXXXX\0" + path.read_bytes()[6:])
    return build(tmp)


def trk_truncated(ctx, tmp):
    path = raw(ctx, tmp) / "sub-01" / "bundles.trk"
    path.write_bytes(path.read_bytes()[:1000 + 37])
    return build(tmp)


def streamline_with_nan(ctx, tmp):
    def edit(lines):
        lines[3][2] = np.nan
        return list(range(len(lines)))

    edit_trk(raw(ctx, tmp) / "sub-00" / "bundles.trk", edit)
    return build(tmp)


def streamline_one_point(ctx, tmp):
    def edit(lines):
        lines[5] = lines[5][:1]
        return list(range(len(lines)))

    edit_trk(raw(ctx, tmp) / "sub-01" / "bundles.trk", edit)
    return build(tmp)


def empty_tractogram(ctx, tmp):
    edit_trk(raw(ctx, tmp) / "sub-00" / "bundles.trk", lambda lines: [])
    return build(tmp)


def builder_config_not_json(ctx, tmp):
    (raw(ctx, tmp) / "config.json").write_text('{"groups": {')
    return build(tmp)


def builder_config_wrong_type(ctx, tmp):
    config = json.loads(json.dumps(ctx["config"]))
    config["groups"]["dwi"]["files"] = 3
    raw(ctx, tmp)
    return build(tmp, config)


def builder_config_bad_group_type(ctx, tmp):
    config = json.loads(json.dumps(ctx["config"]))
    config["groups"]["dwi"]["type"] = "image"
    raw(ctx, tmp)
    return build(tmp, config)


def builder_config_not_utf8(ctx, tmp):
    (raw(ctx, tmp) / "config.json").write_bytes(b'{"groups": "\xe9t\xe9"}')
    return build(tmp)


def builder_missing_subject(ctx, tmp):
    shutil.rmtree(raw(ctx, tmp) / "sub-01")
    return build(tmp)


def builder_missing_file(ctx, tmp):
    (raw(ctx, tmp) / "sub-00" / "bundles.trk").unlink()
    return build(tmp)


def builder_out_exists(ctx, tmp):
    raw(ctx, tmp)
    (tmp / "out.zarr").mkdir()
    (tmp / "out.zarr" / "keep.txt").write_text("keep")
    return build(tmp)


def store_deleted_points_chunk(ctx, tmp):
    path = store(ctx, tmp)
    chunks = sorted((path / "sub-00" / "bundles" / "points").rglob("c/*"))
    files = [c for c in chunks if c.is_file()] or [
        c for c in (path / "sub-00" / "bundles" / "points").rglob("*")
        if c.is_file() and c.name != "zarr.json"]
    files[0].unlink()
    return train_on(path, tmp)


def store_deleted_offsets_chunk(ctx, tmp):
    path = store(ctx, tmp)
    folder = path / "sub-01" / "bundles" / "offsets"
    next(c for c in folder.rglob("*") if c.is_file() and c.name != "zarr.json").unlink()
    return train_on(path, tmp)


def store_offsets_mismatch(ctx, tmp):
    import zarr

    path = store(ctx, tmp)
    arr = zarr.open_array(str(path / "sub-00" / "bundles" / "offsets"), mode="r+")
    arr[-1] = arr[-1] + 7
    return train_on(path, tmp)


def store_lengths_mismatch(ctx, tmp):
    import zarr

    path = store(ctx, tmp)
    arr = zarr.open_array(str(path / "sub-00" / "bundles" / "lengths"), mode="r+")
    arr[0] = arr[0] + 1
    return train_on(path, tmp)


def store_root_not_json(ctx, tmp):
    path = store(ctx, tmp)
    (path / "zarr.json").write_text("{ not json")
    return train_on(path, tmp)


def store_wrong_format(ctx, tmp):
    path = store(ctx, tmp)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["format"] = "something-else"
    (path / "zarr.json").write_text(json.dumps(meta))
    return train_on(path, tmp)


def store_missing_volume(ctx, tmp):
    path = store(ctx, tmp)
    shutil.rmtree(path / "sub-01" / "dwi")
    return train_on(path, tmp)


def store_missing_lengths_array(ctx, tmp):
    path = store(ctx, tmp)
    shutil.rmtree(path / "sub-00" / "bundles" / "lengths")
    return "python", lambda: __import__("tractrain.data.store").data.store.open_store(path)


def store_is_a_file(ctx, tmp):
    (tmp / "file.zarr").write_text("x")
    return "python", lambda: __import__("tractrain.data.store").data.store.open_store(
        tmp / "file.zarr")


def config_wrong_type(ctx, tmp):
    (tmp / "c.yaml").write_text("batch_size: big\n")
    return train_on(ctx["store"], tmp, "--name", "x")[0], [tmp / "c.yaml",
                                                           *train_on(ctx["store"], tmp)[1]]


def config_bad_yaml(ctx, tmp):
    (tmp / "c.yaml").write_text("max_epochs: [1, 2\n")
    return "train", [tmp / "c.yaml", *train_on(ctx["store"], tmp)[1]]


def config_not_mapping(ctx, tmp):
    (tmp / "c.json").write_text("[1, 2, 3]")
    return "train", [tmp / "c.json", *train_on(ctx["store"], tmp)[1]]


def config_model_config_not_dict(ctx, tmp):
    (tmp / "c.yaml").write_text("experiment:\n  model_config: 3\n")
    return "train", [tmp / "c.yaml", *train_on(ctx["store"], tmp)[1]]


def config_not_utf8(ctx, tmp):
    (tmp / "c.yaml").write_bytes(b"name: caf\xe9\n")
    return "train", [tmp / "c.yaml", *train_on(ctx["store"], tmp)[1]]


def config_non_utf8_path(ctx, tmp):
    return "train", [os.fsencode(tmp) + b"/caf\xe9.yaml", *train_on(ctx["store"], tmp)[1]]


def flag_max_epochs_zero(ctx, tmp):
    return train_on(ctx["store"], tmp, "--max-epochs", "0")


def flag_int_not_int(ctx, tmp):
    return train_on(ctx["store"], tmp, "--max-epochs", "2.5")


def flag_bad_lr(ctx, tmp):
    return train_on(ctx["store"], tmp, "--lr", "fast")


def flag_bad_units(ctx, tmp):
    return train_on(ctx["store"], tmp, "--batch-units", "parsecs")


def flag_bad_json(ctx, tmp):
    return train_on(ctx["store"], tmp, "--model-config", "{hidden: 3")


def flag_bad_bool(ctx, tmp):
    return train_on(ctx["store"], tmp, "--lazy", "maybe")


def flag_no_cuda(ctx, tmp):
    return train_on(ctx["store"], tmp, "--device", "tpu")


def flag_unknown_group(ctx, tmp):
    return train_on(ctx["store"], tmp, "--group", "fibres")


def flag_experiments_is_file(ctx, tmp):
    (tmp / "exps").write_text("a file")
    return train_on(ctx["store"], tmp)


def checkpoint_other_model(ctx, tmp):
    exp = experiment(ctx, tmp)
    config = json.loads((exp / "config.json").read_text())
    config["model_config"] = {"hidden_size": 12}
    (exp / "config.json").write_text(json.dumps(config))
    return "resume", [exp, "--max-epochs", "2"]


def checkpoint_malicious_pickle(ctx, tmp):
    exp = experiment(ctx, tmp)

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp / 'pwned'}",))

    (exp / "checkpoint" / "state.pt").write_bytes(pickle.dumps({"model": Payload()}))
    return "resume", [exp, "--max-epochs", "2"]


def checkpoint_truncated_state(ctx, tmp):
    exp = experiment(ctx, tmp)
    path = exp / "checkpoint" / "state.pt"
    path.write_bytes(path.read_bytes()[:500])
    return "resume", [exp, "--max-epochs", "2"]


def checkpoint_meta_not_json(ctx, tmp):
    exp = experiment(ctx, tmp)
    (exp / "checkpoint" / "meta.json").write_text("{")
    return "resume", [exp, "--max-epochs", "2"]


def checkpoint_missing(ctx, tmp):
    exp = experiment(ctx, tmp)
    shutil.rmtree(exp / "checkpoint")
    return "resume", [exp, "--max-epochs", "2"]


def experiment_config_not_json(ctx, tmp):
    exp = experiment(ctx, tmp)
    (exp / "config.json").write_bytes(b"\xff\xfe{")
    return "resume", [exp, "--max-epochs", "2"]


def resume_bad_flag_value(ctx, tmp):
    return "resume", [experiment(ctx, tmp), "--max-epochs", "lots"]


def plot_corrupt_npy(ctx, tmp):
    exp = experiment(ctx, tmp)
    (exp / "logs" / "train_loss.npy").write_bytes(b"\x93NUMPY garbage")
    return "plot_logs", [exp, "--out", tmp / "p.png"]


def plot_bad_best_epoch(ctx, tmp):
    exp = experiment(ctx, tmp)
    (exp / "best_epoch.json").write_text('{"epoch": "first"}')
    return "plot_logs", [exp, "--out", tmp / "p.png"]


def best_model_malicious(ctx, tmp):
    from tractrain.experiment import read_best_model

    exp = experiment(ctx, tmp)

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp / 'pwned'}",))

    (exp / "best_model" / "model.pt").write_bytes(pickle.dumps({"w": Payload()}))
    return "python", lambda: read_best_model(exp)


# (name, setup, fragments the one line must contain); REAL ones also run as subprocesses.
CASES = [
    ("truncated NIfTI", truncated_nifti, ["dwi.nii.gz"]),
    ("NIfTI that is not a NIfTI", nifti_not_nifti, ["dwi.nii.gz", "NIfTI"]),
    ("NIfTI with a NaN voxel", nifti_with_nan, ["dwi.nii.gz", "NaN"]),
    ("2-D NIfTI", nifti_2d, ["mask.nii.gz", "3-D or 4-D"]),
    ("mask of another shape", mask_wrong_shape, ["mask.nii.gz", "shape"]),
    (".trk with a broken header size", trk_broken_header, ["bundles.trk"]),
    (".trk with a bad magic number", trk_bad_magic, ["bundles.trk"]),
    ("truncated .trk", trk_truncated, ["bundles.trk"]),
    ("streamline with a NaN point", streamline_with_nan, ["bundles.trk", "NaN"]),
    ("streamline of one point", streamline_one_point, ["bundles.trk", "point"]),
    ("empty tractogram", empty_tractogram, ["bundles.trk", "empty"]),
    ("builder config not JSON", builder_config_not_json, ["config.json", "JSON"]),
    ("builder config: files not a list", builder_config_wrong_type, ["files", "list"]),
    ("builder config: unknown group type", builder_config_bad_group_type, ["type", "image"]),
    ("builder config not UTF-8", builder_config_not_utf8, ["config.json", "UTF-8"]),
    ("builder: subject folder missing", builder_missing_subject, ["sub-01"]),
    ("builder: tractogram missing", builder_missing_file, ["bundles.trk", "no file"]),
    ("builder: output exists", builder_out_exists, ["out.zarr", "exists"]),
    ("store: deleted points chunk", store_deleted_points_chunk, ["s.zarr", "points"]),
    ("store: deleted offsets chunk", store_deleted_offsets_chunk, ["s.zarr", "offsets"]),
    ("store: offsets don't match points", store_offsets_mismatch, ["s.zarr", "offsets"]),
    ("store: lengths don't match offsets", store_lengths_mismatch, ["s.zarr", "lengths"]),
    ("store: root metadata not JSON", store_root_not_json, ["s.zarr"]),
    ("store: wrong format", store_wrong_format, ["s.zarr", "not a tractrain store"]),
    ("store: volume group deleted", store_missing_volume, ["s.zarr", "sub-01/dwi"]),
    ("store: lengths array deleted", store_missing_lengths_array, ["lengths", "missing"]),
    ("store: a file, not a folder", store_is_a_file, ["file.zarr"]),
    ("config: wrong type", config_wrong_type, ["c.yaml", "batch_size"]),
    ("config: bad YAML", config_bad_yaml, ["c.yaml", "YAML"]),
    ("config: not a mapping", config_not_mapping, ["c.json", "mapping"]),
    ("config: model_config not a dict", config_model_config_not_dict, ["model_config"]),
    ("config: not UTF-8", config_not_utf8, ["c.yaml", "UTF-8"]),
    ("config: non-UTF-8 path", config_non_utf8_path, ["caf", "not found"]),
    ("flag: --max-epochs 0", flag_max_epochs_zero, ["max_epochs", ">= 1"]),
    ("flag: --max-epochs 2.5", flag_int_not_int, ["max-epochs", "2.5"]),
    ("flag: --lr fast", flag_bad_lr, ["fast"]),
    ("flag: --batch-units parsecs", flag_bad_units, ["parsecs"]),
    ("flag: --model-config bad JSON", flag_bad_json, ["model-config", "JSON"]),
    ("flag: --lazy maybe", flag_bad_bool, ["lazy", "maybe"]),
    ("flag: --device tpu", flag_no_cuda, ["device", "tpu"]),
    ("flag: --group unknown", flag_unknown_group, ["group", "fibres"]),
    ("flag: --experiments is a file", flag_experiments_is_file, ["exps"]),
    ("checkpoint of another model", checkpoint_other_model, ["model parameters don't match"]),
    ("checkpoint: malicious pickle", checkpoint_malicious_pickle, ["state.pt", "refused"]),
    ("checkpoint: truncated state.pt", checkpoint_truncated_state, ["state.pt"]),
    ("checkpoint: meta.json not JSON", checkpoint_meta_not_json, ["meta.json", "JSON"]),
    ("checkpoint missing", checkpoint_missing, ["checkpoint"]),
    ("experiment config.json not JSON", experiment_config_not_json, ["config.json"]),
    ("resume: --max-epochs lots", resume_bad_flag_value, ["max-epochs", "lots"]),
    ("plot-logs: corrupt .npy", plot_corrupt_npy, ["train_loss.npy"]),
    ("plot-logs: bad best_epoch.json", plot_bad_best_epoch, ["best_epoch.json", "epoch"]),
    ("best model: malicious pickle", best_model_malicious, ["model.pt"]),
]
REAL = {"truncated NIfTI", "config: non-UTF-8 path", "checkpoint: malicious pickle"}


def snapshot(*roots: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for root in roots if root.exists()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name, setup, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_one_line(ctx, tmp_path, name, setup, fragments):
    tmp = tmp_path / "case"
    tmp.mkdir()
    module, args = setup(ctx, tmp)
    shared = (ctx["raw"], ctx["store"], ctx["exp"])
    before = snapshot(tmp, *shared)
    if module == "python":
        status, err = call(args)
    else:
        status, err = cli(module, args, real=name in REAL)
    lines = err.strip().splitlines()
    assert status == 2, f"exit {status}: {err}"
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), lines[0]
    assert snapshot(tmp, *shared) == before, "a file was written, changed or deleted"
    assert not (tmp / "pwned").exists(), "the pickle payload ran"


def test_catalogue_has_at_least_30_distinct_cases():
    assert len({name for name, _, _ in CASES}) == len(CASES) >= 30
