"""The demo training on a CUDA GPU in each precision, against the same run on the CPU.

Each run is ``tractrain-train`` on the demo phantom (built once, cached in a temporary
folder), the same seed and options; the GPU runs interpolate on the device
(``--interpolate device``) with pinned batches (``--pin-memory true``) and ``--precision``
32, 16-mixed and bf16-mixed; the reference run is fp32 on the CPU. Printed: a Markdown table
of iterations/s, streamlines/s (the epochs' streamlines over their training time), the share
of time spent waiting for data, the final losses and the largest gap between the run's
train_loss curve and the CPU run's, then each run's train_loss per epoch.

Without CUDA it prints one line and exits 0.

Run: ``.venv/bin/python bench/gpu.py [--epochs 3] [--max-batches-train N]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

PRECISIONS = ("32", "16-mixed", "bf16-mixed")


def train(root: Path, name: str, args: argparse.Namespace, *options: str) -> dict:
    """One ``tractrain-train`` run; its logs (one value per epoch per metric)."""
    from tractrain.experiment import read_logs

    command = [sys.executable, "-m", "tractrain.bin.train", "--name", name, "--experiments",
               str(root / "exps"), "--cache-dir", str(root / "cache"), "--progress", "false",
               "--max-epochs", str(args.epochs), "--quiet", *options]
    if args.max_batches_train:
        command += ["--max-batches-train", str(args.max_batches_train)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench/gpu.py: run {name} failed:\n{done.stderr}")
    return {k: np.asarray(v, dtype=np.float64) for k, v in read_logs(root / "exps" / name).items()}


def streamlines_per_epoch(root: Path, args: argparse.Namespace) -> list[int]:
    """Training streamlines of each epoch (the samplers' own batches)."""
    from tractrain.bin.compose import DEMO_PHANTOM, sampler_config
    from tractrain.bin.options import defaults
    from tractrain.data.phantom import demo_store_paths
    from tractrain.data.sampler import BatchSampler
    from tractrain.data.split_index import split_index
    from tractrain.data.store import open_store

    config = {**defaults(), "max_batches_train": args.max_batches_train}
    store = open_store(demo_store_paths(root / "cache", **DEMO_PHANTOM)[1])
    sampler = BatchSampler(split_index(store, "train", config["group"]),
                           sampler_config(config, config["max_batches_train"]),
                           seed=config["seed"])
    return [sum(len(ids) for batch in sampler.batches(e) for _, ids in batch)
            for e in range(args.epochs)]


def row(name: str, logs: dict, streamlines: list[int], cpu: dict | None) -> str:
    seconds = logs["epoch_time"]
    iterations = logs["batches_per_s"] * seconds
    gap = "" if cpu is None else f"{np.max(np.abs(logs['train_loss'] - cpu['train_loss'])):.2e}"
    return (f"| {name} | {iterations.sum() / seconds.sum():.1f} | "
            f"{sum(streamlines) / seconds.sum():,.0f} | {np.mean(logs['data_wait_share']):.0%} | "
            f"{logs['train_loss'][-1]:.4f} | {logs['valid_loss'][-1]:.4f} | {gap} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-batches-train", type=int, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu.py: skipped, no CUDA device")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cpu = train(root, "cpu", args, "--device", "cpu")
        runs = {p: train(root, f"cuda-{p}", args, "--device", "cuda", "--interpolate", "device",
                         "--pin-memory", "true", "--precision", p) for p in PRECISIONS}
        streamlines = streamlines_per_epoch(root, args)
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"{args.epochs} epochs of the demo\n")
    print("| run | iterations/s | streamlines/s | data wait | train_loss | valid_loss | "
          "max train_loss gap to CPU |")
    print("|---|---|---|---|---|---|---|")
    print(row("cpu fp32 (workers)", cpu, streamlines, None))
    for precision, logs in runs.items():
        print(row(f"cuda {precision}", logs, streamlines, cpu))
    print("\ntrain_loss per epoch:")
    for name, logs in {"cpu": cpu, **{f"cuda {p}": v for p, v in runs.items()}}.items():
        print(f"  {name}: " + " ".join(f"{x:.4f}" for x in logs["train_loss"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
