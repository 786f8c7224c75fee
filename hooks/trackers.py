"""`Trackers`: TensorBoard, MLflow and W&B through ignite's own loggers (`TensorboardLogger`,
`MLflowLogger`, `WandBLogger` and their ``OutputHandler``).

Every tracker gets the epoch metrics at each EPOCH_COMPLETED and the iteration ``loss``,
``grad_norm`` and ``lr`` every ``every`` iterations, all at global step = the trainer's
iteration (``epoch/<metric>``, ``iteration/<name>``; MLflow spells them ``epoch <metric>``).
Default places, under the experiment folder: TensorBoard event files in ``<exp>/tensorboard/``,
an MLflow file store in ``<exp>/mlruns/`` (``MLFLOW_TRACKING_URI``, if set, wins), W&B runs in
``<exp>/wandb/`` (offline unless ``WANDB_MODE`` is set). The MLflow and W&B run ids are this
hook's state, so a resumed run logs into the same run; TensorBoard's writer purges the steps
after the checkpoint's iteration (``purge_step``). After a crash (not a clean stop), MLflow and
W&B keep what was logged between the checkpoint and the crash, and get those steps again from
the resumed run (neither API can delete them); ``iterations.csv`` is cut back like TensorBoard.
``csv`` is the always-on ``<exp>/logs/`` (see `IterationLog`, `NpyLogs`) and ``comet`` is
`CometLogger`: both are accepted names here but attached elsewhere.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import ignite.distributed as idist
from ignite.engine import Engine, Events

from tractrain.errors import ConfigError
from tractrain.experiment import ExperimentDir
from tractrain.util import iteration_values, reraise_if_last, to_float

LOGGER = logging.getLogger(__name__)

TRACKERS = ("csv", "tensorboard", "mlflow", "wandb", "comet")
HANDLED = ("tensorboard", "mlflow", "wandb")  # the ones this hook attaches
# tracker: (module that must be importable, the extra that installs it)
EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"),
          "wandb": ("wandb", "wandb")}


def check_available(names: Iterable[str]) -> None:
    """One-line `ConfigError` naming the pip command for the first tracker whose package is
    missing (checked before training starts)."""
    for name in names:
        if name in EXTRAS:
            module, extra = EXTRAS[name]
            if importlib.util.find_spec(module) is None:
                raise ConfigError(f"--trackers {name}: the {module} package is not installed; "
                                  f"pip install 'tractrain[{extra}]'")


def flat_params(params: Mapping | None, prefix: str = "") -> dict[str, Any]:
    """``params`` flattened to ``{"a.b": value}`` with plain values (others as strings)."""
    out: dict[str, Any] = {}
    for key, value in (params or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_params(value, name + "."))
        elif value is None or isinstance(value, bool | int | float | str):
            out[name] = value
        else:
            out[name] = str(value)
    return out


class Trackers:
    """Attach the trackers ``names`` (any of `HANDLED`; others are ignored) to a trainer.

    Args:
        exp_dir: experiment folder (the trackers write under it).
        names: trackers to use.
        every: log the iteration values every this many iterations (None: epochs only).
        optimizer: where ``lr`` is read.
        experiment_name: MLflow experiment / W&B project run name (default: the folder's name).
        params: hyper-parameters, logged once when a run is created.

    Loggers are created at STARTED (after a checkpoint restored the run ids) and closed at
    COMPLETED, TERMINATE or EXCEPTION_RAISED. Only rank 0 logs.
    """

    def __init__(self, exp_dir: str | os.PathLike, names: Iterable[str], every: int | None = None,
                 optimizer=None, experiment_name: str | None = None,
                 params: Mapping | None = None) -> None:
        self.exp_dir = ExperimentDir(exp_dir)
        names = list(dict.fromkeys(names))
        unknown = [n for n in names if n not in TRACKERS]
        if unknown:
            raise ConfigError(f"Trackers: unknown tracker {unknown[0]!r}; expected any of "
                              f"{', '.join(TRACKERS)}")
        self.names = [n for n in names if n in HANDLED]
        self.csv = "csv" in names
        self.every = every
        self.optimizer = optimizer
        self.experiment_name = experiment_name or self.exp_dir.root.resolve().name
        self.params = flat_params(params)
        self.run_ids: dict[str, str] = {}
        self.loggers: dict[str, Any] = {}
        self.destinations: dict[str, str] = {}
        self._handlers: dict[str, tuple] = {}
        self._values: dict[str, float] = {}  # what the output handlers read
        self._epoch_values: dict[str, float] = {}
        self._exception_handler = self._on_exception

    def attach(self, trainer: Engine) -> Trackers:
        if idist.get_rank() != 0 or not (self.names or self.csv):
            return self
        trainer.add_event_handler(Events.STARTED, self.open)
        if self.every:
            trainer.add_event_handler(Events.ITERATION_COMPLETED(every=self.every),
                                      self._on_iteration)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._on_epoch)
        trainer.add_event_handler(Events.COMPLETED, self.close)
        trainer.add_event_handler(Events.TERMINATE, self.close)
        trainer.add_event_handler(Events.EXCEPTION_RAISED, self._exception_handler)
        return self

    def open(self, trainer: Engine) -> None:
        """Create (or reopen) every tracker's logger and its two ignite output handlers."""
        if self.loggers:
            return
        iteration = int(trainer.state.iteration)
        for name in self.names:
            logger, module = getattr(self, f"_open_{name}")(iteration)
            self.loggers[name] = logger
            step = _iteration_step
            self._handlers[name] = (
                module.OutputHandler(tag="iteration", output_transform=lambda _: self._values,
                                     global_step_transform=step),
                module.OutputHandler(tag="epoch", output_transform=lambda _: self._epoch_values,
                                     global_step_transform=step),
            )
        lines = [f"{n} -> {self.destinations[n]}" for n in self.names]
        if self.csv:
            lines.insert(0, f"csv -> {self.exp_dir.logs} (logs.csv, iterations.csv)")
        LOGGER.info("trackers: %s", "; ".join(lines))
        trackers = dict(getattr(trainer.state, "trackers", None) or {})
        trackers.update(self.destinations)
        trainer.state.trackers = trackers  # read by the run summary

    def _open_tensorboard(self, iteration: int):
        from ignite.handlers import tensorboard_logger

        folder = self.exp_dir.tensorboard
        # purge_step: a reader drops what an earlier process logged after the checkpoint
        logger = tensorboard_logger.TensorboardLogger(
            log_dir=str(folder), purge_step=iteration + 1 if iteration else None)
        self.destinations["tensorboard"] = str(folder)
        return logger, tensorboard_logger

    def _open_mlflow(self, iteration: int):
        import mlflow
        from ignite.handlers import mlflow_logger

        folder = self.exp_dir.mlruns
        user_uri = os.environ.get("MLFLOW_TRACKING_URI")  # the user's server, if they set one
        uri = user_uri or folder.resolve().as_uri()
        if not user_uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # recent mlflow asks
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the file store's deprecation
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment(self.experiment_name)
            run_id = self.run_ids.get("mlflow")
            run = mlflow.start_run(run_id=run_id, run_name=None if run_id else
                                   self.experiment_name)
        logger = mlflow_logger.MLflowLogger()
        if run_id is None and self.params:
            logger.log_params({k: str(v)[:6000] for k, v in self.params.items()})
        self.run_ids["mlflow"] = run.info.run_id
        where = user_uri or f"file store {folder}"
        self.destinations["mlflow"] = f"{where} (run {run.info.run_id})"
        return logger, mlflow_logger

    def _open_wandb(self, iteration: int):
        import wandb
        from ignite.handlers import wandb_logger

        run_id = self.run_ids.get("wandb")  # None: wandb draws a new one
        mode = None if os.environ.get("WANDB_MODE") else "offline"
        settings = wandb.Settings(console="off", save_code=False, disable_git=True,
                                  x_disable_stats=True, x_disable_meta=True, silent=True)
        logger = wandb_logger.WandBLogger(
            project=os.environ.get("WANDB_PROJECT", "tractrain"), name=self.experiment_name,
            id=run_id, resume="allow", dir=str(self.exp_dir.root), mode=mode,
            config=self.params or None, settings=settings)
        run_id = self.run_ids["wandb"] = wandb.run.id
        where = mode or os.environ["WANDB_MODE"]
        self.destinations["wandb"] = f"{where} {self.exp_dir.wandb} (run {run_id})"
        return logger, wandb_logger

    def _on_iteration(self, trainer: Engine) -> None:
        self._values = iteration_values(trainer, self.optimizer)
        for name, logger in self.loggers.items():
            self._handlers[name][0](trainer, logger, Events.ITERATION_COMPLETED)

    def _on_epoch(self, trainer: Engine) -> None:
        values = {"epoch": float(trainer.state.epoch)}
        for key, value in trainer.state.metrics.items():
            number = to_float(value)
            if number is not None and isinstance(key, str):
                values[key] = number
        self._epoch_values = values
        for name, logger in self.loggers.items():
            self._handlers[name][1](trainer, logger, Events.EPOCH_COMPLETED)

    def close(self, trainer: Engine | None = None) -> None:
        """Flush and close every logger (safe to call twice)."""
        loggers, self.loggers = self.loggers, {}
        for logger in loggers.values():
            logger.close()

    def _on_exception(self, trainer: Engine, error: BaseException) -> None:
        self.close()
        reraise_if_last(trainer, self._exception_handler, error)

    def state_dict(self) -> dict:
        """``{"run_ids": {"mlflow": ..., "wandb": ...}}``: what continues the same runs."""
        return {"run_ids": dict(self.run_ids)}

    def load_state_dict(self, state: Mapping) -> None:
        run_ids = state.get("run_ids") if isinstance(state, Mapping) else None
        if not isinstance(run_ids, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in run_ids.items()):
            raise ConfigError("Trackers state: expected {'run_ids': {tracker: run id}}")
        self.run_ids = dict(run_ids)


def _iteration_step(engine: Engine, event_name) -> int:
    return int(engine.state.iteration)
