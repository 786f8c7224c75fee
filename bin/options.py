"""Every option of ``tractrain-train``: default, type and help, in one table.

A config file (YAML or JSON) and the command-line flags use the same names (``batch_size`` in
a file is ``--batch-size`` on the command line); flags win over the file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tractrain.bin.common import suggest
from tractrain.bin.flags import EMPTY_PATH, Choice, add_bool_flag, closest, parse_bool
from tractrain.documents import load_mapping
from tractrain.errors import ConfigError

DEMO_MODEL = "tractrain.examples.next_direction:make_model"
DEMO_LOSS = "tractrain.examples.next_direction:loss_fn"
DEMO_MODEL_CONFIG = {"hidden_size": 64}  # the demo model's only: a user factory gets {}



def comet_mode(value: Any) -> str:
    """``--comet``: off | offline | online | auto (``true`` is auto, ``false`` is off)."""
    return CHOICES["comet"].check(value)


def tracker_list(value: Any) -> list[str]:
    """``--trackers``: a comma-separated list (or a config file's list) of `CHOICES` names."""
    return [name for name in CHOICES["trackers"].check(value).split(",") if name]


# name: (default, type, help). type None = free-form (dict) from the config file only.
OPTIONS: dict[str, tuple[Any, Any, str]] = {
    # experiment
    "name": ("demo", str, "experiment name: folder <experiments>/<name>"),
    "experiments": ("experiments", str, "parent folder of experiment folders"),
    "store": (None, str, "tractrain store (.zarr); default: the demo phantom, built and cached"),
    "group": ("bundles", str, "streamline group of the store to train on"),
    "cache_dir": (None, str, "where the demo phantom store is cached "
                             "(default: $XDG_CACHE_HOME/tractrain or ~/.cache/tractrain)"),
    "model": (DEMO_MODEL, str, "package.module:factory or path/to/file.py:factory building the "
                               "model from model_config (n_inputs is added: input features "
                               "per point)"),
    "loss": (DEMO_LOSS, str, "package.module:function or path/to/file.py:function, "
                             "loss_fn(model, batch) -> (mean_loss: 0-d tensor, n >= 0)"),
    "model_config": (None, None, "dict passed to the model factory (JSON on the command "
                                 "line; n_inputs is added); default: "
                                 f"{json.dumps(DEMO_MODEL_CONFIG)} for the demo model, "
                                 "{} for yours"),
    "seed": (1234, int, "seeds everything before the model is built (Python's random, numpy's "
                        "global RNG, torch on CPU and CUDA) and the samplers and augmentations"),
    "torch_seed": (None, int, "if given, torch alone is reseeded with it just before the model "
                              "is built (after --seed): the initial weights then follow it"),
    "max_epochs": (8, int, "number of epochs"),
    # sampler
    "batch_size": (4000.0, float, "batch budget, in batch_units"),
    "batch_units": ("points", str, "unit of --batch-size"),
    "subjects_per_batch": (None, int, "subjects per batch (default: all)"),
    "cycles": (1, int, "batches drawn from the same subjects before changing them"),
    "max_batches_train": (None, int, "cap on training batches per epoch"),
    "max_batches_valid": (None, int, "cap on validation batches per epoch: validation then "
                                     "uses a fixed seeded sample stratified by subject and "
                                     "bundle, about N batches' worth"),
    "valid_fraction": (None, float, "validate on this fraction (0, 1] of the validation "
                                    "streamlines: a fixed seeded sample stratified by subject "
                                    "and bundle"),
    # loader
    "step_size": (1.0, float, "resample streamlines to this step (mm); none to keep"),
    "compress": (None, float, "compress streamlines with this tolerance (mm) instead"),
    "split_ratio": (0.0, float, "ratio of training streamlines split at a random point"),
    "reverse_ratio": (0.0, float, "ratio of training streamlines reversed"),
    "noise_mm": (0.0, float, "std of gaussian noise on training coordinates (mm)"),
    "noise_truncation": (2.0, float, "noise truncated at this many stds"),
    "volume_group": ("dwi", str, "volume group interpolated as inputs"),
    "neighborhood": (None, str, "also sample around each point: on the 3 axes or a grid"),
    "radius_mm": (0.0, float, "neighbourhood radius (mm)"),
    "resolution_mm": (None, float, "neighbourhood spacing (mm), default: radius"),
    "outside": ("zeros", str, "inputs of points outside the volume: zeros, or the nearest "
                              "voxel's (clamp)"),
    "allow_zero_inputs": (False, bool, "train even when more than half of the first training "
                                       "batch's points have all-zero inputs (streamlines "
                                       "outside their volume?)"),
    "interpolate": ("workers", str, "interpolate inputs in the DataLoader workers (CPU) or on "
                                    "the training device"),
    "num_workers": (0, int, "DataLoader worker processes"),
    "lazy": (True, bool, "read volumes on demand (byte-budget cache) instead of up front"),
    "cache_gb": (2.0, float, "lazy volume cache budget (GiB)"),
    "pin_memory": (None, bool, "DataLoader batches in page-locked memory, for faster "
                               "asynchronous copies to the GPU; none: on with CUDA"),
    "device_cache_gb": (2.0, float, "with --interpolate device: budget of the volumes kept on "
                                    "the device (GiB); a volume larger than it is refused at "
                                    "start"),
    # optimisation
    "optimizer": ("adam", str, "torch.optim optimizer"),
    "lr": ("0.003*4 0.001", str, "learning rate or per-epoch schedule, e.g. '1e-3*3 1e-4'"),
    "weight_decay": (0.0, float, "weight decay"),
    "clip_grad_norm": (None, float, "clip the total gradient norm to this value"),
    "nan_policy": ("stop", str, "non-finite loss or gradient: stop the run or skip the "
                                "batch"),
    "patience": (None, int, "stop after this many epochs without improvement"),
    "min_delta": (0.0, float, "smallest decrease that counts as an improvement"),
    "monitor": (None, str, "metric for best model/patience (default: valid_loss, else "
                           "train_loss)"),
    "monitor_mode": ("min", str, "whether a lower or higher monitored value is better"),
    "gen_every": (None, int, "track from validation seeds every N epochs and log "
                             "gen_endpoint_dist, gen_within, gen_length (default: off)"),
    "gen_streamlines": (100, int, "validation streamlines tracked by the generation check"),
    "gen_within_mm": (5.0, float, "an end within this distance (mm) of the reference counts "
                                  "in gen_within"),
    "nproc_per_node": (1, int, "processes for distributed data-parallel training (gloo on "
                               "CPU, nccl on GPU; or start tractrain-train under torchrun)"),
    "dist_timeout": (600.0, float, "seconds a distributed run waits for its peers (rendezvous "
                                   "and every collective) before a lost rank ends it"),
    "device": ("auto", str, "cpu | cuda | cuda:N | auto"),
    "precision": (None, str, "32 | 16-mixed | bf16-mixed: fp32, or autocast to fp16 (with "
                             "a GradScaler) or bf16; CUDA only, fp32 with a warning elsewhere "
                             "(none: 32, or 16-mixed with --amp true)"),
    "amp": (False, bool, "automatic mixed precision: an alias of --precision 16-mixed"),
    "deterministic": (False, bool, "deterministic kernels (torch.use_deterministic_algorithms, "
                                   "cuDNN deterministic, no autotuning, cuBLAS workspace): "
                                   "bit-exact GPU resume, some speed lost; ops without a "
                                   "deterministic version raise"),
    "checkpoint_every": (None, int, "also checkpoint every N iterations (mid-epoch)"),
    "keep_checkpoints": (0, int, "also keep the last N epoch-end checkpoints in "
                                 "<exp>/checkpoints/epoch-<n>/ (go back with tractrain-resume "
                                 "--from-checkpoint)"),
    "requeue": (False, bool, "on SIGUSR1 (SLURM's time-limit warning, sbatch --signal), "
                             "checkpoint, stop and run 'scontrol requeue $SLURM_JOB_ID'"),
    "comet": ("off", str, "Comet: offline (archive in <exp>/comet), online (falls back to "
                          "offline if the server is unreachable), auto (online when an API key "
                          "is configured); true = auto"),
    "trackers": (None, str, "comma-separated trackers: csv (<exp>/logs, always on), "
                            "tensorboard (<exp>/tensorboard), mlflow (<exp>/mlruns), "
                            "wandb (<exp>/wandb, offline unless WANDB_MODE is set), "
                            "comet (--comet auto unless set)"),
    "comet_project": ("tractrain", str, "Comet project name"),
    "comet_workspace": (None, str, "Comet workspace"),
    "progress": (None, bool, "progress bars (default: when stderr is a terminal)"),
    "log_every": (50, int, "log the iteration loss, grad norm and lr every N iterations to "
                           "<exp>/logs/iterations.csv and the trackers (and with -v, stderr)"),
}

# What a run that continues an experiment may change (`tractrain-resume`'s flags; `--resume
# auto` also takes these, plus where experiments and caches live and the cluster options).
RESUME_OVERRIDES = ("max_epochs", "patience", "store", "num_workers", "device", "progress",
                    "log_every", "precision", "pin_memory", "device_cache_gb", "dist_timeout")

# Options with a fixed set of values, checked with a suggestion when the options are resolved
# (before the store is opened). An entry applies while its option is a string option (kind str);
# comet, trackers and precision are declared for the options of the logging/trackers work.
CHOICES: dict[str, Choice] = {
    "batch_units": Choice(("streamlines", "points", "length_mm")),
    "neighborhood": Choice(("axes", "grid")),  # or none
    "outside": Choice(("zeros", "clamp")),
    "interpolate": Choice(("workers", "device")),
    "optimizer": Choice(("adam", "adamw", "sgd", "radam")),
    "nan_policy": Choice(("stop", "skip")),
    "monitor_mode": Choice(("min", "max")),
    "comet": Choice(("off", "offline", "online", "auto"),
                    aliases=(("true", "auto"), ("false", "off"))),
    "trackers": Choice(("csv", "tensorboard", "mlflow", "wandb", "comet"), many=True),
    "precision": Choice(("32", "16-mixed", "bf16-mixed")),
}

# What the built-in hooks log each epoch (--monitor picks one of them).
METRICS = ("train_loss", "valid_loss", "grad_norm", "unclipped_grad_norm",
           "unclipped_grad_norm_max", "lr", "epoch_time", "data_wait_share", "batches_per_s")
GEN_METRICS = ("gen_endpoint_dist", "gen_within", "gen_length")  # with gen_every

# name: (lowest, highest, lowest excluded): checked at parse time for numeric options.
BIG = 10**9
LIMITS: dict[str, tuple[float, float, bool]] = {
    "seed": (0, 2**63 - 1, False), "torch_seed": (0, 2**63 - 1, False),
    "max_epochs": (1, BIG, False), "batch_size": (0, 1e12, True),
    "subjects_per_batch": (1, BIG, False), "cycles": (1, BIG, False),
    "max_batches_train": (1, BIG, False), "max_batches_valid": (1, BIG, False),
    "step_size": (0, 1e4, True), "compress": (0, 1e4, True),
    "split_ratio": (0, 1, False), "reverse_ratio": (0, 1, False),
    "noise_mm": (0, 1e4, False), "noise_truncation": (0, 1e4, True),
    "radius_mm": (0, 1e4, False), "resolution_mm": (0, 1e4, True),
    "num_workers": (0, 1024, False), "cache_gb": (0, 1e6, False),
    "device_cache_gb": (0, 1e6, True),
    "weight_decay": (0, 1e6, False), "clip_grad_norm": (0, 1e12, True),
    "patience": (1, BIG, False), "min_delta": (0, 1e12, False),
    "gen_every": (1, BIG, False), "gen_streamlines": (1, 10**7, False),
    "gen_within_mm": (0, 1e4, True), "nproc_per_node": (1, 1024, False),
    "dist_timeout": (1, 1e6, False),
    "checkpoint_every": (1, BIG, False), "log_every": (1, BIG, False),
    "keep_checkpoints": (0, 10**6, False),
}

SECTIONS = {
    "experiment": ("name", "experiments", "store", "group", "cache_dir", "model", "loss",
                   "model_config", "seed", "torch_seed", "max_epochs"),
    "sampler": ("batch_size", "batch_units", "subjects_per_batch", "cycles",
                "max_batches_train", "max_batches_valid", "valid_fraction"),
    "loader": ("step_size", "compress", "split_ratio", "reverse_ratio", "noise_mm",
               "noise_truncation", "volume_group", "neighborhood", "radius_mm", "resolution_mm",
               "outside", "allow_zero_inputs", "interpolate", "num_workers", "lazy", "cache_gb",
               "pin_memory", "device_cache_gb"),
    "optimisation and hooks": ("optimizer", "lr", "weight_decay", "clip_grad_norm",
                               "nan_policy", "patience", "min_delta", "monitor", "monitor_mode",
                               "gen_every", "gen_streamlines", "gen_within_mm", "nproc_per_node",
                               "dist_timeout",
                               "device", "precision", "amp", "deterministic",
                               "checkpoint_every", "trackers", "comet", "comet_project",
                               "comet_workspace",
                               "progress", "log_every", "keep_checkpoints", "requeue"),
}

NONE_WORDS = ("none", "null", "")


def defaults() -> dict:
    return {name: (json.loads(json.dumps(d)) if isinstance(d, dict) else d)
            for name, (d, _, _) in OPTIONS.items()}


def choice_of(name: str) -> Choice | None:
    """The `Choice` of option ``name`` (None for a free-form or non-string option)."""
    return CHOICES.get(name) if name in OPTIONS and OPTIONS[name][1] is str else None


def convert(name: str, value: Any, where: str) -> Any:
    """``value`` converted to option ``name``'s type; ConfigError naming ``where`` if not."""
    if name not in OPTIONS:
        raise ConfigError(f"{where}: unknown option {name!r}{suggest(name, OPTIONS)}")
    default, kind, _ = OPTIONS[name]
    # "--optimizer: ..." on the command line, "run.yaml: optimizer: ..." from a file
    label = where if where == flag_of(name) else f"{where}: {name}"
    choice = choice_of(name)
    if choice is not None and value is not None and not (
            default is None and str(value).strip().lower() in NONE_WORDS):
        try:
            return choice.check(value)
        except ValueError as err:
            raise ConfigError(f"{label}: {err}") from None
    if value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS
                         and kind is not str):
        return None
    if name in PATH_OPTIONS and isinstance(value, str) and not value.strip():
        raise ConfigError(f"{label}: {EMPTY_PATH}")
    if kind is None:
        if isinstance(value, str):
            return load_mapping(value, f"{where}: {name}")
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {name} must be a mapping, got {value!r}")
        return value
    try:
        if kind is bool:
            return value if isinstance(value, bool) else parse_bool(value)
        if kind in (int, float) and isinstance(value, bool):  # YAML's yes/no/on/off
            raise ValueError(f"expected a number, got {value!r}")
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"expected an integer, got {value}")
        if isinstance(value, str) and kind is str and value.strip().lower() in ("none", "null"):
            return None if default is None else value
        return check_range(name, kind(value))
    except (TypeError, ValueError, OverflowError) as err:
        raise ConfigError(f"{where}: {name}: {err}") from None


def check_range(name: str, value: Any) -> Any:
    """``value`` if it is within option ``name``'s `LIMITS` (ValueError otherwise)."""
    if name not in LIMITS:
        return value
    low, high, open_low = LIMITS[name]
    if not math.isfinite(value) or value > high or value < low or (open_low and value == low):
        sign = ">" if open_low else ">="
        raise ValueError(f"expected a number {sign} {low:g} and <= {high:g}, got {value}")
    return value


def read_config_file(path: str | Path) -> dict:
    """Options from a YAML or JSON file (flat mapping, or grouped by the sections' names)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    data = load_mapping(text, str(path), yaml=path.suffix.lower() != ".json")
    flat: dict = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return {key: convert(key, value, str(path)) for key, value in flat.items()}


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_flag(parser, name: str, help: str | None = None, metavar: str | None = None) -> None:
    """``--flag`` of option ``name`` (default None: 'not given'; converted by `resolve`):
    ``--x/--no-x`` for a boolean, the values as metavar for a choice. ``help`` replaces the
    table's text; the default is shown once (unless the text already states it)."""
    default, kind, text = OPTIONS[name]
    if help is None:
        shown = "none" if default is None else str(default).lower() if kind is bool else default
        help = text if "default" in text else f"{text} (default: {shown})"
    choice = choice_of(name)
    if kind is bool:
        add_bool_flag(parser, flag_of(name), name, help=help)
        return
    if metavar is None:
        metavar = (choice.metavar(none=default is None) if choice is not None
                   else {int: "N", float: "X", str: "TEXT"}.get(kind, "VALUE"))
    parser.add_argument(flag_of(name), dest=name, default=None, metavar=metavar, help=help)


def add_option_flags(parser) -> None:
    """One ``--flag`` per option, grouped by section (see `add_flag`)."""
    for section, names in SECTIONS.items():
        group = parser.add_argument_group(section)
        for name in names:
            add_flag(group, name)


def check_monitor(config: dict, where: str = "--monitor", has_valid: bool = True) -> None:
    """ConfigError unless ``config["monitor"]`` is unset or a metric the configured hooks log
    (``has_valid``: whether the run validates, known once the store is open)."""
    monitor = config.get("monitor")
    known = tuple(m for m in METRICS if has_valid or m != "valid_loss")
    known += GEN_METRICS if config.get("gen_every") and has_valid else ()
    if monitor is None or monitor in known:
        return
    if monitor == "valid_loss" or (monitor in GEN_METRICS and not has_valid):
        raise ConfigError(f"{where}: {monitor!r} needs a validation split; the store has no "
                          "valid subjects (monitor train_loss)")
    if monitor in GEN_METRICS:
        raise ConfigError(f"{where}: {monitor!r} is logged only with --gen-every N")
    match = closest(monitor, known)
    hint = f"; did you mean {match!r}?" if match is not None else ""
    raise ConfigError(f"{where}: {monitor!r} is not a metric this run logs "
                      f"({', '.join(known)}){hint}")


def resolve(file_options: dict, flags: dict, source: str = "config file") -> dict:
    """Defaults, then the config file (``source``), then the flags given on the command line;
    ``monitor`` is checked against the metrics the configured hooks log."""
    config = defaults()
    config.update(file_options)
    given = [name for name, value in flags.items() if value is not None and name in OPTIONS]
    for name in given:
        config[name] = convert(name, flags[name], flag_of(name))
    check_monitor(config, "--monitor" if "monitor" in given else f"{source}: monitor")
    return config


PATH_OPTIONS = ("experiments", "store", "cache_dir")  # folders, relative to the current one
CODE_OPTIONS = ("model", "loss")  # package.module:name or path/to/file.py:name


def absolute_paths(config: dict, names=None) -> dict:
    """``config`` with the `PATH_OPTIONS` among ``names`` (default: all) made absolute and the
    file of a ``path/to/file.py:name`` `CODE_OPTIONS` value resolved, so that ``config.json``
    means the same from any directory (tractrain-resume, -eval, -track run anywhere)."""
    import os

    from tractrain.imports import absolute_spec

    config = dict(config)
    for name in names if names is not None else (*PATH_OPTIONS, *CODE_OPTIONS):
        value = config.get(name)
        if name in PATH_OPTIONS and isinstance(value, str) and value:
            config[name] = os.path.abspath(os.path.expanduser(value))
        elif name in CODE_OPTIONS and name in config:
            config[name] = absolute_spec(value)
    return config
