"""Diffusion signal of the phantom: dipy's multi-tensor model from the local fibre
orientation(s) of the streamlines (two where bundles cross), simulated once per distinct
quantised orientation configuration and looked up per voxel; Rician noise, b0 normalisation
and an optional spherical-harmonics fit.
"""

from __future__ import annotations

import functools

import numpy as np

from tractrain.data.phantom_bundles import sphere_vertices

WM_EVALS = (1.5e-3, 0.3e-3, 0.3e-3)  # fibre compartment (mm^2/s)
GM_EVALS = (0.8e-3, 0.8e-3, 0.8e-3)  # isotropic tissue around / between bundles
CSF_EVALS = (3.0e-3, 3.0e-3, 3.0e-3)  # free water outside the "brain" ellipsoid
WM_ISO_FRACTION = 15  # percent of isotropic tissue inside white-matter voxels
CROSSING_MIN_SHARE = 0.2  # second bundle needs this share of a voxel's segments ...
CROSSING_MAX_COS = 0.87  # ... and an angle over ~30 degrees to make a crossing


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


def point_tangents(points: np.ndarray, lengths: np.ndarray) -> np.ndarray:
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


def simulate_signal(vox, tangents, bundle, lengths, shape) -> np.ndarray:
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
    sphere = sphere_vertices()
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


def noisy_normalised(signal: np.ndarray, snr: float | None, rng) -> np.ndarray:
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


def fit_sh(dwi: np.ndarray, sh_order: int) -> np.ndarray:
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
