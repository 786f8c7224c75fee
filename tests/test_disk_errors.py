"""Disk errors (ENOSPC, EIO injected with `tractrain.faults.fault_point`) during a
checkpoint, best-model or log write: the run stops with one line naming the file and the OS
error (exit status 1), the previous files are intact, no write debris is left, and a resume
once the disk is fine continues from the previous checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tractrain import atomic, faults
from tractrain.atomic import write_file
from tractrain.bin.resume import main as resume_main
from tractrain.bin.train import main as train_main
from tractrain.faults import FAULT_ENV

ARGS = ["--max-batches-train", "2", "--max-batches-valid", "1", "--batch-size", "800",
        "--model-config", '{"hidden_size": 8}', "--device", "cpu", "--progress", "false"]


def snapshot(exp: Path) -> dict[str, bytes]:
    """Every file of the experiment (but the plot, redrawn at each finish) by relative path."""
    return {str(p.relative_to(exp)): p.read_bytes() for p in sorted(exp.rglob("*"))
            if p.is_file() and p.name != "plot.png"}


@pytest.fixture(scope="module")
def one_epoch(phantom_store, tmp_path_factory):
    """An experiment trained for 1 epoch (checkpoint, best model and logs exist)."""
    root = tmp_path_factory.mktemp("disk")
    assert train_main(["--store", phantom_store.path, "--experiments", str(root),
                       "--name", "exp", "--max-epochs", "1", *ARGS]) == 0
    return root / "exp"


@pytest.fixture
def fault(monkeypatch):
    def arm(spec: str) -> None:
        monkeypatch.setenv(FAULT_ENV, spec)
        monkeypatch.setattr(faults, "_fault_counts", {})
    return arm


# (fault, fragments of the message, files kept as they were, epochs in the logs after it):
# logs are written before the checkpoint, so a failed checkpoint leaves epoch 2 logged (it
# did run) but every log file with the same epochs; a failed log write restores epoch 1.
CASES = [
    ("write:state.pt=ENOSPC", ("checkpoint", "No space left on device", "ENOSPC"),
     "checkpoint", 2),
    ("write:meta.json=EIO", ("checkpoint", "Input/output error", "EIO"), "checkpoint", 2),
    ("write:model.pt=ENOSPC", ("best_model", "No space left on device"), "best_model", 1),
    ("write:valid_loss.npy=EIO", ("valid_loss.npy", "Input/output error"), "logs", 1),
    ("replace:logs.csv=ENOSPC", ("logs.csv", "No space left on device"), "logs", 1),
]


@pytest.mark.parametrize("spec, names, kept, logged", CASES)
def test_failed_write_stops_cleanly_and_keeps_previous_files(one_epoch, tmp_path, capsys,
                                                            fault, spec, names, kept, logged):
    exp = tmp_path / "exp"
    shutil.copytree(one_epoch, exp)
    before = snapshot(exp)
    capsys.readouterr()
    fault(spec)
    status = resume_main([str(exp), "--max-epochs", "2", "--quiet"])  # errors only
    err = capsys.readouterr().err
    assert status == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("tractrain-resume: error: "), lines[0]
    for fragment in names:
        assert fragment.lower() in lines[0].lower(), lines[0]
    after = snapshot(exp)
    for rel, data in before.items():  # previous checkpoint / best model / logs intact
        if rel.startswith(kept) or rel.startswith("checkpoint"):
            assert after.get(rel) == data, rel
    leftovers = [str(p) for p in exp.rglob("*") if p.name.endswith((".new", ".old"))
                 or ".tmp-" in p.name]
    assert not leftovers
    lengths = {len(np.load(p)) for p in (exp / "logs").glob("*.npy")}
    assert lengths == {logged}, "every log file must hold the same epochs"

    fault("")
    assert resume_main([str(exp), "--max-epochs", "2"]) == 0  # the disk is fine again
    assert {len(np.load(p)) for p in (exp / "logs").glob("*.npy")} == {2}


def test_os_error_names_the_file_when_the_os_does_not(tmp_path, monkeypatch):
    """A real write error carries no file name; the atomic writers add the target's."""
    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    target = tmp_path / "table.csv"
    target.write_bytes(b"old\n")
    with pytest.raises(OSError) as info:
        atomic.atomic_write_bytes(target, b"new\n")
    assert info.value.filename == str(target) and info.value.errno == 28
    assert target.read_bytes() == b"old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]

    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "state.pt").write_bytes(b"previous")
    with pytest.raises(OSError) as info:
        atomic.atomic_write_dir(folder, lambda new: write_file(new / "state.pt", b"next"))
    assert info.value.filename == str(folder)
    assert (folder / "state.pt").read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "table.csv"]


@pytest.mark.parametrize("spec", ["write:state.pt=ENOSPC", "write:model.pt=EFBIG"])
def test_a_real_process_prints_only_the_one_line(one_epoch, tmp_path, spec):
    """Only tractrain's line: ignite's own "Engine run is terminating due to exception"
    lines go to the tractrain logger at DEBUG (pytest's log capture hides them in-process)."""
    import os
    import subprocess
    import sys

    exp = tmp_path / "exp"
    shutil.copytree(one_epoch, exp)
    done = subprocess.run([sys.executable, "-m", "tractrain.bin.resume", str(exp),
                           "--max-epochs", "2", "--quiet"], capture_output=True, text=True,
                          timeout=300,
                          env={**os.environ, FAULT_ENV: spec})
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tractrain-resume: error: "), done.stderr
    assert spec.rpartition("=")[2] in lines[0]
