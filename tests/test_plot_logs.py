"""plot-logs (PNG, CSV, errors) and the shared CLI plumbing of tractrain.bin.common."""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tractrain.bin.common import ArgumentParser, run, suggest
from tractrain.bin.plot_logs import logs_table, main, plot_logs
from tractrain.errors import ConfigError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METRICS = ("train_loss", "valid_loss", "grad_norm", "unclipped_grad_norm", "lr")


def make_experiment(folder: Path, n_epochs: int, seed: int, best_epoch: int | None = None,
                    metrics=METRICS) -> dict[str, np.ndarray]:
    """Experiment folder with random per-epoch logs; returns what was written."""
    rng = np.random.default_rng(seed)
    (folder / "logs").mkdir(parents=True)
    logs = {name: rng.uniform(0.1, 2.0, n_epochs) for name in metrics}
    for name, values in logs.items():
        np.save(folder / "logs" / f"{name}.npy", values)
    if best_epoch is not None:
        best = {"epoch": best_epoch, "metric": "valid_loss",
                "value": float(logs["valid_loss"][best_epoch - 1]),
                "train_loss": float(logs["train_loss"][best_epoch - 1]),
                "valid_loss": float(logs["valid_loss"][best_epoch - 1])}
        (folder / "best_epoch.json").write_text(json.dumps(best))
    return logs


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tractrain.bin.plot_logs", *map(str, argv)],
                          capture_output=True, text=True)


def lines_by_gid(fig) -> dict:
    return {line.get_gid(): line for ax in fig.axes for line in ax.lines if line.get_gid()}


def test_cli_one_experiment_default_output(tmp_path):
    make_experiment(tmp_path / "run1", 5, seed=0, best_epoch=3)
    result = cli(tmp_path / "run1")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "run1" / "logs" / "plot.png"
    assert result.stdout.strip() == str(out)
    assert out.read_bytes().startswith(PNG_SIGNATURE)


def test_cli_two_experiments_png_and_csv(tmp_path):
    logs_a = make_experiment(tmp_path / "a", 5, seed=1, best_epoch=2)
    logs_b = make_experiment(tmp_path / "b", 3, seed=2, metrics=("train_loss", "lr"))
    out, table = tmp_path / "both.dat", tmp_path / "logs.csv"
    out.write_text("an existing file is overwritten")
    result = cli(tmp_path / "a", tmp_path / "b", "--out", out, "--csv", table, "--log-scale")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(out), str(table)]
    assert out.read_bytes().startswith(PNG_SIGNATURE)

    with open(table, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["experiment", "epoch", *METRICS]
    assert len(rows) == 1 + 5 + 3
    for row in rows[1:]:
        name, epoch = row[0], int(row[1])
        source = {"a": logs_a, "b": logs_b}[name]
        for metric, cell in zip(METRICS, row[2:], strict=True):
            if metric in source:
                assert float(cell) == source[metric][epoch - 1]  # exact round trip
            else:
                assert cell == ""
    assert [(r[0], int(r[1])) for r in rows[1:]] == [("a", e) for e in range(1, 6)] + [
        ("b", e) for e in range(1, 4)]


def test_figure_lines_equal_logged_values(tmp_path):
    logs_a = make_experiment(tmp_path / "a", 6, seed=3, best_epoch=4)
    logs_b = make_experiment(tmp_path / "b", 4, seed=4)
    fig = plot_logs([tmp_path / "a", tmp_path / "b"])
    lines = lines_by_gid(fig)
    for name, logs in (("a", logs_a), ("b", logs_b)):
        for metric, values in logs.items():
            x, y = lines[f"{name}/{metric}"].get_data()
            np.testing.assert_array_equal(x, np.arange(1, len(values) + 1))
            np.testing.assert_array_equal(y, values)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["loss", "gradient norm", "learning rate"]
    loss_ax = fig.axes[0]
    assert {line.get_gid() for line in loss_ax.lines} >= {"a/train_loss", "a/valid_loss",
                                                           "b/train_loss", "b/valid_loss"}
    best_line = lines["a/best_epoch"]
    assert best_line in loss_ax.lines
    assert list(best_line.get_xdata()) == [4, 4]
    assert list(lines["a/best"].get_ydata()) == [logs_a["valid_loss"][3]]
    assert "b/best_epoch" not in lines
    # one legend entry per experiment and metric: experiments can be told apart
    labels = loss_ax.get_legend_handles_labels()[1]
    assert "a: train_loss" in labels and "b: train_loss" in labels
    assert loss_ax.get_yscale() == "linear"
    assert all(ax.get_yscale() == "log" for ax in plot_logs([tmp_path / "a"],
                                                             log_scale=True).axes)


def test_chosen_metrics_are_grouped(tmp_path):
    logs = make_experiment(tmp_path / "x", 4, seed=5, metrics=METRICS + ("epoch_time",))
    fig = plot_logs([tmp_path / "x"], metrics=["epoch_time", "valid_loss", "train_loss"])
    assert [ax.get_title() for ax in fig.axes] == ["epoch_time", "loss"]
    assert {line.get_gid() for line in fig.axes[1].lines} == {"x/train_loss", "x/valid_loss"}
    np.testing.assert_array_equal(fig.axes[0].lines[0].get_ydata(), logs["epoch_time"])
    header, rows = logs_table([tmp_path / "x"], ["lr"])
    assert header == ["experiment", "epoch", "lr"]
    assert [row[2] for row in rows] == list(logs["lr"])


def run_main(capsys, *argv) -> tuple[int, str]:
    """Exit status and stderr of ``main(argv)`` in this process."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "no_logs", "unknown_metric", "out_dir_missing",
                                  "csv_dir_missing", "unknown_flag"])
def test_bad_input_one_line_exit_2(tmp_path, capsys, case):
    make_experiment(tmp_path / "ok", 3, seed=6)
    (tmp_path / "empty").mkdir()
    argv = {
        "missing": [tmp_path / "nope"],
        "no_logs": [tmp_path / "empty"],
        "unknown_metric": [tmp_path / "ok", "--logs", "valid_los"],
        "out_dir_missing": [tmp_path / "ok", "--out", tmp_path / "no" / "p.png"],
        "csv_dir_missing": [tmp_path / "ok", "--csv", tmp_path / "no" / "t.csv"],
        "unknown_flag": [tmp_path / "ok", "--log-scal"],
    }[case]
    status, err = run_main(capsys, *argv)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("tractrain-plot-logs: error: ")
    expected = {
        "missing": "nope: experiment folder not found", "no_logs": "no logs",
        "unknown_metric": "(did you mean valid_loss?)", "out_dir_missing": "--out",
        "csv_dir_missing": "--csv", "unknown_flag": "unknown flag --log-scal (did you mean "
                                                    "--log-scale?)",
    }[case]
    assert expected in err
    assert not (tmp_path / "ok" / "logs" / "plot.png").exists()


def test_bad_input_in_a_real_process(tmp_path):
    result = cli(tmp_path / "nope")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("tractrain-plot-logs: error: ") and "nope" in result.stderr
    result = cli(tmp_path / "nope", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr and "ConfigError" in \
        result.stderr


def test_parser_errors_and_suggestions(capsys):
    parser = ArgumentParser(prog="train")
    parser.add_argument("--max-epochs", type=int)
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--max-epoch", "3"])
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        "train: error: unknown flag --max-epoch (did you mean --max-epochs?)\n")
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-epochs", "three"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-epochs" in err and "three" in err
    with pytest.raises(SystemExit):
        parser.parse_args(["--zzz=1"])
    assert capsys.readouterr().err == "train: error: unknown flag --zzz\n"
    assert parser.parse_args(["--max-epochs", "4", "--debug"]) == argparse.Namespace(
        max_epochs=4, debug=True)
    assert suggest("lerning_rate", ["learning_rate", "batch_size"]) == \
        " (did you mean learning_rate?)"
    assert suggest("qqq", ["learning_rate"]) == ""


@pytest.mark.parametrize("error, status, text", [
    (ConfigError("config.json: 'lr' must be > 0"), 2, "cmd: error: config.json: 'lr' must be > 0"),
    (FileNotFoundError(2, "No such file or directory", "x.yaml"), 2,
     "cmd: error: x.yaml: no such file or directory"),
    (FileExistsError("out exists\nuse --force"), 2, "cmd: error: out exists use --force"),
    (KeyboardInterrupt(), 130, "cmd: interrupted"),
])
def test_run_turns_errors_into_one_line(capsys, error, status, text):
    def work(args):
        raise error

    assert run(work, argparse.Namespace(debug=False), prog="cmd") == status
    assert capsys.readouterr().err == text + "\n"
    with pytest.raises(type(error)):
        run(work, argparse.Namespace(debug=True), prog="cmd")


def test_run_returns_main_status_and_lets_bugs_through():
    assert run(lambda args: None, argparse.Namespace(debug=False)) == 0
    assert run(lambda args: 3, argparse.Namespace(debug=False)) == 3
    with pytest.raises(ZeroDivisionError):
        run(lambda args: 1 / 0, argparse.Namespace(debug=False))
