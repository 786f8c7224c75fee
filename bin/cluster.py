"""Batch-cluster life-cycle of ``tractrain-train``: requeue after SIGUSR1, ``--resume auto``.

A SLURM job started with ``--signal=B:USR1@SECONDS`` gets SIGUSR1 that long before its time
limit; `tractrain.hooks.signals.GracefulStop` then checkpoints at the next iteration boundary
and stops. `after_stop` decides what comes next: with ``--requeue`` and ``SLURM_JOB_ID`` set it
runs ``scontrol requeue $SLURM_JOB_ID`` (SLURM's own command; nothing to reimplement), so the
job starts again and, with ``--resume auto``, continues from the checkpoint (`auto_config`).

Exit status after a signal stop: 0 when the job was requeued (nothing failed: the next start
continues), else 128 + the signal's number (130 SIGINT, 138 SIGUSR1, 143 SIGTERM): the run is
unfinished, so ``afterok`` dependencies do not fire on a half-trained model.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path

from tractrain.bin.options import RESUME_OVERRIDES, flag_of
from tractrain.errors import ConfigError

log = logging.getLogger("tractrain.cluster")

REQUEUED = 0
SCONTROL_TIMEOUT_S = 60
# options a continued run may change (run-time ones that change no result: the README lists
# them); any other recorded option given with another value is refused
AUTO_OVERRIDES = (*RESUME_OVERRIDES, "cache_dir", "experiments", "requeue", "keep_checkpoints")
# exit statuses of a run stopped by a signal (its checkpoint written): 130, 138, 143
STOP_STATUSES = tuple(128 + int(s) for s in (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM))


def signal_status(name: str) -> int:
    """128 + the number of signal ``name`` (``"SIGUSR1"`` -> 138), as a shell reports it."""
    return 128 + int(signal.Signals[name])


def after_stop(stopped: str, requeue: bool, exp_dir: Path) -> int:
    """After a stop by signal ``stopped`` (its checkpoint written): requeue the SLURM job if
    asked and possible; log what happened and how to continue; return the exit status."""
    job = os.environ.get("SLURM_JOB_ID", "").strip()
    if stopped == "SIGUSR1" and requeue and job:
        if requeue_job(job):
            log.warning("SLURM job %s requeued (scontrol requeue %s): its next start "
                        "continues from the checkpoint (with --resume auto)", job, job)
            return REQUEUED
    elif stopped == "SIGUSR1":
        why = "--requeue is off" if not requeue else "SLURM_JOB_ID is not set"
        log.warning("not requeued (%s): continue with 'tractrain-resume %s', or run the same "
                    "tractrain-train command with --resume auto", why, exp_dir)
    return signal_status(stopped)


def requeue_job(job: str) -> bool:
    """Run ``scontrol requeue JOB``; False (one WARNING line) if it fails."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        log.warning("job %s not requeued: scontrol not found on PATH; the checkpoint is "
                    "intact: submit the same job again (with --resume auto) to continue", job)
        return False
    try:
        done = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True,
                              timeout=SCONTROL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        reason = " ".join(str(err).split())
    else:
        if done.returncode == 0:
            return True
        reason = " ".join((done.stderr or done.stdout).split()) or f"exit {done.returncode}"
    log.warning("job %s not requeued: scontrol requeue failed (%s); the checkpoint is intact: "
                "submit the same job again (with --resume auto) to continue", job, reason[:200])
    return False


def auto_config(recorded: dict, wanted: dict, given: set[str], where: str) -> dict:
    """The config of a run that continues an experiment (``--resume auto``): the ``recorded``
    one, with this command's values (``wanted``) for `AUTO_OVERRIDES`, ``model`` and ``loss``
    (named on this command line, so trusted) and for options the experiment did not record.
    An option in ``given`` (set on the command line or in its config file) whose value differs
    from the recorded one is refused in one line naming it."""
    config = dict(recorded)
    for name, value in wanted.items():
        if name not in recorded or name in AUTO_OVERRIDES:
            config[name] = value
        elif recorded[name] != value and (name in given or name in ("model", "loss")):
            raise ConfigError(
                f"{flag_of(name)} {_shown(value)}: {where} was recorded with "
                f"{_shown(recorded[name])}; "
                f"--resume auto continues an experiment as it was (it may change only "
                f"{', '.join(map(flag_of, AUTO_OVERRIDES))}); "
                "give another --name to start a new one")
    return config


def _shown(value: object) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_started(exp) -> bool:
    """True if ``exp`` is an experiment that ``--resume auto`` continues (its config is
    there and its run got past the start; not a symbolic link)."""
    from tractrain.experiment import is_unstarted

    return not exp.root.is_symlink() and exp.config.is_file() and not is_unstarted(exp.root)


def prepare_continue(config: dict, given: set[str], exp) -> dict:
    """Rank 0 of ``--resume auto`` on a started experiment: ``{"config", "from_scratch",
    "before", "lock"}``: the recorded config with this command's allowed changes, under the
    experiment's writer lock (held until released), after the checks."""
    from tractrain.bin.options import absolute_paths
    from tractrain.bin.resume import checkpoint_stamp
    from tractrain.bin.train import writer_lock
    from tractrain.experiment import is_unstarted, read_config
    from tractrain.hooks.checkpoint import read_meta

    lock = writer_lock(exp)
    try:  # an older config.json may hold relative paths: this command runs where it was run
        recorded = auto_config(absolute_paths(read_config(exp.root)), config, given,
                               str(exp.config))
        from_scratch = is_unstarted(exp.root)
        if not from_scratch:
            read_meta(exp.root)  # a clear error now if there is no usable checkpoint
    except BaseException:
        lock.__exit__(None, None, None)
        raise
    print(f"experiment: {exp.root}  (exists: continuing it, --resume auto)", flush=True)
    return {"config": recorded, "from_scratch": from_scratch, "before": checkpoint_stamp(exp),
            "lock": lock}
