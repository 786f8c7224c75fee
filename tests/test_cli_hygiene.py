"""Command-line hygiene (issue 12, item 5): choices checked up front with a suggestion,
``--monitor`` checked against the run's metrics, ``--x/--no-x`` booleans, ``--version``,
installed names in ``usage:``, one default per option in ``--help``."""

from __future__ import annotations

import configparser
import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tractrain import __version__
from tractrain.bin.options import CHOICES, OPTIONS, choice_of, convert, read_config_file, resolve
from tractrain.bin.train import main as train_main
from tractrain.bin.train import make_parser as train_parser
from tractrain.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def installed_commands() -> dict[str, str]:
    """``{"tractrain-train": "tractrain.bin.train", ...}`` from setup.cfg's console scripts."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    pairs = (line.split("=") for line in lines)
    return {name.strip(): target.strip().split(":")[0] for name, target in pairs}


COMMANDS = installed_commands()


def one_line_error(capsys, status) -> str:
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def test_a_wrong_choice_names_the_flag_the_choices_and_the_closest():
    with pytest.raises(ConfigError) as err:
        convert("optimizer", "adamw2", "--optimizer")
    assert str(err.value) == ("--optimizer: 'adamw2' is not one of adam, adamw, sgd, radam; "
                              "did you mean 'adamw'?")
    with pytest.raises(ConfigError, match="is not one of zeros, clamp$"):
        convert("outside", "wrap", "--outside")  # nothing close: no suggestion


def test_choices_match_what_the_library_accepts():
    """The table's values are exactly those the components accept (no drift)."""
    from tractrain.data.dataloader import INTERPOLATE
    from tractrain.data.interpolation import NEIGHBORHOODS, OUTSIDE
    from tractrain.data.packing import UNITS
    from tractrain.engine.optim import OPTIMIZERS
    from tractrain.engine.trainer import NAN_POLICIES
    from tractrain.hooks.monitor import MODES

    library = {"batch_units": UNITS, "outside": OUTSIDE, "interpolate": INTERPOLATE,
               "optimizer": OPTIMIZERS, "nan_policy": NAN_POLICIES, "monitor_mode": MODES,
               "neighborhood": tuple(n for n in NEIGHBORHOODS if n is not None)}
    for name, values in library.items():
        assert CHOICES[name].values == tuple(values), name
        assert choice_of(name) is CHOICES[name], name
        for value in values:
            assert convert(name, value, "x.yaml") == value
        with pytest.raises(ConfigError, match=f"x.yaml: {name}: 'bogus' is not one of"):
            convert(name, "bogus", "x.yaml")
    assert convert("neighborhood", "none", "--neighborhood") is None  # its default


def test_comma_list_choices():
    trackers = CHOICES["trackers"]
    assert trackers.check("csv, tensorboard,csv") == "csv,tensorboard"
    assert trackers.check(["mlflow", "wandb"]) == "mlflow,wandb"  # a YAML list
    assert trackers.check("none") == ""
    with pytest.raises(ValueError, match="'tensorbord' is not one of .*did you mean "
                                         "'tensorboard'"):
        trackers.check("csv,tensorbord")
    assert CHOICES["precision"].check("bf16-mixed") == "bf16-mixed"
    assert CHOICES["precision"].check(32) == "32"  # YAML's "precision: 32"
    assert CHOICES["comet"].check(False) == "off"  # YAML's unquoted "comet: off"
    with pytest.raises(ValueError, match="did you mean 'bf16-mixed'"):
        CHOICES["precision"].check("bf16_mixed")


def test_config_file_choices_name_the_file_and_key(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("optimisation and hooks:\n  nan_policy: skipp\n")
    with pytest.raises(ConfigError) as err:
        read_config_file(path)
    assert str(err.value).startswith(f"{path}: nan_policy: 'skipp' is not one of stop, skip")
    assert "did you mean 'skip'?" in str(err.value)
    status = train_main([str(path), "--experiments", str(tmp_path / "exps")])
    assert f"{path}: nan_policy: 'skipp'" in one_line_error(capsys, status)
    assert not (tmp_path / "exps").exists()


def test_monitor_is_checked_against_the_metrics_of_the_configured_hooks(tmp_path):
    with pytest.raises(ConfigError, match="--monitor: 'valid_los' .*did you mean 'valid_loss'"):
        resolve({}, {"monitor": "valid_los"})
    with pytest.raises(ConfigError, match="'gen_within' is logged only with --gen-every"):
        resolve({}, {"monitor": "gen_within"})
    assert resolve({}, {"monitor": "gen_within", "gen_every": "2"})["monitor"] == "gen_within"
    path = tmp_path / "run.yaml"
    path.write_text("monitor: trian_loss\n")
    with pytest.raises(ConfigError, match=f"{path}: monitor: 'trian_loss'.*'train_loss'"):
        resolve(read_config_file(path), {}, source=str(path))
    from tractrain.bin.options import check_monitor

    with pytest.raises(ConfigError, match="needs a validation split"):  # once the store is open
        check_monitor({"monitor": "valid_loss"}, has_valid=False)
    check_monitor({"monitor": "train_loss"}, has_valid=False)


@pytest.mark.parametrize("argv, expected", [
    (["--amp"], True), (["--no-amp"], False), (["--amp", "true"], True),
    (["--amp", "false"], False), (["--amp=off"], False), (["--amp", "yes"], True), ([], False),
])
def test_booleans_take_no_x_and_values(argv, expected):
    args = train_parser().parse_args(argv)
    assert resolve({}, vars(args))["amp"] is expected


def test_every_boolean_option_has_its_no_form(tmp_path, capsys):
    parser = train_parser()
    for name, (_, kind, _) in OPTIONS.items():
        if kind is bool:
            flag = name.replace("_", "-")
            assert resolve({}, vars(parser.parse_args([f"--no-{flag}"])))[name] is False
            assert resolve({}, vars(parser.parse_args([f"--{flag}"])))[name] is True
    from tractrain.bin.resume import make_parser as resume_parser

    assert resume_parser().parse_args(["exp", "--no-progress"]).progress is False
    config = tmp_path / "run.yaml"
    args = parser.parse_args(["--no-lazy", str(config)])  # --no-x never takes the next one
    assert args.lazy is False and args.config == str(config)
    config.write_text("lazy: no\namp: 'on'\n")  # config-file booleans, YAML's and strings
    assert read_config_file(config) == {"lazy": False, "amp": True}
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--amp", "maybe"])
    assert exit_.value.code == 2
    assert "--amp: expected true or false, got 'maybe'" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_version_usage_and_help_of_every_command(command, capsys):
    module = importlib.import_module(COMMANDS[command])
    parser = module.make_parser()
    assert parser.prog == command
    assert parser.format_usage().startswith(f"usage: {command} ")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"{command} {__version__}\n"
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help:
            text = formatter._expand_help(action).lower()
            assert text.count("default") <= 1, (command, action.option_strings, text)


def test_choice_flags_of_the_other_commands_suggest(capsys):
    from tractrain.bin.eval import main as eval_main

    with pytest.raises(SystemExit) as exit_:
        eval_main(["exp", "--split", "tst"])
    assert exit_.value.code == 2
    assert one_line_error(capsys, 2).endswith(
        "tractrain-eval: error: --split: 'tst' is not one of test, valid, train; "
        "did you mean 'test'?")


def test_parse_time_errors_exit_2_fast_without_the_store_or_torch(tmp_path):
    """In a fresh process: exit 2 in under 2 s, the choice (not the missing store) reported,
    torch and zarr never imported, nothing written."""
    missing = tmp_path / "missing.zarr"
    code = ("import atexit, sys; atexit.register(lambda: print(sorted({'torch', 'zarr'} & "
            "set(sys.modules)))); from tractrain.bin.train import main; "
            "sys.exit(main(sys.argv[1:]))")
    for argv in (["--optimizer", "adamw2"], ["--monitor", "valid_los"],
                 ["--amp", "maybe"], ["--trackers" if "trackers" in OPTIONS else "--outside",
                                      "csvv"]):
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-c", code, "--store", str(missing),
                               "--experiments", str(tmp_path / "exps"), *argv],
                              capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - start
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"tractrain-train: error: {argv[0]}: "), done.stderr
        assert "missing.zarr" not in done.stderr and done.stdout.strip() == "[]", done.stdout
        assert elapsed < 2, f"{argv}: {elapsed:.2f} s"
    assert not (tmp_path / "exps").exists() and not missing.exists()


@pytest.mark.parametrize("how", ["python -m", "bin launcher"])
def test_usage_uses_the_installed_name_however_started(how):
    start = ([sys.executable, "-m", "tractrain.bin.plot_logs"] if how == "python -m"
             else [str(ROOT / "bin" / "plot-logs")])
    done = subprocess.run([*start, "--help"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "100"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: tractrain-plot-logs ")


EMPTY_PATHS = [  # (command, argv): an empty path where a file or folder is expected
    ("tractrain-make-phantom", ["", "--force"]),
    ("tractrain-build-store", ["", "out.zarr"]),
    ("tractrain-build-store", ["config.json", "", "--force"]),
    ("tractrain-import-hdf5", ["in.hdf5", "", "--force"]),
    ("tractrain-store-info", [" "]),
    ("tractrain-train", ["--experiments", "", "--name", "x"]),
    ("tractrain-train", ["--store", ""]),
    ("tractrain-resume", [""]),
    ("tractrain-eval", [""]),
    ("tractrain-track", ["exp", "--subject", "s", "--out", ""]),
    ("tractrain-plot-logs", ["exp", ""]),
]


@pytest.mark.parametrize("command, argv", EMPTY_PATHS, ids=[" ".join(map(repr, [c, *a]))
                                                            for c, a in EMPTY_PATHS])
def test_an_empty_path_is_refused_not_read_as_the_current_folder(command, argv, tmp_path,
                                                                 monkeypatch, capsys):
    """``--experiments "$EXP"`` with ``$EXP`` unset: one line naming the argument, exit 2,
    nothing written in (or replaced by ``--force`` of) the current folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("keep")
    main = importlib.import_module(COMMANDS[command]).main
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    err = one_line_error(capsys, status)
    assert "expected a path, got an empty string (an unset shell variable?)" in err
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_an_empty_path_in_a_config_file_names_the_file_and_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("experiments: ''\n")
    with pytest.raises(ConfigError) as err:
        read_config_file(path)
    assert str(err.value) == (f"{path}: experiments: expected a path, got an empty string "
                              "(an unset shell variable?)")
