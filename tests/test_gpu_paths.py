"""GPU-path settings checked without a GPU: the CUDA RNG of the rank's own device only (a
stand-in torch.cuda), --deterministic, pinned memory plumbing, the device volume budget, the
precision option, and bench/gpu.py's clean skip. CUDA-only checks skip without CUDA."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tractrain.bin.compose import feeding, run_precision
from tractrain.bin.options import convert, defaults
from tractrain.bin.train import main as train_main
from tractrain.data.batch import DeviceInputs
from tractrain.data.dataloader import make_dataloader
from tractrain.data.interpolation import InputConfig
from tractrain.data.packing import SamplerConfig
from tractrain.data.sampler import BatchSampler
from tractrain.data.split_index import split_index
from tractrain.engine.rng import GlobalRNG, set_deterministic
from tractrain.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


class FakeCuda:
    """torch.cuda as GlobalRNG uses it, with ``count`` GPUs whose RNG states are tensors."""

    def __init__(self, count: int, current: int = 0) -> None:
        self.states = {i: torch.tensor([i], dtype=torch.uint8) for i in range(count)}
        self.current, self.set_calls = current, []

    def is_available(self) -> bool:
        return bool(self.states)

    def current_device(self) -> int:
        return self.current

    def get_rng_state(self, index: int) -> torch.Tensor:
        return self.states[index].clone()

    def set_rng_state(self, state: torch.Tensor, index: int) -> None:
        if index not in self.states:
            raise RuntimeError(f"invalid device ordinal {index}")
        self.set_calls.append(index)
        self.states[index] = state.clone()


def test_cuda_rng_of_own_device_only_resumes_on_fewer_gpus():
    eight = FakeCuda(8)
    state = GlobalRNG("cuda:2", cuda=eight).state_dict()
    assert torch.equal(state["cuda_device"], torch.tensor([2], dtype=torch.uint8))
    assert "cuda" not in state  # not every visible GPU's
    state["cuda_device"] = torch.tensor([42], dtype=torch.uint8)
    one = FakeCuda(1)  # resumed on a machine with one GPU, as cuda (current device 0)
    GlobalRNG("cuda", cuda=one).load_state_dict(state)
    assert one.set_calls == [0] and int(one.states[0]) == 42
    two = FakeCuda(2, current=1)
    GlobalRNG("cuda", cuda=two).load_state_dict(state)
    assert two.set_calls == [1]  # the current device, not every one
    cpu = FakeCuda(2)
    GlobalRNG("cpu", cuda=cpu).load_state_dict(state)  # a CPU resume leaves CUDA alone
    assert cpu.set_calls == []


def test_old_checkpoints_with_every_gpus_rng_give_each_rank_its_own(caplog):
    state = GlobalRNG("cpu").state_dict()
    state["cuda"] = [torch.tensor([10 + i], dtype=torch.uint8) for i in range(2)]
    fake = FakeCuda(4)
    GlobalRNG("cuda:1", cuda=fake).load_state_dict(state)
    assert fake.set_calls == [1] and int(fake.states[1]) == 11
    with caplog.at_level(logging.WARNING, logger="tractrain"):
        GlobalRNG("cuda:3", cuda=fake).load_state_dict(state)  # that GPU had no state saved
    assert fake.set_calls == [1] and "no CUDA RNG state for cuda:3" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_cuda_rng_round_trip():
    rng = GlobalRNG("cuda")
    state = rng.state_dict()
    first = torch.rand(3, device="cuda")
    rng.load_state_dict(state)
    assert torch.equal(torch.rand(3, device="cuda"), first)


def test_deterministic_sets_torch_cudnn_and_cublas(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.benchmark = True
    try:
        set_deterministic(False)
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and torch.backends.cudnn.benchmark
        set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1:]


def config(**options) -> dict:
    return {**defaults(), **options}


def test_pin_memory_defaults_on_with_cuda_and_reaches_the_dataloader(phantom_store):
    assert feeding(config(), torch.device("cuda"))["pin_memory"] is True
    assert feeding(config(), torch.device("cpu"))["pin_memory"] is False
    assert feeding(config(pin_memory=False), torch.device("cuda"))["pin_memory"] is False
    assert feeding(config(pin_memory=convert("pin_memory", "on", "--pin-memory")),
                   torch.device("cpu"))["pin_memory"] is True
    sampler = BatchSampler(split_index(phantom_store, "train", "bundles"),
                           SamplerConfig(batch_size=50, units="streamlines"), seed=0)
    loader = make_dataloader(phantom_store, sampler,
                             **feeding(config(), torch.device("cuda")))
    assert loader.pin_memory is True


def test_device_volume_larger_than_the_budget_is_refused_not_reuploaded(phantom_store):
    inputs = InputConfig("dwi")
    subject = phantom_store.splits["train"][0]
    size = DeviceInputs(phantom_store, "bundles", inputs).volume_bytes(subject)
    assert size == phantom_store.volume(subject, "dwi").nbytes
    with pytest.raises(ConfigError, match=f"device_cache_gb .*subject {subject!r} takes"):
        DeviceInputs(phantom_store, "bundles", inputs, cache_bytes=size - 1, subjects=[subject])
    lazy = DeviceInputs(phantom_store, "bundles", inputs, cache_bytes=size - 1)  # no subjects
    sampler = BatchSampler(split_index(phantom_store, "train", "bundles"),
                           SamplerConfig(batch_size=50, units="streamlines"), seed=0)
    batch = next(iter(make_dataloader(phantom_store, sampler, group="bundles",
                                      interpolate="device")))
    with pytest.raises(ConfigError, match="device_cache_gb"):
        lazy(batch, "cpu")  # at first use: refused, not uploaded at every batch
    subjects = batch.subject_names
    total = sum(lazy.volume_bytes(s) for s in subjects)
    fits = DeviceInputs(phantom_store, "bundles", inputs, cache_bytes=total, subjects=subjects)
    fits(batch, "cpu")
    fits(batch, "cpu")  # each volume uploaded once, then reused
    assert (fits.volumes.misses, fits.volumes.hits) == (len(subjects), len(subjects))


def test_cli_refuses_a_device_cache_too_small_in_one_line(phantom_store, tmp_path, capsys):
    status = train_main(["--store", phantom_store.path, "--experiments", str(tmp_path / "e"),
                         "--device", "cpu", "--progress", "false", "--interpolate", "device",
                         "--device-cache-gb", "0.00001", "--max-epochs", "1"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "device_cache_gb 1e-05: the 'dwi' volume of subject" in err
    assert not any((tmp_path / "e").glob("*/checkpoint"))


@pytest.mark.parametrize("given, expected", [
    ({}, "32"), ({"amp": True}, "16-mixed"), ({"precision": "bf16-mixed"}, "bf16-mixed"),
    ({"amp": True, "precision": "16-mixed"}, "16-mixed"),
])
def test_precision_option_and_its_amp_alias(given, expected):
    assert run_precision(config(**given)) == expected


def test_precision_choices_and_contradictions_are_one_line(tmp_path, capsys):
    status = train_main(["--experiments", str(tmp_path / "e"), "--precision", "fp16"])
    assert status == 2 and "--precision: 'fp16' is not one of 32, 16-mixed, bf16-mixed" in \
        capsys.readouterr().err
    status = train_main(["--experiments", str(tmp_path / "e"), "--precision", "bf16-mixed",
                         "--amp", "true"])
    assert status == 2 and "contradicts --precision bf16-mixed" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_bench_gpu_skips_cleanly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: bench/gpu.py would run for real")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py")], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == ["bench/gpu.py: skipped, no CUDA device"]
