"""Writing a store (format v1, docs/store-format.md): the one writer shared by the builder
(`tractrain.data.builder`, NIfTI and tractograms) and the dwi_ml importer
(`tractrain.data.import_hdf5`).

A store is written into a temporary sibling folder and renamed into place at the end
(`staged_store`), so an interrupted write never leaves a half store at the output path; an
existing output is replaced only with ``force`` and only when it is a tractrain store.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import zarr

from tractrain.data.format import ALL_CHUNKS_ATTR, FORMAT_NAME, FORMAT_VERSION, SPLITS

# every chunk is written, even all-zero ones (zarr skips those by default), so that a lost
# chunk is detected rather than read as the fill value
ALL_CHUNKS = {"write_empty_chunks": True}
POINT_CHUNK = 2**16  # points per chunk of a streamline group's arrays
VOLUME_CHUNK = 32  # voxels per chunk side of a volume


def is_store_folder(path: Path) -> bool:
    """True if ``path`` is a folder holding a tractrain store (its root ``zarr.json`` says so)."""
    meta = path / "zarr.json"
    if path.is_symlink() or not path.is_dir() or not meta.is_file():
        return False
    try:
        attrs = json.loads(meta.read_bytes()[: 2**24]).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(attrs, dict) and attrs.get("format") == FORMAT_NAME


def check_replaceable(out: Path, force: bool) -> None:
    """`FileExistsError` if ``out`` exists and may not be replaced: without ``force``, or
    (even with it) when it is not a tractrain store, so ``--force`` never deletes other data."""
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise FileExistsError(f"{out}: already exists (use --force to overwrite it)")
    if not is_store_folder(out):
        raise FileExistsError(f"{out}: already exists and is not a tractrain store; "
                              "--force replaces only a store (remove it yourself)")


@contextmanager
def staged_store(out: str | os.PathLike, force: bool = False) -> Iterator[zarr.Group]:
    """Yield the root group of a new store in a temporary sibling of ``out``; on normal exit
    rename it to ``out`` (replacing an old store, see `check_replaceable`), on error remove it."""
    out = Path(out)
    check_replaceable(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        yield zarr.open_group(str(tmp), mode="w")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def new_array(grp: zarr.Group, key: str, shape: tuple, dtype, chunks=None) -> zarr.Array:
    """An array of the store (every chunk written, see `ALL_CHUNKS`), default chunks:
    `POINT_CHUNK` entries along the first axis."""
    shape = tuple(int(s) for s in shape)
    if chunks is None:
        chunks = (min(POINT_CHUNK, max(1, shape[0])),) + shape[1:]
    return grp.create_array(key, shape=shape, dtype=dtype, chunks=chunks, config=ALL_CHUNKS)


def volume_array(grp: zarr.Group, name: str, shape: tuple, dtype: str, attrs: dict
                 ) -> zarr.Array:
    """The (X, Y, Z, F) array of a volume group, chunked (32, 32, 32, F), with ``attrs``
    (affine, voxel_sizes, feature_names, standardization); the caller fills it."""
    chunks = tuple(min(VOLUME_CHUNK, int(s)) for s in shape[:3]) + (int(shape[3]),)
    arr = new_array(grp, name, shape, dtype, chunks)
    arr.attrs.update(attrs)
    return arr


def streamline_arrays(grp: zarr.Group, name: str, n_points: int, n_streamlines: int,
                      dps: dict[str, tuple[tuple, np.dtype]], info: dict) -> dict:
    """Create a streamline group's arrays (``points``, ``offsets``, ``lengths``,
    ``lengths_mm``, ``dps/<key>`` from ``{key: (shape, dtype)}``) with attributes ``info``;
    return ``{key: array}`` for the caller to fill."""
    sgrp = grp.create_group(name)
    arrays = {
        "points": new_array(sgrp, "points", (n_points, 3), np.float32),
        "offsets": new_array(sgrp, "offsets", (n_streamlines + 1,), np.int64),
        "lengths": new_array(sgrp, "lengths", (n_streamlines,), np.int64),
        "lengths_mm": new_array(sgrp, "lengths_mm", (n_streamlines,), np.float32),
    }
    for key, (shape, dtype) in dps.items():
        arrays[f"dps/{key}"] = new_array(sgrp, f"dps/{key}", shape, dtype)
    sgrp.attrs.update(info)
    return arrays


def write_streamlines(grp: zarr.Group, name: str, points: np.ndarray, lengths: np.ndarray,
                      mm: np.ndarray, dps: dict[str, np.ndarray], info: dict) -> None:
    """Write a streamline group held in memory (voxel ``points``, ``lengths``, arc lengths
    ``mm``, data per streamline ``dps``) with attributes ``info``."""
    arrays = streamline_arrays(grp, name, points.shape[0], lengths.shape[0],
                               {k: (v.shape, v.dtype) for k, v in dps.items()}, info)
    arrays["points"][...] = points.astype(np.float32)
    arrays["offsets"][...] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    arrays["lengths"][...] = lengths.astype(np.int64)
    arrays["lengths_mm"][...] = mm.astype(np.float32)
    for key, value in dps.items():
        arrays[f"dps/{key}"][...] = value


def finish_store(root: zarr.Group, subjects: list[str], splits: dict, meta: dict,
                 provenance: dict) -> None:
    """Write the root attributes that make ``root`` a store: subjects, splits, group metadata
    (``meta``: ``volume_groups``, ``streamline_groups``) and ``provenance`` (``tool``,
    ``created`` and ``zarr`` are added)."""
    from tractrain import __version__

    root.attrs.update({
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "subjects": list(subjects),
        "splits": {k: list(splits.get(k, [])) for k in SPLITS},
        "volume_groups": meta["volume_groups"],
        "streamline_groups": meta["streamline_groups"],
        ALL_CHUNKS_ATTR: True,
        "provenance": {
            "tool": f"tractrain {__version__}",
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            **provenance,
            "zarr": zarr.__version__,
        },
    })
