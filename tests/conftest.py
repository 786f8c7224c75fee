"""Shared fixtures: a small phantom store built once per test session; quiet offline Comet."""

import os

import pytest

# comet_ml must never reach the network or patch the interpreter in tests.
os.environ.setdefault("COMET_DISABLE_AUTO_LOGGING", "1")
os.environ.setdefault("COMET_ERROR_TRACKING_ENABLE", "false")
os.environ["COMET_START_ONLINE"] = "false"
os.environ.pop("COMET_API_KEY", None)


@pytest.fixture(scope="session")
def phantom_store(tmp_path_factory):
    """A lazily opened store of the default phantom (3 subjects: 1 train, 1 valid, 1 test...)."""
    from tractrain.data.phantom import demo_store

    return demo_store(tmp_path_factory.mktemp("phantom"), n_subjects=4,
                      streamlines_per_subject=200, seed=3)


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op torch thread is fastest and immune to a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def trained_experiment(phantom_store, tmp_path_factory):
    """``<exp>`` of `tractrain-train` with the demo model on `phantom_store`: 2 short epochs
    (3 training batches each), the whole valid split validated every epoch."""
    import subprocess
    import sys

    parent = tmp_path_factory.mktemp("trained")
    done = subprocess.run(
        [sys.executable, "-m", "tractrain.bin.train", "--store", str(phantom_store.path),
         "--experiments", str(parent), "--name", "run", "--max-epochs", "2",
         "--max-batches-train", "3", "--batch-size", "1500", "--progress", "false"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return parent / "run"
