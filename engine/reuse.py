"""`load_model`: a trained model back from its experiment folder, ready to use.

The model is rebuilt by the factory recorded in ``<exp>/best_model/config.json``
(``"factory": "package.module:make_model"`` plus the ``model_config`` it was called with) and
its weights are loaded with ``torch.load(weights_only=True)`` (`tractrain.experiment`)::

    import tractrain
    model = tractrain.load_model("experiments/demo")  # best weights, eval mode, on the CPU
"""

from __future__ import annotations

import os

import torch

from tractrain.errors import CheckpointError, ConfigError
from tractrain.experiment import CONFIG_FILE, ExperimentDir, read_best_model

WHICH = ("best", "checkpoint")


def load_model(exp_dir: str | os.PathLike, which: str = "best",
               device: str | torch.device | None = None) -> torch.nn.Module:
    """The model of ``exp_dir`` with its best (``which="best"``) or latest checkpoint
    (``which="checkpoint"``) weights, in eval mode, on ``device`` (default the CPU).

    Raises a one-line `CheckpointError` if the experiment has no complete best model, its
    model config records no factory, or the weights don't fit the rebuilt model."""
    from tractrain.bin.compose import import_object
    from tractrain.hooks.checkpoint import check_model_state, load_checkpoint

    if which not in WHICH:
        raise ConfigError(f"which {which!r}: expected one of {', '.join(WHICH)}")
    exp = ExperimentDir(exp_dir)
    weights, model_config = read_best_model(exp)
    if not isinstance(model_config, dict) or "factory" not in model_config:
        raise CheckpointError(f"{exp.best_model / CONFIG_FILE}: no model config with a "
                              "'factory' (was the model saved by tractrain-train?)")
    factory = import_object(model_config["factory"], "model")
    model = factory({k: v for k, v in model_config.items() if k != "factory"})
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"{model_config['factory']}: returned {type(model).__name__}, "
                          "expected a torch.nn.Module")
    where = str(exp.best_model)
    if which == "checkpoint":
        meta, states = load_checkpoint(exp)
        if "model" not in states:
            raise CheckpointError(f"{meta['folder']}: checkpoint holds no model weights")
        weights, where = states["model"], meta["folder"]
    check_model_state(model, weights, where)
    model.load_state_dict(weights)
    return model.to(torch.device(device) if device is not None else "cpu").eval()
