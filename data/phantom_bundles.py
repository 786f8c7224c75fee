"""Geometry of the phantom's bundles: the shapes every subject's streamlines follow.

Bundles are cubic Bezier tubes shared by all subjects (`bundle_templates`), placed in each
subject's volume with a small deformation and filled with streamlines sampled at ``step_mm``
(`subject_streamlines`); coordinates are RAS+ mm (`phantom_affine`).
"""

from __future__ import annotations

import functools

import numpy as np

from tractrain.errors import ConfigError

BUNDLE_LENGTH_MM = (40.0, 55.0)  # chord length range of the bundle templates
SUBJECT_DEFORM_MM = 1.0  # per-subject jitter of the Bezier control points
JITTER_FRACTION = 0.04  # per-point jitter, standard deviation as a fraction of step_mm
SPHERE_NAME = "repulsion724"
MIN_BUNDLE_BOX_MM = 4.0  # the bundles' box (volume minus margins) must be this wide per axis


@functools.lru_cache(maxsize=1)
def sphere_vertices() -> np.ndarray:
    """(V, 3) unit vertices of dipy's ``SPHERE_NAME`` sphere (reference directions)."""
    from dipy.data import get_sphere

    return np.asarray(get_sphere(name=SPHERE_NAME).vertices, dtype=np.float64)


def phantom_affine(shape: tuple[int, int, int], voxel_size: float) -> np.ndarray:
    """RAS+ voxel-to-mm affine: diagonal ``voxel_size``, world origin at the volume centre."""
    affine = np.diag([voxel_size, voxel_size, voxel_size, 1.0])
    affine[:3, 3] = -voxel_size * (np.asarray(shape, dtype=np.float64) - 1) / 2
    return affine


def bundle_templates(seed: int, n_bundles: int) -> list[dict]:
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
    candidates = sphere_vertices()
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


def bundle_box(shape, affine, step_mm: float) -> tuple[np.ndarray, np.ndarray, float]:
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


def subject_streamlines(
    templates: list[dict], shape, affine, n_streamlines: int, step_mm: float, rng
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All streamlines of a subject: flat RAS mm points, lengths, bundle index per streamline."""
    lo, hi, radius = bundle_box(shape, affine, step_mm)
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
