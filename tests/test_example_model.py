"""The README's example model (examples/next_direction.py) on synthetic batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tractrain.data.batch import Batch
from tractrain.errors import ConfigError
from tractrain.examples.next_direction import loss_fn, make_model

N_FEATURES = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def make_batch(streamlines: list[np.ndarray], inputs: list[np.ndarray] | None) -> Batch:
    """A Batch built directly from per-streamline point and input arrays."""
    count = len(streamlines)
    return Batch(
        points=torch.as_tensor(np.concatenate(streamlines), dtype=torch.float32),
        lengths=torch.tensor([len(s) for s in streamlines], dtype=torch.int64),
        subjects=torch.zeros(count, dtype=torch.int64),
        streamline_ids=torch.arange(count, dtype=torch.int64),
        subject_names=("s0",),
        inputs=None
        if inputs is None
        else torch.as_tensor(np.concatenate(inputs), dtype=torch.float32),
    )


def straight(rng: np.random.Generator, length: int) -> tuple[np.ndarray, np.ndarray]:
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    start = rng.uniform(5, 15, size=3)
    return start + 0.5 * np.arange(length)[:, None] * direction, direction


def curved(rng: np.random.Generator, length: int) -> np.ndarray:
    """A helix: the direction changes at every point."""
    t = np.linspace(0, 2 * np.pi, length)
    return np.stack([3 * np.cos(t), 3 * np.sin(t), 0.4 * t], axis=1) + rng.uniform(5, 15, 3)


def mixed_batch(seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    lines = [straight(rng, 7)[0], curved(rng, 12), straight(rng, 1)[0], curved(rng, 2),
             curved(rng, 20), straight(rng, 3)[0]]
    inputs = [rng.normal(size=(len(s), N_FEATURES)) for s in lines]
    return make_batch(lines, inputs)


def model(seed: int = 0, **config) -> torch.nn.Module:
    torch.manual_seed(seed)
    return make_model({"n_inputs": N_FEATURES, "hidden_size": 16, **config}).eval()


def reference_loss(net: torch.nn.Module, points: np.ndarray, inputs: np.ndarray) -> list[float]:
    """Per-step losses of one streamline, stepping the GRU cell by cell in plain loops."""
    gru, head = net.gru, net.head
    hidden = [torch.zeros(1, gru.hidden_size) for _ in range(gru.num_layers)]
    previous = np.zeros(3)
    losses = []
    for t in range(len(points) - 1):
        step = points[t + 1] - points[t]
        target = step / np.linalg.norm(step)
        x = torch.as_tensor(np.concatenate([inputs[t], previous]), dtype=torch.float32)[None]
        for layer in range(gru.num_layers):
            cell = torch.nn.GRUCell(x.shape[1], gru.hidden_size)
            sd = {k: getattr(gru, f"{k}_l{layer}") for k in ("weight_ih", "weight_hh",
                                                               "bias_ih", "bias_hh")}
            cell.load_state_dict(sd)
            hidden[layer] = cell(x, hidden[layer])
            x = hidden[layer]
        pred = head(x)[0].detach().numpy().astype(np.float64)
        cosine = pred @ target / (np.linalg.norm(pred) * np.linalg.norm(target))
        losses.append(1.0 - cosine)
        previous = target
    return losses


def test_loss_is_finite_and_n_counts_predicted_points():
    batch = mixed_batch()
    loss, n = loss_fn(model(), batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert n == int((batch.lengths - 1).sum())  # the one-point streamline adds nothing
    assert 0.0 <= loss.item() <= 2.0


def test_loss_matches_an_independent_step_by_step_reference():
    batch = mixed_batch(seed=1)
    net = model(num_layers=2)
    loss, n = loss_fn(net, batch)
    pts, inp = batch.split(batch.points), batch.split(batch.inputs)
    steps = [v for p, i in zip(pts, inp, strict=True)
             for v in reference_loss(net, p.numpy(), i.numpy())]
    assert n == len(steps)
    assert loss.item() == pytest.approx(float(np.mean(steps)), rel=1e-4, abs=1e-5)


def test_batch_loss_is_n_weighted_average_of_single_streamline_losses():
    batch = mixed_batch(seed=2)
    net = model(seed=3)
    loss, n = loss_fn(net, batch)
    total, count = 0.0, 0
    for p, i in zip(batch.split(batch.points), batch.split(batch.inputs), strict=True):
        single_loss, single_n = loss_fn(net, make_batch([p.numpy()], [i.numpy()]))
        total += single_loss.item() * single_n
        count += single_n
    assert n == count
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_gradient_reaches_every_parameter():
    net = model(num_layers=2).train()
    loss, _ = loss_fn(net, mixed_batch())
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_only_single_point_streamlines_give_zero_loss_and_no_crash():
    rng = np.random.default_rng(0)
    batch = make_batch([straight(rng, 1)[0]] * 3, [rng.normal(size=(1, N_FEATURES))] * 3)
    net = model()
    loss, n = loss_fn(net, batch)
    assert n == 0 and loss.item() == 0.0
    loss.backward()  # the trainer always calls backward


def test_missing_inputs_raise_a_clear_error():
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match="inputs"):
        loss_fn(model(), make_batch([straight(rng, 5)[0]], None))


def test_config_keys_shape_the_model():
    def count(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    default = make_model({"n_inputs": 5})
    assert count(default) == count(make_model({"n_inputs": 5, "hidden_size": 64,
                                               "num_layers": 1, "dropout": 0.0}))
    assert count(make_model({"n_inputs": 5, "hidden_size": 8})) < count(default)
    assert count(make_model({"n_inputs": 6})) > count(default)
    deep = make_model({"n_inputs": 5, "num_layers": 2, "dropout": 0.1})
    assert count(deep) > count(default)
    torch.manual_seed(0)
    deep.train()
    loss, _ = loss_fn(deep, make_batch(*_random_lines(5)))
    assert torch.isfinite(loss)


def _random_lines(n_features: int):
    rng = np.random.default_rng(4)
    lines = [curved(rng, 9), straight(rng, 4)[0]]
    return lines, [rng.normal(size=(len(s), n_features)) for s in lines]


def test_training_on_straight_streamlines_learns_the_direction():
    rng = np.random.default_rng(0)
    lines, inputs = [], []
    for _ in range(32):
        points, direction = straight(rng, int(rng.integers(2, 9)))
        lines.append(points)
        # the features encode the direction (plus a constant and noise)
        feats = np.concatenate([np.tile(direction, (len(points), 1)),
                                np.ones((len(points), 1))], axis=1)
        inputs.append(feats + 0.05 * rng.normal(size=feats.shape))
    batch = make_batch(lines, inputs)
    net = model(seed=0).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    first = loss_fn(net, batch)[0].item()
    for _ in range(150):
        optimizer.zero_grad()
        loss, _ = loss_fn(net, batch)
        loss.backward()
        optimizer.step()
    last = loss_fn(net.eval(), batch)[0].item()
    assert math.isfinite(last)
    assert last < 0.1 * first and last < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loss_on_cuda_matches_cpu():
    batch, net = mixed_batch(seed=5), model(seed=5)
    cpu_loss, cpu_n = loss_fn(net, batch)
    cuda_loss, cuda_n = loss_fn(net.cuda(), batch.to("cuda"))
    assert cuda_n == cpu_n
    assert cuda_loss.item() == pytest.approx(cpu_loss.item(), rel=1e-4, abs=1e-6)


def test_baselines_score_the_trivial_predictors_on_the_loss_points():
    """Straight streamlines: repeating the previous direction is exact except at each first
    step (scored 1); one constant direction is exact while they all run the same way and
    useless (1) once half run the other way."""
    from tractrain.examples.next_direction import baselines

    rng = np.random.default_rng(0)
    direction = np.array([0.0, 0.6, 0.8])
    lines = [rng.uniform(5, 15, 3) + 0.5 * np.arange(n)[:, None] * direction
             for n in (5, 9, 12, 7)]
    base = baselines([make_batch(lines, None)])
    steps = sum(len(s) - 1 for s in lines)
    assert base["n"] == steps
    assert base["previous_direction"] == pytest.approx(len(lines) / steps, abs=1e-6)
    assert base["constant_direction"] == pytest.approx(0.0, abs=1e-6)
    both_ways = lines + [s[::-1] + 1.0 for s in lines]
    assert baselines([make_batch(both_ways, None)])["constant_direction"] == pytest.approx(
        1.0, abs=1e-6)
    with pytest.raises(ConfigError, match="baselines"):
        baselines([make_batch([lines[0][:1]], None)])
