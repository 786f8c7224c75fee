"""Cluster life-cycle: SIGUSR1 (SLURM's time-limit warning) checkpoints and stops, requeues the
job with ``scontrol requeue`` (a fake one on PATH) when asked, the same ``tractrain-train
--resume auto`` command then continues bit-identically; versions recorded in the checkpoint;
``--keep-checkpoints`` and going back with ``tractrain-resume --from-checkpoint``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import stat
from pathlib import Path

import pytest
from test_kill_anywhere import assert_same_result

from tractrain.hooks.checkpoint import load_checkpoint, package_versions, version_changes

_calls = {"train": 0}
USR1_AT = "LIFECYCLE_USR1_AT"


def usr1_loss(model, batch):
    """The demo loss; sends SIGUSR1 to its own process and its DataLoader workers at training
    batch ``$LIFECYCLE_USR1_AT`` (counted from the first call in this process)."""
    from tractrain.examples.next_direction import loss_fn

    if model.training:
        _calls["train"] += 1
        if str(_calls["train"]) == os.environ.get(USR1_AT):
            for worker in multiprocessing.active_children():  # as to a whole process group
                os.kill(worker.pid, signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGUSR1)
    return loss_fn(model, batch)


def train_args(store, experiments, *extra: str, loss: str = "test_lifecycle:usr1_loss",
               epochs: int = 2, batches: int = 4) -> list[str]:
    return ["--store", str(store), "--experiments", str(experiments), "--name", "run",
            "--max-epochs", str(epochs), "--max-batches-train", str(batches),
            "--max-batches-valid", "1", "--batch-size", "1000",
            "--model-config", '{"hidden_size": 8}', "--device", "cpu", "--progress", "false",
            "--loss", loss, *extra]


def fake_scontrol(folder: Path, status: int = 0) -> tuple[Path, Path]:
    """``(bin folder, record file)``: a ``scontrol`` that appends its arguments to the record
    and exits with ``status`` (printing an error like SLURM's when it fails)."""
    folder.mkdir()
    record = folder / "calls"
    script = folder / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{record}"\n'
                      + (f'echo "slurm_requeue error: Access/permission denied" >&2\n'
                         f"exit {status}\n" if status else "exit 0\n"))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return folder, record


def test_sigusr1_requeues_and_the_same_command_resumes_exactly(phantom_store, tmp_path,
                                                               monkeypatch, capsys, one_thread):
    """SIGUSR1 to the main process and its 2 DataLoader workers (SLURM signals every process
    of a job step): checkpoint, ``scontrol requeue $SLURM_JOB_ID``, exit 0; the same command
    started again continues, ending bit-identical to an uninterrupted run."""
    from tractrain.bin.train import main

    command = ("--requeue", "true", "--resume", "auto")
    assert main(train_args(phantom_store.path, tmp_path / "ref", *command)) == 0
    bindir, record = fake_scontrol(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv(USR1_AT, str(_calls["train"] + 6))  # epoch 2, batch 2 of 4
    argv = train_args(phantom_store.path, tmp_path / "exps", *command, "--num-workers", "2")
    capsys.readouterr()
    assert main(argv) == 0  # requeued: nothing failed
    err = capsys.readouterr().err
    assert err.count("SIGUSR1 received") == 1, err
    assert "killed by signal" not in err and "stopped at epoch 2, iteration 6" in err, err
    assert "SLURM job 4242 requeued" in err, err
    assert record.read_text() == "requeue 4242\n"
    assert main(argv) == 0  # the requeued job's start: the very same command
    assert "continuing it" in capsys.readouterr().out
    assert_same_result(tmp_path / "exps" / "run", tmp_path / "ref" / "run")


@pytest.mark.parametrize("case", ["no-slurm", "requeue-off", "scontrol-fails"])
def test_sigusr1_without_requeue_checkpoints_and_stops(case, phantom_store, tmp_path,
                                                       monkeypatch, capsys, one_thread):
    from tractrain.bin.train import main

    bindir, record = fake_scontrol(tmp_path / "bin", status=1 if case == "scontrol-fails" else 0)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv(USR1_AT, str(_calls["train"] + 2))
    if case == "no-slurm":
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    else:
        monkeypatch.setenv("SLURM_JOB_ID", "77")
    requeue = "false" if case == "requeue-off" else "true"
    status = main(train_args(phantom_store.path, tmp_path, "--requeue", requeue, epochs=1,
                             batches=3))
    err = capsys.readouterr().err
    assert status == 138, err  # 128 + SIGUSR1: unfinished, not requeued
    assert "SIGUSR1 received" in err and "stopped at epoch 1, iteration 2" in err, err
    meta, states = load_checkpoint(tmp_path / "run")
    assert meta["iteration"] == 2 and "model" in states
    if case == "scontrol-fails":
        assert record.read_text() == "requeue 77\n"
        lines = [line for line in err.splitlines() if "not requeued" in line]
        assert len(lines) == 1, err
        assert "Access/permission denied" in lines[0] and "checkpoint is intact" in lines[0]
    else:
        assert not record.exists()  # scontrol never called
        why = "SLURM_JOB_ID is not set" if case == "no-slurm" else "--requeue is off"
        assert f"not requeued ({why}): continue with 'tractrain-resume {tmp_path / 'run'}'" \
            in err, err
        assert "--resume auto" in err


def copy_experiment(source: Path, parent: Path) -> Path:
    shutil.copytree(source, parent / "run", ignore=shutil.ignore_patterns(".lock"))
    return parent / "run"


def trained_args(store, parent: Path, *extra: str) -> list[str]:
    """The options the session's ``trained_experiment`` was made with (tests/conftest.py)."""
    return ["--store", str(store), "--experiments", str(parent), "--name", "run",
            "--max-epochs", "2", "--max-batches-train", "3", "--batch-size", "1500",
            "--progress", "false", *extra]


def test_resume_auto_continues_and_warns_once_about_major_versions(
        trained_experiment, phantom_store, tmp_path, capsys, one_thread):
    from tractrain.bin.train import main

    exp = copy_experiment(trained_experiment, tmp_path)
    meta_path = exp / "checkpoint" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["versions"] == package_versions()
    assert set(meta["versions"]) == {"tractrain", "torch", "numpy", "zarr", "ignite"}
    meta["versions"]["torch"] = "1.13.1"
    meta_path.write_text(json.dumps(meta))
    status = main(trained_args(phantom_store.path, tmp_path, "--max-epochs", "3",
                               "--resume", "auto"))
    err = capsys.readouterr().err
    assert status == 0, err
    lines = [line for line in err.splitlines() if "another major version" in line]
    assert len(lines) == 1, err  # once, for the one package that changed
    assert lines[0].startswith(f"checkpoint written with torch 1.13.1, resumed with torch "
                               f"{package_versions()['torch']}"), lines[0]
    assert "resumed from epoch 2" in err, err
    assert json.loads((exp / "checkpoint" / "meta.json").read_text())["epoch"] == 3


def test_version_changes_compare_major_versions_only():
    now = package_versions()
    assert version_changes({"versions": dict(now)}) == []
    assert version_changes({"tractrain": now["tractrain"]}) == []  # tractrain <= 0.1: no record
    assert version_changes({}) == []
    minor = dict(now, numpy=now["numpy"].split(".")[0] + ".0.0")  # same major, other minor
    assert version_changes({"versions": minor}) == []
    ignite = now["ignite"].split(".")
    assert ignite[0] == "0"  # 0.x: the minor number is the major one
    older = dict(now, ignite=f"0.{int(ignite[1]) + 1}.0")
    (line,) = version_changes({"versions": older})
    assert f"ignite 0.{int(ignite[1]) + 1}.0" in line and now["ignite"] in line


def test_resume_auto_refuses_a_changed_option_in_one_line(trained_experiment, phantom_store,
                                                          tmp_path, capsys):
    from tractrain.bin.train import main

    exp = copy_experiment(trained_experiment, tmp_path)
    before = {p: p.read_bytes() for p in exp.rglob("*") if p.is_file()}
    assert main(trained_args(phantom_store.path, tmp_path, "--lr", "0.5",
                             "--resume", "auto")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--lr '0.5'" in err and "recorded with" in err, err
    assert main(trained_args(phantom_store.path, tmp_path, "--force", "--resume", "auto")) == 2
    assert "choose one" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in exp.rglob("*") if p.is_file()} == before


def test_resume_auto_keeps_recorded_options_not_given():
    from tractrain.bin.cluster import auto_config
    from tractrain.errors import ConfigError

    model, loss = "tractrain.examples.next_direction:make_model", "mypkg.losses:loss"
    recorded = {"lr": "1e-3", "max_epochs": 2, "seed": 5, "model": model, "loss": loss}
    wanted = {"lr": "0.003", "max_epochs": 4, "seed": 1234, "model": model, "loss": loss,
              "requeue": True}
    assert auto_config(recorded, wanted, {"max_epochs", "requeue"}, "exp") == {
        "lr": "1e-3", "max_epochs": 4, "seed": 5, "model": model, "loss": loss,
        "requeue": True}
    with pytest.raises(ConfigError, match="^--loss 'other.mod:loss': exp was recorded with"):
        auto_config(recorded, dict(wanted, loss="other.mod:loss"), set(), "exp")


def test_resume_auto_may_change_what_tractrain_resume_may():
    """Every option `tractrain-resume` takes (e.g. --precision on a GPU node, a longer
    --dist-timeout) is also taken by `--resume auto`; others are still refused."""
    from tractrain.bin.cluster import auto_config
    from tractrain.bin.resume import OVERRIDES
    from tractrain.errors import ConfigError

    recorded = {"precision": "32", "dist_timeout": 600, "pin_memory": None, "lr": "1e-3"}
    wanted = {"precision": "bf16-mixed", "dist_timeout": 1800, "pin_memory": False, "lr": "1e-3"}
    assert auto_config(recorded, wanted, set(wanted), "exp") == wanted
    for name in OVERRIDES:
        assert auto_config({name: 1}, {name: 2}, {name}, "exp") == {name: 2}
    with pytest.raises(ConfigError, match="^--lr '0.003': exp was recorded with"):
        auto_config(recorded, dict(wanted, lr="0.003"), set(wanted), "exp")


def test_keep_checkpoints_prunes_and_going_back_reproduces(phantom_store, tmp_path, capsys,
                                                           one_thread):
    from tractrain.bin.resume import main as resume
    from tractrain.bin.train import main as train

    args = train_args(phantom_store.path, tmp_path / "exps", "--keep-checkpoints", "2",
                      loss="tractrain.examples.next_direction:loss_fn", epochs=3, batches=2)
    assert train(args) == 0
    exp = tmp_path / "exps" / "run"
    kept = exp / "checkpoints"
    assert sorted(p.name for p in kept.iterdir()) == ["epoch-2", "epoch-3"]  # epoch-1 pruned
    for folder in kept.iterdir():
        assert (folder / ".complete").is_file() and (folder / "best_model" / "model.pt").is_file()
    assert (kept / "epoch-3" / "state.pt").read_bytes() == \
        (exp / "checkpoint" / "state.pt").read_bytes()
    assert json.loads((kept / "epoch-2" / "meta.json").read_text())["epoch"] == 2
    reference = tmp_path / "ref" / "run"
    shutil.copytree(exp, reference)
    capsys.readouterr()
    assert resume([str(exp), "--from-checkpoint", str(kept / "epoch-1")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a kept checkpoint" in err and "epoch-2, epoch-3" in err
    assert resume([str(exp), "--from-checkpoint", str(kept / "epoch-2")]) == 0
    assert "resumed from epoch 2" in capsys.readouterr().err
    assert_same_result(exp, reference)  # epoch 3 again: the same weights, best model, logs
    assert sorted(p.name for p in kept.iterdir()) == ["epoch-2", "epoch-3"]
