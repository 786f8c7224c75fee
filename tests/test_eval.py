"""Evaluation: `tractrain.evaluate` and `tractrain-eval` (loss per subject and overall)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import tractrain
from tractrain.bin.compose import eval_loader
from tractrain.engine.evaluate import subject_index
from tractrain.examples.next_direction import loss_fn as demo_loss
from tractrain.experiment import read_config, read_logs
from tractrain.hooks.checkpoint import read_meta


def eval_cli(*args):
    return subprocess.run([sys.executable, "-m", "tractrain.bin.eval", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


class Item:
    def __init__(self, loss: float, n: int) -> None:
        self.loss, self.n = loss, n

    def to(self, device, non_blocking=False):
        return self


def test_evaluate_is_the_n_weighted_mean_in_eval_mode_without_gradients():
    model = torch.nn.Linear(2, 1)

    def loss_fn(m, item):
        assert not m.training and not torch.is_grad_enabled()
        return torch.tensor(item.loss), item.n

    result = tractrain.evaluate(model, loss_fn, [Item(1.0, 1), Item(4.0, 3)])
    assert result == {"loss": pytest.approx(13 / 4), "n": 4.0, "batches": 2}
    assert model.training  # left in the mode it was in
    assert np.isnan(tractrain.evaluate(model, loss_fn, [Item(2.0, 0)])["loss"])


def test_valid_split_reproduces_the_logged_valid_loss(trained_experiment):
    done = eval_cli(trained_experiment, "--split", "valid", "--which", "checkpoint",
                    "--gen-streamlines", "10")
    assert done.returncode == 0, done.stderr
    epoch = read_meta(trained_experiment)["epoch"]
    logged = read_logs(trained_experiment)["valid_loss"][epoch - 1]
    report = json.loads((trained_experiment / "eval" / "valid.json").read_text())
    assert (report["split"], report["which"], report["epoch"]) == ("valid", "checkpoint", epoch)
    assert report["loss"] == pytest.approx(logged, rel=1e-9)
    assert [s["subject"] for s in report["subjects"]] == ["sub-03"]
    assert report["subjects"][0]["loss"] == pytest.approx(logged, rel=1e-9)
    assert set(report["generation"]) == {"gen_endpoint_dist", "gen_within", "gen_length"}
    assert 0.0 <= report["generation"]["gen_within"] <= 1.0
    with open(trained_experiment / "eval" / "valid.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["subject"] for r in rows] == ["sub-03", "all"]
    assert float(rows[-1]["loss"]) == pytest.approx(logged, rel=1e-12)
    assert rows[-1]["gen_endpoint_dist"] and not rows[0]["gen_endpoint_dist"]
    assert "sub-03" in done.stdout and "gen_endpoint_dist" in done.stdout  # the table
    base = report["baselines"]  # the demo's loss: trivial predictors on the same steps
    assert base["n"] == report["n"] and 0.0 <= base["previous_direction"] <= 2.0
    assert 0.0 <= base["constant_direction"] <= 1.0
    assert "repeat previous direction" in done.stdout


def test_default_is_the_test_split_with_the_best_model(trained_experiment):
    done = eval_cli(trained_experiment, "--gen-streamlines", "0")
    assert done.returncode == 0, done.stderr
    report = json.loads((trained_experiment / "eval" / "test.json").read_text())
    best = json.loads((trained_experiment / "best_epoch.json").read_text())
    assert (report["split"], report["which"], report["epoch"]) == ("test", "best", best["epoch"])
    assert report["generation"] is None and np.isfinite(report["loss"]) and report["n"] > 0
    header = (trained_experiment / "eval" / "test.csv").read_text().splitlines()[0]
    assert header == "subject,n,batches,loss"


def test_subject_losses_combine_into_the_split_loss(trained_experiment, phantom_store):
    """Two train subjects: batches mix them, yet per-subject losses weighted by n give the
    split's loss (the demo loss is a mean over points)."""
    model = tractrain.load_model(trained_experiment)
    config = read_config(trained_experiment)
    index = tractrain.split_index(phantom_store, "train", config["group"])
    assert len(index.subjects) == 2
    overall = tractrain.evaluate(model, demo_loss, eval_loader(phantom_store, config, index))
    parts = [tractrain.evaluate(model, demo_loss,
                                eval_loader(phantom_store, config, subject_index(index, s)))
             for s in index.subjects]
    assert sum(p["n"] for p in parts) == overall["n"]
    combined = sum(p["loss"] * p["n"] for p in parts) / overall["n"]
    assert combined == pytest.approx(overall["loss"], rel=1e-5)


def test_an_empty_split_is_a_one_line_error(trained_experiment, tmp_path):
    from tractrain.data.phantom import demo_store

    three = demo_store(tmp_path, n_subjects=3, streamlines_per_subject=20, seed=3)
    assert three.splits["test"] == []
    done = eval_cli(trained_experiment, "--store", three.path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--split test" in lines[0] and "no test subjects" in lines[0]
