"""The public API: lazy top-level imports, `load_model`, and the README's reuse snippet."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tractrain
from tractrain.errors import CheckpointError, ConfigError
from tractrain.experiment import read_best_model
from tractrain.hooks.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_import_tractrain_loads_no_heavy_dependency():
    code = ("import sys, tractrain; "
            "print(sorted(m for m in ('torch', 'ignite', 'zarr') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


def test_every_exported_name_resolves_and_is_listed():
    for name in tractrain.__all__:
        assert getattr(tractrain, name) is not None, name
        assert name in dir(tractrain)
    for name in ("open_store", "BatchSampler", "SamplerConfig", "make_dataloader",
                 "create_trainer", "train_and_validate", "load_model", "evaluate",
                 "Checkpoint", "BestModel", "Validation", "Patience", "NpyLogs"):
        assert name in tractrain.__all__, name
    from tractrain.engine.reuse import load_model

    assert tractrain.load_model is load_model
    with pytest.raises(AttributeError, match="no_such_name"):
        tractrain.no_such_name  # noqa: B018


def _same_weights(model: torch.nn.Module, weights: dict) -> bool:
    state = model.state_dict()
    return state.keys() == weights.keys() and all(torch.equal(state[k], weights[k])
                                                  for k in state)


def test_load_model_rebuilds_the_recorded_model_with_either_weights(trained_experiment):
    best = tractrain.load_model(trained_experiment)
    assert type(best).__name__ == "NextDirectionGRU" and not best.training
    assert next(best.parameters()).device.type == "cpu"
    assert _same_weights(best, read_best_model(trained_experiment)[0])
    latest = tractrain.load_model(trained_experiment, which="checkpoint", device="cpu")
    assert _same_weights(latest, load_checkpoint(trained_experiment)[1]["model"])


def test_load_model_refuses_bad_requests_in_one_line(trained_experiment, tmp_path):
    with pytest.raises(ConfigError, match="which 'last': expected one of best, checkpoint"):
        tractrain.load_model(trained_experiment, which="last")
    with pytest.raises(CheckpointError, match="no complete best model") as err:
        tractrain.load_model(tmp_path)
    assert "\n" not in str(err.value)


def test_readme_reuse_snippet_runs(trained_experiment, tmp_path):
    text = (ROOT / "README.md").read_text()
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", text, flags=re.S)
               if "load_model" in c]
    assert len([line for line in code.splitlines() if line.strip()]) == 3
    assert '"experiments/demo"' in code
    code = code.replace('"experiments/demo"', repr(str(trained_experiment)))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "NextDirectionGRU" in done.stdout
