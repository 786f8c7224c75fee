"""tractrain: a training engine for deep learning on diffusion-MRI tractography.

The entry points a script needs are importable from here (``from tractrain import
load_model``); each is imported on first use (PEP 562), so ``import tractrain`` itself loads
neither torch, ignite nor zarr.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("tractrain")
except PackageNotFoundError:  # pragma: no cover - running from an uninstalled checkout
    __version__ = "0+unknown"

# public name -> module defining it
_EXPORTS = {
    # data
    "open_store": "tractrain.data.store",
    "BatchSampler": "tractrain.data.sampler",
    "SamplerConfig": "tractrain.data.packing",
    "split_index": "tractrain.data.split_index",
    "AugmentConfig": "tractrain.data.augment",
    "InputConfig": "tractrain.data.interpolation",
    "Batch": "tractrain.data.batch",
    "make_dataloader": "tractrain.data.dataloader",
    # engine
    "create_trainer": "tractrain.engine.trainer",
    "create_evaluator": "tractrain.engine.evaluator",
    "SamplerEpochs": "tractrain.engine.epochs",
    "train_and_validate": "tractrain.engine.fit",
    "load_model": "tractrain.engine.reuse",
    "evaluate": "tractrain.engine.evaluate",
    "seed_everything": "tractrain.engine.rng",
    # hooks
    "Validation": "tractrain.hooks.validation",
    "GenerationValidation": "tractrain.hooks.generation",
    "GradNorm": "tractrain.hooks.grad_norm",
    "Timing": "tractrain.hooks.timing",
    "BestModel": "tractrain.hooks.best_model",
    "Patience": "tractrain.hooks.patience",
    "NpyLogs": "tractrain.hooks.logs",
    "IterationLog": "tractrain.hooks.iteration_log",
    "Trackers": "tractrain.hooks.trackers",
    "CometLogger": "tractrain.hooks.comet",
    "Progress": "tractrain.hooks.progress",
    "GracefulStop": "tractrain.hooks.signals",
    "Checkpoint": "tractrain.hooks.checkpoint",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # static checkers and IDEs see the real objects
    from tractrain.data.augment import AugmentConfig as AugmentConfig
    from tractrain.data.batch import Batch as Batch
    from tractrain.data.dataloader import make_dataloader as make_dataloader
    from tractrain.data.interpolation import InputConfig as InputConfig
    from tractrain.data.packing import SamplerConfig as SamplerConfig
    from tractrain.data.sampler import BatchSampler as BatchSampler
    from tractrain.data.split_index import split_index as split_index
    from tractrain.data.store import open_store as open_store
    from tractrain.engine.epochs import SamplerEpochs as SamplerEpochs
    from tractrain.engine.evaluate import evaluate as evaluate
    from tractrain.engine.evaluator import create_evaluator as create_evaluator
    from tractrain.engine.fit import train_and_validate as train_and_validate
    from tractrain.engine.reuse import load_model as load_model
    from tractrain.engine.rng import seed_everything as seed_everything
    from tractrain.engine.trainer import create_trainer as create_trainer
    from tractrain.hooks.best_model import BestModel as BestModel
    from tractrain.hooks.checkpoint import Checkpoint as Checkpoint
    from tractrain.hooks.comet import CometLogger as CometLogger
    from tractrain.hooks.generation import GenerationValidation as GenerationValidation
    from tractrain.hooks.grad_norm import GradNorm as GradNorm
    from tractrain.hooks.iteration_log import IterationLog as IterationLog
    from tractrain.hooks.logs import NpyLogs as NpyLogs
    from tractrain.hooks.patience import Patience as Patience
    from tractrain.hooks.progress import Progress as Progress
    from tractrain.hooks.signals import GracefulStop as GracefulStop
    from tractrain.hooks.timing import Timing as Timing
    from tractrain.hooks.trackers import Trackers as Trackers
    from tractrain.hooks.validation import Validation as Validation


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tractrain' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
