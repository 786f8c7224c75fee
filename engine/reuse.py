"""`load_model`: a trained model back from its experiment folder, ready to use.

The model is rebuilt by a factory called with the ``model_config`` recorded in
``<exp>/best_model/config.json`` and its weights are loaded with
``torch.load(weights_only=True)`` (`tractrain.experiment`). The factory recorded there
(``"factory": "package.module:make_model"``) is imported only if it is tractrain's own or you
trust the folder (``trust=True``); otherwise name it yourself (`tractrain.imports`)::

    import tractrain
    model = tractrain.load_model("experiments/demo")  # best weights, eval mode, on the CPU
    model = tractrain.load_model("experiments/mine", factory="mypkg.models:make_model")
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from tractrain.errors import CheckpointError, ConfigError
from tractrain.experiment import CONFIG_FILE, ExperimentDir, read_best_model
from tractrain.imports import import_object, import_recorded

WHICH = ("best", "checkpoint")


def load_model(exp_dir: str | os.PathLike, which: str = "best",
               device: str | torch.device | None = None, *,
               factory: str | Callable | None = None, trust: bool = False) -> torch.nn.Module:
    """The model of ``exp_dir`` with its best (``which="best"``) or latest checkpoint
    (``which="checkpoint"``) weights, in eval mode, on ``device`` (default the CPU).

    ``factory`` (a callable or ``package.module:name``) builds the model; by default the one
    recorded in the folder, used only if it is tractrain's own or ``trust`` is set. Raises a
    one-line `CheckpointError` if the experiment has no complete best model, its model config
    records no factory, or the weights don't fit the rebuilt model, and a `ConfigError` if the
    recorded factory is not trusted."""
    from tractrain.hooks.checkpoint import check_model_state, load_checkpoint

    if which not in WHICH:
        raise ConfigError(f"which {which!r}: expected one of {', '.join(WHICH)}")
    exp = ExperimentDir(exp_dir)
    weights, model_config = read_best_model(exp)
    source = exp.best_model / CONFIG_FILE
    if not isinstance(model_config, dict) or (factory is None and "factory" not in model_config):
        raise CheckpointError(f"{source}: no model config with a "
                              "'factory' (was the model saved by tractrain-train?)")
    name = factory if factory is not None else model_config["factory"]
    if callable(factory):
        build = factory
    elif factory is not None:
        build = import_object(factory, "model")
    else:
        build = import_recorded(name, "model", str(source), trust,
                                f"pass factory={name!r} or trust=True")
    model = build({k: v for k, v in model_config.items() if k != "factory"})
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"{getattr(name, '__name__', name)}: returned "
                          f"{type(model).__name__}, expected a torch.nn.Module")
    where = str(exp.best_model)
    if which == "checkpoint":
        meta, states = load_checkpoint(exp, repair=False)  # a reader: takes no lock
        if "model" not in states:
            raise CheckpointError(f"{meta['folder']}: checkpoint holds no model weights")
        weights, where = states["model"], meta["folder"]
    check_model_state(model, weights, where)
    model.load_state_dict(weights)
    return model.to(torch.device(device) if device is not None else "cpu").eval()
