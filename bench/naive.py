"""Deliberately naive reference augmentation and gather, one streamline at a time.

This mirrors how dwi_ml processes a batch (a Python loop per streamline, one dipy call per
streamline). It is a benchmark baseline for ``tractrain.data.augment`` and ``Store.gather``
only; the package never uses it.
"""

from __future__ import annotations

import numpy as np
from dipy.tracking.streamlinespeed import length, set_number_of_points

from tractrain.data.augment import AugmentConfig


def naive_augment(
    streamline_list: list[np.ndarray],
    config: AugmentConfig,
    rng: np.random.Generator,
    voxel_sizes: np.ndarray,
) -> list[np.ndarray]:
    """Resample, split, reverse and add noise with a loop per streamline; (N_i, 3) float32 list.

    Resampling uses the same point count rule as ``augment.resample``; compression is not
    covered. Noise is a gaussian clipped at +/- truncation std (dwi_ml's way), not redrawn.
    """
    vs = np.asarray(voxel_sizes, dtype=np.float64)
    out = [np.asarray(s, dtype=np.float32) for s in streamline_list]
    if config.step_size is not None:
        resampled = []
        for s in out:
            mm = s.astype(np.float64) * vs
            arc = float(length(mm)) if len(s) > 1 else 0.0
            if len(s) < 2:
                new = mm
            elif arc <= 0:
                new = mm[[0, 0]]
            else:
                new = set_number_of_points(mm, max(2, round(arc / config.step_size) + 1))
            resampled.append((new / vs).astype(np.float32))
        out = resampled
    if config.split_ratio > 0:
        min_points = 6
        eligible = [i for i, s in enumerate(out) if len(s) >= 2 * min_points]
        k = min(int(len(out) * config.split_ratio), len(eligible))
        chosen = set(rng.choice(eligible, size=k, replace=False).tolist()) if k else set()
        pieces = []
        for i, s in enumerate(out):
            if i in chosen:
                cut = int(rng.integers(min_points, len(s) - min_points + 1))
                pieces.extend([s[:cut], s[cut:]])
            else:
                pieces.append(s)
        out = pieces
    if config.reverse_ratio > 0:
        k = int(len(out) * config.reverse_ratio)
        for i in rng.choice(len(out), size=k, replace=False):
            out[i] = out[i][::-1].copy()
    if config.noise_mm > 0:
        std = config.noise_mm / vs
        bound = config.noise_truncation * std
        for i, s in enumerate(out):
            noise = np.clip(rng.normal(0.0, std, size=s.shape), -bound, bound)
            out[i] = (s + noise).astype(np.float32)
    return out


def naive_gather(zarr_points, offsets: np.ndarray, ids: np.ndarray) -> list[np.ndarray]:
    """Read the streamlines ``ids`` one zarr slice at a time: ``zarr_points[o[i]:o[i+1]]``."""
    return [np.asarray(zarr_points[int(offsets[i]) : int(offsets[i + 1])]) for i in ids]
