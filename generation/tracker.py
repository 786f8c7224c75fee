"""Track streamlines with a model, many in parallel, on the device of the subject's volume.

Generation contract (what a model implements to be tracked with; the demo
`tractrain.examples.next_direction.NextDirectionGRU` does)::

    state = model.init_state(n, device)
    direction, stop_logit, state = model.step(inputs, prev_dir, state)

- ``inputs``: (n, F) float32, the subject's input features (`InputConfig`) interpolated at the
  current points, exactly as the loader computes ``batch.inputs`` for training.
- ``prev_dir``: (n, 3) float32 unit vector of the last step, in the tracking voxel grid (the
  streamlines' voxel coordinates, as in ``batch.points``); zeros before the first step. This is
  ``normalize(points[t] - points[t - 1])`` of a training streamline.
- ``state``: the recurrent state of the n streamlines; a tensor or a (nested) tuple/list/dict of
  tensors whose **first dimension is the streamline** (the tracker keeps the rows of the
  streamlines still running with ``index_select``); None for a stateless model.
- ``direction``: (n, 3) direction of the next step in the same voxel grid, any non-zero norm
  (the tracker normalises it). A zero or non-finite direction stops the streamline.
- ``stop_logit``: (n,) or (n, 1) logits of "stop here", or None for a model without a stop
  signal; a streamline stops when ``sigmoid(stop_logit) > stop_threshold``.

Positions are voxel coordinates of the streamlines' reference grid (the `TrackingField` of
`tractrain.generation.field`) with the origin at the centre of voxel (0, 0, 0) (see
docs/store-format.md). A step is ``step_mm`` long in mm (the direction
is scaled with the voxel sizes; affines without shear assumed). A streamline stops, before the
step that would break the rule, when:

- ``length``: it would exceed ``max_length_mm`` (counting a given prefix, and with
  ``both_directions`` the two halves together): at most ``floor(max_length_mm / step_mm)``
  steps of a seed point;
- ``mask``: the next point's nearest voxel is outside the tracking mask (or the volume), so
  every tracked point lies in the mask;
- ``curvature``: the angle between the next and the previous step exceeds ``max_angle_deg``;
- ``signal``: the model's stop signal; ``invalid``: the model's direction is zero/non-finite.

`track` starts from seed points (optionally in both directions: the forward half is reversed and
fed back to the model, which then continues from the seed the other way); `continue_tracks`
warms the model's state up on given streamline prefixes (teacher forcing) and tracks onward.
Everything is deterministic; the optional direction noise draws from the ``generator`` given.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tractrain.data.batch import offsets_of
from tractrain.errors import ConfigError
from tractrain.generation.field import TrackingField

STOP_LENGTH, STOP_MASK, STOP_CURVATURE, STOP_SIGNAL, STOP_INVALID = 1, 2, 3, 4, 5
STOP_NAMES = {STOP_LENGTH: "length", STOP_MASK: "mask", STOP_CURVATURE: "curvature",
              STOP_SIGNAL: "signal", STOP_INVALID: "invalid"}
_EPS = 1e-6


@dataclass
class Tracks:
    """Tracked streamlines in the `Batch` layout (flat points + lengths), tracking voxel grid.

    Attributes:
        points: (M, 3) float32, streamline i is ``points[offsets[i]:offsets[i + 1]]``.
        lengths: (n,) int64 points per streamline, in the order of the seeds.
        stops: (n,) int64 stop code at the streamline's last point (``STOP_NAMES``).
        start_stops: (n,) stop code at its first point (``both_directions``), else None.
    """

    points: torch.Tensor
    lengths: torch.Tensor
    stops: torch.Tensor
    start_stops: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def offsets(self) -> torch.Tensor:
        return offsets_of(self.lengths)

    def split(self) -> list[torch.Tensor]:
        """One (L_i, 3) tensor per streamline."""
        return list(torch.split(self.points, self.lengths.tolist()))

    def last_points(self) -> torch.Tensor:
        """(n, 3) last point of every streamline."""
        return self.points[self.offsets[1:] - 1]


# ------------------------------------------------------------------------- state helpers


def _state_map(fn: Callable[..., torch.Tensor], state, *others):
    """Apply ``fn`` leaf-wise to a tensor / nested tuple, list, dict of tensors (or None)."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return fn(state, *others)
    if isinstance(state, tuple | list):
        return type(state)(_state_map(fn, s, *(o[i] for o in others))
                           for i, s in enumerate(state))
    if isinstance(state, dict):
        return {k: _state_map(fn, v, *(o[k] for o in others)) for k, v in state.items()}
    raise ConfigError(f"model state: expected a tensor or a tuple/list/dict of tensors, got "
                      f"{type(state).__name__} (see the generation contract in "
                      "tractrain.generation.tracker)")


def _take(state, rows: torch.Tensor):
    return _state_map(lambda t: t.index_select(0, rows), state)


def _put(state, rows: torch.Tensor, sub):
    return _state_map(lambda t, s: t.index_copy(0, rows, s), state, sub)


# ------------------------------------------------------------------------------ tracking


@dataclass(frozen=True)
class _Rules:
    step_mm: float
    max_length_mm: float
    cos_limit: float | None
    stop_threshold: float
    noise_std: float
    generator: torch.Generator | None


def _rules(step_mm, max_length_mm, max_angle_deg, stop_threshold, noise_std,
           generator) -> _Rules:
    def positive(name, value):
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
                math.isfinite(value) and value > 0):
            raise ConfigError(f"{name}: expected a finite number > 0, got {value!r}")

    positive("step_mm", step_mm)
    positive("max_length_mm", max_length_mm)
    if max_angle_deg is not None:
        positive("max_angle_deg", max_angle_deg)
    if not 0.0 <= stop_threshold <= 1.0:
        raise ConfigError(f"stop_threshold: expected a probability in [0, 1], got "
                          f"{stop_threshold!r}")
    if not (math.isfinite(noise_std) and noise_std >= 0):
        raise ConfigError(f"noise_std: expected a finite number >= 0, got {noise_std!r}")
    if noise_std > 0 and generator is None:
        raise ConfigError("noise_std > 0 needs a torch.Generator (generator=...) for "
                          "reproducible tracking")
    cos_limit = None if max_angle_deg is None else math.cos(math.radians(max_angle_deg))
    return _Rules(float(step_mm), float(max_length_mm), cos_limit, float(stop_threshold),
                  float(noise_std), generator)


def _unit_steps(points: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(M, 3) unit vector from the previous point to each point; zeros at first points."""
    steps = torch.zeros_like(points)
    if len(points) > 1:
        steps[1:] = F.normalize(points[1:] - points[:-1], dim=1)
    starts = torch.cumsum(lengths, 0) - lengths
    steps[starts[lengths > 0]] = 0.0
    return steps


def _reverse(points: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Every streamline of the flat ``points`` reversed in place of itself."""
    n = len(lengths)
    ids = torch.repeat_interleave(torch.arange(n, device=points.device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    within = torch.arange(len(points), device=points.device) - starts[ids]
    return points[starts[ids] + lengths[ids] - 1 - within]


def _propagate(model, field: TrackingField, points: torch.Tensor, lengths: torch.Tensor,
               rules: _Rules) -> Tracks:
    """Warm up on the prefixes ``points``/``lengths`` (every length >= 1), then track on."""
    device = field.device
    points = points.to(device, torch.float32)
    lengths = lengths.to(device, torch.int64)
    n = len(lengths)
    vs = field.voxel_sizes.to(device, torch.float32)
    offsets = torch.cumsum(lengths, 0) - lengths
    units = _unit_steps(points, lengths)  # voxel-grid unit steps, as in training
    state = model.init_state(n, device)

    # Teacher forcing: feed every prefix point but the last (its successor is known).
    k_max = int(lengths.max()) if n else 0
    for t in range(k_max - 1):
        rows = torch.nonzero(lengths > t + 1).squeeze(1)
        at = offsets[rows] + t
        everyone = len(rows) == n
        sub = state if everyone else _take(state, rows)
        _, _, sub = model.step(field.features(points[at]), units[at], sub)
        state = sub if everyone else _put(state, rows, sub)

    last = offsets + lengths - 1
    idx = torch.arange(n, device=device)
    pos = points[last]
    prev = units[last]
    prev_mm = F.normalize(prev * vs, dim=1)
    has_prev = prev.abs().sum(dim=1) > 0
    prefix_mm = torch.zeros(n, dtype=torch.float32, device=device)
    if len(points) > 1:
        seg = ((points[1:] - points[:-1]) * vs).norm(dim=1)
        seg = torch.cat([torch.zeros(1, device=device), seg])
        seg[offsets[lengths > 0]] = 0.0
        ids = torch.repeat_interleave(torch.arange(n, device=device), lengths)
        prefix_mm.index_add_(0, ids, seg)
    budget = torch.floor((rules.max_length_mm - prefix_mm) / rules.step_mm + _EPS)
    budget = budget.clamp(min=0).to(torch.int64)
    stops = torch.zeros(n, dtype=torch.int64, device=device)
    rec_ids = [torch.repeat_interleave(torch.arange(n, device=device), lengths)]
    rec_pts = [points]

    while len(idx):
        over = budget <= 0
        if bool(over.any()):
            stops[idx[over]] = STOP_LENGTH
            keep = torch.nonzero(~over).squeeze(1)
            idx, pos, prev, prev_mm = idx[keep], pos[keep], prev[keep], prev_mm[keep]
            has_prev, budget, state = has_prev[keep], budget[keep], _take(state, keep)
            if not len(idx):
                break
        direction, stop_logit, state = model.step(field.features(pos), prev, state)
        d = direction.detach().to(torch.float32)
        if rules.noise_std > 0:
            g = rules.generator
            noise = torch.randn(d.shape, generator=g, device=g.device).to(device)
            d = F.normalize(d, dim=1) + rules.noise_std * noise
        d_mm = d * vs
        norm = d_mm.norm(dim=1)
        valid = torch.isfinite(norm) & (norm > 1e-12)
        unit_mm = torch.where(valid[:, None], d_mm / norm.clamp(min=1e-12)[:, None],
                              torch.zeros_like(d_mm))
        code = torch.zeros(len(idx), dtype=torch.int64, device=device)
        if stop_logit is not None:
            p_stop = torch.sigmoid(stop_logit.detach().reshape(-1).to(torch.float32))
            code[p_stop > rules.stop_threshold] = STOP_SIGNAL
        code[(code == 0) & ~valid] = STOP_INVALID
        if rules.cos_limit is not None:
            bend = has_prev & ((unit_mm * prev_mm).sum(dim=1) < rules.cos_limit - _EPS)
            code[(code == 0) & bend] = STOP_CURVATURE
        new_pos = pos + unit_mm * rules.step_mm / vs
        code[(code == 0) & ~field.inside(new_pos)] = STOP_MASK
        ended = code > 0
        stops[idx[ended]] = code[ended]
        keep = torch.nonzero(~ended).squeeze(1)
        rec_ids.append(idx[keep])
        rec_pts.append(new_pos[keep])
        idx, pos = idx[keep], new_pos[keep]
        prev_mm = unit_mm[keep]
        prev = F.normalize(prev_mm / vs, dim=1)
        has_prev = torch.ones(len(idx), dtype=torch.bool, device=device)
        budget = budget[keep] - 1
        if len(keep) < len(ended):
            state = _take(state, keep)

    ids = torch.cat(rec_ids)
    order = torch.sort(ids, stable=True).indices
    out = torch.cat(rec_pts)[order]
    return Tracks(out, torch.bincount(ids, minlength=n), stops)


def _checked_model(model) -> None:
    for name in ("init_state", "step"):
        if not callable(getattr(model, name, None)):
            raise ConfigError(f"model {type(model).__name__}: has no {name}(); a tracked model "
                              "implements init_state(n, device) and step(inputs, prev_dir, "
                              "state) (see tractrain.generation.tracker)")


def continue_tracks(model, field: TrackingField, points: torch.Tensor, lengths: torch.Tensor, *,
                    step_mm: float, max_length_mm: float, max_angle_deg: float | None = None,
                    both_directions: bool = False, stop_threshold: float = 0.5,
                    noise_std: float = 0.0, generator: torch.Generator | None = None) -> Tracks:
    """Feed each prefix (flat ``points`` (M, 3), ``lengths`` (n,) >= 1) to the model, then
    track onward from its last point; the prefix is kept at the start of its track and counts
    towards ``max_length_mm`` (which bounds the whole streamline).

    With ``both_directions`` each track is then reversed, fed back to the model and continued
    past the prefix's first point; the result runs from that backward end through the prefix to
    the forward end, and ``start_stops`` says why the backward half stopped. ``noise_std``
    (> 0 needs ``generator``) adds Gaussian noise to each unit direction. Runs under
    ``torch.no_grad()`` on ``field.device``; the caller sets the model's train/eval mode.
    """
    _checked_model(model)
    rules = _rules(step_mm, max_length_mm, max_angle_deg, stop_threshold, noise_std, generator)
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    points = torch.as_tensor(points, dtype=torch.float32)
    if points.dim() != 2 or points.shape[1] != 3 or int(lengths.sum()) != len(points):
        raise ConfigError(f"prefixes: expected points (M, 3) with M = lengths.sum(), got "
                          f"{tuple(points.shape)} and lengths summing to {int(lengths.sum())}")
    if len(lengths) and int(lengths.min()) < 1:
        raise ConfigError("prefixes: every prefix needs at least one point")
    with torch.no_grad():
        forward = _propagate(model, field, points, lengths, rules)
        if not both_directions:
            return forward
        back = _propagate(model, field, _reverse(forward.points, forward.lengths),
                          forward.lengths, rules)
    return Tracks(_reverse(back.points, back.lengths), back.lengths, forward.stops, back.stops)


def track(model, field: TrackingField, seeds: torch.Tensor, *, step_mm: float,
          max_length_mm: float, max_angle_deg: float | None = None,
          both_directions: bool = False, stop_threshold: float = 0.5, noise_std: float = 0.0,
          generator: torch.Generator | None = None) -> Tracks:
    """Track from ``seeds`` (n, 3) (tracking voxel coordinates) with ``model``: each seed is a
    one-point prefix of `continue_tracks` (same arguments). With ``both_directions`` the
    streamline runs backward end -> seed -> forward end."""
    seeds = torch.as_tensor(seeds, dtype=torch.float32)
    if seeds.dim() != 2 or seeds.shape[1] != 3:
        raise ConfigError(f"seeds: expected shape (n, 3), got {tuple(seeds.shape)}")
    ones = torch.ones(len(seeds), dtype=torch.int64)
    return continue_tracks(model, field, seeds, ones, step_mm=step_mm,
                           max_length_mm=max_length_mm, max_angle_deg=max_angle_deg,
                           both_directions=both_directions, stop_threshold=stop_threshold,
                           noise_std=noise_std, generator=generator)
