"""Deterministic synthetic diffusion-MRI subjects (a phantom) and their store-builder config.

Each subject folder holds ``dwi.nii.gz`` (b0-normalised diffusion signal or its SH fit),
``mask.nii.gz`` (white matter: voxels the bundles cross, dilated by one voxel, 6-connected) and
``bundles.trk`` (ground-truth streamlines in RAS+ mm, one ``bundle`` value per streamline).
Bundles are cubic Bezier tubes sampled at ``step_mm``; the signal follows dipy's multi-tensor
model from the local fibre orientation(s) (two where bundles cross), simulated once per distinct
quantised orientation configuration and looked up per voxel.
"""

from __future__ import annotations

import functools
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
from tractrain.errors import ConfigError

WM_EVALS = (1.5e-3, 0.3e-3, 0.3e-3)  # fibre compartment (mm^2/s)
GM_EVALS = (0.8e-3, 0.8e-3, 0.8e-3)  # isotropic tissue around / between bundles
CSF_EVALS = (3.0e-3, 3.0e-3, 3.0e-3)  # free water outside the "brain" ellipsoid
WM_ISO_FRACTION = 15  # percent of isotropic tissue inside white-matter voxels
CROSSING_MIN_SHARE = 0.2  # second bundle needs this share of a voxel's segments ...
CROSSING_MAX_COS = 0.87  # ... and an angle over ~30 degrees to make a crossing
BUNDLE_LENGTH_MM = (40.0, 55.0)  # chord length range of the bundle templates
SUBJECT_DEFORM_MM = 1.0  # per-subject jitter of the Bezier control points
JITTER_FRACTION = 0.04  # per-point jitter, standard deviation as a fraction of step_mm
SPHERE_NAME = "repulsion724"
FEATURES = ("dwi", "sh")
SPLITS = ("train", "valid", "test")


# ---------------------------------------------------------------------------- gradient table


@functools.lru_cache(maxsize=1)
def _gradient_table():
    """dipy's ``small_64D`` gradient table (one b0, 64 directions at b~1000)."""
    from dipy.core.gradients import gradient_table
    from dipy.data import get_fnames
    from dipy.io.gradients import read_bvals_bvecs

    _, fbval, fbvec = get_fnames(name="small_64D")
    bvals, bvecs = read_bvals_bvecs(str(fbval), str(fbvec))
    bvecs = np.nan_to_num(bvecs)
    return gradient_table(bvals, bvecs=bvecs)


def gradient_directions() -> tuple[np.ndarray, np.ndarray]:
    """(bvals (F,), unit bvecs (F, 3)) of the diffusion-weighted volumes in ``dwi.nii.gz``."""
    gtab = _gradient_table()
    keep = ~gtab.b0s_mask
    return gtab.bvals[keep].copy(), gtab.bvecs[keep].copy()


@functools.lru_cache(maxsize=1)
def _sphere_vertices() -> np.ndarray:
    from dipy.data import get_sphere

    return np.asarray(get_sphere(name=SPHERE_NAME).vertices, dtype=np.float64)


# ---------------------------------------------------------------------------- geometry


def phantom_affine(shape: tuple[int, int, int], voxel_size: float) -> np.ndarray:
    """RAS+ voxel-to-mm affine: diagonal ``voxel_size``, world origin at the volume centre."""
    affine = np.diag([voxel_size, voxel_size, voxel_size, 1.0])
    affine[:3, 3] = -voxel_size * (np.asarray(shape, dtype=np.float64) - 1) / 2
    return affine


def _bundle_templates(seed: int, n_bundles: int) -> list[dict]:
    """Shape-independent bundle descriptions, shared by all subjects."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    templates = []
    for _ in range(n_bundles):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        templates.append(
            {
                "direction": direction,
                "length": rng.uniform(*BUNDLE_LENGTH_MM),
                "centre": rng.uniform(0.0, 1.0, 3),  # position inside the feasible range
                "bend": rng.standard_normal((2, 3)) * 0.15,  # control-point offsets / length
            }
        )
    return templates


def _control_points(template: dict, lo: np.ndarray, hi: np.ndarray, rng) -> np.ndarray:
    """(4, 3) Bezier control points (mm) inside the box [lo, hi], slightly deformed."""
    d = template["direction"]
    span = hi - lo
    with np.errstate(divide="ignore"):
        fit = np.min(np.where(np.abs(d) > 1e-9, span / np.abs(d), np.inf))
    length = min(template["length"], 0.95 * fit)
    half = np.abs(d) * length / 2
    centre = lo + half + template["centre"] * (span - 2 * half)
    p0, p3 = centre - d * length / 2, centre + d * length / 2
    p1 = p0 + (p3 - p0) / 3 + template["bend"][0] * length
    p2 = p0 + 2 * (p3 - p0) / 3 + template["bend"][1] * length
    ctrl = np.stack([p0, p1, p2, p3]) + rng.normal(0.0, SUBJECT_DEFORM_MM, (4, 3))
    return np.clip(ctrl, lo, hi)  # the curve stays in the convex hull of its control points


def _bezier(ctrl: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points (T, 3) and unit tangents (T, 3) of a cubic Bezier curve at parameters ``t``."""
    t = t[:, None]
    u = 1 - t
    pts = u**3 * ctrl[0] + 3 * u**2 * t * ctrl[1] + 3 * u * t**2 * ctrl[2] + t**3 * ctrl[3]
    der = 3 * u**2 * (ctrl[1] - ctrl[0]) + 6 * u * t * (ctrl[2] - ctrl[1])
    der = der + 3 * t**2 * (ctrl[3] - ctrl[2])
    norm = np.linalg.norm(der, axis=1, keepdims=True)
    return pts, der / np.maximum(norm, 1e-12)


def _normal_frame(tangents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two smooth unit normals (T, 3) orthogonal to the tangents: projections of the fixed
    reference direction least aligned with the whole curve."""
    candidates = _sphere_vertices()
    worst = np.abs(tangents @ candidates.T).max(axis=0)
    ref = candidates[np.argmin(worst)]
    n1 = ref - (tangents @ ref)[:, None] * tangents
    n1 /= np.linalg.norm(n1, axis=1, keepdims=True)
    return n1, np.cross(tangents, n1)


def _bundle_streamlines(
    ctrl: np.ndarray, n: int, radius: float, step_mm: float, rng, chunk: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` streamlines around one Bezier centre line: flat points (M, 3), lengths (n,)."""
    n_probe = 256
    probe, _ = _bezier(ctrl, np.linspace(0, 1, n_probe))
    centre_len = np.linalg.norm(np.diff(probe, axis=0), axis=1).sum()
    n_dense = int(np.clip(np.ceil(2 * centre_len / step_mm), 32, 4096))
    t = np.linspace(0, 1, n_dense)
    centre, tangent = _bezier(ctrl, t)
    n1, n2 = _normal_frame(tangent)
    jitter_sd = JITTER_FRACTION * step_mm
    all_points, all_lengths = [], []
    for start in range(0, n, chunk):
        k = min(chunk, n - start)
        # cross-section offset: uniform in the disk, plus a slow smooth wobble along the curve
        r = radius * 0.8 * np.sqrt(rng.uniform(0, 1, k))
        theta = rng.uniform(0, 2 * np.pi, k)
        amp = rng.uniform(0, 0.2 * radius, (k, 2))
        freq = rng.uniform(0.5, 2.0, (k, 2))
        phase = rng.uniform(0, 2 * np.pi, (k, 2))
        wobble = amp[:, None, :] * np.sin(
            2 * np.pi * freq[:, None, :] * t[None, :, None] + phase[:, None, :]
        )
        off = np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)[:, None, :] + wobble
        norm = np.linalg.norm(off, axis=2, keepdims=True)
        off *= np.minimum(1.0, radius / np.maximum(norm, 1e-12))
        dense = centre + off[..., :1] * n1 + off[..., 1:] * n2  # (k, T, 3)
        # arc-length resampling at step_mm, start/end trimmed a little per streamline
        seg = np.linalg.norm(np.diff(dense, axis=1), axis=2)
        cum = np.concatenate([np.zeros((k, 1)), np.cumsum(seg, axis=1)], axis=1)
        total = cum[:, -1]
        a0 = rng.uniform(0, 0.05, k) * total
        a1 = total * (1 - rng.uniform(0, 0.05, k))
        counts = np.maximum(np.floor((a1 - a0) / step_mm).astype(np.int64) + 1, 2)
        row = np.repeat(np.arange(k), counts)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        pos = np.arange(counts.sum()) - np.repeat(first, counts)
        target = a0[row] + pos * step_mm
        gap = float(total.max()) + 1.0  # rows of the flattened arc length never overlap
        flat_cum = (cum + gap * np.arange(k)[:, None]).ravel()
        idx = np.searchsorted(flat_cum, target + gap * row, side="right") - 1
        idx = np.clip(idx, row * n_dense, row * n_dense + n_dense - 2)
        frac = (target + gap * row - flat_cum[idx]) / np.maximum(
            flat_cum[idx + 1] - flat_cum[idx], 1e-12
        )
        frac = np.clip(frac, 0.0, 1.0)
        flat = dense.reshape(-1, 3)
        pts = flat[idx] + frac[:, None] * (flat[idx + 1] - flat[idx])
        pts += np.clip(rng.normal(0.0, jitter_sd, pts.shape), -2 * jitter_sd, 2 * jitter_sd)
        all_points.append(pts)
        all_lengths.append(counts)
    return np.concatenate(all_points), np.concatenate(all_lengths)


MIN_BUNDLE_BOX_MM = 4.0  # the bundles' box (volume minus margins) must be this wide per axis


def _bundle_box(shape, affine, step_mm: float) -> tuple[np.ndarray, np.ndarray, float]:
    """(lo, hi) corners in mm of the box that holds the bundle centre lines, and the bundle
    radius; raises ConfigError when the volume is too small."""
    vs = float(affine[0, 0])
    extent = (np.asarray(shape) - 1) * vs
    radius = float(min(3.0, 0.08 * extent.min()))
    margin = radius + 2 * JITTER_FRACTION * step_mm + 0.25 * vs
    lo, hi = affine[:3, 3] + margin, affine[:3, 3] + extent - margin
    need = max(4 * radius, MIN_BUNDLE_BOX_MM)
    if np.any(hi - lo < need):
        raise ConfigError(
            f"shape: {tuple(shape)} x {vs} mm voxels is too small for phantom bundles "
            f"(each axis needs (n - 1) * voxel_size >= {need + 2 * margin:.1f} mm)"
        )
    return lo, hi, radius


def _subject_streamlines(
    templates: list[dict], shape, affine, n_streamlines: int, step_mm: float, rng
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All streamlines of a subject: flat RAS mm points, lengths, bundle index per streamline."""
    lo, hi, radius = _bundle_box(shape, affine, step_mm)
    per_bundle = np.full(len(templates), n_streamlines // len(templates))
    per_bundle[: n_streamlines % len(templates)] += 1
    points, lengths, bundle = [], [], []
    for b, template in enumerate(templates):
        ctrl = _control_points(template, lo, hi, rng)
        pts, lens = _bundle_streamlines(ctrl, int(per_bundle[b]), radius, step_mm, rng)
        points.append(pts)
        lengths.append(lens)
        bundle.append(np.full(len(lens), b, dtype=np.int64))
    return np.concatenate(points), np.concatenate(lengths), np.concatenate(bundle)


# ---------------------------------------------------------------------------- signal


def voxel_index(points: np.ndarray, affine: np.ndarray, shape) -> np.ndarray:
    """(M,) int64 linear (C-order) index of the voxel whose centre is nearest to each RAS mm
    point, clipped to the volume."""
    inv = np.linalg.inv(affine)
    flat = np.zeros(len(points), dtype=np.int64)
    for axis in range(3):  # explicit sums: (M, 3) @ (3, 3) hits a slow BLAS path
        coord = inv[axis, 3] + sum(points[:, j] * inv[axis, j] for j in range(3))
        ijk = np.minimum(np.maximum(np.rint(coord).astype(np.int64), 0), shape[axis] - 1)
        flat = flat * shape[axis] + ijk
    return flat


def _point_tangents(points: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(M, 3) forward difference at every point (backward at each streamline's last point)."""
    tang = np.empty_like(points)
    tang[:-1] = points[1:] - points[:-1]
    last = np.cumsum(lengths) - 1
    tang[last] = tang[last - 1]
    return tang


def _voxel_configurations(vox, tangents, bundle, lengths, n_voxels):
    """Per white-matter voxel: linear index, dominant and second fibre orientation (unit) and the
    share of the dominant bundle (1.0 for a single-fibre voxel)."""
    n_bundles = int(bundle.max()) + 1
    key = vox * n_bundles + np.repeat(bundle, lengths)
    size = n_voxels * n_bundles
    count = np.bincount(key, minlength=size).reshape(n_voxels, n_bundles)
    wm = np.flatnonzero(count.sum(axis=1))
    count = count[wm]
    tang = np.stack(
        [np.bincount(key, weights=tangents[:, c], minlength=size) for c in range(3)], axis=1
    ).reshape(n_voxels, n_bundles, 3)[wm]
    tang /= np.maximum(np.linalg.norm(tang, axis=2, keepdims=True), 1e-12)
    order = np.argsort(-count, axis=1, kind="stable")
    rows = np.arange(len(wm))
    second = order[:, 1] if n_bundles > 1 else order[:, 0]
    c1, t1 = count[rows, order[:, 0]], tang[rows, order[:, 0]]
    c2 = count[rows, second] if n_bundles > 1 else np.zeros_like(c1)
    t2 = tang[rows, second]
    share = c1 / (c1 + c2)
    cos = np.abs(np.sum(t1 * t2, axis=1))
    crossing = (c2 > 0) & (1 - share >= CROSSING_MIN_SHARE) & (cos < CROSSING_MAX_COS)
    share = np.where(crossing, share, 1.0)
    return wm, t1, t2, share


def _simulate_signal(vox, tangents, bundle, lengths, shape) -> np.ndarray:
    """Noise-free signal (X, Y, Z, G) for the full gradient table (b0 included), S0 = 1."""
    from dipy.sims.voxel import multi_tensor

    gtab = _gradient_table()
    nvox = int(np.prod(shape))
    # voxel classes: -2 CSF, -1 isotropic tissue, >= 0 white matter orientation(s)
    axes = [
        ((np.arange(n) - (n - 1) / 2) / max(0.51 * (n - 1), 1e-9)) ** 2 for n in shape
    ]
    inside = (axes[0][:, None, None] + axes[1][None, :, None] + axes[2]).ravel() <= 1.0
    v1 = np.where(inside, -1, -2).astype(np.int64)
    v2 = np.full(nvox, -1, dtype=np.int64)
    q = np.zeros(nvox, dtype=np.int64)
    wm, t1, t2, share = _voxel_configurations(vox, tangents, bundle, lengths, nvox)
    sphere = _sphere_vertices()
    v1[wm] = np.argmax(np.abs(t1 @ sphere.T), axis=1)
    cross = share < 1.0
    v2[wm[cross]] = np.argmax(np.abs(t2[cross] @ sphere.T), axis=1)
    q[wm] = np.rint(share * 10).astype(np.int64)  # dominant share in tenths
    n_vert = len(sphere)
    code = ((v1 + 2) * (n_vert + 1) + (v2 + 1)) * 11 + q
    codes, inverse = np.unique(code, return_inverse=True)
    table = np.empty((len(codes), len(gtab.bvals)), dtype=np.float32)
    for i, c in enumerate(codes.tolist()):
        tenths, rest = c % 11, c // 11
        a, b = rest // (n_vert + 1) - 2, rest % (n_vert + 1) - 1
        if a < 0:
            evals = CSF_EVALS if a == -2 else GM_EVALS
            mevals, sticks, fractions = [evals], [(0.0, 0.0, 1.0)], [100.0]
        else:
            fibre = 100.0 - WM_ISO_FRACTION
            if b < 0:
                mevals, sticks, fractions = [WM_EVALS], [sphere[a]], [fibre]
            else:
                f1 = fibre * tenths / 10
                mevals, sticks = [WM_EVALS, WM_EVALS], [sphere[a], sphere[b]]
                fractions = [f1, fibre - f1]
            mevals, sticks = mevals + [GM_EVALS], sticks + [(0.0, 0.0, 1.0)]
            fractions = fractions + [float(WM_ISO_FRACTION)]
        table[i], _ = multi_tensor(
            gtab, np.asarray(mevals), S0=1.0, angles=np.asarray(sticks),
            fractions=fractions, snr=None,
        )
    return table[inverse.ravel()].reshape(*shape, -1)


def _noisy_normalised(signal: np.ndarray, snr: float | None, rng) -> np.ndarray:
    """Rician noise at ``snr`` (relative to S0 = 1), then division by the mean b0; b0 dropped."""
    gtab = _gradient_table()
    if snr is not None:  # in place, the volumes are large
        sigma = np.float32(1.0 / snr)
        noisy = rng.standard_normal(signal.shape, dtype=np.float32)
        noisy *= sigma
        noisy += signal
        np.square(noisy, out=noisy)
        imag = rng.standard_normal(signal.shape, dtype=np.float32)
        imag *= sigma
        np.square(imag, out=imag)
        noisy += imag
        del imag
        signal = np.sqrt(noisy, out=noisy)
    b0 = signal[..., gtab.b0s_mask].mean(axis=-1, keepdims=True)
    out = signal[..., ~gtab.b0s_mask]
    out /= np.maximum(b0, np.float32(1e-3))
    return out


def _fit_sh(dwi: np.ndarray, sh_order: int) -> np.ndarray:
    """Real symmetric SH coefficients (descoteaux07 basis) of the normalised signal."""
    from dipy.core.sphere import Sphere
    from dipy.reconst.shm import sf_to_sh

    _, bvecs = gradient_directions()
    # the fit is linear: fitting the identity gives the (F, n_coef) projection matrix
    proj = sf_to_sh(
        np.eye(len(bvecs)), Sphere(xyz=bvecs), sh_order_max=sh_order,
        basis_type="descoteaux07", legacy=False, smooth=0.006,
    ).astype(np.float32)
    sh = dwi.reshape(-1, dwi.shape[-1]) @ proj
    return sh.reshape(*dwi.shape[:3], -1)


# ---------------------------------------------------------------------------- writing


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
    n_bundles: int = 3,
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
    _bundle_box(shape, affine, float(step_mm))  # fail before writing anything
    templates = _bundle_templates(int(seed), n_bundles)
    summary: dict = {"outdir": str(outdir), "config": str(outdir / "config.json"),
                     "subjects": subjects, "splits": split, "features": features,
                     "shape": list(shape), "voxel_size": float(voxel_size), "files": {},
                     "n_streamlines": {}, "n_points": {}}

    def write(folder: Path) -> None:
        for i, subject in enumerate(subjects):
            rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(1, i)))
            points, lengths, bundle = _subject_streamlines(
                templates, shape, affine, streamlines_per_subject, float(step_mm), rng
            )
            vox = voxel_index(points, affine, shape)
            tangents = _point_tangents(points, lengths)
            signal = _simulate_signal(vox, tangents, bundle, lengths, shape)
            data = _noisy_normalised(signal, snr, rng)
            del signal
            if features == "sh":
                data = _fit_sh(data, sh_order)
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


def demo_store(cache_dir: str | os.PathLike, **phantom_kwargs):
    """Open (building it on first use) a store of a phantom, cached under ``cache_dir``.

    The cache key is a hash of ``phantom_kwargs``; needs ``tractrain.data.builder`` and
    ``tractrain.data.store``.
    """
    from tractrain.data.builder import build_store
    from tractrain.data.store import open_store

    text = json.dumps(phantom_kwargs, sort_keys=True, default=str)
    key = hashlib.sha256(text.encode()).hexdigest()[:12]
    root = Path(cache_dir) / f"phantom-{key}"
    store_path = Path(cache_dir) / f"store-{key}.zarr"
    rebuilt = not is_complete(root)
    if rebuilt:
        make_phantom(root, overwrite=True, **phantom_kwargs)
    if rebuilt or not store_path.exists():
        config = json.loads((root / "config.json").read_text())
        build_store(config, store_path, root, force=True, progress=False)
    return open_store(store_path)
