"""Loader benchmark: streamlines/s, points/s and peak RSS of `make_dataloader` on a phantom.

Usage::

    .venv/bin/python bench/loader.py [--subjects 4] [--shape 96 96 60] [--streamlines 20000]
                                     [--batches 20] [--batch-size 1000] [--quick]
                                     [--cache DIR] [--json FILE]

Configurations (batches of 1,000 streamlines, ``--batch-size``; sampler units "streamlines",
all subjects in every batch):

- ``a``: ids only (gather, no augmentation, no inputs);
- ``b``: gather + resample to 1 mm;
- ``c``: ``b`` + split 0.5, reverse 0.5, noise 0.1 mm;
- ``d``: ``c`` + trilinear inputs at the 7-point "axes" neighbourhood (radius 1 mm);
- ``d16``: ``d`` on the store whose volume group is float16.

Each is run lazy / non-lazy with 0 and 2 DataLoader workers. Measurement choices:

- Every run happens in a fresh process forked from a driver that has only imported the
  libraries, so its peak RSS (``ru_maxrss``) is its own; an idle forked process is measured
  too, as the floor (interpreter and libraries). Worker peak RSS is the largest worker's
  ``ru_maxrss`` (``RUSAGE_CHILDREN``); it counts pages shared copy-on-write with the main
  process again.
- Warm-up: the first ``max(1, workers)`` batches are not timed (with round-robin dispatch
  every worker builds one), so lazy runs are timed with a **warm volume cache** (the steady
  state of an epoch: the volumes fit the default 2 GiB budget); lazy points are still read from
  zarr for every batch. The warm-up time (store already open, worker start included) is
  reported as "first batch s".
- streamlines/s counts the sampler's streamlines (before splitting); points/s counts the
  batch's points after augmentation (resampling).

Baselines, in the same run and on the same batch ids:

- naive loader (``bench/naive.py``): one store read per streamline (a zarr slice; for the
  non-lazy rows a slice of the points loaded in memory beforehand, as a non-lazy reference
  loader would), per-streamline Python loops for resampling, splitting, reversing and noise;
  compared with ``b`` and ``c`` at 0 workers, lazy with zarr reads, non-lazy with memory.
- bare gather (``bare_gather``): index_select of the 8 corner voxels of every neighbourhood
  point; compared with ``interpolate_inputs`` on the same points of the same ``c`` batches
  (the interpolation part of ``d`` alone), float32 and float16 volumes, one thread each, best
  of 3 interleaved repeats.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import multiprocessing as mp
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tractrain.atomic import is_complete
from tractrain.data import interpolation
from tractrain.data.augment import AugmentConfig
from tractrain.data.batch import load_batch
from tractrain.data.builder import build_store
from tractrain.data.dataloader import make_dataloader
from tractrain.data.interpolation import InputConfig, interpolate_inputs, neighborhood_offsets
from tractrain.data.packing import SamplerConfig, batch_rng
from tractrain.data.phantom import make_phantom
from tractrain.data.sampler import BatchSampler
from tractrain.data.split_index import split_index
from tractrain.data.store import open_store
from tractrain.errors import TractrainError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO / ".cache" / "bench"
GROUP, VOLUME = "bundles", "dwi"
SEED = 0
SH_ORDER = 8
NAIVE_MAX_BATCHES = 5  # the naive loader is slow: time at most this many batches
BARE_MAX_BATCHES = 5  # batches whose points feed the interpolation / bare gather comparison
BARE_REPEATS = 3  # best of, interleaved (1 with --quick)
TARGET_NAIVE = 20.0  # (b), (c) at least this many times faster than the naive loader
TARGET_BARE = 1.5  # (d) interpolation at most this many times the bare gather's time
DEFAULTS = {"subjects": 4, "shape": (96, 96, 60), "streamlines": 20000, "batches": 20,
            "batch_size": 1000}
QUICK = {"subjects": 2, "shape": (32, 32, 20), "streamlines": 2000, "batches": 2,
         "batch_size": 250}

_RESAMPLE = AugmentConfig(step_size=1.0)
_AUGMENT = AugmentConfig(step_size=1.0, split_ratio=0.5, reverse_ratio=0.5, noise_mm=0.1)
_INPUTS = InputConfig(VOLUME, neighborhood="axes", radius_mm=1.0)


@dataclass(frozen=True)
class Config:
    """One timed configuration."""

    name: str
    label: str
    augment: AugmentConfig | None
    inputs: InputConfig | None
    dtype: str = "float32"


CONFIGS = (
    Config("a", "ids only", None, None),
    Config("b", "resample 1 mm", _RESAMPLE, None),
    Config("c", "b + split/reverse/noise", _AUGMENT, None),
    Config("d", "c + 7-point inputs", _AUGMENT, _INPUTS),
    Config("d16", "d, float16 volume", _AUGMENT, _INPUTS, "float16"),
)
BY_NAME = {c.name: c for c in CONFIGS}


def _load_naive():
    """bench/ is not an installed package: load bench/naive.py by path."""
    path = Path(__file__).resolve().parent / "naive.py"
    spec = importlib.util.spec_from_file_location("tractrain_bench_naive", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- the stores


def build_stores(cache: Path, subjects: int, shape: tuple[int, int, int], streamlines: int,
                 log: Callable[[str], None] = _log) -> dict[str, Path]:
    """Phantom (SH features) and its float32 / float16 stores under ``cache``, built once.

    Returns ``{"float32": path, "float16": path}``; the folder name is keyed by the sizes.
    """
    key = f"phantom-s{subjects}-{'x'.join(map(str, shape))}-n{streamlines}-sh{SH_ORDER}"
    folder = Path(cache) / key
    root = folder / "phantom"
    if not is_complete(root):
        log(f"building phantom {root} (once)")
        names = [f"sub-{i:02d}" for i in range(subjects)]
        make_phantom(root, n_subjects=subjects, shape=tuple(shape),
                     streamlines_per_subject=streamlines, features="sh", sh_order=SH_ORDER,
                     seed=SEED, splits={"train": names}, overwrite=True, progress=log)
    stores = {}
    for dtype in ("float32", "float16"):
        path = folder / f"store-{dtype}.zarr"
        if not path.exists():  # build_store renames a finished store into place
            log(f"building store {path} (once)")
            config = json.loads((root / "config.json").read_text())
            config["groups"][VOLUME]["dtype"] = dtype
            build_store(config, path, root, force=True, progress=False)
        stores[dtype] = path
    return stores


# ------------------------------------------------------------------------ process isolation


def _child(conn, fn, args) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except TractrainError as err:  # bad input: the one-line message is enough
        conn.send(("user", str(err)))
    except BaseException:  # report anything, the parent prints it
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def in_fresh_process(fn: Callable, *args) -> dict:
    """Run ``fn(*args)`` in a forked child and return its (picklable) result."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args))
    proc.start()
    child.close()
    try:
        status, value = parent.recv()
    except EOFError:
        status, value = "error", f"child exited without a result (exit code {proc.exitcode})"
    proc.join()
    if status == "user":
        raise TractrainError(value)
    if status != "ok":
        raise RuntimeError(f"{getattr(fn, '__name__', fn)}{args}: failed in the child:\n{value}")
    return value


def _peak_rss_mb() -> tuple[float, float]:
    """(this process, largest waited-for child) peak RSS in MB (Linux ru_maxrss is in KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return own / 1024, children / 1024


def idle_rss_mb() -> float:
    """Peak RSS (MB) of a forked process that does nothing: the floor of every run's."""
    return _peak_rss_mb()[0]


def _sampler(store, n_batches: int, batch_size: int) -> BatchSampler:
    index = split_index(store, "train", GROUP)
    config = SamplerConfig(batch_size=batch_size, units="streamlines", max_batches=n_batches)
    return BatchSampler(index, config, seed=SEED)


def _count(ids) -> int:
    return int(sum(len(sub_ids) for _, sub_ids in ids))


# ------------------------------------------------------------------------------- the runs


def time_loader(store_path: str, name: str, lazy: bool, workers: int, batches: int,
                batch_size: int) -> dict:
    """Time ``batches`` batches of configuration ``name`` through `make_dataloader`."""
    config = BY_NAME[name]
    start = time.perf_counter()
    store = open_store(store_path, lazy=lazy)
    open_s = time.perf_counter() - start
    warmup = max(1, workers)
    sampler = _sampler(store, warmup + batches, batch_size)
    streamlines = [_count(ids) for ids in sampler.batches(0)]
    loader = make_dataloader(store, sampler, group=GROUP, augment=config.augment,
                             inputs=config.inputs, num_workers=workers)
    start = time.perf_counter()
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    first_s = time.perf_counter() - start
    n_streamlines = n_points = n_batches = 0
    start = time.perf_counter()
    for batch in it:
        n_streamlines += streamlines[batch.index]
        n_points += batch.num_points
        n_batches += 1
        if config.inputs is not None and batch.inputs is None:
            raise RuntimeError("configuration with inputs gave a batch without inputs")
    seconds = time.perf_counter() - start
    del it, loader
    gc.collect()
    own, worker = _peak_rss_mb()
    return {
        "config": name, "dtype": config.dtype, "lazy": lazy, "workers": workers,
        "batches": n_batches, "streamlines": n_streamlines, "points": n_points,
        "seconds": seconds, "streamlines_per_s": n_streamlines / seconds,
        "points_per_s": n_points / seconds, "first_batch_s": first_s, "open_s": open_s,
        "peak_rss_mb": own, "worker_peak_rss_mb": worker if workers else None,
    }


def time_naive(store_path: str, name: str, lazy: bool, batches: int, batch_size: int) -> dict:
    """The naive loader on the same batch ids as `time_loader` (0 workers, after batch 0):
    one zarr read per streamline if ``lazy``, else slices of the points read up front."""
    import zarr

    naive = _load_naive()
    augment = BY_NAME[name].augment
    store = open_store(store_path, lazy=True)  # streamline index and voxel sizes only
    root = zarr.open_group(store_path, mode="r")
    specs = _sampler(store, 1 + batches, batch_size).batches(0)
    arrays = {s: root[f"{s}/{GROUP}/points"] for s in store.splits["train"]}
    if not lazy:
        arrays = {s: np.asarray(a[...]) for s, a in arrays.items()}

    def load(j: int, ids) -> tuple[torch.Tensor, torch.Tensor]:
        rng = batch_rng(SEED, 0, j)
        pieces = []
        for subject, sub_ids in ids:
            offsets = store.streamline_index(subject, GROUP).offsets
            streamlines = naive.naive_gather(arrays[subject], offsets, sub_ids)
            voxel_sizes = store.streamline_info(subject, GROUP)["voxel_sizes"]
            pieces += naive.naive_augment(streamlines, augment, rng, voxel_sizes)
        lengths = torch.tensor([len(p) for p in pieces], dtype=torch.int64)
        return torch.from_numpy(np.concatenate(pieces)), lengths

    load(0, specs[0])  # warm-up: zarr handles, dipy imports
    n_streamlines = n_points = 0
    start = time.perf_counter()
    for j in range(1, len(specs)):
        points, _ = load(j, specs[j])
        n_streamlines += _count(specs[j])
        n_points += points.shape[0]
    seconds = time.perf_counter() - start
    return {"config": name, "lazy": lazy, "batches": len(specs) - 1, "streamlines": n_streamlines,
            "points": n_points, "seconds": seconds,
            "streamlines_per_s": n_streamlines / seconds, "points_per_s": n_points / seconds}


def bare_gather(volume: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Baseline of the interpolation timing: index_select of the 8 corner voxels of every point.

    Returns (M * 8, F) in the volume's dtype, no weights, rows in the order
    `interpolation.interpolate` gathers them (corner-major on CPU: row ``k * M + m`` is corner
    ``k`` of point ``m``; point-major elsewhere): the memory-bound limit of the interpolation.
    """
    lo = torch.floor(points.to(torch.float32)).to(torch.int64)
    layout = interpolation.is_corner_major(volume.device)
    index = interpolation.corner_index(lo, volume.shape[:3], layout)
    return volume.reshape(-1, volume.shape[3]).index_select(0, index)


def time_interpolation(store_path: str, dtype: str, batches: int, batch_size: int,
                       repeats: int) -> dict:
    """``interpolate_inputs`` (the interpolation of ``d``) vs ``bare_gather`` of the 8 corners
    of the same neighbourhood points, on the points of the same ``c`` batches.

    Both run single-threaded: on a shared 2-core machine OpenMP scheduling noise would
    otherwise swamp the comparison of the work done."""
    torch.set_num_threads(1)
    store = open_store(store_path, lazy=False)
    specs = _sampler(store, 1 + batches, batch_size).batches(0)[1:]
    work = []  # (volume, points, expanded points, voxel sizes) per subject and batch
    volumes = {}
    for j, ids in enumerate(specs, start=1):
        batch = load_batch(store, ids, group=GROUP, augment=_AUGMENT,
                           rng=batch_rng(SEED, 0, j))
        counts = torch.zeros(len(batch.subject_names), dtype=torch.int64)
        counts.index_add_(0, batch.subjects, batch.lengths)
        for subject, points in zip(batch.subject_names, torch.split(batch.points,
                                                                    counts.tolist()),
                                   strict=True):
            if subject not in volumes:
                volumes[subject] = torch.from_numpy(store.volume(subject, VOLUME))
            sizes = store.volume_info(subject, VOLUME)["voxel_sizes"]
            offsets = neighborhood_offsets(_INPUTS, sizes)
            m, n = points.shape[0], offsets.shape[0]
            expanded = (points.view(m, 1, 3) + offsets.view(1, n, 3)).reshape(m * n, 3)
            work.append((volumes[subject], points, expanded, sizes))

    def interp() -> None:
        for volume, points, _, sizes in work:
            interpolate_inputs(volume, points, _INPUTS, sizes)

    def bare() -> None:
        for volume, _, expanded, _ in work:
            bare_gather(volume, expanded)

    interp(), bare()  # warm-up
    interp_s, bare_s = [], []
    for _ in range(repeats):  # interleaved, best of: robust to a busy machine
        for fn, out in ((interp, interp_s), (bare, bare_s)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    points = sum(w[1].shape[0] for w in work)
    expanded = sum(w[2].shape[0] for w in work)
    return {"dtype": dtype, "batches": len(specs), "points": points,
            "interpolated_points": expanded, "interp_s": min(interp_s), "bare_s": min(bare_s),
            "bare_points_per_s": expanded / min(bare_s), "ratio": min(interp_s) / min(bare_s),
            "features": int(next(iter(volumes.values())).shape[3]), "threads": 1}


# ------------------------------------------------------------------------------- reporting


def format_table(rows: list[dict]) -> str:
    """Markdown table of `time_loader` results."""
    head = ("| config | dtype | lazy | workers | streamlines/s | points/s | peak RSS MB "
            "| worker peak RSS MB | first batch s |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        worker = "-" if r["worker_peak_rss_mb"] is None else f"{r['worker_peak_rss_mb']:.0f}"
        lines.append(
            f"| {r['config']} ({BY_NAME[r['config']].label}) | {r['dtype']} | {r['lazy']} "
            f"| {r['workers']} | {r['streamlines_per_s']:,.0f} | {r['points_per_s']:,.0f} "
            f"| {r['peak_rss_mb']:.0f} | {worker} | {r['first_batch_s']:.2f} |"
        )
    return "\n".join(lines)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def ratio_lines(rows: list[dict], naive: list[dict], bare: dict[str, dict]) -> list[str]:
    """Ratio lines with PASS/MISS: (b), (c) vs the naive loader (same config and laziness, 0
    workers); (d) vs the bare gather."""
    lines = []
    for result in naive:
        name, lazy = result["config"], result["lazy"]
        source = "zarr read" if lazy else "in-memory slice"
        for r in rows:
            if r["config"] != name or r["lazy"] != lazy or r["workers"] != 0:
                continue
            speedup = r["streamlines_per_s"] / result["streamlines_per_s"]
            lines.append(
                f"({name}) lazy={lazy} workers=0 vs naive loader ({source} per streamline): "
                f"{speedup:.1f}x "
                f"({r['streamlines_per_s']:,.0f} vs {result['streamlines_per_s']:,.1f} "
                f"streamlines/s; target >= {TARGET_NAIVE:g}x) {_verdict(speedup >= TARGET_NAIVE)}"
            )
    for dtype, result in bare.items():
        name = "d" if dtype == "float32" else "d16"
        lines.append(
            f"({name}) interpolation / bare gather, {dtype}: {result['ratio']:.2f}x "
            f"({result['interp_s']:.3f} s vs {result['bare_s']:.3f} s for "
            f"{result['interpolated_points']:,} points x 8 corners x {result['features']} "
            f"features; bare gather {result['bare_points_per_s'] / 1e6:.2f} M points/s; "
            f"target <= {TARGET_BARE:g}x) {_verdict(result['ratio'] <= TARGET_BARE)}"
        )
    return lines


# ------------------------------------------------------------------------------------- main


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, help=f"default {DEFAULTS['subjects']}")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"),
                        help=f"default {DEFAULTS['shape']}")
    parser.add_argument("--streamlines", type=int, help="per subject, default "
                        f"{DEFAULTS['streamlines']}")
    parser.add_argument("--batches", type=int, help="timed batches per configuration, "
                        f"default {DEFAULTS['batches']}")
    parser.add_argument("--batch-size", type=int, help="streamlines per batch, default "
                        f"{DEFAULTS['batch_size']}")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny sizes {QUICK} (explicit options still win)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="folder caching the phantom and stores (default %(default)s)")
    parser.add_argument("--json", type=Path, help="also save the results to this JSON file")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("subjects", "streamlines", "batches", "batch_size"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')}: expected a positive integer, "
                         f"got {getattr(args, key)}")
    args.shape = tuple(args.shape)
    return args


def main(argv: list[str] | None = None) -> int:
    """Build (or reuse) the stores, time every configuration and both baselines, report."""
    args = _parse(argv)
    try:
        return _run(args)
    except TractrainError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    stores = in_fresh_process(build_stores, args.cache, args.subjects, args.shape,
                              args.streamlines)
    total = args.subjects * args.streamlines
    available = total // args.batch_size  # full batches in an epoch
    batches = min(args.batches, max(1, available - 2))
    if batches < args.batches:
        _log(f"note: {total} streamlines give only {available} batches; timing {batches} "
             "per configuration")
    base_rss = in_fresh_process(idle_rss_mb)
    load = os.getloadavg()
    _log(f"stores: {stores['float32'].parent}; idle process peak RSS {base_rss:.0f} MB; "
         f"load average {load[0]:.2f}")
    rows = []
    for config in CONFIGS:
        for lazy in (True, False):
            for workers in (0, 2):
                row = in_fresh_process(time_loader, str(stores[config.dtype]), config.name,
                                       lazy, workers, batches, args.batch_size)
                _log(f"{config.name} lazy={lazy} workers={workers}: "
                     f"{row['streamlines_per_s']:,.0f} streamlines/s")
                rows.append(row)
    naive = []
    for name in ("b", "c"):
        for lazy in (True, False):
            naive.append(in_fresh_process(time_naive, str(stores["float32"]), name, lazy,
                                          min(batches, NAIVE_MAX_BATCHES), args.batch_size))
            _log(f"naive {name} lazy={lazy}: {naive[-1]['streamlines_per_s']:,.1f} "
                 "streamlines/s")
    repeats = 1 if args.quick else BARE_REPEATS
    bare = {dtype: in_fresh_process(time_interpolation, str(stores[dtype]), dtype,
                                    min(batches, BARE_MAX_BATCHES), args.batch_size, repeats)
            for dtype in ("float32", "float16")}
    end_load = os.getloadavg()

    print(f"\n## Loader benchmark: {args.subjects} subjects, {'x'.join(map(str, args.shape))} "
          f"volumes, {args.streamlines:,} streamlines each, {batches} timed batches of "
          f"{args.batch_size:,} streamlines; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads at 0 workers), {os.cpu_count()} CPUs, "
          f"load average {load[0]:.2f} -> {end_load[0]:.2f}\n")
    print(format_table(rows))
    print(f"\nEach run is a fresh forked process; an idle one peaks at {base_rss:.0f} MB RSS "
          "(interpreter, torch, zarr, dipy). Worker RSS counts pages shared with the main "
          "process again. Lazy runs are timed with a warm volume cache.\n")
    for line in ratio_lines(rows, naive, bare):
        print(line)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "sizes": {"subjects": args.subjects, "shape": list(args.shape),
                      "streamlines": args.streamlines, "batches": batches,
                      "batch_size": args.batch_size},
            "idle_rss_mb": base_rss, "load_average": [load[0], end_load[0]],
            "loader": rows, "naive": naive, "bare_gather": bare,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
