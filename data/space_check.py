"""Space checks of tractograms going into a store: streamline points must lie inside their
reference volume, and a ``.trk``'s ``voxel_order`` must agree with its ``vox_to_ras``.

Both catch the classic tractography data bug (a wrong reference, LPS vs RAS, a shifted header)
where it is made, at build or import time, instead of letting a model train on inputs that are
all zeros. Used by `tractrain.data.builder` and, batch by batch (`StreamedInsideCheck`), by
`tractrain.data.import_hdf5`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import nibabel as nib
import numpy as np
from nibabel.orientations import aff2axcodes

from tractrain.errors import StoreError

DEFAULT_TOLERANCE = 0.01  # share of points allowed outside the reference volume
OVERRIDE = "--allow-outside (config key 'allow_outside')"
CAUSES = "likely a wrong reference volume, an LPS/RAS mix-up or a shifted header"


def inside_mask(points_vox: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """(M,) bool: the points (voxel coordinates, origin at the centre of voxel 0) that lie in a
    voxel of a grid of ``shape`` (X, Y, Z), i.e. each coordinate in ``[-0.5, dim - 0.5]``.
    A NaN/inf point is outside."""
    points = np.asarray(points_vox, dtype=np.float64).reshape(-1, 3)
    high = np.asarray(shape[:3], dtype=np.float64) - 0.5
    return ((points >= -0.5) & (points <= high)).all(axis=1)


def outside_count(points_vox: np.ndarray, shape: Sequence[int]) -> int:
    """Number of points outside a grid of ``shape`` (see `inside_mask`)."""
    return int(np.asarray(points_vox).reshape(-1, 3).shape[0] - inside_mask(points_vox,
                                                                            shape).sum())


def check_inside(points_vox: np.ndarray, shape: Sequence[int], subject: str,
                 source: str | os.PathLike, tolerance: float = DEFAULT_TOLERANCE,
                 reference: str | None = None, override: str = OVERRIDE) -> float:
    """Share of ``points_vox`` outside a grid of ``shape``; raise `StoreError` (one line naming
    the subject, ``source``, the share outside, the likely causes and ``override``, the way
    to accept it) when it exceeds ``tolerance`` (a share: 0.01 is 1 % of the points)."""
    n = int(np.asarray(points_vox).reshape(-1, 3).shape[0])
    return refuse_outside(outside_count(points_vox, shape), n, shape, subject, source,
                          tolerance, reference, override)


def refuse_outside(out: int, n: int, shape: Sequence[int], subject: str,
                   source: str | os.PathLike, tolerance: float = DEFAULT_TOLERANCE,
                   reference: str | None = None, override: str = OVERRIDE) -> float:
    """``out / n``, the share of points outside a grid of ``shape``; the one-line `StoreError`
    of `check_inside` when it exceeds ``tolerance``."""
    share = out / n if n else 0.0
    if share > tolerance:
        ref = f" {reference}" if reference else ""
        dims = "x".join(str(int(d)) for d in shape[:3])
        raise StoreError(
            f"subject {subject}: {source}: {100 * share:.1f}% of streamline points ({out} of "
            f"{n}) lie outside the reference volume{ref} ({dims} voxels; tolerance "
            f"{100 * tolerance:g}%): {CAUSES}; pass {override} to accept it anyway")
    return share


class StreamedInsideCheck:
    """`check_inside` for points that arrive in batches (the HDF5 importer's ``check_points``):
    ``check(subject, group, points_vox, dims)`` per batch counts the points outside; the call
    with ``points_vox=None`` at the group's end raises as `check_inside` would."""

    def __init__(self, source: str | os.PathLike, tolerance: float = DEFAULT_TOLERANCE,
                 override: str = "--allow-outside") -> None:
        self.source, self.tolerance, self.override = source, tolerance, override
        self.counts = [0, 0]  # outside, total of the group under way

    def __call__(self, subject: str, group: str, points_vox: np.ndarray | None,
                 dims: Sequence[int]) -> None:
        if points_vox is not None:
            self.counts[0] += outside_count(points_vox, dims)
            self.counts[1] += int(np.asarray(points_vox).reshape(-1, 3).shape[0])
            return
        (out, n), self.counts = self.counts, [0, 0]
        refuse_outside(out, n, dims, subject, f"{self.source} group {group}", self.tolerance,
                       override=self.override)


def check_files_inside(points_vox: np.ndarray, lengths: np.ndarray,
                       files: Sequence[tuple[str | os.PathLike, int]], shape: Sequence[int],
                       subject: str, tolerance: float = DEFAULT_TOLERANCE,
                       reference: str | None = None, override: str = OVERRIDE) -> None:
    """`check_inside` file by file: ``points_vox``/``lengths`` are the streamlines of
    ``files`` (``(path, number of streamlines)``) concatenated in that order."""
    ends = np.concatenate([[0], np.cumsum(lengths)])
    first = 0
    for path, count in files:
        start, stop = int(ends[first]), int(ends[first + count])
        check_inside(points_vox[start:stop], shape, subject, path, tolerance, reference,
                     override)
        first += count


def voxel_order_mismatch(voxel_order: str, vox_to_ras: np.ndarray) -> str | None:
    """None when ``voxel_order`` (a .trk header's, e.g. ``"LPS"``) names the axes of
    ``vox_to_ras`` (nibabel's ``aff2axcodes``), else the axis codes the matrix implies."""
    implied = "".join(str(c) for c in aff2axcodes(np.asarray(vox_to_ras, dtype=np.float64)))
    return None if voxel_order.upper() == implied else implied


def check_trk_voxel_order(path: str | os.PathLike) -> None:
    """Raise `StoreError` when a .trk header's ``voxel_order`` disagrees with its
    ``vox_to_ras``: nibabel (and dipy) then silently flip the streamlines to reconcile them,
    mirroring them in the disagreeing axes. An empty voxel_order counts as ``LPS``, as they
    read it."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel warns about an empty voxel_order
        header = nib.streamlines.TrkFile.load(str(path), lazy_load=True).header
    raw = header[nib.streamlines.Field.VOXEL_ORDER]
    order = raw.decode("latin1") if isinstance(raw, bytes) else str(raw)
    order = order.strip("\0 ").upper() or "LPS"
    affine = np.asarray(header[nib.streamlines.Field.VOXEL_TO_RASMM], dtype=np.float64)
    implied = voxel_order_mismatch(order, affine)
    if implied is not None:
        raise StoreError(
            f"{path}: header voxel_order {order!r} disagrees with its vox_to_ras matrix, whose "
            f"axes are {implied!r}; nibabel and dipy would mirror the streamlines to reconcile "
            f"them; fix the header (set voxel_order to {implied!r} if vox_to_ras is right)")
