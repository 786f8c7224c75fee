"""Store format v1: names and schema checks shared by the builder and the reader.

See docs/store-format.md for the layout.
"""

from __future__ import annotations

import numpy as np
import zarr
from zarr.core.sync import sync

from tractrain.errors import StoreError

FORMAT_NAME = "tractrain-store"
FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
ALL_CHUNKS_ATTR = "all_chunks_written"  # root attribute: the builder wrote every chunk
STREAMLINE_ARRAYS = ("points", "offsets", "lengths", "lengths_mm")
DTYPES = ("float32", "float16")
VOXEL_MM = (0.01, 100.0)  # plausible voxel sizes
MAX_ARRAY_BYTES = 64 * 2**30  # default limit on one array's declared (uncompressed) size
MAX_COMPRESSION = 1000  # declared bytes per stored byte, beyond which an array is refused
MIN_RATIO_CHECKED = 64 * 2**20  # arrays declaring less are not ratio-checked
ROOT_KEYS = ("format", "version", "subjects", "splits", "volume_groups", "streamline_groups",
             "provenance")


def is_plain_name(name: object) -> bool:
    """True for a non-empty str usable as one path component (no separator, not ``.``/``..``)."""
    return (isinstance(name, str) and name not in ("", ".", "..")
            and not any(c in name for c in "/\\\0"))


def _names(value: object, where: str, plain: bool = True) -> list[str]:
    """``value`` as a list of unique str (plain names when ``plain``), else `StoreError`."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise StoreError(f"{where}: expected a list of strings, got {_short(value)}")
    bad = [v for v in value if plain and not is_plain_name(v)]
    if bad:
        raise StoreError(f"{where}: {bad[0]!r} is not a plain name (non-empty, no '/', "
                         "not '.' or '..')")
    if len(set(value)) != len(value):
        raise StoreError(f"{where}: names are not unique")
    return value


def _short(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _mapping(value: object, where: str) -> dict:
    if not isinstance(value, dict):
        raise StoreError(f"{where}: expected a mapping, got {_short(value)}")
    _names(list(value), where)
    return value


def check_root_attrs(attrs: dict, path: str) -> None:
    """Raise `StoreError` unless ``attrs`` are the root attributes of a v1 store, each of the
    type the format says (subjects and group names plain names)."""
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
    subjects = set(_names(attrs["subjects"], f"{path}: root attribute 'subjects'"))
    splits = attrs["splits"]
    if not isinstance(splits, dict) or set(splits) - set(SPLITS):
        raise StoreError(f"{path}: root attribute 'splits' must map {list(SPLITS)} to lists")
    for name, ids in splits.items():
        unknown = sorted(set(_names(ids, f"{path}: split {name!r}")) - subjects)
        if unknown:
            raise StoreError(f"{path}: split {name!r} lists subjects {unknown} not in 'subjects'")
    for name, meta in _mapping(attrs["volume_groups"], f"{path}: 'volume_groups'").items():
        where = f"{path}: volume_groups.{name}"
        _mapping(meta, where)
        features = _names(meta.get("feature_names"), f"{where}.feature_names", plain=False)
        if meta.get("n_features") != len(features):
            raise StoreError(f"{where}.n_features: expected {len(features)} (one per feature "
                             f"name), got {_short(meta.get('n_features'))}")
        if meta.get("dtype") not in DTYPES:
            raise StoreError(f"{where}.dtype: expected one of {DTYPES}, got "
                             f"{_short(meta.get('dtype'))}")
    for name, meta in _mapping(attrs["streamline_groups"], f"{path}: 'streamline_groups'").items():
        _names(_mapping(meta, f"{path}: streamline_groups.{name}").get("dps_keys", []),
               f"{path}: streamline_groups.{name}.dps_keys")
    if not isinstance(attrs["provenance"], dict):
        raise StoreError(f"{path}: root attribute 'provenance': expected a mapping")


def check_affine(value: object, where: str) -> np.ndarray:
    """``value`` as a finite, invertible 4x4 affine (last row 0 0 0 1), else `StoreError`."""
    try:
        affine = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        affine = None
    if affine is None or affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise StoreError(f"{where}: expected a finite 4x4 numeric matrix, got {_short(value)}")
    if not np.array_equal(affine[3], [0, 0, 0, 1]) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise StoreError(f"{where}: affine is not invertible (singular, or last row not "
                         "0 0 0 1)")
    return affine


def check_voxel_sizes(value: object, where: str) -> np.ndarray:
    """``value`` as 3 finite voxel sizes within `VOXEL_MM`, else `StoreError`."""
    try:
        sizes = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        sizes = np.zeros(0)
    low, high = VOXEL_MM
    if sizes.shape != (3,) or not (np.isfinite(sizes) & (sizes >= low) & (sizes <= high)).all():
        raise StoreError(f"{where}: expected 3 voxel sizes between {low} and {high} mm, got "
                         f"{_short(value)}")
    return sizes


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


async def _stored(arr: zarr.Array) -> tuple[int, int]:
    store, prefix = arr.store_path.store, arr.store_path.path
    encoding, grid = arr.metadata.chunk_key_encoding, arr.cdata_shape
    count = size = 0
    async for key in store.list_prefix(prefix):
        relative = key[len(prefix):].lstrip("/")
        parts = relative.split(encoding.separator)
        if getattr(encoding, "name", "") == "default":
            parts = parts[1:]  # "c/i/j/k"
        try:
            coords = tuple(int(p) for p in parts)
        except ValueError:
            continue  # metadata, not a chunk
        if (len(coords) == len(grid) and encoding.encode_chunk_key(coords) == relative
                and all(0 <= c < g for c, g in zip(coords, grid, strict=True))):
            count += 1
            size += await store.getsize(key)
    return count, size


def stored_chunks(arr: zarr.Array) -> tuple[int, int]:
    """Number of chunks of ``arr`` present in its store and their total size in bytes: one
    listing of the array's keys (never a loop over the chunk grid)."""
    return sync(_stored(arr))


def check_chunks(where: str, arrays: dict, complete: bool = True) -> None:
    """Raise `StoreError` if any of ``{name: zarr array}`` lacks a chunk (deleted, lost: it
    would read as the fill value; checked when ``complete``, i.e. the store holds every chunk)
    or declares far more data than its chunks could hold."""
    for name, arr in arrays.items():
        count, size = stored_chunks(arr)
        if complete and count < arr.nchunks:
            raise StoreError(f"{where}/{name}: {arr.nchunks - count} of {arr.nchunks} chunks "
                             "missing (store damaged; rebuild it)")
        declared = arr.nbytes
        if declared > MIN_RATIO_CHECKED and declared > MAX_COMPRESSION * size:
            raise StoreError(f"{where}/{name}: declared shape {tuple(arr.shape)} "
                             f"({declared} bytes) is more than {MAX_COMPRESSION}x its "
                             f"{size} stored bytes (store damaged or crafted)")


def _open(root: zarr.Group, key: str, where: str, kind=zarr.Array, what: str = "array"):
    try:
        node = root[key]
    except KeyError:
        node = None
    except Exception as err:  # zarr raises many types for malformed metadata
        raise StoreError(f"{where}: unreadable metadata ({' '.join(str(err).split())[:160]})"
                         ) from None
    if not isinstance(node, kind):
        raise StoreError(f"{where}: {what} missing")
    return node


def check_array(where: str, arr: zarr.Array, ndim: int, kinds: str, max_bytes: int,
                trailing: int | None = None) -> None:
    """Raise `StoreError` unless ``arr`` has ``ndim`` non-negative dimensions (the last one
    ``trailing`` if given), a dtype kind in ``kinds`` and declares at most ``max_bytes``."""
    shape = tuple(arr.shape)
    if len(shape) != ndim or any(not isinstance(n, int) or n < 0 for n in shape):
        raise StoreError(f"{where}: expected a {ndim}-D array, got shape {shape}")
    if trailing is not None and shape[-1] != trailing:
        raise StoreError(f"{where}: expected {trailing} entries on the last axis, got "
                         f"shape {shape}")
    if arr.dtype.kind not in kinds:
        raise StoreError(f"{where}: dtype {arr.dtype} is not of kind {kinds!r}")
    if arr.nbytes > max_bytes:
        raise StoreError(f"{where}: declared shape {shape} ({arr.nbytes} bytes) exceeds the "
                         f"limit of {max_bytes} bytes (max_array_bytes)")


def _check_volume(root, where: str, key: str, meta: dict, max_bytes: int) -> None:
    arr = _open(root, key, where, what="volume group")
    if str(arr.dtype) != meta["dtype"]:
        raise StoreError(f"{where}: dtype {arr.dtype} differs from the group's "
                         f"{meta['dtype']}")
    check_array(where, arr, 4, "f", max_bytes, trailing=meta["n_features"])
    features = arr.attrs.get("feature_names")
    if features != list(meta["feature_names"]):
        raise StoreError(f"{where}: features {_short(features)} differ from the group's "
                         f"{list(meta['feature_names'])} (all subjects must share features)")
    check_affine(arr.attrs.get("affine"), f"{where}: attribute 'affine'")
    check_voxel_sizes(arr.attrs.get("voxel_sizes"), f"{where}: attribute 'voxel_sizes'")


def _check_streamlines(root, where: str, key: str, meta: dict, max_bytes: int) -> None:
    grp = _open(root, key, where, zarr.Group, "streamline group")
    missing = [k for k in STREAMLINE_ARRAYS if k not in set(grp.array_keys())]
    if missing:
        raise StoreError(f"{where}: arrays {missing} missing")
    arrays = {k: _open(root, f"{key}/{k}", f"{where}/{k}") for k in STREAMLINE_ARRAYS}
    check_array(f"{where}/points", arrays["points"], 2, "f", max_bytes, trailing=3)
    n = arrays["lengths"].shape[0] if arrays["lengths"].ndim == 1 else -1
    for name, kinds, size in (("lengths", "iu", n), ("offsets", "iu", n + 1),
                              ("lengths_mm", "f", n)):
        check_array(f"{where}/{name}", arrays[name], 1, kinds, max_bytes)
        if arrays[name].shape[0] != size:
            raise StoreError(f"{where}/{name}: expected {size} entries (one per streamline"
                             f"{', plus one' if name == 'offsets' else ''}), got "
                             f"{arrays[name].shape[0]}")
    attrs = grp.attrs.asdict()
    check_affine(attrs.get("affine"), f"{where}: attribute 'affine'")
    check_voxel_sizes(attrs.get("voxel_sizes"), f"{where}: attribute 'voxel_sizes'")
    dims = attrs.get("dimensions")
    if not isinstance(dims, list) or len(dims) != 3 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise StoreError(f"{where}: attribute 'dimensions': expected 3 non-negative ints, got "
                         f"{_short(dims)}")
    dps = _names(attrs.get("dps_keys", []), f"{where}: attribute 'dps_keys'")
    if sorted(dps) != sorted(meta.get("dps_keys", [])):
        raise StoreError(f"{where}: data-per-streamline keys {sorted(dps)} differ from the "
                         f"group's {sorted(meta.get('dps_keys', []))}")


def check_subjects(root: zarr.Group, path: str, subjects: list[str], volume_groups: dict,
                   streamline_groups: dict, max_array_bytes: int = MAX_ARRAY_BYTES) -> None:
    """Raise `StoreError` unless every subject under ``root`` has every group of the store:
    volumes (X, Y, Z, F) with the group's features and dtype, streamline arrays of consistent
    shapes and dtypes; affines finite and invertible, voxel sizes plausible, no array
    declaring more than ``max_array_bytes``. Reads metadata only, never data."""
    for subject in subjects:
        for name, meta in volume_groups.items():
            _check_volume(root, f"{path}: {subject}/{name}", f"{subject}/{name}", meta,
                          max_array_bytes)
        for name, meta in streamline_groups.items():
            _check_streamlines(root, f"{path}: {subject}/{name}", f"{subject}/{name}", meta,
                               max_array_bytes)
