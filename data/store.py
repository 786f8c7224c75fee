"""Read-only access to a tractrain store (format v1, see docs/store-format.md).

``open_store(path, lazy=True)`` validates the schema and returns a `Store`. In lazy mode a
subject's volume is read on first use and kept in a byte-budget LRU cache; streamline
offsets/lengths are read once per subject; points of many streamlines are gathered in one
vectorised read. Non-lazy mode loads everything up front. A `Store` reopens its zarr handles
in each process, so one opened in a parent works in forked or spawned DataLoader workers.

A store is a local folder, a ``.zip`` of one (zarr ``ZipStore``, read-only; e.g. on shared
storage: one file instead of thousands of chunks) or any fsspec URL zarr can open
(``s3://...``, ``gs://...``, ``https://...``; ``storage_options`` go to fsspec).
"""

from __future__ import annotations

import ctypes
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from tractrain.data.cache import ByteLRU
from tractrain.data.format import (
    ALL_CHUNKS_ATTR,
    MAX_ARRAY_BYTES,
    STREAMLINE_ARRAYS,
    check_chunks,
    check_root_attrs,
    check_streamline_index,
    check_subjects,
)
from tractrain.errors import StoreError

DEFAULT_CACHE_BYTES = 2 * 2**30
MMAP_THRESHOLD = 4 * 2**20  # volumes (and any array) from this size are mmapped by glibc
_pinned_pid: int | None = None


def pin_mmap_threshold() -> None:
    """Make glibc serve allocations >= `MMAP_THRESHOLD` by mmap, given back when freed.

    glibc raises its mmap threshold (up to 32 MiB) after the first large free; from then on
    volumes come from the heap, and each evicted volume leaves fragmented heap behind, so
    peak RSS grows with the number of volumes read instead of staying within the cache
    budget. Fixing the threshold (``mallopt(M_MMAP_THRESHOLD)``) stops that. Once per
    process; no-op off glibc or when ``MALLOC_MMAP_THRESHOLD_`` is set.
    """
    global _pinned_pid
    if _pinned_pid == os.getpid() or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    _pinned_pid = os.getpid()
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(-3, MMAP_THRESHOLD)  # -3: M_MMAP_THRESHOLD


@dataclass(frozen=True)
class StreamlineIndex:
    """Per-subject streamline table: ``points[offsets[i]:offsets[i + 1]]`` is streamline i."""

    offsets: np.ndarray  # (S + 1,) int64
    lengths: np.ndarray  # (S,) int64, points per streamline
    lengths_mm: np.ndarray  # (S,) float32

    def __len__(self) -> int:
        return int(self.lengths.shape[0])


def expand_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for every (s, n), without a Python loop."""
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    block_starts = np.cumsum(lengths) - lengths
    shift = np.repeat(starts - block_starts, lengths)
    return shift + np.arange(total, dtype=np.int64)


def open_store(
    path: str | os.PathLike, lazy: bool = True, cache_bytes: int | None = DEFAULT_CACHE_BYTES,
    storage_options: dict | None = None, max_array_bytes: int = MAX_ARRAY_BYTES,
) -> Store:
    """Open the store at ``path`` read-only; raise `StoreError` if it is not a valid v1 store.

    Args:
        path: folder of the store (``*.zarr``), a ``.zip`` of it, or an fsspec URL.
        lazy: read volumes on first use (kept under ``cache_bytes``) instead of up front.
        cache_bytes: byte budget of the lazy volume cache (None: unbounded).
        storage_options: fsspec options for a URL (credentials, endpoint, ...).
        max_array_bytes: refuse a store declaring any array larger than this (uncompressed).

    Every attribute and array shape is checked at open (metadata only); an array's chunks are
    checked (none lost, declared size plausible for the bytes stored) before its first read.
    """
    return Store(path, lazy=lazy, cache_bytes=cache_bytes, storage_options=storage_options,
                 max_array_bytes=max_array_bytes)


def is_url(path: str | os.PathLike) -> bool:
    """True for an fsspec URL such as ``s3://bucket/x.zarr`` (not for a local path)."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def is_zip(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(".zip")


class _ZipStore(zarr.storage.ZipStore):
    """zarr's ZipStore whose ``list_prefix`` treats the prefix as a folder, like LocalStore
    (zarr 3.1's matches bare string prefixes: ``a/lengths`` also lists ``a/lengths_mm/...``,
    which breaks e.g. ``Array.nchunks_initialized``)."""

    async def list_prefix(self, prefix: str):
        folder = prefix.rstrip("/")
        async for key in self.list():
            if not folder or key == folder or key.startswith(folder + "/"):
                yield key


def _zip_prefix(path: str) -> str | None:
    """Folder inside the zip holding the store: None when ``zarr.json`` is at the top (zip of
    the store's contents), else the one top-level folder that has it (``zip -r x.zip
    store.zarr``)."""
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
    if "zarr.json" in names:
        return None
    tops = sorted({n.split("/")[0] for n in names if n.count("/") == 1
                   and n.endswith("/zarr.json")})
    return tops[0] if len(tops) == 1 else None


class Store:
    """A validated, read-only multisubject store. Build it with `open_store`."""

    def __init__(self, path, lazy: bool = True, cache_bytes: int | None = DEFAULT_CACHE_BYTES,
                 storage_options: dict | None = None, max_array_bytes: int = MAX_ARRAY_BYTES):
        if isinstance(path, str) and path.startswith("file://"):
            path = path[len("file://"):]
        self.path = path if is_url(path) else str(Path(path))
        self.storage_options = storage_options
        self.lazy = lazy
        self.cache_bytes = cache_bytes
        self._pid = None
        self._group = None
        self._reset_caches()
        self._verified: set[tuple] = set()  # arrays whose chunks were checked
        attrs = self._read_root_attrs()
        check_root_attrs(attrs, self.path)
        self.attrs = attrs
        self.subjects: list[str] = list(attrs["subjects"])
        self.splits: dict[str, list[str]] = {k: list(v) for k, v in attrs["splits"].items()}
        self.volume_groups: dict[str, dict] = dict(attrs["volume_groups"])
        self.streamline_groups: dict[str, dict] = dict(attrs["streamline_groups"])
        self.provenance: dict = dict(attrs["provenance"])
        self.all_chunks = attrs.get(ALL_CHUNKS_ATTR) is True  # else old: zero chunks skipped
        check_subjects(self._root(), self.path, self.subjects, self.volume_groups,
                       self.streamline_groups, max_array_bytes)
        if not lazy:
            self._load_all()

    # -- process-local handles -------------------------------------------------------------
    def _reset_caches(self) -> None:
        self._arrays: dict[tuple, zarr.Array] = {}
        self._indexes: dict[tuple, StreamlineIndex] = {}
        self._points: dict[tuple, np.ndarray] = {}
        self._infos: dict[tuple, dict] = {}
        self._volumes = ByteLRU(self.cache_bytes if self.lazy else None)

    def _root(self) -> zarr.Group:
        if self._group is None or self._pid != os.getpid():
            if self.lazy and self.cache_bytes is not None:
                pin_mmap_threshold()  # keeps peak RSS within the cache budget
            self._group = self._open_group()
            self._pid = os.getpid()
            self._arrays = {}
        return self._group

    def _open_group(self) -> zarr.Group:
        if is_url(self.path):
            return zarr.open_group(self.path, mode="r", storage_options=self.storage_options)
        if is_zip(self.path):
            return zarr.open_group(_ZipStore(self.path, mode="r"), mode="r",
                                   path=_zip_prefix(self.path))
        return zarr.open_group(self.path, mode="r")

    def _array(self, *keys: str) -> zarr.Array:
        if self._pid != os.getpid():
            self._group = None
        root = self._root()
        if keys not in self._arrays:
            self._arrays[keys] = root["/".join(keys)]
        return self._arrays[keys]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_group=None, _pid=None, _arrays={})
        if self.lazy:  # a worker reloads what it needs; don't ship the parent's cache
            state.update(_volumes=ByteLRU(self.cache_bytes), _points={})
        return state

    # -- validation ------------------------------------------------------------------------
    def _read_root_attrs(self) -> dict:
        if is_zip(self.path) and not is_url(self.path):
            if not zipfile.is_zipfile(self.path):
                raise StoreError(f"{self.path}: no such store (expected a zip file of a folder "
                                 "written by tractrain-build-store)")
        elif not is_url(self.path) and not Path(self.path).is_dir():
            raise StoreError(f"{self.path}: no such store (expected a folder written by "
                             "tractrain-build-store)")
        try:
            return self._root().attrs.asdict()
        except (FileNotFoundError, KeyError, ValueError, TypeError, OSError) as err:
            raise StoreError(f"{self.path}: not a tractrain store (no zarr group: {err})") from None

    def _verified_array(self, *keys: str) -> zarr.Array:
        """The array at ``keys``, its chunks checked once (none lost, size plausible)."""
        arr = self._array(*keys)
        if keys not in self._verified:
            check_chunks(f"{self.path}: {'/'.join(keys[:-1])}", {keys[-1]: arr},
                         complete=self.all_chunks or keys[-1] in STREAMLINE_ARRAYS)
            self._verified.add(keys)
        return arr

    def _check(self, subject: str, group: str, kind: dict) -> None:
        if subject not in self.subjects:
            raise StoreError(f"{self.path}: unknown subject {subject!r}")
        if group not in kind:
            raise StoreError(f"{self.path}: unknown group {group!r} (have {sorted(kind)})")

    def _load_all(self) -> None:
        for subject in self.subjects:
            for name in self.volume_groups:
                self.volume(subject, name)
            for name in self.streamline_groups:
                self.streamline_index(subject, name)
                self._points[(subject, name)] = self._array(subject, name, "points")[...]

    # -- public reads ----------------------------------------------------------------------
    def streamline_index(self, subject: str, group: str) -> StreamlineIndex:
        """Offsets, lengths (points) and lengths (mm) of a subject's streamlines; read once."""
        key = (subject, group)
        if key not in self._indexes:
            self._check(subject, group, self.streamline_groups)
            # a lost chunk would read as zeros
            arrays = {k: self._verified_array(subject, group, k) for k in STREAMLINE_ARRAYS}
            where = f"{self.path}: {subject}/{group}"
            index = StreamlineIndex(
                offsets=np.asarray(arrays["offsets"][...], dtype=np.int64),
                lengths=np.asarray(arrays["lengths"][...], dtype=np.int64),
                lengths_mm=np.asarray(arrays["lengths_mm"][...], dtype=np.float32),
            )
            check_streamline_index(where, index.offsets, index.lengths, arrays["points"].shape[0])
            self._indexes[key] = index
        return self._indexes[key]

    def gather(self, subject: str, group: str, ids) -> tuple[np.ndarray, np.ndarray]:
        """Points (M, 3) float32 and lengths (k,) of streamlines ``ids``, in the order given.

        One vectorised read of the needed points (never one read per streamline).
        """
        index = self.streamline_index(subject, group)
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(index)):
            raise StoreError(f"{self.path}: {subject}/{group}: streamline ids out of range "
                             f"[0, {len(index)})")
        starts, lengths = index.offsets[ids], index.lengths[ids]
        if not self.lazy or (subject, group) in self._points:
            return self._points[(subject, group)][expand_ranges(starts, lengths)], lengths
        array = self._array(subject, group, "points")
        if self.cache_bytes is None or array.nbytes <= self.cache_bytes // 4:
            # small enough: read the subject's points once, keep them under the byte budget
            points = self._volumes.get((subject, group, "points"), lambda: array[...])
            return points[expand_ranges(starts, lengths)], lengths
        order = np.argsort(starts, kind="stable")
        sorted_lengths = lengths[order]
        data = array.oindex[
            expand_ranges(starts[order], sorted_lengths)
        ]
        if np.all(order[1:] > order[:-1]):  # ids were already in storage order
            return np.asarray(data, dtype=np.float32), lengths
        block = np.empty_like(order)
        block[order] = np.cumsum(sorted_lengths) - sorted_lengths
        return np.asarray(data[expand_ranges(block, lengths)], dtype=np.float32), lengths

    def dps(self, subject: str, group: str, key: str, ids) -> np.ndarray:
        """Data-per-streamline ``key`` for streamlines ``ids``."""
        self._check(subject, group, self.streamline_groups)
        if key not in self.streamline_groups[group].get("dps_keys", []):
            raise StoreError(f"{self.path}: {group}: no data-per-streamline {key!r}")
        arr = self._verified_array(subject, group, "dps", key)
        return np.asarray(arr.oindex[np.asarray(ids)])

    def volume(self, subject: str, group: str) -> np.ndarray:
        """The (X, Y, Z, F) volume of a subject; cached under the byte budget when lazy."""
        self._check(subject, group, self.volume_groups)
        return self._volumes.get((subject, group),
                                 lambda: self._verified_array(subject, group)[...])

    def volume_info(self, subject: str, group: str) -> dict:
        """Affine, voxel sizes, feature names, shape and standardization of a volume."""
        key = ("volume", subject, group)
        if key not in self._infos:  # read-only store: read the attributes once
            self._check(subject, group, self.volume_groups)
            arr = self._array(subject, group)
            info = arr.attrs.asdict()
            info["affine"] = np.asarray(info["affine"], dtype=np.float64)
            info["voxel_sizes"] = np.asarray(info["voxel_sizes"], dtype=np.float64)
            info["shape"] = tuple(arr.shape)
            self._infos[key] = info
        return dict(self._infos[key])

    def streamline_info(self, subject: str, group: str) -> dict:
        """Affine and voxel sizes of the space the streamlines' voxel coordinates refer to."""
        key = ("streamlines", subject, group)
        if key not in self._infos:
            self._check(subject, group, self.streamline_groups)
            info = self._root()[f"{subject}/{group}"].attrs.asdict()
            info["affine"] = np.asarray(info["affine"], dtype=np.float64)
            info["voxel_sizes"] = np.asarray(info["voxel_sizes"], dtype=np.float64)
            self._infos[key] = info
        return dict(self._infos[key])

    @property
    def cache(self) -> ByteLRU:
        """The volume cache (``hits``, ``misses``, ``evictions``, ``nbytes``)."""
        return self._volumes

    def __repr__(self) -> str:
        return (f"Store({self.path!r}, lazy={self.lazy}, subjects={len(self.subjects)}, "
                f"volumes={list(self.volume_groups)}, streamlines={list(self.streamline_groups)})")


def store_array(store: Store, subject: str, group: str, name: str | None = None) -> zarr.Array:
    """The zarr array of a volume group (``name`` None) or of a streamline group's ``name``
    (e.g. ``"points"``), its chunks checked: for reads in blocks that bypass the caches."""
    store._check(subject, group, store.volume_groups if name is None else store.streamline_groups)
    return store._verified_array(subject, group, *(() if name is None else (name,)))
