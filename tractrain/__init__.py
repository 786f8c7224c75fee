"""tractrain: a training engine for deep learning on diffusion-MRI tractography."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tractrain")
except PackageNotFoundError:  # pragma: no cover - running from an uninstalled checkout
    __version__ = "0+unknown"
