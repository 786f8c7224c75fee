"""Trilinear interpolation and neighbourhoods, checked against scipy.ndimage.map_coordinates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from tractrain.data.interpolation import (
    InputConfig,
    interpolate,
    interpolate_inputs,
    neighborhood_offsets,
    num_input_features,
)
from tractrain.errors import ConfigError

SCIPY_MODE = {"zeros": "grid-constant", "clamp": "nearest"}


def scipy_interp(volume: np.ndarray, points: np.ndarray, outside: str) -> np.ndarray:
    """Independent reference: map_coordinates(order=1) per feature, in float64."""
    vol = volume.astype(np.float64)
    coords = points.astype(np.float64).T
    return np.stack(
        [
            map_coordinates(vol[..., k], coords, order=1, mode=SCIPY_MODE[outside], cval=0.0)
            for k in range(vol.shape[3])
        ],
        axis=1,
    )


def random_volume(rng: np.random.Generator, shape=(7, 5, 6, 3)) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def random_points(rng: np.random.Generator, shape, region: str, m: int = 400) -> np.ndarray:
    dims = np.array(shape[:3], dtype=np.float64)
    if region == "inside":
        pts = rng.uniform(0, 1, (m, 3)) * (dims - 1)
    elif region == "border":
        # coordinates exactly on the first/last voxel centre, on integers, or just inside/outside
        choices = np.stack(
            [np.zeros(3), dims - 1, dims - 1 - 1e-3, np.full(3, 1e-3), np.full(3, -1e-3),
             dims - 1 + 1e-3, np.ones(3), np.full(3, -0.5), dims - 0.5],
        )
        pick = rng.integers(0, len(choices), (m, 3))
        pts = choices[pick, np.arange(3)]
        mixed = rng.uniform(0, 1, (m, 3)) * (dims - 1)
        keep = rng.random((m, 3)) < 0.3
        pts = np.where(keep, mixed, pts)
    else:  # outside: well beyond the grid on every side, plus the fading band
        pts = -3.0 + rng.uniform(0, 1, (m, 3)) * (dims + 5)
    return pts.astype(np.float32)


@pytest.mark.parametrize("outside", ["zeros", "clamp"])
@pytest.mark.parametrize("region", ["inside", "border", "outside"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_scipy(outside, region, seed):
    rng = np.random.default_rng(seed)
    shape = [(7, 5, 6, 3), (4, 9, 2, 5)][seed]
    vol = random_volume(rng, shape)
    pts = random_points(rng, shape, region)
    out = interpolate(torch.from_numpy(vol), torch.from_numpy(pts), outside)
    assert out.dtype == torch.float32 and out.shape == (len(pts), shape[3])
    np.testing.assert_allclose(out.numpy(), scipy_interp(vol, pts, outside), rtol=0, atol=1e-5)


def test_outside_points_are_actually_outside():
    # guard for the test above: the "outside" sample really leaves the grid, and zeros/clamp
    # then disagree, so both policies are exercised
    rng = np.random.default_rng(3)
    shape = (7, 5, 6, 3)
    pts = random_points(rng, shape, "outside")
    beyond = (pts < -1) | (pts > np.array(shape[:3]))
    assert beyond.any(axis=1).mean() > 0.3
    vol = torch.from_numpy(random_volume(rng, shape))
    zeros = interpolate(vol, torch.from_numpy(pts), "zeros")
    clamp = interpolate(vol, torch.from_numpy(pts), "clamp")
    assert not torch.allclose(zeros, clamp)
    far = torch.from_numpy(beyond.any(axis=1))
    assert torch.all(zeros[far] == 0)


def test_integer_points_return_voxel_values():
    rng = np.random.default_rng(4)
    vol = random_volume(rng, (3, 4, 5, 2))
    grid = np.stack(np.meshgrid(*[np.arange(d) for d in vol.shape[:3]], indexing="ij"), -1)
    pts = torch.from_numpy(grid.reshape(-1, 3).astype(np.float32))
    for outside in ("zeros", "clamp"):
        out = interpolate(torch.from_numpy(vol), pts, outside)
        np.testing.assert_array_equal(out.numpy(), vol.reshape(-1, 2))


def test_single_voxel_axis():
    # a volume with one slice along z: clamp gives the slice everywhere, zeros fades around it
    rng = np.random.default_rng(5)
    vol = random_volume(rng, (4, 3, 1, 2))
    pts = np.array([[1.5, 0.5, 0.0], [1.5, 0.5, 0.25], [1.5, 0.5, -0.75], [2.0, 1.0, 3.0]],
                   dtype=np.float32)
    for outside in ("zeros", "clamp"):
        out = interpolate(torch.from_numpy(vol), torch.from_numpy(pts), outside)
        np.testing.assert_allclose(out.numpy(), scipy_interp(vol, pts, outside), atol=1e-5)


def test_empty_points():
    vol = torch.zeros(3, 3, 3, 4)
    out = interpolate(vol, torch.zeros(0, 3))
    assert out.shape == (0, 4) and out.dtype == torch.float32


@pytest.mark.parametrize("m", [10, 2000])  # fewer / more gathered rows than voxels
def test_float16_volume(m):
    rng = np.random.default_rng(6)
    shape = (6, 5, 4, 3)
    vol32 = torch.from_numpy(random_volume(rng, shape))
    vol16 = vol32.half()
    pts = torch.from_numpy(random_points(rng, shape, "border", m))
    out16 = interpolate(vol16, pts)
    assert out16.dtype == torch.float32
    # the half values are exact in float32, so interpolating them is float32 arithmetic
    reference = scipy_interp(vol16.float().numpy(), pts.numpy(), "zeros")
    np.testing.assert_allclose(out16.numpy(), reference, rtol=0, atol=1e-5)
    np.testing.assert_allclose(out16.numpy(), interpolate(vol32, pts).numpy(), atol=5e-3)


def test_float64_volume_gives_float32():
    rng = np.random.default_rng(7)
    vol = rng.standard_normal((5, 5, 5, 2))
    pts = random_points(rng, vol.shape, "inside")
    out = interpolate(torch.from_numpy(vol), torch.from_numpy(pts))
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), scipy_interp(vol, pts, "zeros"), atol=1e-5)


@pytest.mark.parametrize(
    ("neighborhood", "radius", "resolution", "count"),
    [
        (None, 0.0, None, 1),
        ("axes", 1.0, None, 7),
        ("axes", 1.0, 1.0, 7),
        ("grid", 1.0, 1.0, 27),
        ("axes", 2.0, 1.0, 13),
        ("grid", 2.0, 1.0, 125),
        ("axes", 1.5, 0.5, 19),
    ],
)
def test_neighborhood_counts(neighborhood, radius, resolution, count):
    config = InputConfig("fodf", neighborhood, radius, resolution)
    offsets = neighborhood_offsets(config, (1.0, 1.0, 1.0))
    assert offsets.shape == (count, 3) and offsets.dtype == torch.float32
    assert torch.all(offsets[0] == 0)
    assert len({tuple(row) for row in offsets.tolist()}) == count  # no duplicates
    assert num_input_features(45, config, (1.0, 1.0, 1.0)) == 45 * count
    step = radius if resolution is None else resolution
    if neighborhood is not None:
        # every offset is a whole number of resolution steps, within the radius
        steps = offsets / step
        np.testing.assert_allclose(steps, torch.round(steps), atol=1e-5)
        assert offsets.abs().max() == pytest.approx(radius)
    if neighborhood == "axes":
        assert torch.all((offsets != 0).sum(1)[1:] == 1)  # on an axis
        assert torch.allclose(offsets.sum(0), torch.zeros(3))  # symmetric


def test_neighborhood_anisotropic_voxels():
    sizes = (2.0, 1.0, 0.5)
    for neighborhood in ("axes", "grid"):
        config = InputConfig("fodf", neighborhood, 1.0, 1.0)
        iso_mm = neighborhood_offsets(config, (1.0, 1.0, 1.0))  # offsets in mm
        aniso = neighborhood_offsets(config, sizes)
        torch.testing.assert_close(aniso, iso_mm / torch.tensor(sizes))
    axes = neighborhood_offsets(InputConfig("fodf", "axes", 1.0), torch.tensor(sizes))
    # 1 mm along x is half a 2 mm voxel; along z it is two 0.5 mm voxels
    assert axes[:, 0].abs().max() == pytest.approx(0.5)
    assert axes[:, 2].abs().max() == pytest.approx(2.0)


@pytest.mark.parametrize("neighborhood", ["axes", "grid"])
@pytest.mark.parametrize("outside", ["zeros", "clamp"])
def test_interpolate_inputs_layout(neighborhood, outside):
    rng = np.random.default_rng(9)
    vol = random_volume(rng, (8, 7, 6, 4))
    pts = random_points(rng, vol.shape, "border", 60)
    sizes = (1.25, 1.0, 2.0)
    config = InputConfig("fodf", neighborhood, 2.0, 1.0, outside=outside)
    offsets = neighborhood_offsets(config, sizes)
    out = interpolate_inputs(torch.from_numpy(vol), torch.from_numpy(pts), config, sizes)
    n, f = offsets.shape[0], vol.shape[3]
    assert out.shape == (60, n * f) == (60, num_input_features(f, config, sizes))
    np.testing.assert_array_equal(
        out[:, :f].numpy(), interpolate(torch.from_numpy(vol), torch.from_numpy(pts), outside)
    )
    for j in range(n):
        shifted = pts + offsets[j].numpy()
        np.testing.assert_allclose(
            out[:, j * f:(j + 1) * f].numpy(), scipy_interp(vol, shifted, outside), atol=1e-5
        )


def test_interpolate_inputs_without_neighborhood():
    rng = np.random.default_rng(10)
    vol = torch.from_numpy(random_volume(rng))
    pts = torch.from_numpy(random_points(rng, vol.shape, "inside"))
    out = interpolate_inputs(vol, pts, InputConfig("fodf", outside="clamp"), (2.0, 2.0, 2.0))
    torch.testing.assert_close(out, interpolate(vol, pts, "clamp"), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"neighborhood": "sphere", "radius_mm": 1.0}, "neighborhood"),
        ({"outside": "wrap"}, "outside"),
        ({"radius_mm": -1.0}, "radius_mm"),
        ({"radius_mm": float("nan")}, "radius_mm"),
        ({"neighborhood": "axes"}, "radius_mm"),
        ({"neighborhood": "grid", "radius_mm": 0.0}, "radius_mm"),
        ({"resolution_mm": 1.0}, "resolution_mm"),
        ({"neighborhood": "axes", "radius_mm": 0.0, "resolution_mm": 1.0}, "radius_mm"),
        ({"neighborhood": "axes", "radius_mm": 1.0, "resolution_mm": 0.0}, "resolution_mm"),
        ({"neighborhood": "axes", "radius_mm": 1.0, "resolution_mm": -0.5}, "resolution_mm"),
        ({"neighborhood": "axes", "radius_mm": 1.0, "resolution_mm": 2.0}, "resolution_mm"),
        ({"volume_group": ""}, "volume_group"),
    ],
)
def test_config_errors(kwargs, field):
    kwargs = {"volume_group": "fodf", **kwargs}
    with pytest.raises(ConfigError, match=field) as info:
        InputConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_bad_arguments():
    vol = torch.zeros(3, 3, 3, 2)
    with pytest.raises(ConfigError, match="outside"):
        interpolate(vol, torch.zeros(4, 3), "nearest")
    with pytest.raises(ConfigError, match="points"):
        interpolate(vol, torch.zeros(4, 2))
    with pytest.raises(ConfigError, match="volume"):
        interpolate(torch.zeros(3, 3, 3), torch.zeros(4, 3))
    config = InputConfig("fodf", "axes", 1.0)
    for sizes in [(1.0, 1.0), (1.0, 0.0, 1.0), (1.0, -2.0, 1.0)]:
        with pytest.raises(ConfigError, match="voxel_sizes"):
            neighborhood_offsets(config, sizes)


@pytest.mark.parametrize("outside", ["zeros", "clamp"])
def test_point_major_layout_matches_scipy(monkeypatch, outside):
    # the point-major gather + bmm path is what CUDA runs; exercise it on CPU too
    import tractrain.data.interpolation as interpolation

    monkeypatch.setattr(interpolation, "is_corner_major", lambda device: False)
    rng = np.random.default_rng(12)
    vol = random_volume(rng, (6, 7, 5, 3))
    pts = random_points(rng, vol.shape, "outside")
    for dtype in (torch.float32, torch.float16):
        v = torch.from_numpy(vol).to(dtype)
        out = interpolation.interpolate(v, torch.from_numpy(pts), outside)
        reference = scipy_interp(v.float().numpy(), pts, outside)
        np.testing.assert_allclose(out.numpy(), reference, rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(11)
    vol = torch.from_numpy(random_volume(rng, (9, 8, 7, 5)))
    pts = torch.from_numpy(random_points(rng, vol.shape, "border", 3000))
    config = InputConfig("fodf", "axes", 1.0, outside="zeros")
    for dtype in (torch.float32, torch.float16):
        cpu = interpolate_inputs(vol.to(dtype), pts, config, (1.0, 1.0, 1.0))
        gpu = interpolate_inputs(vol.to(dtype).cuda(), pts.cuda(), config, (1.0, 1.0, 1.0))
        assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-5)


def test_blockwise_cpu_path_equals_one_block_and_scipy(monkeypatch):
    from scipy import ndimage

    from tractrain.data import interpolation

    rng = np.random.default_rng(4)
    volume = torch.from_numpy(rng.normal(size=(6, 7, 5, 3)).astype(np.float32))
    points = torch.from_numpy(rng.uniform(-1.0, 7.0, size=(23, 3)).astype(np.float32))
    whole = interpolation.interpolate(volume, points, "zeros")
    monkeypatch.setattr(interpolation, "BLOCK_POINTS", 5)  # 5 blocks, the last one partial
    blocks = interpolation.interpolate(volume, points, "zeros")
    assert torch.equal(whole, blocks)
    for f in range(3):
        ref = ndimage.map_coordinates(volume[..., f].numpy(), points.numpy().T, order=1,
                                      mode="grid-constant", cval=0.0)
        np.testing.assert_allclose(blocks[:, f].numpy(), ref, atol=1e-5)
    half = interpolation.interpolate(volume.half(), points, "clamp")
    np.testing.assert_allclose(half.numpy(), interpolation.interpolate(
        volume.half().float(), points, "clamp").numpy(), atol=1e-6)
