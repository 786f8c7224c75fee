"""Geometry of the phantom's bundles: the shapes every subject's streamlines follow.

Bundles are cubic Bezier tubes from a fixed catalogue (`bundle_templates`) laid out so that the
phantom is not trivially easy: a C-shaped arc, a bundle crossing it at about 90 degrees, two
arcs that kiss (touch tangentially, then part), an S-shape and a strongly fanning bundle, of
different sizes and radii, most fanning at one end. Each subject places them in its volume
with a small smooth deformation and fills them with streamlines sampled at ``step_mm``
(`subject_streamlines`); coordinates are RAS+ mm (`phantom_affine`). `reverse_some` stores a
random half of the streamlines the other way round.
"""

from __future__ import annotations

import functools

import numpy as np

from tractrain.errors import ConfigError

SUBJECT_DEFORM_MM = 0.7  # per-subject translation of the layout (sd, mm)
SUBJECT_ROTATE_DEG = 1.5  # per-subject rotation of the layout (sd, degrees)
CONTROL_JITTER_MM = 0.3  # per-subject jitter of each Bezier control point
SEED_JITTER = 0.03  # per-seed jitter of the catalogue's control points (box units)
JITTER_FRACTION = 0.04  # per-point jitter, standard deviation as a fraction of step_mm
SPHERE_NAME = "repulsion724"
MIN_BUNDLE_BOX_MM = 4.0  # the bundles' box (volume minus margins) must be this wide per axis
FAN_SPAN = 0.3  # fanning grows over this share of the curve at a fanning end


def _kiss_controls(h: float, apex: float, z: float) -> list[tuple[float, float, float]]:
    """Control points of a symmetric arc from (-0.8, h) to (0.8, h) through (0, apex)."""
    c = (8 * apex - 2 * h) / 6  # y of both inner controls so that B(0.5) = apex
    return [(-0.8, h, z), (-0.27, c, z), (0.27, c, z), (0.8, h, z)]


# Box units: [-1, 1] per axis maps onto the bundles' box. weight: share of the streamlines;
# radius: times the base radius; fan: cross-section scale at the start and end;
# kiss: apex shift along +y in units of the base radius (moves both inner controls).
CATALOGUE: tuple[dict, ...] = (
    {"name": "arc", "weight": 3.0, "radius": 1.0, "fan": (1.0, 1.8), "kiss": 0.0,
     "ctrl": [(-0.6, -0.6, -0.4), (-0.6, 0.2, -0.4), (0.6, 0.2, -0.4), (0.6, -0.6, -0.4)]},
    {"name": "crossing", "weight": 2.0, "radius": 0.8, "fan": (1.5, 1.0), "kiss": 0.0,
     "ctrl": [(-0.1, -0.9, -0.55), (0.0, -0.3, -0.45), (0.0, 0.3, -0.35), (0.1, 0.9, -0.25)]},
    {"name": "kissing-upper", "weight": 1.5, "radius": 0.7, "fan": (1.0, 1.6), "kiss": 0.6,
     "ctrl": _kiss_controls(0.75, 0.1, 0.45)},
    {"name": "kissing-lower", "weight": 1.0, "radius": 0.6, "fan": (1.4, 1.0), "kiss": -0.6,
     "ctrl": _kiss_controls(-0.55, 0.1, 0.45)},
    {"name": "s-shape", "weight": 2.0, "radius": 0.9, "fan": (1.0, 1.0), "kiss": 0.0,
     "ctrl": [(-0.8, -0.85, -0.6), (-0.15, -0.85, 1.0), (0.15, -0.85, -1.0), (0.8, -0.85, 0.6)]},
    {"name": "fan", "weight": 1.0, "radius": 0.7, "fan": (1.0, 2.8), "kiss": 0.0,
     "ctrl": [(0.8, -0.35, -0.8), (0.8, 0.0, -0.2), (0.65, 0.35, 0.3), (0.4, 0.6, 0.8)]},
)
MAX_BUNDLES = len(CATALOGUE)


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
    """The first ``n_bundles`` of the catalogue, control points jittered a little by ``seed``;
    shape-independent and shared by all subjects."""
    if not 1 <= n_bundles <= MAX_BUNDLES:
        raise ConfigError(f"n_bundles: expected 1 to {MAX_BUNDLES} (the phantom's catalogue: "
                          f"{', '.join(t['name'] for t in CATALOGUE)}), got {n_bundles}")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    templates = []
    for entry in CATALOGUE[:n_bundles]:
        ctrl = np.asarray(entry["ctrl"], dtype=np.float64)
        ctrl = np.clip(ctrl + rng.normal(0.0, SEED_JITTER, ctrl.shape), -1.0, 1.0)
        templates.append({**entry, "ctrl": ctrl})
    return templates


def _subject_transform(rng) -> tuple[np.ndarray, np.ndarray]:
    """A small random rigid motion of a subject's layout: (rotation (3, 3), translation mm)."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.normal(0.0, SUBJECT_ROTATE_DEG))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    return rotation, rng.normal(0.0, SUBJECT_DEFORM_MM, 3)


def _control_points(template: dict, lo: np.ndarray, hi: np.ndarray, radius: float,
                    motion: tuple[np.ndarray, np.ndarray], rng) -> np.ndarray:
    """(4, 3) Bezier control points (mm) of a template in the box [lo, hi] of one subject."""
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    ctrl = centre + template["ctrl"] * half
    ctrl[1:3, 1] += template["kiss"] * radius / 0.75  # B(0.5) moves by 0.75 x the shift
    rotation, shift = motion
    ctrl = (ctrl - centre) @ rotation.T + centre + shift
    ctrl = ctrl + rng.normal(0.0, CONTROL_JITTER_MM, (4, 3))
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


def fan_profile(t: np.ndarray, fan: tuple[float, float]) -> np.ndarray:
    """Cross-section scale along the curve: 1 in the middle, growing smoothly to ``fan[0]`` at
    the start and ``fan[1]`` at the end over the last ``FAN_SPAN`` of the curve."""
    start = np.clip(1 - t / FAN_SPAN, 0, 1) ** 2
    end = np.clip((t - 1 + FAN_SPAN) / FAN_SPAN, 0, 1) ** 2
    return 1 + (fan[0] - 1) * start + (fan[1] - 1) * end


def _bundle_streamlines(
    ctrl: np.ndarray, n: int, radius: float, fan: tuple[float, float], step_mm: float, rng,
    chunk: int = 2048,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` streamlines around one Bezier centre line, fanning by ``fan`` (cross-section scale
    at start and end): flat points (M, 3), lengths (n,)."""
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
        off *= fan_profile(t, fan)[None, :, None]
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
    """(lo, hi) corners in mm of the box that holds the bundle centre lines, and the base
    bundle radius; raises ConfigError when the volume is too small."""
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


def _safe_fan(ctrl: np.ndarray, fan, radius: float, wall_lo, wall_hi, jitter: float):
    """``fan`` reduced where an end of the curve is too close to the volume's walls."""
    out = []
    for end, factor in ((ctrl[0], fan[0]), (ctrl[3], fan[1])):
        room = float(min((end - wall_lo).min(), (wall_hi - end).min())) - jitter
        out.append(float(np.clip(room / radius, 1.0, factor)))
    return tuple(out)


def subject_streamlines(
    templates: list[dict], shape, affine, n_streamlines: int, step_mm: float, rng
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All streamlines of a subject, bundle after bundle, each running from its template's
    start to its end: flat RAS mm points, lengths, bundle index per streamline. Bundles get
    streamlines in proportion to their weights (at least one each)."""
    lo, hi, radius = bundle_box(shape, affine, step_mm)
    wall_lo = affine[:3, 3] + 0.25 * float(affine[0, 0])
    wall_hi = affine[:3, 3] + (np.asarray(shape) - 1.25) * float(affine[0, 0])
    weights = np.array([t["weight"] for t in templates], dtype=np.float64)
    extra = n_streamlines - len(templates)
    share = extra * weights / weights.sum()
    per_bundle = 1 + np.floor(share).astype(np.int64)
    left = n_streamlines - int(per_bundle.sum())
    per_bundle[np.argsort(-(share - np.floor(share)), kind="stable")[:left]] += 1
    motion = _subject_transform(rng)
    points, lengths, bundle = [], [], []
    for b, template in enumerate(templates):
        r = radius * template["radius"]
        ctrl = _control_points(template, lo, hi, radius, motion, rng)
        fan = _safe_fan(ctrl, template["fan"], r, wall_lo, wall_hi, 2 * JITTER_FRACTION * step_mm)
        pts, lens = _bundle_streamlines(ctrl, int(per_bundle[b]), r, fan, step_mm, rng)
        points.append(np.clip(pts, wall_lo, wall_hi))
        lengths.append(lens)
        bundle.append(np.full(len(lens), b, dtype=np.int64))
    return np.concatenate(points), np.concatenate(lengths), np.concatenate(bundle)


def reverse_some(points: np.ndarray, lengths: np.ndarray, rng,
                 share: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Flat ``points`` with a random ``share`` of the streamlines reversed (point order), and
    the boolean (S,) mask of the reversed ones."""
    n = len(lengths)
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.permutation(n)[: int(round(share * n))]] = True
    starts = np.cumsum(lengths) - lengths
    row = np.repeat(np.arange(n), lengths)
    pos = np.arange(len(points)) - starts[row]
    source = np.where(flipped[row], starts[row] + lengths[row] - 1 - pos, starts[row] + pos)
    return points[source], flipped
