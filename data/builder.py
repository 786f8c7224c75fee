"""Build a tractrain store (format v1) from per-subject NIfTI volumes and tractograms,
as described by a builder config (see `tractrain.data.build_config`).

Volume groups concatenate their files along features; ``standardization`` is ``all`` (one
mean/std for every feature), ``independent`` (per feature), ``per_file`` (one per file) or
``none``; statistics are taken inside ``mask`` (or over voxels with any non-zero feature), the
standardized values are written inside it and zeros outside; std is floored at 1e-6.
Streamline groups accept .trk, .tck (needs ``reference``) and .trx (`tractrain.data.trx_io`),
optionally resampled to ``step_size`` mm or compressed with tolerance ``compress`` mm (dipy).
Without ``reference`` the voxel grid is the one the .trk/.trx headers hold (all files of the
group must agree). docs/builder.md documents every config key.

The store is written to a temporary sibling folder and renamed into place at the end, so an
interrupted build never leaves a half store at the output path.
"""

from __future__ import annotations

import glob
import json
import mmap
import os
import struct
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import zarr

from tractrain.data.build_config import validate_config
from tractrain.data.format import SPLITS
from tractrain.data.parallel_build import (
    available_memory,
    build_peak_bytes,
    choose_jobs,
    cpu_count,
    run_subjects,
)
from tractrain.data.space_check import check_files_inside, check_trk_voxel_order
from tractrain.data.store_writer import (
    check_replaceable,
    finish_store,
    staged_store,
    volume_array,
    write_streamlines,
)
from tractrain.data.trx_io import read_trx
from tractrain.errors import ConfigError

STD_FLOOR = 1e-6


def _match(folder: Path, pattern: str, what: str) -> list[Path]:
    found = sorted(Path(p) for p in glob.glob(str(folder / pattern)))
    if not found:
        raise ConfigError(f"{folder / pattern}: no file matches ({what})")
    return found


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii", ".trk", ".tck", ".trx"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _nifti(path: Path, read: bool = True):
    """``(image, float32 data or None)``; ConfigError for an unreadable or truncated file."""
    try:
        img = nib.load(str(path))
        if img.ndim not in (3, 4):
            raise ConfigError(f"{path}: expected a 3-D or 4-D volume, got {img.ndim}-D")
        return img, (np.asarray(img.dataobj, dtype=np.float32) if read else None)
    except ConfigError:
        raise
    except Exception as err:  # nibabel, gzip and numpy raise many types for bad files
        message = " ".join(str(err).split()) or type(err).__name__
        raise ConfigError(f"{path}: cannot read as NIfTI ({message})") from None


def _load_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img, data = _nifti(path)
    if data.ndim == 3:
        data = data[..., None]
    if data.size == 0:
        raise ConfigError(f"{path}: empty volume (shape {data.shape})")
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise ConfigError(f"{path}: {bad} NaN/inf voxels (expected finite values)")
    return data, img.affine


def _read_volume_group(folder: Path, name: str, group: dict):
    parts, names, affine, first = [], [], None, None
    for pattern in group["files"]:
        for path in _match(folder, pattern, f"volume group {name!r}"):
            data, aff = _load_volume(path)
            if first is None:
                first, affine, shape = path, aff, data.shape[:3]
            elif data.shape[:3] != shape or not np.allclose(aff, affine, atol=1e-4):
                raise ConfigError(
                    f"{path}: shape {data.shape[:3]}/affine differ from {first.name} "
                    f"{shape} in volume group {name!r} (files of a group must share their grid)"
                )
            parts.append(data)
            stem = _stem(path)
            names += [stem] if data.shape[3] == 1 else [f"{stem}_{i}" for i in range(data.shape[3])]
    mask = None
    if group.get("mask"):
        mask = np.zeros(shape, dtype=bool)
        for path in _match(folder, group["mask"], f"mask of volume group {name!r}"):
            m, _ = _load_volume(path)
            if m.shape[:3] != shape:
                raise ConfigError(f"{path}: mask shape {m.shape[:3]} differs from the volumes' "
                                  f"{shape}")
            mask |= (m != 0).any(axis=3)
    return parts, names, affine, mask


def standardize(parts: list[np.ndarray], mode: str, mask: np.ndarray | None):
    """Concatenate ``parts`` (X, Y, Z, Fi) and z-score them; return (data, means, stds)."""
    data = np.concatenate(parts, axis=3)
    n_features = data.shape[3]
    if mode == "none":
        return data, [0.0] * n_features, [1.0] * n_features
    if mask is None:
        mask = (data != 0).any(axis=3)
    if not mask.any():
        raise ConfigError("standardization: the mask (or non-zero region) is empty")
    inside = data[mask].astype(np.float64)  # (V, F)
    if mode == "independent":
        means, stds = inside.mean(0), inside.std(0)
    elif mode == "all":
        means = np.full(n_features, inside.mean())
        stds = np.full(n_features, inside.std())
    else:  # per_file
        means, stds, start = np.empty(n_features), np.empty(n_features), 0
        for part in parts:
            stop = start + part.shape[3]
            block = inside[:, start:stop]
            means[start:stop], stds[start:stop] = block.mean(), block.std()
            start = stop
    stds = np.maximum(stds, STD_FLOOR)
    out = np.zeros_like(data)
    out[mask] = ((inside - means) / stds).astype(np.float32)
    return out, means.tolist(), stds.tolist()


def trk_counts(path: Path) -> tuple[int, int]:
    """``(n_count in the header, streamlines the file actually holds)`` of a .trk file, by
    walking its records (nibabel keeps only the first ``n_count``)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if len(data) < 1000 or data[:6] != b"TRACK\0":
            raise ConfigError(f"{path}: not a TrackVis file (magic number is not 'TRACK')")
        order = "<" if int.from_bytes(data[996:1000], "little") == 1000 else ">"
        (n_scalars,), (n_props,) = (struct.unpack_from(order + "h", data, at) for at in (36, 238))
        (n_count,) = struct.unpack_from(order + "i", data, 988)
        end, pos, count, record = len(data), 1000, 0, struct.Struct(order + "i")
        while pos + 4 <= end:
            (n_points,) = record.unpack_from(data, pos)
            pos += 4 + 4 * (n_points * (3 + n_scalars) + n_props)
            count += pos <= end and n_points >= 0
            if n_points < 0:
                break
    return n_count, count


def _check_trk_count(path: Path) -> None:
    header, actual = trk_counts(path)
    if header and header != actual:
        raise ConfigError(f"{path}: header n_count says {header} streamlines but the file "
                          f"holds {actual} (damaged or edited header; fix n_count or re-save)")


def _load_tractogram(path: Path, reference: Path | None):
    """``(points (M, 3) float32 in RAS+ mm, lengths, data-per-streamline, space)`` of a
    tractogram; ``space`` is the ``(affine, dimensions)`` its header holds (.trk, .trx) or None
    (.tck)."""
    suffix = "".join(path.suffixes[-1:]).lower()
    if suffix == ".trx":
        points, lengths, dps, affine, dims = read_trx(path)
        return points, lengths, dps, (affine, dims)
    if suffix == ".tck" and reference is None:
        raise ConfigError(f"{path}: a .tck file needs a 'reference' volume in its group "
                          "(TCK has no voxel grid)")
    if suffix == ".trk":
        _check_trk_count(path)
        check_trk_voxel_order(path)
    try:
        loaded = nib.streamlines.load(str(path))
    except Exception as err:  # nibabel raises many types for unreadable files
        message = " ".join(str(err).split()) or type(err).__name__
        raise ConfigError(f"{path}: cannot read as a tractogram ({message[:200]})") from None
    tractogram, space = loaded.tractogram, None
    if suffix == ".trk":
        space = (np.asarray(loaded.header["voxel_to_rasmm"], dtype=np.float64),
                 [int(d) for d in loaded.header["dimensions"]])
    dps = {k: np.asarray(v) for k, v in tractogram.data_per_streamline.items()}
    return *_flat(tractogram.streamlines), dps, space


def _flat(streamlines) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.asarray([len(s) for s in streamlines], dtype=np.int64)
    if len(streamlines) == 0:
        return np.zeros((0, 3), np.float32), lengths
    data = getattr(streamlines, "get_data", None)
    points = data() if data is not None else np.concatenate(list(streamlines))
    return np.asarray(points, dtype=np.float32).reshape(-1, 3), lengths


def _same_space(first: tuple[Path, tuple], path: Path, space: tuple) -> None:
    """Without a ``reference``, the files of a group must share the space of their headers."""
    (where, (affine, dims)) = first
    if dims != space[1] or not np.allclose(affine, space[0], atol=1e-4):
        raise ConfigError(f"{path}: header space (dimensions {space[1]}, affine "
                          f"{np.round(space[0], 4).tolist()}) differs from {where.name}'s "
                          f"({dims}, {np.round(affine, 4).tolist()}); give the group a "
                          "'reference' volume")


def _check_streamlines(path: Path, points: np.ndarray, lengths: np.ndarray) -> None:
    """ConfigError for a streamline with fewer than 2 points or a NaN/inf coordinate."""
    short = np.flatnonzero(lengths < 2)
    if short.size:
        raise ConfigError(f"{path}: {short.size} streamline(s) with fewer than 2 points "
                          f"(first: streamline {short[0]}, {lengths[short[0]]} point)")
    bad = ~np.isfinite(points).all(axis=1)
    if bad.any():
        first = int(np.searchsorted(np.cumsum(lengths), np.flatnonzero(bad)[0], side="right"))
        raise ConfigError(f"{path}: {int(bad.sum())} point(s) with NaN/inf coordinates "
                          f"(first in streamline {first})")


def lengths_mm(points: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Arc length (same unit as ``points``) of each streamline of a flat array."""
    if points.shape[0] == 0:
        return np.zeros(len(lengths), np.float32)
    seg = np.linalg.norm(np.diff(points.astype(np.float64), axis=0), axis=1)
    ends = np.cumsum(lengths) - 1
    seg[ends[:-1]] = 0.0  # no segment across two streamlines
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    starts = ends - lengths + 1
    return (cum[ends] - cum[starts]).astype(np.float32)


def _read_streamline_group(folder: Path, name: str, group: dict):
    reference = None
    if group.get("reference"):
        reference = _match(folder, group["reference"], f"reference of group {name!r}")[0]
    all_points, all_lengths, dps_parts, sources = [], [], [], []
    header_space = None  # (first file with a header space, its (affine, dimensions))
    for pattern in group["files"]:
        for path in _match(folder, pattern, f"streamline group {name!r}"):
            points, lengths, dps, space = _load_tractogram(path, reference)
            if lengths.size == 0 or points.shape[0] == 0:
                raise ConfigError(f"{path}: empty tractogram (no streamlines)")
            _check_streamlines(path, points, lengths)
            if space is not None and reference is None:
                if header_space is None:
                    header_space = (path, space)
                else:
                    _same_space(header_space, path, space)
            all_points.append(points)
            all_lengths.append(lengths)
            sources.append((path, lengths.size))
            dps_parts.append(dps)
    points, lengths = np.concatenate(all_points), np.concatenate(all_lengths)
    keys = set.intersection(*(set(d) for d in dps_parts)) if dps_parts else set()
    if group.get("dps_keys") is not None:  # keep only these; every file must have them
        missing = sorted(set(group["dps_keys"]) - keys)
        if missing:
            raise ConfigError(f"{folder}: streamline group {name!r}: data-per-streamline "
                              f"{missing} (dps_keys) missing in some of its files")
        keys = set(group["dps_keys"])
    dps = {k: np.concatenate([d[k] for d in dps_parts]) for k in sorted(keys)}
    if group.get("step_size") or group.get("compress"):
        from tractrain.data import augment

        unit = np.ones(3)
        if group.get("step_size"):
            points, lengths = augment.resample(points, lengths, float(group["step_size"]), unit)
        else:
            points, lengths = augment.compress(points, lengths, float(group["compress"]), unit)
    if reference is not None:
        ref, _ = _nifti(reference, read=False)
        affine, dims = ref.affine, [int(d) for d in ref.shape[:3]]
    elif header_space is not None:
        affine, dims = header_space[1]
    else:
        raise ConfigError(f"{folder}: streamline group {name!r} needs a 'reference' volume")
    mm = lengths_mm(points, lengths)
    voxels = nib.affines.apply_affine(np.linalg.inv(affine), points).astype(np.float32)
    if not group.get("allow_outside"):  # points outside their volume would read zeros
        check_files_inside(voxels, lengths, sources, dims, folder.name,
                           reference=reference.name if reference is not None else None)
    info = {"affine": np.asarray(affine).tolist(), "dimensions": dims,
            "voxel_sizes": nib.affines.voxel_sizes(affine).tolist(),
            "space": "voxel", "origin": "center",
            "reference": reference.name if reference is not None else None,
            "n_streamlines": int(lengths.size), "dps_keys": sorted(dps)}
    return voxels, lengths, mm, dps, info


def build_subject(staged: str, root: Path, config: dict, subject: str) -> dict:
    """Write ``subject`` (its folder under ``root``) into the store being written at ``staged``;
    return its group metadata (``volume_groups``, ``streamline_groups``). Runs in a worker
    process with ``--jobs`` > 1 (`tractrain.data.parallel_build`)."""
    folder, meta = root / subject, {"volume_groups": {}, "streamline_groups": {}}
    grp = zarr.open_group(staged, mode="r+").create_group(subject)
    for name, group in config["groups"].items():
        if group["type"] == "volume":
            parts, names, affine, mask = _read_volume_group(folder, name, group)
            data, means, stds = standardize(parts, group["standardization"], mask)
            meta["volume_groups"][name] = {"feature_names": names, "dtype": group["dtype"],
                                           "n_features": len(names)}
            arr = volume_array(grp, name, data.shape, group["dtype"], {
                "affine": np.asarray(affine).tolist(),
                "voxel_sizes": nib.affines.voxel_sizes(affine).tolist(),
                "feature_names": names,
                "standardization": {"mode": group["standardization"], "means": means,
                                    "stds": stds, "mask": group.get("mask")},
            })
            arr[...] = data.astype(group["dtype"])
        else:
            points, lengths, mm, dps, info = _read_streamline_group(folder, name, group)
            meta["streamline_groups"][name] = {"dps_keys": info["dps_keys"]}
            write_streamlines(grp, name, points, lengths, mm, dps, info)
    return meta


def _merge_meta(meta: dict, theirs: dict, folder: Path) -> None:
    """Add a subject's group metadata ``theirs`` to the store's ``meta``; `ConfigError` when
    its features or data-per-streamline differ from the subjects' before it."""
    for name, group in theirs["volume_groups"].items():
        seen = meta["volume_groups"].setdefault(name, group)
        if seen["feature_names"] != group["feature_names"]:
            raise ConfigError(f"{folder}: volume group {name!r} has features "
                              f"{group['feature_names']}, other subjects have "
                              f"{seen['feature_names']}")
    for name, group in theirs["streamline_groups"].items():
        seen = meta["streamline_groups"].setdefault(name, group)
        if seen["dps_keys"] != group["dps_keys"]:
            raise ConfigError(f"{folder}: streamline group {name!r} has data-per-streamline "
                              f"{group['dps_keys']}, other subjects have {seen['dps_keys']}")


def build_store(
    config: dict,
    out: str | os.PathLike,
    root: str | os.PathLike,
    force: bool = False,
    progress: bool | None = True,
    config_path: str | None = None,
    allow_outside: bool = False,
    jobs: int | None = 1,
) -> Path:
    """Build the store described by ``config`` from subject folders under ``root`` at ``out``.

    Raises `ConfigError` (nothing written at ``out``) on bad input; refuses an existing
    ``out`` unless ``force``. A subject whose streamline points lie outside their reference
    volume (more than 1 %) is refused unless ``allow_outside`` (or the group's
    ``allow_outside`` key; `tractrain.data.space_check`). ``jobs``: subjects built in
    parallel processes (None: one per core, capped by memory; `tractrain.data.parallel_build`).
    ``progress``: a bar per subject (None: when stderr is a terminal).
    """
    where = config_path or "config"
    config = validate_config(json.loads(json.dumps(config)), where)
    for group in config["groups"].values():  # recorded in the provenance
        if allow_outside and group["type"] == "streamlines":
            group["allow_outside"] = True
    out, root = Path(out), Path(root)
    check_replaceable(out, force)
    subjects = [s for split in SPLITS for s in config["subjects"].get(split, [])]
    for subject in subjects:
        if not (root / subject).is_dir():
            split = next(k for k, v in config["subjects"].items() if subject in v)
            raise ConfigError(f"{where}: subject {subject!r} (split {split!r}) has no folder "
                              f"{root / subject}")
    meta = {"volume_groups": {}, "streamline_groups": {}}
    jobs = choose_jobs(jobs, len(subjects), build_peak_bytes(root, subjects, config),
                       available_memory(), cpu_count()) if jobs != 1 else 1
    with staged_store(out, force) as zroot:
        run_subjects(subjects, partial(build_subject, str(zroot.store.root), root, config),
                     jobs, lambda s, theirs: _merge_meta(meta, theirs, root / s),
                     "build-store", progress)
        finish_store(zroot, subjects, config["subjects"], meta, {
            "config": config, "config_path": config_path, "root": str(root.resolve())})
    return out
