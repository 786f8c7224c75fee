"""Larger-than-memory check: peak RSS of a lazy training epoch does not grow with the store.

Usage::

    .venv/bin/python bench/memory.py [--quick] [--subjects 4] [--streamlines 1000]
                                     [--scale 4] [--budget-subjects 2] [--cache DIR]

Builds two phantom stores (cached under ``.cache/bench/``): 1x (``--subjects`` subjects) and
``--scale``x as many subjects, same shape and streamlines per subject. Then, in a fresh
process per store, opens it lazily with one fixed volume-cache budget (``--budget-subjects``
subjects' volumes, smaller than either store's volumes), iterates one epoch of training
batches over the train split (gather, resample, trilinear inputs; 0 workers) and reports the
child's peak RSS (``ru_maxrss``) and its RSS after the imports (the floor). In lazy mode peak
RSS should be bounded by floor + cache budget + one batch: the ``--scale``x figure must stay
within 15% of the 1x figure (PASS/MISS).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

LIMIT = 1.15
REPO = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    """Current resident set size of this process (MiB), from /proc."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build(cache: Path, subjects: int, streamlines: int, shape: tuple[int, int, int]) -> str:
    """The phantom store's path (built on first use)."""
    from tractrain.data.phantom import demo_store

    t0 = time.perf_counter()
    store = demo_store(cache, n_subjects=subjects, streamlines_per_subject=streamlines,
                       shape=shape, seed=11)
    print(f"  store {subjects} subjects: {store.path} ({time.perf_counter() - t0:.1f} s)",
          flush=True)
    return store.path


def child(args: argparse.Namespace) -> None:
    """One epoch over ``args.child`` with a fixed cache budget; prints a JSON line."""
    import numpy as np
    import torch

    from tractrain.data.augment import AugmentConfig
    from tractrain.data.dataloader import make_dataloader
    from tractrain.data.interpolation import InputConfig
    from tractrain.data.packing import SamplerConfig
    from tractrain.data.sampler import BatchSampler
    from tractrain.data.split_index import split_index
    from tractrain.data.store import open_store

    torch.set_num_threads(1)
    floor = rss_mib()
    store = open_store(args.child, lazy=True, cache_bytes=args.cache_bytes)
    volumes = sum(int(np.prod(store.volume_info(s, "dwi")["shape"])) * 4
                  for s in store.subjects)
    index = split_index(store, "train", "bundles")
    sampler = BatchSampler(index, SamplerConfig(batch_size=args.batch_size,
                                                subjects_per_batch=2), seed=0)
    loader = make_dataloader(store, sampler, group="bundles", num_workers=0,
                             augment=AugmentConfig(step_size=1.0), inputs=InputConfig("dwi"))
    t0 = time.perf_counter()
    batches = points = 0
    largest = 0
    for batch in loader:
        batches += 1
        points += batch.num_points
        largest = max(largest, batch.points.nbytes + batch.inputs.nbytes)
    print(json.dumps({
        "subjects": len(store.subjects), "train_subjects": len(index.subjects),
        "streamlines": int(index.counts.sum()), "volumes_mib": volumes / 2**20,
        "budget_mib": args.cache_bytes / 2**20, "batches": batches, "points": points,
        "batch_mib": largest / 2**20, "floor_mib": floor, "peak_mib": peak_rss_mib(),
        "cache_peak_mib": store.cache.nbytes / 2**20, "evictions": store.cache.evictions,
        "seconds": time.perf_counter() - t0,
    }), flush=True)


def measure(path: str, cache_bytes: int, batch_size: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", path, "--cache-bytes",
                          str(cache_bytes), "--batch-size", str(batch_size)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small stores (a smoke run)")
    parser.add_argument("--subjects", type=int, default=4, help="subjects of the 1x store")
    parser.add_argument("--streamlines", type=int, default=1000, help="per subject")
    parser.add_argument("--shape", type=int, nargs=3, default=(48, 48, 30))
    parser.add_argument("--scale", type=int, default=4, help="the big store has this many "
                                                             "times the subjects")
    parser.add_argument("--budget-subjects", type=float, default=2.0,
                        help="volume cache budget, in subjects' volumes")
    parser.add_argument("--batch-size", type=int, default=200, help="streamlines per batch")
    parser.add_argument("--cache", default=str(REPO / ".cache" / "bench"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cache-bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    if args.quick:
        args.subjects, args.streamlines, args.shape = 4, 200, (32, 32, 20)
    shape = tuple(args.shape)
    cache = Path(args.cache)
    print(f"building/opening phantom stores under {cache}", flush=True)
    paths = [build(cache, args.subjects * k, args.streamlines, shape) for k in (1, args.scale)]
    n_features = measure_features(paths[0])
    budget = int(args.budget_subjects * 4 * n_features * int.__mul__(*shape[:2]) * shape[2])
    rows = [measure(p, budget, args.batch_size) for p in paths]
    header = ("store", "subjects", "train", "streamlines", "volumes MiB", "budget MiB",
              "batches", "batch MiB", "floor MiB", "peak MiB", "peak-floor", "s")
    print()
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for k, r in zip((1, args.scale), rows, strict=True):
        print(" | ".join([f"{k}x", str(r["subjects"]), str(r["train_subjects"]),
                          str(r["streamlines"]), f"{r['volumes_mib']:.1f}",
                          f"{r['budget_mib']:.1f}", str(r["batches"]), f"{r['batch_mib']:.2f}",
                          f"{r['floor_mib']:.0f}", f"{r['peak_mib']:.0f}",
                          f"{r['peak_mib'] - r['floor_mib']:.0f}", f"{r['seconds']:.1f}"]))
    ratio = rows[1]["peak_mib"] / rows[0]["peak_mib"]
    verdict = "PASS" if ratio <= LIMIT else "MISS"
    print(f"\npeak RSS {args.scale}x / 1x = {ratio:.3f} ({verdict}, limit {LIMIT})")
    return 0


def measure_features(path: str) -> int:
    from tractrain.data.store import open_store

    store = open_store(path)
    return len(store.volume_groups["dwi"]["feature_names"])


if __name__ == "__main__":
    sys.exit(main())
