"""The tracker (generation/tracker.py): each stopping rule alone, prefixes, both directions,
determinism, the demo model's generation contract, devices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tractrain.data.interpolation import InputConfig, interpolate
from tractrain.errors import ConfigError
from tractrain.examples.next_direction import make_model
from tractrain.generation.field import TrackingField
from tractrain.generation.tracker import (
    STOP_CURVATURE,
    STOP_INVALID,
    STOP_LENGTH,
    STOP_MASK,
    STOP_SIGNAL,
    continue_tracks,
    track,
)

SHAPE = (40, 30, 20)
VOXEL_SIZES = (2.0, 1.0, 1.0)  # anisotropic: a 1 mm step is half a voxel along x


pytestmark = pytest.mark.usefixtures("one_thread")


def make_field(mask: np.ndarray | None = None, n_features: int = 3, seed: int = 0,
               device: str = "cpu") -> TrackingField:
    rng = np.random.default_rng(seed)
    volume = torch.as_tensor(rng.normal(size=(*SHAPE, n_features)), dtype=torch.float32)
    return TrackingField(
        volume=volume.to(device), inputs=InputConfig("dwi"),
        voxel_sizes=torch.tensor(VOXEL_SIZES), volume_voxel_sizes=torch.tensor(VOXEL_SIZES),
        mask=None if mask is None else torch.as_tensor(mask).to(device))


class Constant:
    """Always the same direction (voxel grid); optional per-streamline stop after N steps.

    The state (a dict: call count and each streamline's limit) checks that the tracker keeps
    state rows aligned with their streamlines when some stop."""

    def __init__(self, direction, stop_after=None):
        self.direction = torch.tensor(direction, dtype=torch.float32)
        self.stop_after = stop_after
        self.inputs_seen: list[torch.Tensor] = []

    def init_state(self, n, device):
        limit = torch.full((n,), 10**6) if self.stop_after is None else torch.as_tensor(
            self.stop_after)
        return {"count": torch.zeros(n, dtype=torch.int64, device=device),
                "limit": limit.to(device)}

    def step(self, inputs, prev_dir, state):
        self.inputs_seen.append(inputs)
        n = len(inputs)
        stop = torch.where(state["count"] >= state["limit"], 10.0, -10.0)
        direction = self.direction.to(inputs.device).expand(n, 3)
        return direction, stop, {"count": state["count"] + 1, "limit": state["limit"]}


class Turn:
    """+x for ``turn_after`` steps, then a turn of ``angle`` degrees in the x-y plane (mm)."""

    def __init__(self, turn_after: int, angle: float):
        self.turn_after, self.angle = turn_after, math.radians(angle)

    def init_state(self, n, device):
        return torch.zeros(n, 1, device=device)

    def step(self, inputs, prev_dir, state):
        mm = torch.tensor([1.0, 0.0, 0.0])
        turned = torch.tensor([math.cos(self.angle), math.sin(self.angle), 0.0])
        after = (state[:, 0] >= self.turn_after)[:, None].cpu()
        d_mm = torch.where(after, turned, mm)
        return (d_mm / torch.tensor(VOXEL_SIZES)).to(inputs.device), None, state + 1


class Straight:
    """Keep going the way it came (+x when there is no previous step); stateless."""

    def init_state(self, n, device):
        return None

    def step(self, inputs, prev_dir, state):
        start = torch.tensor([1.0, 0.0, 0.0], device=prev_dir.device).expand_as(prev_dir)
        moving = prev_dir.abs().sum(dim=1, keepdim=True) > 0
        return torch.where(moving, prev_dir, start), None, state


def nearest_voxel_inside(points: np.ndarray, mask: np.ndarray) -> np.ndarray:
    ijk = np.rint(points).astype(int)
    ok = np.all((ijk >= 0) & (ijk < np.array(mask.shape)), axis=1)
    inside = np.zeros(len(points), dtype=bool)
    inside[ok] = mask[tuple(ijk[ok].T)]
    return inside


def box_mask(lo, hi) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = True
    return mask


def mm_lengths(tracks) -> np.ndarray:
    return np.array([np.linalg.norm(np.diff(s.numpy() * VOXEL_SIZES, axis=0), axis=1).sum()
                     for s in tracks.split()])


def test_leaving_the_mask_stops_at_the_border():
    mask = box_mask((2, 5, 5), (9, 15, 15))
    seeds = torch.tensor([[3.1, 10.0, 10.0], [5.3, 10.0, 10.0]])
    tracks = track(Constant([1.0, 0.0, 0.0]), make_field(mask), seeds, step_mm=1.0,
                   max_length_mm=1000.0)
    assert tracks.stops.tolist() == [STOP_MASK, STOP_MASK]
    for seed, line in zip(seeds.numpy(), tracks.split(), strict=True):
        line = line.numpy()
        # reference: points seed + k * 0.5 voxel along x while the nearest voxel is in the mask
        expected = []
        k = 0
        while nearest_voxel_inside(seed[None] + [[0.5 * k, 0, 0]], mask)[0]:
            expected.append(seed + [0.5 * k, 0, 0])
            k += 1
        np.testing.assert_allclose(line, np.array(expected), atol=1e-5)
        assert nearest_voxel_inside(line, mask).all()
        assert not nearest_voxel_inside(line[-1:] + [[0.5, 0, 0]], mask)[0]


def test_volume_border_stops_without_mask():
    seeds = torch.tensor([[35.0, 10.0, 10.0]])
    tracks = track(Constant([1.0, 0.0, 0.0]), make_field(None), seeds, step_mm=2.0,
                   max_length_mm=1000.0)
    last = tracks.points[-1, 0].item()
    assert tracks.stops.tolist() == [STOP_MASK]
    assert last <= SHAPE[0] - 0.5 and last + 1.0 > SHAPE[0] - 0.5


@pytest.mark.parametrize("step_mm, max_length_mm", [(1.0, 10.0), (0.75, 10.0), (1.5, 4.4)])
def test_max_length_gives_exact_point_count(step_mm, max_length_mm):
    seeds = torch.tensor([[3.0, 3.0, 3.0], [3.0, 8.0, 8.0]])
    direction = [0.3, 1.0, 0.4]  # oblique: the mm length needs the voxel sizes
    tracks = track(Constant(direction), make_field(None), seeds, step_mm=step_mm,
                   max_length_mm=max_length_mm)
    steps = math.floor(max_length_mm / step_mm + 1e-9)
    assert tracks.lengths.tolist() == [steps + 1, steps + 1]
    assert tracks.stops.tolist() == [STOP_LENGTH, STOP_LENGTH]
    np.testing.assert_allclose(mm_lengths(tracks), steps * step_mm, rtol=1e-5)
    segments = np.diff(tracks.split()[0].numpy(), axis=0) * VOXEL_SIZES
    expected = np.array(direction) * VOXEL_SIZES
    np.testing.assert_allclose(segments, np.tile(expected / np.linalg.norm(expected) * step_mm,
                                                 (steps, 1)), atol=1e-5)


def test_prefix_counts_towards_max_length():
    prefix = torch.tensor([[3.0, 3.0, 3.0], [3.0, 4.0, 3.0], [3.0, 6.0, 3.0]])  # 3 mm along y
    tracks = continue_tracks(Constant([0.0, 1.0, 0.0]), make_field(None), prefix,
                             torch.tensor([3]), step_mm=1.0, max_length_mm=10.0)
    assert tracks.lengths.tolist() == [3 + 7]
    np.testing.assert_allclose(tracks.points[:3].numpy(), prefix.numpy())
    np.testing.assert_allclose(mm_lengths(tracks), [10.0], rtol=1e-6)


def test_curvature_limit_stops_a_90_degree_turn():
    seeds = torch.tensor([[5.0, 5.0, 5.0]])
    field = make_field(None)
    stopped = track(Turn(4, 90.0), field, seeds, step_mm=1.0, max_length_mm=20.0,
                    max_angle_deg=60.0)
    assert stopped.stops.tolist() == [STOP_CURVATURE]
    assert stopped.lengths.tolist() == [5]  # the seed and the 4 straight steps
    allowed = track(Turn(4, 90.0), field, seeds, step_mm=1.0, max_length_mm=20.0,
                    max_angle_deg=95.0)
    assert allowed.stops.tolist() == [STOP_LENGTH]
    mild = track(Turn(4, 30.0), field, seeds, step_mm=1.0, max_length_mm=20.0,
                 max_angle_deg=45.0)
    assert mild.stops.tolist() == [STOP_LENGTH] and mild.lengths.tolist() == [21]
    unlimited = track(Turn(4, 90.0), field, seeds, step_mm=1.0, max_length_mm=20.0)
    assert unlimited.stops.tolist() == [STOP_LENGTH]


def test_stop_signal_stops_each_streamline_when_it_says():
    limits = [6, 0, 3, 9, 1]
    seeds = torch.tensor([[3.0, 5.0 + i, 5.0] for i in range(len(limits))])
    tracks = track(Constant([1.0, 0.0, 0.0], stop_after=limits), make_field(None), seeds,
                   step_mm=1.0, max_length_mm=100.0)
    assert tracks.lengths.tolist() == [n + 1 for n in limits]
    assert tracks.stops.tolist() == [STOP_SIGNAL] * len(limits)
    for seed, line in zip(seeds, tracks.split(), strict=True):  # rows stay with their seed
        assert torch.equal(line[0], seed)


def test_stop_threshold_one_ignores_the_signal():
    tracks = track(Constant([1.0, 0.0, 0.0], stop_after=[0]), make_field(None),
                   torch.tensor([[3.0, 5.0, 5.0]]), step_mm=1.0, max_length_mm=5.0,
                   stop_threshold=1.0)
    assert tracks.stops.tolist() == [STOP_LENGTH]


def test_zero_direction_is_invalid():
    tracks = track(Constant([0.0, 0.0, 0.0]), make_field(None), torch.tensor([[3.0, 5, 5]]),
                   step_mm=1.0, max_length_mm=5.0)
    assert tracks.stops.tolist() == [STOP_INVALID] and tracks.lengths.tolist() == [1]


def test_both_directions_concatenates_backward_seed_forward():
    mask = box_mask((4, 2, 2), (30, 20, 15))
    seeds = torch.tensor([[10.2, 5.0, 5.0], [25.7, 8.0, 8.0]])
    tracks = track(Straight(), make_field(mask), seeds, step_mm=1.0, max_length_mm=1000.0,
                   both_directions=True)
    assert tracks.stops.tolist() == [STOP_MASK] * 2
    assert tracks.start_stops.tolist() == [STOP_MASK] * 2
    for seed, line in zip(seeds.numpy(), tracks.split(), strict=True):
        line = line.numpy()
        x = line[:, 0]
        assert np.all(np.diff(x) > 0)  # one straight line, backward end first
        np.testing.assert_allclose(line[:, 1:], np.tile(seed[1:], (len(line), 1)))
        # reference: every seed + k * 0.5 voxel (k of either sign) whose voxel is in the mask
        ks = [k for k in range(-200, 200)
              if nearest_voxel_inside((seed + [0.5 * k, 0, 0])[None], mask)[0]]
        np.testing.assert_allclose(x, seed[0] + 0.5 * np.array(ks), atol=1e-4)


def test_both_directions_bounds_the_total_length():
    tracks = track(Straight(), make_field(None), torch.tensor([[20.0, 5.0, 5.0]]), step_mm=1.0,
                   max_length_mm=10.0, both_directions=True)
    assert tracks.lengths.tolist() == [11]
    assert tracks.start_stops.tolist() == [STOP_LENGTH]
    assert tracks.stops.tolist() == [STOP_LENGTH]  # forward half: the whole budget
    assert torch.equal(tracks.points[0], torch.tensor([20.0, 5.0, 5.0]))


def test_noise_is_deterministic_for_a_seed():
    seeds = torch.tensor([[15.0, 10.0, 8.0]] * 4)
    field = make_field(None)

    def run(seed):
        return track(Constant([1.0, 0.0, 0.0]), field, seeds, step_mm=1.0, max_length_mm=8.0,
                     noise_std=0.3, generator=torch.Generator().manual_seed(seed))

    first, again, other = run(5), run(5), run(6)
    assert torch.equal(first.points, again.points)
    assert not torch.allclose(first.points, other.points)
    assert not torch.allclose(first.split()[0], first.split()[1])  # noise per streamline
    with pytest.raises(ConfigError, match="generator"):
        track(Constant([1.0, 0, 0]), field, seeds, step_mm=1.0, max_length_mm=8.0,
              noise_std=0.3)


def test_bad_arguments_are_config_errors():
    field = make_field(None)
    seeds = torch.zeros(1, 3)
    with pytest.raises(ConfigError, match="step_mm"):
        track(Straight(), field, seeds, step_mm=0.0, max_length_mm=5.0)
    with pytest.raises(ConfigError, match="max_angle_deg"):
        track(Straight(), field, seeds, step_mm=1.0, max_length_mm=5.0, max_angle_deg=-1)
    with pytest.raises(ConfigError, match="init_state"):
        track(torch.nn.Linear(3, 3), field, seeds, step_mm=1.0, max_length_mm=5.0)
    with pytest.raises(ConfigError, match="seeds"):
        track(Straight(), field, torch.zeros(3), step_mm=1.0, max_length_mm=5.0)


def test_inputs_are_the_features_at_the_current_point():
    model = Constant([1.0, 0.0, 0.0])
    field = make_field(None)
    tracks = track(model, field, torch.tensor([[3.3, 4.6, 5.1]]), step_mm=1.0,
                   max_length_mm=3.0)
    fed = torch.cat(model.inputs_seen)
    expected = interpolate(field.volume, tracks.points[:-1])  # every point but the last
    torch.testing.assert_close(fed, expected)


def demo_model(n_features: int, seed: int = 0):
    torch.manual_seed(seed)
    return make_model({"n_inputs": n_features, "hidden_size": 16, "num_layers": 2}).eval()


def test_demo_model_steps_match_its_training_forward():
    """Warm-up on a prefix, then one step == the training forward's prediction at the last
    prefix point (the loss_fn layout: inputs at t, previous unit direction)."""
    field = make_field(None)
    model = demo_model(3)
    rng = np.random.default_rng(1)
    prefixes = [np.cumsum(rng.uniform(0.2, 0.6, (k, 3)), axis=0) + 5 for k in (4, 1, 6)]
    points = torch.as_tensor(np.concatenate(prefixes), dtype=torch.float32)
    lengths = torch.tensor([len(p) for p in prefixes])
    tracks = continue_tracks(model, field, points, lengths, step_mm=1.0, max_length_mm=100.0,
                             max_angle_deg=179.0)
    assert (tracks.lengths >= lengths).all()
    vs = torch.tensor(VOXEL_SIZES)
    for prefix, line in zip(prefixes, tracks.split(), strict=True):
        pts = torch.as_tensor(prefix, dtype=torch.float32)
        feats = field.features(pts)
        prev = torch.zeros_like(pts)
        prev[1:] = F.normalize(pts[1:] - pts[:-1], dim=1)
        with torch.no_grad():
            predicted = model([torch.cat([feats, prev], dim=1)])[-1]
        unit_mm = F.normalize(predicted * vs, dim=0)
        if len(line) > len(prefix):  # it stepped: the step follows the prediction
            torch.testing.assert_close(line[len(prefix)], pts[-1] + unit_mm / vs)


def test_demo_model_state_has_the_streamline_first():
    model = demo_model(3)
    state = model.init_state(4, "cpu")
    assert state.shape == (4, 2, 16)
    direction, stop, state2 = model.step(torch.zeros(4, 3), torch.zeros(4, 3), state)
    assert stop is None and state2.shape == state.shape
    torch.testing.assert_close(direction.norm(dim=1), torch.ones(4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    mask = box_mask((2, 2, 2), (35, 25, 17))
    seeds = torch.tensor([[10.0, 10.0, 8.0], [20.0, 12.0, 9.0], [5.0, 5.0, 5.0]])
    kwargs = dict(step_mm=0.5, max_length_mm=40.0, max_angle_deg=60.0, both_directions=True)
    cpu = track(demo_model(3), make_field(mask), seeds, **kwargs)
    gpu = track(demo_model(3).cuda(), make_field(mask, device="cuda"), seeds.cuda(), **kwargs)
    assert gpu.points.device.type == "cuda"
    assert torch.equal(gpu.lengths.cpu(), cpu.lengths)
    torch.testing.assert_close(gpu.points.cpu(), cpu.points, atol=1e-4, rtol=1e-4)
