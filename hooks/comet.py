"""`CometLogger`: epoch metrics, parameters, the best epoch and (every ``log_every``
iterations) the iteration loss, grad norm and lr to a Comet experiment.

Online when asked to, or by default when a Comet API key is configured (``COMET_API_KEY`` or
comet's config file), otherwise offline: the archive is written under ``<exp>/comet/`` (upload
it later with ``comet upload``). An online experiment that the server does not accept (no
network on a compute node, server down) falls back to an offline archive, with a WARNING.
Importing this module imports neither ``comet_ml`` nor ignite: comet_ml is imported when the
experiment starts, with auto-logging and error tracking off unless the environment says
otherwise. Nothing is sent while offline and the API key is never stored by this hook.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tractrain.errors import ConfigError
from tractrain.experiment import ExperimentDir
from tractrain.util import iteration_values, reraise_if_last

if TYPE_CHECKING:
    from ignite.engine import Engine

LOGGER = logging.getLogger(__name__)

# Everything comet_ml could collect on its own is off: only what the hook logs is recorded.
QUIET_SETTINGS = dict(
    log_code=False,
    log_graph=False,
    parse_args=False,
    auto_param_logging=False,
    auto_metric_logging=False,
    auto_output_logging=False,
    auto_log_co2=False,
    log_env_details=False,
    log_env_gpu=False,
    log_env_host=False,
    log_env_cpu=False,
    log_env_network=False,
    log_env_disk=False,
    log_git_metadata=False,
    log_git_patch=False,
    display_summary_level=0,
)


def import_comet():
    """Import ``comet_ml`` without its import-time side effects.

    Auto-logging (monkey-patching torch) and Sentry error tracking are disabled unless the
    environment already chose otherwise; comet's ``sys.excepthook`` wrapper is undone (the hook
    ends its experiment itself); comet's console messages are limited to warnings unless
    ``COMET_LOGGING_CONSOLE`` is set.
    """
    if "comet_ml" in sys.modules:
        return sys.modules["comet_ml"]
    os.environ.setdefault("COMET_DISABLE_AUTO_LOGGING", "1")
    os.environ.setdefault("COMET_ERROR_TRACKING_ENABLE", "false")
    previous_hook = sys.excepthook
    try:
        import comet_ml
    except ImportError as e:  # pragma: no cover - comet_ml is a dependency
        raise ConfigError(f"CometLogger: comet_ml is not installed ({e})") from e
    sys.excepthook = previous_hook
    if "COMET_LOGGING_CONSOLE" not in os.environ:
        for handler in logging.getLogger("comet_ml").handlers:
            if isinstance(handler, logging.StreamHandler) and handler.level < logging.WARNING:
                handler.setLevel(logging.WARNING)
    return comet_ml


def comet_online_default() -> bool:
    """Whether Comet should run online: ``COMET_START_ONLINE`` if set, else whether an API key
    is configured (``COMET_API_KEY`` or comet's config file). Reads config only, no network."""
    import_comet()
    from comet_ml.config import get_api_key, get_config

    config = get_config()
    start_online = config["comet.start.online"]
    if start_online is not None:
        return bool(start_online)
    return bool(get_api_key(None, config))


def _resolve_online(online: bool | None) -> bool:
    """``online``, or (None) whether a key is configured; online needs a key."""
    online = comet_online_default() if online is None else online
    if online and not _has_api_key():
        raise ConfigError("CometLogger: online=True but no Comet API key is configured "
                          "(set COMET_API_KEY or api_key in ~/.comet.config)")
    return online


def _has_api_key() -> bool:
    from comet_ml.config import get_api_key, get_config

    return bool(get_api_key(None, get_config()))


class _FirstError(logging.Handler):
    """Keeps the first line of the first ERROR comet_ml logs (its reason for going dead)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.message: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.message is None:
            self.message = (record.getMessage().strip().splitlines() or [""])[0]


def _start_online(comet_ml, kwargs: dict):
    """``(experiment, None)`` if the Comet server accepted an online experiment, else
    ``(None, reason)``: comet_ml then logs an error and hands back a dead experiment (or
    raises), which is ended here; its own console lines are held back (ours says it)."""
    comet_logger = logging.getLogger("comet_ml")
    consoles = [h for h in comet_logger.handlers if isinstance(h, logging.StreamHandler)]
    levels = [h.level for h in consoles]
    capture = _FirstError()
    comet_logger.addHandler(capture)
    for handler in consoles:
        handler.setLevel(logging.CRITICAL + 1)
    try:
        experiment = comet_ml.start(online=True, **kwargs)
    except Exception as err:  # any failure to reach or use the server
        return None, " ".join(f"{type(err).__name__}: {err}".split())[:200]
    finally:
        comet_logger.removeHandler(capture)
        for handler, level in zip(consoles, levels, strict=True):
            handler.setLevel(level)
    if getattr(experiment, "alive", True):
        return experiment, None
    try:
        experiment.end()
    except Exception:  # a dead experiment that cannot even end: nothing was sent anyway
        LOGGER.debug("ending the dead online Comet experiment failed", exc_info=True)
    return None, (capture.message or "the Comet server did not accept the experiment")[:200]


def _as_float(value: Any) -> float | None:
    """``value`` as a float if it is a real number (or a one-element tensor/array), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        item = value.item()
        if isinstance(item, numbers.Real) and not isinstance(item, bool):
            return float(item)
    return None


def _jsonable(value: Any) -> Any:
    """Parameters as plain JSON values (paths and other objects become strings)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    number = _as_float(value)
    return number if number is not None else str(value)


class CometLogger:
    """Log the trainer's epoch metrics, the parameters and the best epoch to Comet.

    Args:
        exp_dir: experiment folder; the offline archive goes to ``<exp_dir>/comet/``.
        project_name, workspace: Comet project and workspace (workspace: the key's default).
        experiment_name: name shown in Comet (default: the experiment folder's name).
        params: hyper-parameters, logged once when the experiment is created.
        online: True/False to force; None: online only when an API key is configured.
        log_every: also log ``iteration_loss``, ``iteration_grad_norm``, ``iteration_lr`` every
            this many iterations (step = iteration).
        optimizer: where ``iteration_lr`` is read.

    The experiment starts at the trainer's STARTED event (a second ``run`` continues it) and
    ends at COMPLETED, TERMINATE or EXCEPTION_RAISED (the exception is re-raised). After
    `load_state_dict`, the same Comet experiment is continued.
    """

    def __init__(
        self,
        exp_dir: str | os.PathLike,
        project_name: str = "tractrain",
        workspace: str | None = None,
        experiment_name: str | None = None,
        params: dict | None = None,
        online: bool | None = None,
        log_every: int | None = None,
        optimizer=None,
    ) -> None:
        if not isinstance(project_name, str) or not project_name.strip():
            raise ConfigError(f"CometLogger: project_name must be a non-empty string, got "
                              f"{project_name!r}")
        if workspace is not None and not isinstance(workspace, str):
            raise ConfigError(f"CometLogger: workspace must be a string, got {workspace!r}")
        if params is not None and not isinstance(params, Mapping):
            raise ConfigError(f"CometLogger: params must be a dict, got {type(params).__name__}")
        if online is not None and not isinstance(online, bool):
            raise ConfigError(f"CometLogger: online must be true, false or null, got {online!r}")
        self.exp_dir = ExperimentDir(exp_dir)
        self.project_name = project_name
        self.workspace = workspace
        self.experiment_name = experiment_name or self.exp_dir.root.resolve().name
        self.params = _jsonable(dict(params)) if params is not None else None
        self.online = online
        self.log_every = log_every
        self.optimizer = optimizer
        self.fallback: str | None = None  # why an online start went offline
        self.experiment = None
        self._key: str | None = None
        self._logged_best: dict | None = None
        self._exception_handler = self._on_exception

    @property
    def offline_dir(self) -> Path:
        """Folder of the offline archives (``<exp_dir>/comet``)."""
        return self.exp_dir.comet

    @property
    def experiment_key(self) -> str | None:
        """Key of the Comet experiment, once started (or restored)."""
        return self._key

    def attach(self, trainer: Engine) -> CometLogger:
        """Start/continue the experiment on STARTED, log at EPOCH_COMPLETED, end at the end.

        In distributed runs only rank 0 logs (on other ranks this does nothing)."""
        import ignite.distributed as idist
        from ignite.engine import Events

        if idist.get_rank() != 0:
            return self
        trainer.add_event_handler(Events.STARTED, self.start)
        if self.log_every:
            trainer.add_event_handler(Events.ITERATION_COMPLETED(every=self.log_every),
                                      self._on_iteration)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._on_epoch_completed)
        trainer.add_event_handler(Events.TERMINATE, self.close)
        trainer.add_event_handler(Events.COMPLETED, self.close)
        trainer.add_event_handler(Events.EXCEPTION_RAISED, self._exception_handler)
        return self

    def start(self, engine: Engine | None = None) -> None:
        """Create the Comet experiment, or continue the one of `experiment_key`."""
        if self.experiment is not None:
            return
        comet_ml = import_comet()
        online = _resolve_online(self.online)
        self.offline_dir.mkdir(parents=True, exist_ok=True)
        config = comet_ml.ExperimentConfig(
            name=self.experiment_name, offline_directory=str(self.offline_dir), **QUIET_SETTINGS
        )
        resuming = self._key is not None
        kwargs = dict(experiment_key=self._key, mode="get") if resuming else dict(mode="create")
        kwargs.update(project_name=self.project_name, workspace=self.workspace,
                      experiment_config=config)
        experiment, self.fallback = _start_online(comet_ml, kwargs) if online else (None, None)
        if self.fallback is not None:
            LOGGER.warning("Comet online failed (%s): logging offline to %s instead (upload "
                           "later with 'comet upload')", self.fallback, self.offline_dir)
        if experiment is None:
            experiment = comet_ml.start(online=False, **kwargs)
        self.experiment = experiment
        self._key = experiment.get_key()
        self.online = online
        if not resuming and self.params:
            experiment.log_parameters(self.params)
        LOGGER.info("comet: experiment %s, %s", self._key, self.destination)
        if engine is not None:  # read by the run summary
            engine.state.trackers = {**(getattr(engine.state, "trackers", None) or {}),
                                     "comet": self.destination}

    @property
    def destination(self) -> str:
        """Where the data goes: ``online`` or ``offline archive in <exp>/comet`` (and why)."""
        if self.online and self.fallback is None:
            return f"online (experiment {self._key})"
        why = f" (online failed: {self.fallback})" if self.fallback else ""
        return f"offline archive in {self.offline_dir}{why}"

    def _on_iteration(self, engine: Engine) -> None:
        if self.experiment is None:
            return
        metrics = {f"iteration_{k}": v for k, v in iteration_values(engine, self.optimizer).items()
                   if math.isfinite(v)}
        if metrics:
            self.experiment.log_metrics(metrics, step=int(engine.state.iteration),
                                        epoch=int(engine.state.epoch))

    def _on_epoch_completed(self, engine: Engine) -> None:
        self.start()
        epoch = int(engine.state.epoch)
        self.log_epoch(engine.state.metrics, epoch, getattr(engine.state, "best_epoch", None))

    def log_epoch(self, metrics: Mapping, epoch: int, best: Mapping | None = None) -> None:
        """Log every numeric entry of ``metrics`` at step ``epoch``, and the best epoch record
        (``best_epoch``/``best_value`` metrics, ``best_*`` others when it changes)."""
        if self.experiment is None:
            raise ConfigError("CometLogger: no running experiment (call start() or attach the "
                              "hook to a trainer first)")
        values = {}
        for name, value in metrics.items():
            number = _as_float(value)
            if number is not None:
                values[str(name)] = number
        if best:
            for key, name in (("epoch", "best_epoch"), ("value", "best_value")):
                number = _as_float(best.get(key))
                if number is not None and math.isfinite(number):
                    values[name] = number
        if values:
            self.experiment.log_metrics(values, step=epoch, epoch=epoch)
        if best and dict(best) != self._logged_best:
            self.experiment.log_others({f"best_{k}": _jsonable(v) for k, v in best.items()})
            self._logged_best = dict(best)

    def close(self, engine: Engine | None = None) -> None:
        """End the experiment (flushes the offline archive); safe to call twice."""
        experiment, self.experiment = self.experiment, None
        if experiment is not None:
            experiment.end()

    def _on_exception(self, engine: Engine, error: BaseException) -> None:
        if self.experiment is not None:
            message = " ".join(f"{type(error).__name__}: {error}".split())
            self.experiment.log_other("crashed", message)
        self.close()
        reraise_if_last(engine, self._exception_handler, error)

    def state_dict(self) -> dict:
        """``{"experiment_key", "online"}``: enough to continue the same experiment."""
        return {"experiment_key": self._key, "online": self.online}

    def load_state_dict(self, state: Mapping) -> None:
        """Continue the experiment of ``state`` at the next start (in its online/offline mode)."""
        if not isinstance(state, Mapping) or "experiment_key" not in state:
            raise ConfigError("CometLogger state: expected a dict with 'experiment_key' and "
                              "'online'")
        key, online = state["experiment_key"], state.get("online")
        if key is not None and not isinstance(key, str):
            raise ConfigError(f"CometLogger state: experiment_key must be a string, got {key!r}")
        if online is not None and not isinstance(online, bool):
            raise ConfigError(f"CometLogger state: online must be a bool, got {online!r}")
        if key is not None and online is not None and self.online is not None \
                and online != self.online:
            mode = "online" if online else "offline"
            raise ConfigError(f"CometLogger: experiment {key} was {mode}; it cannot be continued "
                              f"with online={self.online}")
        if self.experiment is not None and key != self._key:
            self.close()
        self._key = key
        if online is not None:
            self.online = online
        self._logged_best = None
