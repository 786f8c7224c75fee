"""Import benchmark: time and peak RSS of `tractrain-import-hdf5` on a generated dwi_ml-layout
HDF5 file (about 1 GB by default), against the size of its largest subject.

Usage::

    .venv/bin/python bench/import_hdf5.py [--subjects 4] [--shape 96 96 60] [--features 64]
                                          [--streamlines 200000] [--points 50] [--quick]
                                          [--dir DIR] [--json FILE]

The file follows the layout dwi_ml's ``dwiml_create_hdf5_dataset`` writes (see
docs/store-format.md, and the real file in tests/data/dwi_ml-a1ee02d), written here with h5py
slab by slab (random volumes, random-walk streamlines) so that generating it is bounded in
memory too; it is not made by dwi_ml (that would need dwi_ml's own venv and hours at this
size). The import runs in a fresh interpreter (``python -m tractrain.bin.import_hdf5``); its
peak RSS is that child's ``VmHWM`` (``/proc/self/status``: since its exec, unlike
``ru_maxrss``, which Linux carries over from the parent through fork and exec). A child that
only imports the same modules is measured as the floor (Linux only). The claim checked: peak
RSS below twice the largest subject's bytes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np


def write_file(path: Path, subjects: int, shape: tuple[int, int, int], features: int,
               streamlines: int, points: int, seed: int = 0) -> int:
    """Write a dwi_ml-layout HDF5; return the largest subject's bytes."""
    rng = np.random.default_rng(seed)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    ids = [f"sub-{i:02d}" for i in range(subjects)]
    with h5py.File(path, "w") as f:
        f.attrs["training_subjs"] = ids[:-1] if subjects > 1 else ids
        f.attrs["validation_subjs"] = ids[-1:] if subjects > 1 else []
        f.attrs["testing_subjs"] = []
        f.attrs["groups_config"] = str({
            "dwi": {"type": "volume", "files": ["dwi.nii.gz"], "standardization": "all"},
            "bundles": {"type": "streamlines", "files": ["*.trk"]}})
        for key in ("step_size", "nb_points", "compress"):
            f.attrs[key] = "Not defined by user"
        for s in ids:
            vol = f.create_group(f"{s}/dwi")
            vol.attrs.update({"type": "volume", "affine": affine, "voxres": np.full(3, 2.0),
                              "nb_features": features})
            data = vol.create_dataset("data", shape=(*shape, features), dtype=np.float32)
            for x in range(shape[0]):
                data[x] = rng.standard_normal((*shape[1:], features), dtype=np.float32)
            grp = f.create_group(f"{s}/bundles")
            grp.attrs.update({"type": "streamlines", "affine": affine,
                              "dimensions": np.asarray(shape, np.int16),
                              "voxel_sizes": np.full(3, 2.0, np.float32),
                              "voxel_order": "RAS", "space": "Space.VOX",
                              "origin": "Origin.TRACKVIS"})
            lengths = np.full(streamlines, points, np.int64)
            grp["lengths"] = lengths
            grp["offsets"] = np.arange(streamlines, dtype=np.int64) * points
            mm = grp.create_dataset("euclidean_lengths", shape=(streamlines,), dtype=np.float32)
            pts = grp.create_dataset("data", shape=(streamlines * points, 3), dtype=np.float32)
            step = 20_000
            for a in range(0, streamlines, step):
                n = min(step, streamlines - a)
                start = rng.uniform(5, np.asarray(shape) - 5, (n, 1, 3))
                walk = np.cumsum(rng.normal(0, 0.2, (n, points, 3)), axis=1)
                pts[a * points:(a + n) * points] = (start + walk).reshape(-1, 3)
                mm[a:a + n] = 2.0 * np.linalg.norm(np.diff(walk, axis=1), axis=2).sum(1)
            grp.create_group("data_per_streamline")
    return int(np.prod(shape)) * features * 4 + streamlines * points * 12 + streamlines * 20


def child(args: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of running module ``args[0]`` with arguments ``args[1:]`` in
    a fresh process; exits if it fails."""
    start = time.perf_counter()
    code = ("import runpy, sys; sys.argv = sys.argv[1:]; status = 0\n"
            "try:\n    runpy.run_module(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as e:\n    status = e.code or 0\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
            "print('RSS', hwm[0].split()[1], file=sys.stderr)\n"
            "sys.exit(status)")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    rss = [int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("RSS ")]
    if done.returncode != 0:
        sys.exit(f"{args[0]} failed: {done.stderr.strip()}")
    return seconds, (rss[-1] if rss else 0) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=(96, 96, 60))
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--streamlines", type=int, default=200_000)
    parser.add_argument("--points", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="a small file (about 30 MB)")
    parser.add_argument("--dir", help="work folder (default: a temporary one)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.subjects, args.shape, args.features, args.streamlines = 2, (32, 32, 20), 16, 20_000
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-import-"))
    work.mkdir(parents=True, exist_ok=True)
    src, out = work / "in.hdf5", work / "out.zarr"
    try:
        t0 = time.perf_counter()
        largest = write_file(src, args.subjects, tuple(args.shape), args.features,
                             args.streamlines, args.points)
        made = time.perf_counter() - t0
        floor = child(["tractrain.data.import_hdf5"])[1]  # imports only
        seconds, rss = child(["tractrain.bin.import_hdf5", str(src), str(out),
                                 "--progress", "false", "--force"])
        result = {"file_bytes": src.stat().st_size, "largest_subject_bytes": largest,
                  "generate_s": round(made, 1), "import_s": round(seconds, 1),
                  "peak_rss_bytes": rss, "floor_rss_bytes": floor,
                  "rss_over_largest_subject": round(rss / largest, 2),
                  "mb_per_s": round(src.stat().st_size / 2**20 / seconds, 1)}
        print(json.dumps(result, indent=1))
        print(f"peak RSS {rss / 2**20:.0f} MiB ({rss / largest:.2f}x the largest subject, "
              f"{largest / 2**20:.0f} MiB; interpreter + libraries {floor / 2**20:.0f} MiB); "
              f"{src.stat().st_size / 2**30:.2f} GiB imported in {seconds:.1f} s")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
        else:
            src.unlink(missing_ok=True)
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
