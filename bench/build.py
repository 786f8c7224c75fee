"""Build benchmark: streamlines/s of `tractrain-build-store` with ``--jobs 1`` and ``--jobs N``
(N: the cores) on a phantom of at least 2 x 200,000 streamlines, and a check that the two
stores are identical.

Usage::

    .venv/bin/python bench/build.py [--subjects 2] [--streamlines 200000] [--jobs N]
                                    [--quick] [--dir DIR] [--json FILE]

The phantom is `tractrain.data.phantom.make_phantom` (its default 32 x 32 x 20 volumes, so the
build time is dominated by the streamlines: reading the .trk files, the space check, arc
lengths, voxel coordinates, writing the points). Each build runs in a fresh interpreter
(``python -m tractrain.bin.build_store``), so the times include starting Python and, with
N > 1, the worker processes. The stores are compared file by file (`store_differences`):
every array chunk and attribute byte for byte, except the root's ``provenance.created``
timestamp, which differs between any two builds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def store_differences(a: str | os.PathLike, b: str | os.PathLike) -> list[str]:
    """What differs between the stores (folders) ``a`` and ``b``: files only in one, files
    whose bytes differ, except the root ``zarr.json`` whose attributes are compared without
    ``provenance.created``. Empty when the stores are identical."""
    a, b = Path(a), Path(b)
    files = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    theirs = {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    found = [f"{p}: only in {a if p in files else b}" for p in sorted(files ^ theirs)]
    for rel in sorted(files & theirs):
        one, two = (a / rel).read_bytes(), (b / rel).read_bytes()
        if rel == Path("zarr.json"):
            one, two = (json.loads(x) for x in (one, two))
            for meta in (one, two):
                meta.get("attributes", {}).get("provenance", {}).pop("created", None)
        if one != two:
            found.append(f"{rel}: differs")
    return found


def build(config: Path, out: Path, jobs: int) -> float:
    """Seconds to build ``out`` from ``config`` with ``--jobs jobs`` in a fresh interpreter."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tractrain.bin.build_store", str(config),
                           str(out), "--jobs", str(jobs), "--quiet", "--force"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"build with --jobs {jobs} failed: {done.stderr.strip()}")
    return time.perf_counter() - start


def main() -> None:
    from tractrain.data.parallel_build import cpu_count
    from tractrain.data.phantom import make_phantom

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=2)
    parser.add_argument("--streamlines", type=int, default=200_000, help="per subject")
    parser.add_argument("--jobs", type=int, default=cpu_count(), help="N (default: the cores)")
    parser.add_argument("--quick", action="store_true", help="2 x 2,000 streamlines")
    parser.add_argument("--dir", help="work folder, kept (default: a temporary one)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.streamlines = 2_000
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-build-"))
    try:
        raw = work / "phantom"
        t0 = time.perf_counter()
        if not (raw / "config.json").is_file():
            make_phantom(raw, n_subjects=args.subjects, streamlines_per_subject=args.streamlines,
                         snr=None, overwrite=True)
        made = time.perf_counter() - t0
        total = args.subjects * args.streamlines
        rows = []
        for jobs in dict.fromkeys((1, args.jobs)):
            seconds = build(raw / "config.json", work / f"jobs{jobs}.zarr", jobs)
            rows.append({"jobs": jobs, "seconds": round(seconds, 2),
                         "streamlines_per_s": round(total / seconds)})
        diff = store_differences(work / "jobs1.zarr", work / f"jobs{args.jobs}.zarr")
        result = {"subjects": args.subjects, "streamlines": total, "cores": cpu_count(),
                  "phantom_s": round(made, 1), "rows": rows,
                  "ratio": round(rows[0]["seconds"] / rows[-1]["seconds"], 2),
                  "identical": not diff}
        print(f"{args.subjects} subjects x {args.streamlines} streamlines, {cpu_count()} cores")
        print("| --jobs | seconds | streamlines/s |\n|---:|---:|---:|")
        for row in rows:
            print(f"| {row['jobs']} | {row['seconds']:.1f} | {row['streamlines_per_s']:,} |")
        print(f"ratio (--jobs 1 time / --jobs {args.jobs} time): {result['ratio']:.2f}; stores "
              f"{'identical' if not diff else 'DIFFER: ' + '; '.join(diff[:5])}")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        if diff:
            sys.exit(1)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
