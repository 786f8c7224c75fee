"""Import a dwi_ml HDF5 file into a tractrain store (`import_hdf5`).

Every subject of the file's train/valid/test split attributes, every group: volumes are copied
slab by slab (32 voxels along x), streamlines in batches of at most `BATCH_POINTS` points,
converted from dwi_ml's voxel coordinates (its recorded space and origin: by default voxels
with the TrackVis corner origin) to tractrain's voxel-centre coordinates, arc lengths measured
in RAS+ mm as the builder does. So memory stays bounded by one slab and one batch, whatever
the file's size. The layout is checked for every subject before anything is written
(`tractrain.data.dwi_ml_hdf5`); the store is written through `tractrain.data.store_writer`
(temporary folder, renamed into place at the end).

dwi_ml does not record its standardization statistics, only the mode and mask (its group
config): volumes are copied as stored (dwi_ml standardizes every voxel with the in-mask
statistics) and the store's ``standardization`` attribute says so, with ``means``/``stds``
null.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import h5py
import numpy as np
import zarr

from tractrain.data.builder import lengths_mm
from tractrain.data.dwi_ml_hdf5 import (
    check_streamlines,
    check_volume,
    group_kind,
    jsonable,
    open_hdf5,
    read_root,
    to_voxel_centre,
)
from tractrain.data.format import MAX_ARRAY_BYTES, SPLITS, is_plain_name
from tractrain.data.parallel_build import (
    available_memory,
    choose_jobs,
    cpu_count,
    import_peak_bytes,
    run_subjects,
)
from tractrain.data.store_writer import (
    VOLUME_CHUNK,
    check_replaceable,
    finish_store,
    staged_store,
    streamline_arrays,
    volume_array,
)
from tractrain.errors import StoreError

BATCH_POINTS = 2**20  # streamline points converted at a time
LOG = logging.getLogger("tractrain.data.import_hdf5")

# check_points(subject, group, voxel points (centre origin) or None at the group's end, dims):
# called for every batch of a streamline group, then once with None. The space check
# ("points outside the volume", --allow-outside) plugs in here.
PointCheck = Callable[[str, str, "np.ndarray | None", list[int]], None]


def _feature_names(name: str, settings: dict, n_features: int) -> list[str]:
    """Feature names as the builder would give them: from the group's one file (``dwi`` or
    ``dwi_<i>``), else ``<group>_<i>``."""
    files = settings.get("files")
    files = [files] if isinstance(files, str) else files
    stem = name
    if isinstance(files, list) and len(files) == 1 and isinstance(files[0], str) \
            and "*" not in files[0]:
        stem = Path(files[0]).name
        for ext in (".nii.gz", ".nii", ".mgz"):
            if stem.endswith(ext):
                stem = stem[: -len(ext)]
    return [stem] if n_features == 1 else [f"{stem}_{i}" for i in range(n_features)]


def _layout(f: h5py.File, path: Path, subjects: list[str], config: dict,
            max_bytes: int) -> dict:
    """Check every subject's groups (metadata, offsets and lengths; no bulk data) and return
    the store's group metadata: ``volume_groups`` and ``streamline_groups``."""
    meta: dict = {"volume_groups": {}, "streamline_groups": {}}
    names: list[str] | None = None
    for subject in subjects:
        where = f"{path}: {subject}"
        mine = sorted(f[subject])
        bad = [g for g in mine if not is_plain_name(g)]
        if bad:
            raise StoreError(f"{where}/{bad[0]}: not a usable group name")
        if names is None:
            names = mine
        elif mine != names:
            raise StoreError(f"{where}: groups {mine} differ from {subjects[0]}'s {names} "
                             "(every subject must have the same groups)")
        for name in mine:
            at = f"{where}/{name}"
            if group_kind(f[subject], name, where) == "volume":
                vol = check_volume(f[subject][name], at, max_bytes)
                dtype = "float16" if vol.dtype == "float16" else "float32"
                names_f = _feature_names(name, config.get(name, {}), vol.shape[3])
                seen = meta["volume_groups"].setdefault(
                    name, {"feature_names": names_f, "n_features": vol.shape[3], "dtype": dtype})
                if name in meta["streamline_groups"] or seen["n_features"] != vol.shape[3] \
                        or seen["dtype"] != dtype:
                    raise StoreError(f"{at}: {vol.shape[3]} {vol.dtype} features, differs from "
                                     f"{subjects[0]}'s group (every subject must match)")
            else:
                keys = sorted(check_streamlines(f[subject][name], at, max_bytes).dps)
                seen = meta["streamline_groups"].setdefault(name, {"dps_keys": keys})
                if name in meta["volume_groups"] or seen["dps_keys"] != keys:
                    raise StoreError(f"{at}: data per streamline {keys} differ from "
                                     f"{subjects[0]}'s {seen.get('dps_keys')}")
    if not names:
        raise StoreError(f"{path}: subject {subjects[0]!r} has no group")
    return meta


def _copy_volume(src: h5py.Group, dst: zarr.Group, name: str, where: str, meta: dict,
                 settings: dict) -> None:
    vol = check_volume(src, where)
    arr = volume_array(dst, name, vol.shape, meta["dtype"], {
        "affine": vol.affine.tolist(),
        "voxel_sizes": vol.voxel_sizes.tolist(),
        "feature_names": meta["feature_names"],
        "standardization": {"mode": settings.get("standardization"), "means": None,
                            "stds": None, "mask": settings.get("std_mask"),
                            "applied_by": "dwi_ml"},
    })
    data = src["data"]
    for x0 in range(0, vol.shape[0], VOLUME_CHUNK):
        slab = np.asarray(data[x0:x0 + VOLUME_CHUNK], dtype=meta["dtype"])
        if not np.isfinite(slab).all():
            raise StoreError(f"{where}/data: {int((~np.isfinite(slab)).sum())} NaN/inf values "
                             f"(in x {x0}..{x0 + slab.shape[0] - 1}; expected finite values)")
        arr[x0:x0 + slab.shape[0]] = slab


def _copy_streamlines(src: h5py.Group, dst: zarr.Group, name: str, where: str,
                      subject: str, check_points: PointCheck | None) -> None:
    info = check_streamlines(src, where)
    n = info.lengths.shape[0]
    arrays = streamline_arrays(dst, name, info.n_points, n, info.dps, {
        "affine": info.affine.tolist(), "dimensions": info.dimensions,
        "voxel_sizes": info.voxel_sizes.tolist(), "space": "voxel", "origin": "center",
        "reference": None, "n_streamlines": int(n), "dps_keys": sorted(info.dps),
        "imported_from": {"space": info.space, "origin": info.origin,
                          "voxel_order": info.voxel_order}})
    arrays["offsets"][...] = info.offsets
    arrays["lengths"][...] = info.lengths
    data, recorded = src["data"], src["euclidean_lengths"]
    s0 = 0
    while s0 < n:
        limit = info.offsets[s0] + BATCH_POINTS
        s1 = max(s0 + 1, int(np.searchsorted(info.offsets, limit, side="right")) - 1)
        a, b = int(info.offsets[s0]), int(info.offsets[s1])
        points = np.asarray(data[a:b])
        if not np.isfinite(points).all():
            raise StoreError(f"{where}/data: NaN/inf coordinates in streamlines {s0}..{s1 - 1}")
        voxels = to_voxel_centre(points, info)
        ras = voxels @ info.affine[:3, :3].T + info.affine[:3, 3]
        mm = lengths_mm(ras, info.lengths[s0:s1])
        theirs = np.asarray(recorded[s0:s1], dtype=np.float64)
        if not np.allclose(mm, theirs, rtol=1e-3, atol=1e-2):
            LOG.warning("%s/euclidean_lengths: differ from the points' arc lengths (kept the "
                        "arc lengths measured from the points)", where)
        arrays["points"][a:b] = voxels.astype(np.float32)
        arrays["lengths_mm"][s0:s1] = mm
        if check_points is not None:
            check_points(subject, name, voxels, info.dimensions)
        s0 = s1
    if check_points is not None:
        check_points(subject, name, None, info.dimensions)
    for key in info.dps:
        arrays[f"dps/{key}"][...] = src["data_per_streamline"][key][()]


def import_subject(src: str, staged: str, meta: dict, config: dict,
                   check_points: PointCheck | None, subject: str) -> None:
    """Copy ``subject`` of the dwi_ml file ``src`` into the store being written at ``staged``
    (``meta``: `_layout`'s). Runs in a worker process with ``--jobs`` > 1
    (`tractrain.data.parallel_build`)."""
    with open_hdf5(Path(src)) as f:
        grp = zarr.open_group(staged, mode="r+").create_group(subject)
        for name, vmeta in meta["volume_groups"].items():
            _copy_volume(f[subject][name], grp, name, f"{src}: {subject}/{name}", vmeta,
                         config.get(name, {}))
        for name in meta["streamline_groups"]:
            _copy_streamlines(f[subject][name], grp, name, f"{src}: {subject}/{name}",
                              subject, check_points)


def import_hdf5(src: str | Path, out: str | Path, force: bool = False,
                progress: bool | None = None, max_array_bytes: int = MAX_ARRAY_BYTES,
                check_points: PointCheck | None = None, jobs: int | None = 1) -> Path:
    """Convert the dwi_ml HDF5 file ``src`` into a store at ``out``; return ``out``.

    `StoreError` (nothing written at ``out``) for a file that is not a dwi_ml HDF5 file or
    holds something a store cannot represent; `FileExistsError` for an existing ``out``
    without ``force`` (or one that is not a store). ``progress``: a bar per subject (None:
    when stderr is a terminal). ``check_points``: see `PointCheck` (with ``jobs`` > 1 each
    worker gets a copy). ``jobs``: subjects imported in parallel processes (None: one per
    core, capped by memory; `tractrain.data.parallel_build`).
    """
    src, out = Path(src), Path(out)
    check_replaceable(out, force)
    with open_hdf5(src) as f:
        splits, config, creation = read_root(f, src)
        subjects = [s for split in SPLITS for s in splits[split]]
        meta = _layout(f, src, subjects, config, max_array_bytes)
        stat = src.stat()
        if jobs != 1:
            jobs = choose_jobs(jobs, len(subjects), import_peak_bytes(f, subjects),
                               available_memory(), cpu_count())
        with staged_store(out, force) as root:
            work = partial(import_subject, str(src), str(root.store.root), meta, config,
                           check_points)
            run_subjects(subjects, work, jobs, lambda subject, _: None, "import-hdf5",
                         progress)
            finish_store(root, subjects, splits, meta, {
                "config": None,
                "source": {
                    "format": "dwi_ml hdf5", "path": str(src.resolve()), "bytes": stat.st_size,
                    "modified": _dt.datetime.fromtimestamp(stat.st_mtime, _dt.UTC).isoformat(
                        timespec="seconds"),
                    "attributes": creation, "groups_config": jsonable(config)}})
    return out
