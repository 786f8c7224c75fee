"""Vectorised streamline augmentations on flat arrays.

A batch of B streamlines is ``points`` (M, 3) float32, all streamlines concatenated in voxel
coordinates, and ``lengths`` (B,) int64, points per streamline. Distances are in mm: a voxel
offset ``d`` measures ``|d * voxel_sizes|`` mm (the affine is treated as an axis-aligned scaling).

Every function is pure: inputs are never modified, randomness comes only from the
``numpy.random.Generator`` passed in, and the same inputs with the same generator state give the
same outputs. Resampling and compression use dipy's compiled routines on a
``nibabel.streamlines.ArraySequence`` that views the flat arrays; split, reverse and noise are
index arithmetic / array operations over the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from dipy.tracking.streamlinespeed import compress_streamlines, length, set_number_of_points
from nibabel.streamlines import ArraySequence
from scipy.special import ndtr, ndtri

from tractrain.errors import ConfigError

__all__ = [
    "AugmentConfig",
    "add_noise",
    "apply_augment",
    "compress",
    "resample",
    "reverse",
    "split",
]


@dataclass(frozen=True)
class AugmentConfig:
    """What ``augment`` does to a batch.

    Attributes:
        step_size: resample every streamline to this step (mm); None keeps the points.
        compress: compress streamlines with this tolerance (mm) instead of resampling.
        split_ratio: share of the batch's streamlines split in two at a random point.
        reverse_ratio: share of the batch's streamlines whose point order is reversed.
        noise_mm: std (mm) of the gaussian noise added to every coordinate; 0 for none.
        noise_truncation: noise is truncated at +/- this many std.
    """

    step_size: float | None = None
    compress: float | None = None
    split_ratio: float = 0.0
    reverse_ratio: float = 0.0
    noise_mm: float = 0.0
    noise_truncation: float = 2.0

    def __post_init__(self) -> None:
        for name in ("split_ratio", "reverse_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"augment.{name}: expected a ratio in [0, 1], got {value!r}")
        if self.step_size is not None and not self.step_size > 0:
            raise ConfigError(
                f"augment.step_size: expected a positive step in mm, got {self.step_size!r}"
                " (a negative step size or zero)"
            )
        if self.compress is not None and not self.compress > 0:
            raise ConfigError(
                f"augment.compress: expected a positive tolerance in mm, got {self.compress!r}"
            )
        if self.step_size is not None and self.compress is not None:
            raise ConfigError(
                "augment.step_size and augment.compress: expected at most one of them, got both"
            )
        if not self.noise_mm >= 0:
            raise ConfigError(f"augment.noise_mm: expected a std >= 0 mm, got {self.noise_mm!r}")
        if not self.noise_truncation > 0:
            raise ConfigError(
                "augment.noise_truncation: expected a positive number of std, got "
                f"{self.noise_truncation!r}"
            )

    @property
    def is_random(self) -> bool:
        """True when split, reverse or noise is active (the output depends on the rng)."""
        return self.split_ratio > 0 or self.reverse_ratio > 0 or self.noise_mm > 0

    def deterministic(self) -> AugmentConfig:
        """Copy keeping resampling/compression only (for validation batches)."""
        return replace(self, split_ratio=0.0, reverse_ratio=0.0, noise_mm=0.0)


# ---------------------------------------------------------------------------------- helpers


def _check(points, lengths, voxel_sizes=None):
    points = np.asarray(points)
    lengths = np.asarray(lengths)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ConfigError(f"points: expected an (M, 3) array, got shape {points.shape}")
    if lengths.ndim != 1 or (lengths.size and lengths.min() < 0):
        raise ConfigError("lengths: expected a 1-D array of non-negative point counts")
    lengths = lengths.astype(np.int64, copy=False)
    if int(lengths.sum()) != points.shape[0]:
        raise ConfigError(
            f"lengths: expected them to sum to the {points.shape[0]} points, "
            f"got {int(lengths.sum())}"
        )
    if voxel_sizes is None:
        return points, lengths, None
    vs = np.asarray(voxel_sizes, dtype=np.float64)
    if vs.shape != (3,) or not np.all(vs > 0):
        raise ConfigError(f"voxel_sizes: expected 3 positive sizes in mm, got {voxel_sizes!r}")
    return points, lengths, vs


def _offsets(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths, dtype=np.int64)])


def _sequence(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> ArraySequence:
    """ArraySequence viewing ``data`` (no copy); streamline i is data[starts[i]:+lengths[i]]."""
    seq = ArraySequence()
    seq._data = data
    seq._offsets = np.asarray(starts, dtype=np.intp)
    seq._lengths = np.asarray(lengths, dtype=np.intp)
    return seq


def _count(n: int, ratio: float) -> int:
    """floor(n * ratio), robust to float round-off (0.3 * 10 is 3, not 2)."""
    return int(math.floor(n * ratio + 1e-9))


def _rows_of_points(lengths: np.ndarray) -> np.ndarray:
    """(M,) index of the streamline each point belongs to."""
    return np.repeat(np.arange(lengths.shape[0]), lengths)


# ---------------------------------------------------------------------------- operations


def resample(
    points: np.ndarray, lengths: np.ndarray, step_size_mm: float, voxel_sizes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Resample every streamline to a constant step of about ``step_size_mm`` mm.

    A streamline of arc length L mm gets ``max(2, round(L / step) + 1)`` equally spaced points
    (endpoints kept). Streamlines with fewer than 2 points are kept as they are; a streamline of
    zero length becomes its first point twice. dipy's ``set_number_of_points`` takes a single
    count, so streamlines are grouped by target count: one compiled call per distinct count (at
    most longest_mm / step + 1 calls, about 100 for a batch of 5000 streamlines up to 100 mm at
    1 mm), each on an ArraySequence viewing the flat array; no per-streamline Python work.

    Returns:
        (points (M', 3) float32, lengths (B,) int64).
    """
    points, lengths, vs = _check(points, lengths, voxel_sizes)
    if not step_size_mm > 0:
        raise ConfigError(f"step_size_mm: expected a positive step in mm, got {step_size_mm!r}")
    if lengths.size == 0:
        return points.astype(np.float32), lengths.copy()
    offsets = _offsets(lengths)
    mm = points.astype(np.float64) * vs
    arc = np.asarray(length(_sequence(mm, offsets[:-1], lengths)), dtype=np.float64)
    counts = np.maximum(2, np.rint(arc / step_size_mm).astype(np.int64) + 1)
    keep = lengths < 2
    counts[keep] = lengths[keep]
    flat = ~keep & (arc <= 0)  # zero-length streamlines: dipy would divide by zero
    new_offsets = _offsets(counts)
    out = np.empty((int(new_offsets[-1]), 3), dtype=np.float64)

    # Streamlines copied through: too short to resample, or all points coincident.
    copied = np.flatnonzero(keep | flat)
    if copied.size:
        dst_rows = np.repeat(copied, counts[copied])
        within = np.arange(dst_rows.size) - np.repeat(
            np.cumsum(counts[copied]) - counts[copied], counts[copied]
        )
        src = offsets[dst_rows] + np.where(flat[dst_rows], 0, within)
        out[new_offsets[dst_rows] + within] = mm[src]

    todo = ~keep & ~flat
    for n in np.unique(counts[todo]):
        rows = np.flatnonzero(todo & (counts == n))
        res = set_number_of_points(_sequence(mm, offsets[rows], lengths[rows]), int(n))
        dst = (new_offsets[rows][:, None] + np.arange(n)).ravel()
        out[dst] = res._data  # dipy's fresh (len(rows) * n, 3) buffer, in order; no copy
    return (out / vs).astype(np.float32), counts


def compress(
    points: np.ndarray, lengths: np.ndarray, tol_mm: float, voxel_sizes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Compress streamlines (dipy ``compress_streamlines``): drop points that lie within
    ``tol_mm`` mm of the simplified polyline; kept segments are at most 10 mm (dipy default).

    Returns:
        (points (M', 3) float32, lengths (B,) int64); kept points are original points.
    """
    points, lengths, vs = _check(points, lengths, voxel_sizes)
    if not tol_mm > 0:
        raise ConfigError(f"tol_mm: expected a positive tolerance in mm, got {tol_mm!r}")
    if lengths.size == 0:
        return points.astype(np.float32), lengths.copy()
    offsets = _offsets(lengths)
    mm = points.astype(np.float64) * vs
    pieces = compress_streamlines(_sequence(mm, offsets[:-1], lengths), tol_error=tol_mm)
    new_lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    out = np.concatenate(pieces, axis=0) if new_lengths.sum() else np.empty((0, 3))
    return (out / vs).astype(np.float32), new_lengths


def split(
    points: np.ndarray,
    lengths: np.ndarray,
    ratio: float,
    rng: np.random.Generator,
    min_points: int = 6,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split ``floor(B * ratio)`` streamlines in two at a random point.

    Only streamlines with at least ``2 * min_points`` points are eligible; if fewer are
    eligible than asked for, all eligible ones are split. The chosen streamlines are drawn
    uniformly without replacement, and each cut is uniform so that both halves keep at least
    ``min_points`` points. The halves replace their parent in place (first half first), so
    ``points`` is unchanged: only the lengths change.

    Returns:
        (points, lengths (B',) int64, parent (B',) int64): ``parent[j]`` is the input row
        output streamline ``j`` comes from (both halves share it).
    """
    points, lengths, _ = _check(points, lengths)
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"split ratio: expected a ratio in [0, 1], got {ratio!r}")
    if int(min_points) < 1:
        raise ConfigError(f"min_points: expected at least 1, got {min_points!r}")
    b = lengths.shape[0]
    eligible = np.flatnonzero(lengths >= 2 * min_points)
    k = min(_count(b, ratio), eligible.size)
    if k == 0:
        return points, lengths.copy(), np.arange(b, dtype=np.int64)
    chosen = np.sort(rng.choice(eligible, size=k, replace=False))
    cuts = rng.integers(min_points, lengths[chosen] - min_points, endpoint=True)
    pieces = np.ones(b, dtype=np.int64)
    pieces[chosen] = 2
    parent = np.repeat(np.arange(b, dtype=np.int64), pieces)
    new_lengths = lengths[parent]
    first = np.cumsum(pieces)[chosen] - 2  # output row of each chosen streamline's first half
    new_lengths[first] = cuts
    new_lengths[first + 1] = lengths[chosen] - cuts
    return points, new_lengths, parent


def reverse(
    points: np.ndarray, lengths: np.ndarray, ratio: float, rng: np.random.Generator
) -> np.ndarray:
    """Reverse the point order of ``floor(B * ratio)`` streamlines drawn without replacement.

    One gather over all M points; lengths are unchanged. Returns a new (M, 3) array.
    """
    points, lengths, _ = _check(points, lengths)
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"reverse ratio: expected a ratio in [0, 1], got {ratio!r}")
    b = lengths.shape[0]
    k = _count(b, ratio)
    if k == 0:
        return points.copy()
    selected = np.zeros(b, dtype=bool)
    selected[rng.choice(b, size=k, replace=False)] = True
    offsets = _offsets(lengths)
    rows = _rows_of_points(lengths)
    index = np.arange(points.shape[0], dtype=np.int64)
    flip = selected[rows]
    # Point at offset + p of a reversed streamline takes the point at offset + L - 1 - p.
    index[flip] = 2 * offsets[rows[flip]] + lengths[rows[flip]] - 1 - index[flip]
    return points[index]


def add_noise(
    points: np.ndarray,
    noise_mm: float,
    truncation: float,
    rng: np.random.Generator,
    voxel_sizes: np.ndarray,
) -> np.ndarray:
    """Add truncated gaussian noise to every coordinate.

    The noise has the law of a gaussian of std ``noise_mm`` mm *conditioned* on lying within
    +/- ``truncation`` std (an exact truncated normal, drawn by inverse CDF: nothing is
    clipped, values are as if redrawn), so its actual std is a bit below ``noise_mm``
    (about 0.88 x at 2 std). Each axis is converted to voxel units with ``voxel_sizes``.
    Returns a new (M, 3) float32 array.
    """
    points, _, vs = _check(points, np.array([len(points)]), voxel_sizes)
    if not noise_mm >= 0:
        raise ConfigError(f"noise_mm: expected a std >= 0 mm, got {noise_mm!r}")
    if not truncation > 0:
        raise ConfigError(
            f"noise truncation: expected a positive number of std, got {truncation!r}"
        )
    if noise_mm == 0 or points.shape[0] == 0:
        return points.astype(np.float32, copy=True)
    lo, hi = ndtr(-truncation), ndtr(truncation)
    z = ndtri(lo + rng.random(points.shape) * (hi - lo))
    np.clip(z, -truncation, truncation, out=z)  # guards only the CDF round-off at the bounds
    return (points + z * (noise_mm / vs)).astype(np.float32)


def apply_augment(
    points: np.ndarray,
    lengths: np.ndarray,
    config: AugmentConfig,
    rng: np.random.Generator,
    voxel_sizes: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply ``config``: resample or compress, then split, reverse, noise (in that order).

    Returns:
        (points float32, lengths int64, parent int64): ``parent`` maps each output streamline
        to its input row (the identity unless streamlines were split). With nothing to do the
        input arrays may be returned as they are (never modified).
    """
    points, lengths, vs = _check(points, lengths, voxel_sizes)
    points = points.astype(np.float32, copy=False)
    parent = np.arange(lengths.shape[0], dtype=np.int64)
    if config.step_size is not None:
        points, lengths = resample(points, lengths, config.step_size, vs)
    elif config.compress is not None:
        points, lengths = compress(points, lengths, config.compress, vs)
    if config.split_ratio > 0:
        points, lengths, parent = split(points, lengths, config.split_ratio, rng)
    if config.reverse_ratio > 0:
        points = reverse(points, lengths, config.reverse_ratio, rng)
    if config.noise_mm > 0:
        points = add_noise(points, config.noise_mm, config.noise_truncation, rng, vs)
    return points, lengths, parent
