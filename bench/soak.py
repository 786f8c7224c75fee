"""Soak: many epochs of a tiny model, checkpoint every epoch; RSS must stay flat (growth under
5% after warm-up) and the experiment folder bounded (one checkpoint, one best model).

    python -m tractrain.bench.soak [--epochs 200] [--out DIR]   (or python bench/soak.py)

Prints the RSS after warm-up and at the end, the growth in percent, and the folder size at
the first and the last epoch; exits 1 if a limit is exceeded.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Events
from torch.utils.data import DataLoader, Dataset

from tractrain.data.batch import Batch
from tractrain.data.packing import SamplerConfig
from tractrain.data.sampler import BatchSampler
from tractrain.data.split_index import SplitIndex
from tractrain.engine.fit import train_and_validate


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Lines(Dataset):
    """Straight noisy streamlines made from a batch spec (deterministic per batch)."""

    def __getitem__(self, spec):
        rng = spec.rng()
        n = sum(len(ids) for _, ids in spec.ids) * 8
        t = torch.arange(n, dtype=torch.float32)[:, None]
        points = torch.cat([t, 0.5 * t, torch.as_tensor(rng.normal(0, 0.1, (n, 1)),
                                                       dtype=torch.float32)], 1)
        k = n // 8
        return Batch(points=points, lengths=torch.full((k,), 8),
                     subjects=torch.zeros(k, dtype=torch.long), streamline_ids=torch.arange(k),
                     subject_names=("s0",),
                     inputs=torch.sin(points), epoch=spec.epoch, index=spec.index)


def loss_fn(model, batch):
    pred = model(batch.inputs[:-1])
    target = batch.points[1:] - batch.points[:-1]
    return (1 - torch.nn.functional.cosine_similarity(pred, target, dim=1)).mean(), len(pred)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20, help="epochs before the RSS baseline")
    parser.add_argument("--out", help="experiment parent folder (default: a temporary one)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    lengths = (np.full(64, 8, dtype=np.int64),)
    index = SplitIndex(split="train", group="g", subjects=("s0",), lengths=lengths,
                       lengths_mm=(lengths[0].astype(np.float32),))
    sampler = BatchSampler(index, SamplerConfig(batch_size=16), seed=0)
    vsampler = BatchSampler(index, SamplerConfig(batch_size=32), seed=0, shuffle=False)
    kw = dict(batch_size=None, collate_fn=lambda b: b)
    train = DataLoader(Lines(), sampler=sampler, **kw)
    valid = DataLoader(Lines(), sampler=vsampler, **kw)
    with tempfile.TemporaryDirectory() as tmp:
        exp = Path(args.out or tmp) / "soak"
        samples: dict[int, tuple[int, int]] = {}

        def record(engine):
            samples[engine.state.epoch] = (rss_bytes(), folder_bytes(exp))

        from tractrain.engine import train as train_module

        original = train_module.Checkpoint.attach

        def attach(self, trainer):  # sample after the epoch's checkpoint is written
            result = original(self, trainer)
            trainer.add_event_handler(Events.EPOCH_COMPLETED, record)
            return result

        train_module.Checkpoint.attach = attach
        try:
            train_and_validate(model, optimizer, loss_fn, train, valid_loader=valid,
                               exp_dir=exp, max_epochs=args.epochs, progress=False,
                               handle_signals=False, lr_schedule="1e-3")
        finally:
            train_module.Checkpoint.attach = original
        warm = min(args.warmup, args.epochs)
        rss0, size0 = samples[warm]
        rss1, size1 = samples[args.epochs]
        growth = 100.0 * (rss1 - rss0) / rss0
        print(f"epochs {args.epochs}, checkpoint every epoch")
        print(f"RSS after epoch {warm}: {rss0 / 2**20:.1f} MiB, after epoch {args.epochs}: "
              f"{rss1 / 2**20:.1f} MiB, growth {growth:+.2f}%")
        print(f"experiment folder: {samples[1][1] / 1024:.1f} KiB after epoch 1, "
              f"{size1 / 1024:.1f} KiB after epoch {args.epochs}")
        print("checkpoint folders:", sorted(p.name for p in exp.iterdir() if p.is_dir()))
        bounded = size1 < 4 * size0 + 2**20  # logs grow by one value per epoch only
        return 0 if growth < 5.0 and bounded else 1


if __name__ == "__main__":
    sys.exit(main())
