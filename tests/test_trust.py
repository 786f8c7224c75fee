"""An experiment folder is data, never code (issue 15): recorded factories/losses are imported
only when tractrain's own, named by the user or explicitly trusted; launchers never import
from the current directory; experiment names cannot reach outside ``--experiments`` and
``--force`` removes only tractrain experiments; a failed resume changes no byte; symlinked
``checkpoint/``/``best_model/`` folders keep working."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tractrain.bin.eval import main as eval_main
from tractrain.bin.resume import main as resume_main
from tractrain.bin.track import main as track_main
from tractrain.bin.train import main as train_main
from tractrain.errors import ConfigError
from tractrain.experiment import ExperimentDir, read_best_model

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--max-batches-train", "2", "--max-batches-valid", "1", "--batch-size", "800",
        "--model-config", '{"hidden_size": 8}', "--device", "cpu", "--progress", "false"]
EVIL = "subprocess:getoutput"


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root``: file bytes, link targets, folders."""
    out: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            out[rel] = path.read_bytes()
        else:
            out[rel] = "dir"
    return out


@pytest.fixture(scope="module")
def one_epoch(phantom_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    assert train_main(["--store", phantom_store.path, "--experiments", str(root),
                       "--name", "exp", "--max-epochs", "1", *ARGS]) == 0
    return root / "exp"


@pytest.fixture
def exp(one_epoch, tmp_path) -> Path:
    shutil.copytree(one_epoch, tmp_path / "exp", symlinks=True)
    return tmp_path / "exp"


def one_error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]


def make_evil(exp: Path, spec: str = EVIL) -> None:
    """Point the folder's model (config.json and best_model/config.json) at ``spec``."""
    layout = ExperimentDir(exp)
    config = json.loads(layout.config.read_text())
    config.update(model=spec, model_config={"touch MARKER": 1})
    layout.config.write_text(json.dumps(config))
    best = layout.best_model / "config.json"
    best.write_text(json.dumps({"factory": spec, "touch MARKER": 1}))


# --- 1. trust model --------------------------------------------------------------------------
def test_recorded_code_is_refused_before_import(exp, tmp_path, monkeypatch, capsys,
                                                phantom_store):
    make_evil(exp)
    monkeypatch.chdir(tmp_path)
    store = str(phantom_store.path)
    commands = [
        ("tractrain-resume", resume_main, [str(exp), "--max-epochs", "2"]),
        ("tractrain-track", track_main, [str(exp), "--subject", phantom_store.subjects[0],
                                         "--store", store, "--out", str(tmp_path / "t.trk")]),
        ("tractrain-eval", eval_main, [str(exp), "--store", store]),
    ]
    for prog, main, argv in commands:
        before = snapshot(exp)
        capsys.readouterr()
        assert main(argv) == 2
        line = one_error_line(capsys, prog)
        assert EVIL in line and "--trust-experiment" in line and "--model" in line, line
        assert not (tmp_path / "MARKER").exists()
        assert snapshot(exp) == before
    from tractrain import load_model

    with pytest.raises(ConfigError, match="trust=True"):
        load_model(exp)
    assert not (tmp_path / "MARKER").exists()


def test_a_recorded_loss_is_refused_too(exp, capsys):
    config = json.loads(ExperimentDir(exp).config.read_text())
    config["loss"] = "os:system"
    ExperimentDir(exp).config.write_text(json.dumps(config))
    assert resume_main([str(exp), "--max-epochs", "2"]) == 2
    line = one_error_line(capsys, "tractrain-resume")
    assert "'os:system'" in line and "--loss os:system" in line


def test_the_user_may_name_the_factory(exp):
    from tractrain import load_model
    from tractrain.examples.next_direction import make_model

    best = ExperimentDir(exp).best_model / "config.json"
    _, recorded = read_best_model(exp)
    best.write_text(json.dumps({**recorded, "factory": "somepkg.models:make_model"}))
    with pytest.raises(ConfigError, match="somepkg.models:make_model"):
        load_model(exp)
    assert not load_model(exp, factory=make_model).training
    assert load_model(exp, factory="tractrain.examples.next_direction:make_model") is not None


def test_launchers_do_not_import_from_the_current_directory(exp):
    """A folder shipping ``evil_model.py``, trusted by mistake, still cannot run it: the
    launcher does not put the current directory on ``sys.path``."""
    make_evil(exp, "evil_model:make_model")
    (exp / "evil_model.py").write_text(
        "from pathlib import Path\nPath('MARKER').touch()\n"
        "def make_model(config):\n    Path('MARKER').touch()\n")
    for extra in ([], ["--trust-experiment"]):
        done = subprocess.run([str(ROOT / "bin" / "resume"), ".", "--max-epochs", "2", *extra],
                              cwd=exp, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "evil_model" in done.stderr
        assert not (exp / "MARKER").exists()
    for launcher in sorted((ROOT / "bin").iterdir()):
        if launcher.is_file() and "." not in launcher.name:
            text = launcher.read_text()
            assert " -P -m " in text or " -I -m " in text, launcher


# --- 2. names and paths ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "-x", "/abs", ".hidden"])
def test_bad_names_are_refused_and_nothing_is_deleted(one_epoch, tmp_path, capsys, name):
    top = tmp_path / "top"
    root = top / "exps"
    shutil.copytree(one_epoch, root / "keep")
    (root / "notes.txt").write_text("mine")
    (top / "x").mkdir()
    (top / "x" / "data.txt").write_text("mine too")
    before = snapshot(top)
    capsys.readouterr()
    assert train_main(["--experiments", str(root), f"--name={name}", "--force", *ARGS]) == 2
    assert "--name" in one_error_line(capsys, "tractrain-train")
    assert snapshot(top) == before


def test_force_removes_only_a_tractrain_experiment(one_epoch, tmp_path, capsys):
    root = tmp_path / "exps"
    (root / "foreign").mkdir(parents=True)
    (root / "foreign" / "config.json").write_text('{"model": "x"}')
    (root / "foreign" / "thesis.tex").write_text("years of work")
    shutil.copytree(one_epoch, tmp_path / "elsewhere")
    (root / "link").symlink_to(tmp_path / "elsewhere")
    before = snapshot(tmp_path)
    for name, fragment in (("foreign", "thesis.tex"), ("link", "symbolic link")):
        capsys.readouterr()
        assert train_main(["--experiments", str(root), f"--name={name}", "--force", *ARGS]) == 2
        assert fragment in one_error_line(capsys, "tractrain-train")
    assert snapshot(tmp_path) == before


# --- 5. transactional config -----------------------------------------------------------------
@pytest.mark.parametrize("extra", [
    ["--store", "/typo.zarr", "--max-epochs", "2"],
    ["--patience", "-1"],
    ["--num-workers", "-1"],
    ["--max-epochs", "1"],  # already trained 1 epoch: refused at start
    ["--max-epochs", "2", "--store", str(ROOT / "README.md")],
    ["--max-epochs", "2", "--model", "tractrain.errors:__doc__"],
])
def test_a_failed_resume_changes_no_byte(exp, capsys, extra):
    before = snapshot(exp)
    assert resume_main([str(exp), *extra]) == 2
    one_error_line(capsys, "tractrain-resume")
    assert snapshot(exp) == before


def test_a_resume_that_ran_keeps_the_new_limits(exp):
    assert resume_main([str(exp), "--max-epochs", "2"]) == 0
    assert json.loads(ExperimentDir(exp).config.read_text())["max_epochs"] == 2
    assert resume_main([str(exp)]) == 2  # finished: the next plain resume needs a new limit


# --- 7. symbolic links -----------------------------------------------------------------------
def test_symlinked_checkpoint_and_best_model_keep_working(exp, tmp_path):
    disk = tmp_path / "other-disk"
    disk.mkdir()
    layout = ExperimentDir(exp)
    for folder in (layout.checkpoint, layout.best_model):
        shutil.move(folder, disk / folder.name)
        folder.symlink_to(disk / folder.name, target_is_directory=True)
    assert resume_main([str(exp), "--max-epochs", "2"]) == 0
    assert resume_main([str(exp), "--max-epochs", "3"]) == 0
    for folder in (layout.checkpoint, layout.best_model):
        assert folder.is_symlink() and folder.resolve() == disk / folder.name
    assert json.loads((disk / "checkpoint" / "meta.json").read_text())["epoch"] == 3
    debris = [p.name for p in [*exp.iterdir(), *disk.iterdir()]
              if p.name.endswith((".new", ".old"))]
    assert not debris
