"""Reading a dwi_ml HDF5 file (written by dwi_ml's ``dwiml_create_hdf5_dataset``) as untrusted
data: its root attributes (splits, group config, creation options) and the layout of each
subject's groups, checked before any data is read.

Layout (see docs/store-format.md, "Importing a dwi_ml HDF5"): root attributes
``training_subjs``, ``validation_subjs``, ``testing_subjs`` (subject ids), ``groups_config``
(the builder config as a Python-dict repr), ``step_size``, ``nb_points``, ``compress``,
``data_and_time``, ``chosen_subjs``; per subject ``<id>/<group>`` with attribute ``type``:
``volume`` (dataset ``data`` (X, Y, Z, F), attributes ``affine``, ``voxres``, ``nb_features``)
or ``streamlines`` (datasets ``data`` (N, 3), ``offsets`` (S,), ``lengths`` (S,),
``euclidean_lengths`` (S,), group ``data_per_streamline``; attributes ``affine``,
``dimensions``, ``voxel_sizes``, ``voxel_order``, ``space``, ``origin``).

Attribute strings are parsed without ``eval``: a list repr by a regular expression, the group
config by `ast.literal_eval` (literals only). Links to other files, virtual or external
datasets and arrays declaring far more data than they store are refused.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from tractrain.data.format import (
    MAX_ARRAY_BYTES,
    MAX_COMPRESSION,
    MIN_RATIO_CHECKED,
    check_affine,
    check_voxel_sizes,
    is_plain_name,
)
from tractrain.errors import StoreError

SPLIT_ATTRS = {"train": "training_subjs", "valid": "validation_subjs", "test": "testing_subjs"}
CREATION_ATTRS = ("data_and_time", "step_size", "nb_points", "compress", "chosen_subjs")
STREAMLINE_DATASETS = {"data": (2, "f"), "offsets": (1, "iu"), "lengths": (1, "iu"),
                       "euclidean_lengths": (1, "f")}
SPACES = ("Space.VOX", "Space.VOXMM", "Space.RASMM")
ORIGINS = ("Origin.TRACKVIS", "Origin.NIFTI")
MAX_TEXT = 2**20  # longest attribute string parsed
_QUOTED = re.compile(r"""'([^'\\]*)'|"([^"\\]*)\"""")


@dataclass
class VolumeInfo:
    """A checked volume group: its ``data`` dataset and attributes."""

    shape: tuple[int, int, int, int]
    dtype: str
    affine: np.ndarray
    voxel_sizes: np.ndarray


@dataclass
class StreamlineInfo:
    """A checked streamline group: point count, per-streamline index, space attributes."""

    n_points: int
    offsets: np.ndarray  # (S + 1,) int64, ours: offsets[S] = N
    lengths: np.ndarray  # (S,) int64
    affine: np.ndarray
    dimensions: list[int]
    voxel_sizes: np.ndarray
    space: str
    origin: str
    voxel_order: str
    dps: dict[str, tuple[tuple, np.dtype]] = field(default_factory=dict)


def text(value: object) -> str:
    """An HDF5 attribute (str, bytes, numpy scalar) as str."""
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if isinstance(value, bytes | np.bytes_):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def open_hdf5(path: Path) -> h5py.File:
    """``path`` opened read-only; `StoreError` if it is not an HDF5 file."""
    if not path.is_file():
        raise FileNotFoundError(2, "No such file or directory", str(path))
    try:
        if not h5py.is_hdf5(str(path)):
            raise StoreError(f"{path}: not an HDF5 file (expected a dwi_ml .hdf5 file)")
        return h5py.File(str(path), "r")
    except OSError as err:
        raise StoreError(f"{path}: unreadable HDF5 file ({' '.join(str(err).split())[:120]})"
                         ) from None


def subject_list(value: object, where: str) -> list[str]:
    """Subject ids of a split attribute: an array of strings, an empty array, or the repr of
    a list or numpy array (``"['a' 'b']"``), parsed without eval."""
    if isinstance(value, np.ndarray) and value.ndim == 1 and (
            value.size == 0 or value.dtype.kind in "OSU"):
        items = [text(v) for v in value]
    elif isinstance(value, str | bytes | np.str_ | np.bytes_):
        body = text(value).strip()
        if len(body) > MAX_TEXT or not (body.startswith("[") and body.endswith("]")):
            raise StoreError(f"{where}: expected a list of subject ids, got {body[:60]!r}")
        items = [a or b for a, b in _QUOTED.findall(body)]
        if _QUOTED.sub("", body[1:-1]).replace(",", " ").strip():
            raise StoreError(f"{where}: expected a list of quoted subject ids, got "
                             f"{body[:60]!r}")
    else:
        raise StoreError(f"{where}: expected a list of subject ids, got "
                         f"{type(value).__name__}")
    bad = [s for s in items if not is_plain_name(s)]
    if bad:
        raise StoreError(f"{where}: {bad[0]!r} is not a usable subject id (non-empty, no '/')")
    if len(set(items)) != len(items):
        raise StoreError(f"{where}: a subject id is listed twice")
    return items


def groups_config(value: object, where: str) -> dict:
    """The ``groups_config`` attribute (a Python-dict repr) as a dict of dicts, or {} if absent."""
    if value is None:
        return {}
    body = text(value)
    try:
        if len(body) > MAX_TEXT:
            raise ValueError("too long")
        config = ast.literal_eval(body)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise StoreError(f"{where}: not a readable group config ({body[:60]!r})") from None
    if not isinstance(config, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) for k, v in config.items()):
        raise StoreError(f"{where}: expected a mapping of group names to settings")
    return config


def jsonable(value: object) -> object:
    """An attribute value as JSON-compatible data (for the store's provenance)."""
    if isinstance(value, np.ndarray):
        return [jsonable(v) for v in value.tolist()] if value.ndim else jsonable(value[()])
    if isinstance(value, bytes | np.bytes_ | np.str_):
        return text(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)


def read_root(f: h5py.File, path: Path) -> tuple[dict[str, list[str]], dict, dict]:
    """``(splits, groups_config, creation attributes)`` of a dwi_ml file; `StoreError` if it
    lacks dwi_ml's split attributes, a subject is in two splits or has no group."""
    missing = [a for a in SPLIT_ATTRS.values() if a not in f.attrs]
    if missing:
        raise StoreError(f"{path}: not a dwi_ml HDF5 file (root attributes {missing} missing; "
                         "expected a file written by dwiml_create_hdf5_dataset)")
    splits, seen = {}, {}
    for split, attr in SPLIT_ATTRS.items():
        splits[split] = subject_list(f.attrs[attr], f"{path}: root attribute {attr!r}")
        for subject in splits[split]:
            if subject in seen:
                raise StoreError(f"{path}: subject {subject!r} is in both {seen[subject]!r} "
                                 f"and {attr!r} (a tractrain store puts a subject in one split)")
            seen[subject] = attr
            link = f.get(subject, getlink=True)
            if not isinstance(link, h5py.HardLink) or not isinstance(f[subject], h5py.Group):
                raise StoreError(f"{path}: subject {subject!r} (in {attr!r}) has no group "
                                 "in the file")
    if not seen:
        raise StoreError(f"{path}: the dwi_ml split attributes list no subject")
    config = groups_config(f.attrs.get("groups_config"), f"{path}: root attribute "
                           "'groups_config'")
    creation = {k: jsonable(f.attrs[k]) for k in CREATION_ATTRS if k in f.attrs}
    return splits, config, creation


def _member(grp: h5py.Group, key: str, where: str):
    link = grp.get(key, getlink=True)
    if link is None:
        return None
    if not isinstance(link, h5py.HardLink):
        raise StoreError(f"{where}/{key}: a {type(link).__name__} (links to other objects or "
                         "files are not followed)")
    return grp[key]


def check_dataset(grp: h5py.Group, key: str, where: str, ndim: int, kinds: str,
                  max_bytes: int, trailing: int | None = None) -> h5py.Dataset:
    """Dataset ``key`` of ``grp``, refused unless it has ``ndim`` dimensions (the last one
    ``trailing``), a dtype of kind ``kinds``, at most ``max_bytes`` declared, its data in this
    file and not far more declared bytes than it stores."""
    ds = _member(grp, key, where)
    at = f"{where}/{key}"
    if not isinstance(ds, h5py.Dataset):
        raise StoreError(f"{at}: dataset missing")
    if ds.is_virtual or ds.external:
        raise StoreError(f"{at}: data stored outside this file (virtual or external dataset)")
    if ds.ndim != ndim or (trailing is not None and ds.shape[-1] != trailing):
        want = f"{ndim}-D" + (f" with {trailing} entries on the last axis" if trailing else "")
        raise StoreError(f"{at}: expected a {want} array, got shape {ds.shape}")
    if ds.dtype.kind not in kinds:
        raise StoreError(f"{at}: dtype {ds.dtype} is not of kind {kinds!r}")
    declared = int(np.prod(ds.shape, dtype=np.int64)) * ds.dtype.itemsize
    if declared > max_bytes:
        raise StoreError(f"{at}: declared shape {ds.shape} ({declared} bytes) exceeds the "
                         f"limit of {max_bytes} bytes")
    if declared > MIN_RATIO_CHECKED and declared > MAX_COMPRESSION * ds.id.get_storage_size():
        raise StoreError(f"{at}: declared shape {ds.shape} is more than {MAX_COMPRESSION}x "
                         "the bytes it stores (damaged or crafted file)")
    return ds


def group_kind(subject_grp: h5py.Group, name: str, where: str) -> str:
    """``volume`` or ``streamlines``: the ``type`` attribute of a subject's group."""
    node = _member(subject_grp, name, where)
    if not isinstance(node, h5py.Group):
        raise StoreError(f"{where}/{name}: expected a group (volume or streamlines), found a "
                         "dataset")
    kind = text(node.attrs.get("type", ""))
    if kind not in ("volume", "streamlines"):
        raise StoreError(f"{where}/{name}: group of unknown type {kind!r} (attribute 'type': "
                         "expected 'volume' or 'streamlines'); cannot map it to a store group")
    return kind


def check_volume(grp: h5py.Group, where: str, max_bytes: int = MAX_ARRAY_BYTES) -> VolumeInfo:
    """The checked volume group ``grp`` (dataset ``data`` and its attributes)."""
    ds = check_dataset(grp, "data", where, 4, "f", max_bytes)
    features = grp.attrs.get("nb_features")
    if features is not None and int(np.asarray(features).ravel()[0]) != ds.shape[3]:
        raise StoreError(f"{where}: attribute 'nb_features' ({jsonable(features)}) differs "
                         f"from data's {ds.shape[3]} features")
    if min(ds.shape) < 1:
        raise StoreError(f"{where}/data: empty volume (shape {ds.shape})")
    affine = check_affine(grp.attrs.get("affine"), f"{where}: attribute 'affine'")
    sizes = check_voxel_sizes(grp.attrs.get("voxres"), f"{where}: attribute 'voxres'")
    return VolumeInfo(tuple(int(s) for s in ds.shape), str(ds.dtype), affine, sizes)


def check_streamlines(grp: h5py.Group, where: str, max_bytes: int = MAX_ARRAY_BYTES
                      ) -> StreamlineInfo:
    """The checked streamline group ``grp``: datasets of consistent shapes, offsets that step
    by the lengths through all points, a known space and origin."""
    extra = sorted(set(grp) - set(STREAMLINE_DATASETS) - {"data_per_streamline"})
    if extra:
        raise StoreError(f"{where}/{extra[0]}: cannot map it to a store (tractrain stores keep "
                         "streamlines and data per streamline only, no connectivity data)")
    ds = {k: check_dataset(grp, k, where, ndim, kinds, max_bytes, 3 if k == "data" else None)
          for k, (ndim, kinds) in STREAMLINE_DATASETS.items()}
    n = ds["lengths"].shape[0]
    for key in ("offsets", "euclidean_lengths"):
        if ds[key].shape[0] != n:
            raise StoreError(f"{where}/{key}: {ds[key].shape[0]} entries, lengths has {n}")
    lengths, starts = ds["lengths"][()].astype(np.int64), ds["offsets"][()].astype(np.int64)
    n_points = ds["data"].shape[0]
    offsets = np.concatenate([starts, [n_points]])
    bad = np.flatnonzero((np.diff(offsets) != lengths) | (lengths < 1))
    if n == 0 and n_points:
        raise StoreError(f"{where}: offsets and lengths are inconsistent: no streamline but "
                         f"{n_points} points")
    if (n and starts[0] != 0) or bad.size:
        at = int(bad[0]) if bad.size else 0
        raise StoreError(f"{where}: offsets and lengths are inconsistent at streamline {at} "
                         f"(offset {starts[at] if n else 0}, length {lengths[at] if n else 0}, "
                         f"next offset {offsets[at + 1] if n else 0}; {n_points} points)")
    attrs = {k: text(grp.attrs.get(k, "")) for k in ("space", "origin", "voxel_order")}
    if attrs["space"] not in SPACES or attrs["origin"] not in ORIGINS:
        raise StoreError(f"{where}: space {attrs['space']!r} / origin {attrs['origin']!r} not "
                         f"understood (expected one of {SPACES} and {ORIGINS})")
    if attrs["space"] == "Space.RASMM" and attrs["origin"] != "Origin.NIFTI":
        raise StoreError(f"{where}: RAS mm points with origin {attrs['origin']!r} are not "
                         "supported (expected Origin.NIFTI)")
    try:
        dims = [int(d) for d in np.asarray(grp.attrs.get("dimensions")).ravel()]
    except (TypeError, ValueError):
        dims = []
    if len(dims) != 3 or min(dims) < 1:
        raise StoreError(f"{where}: attribute 'dimensions': expected 3 positive integers")
    info = StreamlineInfo(
        n_points, offsets, lengths,
        check_affine(grp.attrs.get("affine"), f"{where}: attribute 'affine'"), dims,
        check_voxel_sizes(grp.attrs.get("voxel_sizes"), f"{where}: attribute 'voxel_sizes'"),
        attrs["space"], attrs["origin"], attrs["voxel_order"])
    dps = _member(grp, "data_per_streamline", where)
    if dps is not None:
        if not isinstance(dps, h5py.Group):
            raise StoreError(f"{where}/data_per_streamline: expected a group")
        for key in dps:
            if not is_plain_name(key):
                raise StoreError(f"{where}/data_per_streamline: {key!r} is not a plain name")
            d = _member(dps, key, f"{where}/data_per_streamline")
            ndim = d.ndim if isinstance(d, h5py.Dataset) and d.ndim >= 1 else 1
            d = check_dataset(dps, key, f"{where}/data_per_streamline", ndim, "biuf", max_bytes)
            if d.shape[0] != n:
                raise StoreError(f"{where}/data_per_streamline/{key}: {d.shape[0]} entries, "
                                 f"expected one per streamline ({n})")
            info.dps[key] = (tuple(d.shape), d.dtype)
    return info


def to_voxel_centre(points: np.ndarray, info: StreamlineInfo) -> np.ndarray:
    """dwi_ml points (its space and origin) as voxel coordinates with the origin at the voxel
    centre (tractrain's convention), float64."""
    pts = np.asarray(points, dtype=np.float64)
    if info.space == "Space.RASMM":
        inverse = np.linalg.inv(info.affine)
        return pts @ inverse[:3, :3].T + inverse[:3, 3]
    if info.space == "Space.VOXMM":
        pts = pts / info.voxel_sizes
    return pts - 0.5 if info.origin == "Origin.TRACKVIS" else pts
