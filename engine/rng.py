"""Seed, capture and restore every global RNG (python, numpy, torch, this rank's CUDA device):
`seed_everything`, `GlobalRNG` as checkpointable state, and `set_deterministic`.

Bit-exact resume holds on CPU always; on a GPU only with ``--deterministic`` (`set_deterministic`:
without it cuDNN autotuning and atomics in some kernels change the last bits from run to run).
"""

from __future__ import annotations

import logging
import os
import random
from types import ModuleType

import numpy as np
import torch

log = logging.getLogger(__name__)
CUBLAS_WORKSPACE = ":4096:8"  # what deterministic cuBLAS needs (see torch's reproducibility)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy's global RNG and torch (CPU and every CUDA device) with
    ``seed``, so that code drawing from any of them (a model's initialisation included) gives
    the same numbers in every run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device (lazily if CUDA is not started)


def set_deterministic(enabled: bool = True) -> None:
    """Deterministic kernels: ``torch.use_deterministic_algorithms``, cuDNN deterministic with
    autotuning (benchmark) off, and ``CUBLAS_WORKSPACE_CONFIG`` (read when CUDA starts: call
    this before the first CUDA operation). An op without a deterministic version then raises.
    """
    if not enabled:
        return
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in (CUBLAS_WORKSPACE, ":16:8"):
        if torch.cuda.is_initialized():
            log.warning("--deterministic: CUDA already started; set CUBLAS_WORKSPACE_CONFIG="
                        "%s in the environment for deterministic cuBLAS", CUBLAS_WORKSPACE)
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def cuda_index(device: str | torch.device | None, cuda: ModuleType = torch.cuda) -> int | None:
    """Index of the CUDA device ``device`` (``cuda`` alone: the current one), None if it is not
    a usable CUDA device."""
    if device is None or torch.device(device).type != "cuda" or not cuda.is_available():
        return None
    index = torch.device(device).index
    return cuda.current_device() if index is None else index


class GlobalRNG:
    """``state_dict()`` snapshots the global RNGs in tensors and plain lists (loadable with
    ``torch.load(weights_only=True)``); ``load_state_dict`` puts them back.

    Of CUDA, only the RNG of ``device`` (this rank's own GPU) is saved and restored, so a
    checkpoint resumes on a machine with any number of GPUs. ``cuda`` stands for `torch.cuda`
    (a stand-in in tests)."""

    def __init__(self, device: str | torch.device | None = None,
                 cuda: ModuleType = torch.cuda) -> None:
        self.device, self.cuda = device, cuda

    def state_dict(self) -> dict:
        version, internal, gauss = random.getstate()
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "python": {"version": version, "state": list(internal), "gauss": gauss},
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
            "torch": torch.get_rng_state(),
        }
        index = cuda_index(self.device, self.cuda)
        if index is not None:
            state["cuda_device"] = self.cuda.get_rng_state(index)
        return state

    def load_state_dict(self, state: dict) -> None:
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
        npy = state["numpy"]
        np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                             npy["has_gauss"], npy["cached"]))
        torch.set_rng_state(state["torch"])
        index = cuda_index(self.device, self.cuda)
        if index is None:
            return
        own = state.get("cuda_device")
        if own is None and isinstance(state.get("cuda"), list | tuple):  # tractrain <= 0.1:
            every = state["cuda"]  # every visible GPU's
            own = every[index] if index < len(every) else None
        if own is None:
            log.warning("the checkpoint has no CUDA RNG state for cuda:%d; its random draws "
                        "will differ from an uninterrupted run", index)
            return
        self.cuda.set_rng_state(own, index)
