"""Errors tractrain raises for bad input: one line naming the file/field and what was expected."""


class TractrainError(ValueError):
    """Base class: a user-facing error whose message is one complete line."""


class StoreError(TractrainError):
    """A store (or a file going into one) is missing, malformed or inconsistent."""


class ConfigError(TractrainError):
    """A configuration value or option is invalid."""


class CheckpointError(TractrainError):
    """A checkpoint or best model cannot be loaded or resumed from."""


class ExperimentBusyError(TractrainError):
    """Another process is writing the experiment (it holds the experiment's lock)."""


class LossContractError(ConfigError):
    """``loss_fn(model, batch)`` did not return ``(mean_loss, n)`` as the engine needs it."""
