"""Example model: predict the next streamline direction with a GRU (the demo's model).

This is what you write to train your own model with tractrain: a ``make_model(config)`` and a
``loss_fn(model, batch) -> (mean_loss, n)``. The batch holds B streamlines packed flat:
``batch.points`` (M, 3) voxel coordinates, ``batch.lengths`` (B,) points per streamline and
``batch.inputs`` (M, F) diffusion features interpolated at every point.

To track with the model (generation validation, ``tractrain-track``) it also implements the
generation contract of `tractrain.generation.tracker`: ``init_state(n, device)`` and
``step(inputs, prev_dir, state) -> (direction, stop_logit, state)``, one point at a time, with
the same inputs as in training (features at point t and the unit direction t - 1 -> t).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence

from tractrain.data.batch import Batch
from tractrain.errors import ConfigError


class NextDirectionGRU(torch.nn.Module):
    """GRU over [features at point t, previous direction] -> direction from t to t + 1."""

    def __init__(self, n_inputs: int, hidden_size: int = 64, num_layers: int = 1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.gru = torch.nn.GRU(n_inputs + 3, hidden_size, num_layers, batch_first=True,
                                dropout=dropout if num_layers > 1 else 0.0)
        self.head = torch.nn.Linear(hidden_size, 3)

    def forward(self, steps: list[torch.Tensor]) -> torch.Tensor:
        """``steps``: one (L_i, n_inputs + 3) tensor per streamline -> (sum L_i, 3) flat."""
        lengths = torch.tensor([len(s) for s in steps])
        packed = pack_padded_sequence(pad_sequence(steps, batch_first=True), lengths,
                                      batch_first=True, enforce_sorted=False)
        hidden, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True)  # (B, Lmax, H)
        valid = torch.arange(hidden.shape[1]) < lengths[:, None]  # drop the padding
        return self.head(hidden[valid.to(hidden.device)])  # streamline by streamline, in order

    # -- generation contract (tractrain.generation.tracker) ----------------------------------------
    def init_state(self, n: int, device: torch.device | str) -> torch.Tensor:
        """Zero hidden state of ``n`` streamlines: (n, num_layers, hidden_size)."""
        return torch.zeros(n, self.gru.num_layers, self.gru.hidden_size, device=device)

    def step(self, inputs: torch.Tensor, prev_dir: torch.Tensor,
             state: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor]:
        """One point: (n, F) features and (n, 3) previous unit direction -> (unit next
        direction (n, 3), no stop signal, new state). The state keeps the streamline first."""
        x = torch.cat([inputs, prev_dir], dim=1).unsqueeze(1)  # (n, 1, F + 3)
        out, hidden = self.gru(x, state.transpose(0, 1).contiguous())
        return F.normalize(self.head(out[:, 0]), dim=1), None, hidden.transpose(0, 1)


def make_model(config: dict) -> torch.nn.Module:
    """Build the model from the ``model`` section of the training config."""
    return NextDirectionGRU(int(config["n_inputs"]), int(config.get("hidden_size", 64)),
                            int(config.get("num_layers", 1)), float(config.get("dropout", 0.0)))


def step_directions(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The points the loss uses: flat index of point t of every step t -> t + 1 (N,), the unit
    true direction of each step (N, 3) and the previous one (zeros at a streamline's first
    step)."""
    points, lengths = batch.points, batch.lengths
    # A step t goes from point t to t + 1: every point except the last of its streamline.
    last = (batch.offsets[1:] - 1)[lengths > 0]
    has_next = torch.ones(len(points), dtype=torch.bool, device=points.device)
    has_next[last] = False
    at = torch.nonzero(has_next).squeeze(1)
    target = F.normalize(points[at + 1] - points[at], dim=1)
    previous = torch.roll(target, 1, dims=0)
    is_first = torch.zeros_like(has_next)
    is_first[batch.offsets[:-1][lengths > 0]] = True
    previous[is_first[at]] = 0.0
    return at, target, previous


def loss_fn(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """Mean (1 - cosine similarity) between predicted and true directions, over all points
    that have a successor; n = number of such points."""
    if batch.inputs is None:
        raise ConfigError("next_direction loss_fn: batch.inputs is None; configure the "
                          "loader's inputs (InputConfig with a volume_group)")
    at, target, previous = step_directions(batch)
    if len(at) == 0:  # only one-point streamlines: nothing to predict, zero gradient
        return sum(p.sum() for p in model.parameters()) * 0.0, 0
    n_steps = (batch.lengths - 1).clamp(min=0)  # steps per streamline
    x = torch.cat([batch.inputs[at], previous], dim=1)  # (N, F + 3)
    steps = [s for s in torch.split(x, n_steps.tolist()) if len(s) > 0]
    predicted = model(steps)  # (N, 3), same order as ``target``
    loss = 1.0 - F.cosine_similarity(predicted, target, dim=1)
    return loss.mean(), len(at)


def baselines(batches: Iterable[Batch]) -> dict[str, float]:
    """Trivial predictors scored like `loss_fn`, on the same points (every step of the given
    batches, e.g. a validation loader):

    - ``previous_direction``: repeat the previous true direction (the model's own input; at a
      streamline's first step there is none, which scores 1 like any orientation guess);
    - ``constant_direction``: the best single direction for every step, the normalised mean
      true direction (near 1 when streamlines are stored both ways round);
    - ``n``: the number of steps.

    A model that learned something beyond continuing straight scores below
    ``previous_direction``."""
    previous_sum, direction_sum, n = 0.0, torch.zeros(3, dtype=torch.float64), 0
    with torch.no_grad():
        for batch in batches:
            at, target, previous = step_directions(batch)
            cos = F.cosine_similarity(previous, target, dim=1)
            previous_sum += float((1.0 - cos).double().sum())
            direction_sum += target.double().sum(dim=0).cpu()
            n += len(at)
    if n == 0:
        raise ConfigError("baselines: the batches hold no step (streamlines of >= 2 points)")
    return {"previous_direction": previous_sum / n,
            "constant_direction": 1.0 - float(direction_sum.norm()) / n, "n": n}
