"""What a finished (or stopped) run leaves for the person who started it: the plot of its logs
and the summary `tractrain-train` / `tractrain-resume` print."""

from __future__ import annotations

import io
from pathlib import Path

from tractrain.atomic import atomic_write_bytes
from tractrain.experiment import ExperimentDir


def write_plot(exp_dir: Path) -> Path | None:
    """``<exp>/logs/plot.png`` of the run's logs (None if there are no logs yet)."""
    from tractrain.bin.plot_logs import plot_logs

    exp = ExperimentDir(exp_dir)
    if not exp.logs.is_dir() or not any(exp.logs.glob("*.npy")):  # no epoch ended yet
        return None
    figure = plot_logs([exp_dir])
    out = exp.plot
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    atomic_write_bytes(out, png.getvalue())  # a kill mid-write leaves no truncated PNG
    return out


def summary(trainer, exp_dir: Path, plot: Path | None) -> str:
    metrics, state = trainer.state.metrics, trainer.state
    stopped = getattr(state, "stopped_by_signal", None)
    first = (f"stopped by {stopped} in epoch {state.epoch}, iteration {state.iteration}"
             if stopped else f"done: {state.epoch} epochs")
    lines = [first + "".join(f", {k} {metrics[k]:.4f}" for k in ("train_loss", "valid_loss")
                             if k in metrics)]
    base = getattr(trainer.state, "baselines", None)
    if base and "valid_loss" in metrics:
        lines.append(f"valid, same {base['n']} steps: model {metrics['valid_loss']:.4f} | "
                     f"repeat previous direction {base['previous_direction']:.4f} | best "
                     f"constant direction {base['constant_direction']:.4f}")
    best = getattr(trainer.state, "best_epoch", None)
    if best:
        lines.append(f"best epoch {best['epoch']}: {best['metric']} {best['value']:.4f}")
    exp = ExperimentDir(exp_dir)
    lines += [f"checkpoint: {exp.checkpoint}", f"best model: {exp.best_model}",
              f"logs:       {exp.logs}"]
    for name, where in (getattr(state, "trackers", None) or {}).items():
        lines.append(f"{name + ':':<11} {where}")
    if plot is not None:
        lines.append(f"plot:       {plot}")
    lines.append(f"resume or extend with: tractrain-resume {exp_dir} --max-epochs N")
    return "\n".join(lines)
