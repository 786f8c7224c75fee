"""The experiment folder's one owner: layout names, the safe weights loader, the readers."""

from __future__ import annotations

import ast
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from tractrain.atomic import COMPLETE_MARKER
from tractrain.errors import CheckpointError, ConfigError
from tractrain.experiment import (
    ExperimentDir,
    load_weights,
    read_best_epoch,
    read_best_model,
    read_config,
    read_logs,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("tractrain", "engine", "hooks", "data", "generation", "bin", "examples")


def test_layout_is_the_documented_one(tmp_path):
    exp = ExperimentDir(tmp_path)
    assert exp.config == tmp_path / "config.json"
    assert exp.checkpoint == tmp_path / "checkpoint"
    assert exp.best_model == tmp_path / "best_model"
    assert exp.best_epoch == tmp_path / "best_epoch.json"
    assert exp.logs == tmp_path / "logs"
    assert exp.logs_csv == tmp_path / "logs" / "logs.csv"
    assert exp.plot == tmp_path / "logs" / "plot.png"
    assert exp.comet == tmp_path / "comet"
    assert os.fspath(exp) == str(tmp_path) == str(exp)  # usable wherever a path is
    assert ExperimentDir(exp) == exp


def test_no_other_shipped_module_joins_a_layout_name_onto_a_path():
    names = {"config.json", "checkpoint", "best_model", "best_epoch.json", "logs", "logs.csv",
             "plot.png", "comet", "model.pt"}
    found = []
    for folder in SHIPPED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "tractrain" / "experiment.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
                        and isinstance(node.right, ast.Constant) and node.right.value in names):
                    if folder == "data" and node.right.value == "config.json":
                        continue  # a raw folder's builder config: not the experiment's
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.right.value}")
    assert not found, "use tractrain.experiment.ExperimentDir: " + ", ".join(found)


def test_load_weights_refuses_code_in_one_line(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "state.pt"
    path.write_bytes(pickle.dumps({"model": Payload()}))
    with pytest.raises(CheckpointError, match="refused: not a plain tensor/JSON checkpoint") as e:
        load_weights(path, "checkpoint")
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert not (tmp_path / "pwned").exists()


def test_load_weights_missing_truncated_or_not_a_dict(tmp_path):
    with pytest.raises(CheckpointError, match="missing \\(incomplete checkpoint\\)"):
        load_weights(tmp_path / "state.pt", "checkpoint")
    torch.save({"w": torch.ones(3)}, tmp_path / "full.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:40])
    with pytest.raises(CheckpointError, match="cut.pt: refused"):
        load_weights(tmp_path / "cut.pt", "best model")
    torch.save([torch.ones(3)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_weights(tmp_path / "list.pt", "best model")
    assert torch.equal(load_weights(tmp_path / "full.pt", "best model")["w"], torch.ones(3))


def test_read_best_model_takes_the_complete_copy_of_a_cut_swap(tmp_path):
    new = tmp_path / "best_model.new"  # killed after writing the new folder, before the swap
    new.mkdir()
    torch.save({"w": torch.full((2,), 7.0)}, new / "model.pt")
    (new / "config.json").write_text(json.dumps({"hidden": 4}))
    (new / COMPLETE_MARKER).touch()
    weights, config = read_best_model(tmp_path)
    assert config == {"hidden": 4} and torch.equal(weights["w"], torch.full((2,), 7.0))
    with pytest.raises(CheckpointError, match="no complete best model"):
        read_best_model(tmp_path / "other")


def test_read_config_says_what_is_wrong(tmp_path):
    with pytest.raises(CheckpointError, match="no such experiment folder"):
        read_config(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a tractrain experiment"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_bytes(b"\xff{")
    with pytest.raises(CheckpointError, match="config.json: unreadable"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text('{"max_epochs": 3}')
    assert read_config(tmp_path) == {"max_epochs": 3}


def test_read_logs_gives_float64_and_refuses_malformed_files(tmp_path):
    (tmp_path / "logs").mkdir()
    np.save(tmp_path / "logs" / "epochs_seen.npy", np.arange(3))
    np.save(tmp_path / "logs" / ".tmp-lr.npy", np.ones((2, 2)))  # a temp a kill left: ignored
    logs = read_logs(tmp_path)
    assert list(logs) == ["epochs_seen"] and logs["epochs_seen"].dtype == np.float64
    np.save(tmp_path / "logs" / "lr.npy", np.ones((2, 2)))
    with pytest.raises(ConfigError, match="lr.npy: expected a 1-D numeric array"):
        read_logs(tmp_path)
    with pytest.raises(ConfigError, match="no logs"):
        read_logs(tmp_path / "logs")


def test_read_best_epoch_is_none_or_a_valid_record(tmp_path):
    assert read_best_epoch(tmp_path) is None
    (tmp_path / "best_epoch.json").write_text('{"epoch": 0}')
    with pytest.raises(ConfigError, match="integer 'epoch' >= 1"):
        read_best_epoch(tmp_path)
    (tmp_path / "best_epoch.json").write_text('{"epoch": 2, "value": 0.5}')
    assert read_best_epoch(tmp_path) == {"epoch": 2, "value": 0.5}
