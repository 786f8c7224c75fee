"""Building (or importing) a store's subjects in parallel processes: ``--jobs N`` of
`tractrain-build-store` and `tractrain-import-hdf5`.

`run_subjects` runs a per-subject function either in this process, in order (``jobs == 1``,
the sequential path), or in a `concurrent.futures.ProcessPoolExecutor`. Each worker writes its
own subject's group into the staged store (zarr groups of subjects are independent files); the
caller's ``on_result`` sees the results in the subjects' order whatever the completion order,
and the parent writes the root metadata once, after all subjects, so the store is the same
for any ``jobs``. Workers are started with the ``spawn`` method: a fresh interpreter that
inherits none of the parent's threads (zarr's event loop, torch's and BLAS' pools) nor its
open files, which ``fork`` would copy in an unknown state; it costs about a second per worker,
once per build (workers are reused across subjects). On the first error, pending subjects are
cancelled and running workers terminated before the error is re-raised, so the staged folder
can be removed with nothing still writing into it. As with any ``spawn`` pool, a script that
calls `build_store` or `import_hdf5` with ``jobs`` > 1 must guard its entry point with
``if __name__ == "__main__":`` (the workers import the main module).

`choose_jobs` caps the number of workers so that that many subjects fit in the available
memory, from a per-subject peak estimated from the input sizes (`build_peak_bytes`,
`import_peak_bytes`): written here because no library estimates the memory of our own
pipeline.
"""

from __future__ import annotations

import glob
import logging
import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from tqdm import tqdm

LOG = logging.getLogger("tractrain.data.parallel_build")

WORKER_BASE_BYTES = 200 * 2**20  # a worker interpreter with numpy, nibabel, zarr, h5py
VOLUME_FACTOR = 8  # builder: float32 volume -> concatenated, float64 in-mask copy, output...
STREAMLINE_FACTOR = 8  # builder: tractogram file bytes -> float32, float64 lengths, voxels...
SLAB_FACTOR = 3  # importer: one slab read, cast and checked
BATCH_BYTES = 2**20 * 12 * 8  # importer: one batch of `BATCH_POINTS` points and its copies
# by default, a build whose subjects together need less than this (beyond the interpreter)
# runs in this process: starting workers would take longer than the build
SMALL_BUILD_BYTES = 512 * 2**20
BLAS_THREADS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def cpu_count() -> int:
    """Cores this process may run on (``os.process_cpu_count`` on Python 3.13+, else the
    scheduler affinity, else ``os.cpu_count``)."""
    counter = getattr(os, "process_cpu_count", None)
    if counter is not None:
        return counter() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def available_memory() -> int | None:
    """Bytes of memory available to new processes (psutil, else ``MemAvailable`` of
    /proc/meminfo); None when unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except (ImportError, OSError):
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def choose_jobs(requested: int | None, n_subjects: int, peak_bytes: int,
                available: int | None, cores: int) -> int:
    """Workers to start: ``requested`` (None: ``cores``, or 1 for a small build: see
    `SMALL_BUILD_BYTES`), at most one per subject and at most as many as subjects of
    ``peak_bytes`` fit in ``available`` memory (unknown: no cap); at least 1. A cap below an
    explicit request is logged as a warning."""
    if requested is None and n_subjects * (peak_bytes - WORKER_BASE_BYTES) < SMALL_BUILD_BYTES:
        return 1
    jobs = max(1, min(requested or cores, n_subjects))
    if available is not None and peak_bytes > 0:
        fit = max(1, available // peak_bytes)
        if fit < jobs:
            log = LOG.warning if requested else LOG.info
            log("%d parallel jobs instead of %d: a subject needs about %.1f GiB, %.1f GiB of "
                "memory is available", fit, jobs, peak_bytes / 2**30, available / 2**30)
            jobs = int(fit)
    return jobs


def _nifti_bytes(path: str) -> int:
    import nibabel as nib
    import numpy as np

    try:
        return int(np.prod(nib.load(path).shape)) * 4  # float32 in memory
    except Exception:  # an unreadable file fails in the build itself, with its own message
        return 0


def build_peak_bytes(root: Path, subjects: Sequence[str], config: dict) -> int:
    """Estimated peak memory of building one subject (the largest) of ``config`` (a validated
    builder config) from the headers and sizes of its files: groups are built one at a time."""
    peak = 0
    for subject in subjects:
        for group in config["groups"].values():
            paths = [p for pattern in group["files"]
                     for p in glob.glob(str(root / subject / pattern))]
            if group["type"] == "volume":
                size = VOLUME_FACTOR * sum(_nifti_bytes(p) for p in paths)
            else:
                size = STREAMLINE_FACTOR * sum(os.path.getsize(p) for p in paths
                                               if os.path.isfile(p))
            peak = max(peak, size)
    return WORKER_BASE_BYTES + peak


def import_peak_bytes(f, subjects: Sequence[str]) -> int:
    """Estimated peak memory of importing one subject of the open dwi_ml HDF5 file ``f``: the
    importer streams one volume slab or one batch of points at a time, plus a streamline
    group's offsets and lengths."""
    from tractrain.data.store_writer import VOLUME_CHUNK

    peak = 0
    for subject in subjects:
        for name in f[subject]:
            data = f[subject][name].get("data")
            shape = getattr(data, "shape", ())
            if len(shape) == 4:  # a volume: (X, Y, Z, F)
                size = SLAB_FACTOR * VOLUME_CHUNK * shape[1] * shape[2] * shape[3] * 4
            else:
                lengths = f[subject][name].get("lengths")
                size = BATCH_BYTES + 4 * 8 * int(getattr(lengths, "shape", (0,))[0])
            peak = max(peak, size)
    return WORKER_BASE_BYTES + peak


def _init_worker(threads: int) -> None:
    """Worker start-up, before numpy is imported: at most ``threads`` BLAS/OpenMP threads
    (the cores shared among the workers; numpy's default, one per core in every worker,
    oversubscribes the machine and made a 2-job build slower than one), unless set by the
    user's environment."""
    for name in BLAS_THREADS:
        os.environ.setdefault(name, str(threads))


def _stop(pool: ProcessPoolExecutor, futures: Sequence[Future]) -> None:
    """Cancel pending subjects and terminate running workers, then wait for them to exit."""
    for future in futures:
        future.cancel()
    terminate = getattr(pool, "terminate_workers", None)  # Python 3.14+
    if terminate is not None:
        terminate()
    else:
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


def run_subjects(subjects: Sequence[str], work: Callable[[str], Any], jobs: int,
                 on_result: Callable[[str, Any], None], desc: str,
                 progress: bool | None = True) -> None:
    """Call ``work(subject)`` for every subject (``jobs`` > 1: in that many spawned
    processes; ``work`` must then be picklable, e.g. a `functools.partial` of a module-level
    function) and ``on_result(subject, result)`` here, in the order of ``subjects``. The
    first error (in ``work`` or ``on_result``) stops the others and is re-raised as it was
    raised; a worker killed from outside raises `ChildProcessError` (exit status 1 of a command).
    A progress bar (``progress``; None: when stderr is a terminal) counts subjects done."""
    bar = tqdm(total=len(subjects), desc=desc, unit="subject", file=sys.stderr,
               disable=None if progress is None else not progress)
    try:
        if jobs <= 1 or len(subjects) <= 1:
            for subject in subjects:
                bar.set_postfix_str(subject)
                result = work(subject)
                bar.update()
                on_result(subject, result)
            return
        _run_pool(subjects, work, jobs, on_result, bar)
    finally:
        bar.close()


def _run_pool(subjects: Sequence[str], work: Callable[[str], Any], jobs: int,
              on_result: Callable[[str, Any], None], bar: tqdm) -> None:
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(max(1, cpu_count() // jobs),))
    futures: dict[Future, str] = {}
    try:
        futures = {pool.submit(work, subject): subject for subject in subjects}
        results: dict[str, Any] = {}
        pending, following = set(futures), 0
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=lambda d: subjects.index(futures[d])):
                subject = futures[future]
                try:
                    results[subject] = future.result()
                except BrokenProcessPool:
                    raise ChildProcessError(
                        f"subject {subject} (or another one built at the same time): its worker "
                        "process died (killed from outside, often by the out-of-memory killer); "
                        "retry with fewer --jobs") from None
                bar.update()
                bar.set_postfix_str(subject)
            while following < len(subjects) and subjects[following] in results:
                subject = subjects[following]
                on_result(subject, results.pop(subject))
                following += 1
    except BaseException:
        _stop(pool, list(futures))
        raise
    pool.shutdown(wait=True)
