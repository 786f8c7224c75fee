"""TRX tractograms (trx-python): read one for the store builder, write one for tractrain-track.

A TRX file holds its points in RAS+ mm and its space in its header (``VOXEL_TO_RASMM``,
``DIMENSIONS``), so it needs no reference volume. `read_trx` copies what the builder needs out
of trx-python's memory maps and closes the file (which also removes the folder trx-python
unpacks a compressed file into); `write_trx` writes streamlines given in RAS+ mm with the
header of a reference grid (trx-python, a dependency of tractrain and of dipy).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tractrain.errors import ConfigError

INSTALL = "pip install trx-python"


def check_available(path: str | os.PathLike, what: str):
    """trx-python's ``trx_file_memmap`` module; one-line `ConfigError` naming ``path`` (and
    how to install it) if trx-python is missing."""
    try:
        from trx import trx_file_memmap
    except ImportError:
        raise ConfigError(f"{path}: {what} .trx needs the trx-python package ({INSTALL})") \
            from None
    return trx_file_memmap


def header_space(header: dict, path: str | os.PathLike) -> tuple[np.ndarray, list[int]]:
    """``(affine, dimensions)`` of a TRX header (``VOXEL_TO_RASMM``, ``DIMENSIONS``), checked:
    a finite invertible 4x4 matrix and three positive integers (the header is data)."""
    try:
        affine = np.asarray(header["VOXEL_TO_RASMM"], dtype=np.float64)
        dims = np.asarray(header["DIMENSIONS"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{path}: TRX header lacks a numeric VOXEL_TO_RASMM (4x4) or "
                          "DIMENSIONS (3 integers)") from None
    if affine.shape != (4, 4) or not np.isfinite(affine).all() \
            or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ConfigError(f"{path}: TRX header VOXEL_TO_RASMM: expected a finite, invertible "
                          f"4x4 matrix, got {affine.tolist()}")
    if dims.shape != (3,) or not np.isfinite(dims).all() or (dims < 1).any() \
            or (dims != np.round(dims)).any():
        raise ConfigError(f"{path}: TRX header DIMENSIONS: expected 3 positive integers, "
                          f"got {dims.tolist()}")
    return affine, [int(d) for d in dims]


def read_trx(path: str | os.PathLike):
    """``(points (M, 3) float32 RAS+ mm, lengths (S,) int64, data-per-streamline, affine,
    dimensions)`` of a .trx file; one-line `ConfigError` if it cannot be read."""
    module = check_available(path, "reading")
    try:
        trx = module.load(str(path))
    except Exception as err:  # zipfile, json, numpy and trx-python raise many types
        message = " ".join(str(err).split()) or type(err).__name__
        raise ConfigError(f"{path}: cannot read as TRX ({message[:200]})") from None
    try:
        affine, dims = header_space(trx.header, path)
        streamlines = trx.streamlines
        lengths = np.array(streamlines._lengths, dtype=np.int64)
        points = np.array(streamlines.get_data(), dtype=np.float32).reshape(-1, 3)
        dps = {key: np.array(value) for key, value in trx.data_per_streamline.items()}
    finally:
        trx.close()  # unmaps (hence the copies above) and removes an unpacked folder
    return points, lengths, dps, affine, dims


def write_trx(path: str | os.PathLike, streamlines: list[np.ndarray], affine: np.ndarray,
              dimensions) -> None:
    """Write ``streamlines`` (RAS+ mm) as an uncompressed .trx whose header is the grid
    ``affine``/``dimensions``."""
    module = check_available(path, "writing")
    from nibabel.streamlines import Tractogram

    tractogram = Tractogram(streamlines, affine_to_rasmm=np.eye(4))
    reference = {"NB_VERTICES": 0, "NB_STREAMLINES": 0,  # marks a TRX header for trx-python
                 "VOXEL_TO_RASMM": np.asarray(affine, dtype=np.float32),
                 "DIMENSIONS": np.asarray(dimensions, dtype=np.uint16)}
    trx = module.TrxFile.from_tractogram(tractogram, reference)
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        module.save(trx, str(path))
    finally:
        trx.close()
