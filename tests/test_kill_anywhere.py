"""Kill-anywhere: SIGKILL a CLI training run at chosen (default) or random (-m slow) moments,
resume after each kill; resume always succeeds, no file of the experiment is ever truncated or
half-written, and the final weights and logs equal those of an uninterrupted run.

Kills at precise moments come from two test-only switches, both off by default:
``KILL_TEST_AT=train:N|valid:N`` (this module's `kill_loss`, given as ``--loss``, SIGKILLs its
own process at the N-th training/validation batch) and ``TRACTRAIN_TEST_FAULT`` (see
`tractrain.faults.fault_point`: kills inside checkpoint, best-model and log writes).
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tractrain.faults import FAULT_ENV

HERE = Path(__file__).resolve().parent
DETERMINISTIC = ("train_loss", "valid_loss", "grad_norm", "unclipped_grad_norm", "lr")
DEBRIS = re.compile(r"\.(new|old)$|\.tmp-\d+$")
PNG_END = b"IEND\xaeB`\x82"
_calls = {"train": 0, "valid": 0}


def kill_loss(model, batch):
    """The demo loss; SIGKILLs this process at the batch named by ``KILL_TEST_AT``."""
    from tractrain.examples.next_direction import loss_fn

    mode = "train" if model.training else "valid"
    _calls[mode] += 1
    target = os.environ.get("KILL_TEST_AT", "")
    if target == f"{mode}:{_calls[mode]}":
        os.kill(os.getpid(), signal.SIGKILL)
    return loss_fn(model, batch)


def train_args(store, experiments, max_epochs):
    return ["--store", str(store), "--experiments", str(experiments), "--name", "run",
            "--max-epochs", str(max_epochs), "--max-batches-train", "4",
            "--max-batches-valid", "2", "--batch-size", "1000", "--checkpoint-every", "2",
            "--model-config", '{"hidden_size": 8}', "--device", "cpu", "--progress", "false",
            "--loss", "test_kill_anywhere:kill_loss"]


def child_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in (FAULT_ENV, "KILL_TEST_AT")}
    env.update(PYTHONPATH=os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", MPLBACKEND="Agg", **extra)
    return env


def start(args, **extra):
    return subprocess.Popen([sys.executable, "-m", *args], env=child_env(**extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def reference_run(store, experiments, max_epochs):
    """The uninterrupted run, in this process (1 torch thread, like the children)."""
    from tractrain.bin.train import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(train_args(store, experiments, max_epochs)) == 0
    finally:
        torch.set_num_threads(threads)
    return Path(experiments) / "run"


def file_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete file of its kind (None if it is)."""
    data = path.read_bytes()
    try:
        if path.suffix == ".json":
            json.loads(data)
        elif path.suffix == ".npy":
            assert np.load(path, allow_pickle=False).ndim == 1
        elif path.suffix == ".pt":
            assert isinstance(torch.load(path, map_location="cpu", weights_only=True), dict)
        elif path.suffix == ".csv":
            rows = list(csv.reader(data.decode().splitlines()))
            assert rows and all(len(r) == len(rows[0]) for r in rows)
        elif path.suffix == ".png":
            assert data.startswith(b"\x89PNG") and data.endswith(PNG_END)
        elif path.name == ".complete":
            assert data == b"ok\n"
    except Exception as err:  # any failure to parse is the finding
        return f"{type(err).__name__}: {err}"
    return None


def inspect(exp: Path, same_epochs: bool = True) -> tuple[list[str], list[str]]:
    """``(debris, broken)``: leftovers of interrupted writes, and visible files that are
    truncated or half-written (or complete folders missing a file); with ``same_epochs``, log
    files holding different numbers of epochs also count as broken. (A kill between two log
    files' renames leaves them one epoch apart until the resumed run rewrites them.)"""
    debris, broken = [], []
    for path in sorted(exp.rglob("*")):
        rel = path.relative_to(exp)
        if any(DEBRIS.search(part) for part in rel.parts):
            debris.append(str(rel))
        elif path.is_file() and (problem := file_problem(path)):
            broken.append(f"{rel}: {problem}")
    for folder, needed in (("checkpoint", ("state.pt", "meta.json", "config.json")),
                           ("best_model", ("model.pt", "config.json", "best_epoch.json"))):
        if (exp / folder).exists():
            missing = [n for n in (".complete", *needed) if not (exp / folder / n).is_file()]
            if missing:
                broken.append(f"{folder}: missing {missing}")
    lengths = {p.name: len(np.load(p)) for p in (exp / "logs").glob("*.npy")}
    if same_epochs and len(set(lengths.values())) > 1:
        broken.append(f"logs of different lengths: {lengths}")
    return debris, broken


def assert_same_result(exp: Path, ref: Path) -> None:
    state = torch.load(exp / "checkpoint" / "state.pt", weights_only=True)
    expected = torch.load(ref / "checkpoint" / "state.pt", weights_only=True)
    for key, value in expected["model"].items():
        assert torch.equal(state["model"][key], value), key
    for pid, slot in expected["optimizer"]["state"].items():
        for name, value in slot.items():
            assert torch.equal(torch.as_tensor(state["optimizer"]["state"][pid][name]),
                               torch.as_tensor(value)), (pid, name)
    best = torch.load(exp / "best_model" / "model.pt", weights_only=True)
    for key, value in torch.load(ref / "best_model" / "model.pt", weights_only=True).items():
        assert torch.equal(best[key], value), key
    assert (json.loads((exp / "best_epoch.json").read_text())
            == json.loads((ref / "best_epoch.json").read_text()))
    for name in DETERMINISTIC:
        np.testing.assert_array_equal(np.load(exp / "logs" / f"{name}.npy"),
                                      np.load(ref / "logs" / f"{name}.npy"), err_msg=name)
    ref_logs = sorted(p.name for p in (ref / "logs").iterdir())
    assert sorted(p.name for p in (exp / "logs").iterdir()) == ref_logs


def killed_run(args, exp: Path, **switch) -> None:
    """Run one child with a kill switch; assert it died by SIGKILL and left nothing broken."""
    proc = start(args, **switch)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"{switch}: exit {proc.returncode}\n{err}"
    _, broken = inspect(exp, same_epochs=False)
    assert not broken, (switch, broken)


def test_kill_at_chosen_moments_then_resume_is_exact(phantom_store, tmp_path):
    store, epochs = phantom_store.path, 3
    ref = reference_run(store, tmp_path / "ref", epochs)
    exp = tmp_path / "exps" / "run"
    train = ["tractrain.bin.train", *train_args(store, tmp_path / "exps", epochs)]
    resume = ["tractrain.bin.resume", str(exp), "--trust-experiment"]  # its test loss
    moments = [  # (command, switch); each resume restarts from the last complete checkpoint
        (train, {FAULT_ENV: "write:model.pt"}),  # epoch 1 best model: model.pt half-written
        (resume, {"KILL_TEST_AT": "train:4"}),  # mid epoch 2, its checkpoint not yet written
        (resume, {FAULT_ENV: "checkpoint:swap"}),  # old checkpoint moved aside, new not in place
        (resume, {"KILL_TEST_AT": "valid:1"}),  # during epoch 2's validation
    ]
    for args, switch in moments:
        killed_run(args, exp, **switch)
    done = start(resume)
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    debris, broken = inspect(exp)
    assert not debris and not broken, (debris, broken)
    assert_same_result(exp, ref)


@pytest.mark.slow
def test_random_kills_then_resume_is_exact(phantom_store, tmp_path):
    """>= 20 SIGKILLs at random times or random write/batch moments; prints the counts."""
    store, epochs, wanted = phantom_store.path, 300, 22
    rng = random.Random(int(os.environ.get("KILL_TEST_SEED", "0")))
    ref = reference_run(store, tmp_path / "ref", epochs)
    exp = tmp_path / "exps" / "run"
    train = ["tractrain.bin.train", *train_args(store, tmp_path / "exps", epochs)]
    resume = ["tractrain.bin.resume", str(exp), "--trust-experiment"]  # its test loss
    events = ["checkpoint:written", "checkpoint:complete", "checkpoint:swap",
              "best_model:written", "best_model:complete", "best_model:swap",
              "write:state.pt", "write:model.pt", "write:meta.json", "write:train_loss.npy",
              "replace:train_loss.npy", "write:logs.csv", "replace:best_epoch.json",
              "write:plot.png"]
    kills, attempts, resumes, started = 0, 0, 0, False
    while kills < wanted and attempts < 3 * wanted:
        attempts += 1
        kind = rng.choice(["timer", "timer", "event", "batch"])
        switch = {}
        if kind == "event":
            switch[FAULT_ENV] = f"{rng.choice(events)}@{rng.randint(1, 2)}"
        elif kind == "batch":
            switch["KILL_TEST_AT"] = f"{rng.choice(['train', 'valid'])}:{rng.randint(1, 5)}"
        proc = start(resume if started else train, **switch)
        if kind == "timer":
            delay = rng.uniform(3.5, 6.0)
            deadline = time.time() + delay
            while proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
        if not (exp / "checkpoint").exists() and not (exp / "checkpoint.new").exists():
            started = False  # killed before the first checkpoint: start over
            if exp.exists():
                import shutil

                shutil.rmtree(exp)
            continue
        if proc.returncode == -signal.SIGKILL:
            kills += 1
            _, broken = inspect(exp, same_epochs=False)
            assert not broken, (switch, broken)
        elif proc.returncode == 0:
            if started:
                resumes += 1
            started = True
            if "done:" in out and (exp / "logs" / "train_loss.npy").exists() and len(
                    np.load(exp / "logs" / "train_loss.npy")) == epochs:
                break  # finished before enough kills: counts stay as they are
        elif proc.returncode == 2 and "already trained" in err:
            break  # the previous kill landed after the last checkpoint: the run is complete
        else:
            pytest.fail(f"{switch}: exit {proc.returncode}\n{err}")
        if started and proc.returncode == -signal.SIGKILL:
            resumes += 1
        started = True
    final = start(resume)
    out, err = final.communicate(timeout=300)
    finished = final.returncode == 0 or "already trained" in err
    assert finished, err
    debris, broken = inspect(exp)
    assert not debris and not broken, (debris, broken)
    assert_same_result(exp, ref)
    print(f"\nkill-anywhere: {kills} kills survived / {kills} landed / {attempts} tried",
          file=sys.stderr)
    assert kills >= 20
