"""Deterministic synthetic diffusion-MRI subjects (a phantom): writing their files and their
store-builder config (`make_phantom`), and a cached store of them (`demo_store`).

Each subject folder holds ``dwi.nii.gz`` (b0-normalised diffusion signal or its SH fit),
``mask.nii.gz`` (white matter: voxels the bundles cross, dilated by one voxel, 6-connected) and
``bundles.trk`` (ground-truth streamlines in RAS+ mm, one ``bundle`` value per streamline, a
random half stored end to start). The bundles' shapes (arcs, a crossing, a kissing pair, an
S-shape, fanning ends) are in `tractrain.data.phantom_bundles`, the diffusion signal in
`tractrain.data.phantom_signal`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.streamlines import ArraySequence, Field, Tractogram, TrkFile
from scipy import ndimage

from tractrain.atomic import atomic_write_dir, atomic_write_json, is_complete
from tractrain.data.format import SPLITS
from tractrain.data.phantom_bundles import (
    MAX_BUNDLES,
    bundle_box,
    bundle_templates,
    phantom_affine,
    reverse_some,
    subject_streamlines,
)
from tractrain.data.phantom_signal import (
    fit_sh,
    gradient_directions,
    noisy_normalised,
    point_tangents,
    simulate_signal,
    voxel_index,
)
from tractrain.errors import ConfigError

FEATURES = ("dwi", "sh")
PHANTOM_VERSION = 2  # part of demo_store's cache key: bump when the phantom's content changes


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, compresslevel: int) -> None:
    """Gzipped NIfTI-1 with fixed gzip mtime; noisy float volumes gain ~6% from compression
    at many times the cost, so they are stored with ``compresslevel=0``."""
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm")
    with open(path, "wb") as raw, gzip.GzipFile(
        filename="", mode="wb", fileobj=raw, compresslevel=compresslevel, mtime=0
    ) as f:
        img.to_stream(f)


def _save_trk(path: Path, points, lengths, bundle, affine, shape) -> None:
    header = {
        Field.VOXEL_TO_RASMM: affine.astype(np.float32),
        Field.DIMENSIONS: np.asarray(shape[:3], dtype=np.int16),
        Field.VOXEL_SIZES: np.abs(np.diag(affine)[:3]).astype(np.float32),
        Field.VOXEL_ORDER: "RAS",
    }
    streamlines = ArraySequence(np.split(points.astype(np.float32), np.cumsum(lengths)[:-1]))
    tractogram = Tractogram(
        streamlines,
        data_per_streamline={"bundle": bundle.astype(np.float32)[:, None]},
        affine_to_rasmm=np.eye(4),
    )
    TrkFile(tractogram, header=header).save(str(path))


def default_splits(subjects: list[str]) -> dict[str, list[str]]:
    """Last subject valid (n >= 2), the one before it test (n >= 4), the rest train."""
    n = len(subjects)
    valid = subjects[-1:] if n >= 2 else []
    test = subjects[-2:-1] if n >= 4 else []
    train = [s for s in subjects if s not in valid and s not in test]
    return {"train": train, "valid": valid, "test": test}


def _check_splits(splits: dict, subjects: list[str]) -> dict[str, list[str]]:
    if not isinstance(splits, dict) or set(splits) - set(SPLITS):
        raise ConfigError(f"splits: expected a dict with keys among {SPLITS}, got {splits!r}")
    out = {name: list(splits.get(name, [])) for name in SPLITS}
    seen: set[str] = set()
    for name, names in out.items():
        for s in names:
            if s not in subjects:
                raise ConfigError(f"splits.{name}: unknown subject {s!r}; expected one of "
                                  f"{subjects}")
            if s in seen:
                raise ConfigError(f"splits.{name}: subject {s!r} is in more than one split")
            seen.add(s)
    return out


def builder_config(subjects_splits: dict[str, list[str]]) -> dict:
    """The store-builder config for a phantom folder."""
    return {
        "groups": {
            "dwi": {"type": "volume", "files": ["dwi.nii.gz"], "standardization": "independent",
                    "mask": "mask.nii.gz"},
            "bundles": {"type": "streamlines", "files": ["bundles.trk"],
                        "reference": "dwi.nii.gz"},
        },
        "subjects": subjects_splits,
    }


def _validate(n_subjects, shape, voxel_size, n_bundles, streamlines_per_subject, step_mm,
              features, sh_order, snr, seed) -> tuple[int, int, int]:
    def positive_int(name, value):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ConfigError(f"{name}: expected a positive integer, got {value!r}")

    positive_int("n_subjects", n_subjects)
    positive_int("n_bundles", n_bundles)
    if n_bundles > MAX_BUNDLES:
        raise ConfigError(f"n_bundles: expected at most {MAX_BUNDLES} (the phantom's bundle "
                          f"catalogue), got {n_bundles}")
    positive_int("streamlines_per_subject", streamlines_per_subject)
    if streamlines_per_subject < n_bundles:
        raise ConfigError(f"streamlines_per_subject: expected at least n_bundles={n_bundles}, "
                          f"got {streamlines_per_subject}")
    if len(tuple(shape)) != 3:
        raise ConfigError(f"shape: expected 3 integers (X, Y, Z), got {shape!r}")
    for value in shape:
        positive_int("shape", value)
    for name, value in (("voxel_size", voxel_size), ("step_mm", step_mm)):
        if not isinstance(value, int | float) or not value > 0:
            raise ConfigError(f"{name}: expected a positive number of mm, got {value!r}")
    if features not in FEATURES:
        raise ConfigError(f"features: expected one of {FEATURES}, got {features!r}")
    if features == "sh":
        n_dirs = len(gradient_directions()[0])
        if not isinstance(sh_order, int) or sh_order < 2 or sh_order % 2:
            raise ConfigError(f"sh_order: expected an even integer >= 2, got {sh_order!r}")
        if (sh_order + 1) * (sh_order + 2) // 2 > n_dirs:
            raise ConfigError(f"sh_order: {sh_order} needs more coefficients than the "
                              f"{n_dirs} gradient directions")
    if snr is not None and (not isinstance(snr, int | float) or not snr > 0):
        raise ConfigError(f"snr: expected a positive number or None, got {snr!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"seed: expected a non-negative integer, got {seed!r}")
    return tuple(int(s) for s in shape)


def make_phantom(
    outdir: str | os.PathLike,
    n_subjects: int = 3,
    shape: tuple[int, int, int] = (32, 32, 20),
    voxel_size: float = 2.0,
    n_bundles: int = MAX_BUNDLES,
    streamlines_per_subject: int = 300,
    step_mm: float = 0.5,
    features: str = "dwi",
    sh_order: int = 8,
    snr: float | None = 30.0,
    seed: int = 0,
    splits: dict[str, list[str]] | None = None,
    *,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Write a synthetic multi-subject dataset and its builder ``config.json`` into ``outdir``.

    Same arguments give identical arrays; ``snr=None`` gives a noise-free signal. ``outdir``
    must be missing or empty unless ``overwrite`` (its content is then replaced as a whole,
    atomically). ``progress`` receives one line per subject. Returns a JSON-able summary.
    """
    shape = _validate(n_subjects, shape, voxel_size, n_bundles, streamlines_per_subject,
                      step_mm, features, sh_order, snr, seed)
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise ConfigError(f"outdir: {outdir} exists and is not a folder")
    if outdir.is_dir() and any(outdir.iterdir()) and not overwrite:
        raise ConfigError(f"outdir: {outdir} is not empty (pass overwrite=True to replace it)")
    width = max(2, len(str(n_subjects - 1)))
    subjects = [f"sub-{i:0{width}d}" for i in range(n_subjects)]
    split = default_splits(subjects) if splits is None else _check_splits(splits, subjects)
    affine = phantom_affine(shape, float(voxel_size))
    bundle_box(shape, affine, float(step_mm))  # fail before writing anything
    templates = bundle_templates(int(seed), n_bundles)
    summary: dict = {"outdir": str(outdir), "config": str(outdir / "config.json"),
                     "subjects": subjects, "splits": split, "features": features,
                     "shape": list(shape), "voxel_size": float(voxel_size), "files": {},
                     "n_streamlines": {}, "n_points": {}}

    def write(folder: Path) -> None:
        for i, subject in enumerate(subjects):
            rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(1, i)))
            points, lengths, bundle = subject_streamlines(
                templates, shape, affine, streamlines_per_subject, float(step_mm), rng
            )
            vox = voxel_index(points, affine, shape)
            tangents = point_tangents(points, lengths)
            signal = simulate_signal(vox, tangents, bundle, lengths, shape)
            data = noisy_normalised(signal, snr, rng)
            del signal
            if features == "sh":
                data = fit_sh(data, sh_order)
            points, _ = reverse_some(points, lengths, rng)  # after the signal: same fibres
            mask = np.zeros(int(np.prod(shape)), dtype=bool)
            mask[vox] = True
            mask = mask.reshape(shape)
            mask = ndimage.binary_dilation(mask, ndimage.generate_binary_structure(3, 1))
            sub = folder / subject
            sub.mkdir()
            _save_nifti(sub / "dwi.nii.gz", data, affine, compresslevel=0)
            _save_nifti(sub / "mask.nii.gz", mask.astype(np.uint8), affine, compresslevel=6)
            _save_trk(sub / "bundles.trk", points, lengths, bundle, affine, shape)
            summary["n_features"] = int(data.shape[-1])
            summary["n_streamlines"][subject] = int(len(lengths))
            summary["n_points"][subject] = int(lengths.sum())
            summary["files"][subject] = {
                name: str(outdir / subject / name)
                for name in ("dwi.nii.gz", "mask.nii.gz", "bundles.trk")
            }
            if progress is not None:
                progress(f"{subject}: {len(lengths)} streamlines, {int(lengths.sum())} points, "
                         f"{features} {tuple(data.shape)}, {int(mask.sum())} mask voxels")
        atomic_write_json(folder / "config.json", builder_config(split))

    atomic_write_dir(outdir, write)
    return summary


def demo_store_paths(cache_dir: str | os.PathLike, **phantom_kwargs) -> tuple[Path, Path]:
    """``(phantom folder, store)`` that `demo_store` uses under ``cache_dir`` (nothing built)."""
    text = json.dumps({**phantom_kwargs, "version": PHANTOM_VERSION}, sort_keys=True,
                      default=str)
    key = hashlib.sha256(text.encode()).hexdigest()[:12]
    return Path(cache_dir) / f"phantom-{key}", Path(cache_dir) / f"store-{key}.zarr"


def demo_store(cache_dir: str | os.PathLike, **phantom_kwargs):
    """Open (building it on first use) a store of a phantom, cached under ``cache_dir``.

    The cache key is a hash of ``phantom_kwargs`` and ``PHANTOM_VERSION``; needs
    ``tractrain.data.builder`` and ``tractrain.data.store``.
    """
    from tractrain.data.builder import build_store
    from tractrain.data.store import open_store

    root, store_path = demo_store_paths(cache_dir, **phantom_kwargs)
    rebuilt = not is_complete(root)
    if rebuilt:
        make_phantom(root, overwrite=True, **phantom_kwargs)
    if rebuilt or not store_path.exists():
        config = json.loads((root / "config.json").read_text())
        build_store(config, store_path, root, force=True, progress=False)
    return open_store(store_path)
