"""What a store holds (`store_header`, `subject_summary`) and whether training can rely on it
(`check_subject`): what ``tractrain-store-info`` prints, as JSON-able dicts.

Everything goes subject by subject and reads arrays in blocks (`POINT_BLOCK` points, slabs of
volume chunks), never through the store's caches: memory is bounded by one subject's
streamline table and one boolean-like mask of its volume grid, whatever the store's size.

"All-zero inputs" is computed on a mask volume (1 where a voxel has any non-zero feature, else
0) interpolated like the inputs (`tractrain.data.interpolation.interpolate`, outside policy
``zeros``): a point reads 0 exactly when every voxel weighing on it is all zeros, which is
what the inputs would read, at one feature's cost instead of F.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from tractrain.data.format import check_streamline_index, stored_chunks
from tractrain.data.space_check import outside_count
from tractrain.data.store import store_array
from tractrain.errors import StoreError

if TYPE_CHECKING:  # torch is imported by the checks only: a summary starts without it
    import torch

POINT_BLOCK = 2**20  # points read at once by the checks
MAX_OUTSIDE = 0.01  # default limits of `check_subject`: shares of a subject's points
MAX_ZERO_INPUTS = 0.05


def stats(values: np.ndarray) -> dict | None:
    """``{"min", "mean", "median", "max"}`` of ``values`` as floats (None when empty)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return None
    return {"min": float(values.min()), "mean": float(values.mean()),
            "median": float(np.median(values)), "max": float(values.max())}


def store_header(store) -> dict:
    """The store-wide part of the summary: path, format, version, provenance, splits, groups."""
    return {
        "path": str(store.path), "format": store.attrs["format"],
        "version": store.attrs["version"], "provenance": store.provenance,
        "subjects": list(store.subjects),
        "splits": {name: list(store.splits.get(name, [])) for name in ("train", "valid", "test")},
        "volume_groups": {name: {"feature_names": list(meta["feature_names"]),
                                 "n_features": meta["n_features"], "dtype": meta["dtype"]}
                          for name, meta in store.volume_groups.items()},
        "streamline_groups": {name: {"dps_keys": list(meta.get("dps_keys", []))}
                              for name, meta in store.streamline_groups.items()},
    }


def split_of(store, subject: str) -> str | None:
    return next((name for name, ids in store.splits.items() if subject in ids), None)


def _stored(arr) -> int:
    return stored_chunks(arr)[1]


def subject_summary(store, subject: str) -> dict:
    """One subject: its split, each volume's shape / dtype / voxel sizes, each streamline
    group's counts and length statistics (points and mm), and the bytes its chunks take."""
    out: dict = {"split": split_of(store, subject), "volumes": {}, "streamlines": {},
                 "stored_bytes": 0}
    for name in store.volume_groups:
        arr = store_array(store, subject, name)
        info = store.volume_info(subject, name)
        size = _stored(arr)
        out["volumes"][name] = {"shape": [int(n) for n in arr.shape], "dtype": str(arr.dtype),
                                "voxel_sizes": [float(v) for v in info["voxel_sizes"]],
                                "stored_bytes": size}
        out["stored_bytes"] += size
    for name in store.streamline_groups:
        lengths = np.asarray(store_array(store, subject, name, "lengths")[...])
        mm = np.asarray(store_array(store, subject, name, "lengths_mm")[...])
        info = store.streamline_info(subject, name)
        size = sum(_stored(store_array(store, subject, name, k))
                   for k in ("points", "offsets", "lengths", "lengths_mm"))
        out["streamlines"][name] = {
            "n_streamlines": int(lengths.size), "n_points": int(lengths.sum()),
            "points_per_streamline": stats(lengths), "length_mm": stats(mm),
            "reference": info.get("reference"),
            "dimensions": [int(d) for d in info.get("dimensions", [])],
            "stored_bytes": size}
        out["stored_bytes"] += size
    return out


def nonzero_mask(arr) -> tuple[torch.Tensor, int]:
    """``(mask (X, Y, Z, 1) float32: 1 where any feature is non-zero, number of NaN/inf
    values)`` of a 4-D zarr array, read one slab of chunks at a time."""
    import torch

    shape = tuple(int(n) for n in arr.shape)
    mask = np.zeros(shape[:3] + (1,), dtype=np.float32)
    step, bad = max(1, int(arr.chunks[0])), 0
    for x in range(0, shape[0], step):
        slab = np.asarray(arr[x:x + step])
        bad += int(slab.size - np.isfinite(slab).sum())
        mask[x:x + step, ..., 0] = (slab != 0).any(axis=3)
    return torch.from_numpy(mask), bad


def _streamline_table(store, subject: str, group: str, where: str, failures: list) -> bool:
    """Offsets/lengths consistent with the points, lengths in mm finite and >= 0."""
    offsets = np.asarray(store_array(store, subject, group, "offsets")[...], dtype=np.int64)
    lengths = np.asarray(store_array(store, subject, group, "lengths")[...], dtype=np.int64)
    mm = np.asarray(store_array(store, subject, group, "lengths_mm")[...], dtype=np.float64)
    n_points = int(store_array(store, subject, group, "points").shape[0])
    try:
        check_streamline_index(where, offsets, lengths, n_points)
    except StoreError as err:
        failures.append(str(err))
        return False
    if mm.shape != lengths.shape or not (np.isfinite(mm) & (mm >= 0)).all():
        failures.append(f"{where}: lengths_mm has {mm.size} entries for {lengths.size} "
                        "streamlines or NaN/inf/negative values")
        return False
    return True


def check_subject(store, subject: str, max_outside: float = MAX_OUTSIDE,
                  max_zero_inputs: float = MAX_ZERO_INPUTS) -> dict:
    """What training relies on, for one subject: finite volumes; per streamline group the
    streamline table's consistency, finite points, the share of points outside the reference
    grid and, per volume group, the share of points whose inputs are all zeros.

    Returns ``{"volumes": {g: {"non_finite"}}, "streamlines": {g: {"consistent",
    "n_points", "non_finite_points", "outside_share", "zero_input_share": {vg: share}}},
    "failures": [one line each]}``; a share above its limit is a failure.
    """
    failures: list[str] = []
    result: dict = {"volumes": {}, "streamlines": {}, "failures": failures}
    masks = {}
    for name in store.volume_groups:
        masks[name], bad = nonzero_mask(store_array(store, subject, name))
        result["volumes"][name] = {"non_finite": bad}
        if bad:
            failures.append(f"{subject}/{name}: {bad} NaN/inf values in the volume")
    for name in store.streamline_groups:
        where = f"{subject}/{name}"
        entry = result["streamlines"][name] = {
            "consistent": _streamline_table(store, subject, name, where, failures)}
        entry.update(_scan_points(store, subject, name, masks))
        if entry["non_finite_points"]:
            failures.append(f"{where}: {entry['non_finite_points']} points with NaN/inf "
                            "coordinates")
        if entry["outside_share"] > max_outside:
            failures.append(f"{where}: {100 * entry['outside_share']:.1f}% of points lie "
                            f"outside the reference volume (limit {100 * max_outside:g}%): "
                            "wrong reference, LPS/RAS or shifted header?")
        for volume, share in entry["zero_input_share"].items():
            if share > max_zero_inputs:
                failures.append(f"{where}: {100 * share:.1f}% of points have all-zero inputs "
                                f"in volume group {volume!r} (limit {100 * max_zero_inputs:g}%)")
    return result


def _scan_points(store, subject: str, group: str, masks: dict) -> dict:
    """Counts over a streamline group's points, read `POINT_BLOCK` at a time."""
    import torch

    from tractrain.data.interpolation import interpolate

    info = store.streamline_info(subject, group)
    dims = [int(d) for d in info["dimensions"]]
    transforms = {}
    for name in masks:
        volume = store.volume_info(subject, name)["affine"]
        same = np.allclose(info["affine"], volume, atol=1e-5)
        transforms[name] = None if same else np.linalg.inv(volume) @ info["affine"]
    points = store_array(store, subject, group, "points")
    chunk = max(1, int(points.chunks[0]))
    block = max(chunk, POINT_BLOCK // chunk * chunk)
    total = finite_total = bad = outside = 0
    zero = dict.fromkeys(masks, 0)
    for start in range(0, int(points.shape[0]), block):
        pts = np.asarray(points[start:start + block], dtype=np.float32)
        finite = np.isfinite(pts).all(axis=1)
        total += pts.shape[0]
        bad += int((~finite).sum())
        pts = pts[finite]
        finite_total += pts.shape[0]
        outside += outside_count(pts, dims)
        for name, mask in masks.items():
            t = transforms[name]
            vox = pts if t is None else (pts @ t[:3, :3].T + t[:3, 3]).astype(np.float32)
            values = interpolate(mask, torch.from_numpy(np.ascontiguousarray(vox)))
            zero[name] += int((values[:, 0] == 0).sum())
    n = max(finite_total, 1)
    return {"n_points": total, "non_finite_points": bad, "outside_share": outside / n,
            "zero_input_share": {name: count / n for name, count in zero.items()}}
