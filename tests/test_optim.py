"""Optimizer factory, lr schedule parsing and the per-epoch lr hook."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ignite.engine import Engine, Events

from tractrain.engine.optim import (
    EpochLR,
    current_lr,
    lr_for_epoch,
    make_optimizer,
    parse_lr_schedule,
)
from tractrain.errors import ConfigError

KINDS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "radam": torch.optim.RAdam,
}


@pytest.mark.parametrize("name", ["adam", "AdamW", "SGD", "radam"])
def test_each_optimizer_builds_and_reduces_a_quadratic(name):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5) + 3.0)
    opt = make_optimizer([w], name, lr=0.05, weight_decay=0.0)
    assert type(opt) is KINDS[name.lower()]
    start = float((w.detach() ** 2).sum())
    for _ in range(20):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
    assert float((w.detach() ** 2).sum()) < start
    assert current_lr(opt) == pytest.approx(0.05)


@pytest.mark.parametrize("name", sorted(KINDS))
def test_weight_decay_and_lr_land_in_every_param_group(name):
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    opt = make_optimizer([{"params": [a]}, {"params": [b]}], name, lr=0.02, weight_decay=0.01)
    for group in opt.param_groups:
        assert group["weight_decay"] == 0.01
        assert group["lr"] == 0.02


def test_sgd_uses_momentum():
    opt = make_optimizer([torch.nn.Parameter(torch.ones(2))], "sgd", momentum=0.5)
    assert opt.param_groups[0]["momentum"] == 0.5


def test_unknown_optimizer_lists_choices_and_closest():
    with pytest.raises(ConfigError) as err:
        make_optimizer([torch.nn.Parameter(torch.ones(1))], "adamm")
    message = str(err.value)
    assert "\n" not in message
    for choice in KINDS:
        assert choice in message
    assert "did you mean 'adam" in message


@pytest.mark.parametrize(
    "kwargs", [{"lr": 0.0}, {"lr": -1e-3}, {"weight_decay": -0.1}, {"name": "sgd", "momentum": 1.5}]
)
def test_bad_optimizer_numbers_raise(kwargs):
    with pytest.raises(ConfigError):
        make_optimizer([torch.nn.Parameter(torch.ones(1))], **kwargs)


@pytest.mark.parametrize(
    "spec",
    [
        "0.001*3 0.0001",
        "0.001*3,0.0001",
        " 1e-3*3 ,  1e-4 ",
        ["0.001*3", "0.0001"],
        [0.001, 0.001, 0.001, 0.0001],  # dwi_ml's per-epoch list
        [[0.001, 3], [0.0001, None]],  # a parsed schedule after a JSON round trip
    ],
)
def test_parse_equivalent_spellings(spec):
    assert parse_lr_schedule(spec) == [(0.001, 3), (0.0001, None)]


def test_float_is_constant_and_last_entry_holds_forever():
    assert parse_lr_schedule(0.01) == [(0.01, None)]
    assert [lr_for_epoch(0.01, e) for e in (1, 7, 1000)] == [0.01] * 3
    # a count on the last item does not end the schedule
    assert [lr_for_epoch("0.1*2 0.01*2", e) for e in range(1, 7)] == [0.1, 0.1] + [0.01] * 4


def test_lr_for_epoch_across_boundaries():
    spec = "0.01*2 0.001*3 0.0001"
    expected = [0.01] * 2 + [0.001] * 3 + [0.0001] * 5
    assert [lr_for_epoch(spec, e) for e in range(1, 11)] == expected
    assert [lr_for_epoch(parse_lr_schedule(spec), e) for e in range(1, 11)] == expected


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(1e-6, 1.0), st.integers(1, 4)), min_size=1, max_size=5
    ),
    st.floats(1e-6, 1.0),
)
def test_schedule_matches_expanded_per_epoch_list(items, last):
    spec = " ".join(f"{lr!r}*{count}" for lr, count in items) + f" {last!r}"
    expanded = [lr for lr, count in items for _ in range(count)]
    expanded += [last] * 3
    assert [lr_for_epoch(spec, e) for e in range(1, len(expanded) + 1)] == expanded


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "0.001 0.0001",  # non-final item without a count
        "-0.001",
        "0*3 0.1",
        "0.001*0 0.1",
        "0.001*-2 0.1",
        "0.001*1.5 0.1",
        "fast*3 0.1",
        "0.001**3",
        "nan",
        [],
        [[0.001, None], [0.0001, None]],
        [True],
        {"lr": 0.001},
    ],
)
def test_malformed_schedules_raise_config_error(spec):
    with pytest.raises(ConfigError) as err:
        parse_lr_schedule(spec)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("epoch", [0, -1, 1.5])
def test_lr_for_epoch_is_one_based(epoch):
    with pytest.raises(ConfigError):
        lr_for_epoch("0.1", epoch)


def _run(hook: EpochLR, optimizer, max_epochs: int, resume_from: dict | None = None):
    """Run a tiny engine; return {epoch: [lr seen at each ITERATION_COMPLETED]}."""
    seen: dict[int, list[float]] = {}
    engine = Engine(lambda e, b: None)
    hook.attach(engine)

    @engine.on(Events.ITERATION_COMPLETED)
    def record(e):
        seen.setdefault(e.state.epoch, []).extend(g["lr"] for g in optimizer.param_groups)

    if resume_from is not None:
        engine.load_state_dict(resume_from)
    engine.run(range(2), max_epochs=max_epochs)
    return seen


def _two_group_optimizer(lr: float = 0.5):
    a, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    return make_optimizer([{"params": [a]}, {"params": [b]}], "sgd", lr=lr)


def test_epoch_lr_sets_every_group_each_epoch():
    spec = "0.01*2 0.001*1 0.0001"
    opt = _two_group_optimizer()
    seen = _run(EpochLR(spec, opt), opt, max_epochs=5)
    assert sorted(seen) == [1, 2, 3, 4, 5]
    for epoch, lrs in seen.items():
        assert lrs == [lr_for_epoch(spec, epoch)] * 4  # 2 iterations x 2 groups


def test_epoch_lr_resumes_exactly_from_state_dict():
    spec = "0.01*2 0.001*1 0.0001"
    opt = _two_group_optimizer()
    full = _run(EpochLR(spec, opt), opt, max_epochs=5)

    state = json.loads(json.dumps(EpochLR(spec, _two_group_optimizer()).state_dict()))
    resumed_opt = _two_group_optimizer(lr=0.7)
    hook = EpochLR(0.3, resumed_opt)  # wrong schedule until the checkpoint is loaded
    hook.load_state_dict(state)
    resumed = _run(
        hook, resumed_opt, 5, resume_from={"iteration": 4, "epoch_length": 2, "max_epochs": 5}
    )
    assert sorted(resumed) == [3, 4, 5]
    assert {e: full[e] for e in (3, 4, 5)} == resumed


def test_epoch_lr_bad_state_raises():
    hook = EpochLR(0.1, _two_group_optimizer())
    with pytest.raises(ConfigError):
        hook.load_state_dict({"lr": 0.1})
    with pytest.raises(ConfigError):
        hook.load_state_dict({"schedule": [[0.1, 0]]})
