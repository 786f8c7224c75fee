"""``tractrain-plot-logs EXPERIMENT [EXPERIMENT ...]``: plot the per-epoch logs of experiments
in one PNG (``--per-iteration``: the iteration loss, grad norm and lr of
``<exp>/logs/iterations.csv``).

Reads ``<exp>/logs/<metric>.npy`` (one value per epoch, epochs 1..n) and ``<exp>/best_epoch.json``.
Default panels: loss (train_loss, valid_loss), gradient norm (grad_norm, unclipped_grad_norm),
learning rate (lr). Several experiments are overlaid, one colour each; the best epoch is marked.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tractrain.atomic import atomic_write_bytes
from tractrain.bin.common import ArgumentParser, run, suggest
from tractrain.bin.flags import path_arg
from tractrain.errors import ConfigError
from tractrain.experiment import ExperimentDir, read_best_epoch, read_iterations, read_logs

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULT_METRICS = ("train_loss", "valid_loss", "grad_norm", "unclipped_grad_norm", "lr")
PANEL_TITLES = {"loss": "loss", "grad_norm": "gradient norm", "lr": "learning rate"}
# Metrics that differ only by one of these prefixes share a panel (train_loss + valid_loss).
GROUP_PREFIXES = ("train_", "valid_", "validation_", "test_", "unclipped_")
LINESTYLES = ("-", "--", ":", "-.")


def panel_key(metric: str) -> str:
    """Panel a metric goes to: its name without a train_/valid_/unclipped_ prefix."""
    for prefix in GROUP_PREFIXES:
        if metric.startswith(prefix) and len(metric) > len(prefix):
            return metric[len(prefix):]
    return metric


def _labels(experiments: Sequence[str | os.PathLike]) -> list[str]:
    """Experiment folder names; the given paths where two folders share a name."""
    names = [Path(e).resolve().name for e in experiments]
    if len(set(names)) < len(names):
        return [str(e) for e in experiments]
    return names


def _load(experiments: Sequence[str | os.PathLike]) -> list[tuple[str, dict, dict | None]]:
    if not experiments:
        raise ConfigError("no experiment folder given")
    labels = _labels(experiments)
    pairs = zip(labels, experiments, strict=True)
    return [(label, read_logs(e), read_best_epoch(e)) for label, e in pairs]


def _choose_metrics(loaded, metrics: Sequence[str] | None, default: Sequence[str]) -> list[str]:
    available = sorted({name for _, logs, _ in loaded for name in logs})
    if metrics is None:
        chosen = [m for m in default if m in available]
        if not chosen:
            raise ConfigError(f"none of the default metrics ({', '.join(default)}) is logged; "
                              f"choose with --logs among: {', '.join(available)}")
        return chosen
    chosen = []
    for name in metrics:
        if name not in available:
            raise ConfigError(f"unknown metric {name!r}{suggest(name, available)}; logged "
                              f"metrics: {', '.join(available)}")
        if name not in chosen:
            chosen.append(name)
    return chosen


def logs_table(
    experiments: Sequence[str | os.PathLike], metrics: Sequence[str] | None = None
) -> tuple[list[str], list[list]]:
    """``(header, rows)``: header ``["experiment", "epoch", *metrics]``, one row per experiment
    and epoch; NaN where an experiment has no value. Default metrics: every logged one
    (the default plot metrics first)."""
    loaded = _load(experiments)
    if metrics is None:
        available = sorted({name for _, logs, _ in loaded for name in logs})
        metrics = [m for m in DEFAULT_METRICS if m in available]
        metrics += [m for m in available if m not in metrics]
    else:
        metrics = _choose_metrics(loaded, metrics, DEFAULT_METRICS)
    rows = []
    for label, logs, _ in loaded:
        n_epochs = max(len(logs[m]) for m in logs)
        for epoch in range(1, n_epochs + 1):
            values = [
                float(logs[m][epoch - 1]) if m in logs and epoch <= len(logs[m]) else math.nan
                for m in metrics
            ]
            rows.append([label, epoch, *values])
    return ["experiment", "epoch", *metrics], rows


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def table_csv(header: list[str], rows: list[list]) -> str:
    """CSV text of a `logs_table`; missing values are empty cells, floats round-trip."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_cell(v) for v in row])
    return text.getvalue()


def _mark_best(axes: dict, panels: dict, label: str, best: dict, colour: str) -> None:
    """Vertical line at the best epoch on the panel of its metric (else the loss panel), with
    a marker at its value when that metric is plotted."""
    metric, epoch, value = best.get("metric"), best["epoch"], best.get("value")
    key = panel_key(metric) if isinstance(metric, str) else "loss"
    if key not in axes:
        key = "loss"
    if key not in axes:
        return
    finite = isinstance(value, int | float) and math.isfinite(value)
    text = f"{label}: best epoch {epoch}" + (f" ({metric} {value:.4g})" if finite else "")
    axes[key].axvline(epoch, color=colour, linestyle=":", linewidth=1, label=text,
                      gid=f"{label}/best_epoch")
    if finite and metric in panels[key]:
        axes[key].plot([epoch], [value], "*", color=colour, markersize=10, gid=f"{label}/best")


def plot_logs(
    experiments: Sequence[str | os.PathLike],
    metrics: Sequence[str] | None = None,
    log_scale: bool = False,
) -> Figure:
    """One figure with a panel per metric group, every experiment overlaid.

    Lines are labelled ``"<experiment>: <metric>"`` (gid ``"<experiment>/<metric>"``), x is the
    epoch (1..n). The best epoch of ``best_epoch.json`` is a vertical line (gid
    ``"<experiment>/best_epoch"``) on the panel of its metric (else the loss panel), with a
    marker at its value.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    loaded = _load(experiments)
    chosen = _choose_metrics(loaded, metrics, DEFAULT_METRICS)
    panels: dict[str, list[str]] = {}
    for name in chosen:
        panels.setdefault(panel_key(name), []).append(name)

    fig = Figure(figsize=(8, 2.8 * len(panels)), layout="constrained")
    axes = dict(zip(panels, fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0],
                    strict=True))
    for i, (label, logs, best) in enumerate(loaded):
        colour = f"C{i % 10}"
        for key, names in panels.items():
            for j, name in enumerate(names):
                if name in logs:
                    values = logs[name]
                    axes[key].plot(
                        np.arange(1, len(values) + 1), values, LINESTYLES[j % len(LINESTYLES)],
                        color=colour, marker="." if len(values) < 2 else None,
                        label=f"{label}: {name}", gid=f"{label}/{name}",
                    )
        if best is not None:
            _mark_best(axes, panels, label, best, colour)
    for key, ax in axes.items():
        ax.set_title(PANEL_TITLES.get(key, key))
        ax.grid(True, alpha=0.3)
        if log_scale:
            ax.set_yscale("log")
        if ax.lines:
            ax.legend(fontsize="small")
    axes = list(axes.values())
    axes[-1].set_xlabel("epoch")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


ITERATION_PANELS = {"loss": "iteration loss", "grad_norm": "gradient norm",
                    "lr": "learning rate"}


def plot_iterations(experiments: Sequence[str | os.PathLike], log_scale: bool = False) -> Figure:
    """One panel each for the iteration loss, grad norm and lr of ``<exp>/logs/iterations.csv``
    against the iteration, every experiment overlaid (gid ``"<experiment>/<column>"``)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not experiments:
        raise ConfigError("no experiment folder given")
    loaded = [(label, read_iterations(e))
              for label, e in zip(_labels(experiments), experiments, strict=True)]
    fig = Figure(figsize=(8, 2.8 * len(ITERATION_PANELS)), layout="constrained")
    axes = fig.subplots(len(ITERATION_PANELS), 1, sharex=True, squeeze=False)[:, 0]
    for i, (label, table) in enumerate(loaded):
        for ax, name in zip(axes, ITERATION_PANELS, strict=True):
            ax.plot(table["iteration"], table[name], color=f"C{i % 10}",
                    marker="." if len(table[name]) < 2 else None, label=label,
                    gid=f"{label}/{name}")
    for ax, title in zip(axes, ITERATION_PANELS.values(), strict=True):
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if log_scale:
            ax.set_yscale("log")
        if len(loaded) > 1:
            ax.legend(fontsize="small")
    axes[-1].set_xlabel("iteration")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def _check_output(path: Path, flag: str) -> None:
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: is a folder, expected a file path")
    if not path.parent.is_dir():
        raise ConfigError(f"{flag} {path}: folder {path.parent} does not exist")


def make_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="tractrain-plot-logs",
        description="Plot the per-epoch logs (<exp>/logs/<metric>.npy) of one or several "
        "experiments in one PNG.",
    )
    parser.add_argument("experiments", nargs="+", metavar="EXPERIMENT", type=path_arg,
                        help="experiment folder(s)")
    parser.add_argument("--logs", nargs="+", metavar="NAME",
                        help="metrics to plot, after the experiments (default: losses, gradient "
                        "norms, learning rate)")
    parser.add_argument("--out", type=path_arg,
                        help="PNG to write (default: <first experiment>/logs/plot.png)")
    parser.add_argument("--csv", metavar="FILE", type=path_arg,
                        help="also write the logs table as CSV")
    parser.add_argument("--log-scale", action="store_true", help="logarithmic y axes")
    parser.add_argument("--per-iteration", action="store_true",
                        help="plot the iteration loss, grad norm and lr of "
                        "<exp>/logs/iterations.csv instead (default --out: "
                        "<first experiment>/logs/iterations.png)")
    return parser


def plot_command(args: argparse.Namespace) -> int:
    """Write the PNG (and CSV); print the path(s) written."""
    exp = ExperimentDir(args.experiments[0])
    out = Path(args.out) if args.out else exp.iterations_plot if args.per_iteration else exp.plot
    if args.out:
        _check_output(out, "--out")
    if args.csv:
        _check_output(Path(args.csv), "--csv")
    if args.per_iteration and (args.logs or args.csv):
        raise ConfigError("--per-iteration draws loss, grad_norm and lr: it takes neither "
                          "--logs nor --csv (the table is <exp>/logs/iterations.csv)")
    if args.per_iteration:
        fig = plot_iterations(args.experiments, log_scale=args.log_scale)
    else:
        fig = plot_logs(args.experiments, args.logs, log_scale=args.log_scale)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    atomic_write_bytes(out, png.getvalue())
    print(out)
    if args.csv:
        header, rows = logs_table(args.experiments, args.logs)
        atomic_write_bytes(args.csv, table_csv(header, rows).encode())
        print(args.csv)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    return run(plot_command, args, prog=parser.prog)


if __name__ == "__main__":
    sys.exit(main())
