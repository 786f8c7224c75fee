"""Paths in config.json are absolute: an experiment trained from one directory resumes, tracks
and evaluates from any other; a recorded model file stays untrusted data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tractrain.bin.options import absolute_paths
from tractrain.errors import ConfigError
from tractrain.experiment import read_logs
from tractrain.imports import absolute_spec, check_recorded

MODEL = """from tractrain.examples.next_direction import make_model


def factory(config):
    return make_model(config)
"""


def cli(module: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"tractrain.bin.{module}", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def test_relative_paths_are_recorded_absolute_and_resume_works_elsewhere(
        phantom_store, tmp_path, monkeypatch, capsys):
    from tractrain.bin.resume import main as resume_main

    here, elsewhere = tmp_path / "a", tmp_path / "b"
    (here / "models").mkdir(parents=True)
    elsewhere.mkdir()
    (here / "models" / "mine.py").write_text(MODEL)
    store = os.path.relpath(phantom_store.path, here)
    done = cli("train", "--store", store, "--experiments", "exps", "--name", "run",
               "--cache-dir", "cache", "--model", "models/mine.py:factory",
               "--max-epochs", "1", "--max-batches-train", "1", "--batch-size", "1000",
               "--max-batches-valid", "1", "--progress", "false", cwd=here)
    assert done.returncode == 0, done.stderr
    exp = here / "exps" / "run"
    config = json.loads((exp / "config.json").read_text())
    assert config["store"] == str(Path(phantom_store.path).absolute())
    assert config["experiments"] == str(here / "exps")
    assert config["cache_dir"] == str(here / "cache")
    assert config["model"] == f"{(here / 'models' / 'mine.py').resolve()}:factory"

    relative_exp = os.path.relpath(exp, elsewhere)
    monkeypatch.chdir(elsewhere)
    assert resume_main([relative_exp, "--max-epochs", "2"]) == 2  # the recorded file is still
    err = capsys.readouterr().err                                  # code from outside
    assert f"model '{config['model']}'" in err and "--trust-experiment" in err
    assert resume_main([relative_exp, "--max-epochs", "2", "--trust-experiment"]) == 0
    assert len(read_logs(exp)["train_loss"]) == 2  # resumed on the recorded store
    assert json.loads((exp / "config.json").read_text())["max_epochs"] == 2


def test_absolute_paths_and_specs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = absolute_paths({"store": "s.zarr", "experiments": "~/exps", "cache_dir": None,
                             "model": "m.py:f", "loss": "tractrain.examples.next_direction:"
                             "loss_fn", "name": "run"})
    assert config["store"] == str(tmp_path / "s.zarr")
    assert config["experiments"] == str(Path("~/exps").expanduser())
    assert config["cache_dir"] is None and config["name"] == "run"
    assert config["model"] == f"{tmp_path.resolve() / 'm.py'}:f"
    assert config["loss"] == "tractrain.examples.next_direction:loss_fn"  # a module: as is
    assert absolute_spec("pkg.mod:f") == "pkg.mod:f" and absolute_spec(3) == 3
    assert "loss" not in absolute_paths({"model": "x.py:f"}, names=("model", "loss"))
    with pytest.raises(ConfigError, match="refused"):  # an absolute file is no more trusted
        check_recorded(config["model"], "model", "config.json", False, "pass --model")
