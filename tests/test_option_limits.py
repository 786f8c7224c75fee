"""Options and config files refused at parse time in one line (issue 15, item 6): numeric
ranges, booleans for numbers, unknown monitor metrics, YAML aliases, non-mappings, deep
nesting, and neighbourhoods too large to allocate."""

from __future__ import annotations

import time

import pytest

from tractrain.bin.options import convert, read_config_file
from tractrain.bin.resume import main as resume_main
from tractrain.bin.train import main as train_main
from tractrain.errors import ConfigError

FAST = ["--device", "cpu", "--progress", "false"]


@pytest.mark.parametrize("name, value", [
    ("checkpoint_every", "0"), ("checkpoint_every", "-1"), ("cache_gb", "-1"),
    ("max_epochs", "0"), ("patience", "-1"), ("num_workers", "-1"), ("batch_size", "0"),
    ("batch_size", "nan"), ("split_ratio", "1.5"), ("max_epochs", True), ("cache_gb", False),
])
def test_numeric_options_are_range_checked(name, value):
    with pytest.raises(ConfigError, match=name):
        convert(name, value, "--" + name.replace("_", "-"))


def one_line(capsys, status: int) -> str:
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv, fragment", [
    (["--checkpoint-every", "0"], "checkpoint_every"),
    (["--monitor", "accuracy"], "accuracy"),
    (["--neighborhood", "grid", "--radius-mm", "60", "--resolution-mm", "0.5"],
     "--neighborhood grid --radius-mm 60"),
])
def test_bad_flags_refused_before_any_folder_is_made(tmp_path, capsys, argv, fragment):
    status = train_main(["--experiments", str(tmp_path / "exps"), *FAST, *argv])
    assert fragment in one_line(capsys, status)
    assert not (tmp_path / "exps").exists()


BOMB = ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n"
        "c: &c [*b, *b, *b, *b, *b, *b, *b, *b]\nmodel_config: {d: [*c, *c, *c, *c, *c]}\n")


@pytest.mark.parametrize("name, text, fragment", [
    ("bool.yaml", "max_epochs: yes\n", "max_epochs"),
    ("list.yaml", "- 1\n- 2\n", "mapping"),
    ("list.json", "[1, 2]", "mapping"),
    ("deep.json", "[" * 100_000 + "]" * 100_000, "deep"),
    ("deep.yaml", "a: " + "[" * 30 + "]" * 30 + "\n", "deep"),
    ("bomb.yaml", BOMB, "alias"),
])
def test_bad_config_files_are_one_line(tmp_path, capsys, name, text, fragment):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        read_config_file(path)
    start = time.monotonic()
    status = train_main([str(path), "--experiments", str(tmp_path / "exps"), *FAST])
    assert fragment in one_line(capsys, status)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("text", ["[1, 2]", "[" * 100_000 + "]" * 100_000, '"x"'])
def test_an_experiment_config_that_is_not_a_mapping_is_one_line(tmp_path, capsys, text):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "config.json").write_text(text)
    status = resume_main([str(exp)])
    assert "config.json" in one_line(capsys, status)
    assert sorted(p.name for p in exp.iterdir()) == ["config.json"]
    assert (exp / "config.json").read_text() == text
