"""Store format v1: names and schema checks shared by the builder and the reader.

See docs/store-format.md for the layout.
"""

from __future__ import annotations

import numpy as np
import zarr

from tractrain.errors import StoreError

FORMAT_NAME = "tractrain-store"
FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
STREAMLINE_ARRAYS = ("points", "offsets", "lengths", "lengths_mm")
ROOT_KEYS = ("format", "version", "subjects", "splits", "volume_groups", "streamline_groups",
             "provenance")


def check_root_attrs(attrs: dict, path: str) -> None:
    """Raise `StoreError` unless ``attrs`` are the root attributes of a v1 store."""
    if attrs.get("format") != FORMAT_NAME:
        raise StoreError(
            f"{path}: not a tractrain store (root attribute 'format' is "
            f"{attrs.get('format')!r}, expected {FORMAT_NAME!r})"
        )
    version = attrs.get("version")
    if version != FORMAT_VERSION:
        raise StoreError(
            f"{path}: store format version {version!r} is not supported "
            f"(this tractrain reads version {FORMAT_VERSION})"
        )
    missing = [k for k in ROOT_KEYS if k not in attrs]
    if missing:
        raise StoreError(f"{path}: root attributes {missing} missing (store format v1)")
    splits = attrs["splits"]
    if not isinstance(splits, dict) or set(splits) - set(SPLITS):
        raise StoreError(f"{path}: root attribute 'splits' must map {list(SPLITS)} to lists")
    subjects = set(attrs["subjects"])
    for name, ids in splits.items():
        unknown = sorted(set(ids) - subjects)
        if unknown:
            raise StoreError(f"{path}: split {name!r} lists subjects {unknown} not in 'subjects'")


def check_streamline_index(where: str, offsets, lengths, n_points: int) -> None:
    """Raise `StoreError` unless ``offsets`` (S+1,) and ``lengths`` (S,) describe ``n_points``
    points: offsets start at 0, step by the lengths (>= 1) and end at ``n_points``."""
    if offsets.shape != (lengths.shape[0] + 1,) or offsets[0] != 0:
        raise StoreError(f"{where}: offsets must have one more entry than lengths "
                         f"({lengths.shape[0]}) and start at 0")
    bad = np.flatnonzero((np.diff(offsets) != lengths) | (lengths < 1))
    if bad.size:
        raise StoreError(f"{where}: offsets and lengths disagree at streamline {bad[0]} "
                         f"({bad.size} streamlines; offsets {offsets[bad[0]]}->"
                         f"{offsets[bad[0] + 1]}, lengths {lengths[bad[0]]})")
    if offsets[-1] != n_points:
        raise StoreError(f"{where}: offsets end at {offsets[-1]} but points has {n_points} "
                         "points")


def check_chunks(where: str, arrays: dict) -> None:
    """Raise `StoreError` if any of ``{name: zarr array}`` lacks a chunk (deleted, lost)."""
    for name, arr in arrays.items():
        if arr.nchunks_initialized < arr.nchunks:
            raise StoreError(f"{where}/{name}: {arr.nchunks - arr.nchunks_initialized} of "
                             f"{arr.nchunks} chunks missing (store damaged; rebuild it)")


def check_subjects(root: zarr.Group, path: str, subjects: list[str], volume_groups: dict,
                   streamline_groups: dict) -> None:
    """Raise `StoreError` unless every subject under ``root`` has every group of the store,
    with the group's features and dtype (volumes) or arrays and data-per-streamline keys."""
    for subject in subjects:
        for name, meta in volume_groups.items():
            where = f"{path}: {subject}/{name}"
            try:
                arr = root[f"{subject}/{name}"]
            except KeyError:
                raise StoreError(f"{where}: volume group missing") from None
            if not isinstance(arr, zarr.Array) or arr.ndim != 4:
                raise StoreError(f"{where}: expected a 4-D (X, Y, Z, F) array")
            features = list(arr.attrs.get("feature_names", []))
            if features != list(meta["feature_names"]):
                raise StoreError(
                    f"{where}: features {features} differ from the group's "
                    f"{list(meta['feature_names'])} (all subjects must share features)"
                )
            if str(arr.dtype) != meta["dtype"]:
                raise StoreError(f"{where}: dtype {arr.dtype} differs from the group's "
                                 f"{meta['dtype']}")
        for name, meta in streamline_groups.items():
            where = f"{path}: {subject}/{name}"
            try:
                grp = root[f"{subject}/{name}"]
                keys = set(grp.array_keys())
            except (KeyError, AttributeError):
                raise StoreError(f"{where}: streamline group missing") from None
            missing = [k for k in STREAMLINE_ARRAYS if k not in keys]
            if missing:
                raise StoreError(f"{where}: arrays {missing} missing")
            dps = sorted(grp.attrs.get("dps_keys", []))
            if dps != sorted(meta.get("dps_keys", [])):
                raise StoreError(f"{where}: data-per-streamline keys {dps} differ from the "
                                 f"group's {sorted(meta.get('dps_keys', []))}")
