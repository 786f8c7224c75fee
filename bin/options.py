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
from tractrain.documents import load_mapping
from tractrain.errors import ConfigError

DEMO_MODEL = "tractrain.examples.next_direction:make_model"
DEMO_LOSS = "tractrain.examples.next_direction:loss_fn"
DEMO_MODEL_CONFIG = {"hidden_size": 64}  # the demo model's only: a user factory gets {}

# Options with a fixed set of values, checked at parse time.
CHOICES: dict[str, tuple[str, ...]] = {
    "comet": ("off", "offline", "online", "auto"),
    "trackers": ("csv", "tensorboard", "mlflow", "wandb", "comet"),
}
_COMET_ALIASES = {"true": "auto", "yes": "auto", "on": "auto", "1": "auto",
                  "false": "off", "no": "off", "0": "off"}


def comet_mode(value: Any) -> str:
    """``--comet``: off | offline | online | auto (``true`` is auto, ``false`` is off)."""
    if isinstance(value, bool):
        return "auto" if value else "off"
    text = str(value).strip().lower()
    text = _COMET_ALIASES.get(text, text)
    if text not in CHOICES["comet"]:
        raise ValueError(f"expected one of {', '.join(CHOICES['comet'])}, got {value!r}"
                         f"{suggest(text, CHOICES['comet'])}")
    return text


def tracker_list(value: Any) -> list[str]:
    """``--trackers``: a comma-separated list (or a config file's list) of `CHOICES` names."""
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    names = [str(item).strip().lower() for item in items if str(item).strip()]
    for name in names:
        if name not in CHOICES["trackers"]:
            raise ValueError(f"unknown tracker {name!r}{suggest(name, CHOICES['trackers'])}; "
                             f"expected any of {', '.join(CHOICES['trackers'])}")
    return list(dict.fromkeys(names))

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
    "batch_units": ("points", str, "streamlines | points | length_mm"),
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
    "neighborhood": (None, str, "none | axes | grid: also sample around each point"),
    "radius_mm": (0.0, float, "neighbourhood radius (mm)"),
    "resolution_mm": (None, float, "neighbourhood spacing (mm), default: radius"),
    "outside": ("zeros", str, "points outside the volume: zeros | clamp"),
    "interpolate": ("workers", str, "interpolate inputs in the DataLoader workers (CPU) or on "
                                    "the training device: workers | device"),
    "num_workers": (0, int, "DataLoader worker processes"),
    "lazy": (True, bool, "read volumes on demand (byte-budget cache) instead of up front"),
    "cache_gb": (2.0, float, "lazy volume cache budget (GiB)"),
    # optimisation
    "optimizer": ("adam", str, "adam | adamw | sgd | radam"),
    "lr": ("0.003*4 0.001", str, "learning rate or per-epoch schedule, e.g. '1e-3*3 1e-4'"),
    "weight_decay": (0.0, float, "weight decay"),
    "clip_grad_norm": (None, float, "clip the total gradient norm to this value"),
    "nan_policy": ("stop", str, "non-finite loss or gradient: stop | skip"),
    "patience": (None, int, "stop after this many epochs without improvement"),
    "min_delta": (0.0, float, "smallest decrease that counts as an improvement"),
    "monitor": (None, str, "metric for best model/patience (default: valid_loss, else "
                           "train_loss)"),
    "monitor_mode": ("min", str, "min | max: whether a lower or higher monitored value is "
                                 "better"),
    "gen_every": (None, int, "track from validation seeds every N epochs and log "
                             "gen_endpoint_dist, gen_within, gen_length (default: off)"),
    "gen_streamlines": (100, int, "validation streamlines tracked by the generation check"),
    "gen_within_mm": (5.0, float, "an end within this distance (mm) of the reference counts "
                                  "in gen_within"),
    "nproc_per_node": (1, int, "processes for distributed data-parallel training (gloo on "
                               "CPU, nccl on GPU; or start tractrain-train under torchrun)"),
    "device": ("auto", str, "cpu | cuda | cuda:N | auto"),
    "amp": (False, bool, "automatic mixed precision (CUDA only)"),
    "checkpoint_every": (None, int, "also checkpoint every N iterations (mid-epoch)"),
    "comet": ("off", comet_mode, "Comet: off | offline (archive in <exp>/comet) | online "
                                 "(falls back to offline if the server is unreachable) | auto "
                                 "(online when an API key is configured); true = auto"),
    "trackers": (None, tracker_list, "comma-separated trackers: csv (<exp>/logs, always on), "
                                     "tensorboard (<exp>/tensorboard), mlflow (<exp>/mlruns), "
                                     "wandb (<exp>/wandb, offline unless WANDB_MODE is set), "
                                     "comet (--comet auto unless set)"),
    "comet_project": ("tractrain", str, "Comet project name"),
    "comet_workspace": (None, str, "Comet workspace"),
    "progress": (None, bool, "progress bars (default: when stderr is a terminal)"),
    "log_every": (50, int, "log the iteration loss, grad norm and lr every N iterations to "
                           "<exp>/logs/iterations.csv and the trackers (and with -v, stderr)"),
}

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
    "weight_decay": (0, 1e6, False), "clip_grad_norm": (0, 1e12, True),
    "patience": (1, BIG, False), "min_delta": (0, 1e12, False),
    "gen_every": (1, BIG, False), "gen_streamlines": (1, 10**7, False),
    "gen_within_mm": (0, 1e4, True), "nproc_per_node": (1, 1024, False),
    "checkpoint_every": (1, BIG, False), "log_every": (1, BIG, False),
}

SECTIONS = {
    "experiment": ("name", "experiments", "store", "group", "cache_dir", "model", "loss",
                   "model_config", "seed", "torch_seed", "max_epochs"),
    "sampler": ("batch_size", "batch_units", "subjects_per_batch", "cycles",
                "max_batches_train", "max_batches_valid", "valid_fraction"),
    "loader": ("step_size", "compress", "split_ratio", "reverse_ratio", "noise_mm",
               "noise_truncation", "volume_group", "neighborhood", "radius_mm", "resolution_mm",
               "outside", "interpolate", "num_workers", "lazy", "cache_gb"),
    "optimisation and hooks": ("optimizer", "lr", "weight_decay", "clip_grad_norm",
                               "nan_policy", "patience", "min_delta", "monitor", "monitor_mode",
                               "gen_every", "gen_streamlines", "gen_within_mm", "nproc_per_node",
                               "device", "amp",
                               "checkpoint_every", "trackers", "comet", "comet_project",
                               "comet_workspace",
                               "progress", "log_every"),
}

NONE_WORDS = ("none", "null", "")


def defaults() -> dict:
    return {name: (json.loads(json.dumps(d)) if isinstance(d, dict) else d)
            for name, (d, _, _) in OPTIONS.items()}


def parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def convert(name: str, value: Any, where: str) -> Any:
    """``value`` converted to option ``name``'s type; ConfigError naming ``where`` if not."""
    if name not in OPTIONS:
        raise ConfigError(f"{where}: unknown option {name!r}{suggest(name, OPTIONS)}")
    default, kind, _ = OPTIONS[name]
    if value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS
                         and kind is not str):
        return None
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


def add_option_flags(parser) -> None:
    """One ``--flag`` per option (default None: 'not given'), grouped by section."""
    for section, names in SECTIONS.items():
        group = parser.add_argument_group(section)
        for name in names:
            default, kind, text = OPTIONS[name]
            flag = "--" + name.replace("_", "-")
            shown = "none" if default is None else default
            group.add_argument(flag, dest=name, default=None, metavar=_metavar(kind),
                               help=f"{text} (default: {shown})")


def _metavar(kind) -> str:
    return {int: "N", float: "X", bool: "BOOL", str: "TEXT", comet_mode: "MODE",
            tracker_list: "LIST"}.get(kind, "VALUE")


def resolve(file_options: dict, flags: dict) -> dict:
    """Defaults, then the config file, then the flags given on the command line."""
    config = defaults()
    config.update(file_options)
    for name, value in flags.items():
        if value is not None and name in OPTIONS:
            config[name] = convert(name, value, "--" + name.replace("_", "-"))
    return config
