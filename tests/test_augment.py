"""Tests for tractrain.data.augment (and the naive benchmark reference in bench/naive.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import zarr
from dipy.tracking.streamlinespeed import set_number_of_points
from scipy.stats import truncnorm

from tractrain.data.augment import (
    AugmentConfig,
    add_noise,
    apply_augment,
    compress,
    resample,
    reverse,
    split,
)
from tractrain.errors import ConfigError


def _load_naive():
    """bench/ is not an installed package: load bench/naive.py by path (any pytest launcher)."""
    path = Path(__file__).resolve().parents[1] / "bench" / "naive.py"
    spec = importlib.util.spec_from_file_location("tractrain_bench_naive", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_naive = _load_naive()
naive_augment, naive_gather = _naive.naive_augment, _naive.naive_gather

ANISO = np.array([1.0, 2.0, 2.5])


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)])


def pieces(points: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    o = offsets_of(lengths)
    return [points[o[i] : o[i + 1]] for i in range(len(lengths))]


def curvy_batch(seed: int, b: int = 40, voxel_sizes=ANISO, lo: int = 3, hi: int = 80):
    """Smooth random curves (steps of ~0.4 mm with slowly turning direction), in voxels."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi, size=b)
    out = []
    for n in lengths:
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        turns = np.cumsum(rng.normal(scale=0.05, size=(n, 3)), axis=0) + d
        turns /= np.linalg.norm(turns, axis=1, keepdims=True)
        steps = turns * rng.uniform(0.2, 0.6, size=(n, 1))
        mm = rng.uniform(0, 50, size=3) + np.cumsum(steps, axis=0) - steps[0]
        out.append(mm / voxel_sizes)
    return np.concatenate(out).astype(np.float32), lengths.astype(np.int64)


def straight_batch(seed: int, b: int = 30, voxel_sizes=ANISO):
    """Straight segments with irregular point spacing, in voxels."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 40, size=b)
    out = []
    for n in lengths:
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        t = np.sort(rng.uniform(0, rng.uniform(1, 60), size=n))
        t -= t[0]
        out.append((rng.uniform(0, 50, size=3) + t[:, None] * d) / voxel_sizes)
    return np.concatenate(out).astype(np.float32), lengths.astype(np.int64)


def steps_mm(s: np.ndarray, voxel_sizes) -> np.ndarray:
    return np.linalg.norm(np.diff(s.astype(np.float64) * voxel_sizes, axis=0), axis=1)


# ------------------------------------------------------------------------------ resample


@pytest.mark.parametrize("voxel_sizes", [np.ones(3), ANISO])
@pytest.mark.parametrize("step", [0.5, 1.7])
def test_resample_straight_lines_exact_step_and_count(voxel_sizes, step):
    points, lengths = straight_batch(1, voxel_sizes=voxel_sizes)
    out, new_lengths = resample(points, lengths, step, voxel_sizes)
    assert out.dtype == np.float32 and new_lengths.dtype == np.int64
    assert out.shape == (new_lengths.sum(), 3)
    for s, r in zip(pieces(points, lengths), pieces(out, new_lengths), strict=True):
        total = steps_mm(s, voxel_sizes).sum()
        assert len(r) == max(2, round(total / step) + 1)
        np.testing.assert_allclose(r[[0, -1]], s[[0, -1]], atol=1e-4)
        got = steps_mm(r, voxel_sizes)
        np.testing.assert_allclose(got, total / (len(r) - 1), rtol=1e-4, atol=1e-4)
        if len(r) > 2:  # the step is the requested one up to the rounding of the count
            assert abs(got.mean() - step) <= step / (2 * (len(r) - 1)) + 1e-4


@pytest.mark.parametrize("voxel_sizes", [np.ones(3), ANISO])
def test_resample_curves_steps_close_to_step_size(voxel_sizes):
    points, lengths = curvy_batch(2, voxel_sizes=voxel_sizes, lo=30, hi=120)
    step = 1.0
    out, new_lengths = resample(points, lengths, step, voxel_sizes)
    for s, r in zip(pieces(points, lengths), pieces(out, new_lengths), strict=True):
        np.testing.assert_allclose(r[[0, -1]], s[[0, -1]], atol=1e-4)
        got = steps_mm(r, voxel_sizes)
        # Chords of a gently curved line: within ~5 % of the step.
        np.testing.assert_allclose(got, step, rtol=0.05 + 1 / (2 * (len(r) - 1)))


def test_resample_degenerate_streamlines():
    points = np.array(
        [[1, 2, 3], [4, 4, 4], [4, 4, 4], [4, 4, 4], [0, 0, 0], [0, 0, 3]], dtype=np.float32
    )
    lengths = np.array([1, 0, 3, 2])
    out, new_lengths = resample(points, lengths, 1.0, np.ones(3))
    assert new_lengths.tolist() == [1, 0, 2, 4]
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[0], [1, 2, 3])
    np.testing.assert_array_equal(out[1:3], [[4, 4, 4], [4, 4, 4]])
    np.testing.assert_allclose(out[3:], [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 3]], atol=1e-6)
    empty, empty_lengths = resample(np.zeros((0, 3), np.float32), np.zeros(0, int), 1.0, ANISO)
    assert empty.shape == (0, 3) and empty_lengths.shape == (0,)


def test_naive_resampling_matches_vectorised():
    points, lengths = curvy_batch(3, b=50)
    config = AugmentConfig(step_size=0.8)
    out, new_lengths, parent = apply_augment(points, lengths, config, np.random.default_rng(0),
                                             ANISO)
    naive = naive_augment(pieces(points, lengths), config, np.random.default_rng(0), ANISO)
    np.testing.assert_array_equal(parent, np.arange(len(lengths)))
    assert [len(s) for s in naive] == new_lengths.tolist()
    for a, b in zip(pieces(out, new_lengths), naive, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ compress


def point_to_polyline_mm(p: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Distance from each point in p (N,3) to the polyline poly (K,3), both in mm."""
    a, b = poly[:-1], poly[1:]
    ab = b - a
    t = np.einsum("nkc,kc->nk", p[:, None] - a[None], ab) / np.maximum((ab**2).sum(1), 1e-12)
    closest = a[None] + np.clip(t, 0, 1)[..., None] * ab[None]
    return np.linalg.norm(p[:, None] - closest, axis=2).min(axis=1)


@pytest.mark.parametrize("voxel_sizes", [np.ones(3), ANISO])
def test_compress_fewer_points_within_tolerance(voxel_sizes):
    points, lengths = curvy_batch(4, b=20, voxel_sizes=voxel_sizes, lo=20, hi=80)
    tol = 0.1
    out, new_lengths = compress(points, lengths, tol, voxel_sizes)
    assert out.dtype == np.float32 and new_lengths.shape == lengths.shape
    assert new_lengths.sum() < lengths.sum() / 2
    for s, c in zip(pieces(points, lengths), pieces(out, new_lengths), strict=True):
        assert 2 <= len(c) <= len(s)
        np.testing.assert_allclose(c[[0, -1]], s[[0, -1]], atol=1e-4)
        s_mm, c_mm = s * voxel_sizes, c * voxel_sizes
        # kept points are original points, and every original point is within tol mm
        assert point_to_polyline_mm(c_mm, s_mm).max() < 1e-4
        assert point_to_polyline_mm(s_mm, c_mm).max() <= tol + 1e-4


# --------------------------------------------------------------------------------- split


@pytest.mark.parametrize("ratio", [0.0, 0.3, 1.0])
def test_split_conserves_points_and_counts(ratio):
    points, lengths = curvy_batch(5, b=60, lo=2, hi=40)
    min_points = 6
    original = points.copy()
    out, new_lengths, parent = split(points, lengths, ratio, np.random.default_rng(1), min_points)
    assert out is points or np.array_equal(out, original)
    assert new_lengths.sum() == lengths.sum()
    eligible = int((lengths >= 2 * min_points).sum())
    n_split = min(int(np.floor(len(lengths) * ratio + 1e-9)), eligible)
    assert len(new_lengths) == len(lengths) + n_split
    assert np.all(np.diff(parent) >= 0)
    counts = np.bincount(parent, minlength=len(lengths))
    assert (counts == 2).sum() == n_split and counts.min() == 1
    # the pieces of each parent are contiguous and cover exactly the parent's points
    starts, ends = offsets_of(new_lengths)[:-1], offsets_of(new_lengths)[1:]
    o = offsets_of(lengths)
    for p in range(len(lengths)):
        mine = np.flatnonzero(parent == p)
        assert starts[mine[0]] == o[p] and ends[mine[-1]] == o[p + 1]
        if len(mine) == 2:
            assert ends[mine[0]] == starts[mine[1]]
            assert new_lengths[mine].min() >= min_points
        else:
            assert new_lengths[mine[0]] == lengths[p]


def test_split_cuts_vary_and_short_streamlines_are_never_split():
    lengths = np.array([30] * 20 + [11] * 20)
    points = np.zeros((lengths.sum(), 3), np.float32)
    _, new_lengths, parent = split(points, lengths, 1.0, np.random.default_rng(2), min_points=6)
    cut = new_lengths[np.flatnonzero(np.diff(parent) == 0)]  # first halves
    assert len(cut) == 20 and len(set(cut.tolist())) > 3
    assert set(np.flatnonzero(np.bincount(parent) == 2).tolist()) == set(range(20))


# ------------------------------------------------------------------------------- reverse


def test_reverse_count_identity_and_untouched():
    points, lengths = curvy_batch(6, b=50)
    ratio = 0.3
    once = reverse(points, lengths, ratio, np.random.default_rng(3))
    twice = reverse(once, lengths, ratio, np.random.default_rng(3))
    np.testing.assert_array_equal(twice, points)
    changed = 0
    for s, r in zip(pieces(points, lengths), pieces(once, lengths), strict=True):
        if np.array_equal(s, r):
            continue
        np.testing.assert_array_equal(r, s[::-1])
        changed += 1
    assert changed == int(len(lengths) * ratio)


# --------------------------------------------------------------------------------- noise


@pytest.mark.parametrize("truncation", [1.0, 2.0, 30.0])
def test_noise_std_and_bound_in_mm(truncation):
    points = np.random.default_rng(7).uniform(0, 100, size=(60_000, 3)).astype(np.float32)
    noise_mm = 0.5
    out = add_noise(points, noise_mm, truncation, np.random.default_rng(8), ANISO)
    delta_mm = (out.astype(np.float64) - points) * ANISO
    expected_std = truncnorm(-truncation, truncation).std() * noise_mm
    np.testing.assert_allclose(delta_mm.std(axis=0), expected_std, rtol=0.02)
    np.testing.assert_allclose(delta_mm.mean(axis=0), 0, atol=0.02)
    assert np.abs(delta_mm).max() <= truncation * noise_mm + 1e-4
    if truncation >= 30:
        np.testing.assert_allclose(delta_mm.std(axis=0), noise_mm, rtol=0.02)


# ------------------------------------------------------------------------ augment & misc

FULL = AugmentConfig(step_size=0.7, split_ratio=0.4, reverse_ratio=0.5, noise_mm=0.2)


def test_same_seed_same_output_different_seed_different():
    points, lengths = curvy_batch(9)
    a = apply_augment(points, lengths, FULL, np.random.default_rng(11), ANISO)
    b = apply_augment(points, lengths, FULL, np.random.default_rng(11), ANISO)
    c = apply_augment(points, lengths, FULL, np.random.default_rng(12), ANISO)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert a[0].shape != c[0].shape or not np.array_equal(a[0], c[0])


@pytest.mark.parametrize(
    "call",
    [
        lambda p, n, r: resample(p, n, 0.7, ANISO),
        lambda p, n, r: compress(p, n, 0.1, ANISO),
        lambda p, n, r: split(p, n, 0.5, r),
        lambda p, n, r: reverse(p, n, 0.5, r),
        lambda p, n, r: add_noise(p, 0.3, 2.0, r, ANISO),
        lambda p, n, r: apply_augment(p, n, FULL, r, ANISO),
        lambda p, n, r: apply_augment(p, n, AugmentConfig(compress=0.2, split_ratio=1.0), r, ANISO),
    ],
)
def test_inputs_not_mutated(call):
    points, lengths = curvy_batch(10)
    p0, n0 = points.copy(), lengths.copy()
    call(points, lengths, np.random.default_rng(0))
    np.testing.assert_array_equal(points, p0)
    np.testing.assert_array_equal(lengths, n0)


def test_augment_default_config_is_identity():
    points, lengths = curvy_batch(12)
    out, new_lengths, parent = apply_augment(
        points, lengths, AugmentConfig(), np.random.default_rng(0), ANISO
    )
    np.testing.assert_array_equal(out, points)
    np.testing.assert_array_equal(new_lengths, lengths)
    np.testing.assert_array_equal(parent, np.arange(len(lengths)))


def test_augment_resample_then_split_parents_map_to_resampled_streamlines():
    points, lengths = curvy_batch(13, lo=20, hi=100)
    config = AugmentConfig(step_size=0.5, split_ratio=0.5)
    out, new_lengths, parent = apply_augment(points, lengths, config, np.random.default_rng(4),
                                             ANISO)
    ref_points, ref_lengths = resample(points, lengths, 0.5, ANISO)
    ref = pieces(ref_points, ref_lengths)
    got = pieces(out, new_lengths)
    assert len(got) > len(ref)
    for p, expected in enumerate(ref):
        joined = np.concatenate([got[j] for j in np.flatnonzero(parent == p)])
        np.testing.assert_array_equal(joined, expected)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"split_ratio": -0.1},
        {"split_ratio": 1.5},
        {"reverse_ratio": -0.01},
        {"reverse_ratio": 2.0},
        {"step_size": -1.0},
        {"step_size": 0.0},
        {"compress": 0.0},
        {"compress": -0.5},
        {"step_size": 1.0, "compress": 0.1},
        {"noise_mm": -0.1},
        {"noise_truncation": 0.0},
        {"noise_truncation": -2.0},
        {"split_ratio": float("nan")},
    ],
)
def test_config_bad_values_raise_config_error(kwargs):
    with pytest.raises(ConfigError) as info:
        AugmentConfig(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert any(key in message for key in kwargs)


def test_bad_arrays_raise_config_error():
    points = np.zeros((5, 3), np.float32)
    with pytest.raises(ConfigError, match="lengths"):
        resample(points, np.array([2, 2]), 1.0, ANISO)
    with pytest.raises(ConfigError, match="points"):
        reverse(np.zeros((5, 2)), np.array([5]), 0.5, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="voxel_sizes"):
        compress(points, np.array([5]), 0.1, [1.0, 0.0, 1.0])


def test_deterministic_and_is_random():
    assert not AugmentConfig().is_random
    assert not AugmentConfig(step_size=1.0).is_random
    for kwargs in ({"split_ratio": 0.1}, {"reverse_ratio": 0.1}, {"noise_mm": 0.1}):
        assert AugmentConfig(**kwargs).is_random
    det = FULL.deterministic()
    assert not det.is_random
    assert det == AugmentConfig(step_size=0.7, noise_truncation=FULL.noise_truncation)
    assert AugmentConfig(compress=0.3, noise_mm=1.0).deterministic().compress == 0.3
    points, lengths = curvy_batch(14)
    a = apply_augment(points, lengths, det, np.random.default_rng(1), ANISO)
    b = apply_augment(points, lengths, det, np.random.default_rng(2), ANISO)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_naive_gather_reads_each_streamline():
    points, lengths = curvy_batch(15, b=12)
    arr = zarr.create_array(store={}, shape=points.shape, dtype="float32", chunks=(64, 3))
    arr[:] = points
    ids = np.array([5, 0, 11, 5])
    got = naive_gather(arr, offsets_of(lengths), ids)
    expected = pieces(points, lengths)
    for i, g in zip(ids, got, strict=True):
        np.testing.assert_array_equal(g, expected[i])


def test_dipy_reference_single_streamline_agrees():
    """Each resampled streamline is what dipy gives for that streamline alone (in mm)."""
    points, lengths = curvy_batch(16, b=10)
    out, new_lengths = resample(points, lengths, 1.3, ANISO)
    for s, r in zip(pieces(points, lengths), pieces(out, new_lengths), strict=True):
        ref = set_number_of_points(s.astype(np.float64) * ANISO, len(r)) / ANISO
        np.testing.assert_allclose(r, ref, atol=1e-5)
