"""No dead ends: a run that stops before its first checkpoint (NaN at iteration 1, an exception
in loss_fn at the first batch, SIGTERM/Ctrl-C in the first seconds) says so truthfully, and
the obvious next command (the same tractrain-train, or tractrain-resume) then succeeds without
--force. The user's loss and model are given as ``path/to/file.py:name`` (this file)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tractrain.bin.compose import factory_config, import_object
from tractrain.bin.options import DEMO_MODEL, DEMO_MODEL_CONFIG
from tractrain.errors import ConfigError

HERE = Path(__file__).resolve()
STOP_ENV = "EARLY_STOP_TEST"  # "nan" | "raise": what this file's loss does at the first batch


def loss(model, batch):
    """The demo loss, or a NaN / an exception at the first batch (``EARLY_STOP_TEST``)."""
    from tractrain.examples.next_direction import loss_fn

    mean, n = loss_fn(model, batch)
    what = os.environ.get(STOP_ENV)
    if what == "nan":
        return mean * float("nan"), n
    if what == "raise":
        raise RuntimeError("bug in the user's loss")
    return mean, n


def numpy_model(config):
    """A user factory: refuses the demo's model_config, draws an extra weight from np.random."""
    from tractrain.examples.next_direction import make_model

    assert set(config) == {"n_inputs"}, config
    model = make_model({"n_inputs": config["n_inputs"], "hidden_size": 8})
    with torch.no_grad():
        model.head.bias.copy_(torch.from_numpy(np.random.normal(size=3).astype(np.float32)))
    return model


def train_cmd(store, experiments, *extra):
    return [sys.executable, "-m", "tractrain.bin.train", "--store", str(store),
            "--experiments", str(experiments), "--name", "run", "--max-epochs", "1",
            "--max-batches-train", "3", "--max-batches-valid", "1", "--batch-size", "1500",
            "--model-config", '{"hidden_size": 8}', "--device", "cpu", "--progress", "false",
            "--loss", f"{HERE}:loss", *extra]


def run(cmd, **env):
    full = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", **env}
    return subprocess.run(cmd, capture_output=True, text=True, env=full, timeout=300)


def resume_cmd(exp):
    """Resume; the folder names this file's model and loss, so the user vouches for it."""
    return [sys.executable, "-m", "tractrain.bin.resume", str(exp), "--trust-experiment"]


def test_nan_at_iteration_1_says_so_and_train_again_works(phantom_store, tmp_path):
    cmd = train_cmd(phantom_store.path, tmp_path)
    failed = run(cmd, **{STOP_ENV: "nan"})
    assert failed.returncode == 1, failed.stderr
    assert "stopped before the first checkpoint" in failed.stderr, failed.stderr
    assert "nothing was saved" in failed.stderr and "checkpoint kept" not in failed.stderr
    again = run(cmd)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "run" / "checkpoint" / "state.pt").is_file()


def test_exception_in_loss_at_first_batch_then_train_again_works(phantom_store, tmp_path):
    cmd = train_cmd(phantom_store.path, tmp_path)
    failed = run(cmd, **{STOP_ENV: "raise"})
    assert failed.returncode == 1 and "bug in the user's loss" in failed.stderr
    again = run(cmd)
    assert again.returncode == 0, again.stderr


@pytest.mark.parametrize("sig, next_cmd", [(signal.SIGTERM, "train"), (signal.SIGTERM, "resume"),
                                           (signal.SIGINT, "train")])
def test_signal_in_the_first_seconds_then_next_command_works(phantom_store, tmp_path, sig,
                                                             next_cmd):
    cmd = train_cmd(phantom_store.path, tmp_path)
    exp = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    deadline = time.time() + 120
    while not (exp / "config.json").exists() and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (-sig, 128 + sig), err
    assert "checkpoint kept" not in err
    if next_cmd == "resume" and not exp.exists():
        pytest.skip("the signal landed after the folder was cleaned up")
    done = run(cmd if next_cmd == "train" else resume_cmd(exp))
    assert done.returncode == 0, done.stderr
    assert (exp / "checkpoint" / "state.pt").is_file()


def test_resume_of_an_unstarted_folder_starts_from_scratch(phantom_store, tmp_path):
    """What SIGKILL during the set-up leaves: only config.json (and an empty logs folder)."""
    cmd = train_cmd(phantom_store.path, tmp_path / "ref")
    assert run(cmd).returncode == 0
    exp = tmp_path / "run"
    exp.mkdir()
    (exp / "logs").mkdir()
    (exp / "config.json").write_bytes((tmp_path / "ref" / "run" / "config.json").read_bytes())
    done = run(resume_cmd(exp))
    assert done.returncode == 0, done.stderr
    assert "starting from scratch" in done.stdout
    assert_identical(state(exp), state(tmp_path / "ref" / "run"))


def test_an_unstarted_folder_holding_other_files_is_not_replaced(phantom_store, tmp_path):
    exp = tmp_path / "run"
    exp.mkdir()
    (exp / "config.json").write_text("{}")
    (exp / "notes.txt").write_text("mine")
    done = run(train_cmd(phantom_store.path, tmp_path))
    assert done.returncode == 2 and "--force" in done.stderr
    assert (exp / "notes.txt").read_text() == "mine"


# --- imports of the user's code --------------------------------------------------------------

def test_missing_module_gets_a_hint_and_a_file_path_is_accepted(tmp_path):
    with pytest.raises(ConfigError, match="PYTHONPATH.*pip install -e.*file.py:name"):
        import_object("no_such_user_models:make", "model")
    (tmp_path / "models.py").write_text("def make(config):\n    return config\n")
    factory = import_object(f"{tmp_path / 'models.py'}:make", "model")
    assert factory({"a": 1}) == {"a": 1}
    assert import_object(f"{tmp_path / 'models.py'}:make", "model") is factory  # loaded once
    with pytest.raises(ConfigError, match="no such file"):
        import_object(f"{tmp_path / 'nothere.py'}:make", "model")


def test_demo_model_config_goes_to_the_demo_model_only():
    assert factory_config({"model": DEMO_MODEL, "model_config": None}) == DEMO_MODEL_CONFIG
    assert factory_config({"model": "pkg.mod:make", "model_config": None}) == {}
    assert factory_config({"model": "pkg.mod:make", "model_config": {"k": 2}}) == {"k": 2}


# --- seeds --------------------------------------------------------------------------------

TIMING = {"epoch_time", "data_wait_share", "batches_per_s"}  # wall-clock measurements


def state(exp: Path) -> dict:
    return torch.load(exp / "checkpoint" / "state.pt", map_location="cpu", weights_only=True)


def assert_identical(a, b, where="state") -> None:
    """Equal in every tensor (bitwise, same dtype) and value, recursively; logged timings are
    measurements and are skipped."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            if key not in TIMING:
                assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), where
    else:
        assert a == b, where


def test_same_seed_gives_bitwise_identical_checkpoints(phantom_store, tmp_path):
    extra = ["--model", f"{HERE}:numpy_model", "--model-config", "none", "--max-epochs", "2"]
    for k in (1, 2):
        done = run(train_cmd(phantom_store.path, tmp_path / str(k), *extra))
        assert done.returncode == 0, done.stderr
    first, second = state(tmp_path / "1" / "run"), state(tmp_path / "2" / "run")
    assert {"python", "numpy", "torch"} <= set(first["rng"])
    assert_identical(first, second)
    other = run(train_cmd(phantom_store.path, tmp_path / "3", *extra, "--seed", "7"))
    assert other.returncode == 0, other.stderr
    assert not torch.equal(state(tmp_path / "3" / "run")["model"]["head.bias"],
                           first["model"]["head.bias"])  # the np.random draw follows --seed


def test_two_epochs_then_resume_to_four_equals_four_straight(phantom_store, tmp_path):
    from test_kill_anywhere import assert_same_result

    straight = run(train_cmd(phantom_store.path, tmp_path / "a", "--max-epochs", "4"))
    assert straight.returncode == 0, straight.stderr
    part = run(train_cmd(phantom_store.path, tmp_path / "b", "--max-epochs", "2"))
    assert part.returncode == 0, part.stderr
    resumed = run([*resume_cmd(tmp_path / "b" / "run"), "--max-epochs", "4"])
    assert resumed.returncode == 0, resumed.stderr
    assert_same_result(tmp_path / "b" / "run", tmp_path / "a" / "run")
    assert_identical(state(tmp_path / "b" / "run"), state(tmp_path / "a" / "run"))
