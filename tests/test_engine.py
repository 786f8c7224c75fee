"""Engine + default hooks: exact resume (epoch and mid-epoch, 0 and 2 workers), crash-safe
checkpoints, refusal of bad checkpoints, NaN policy, signals."""

from __future__ import annotations

import json
import os
import pickle
import signal

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from tractrain import atomic
from tractrain.data.batch import Batch
from tractrain.data.packing import SamplerConfig
from tractrain.data.sampler import BatchSampler
from tractrain.data.split_index import SplitIndex
from tractrain.engine.fit import train_and_validate
from tractrain.engine.trainer import NonFiniteError
from tractrain.errors import CheckpointError
from tractrain.experiment import read_logs


def make_index(split, n=(30, 25), seed=0):
    rng = np.random.default_rng(seed)
    lengths = tuple(rng.integers(4, 20, size=k).astype(np.int64) for k in n)
    return SplitIndex(split=split, group="g", subjects=tuple(f"s{i}" for i in range(len(n))),
                      lengths=lengths, lengths_mm=tuple((x * 0.5).astype(np.float32)
                                                        for x in lengths))


class SyntheticBatches(Dataset):
    """Deterministic streamlines from ids; per-batch random jitter from the spec's rng."""

    def __init__(self, index, jitter=0.05):
        self.index, self.jitter = index, jitter

    def __getitem__(self, spec):
        rng = spec.rng()
        pts, lens, subs, sids = [], [], [], []
        for k, (subject, ids) in enumerate(spec.ids):
            sub = self.index.subjects.index(subject)
            for i in ids:
                n = int(self.index.lengths[sub][i])
                t = np.arange(n, dtype=np.float32)[:, None]
                angle = 0.1 * (i + 1) + sub
                p = np.hstack([np.cos(angle) * t, np.sin(angle) * t, 0.2 * np.sin(t)])
                pts.append(p + rng.normal(0, self.jitter, p.shape))
                lens.append(n)
                subs.append(k)
                sids.append(i)
        points = torch.tensor(np.concatenate(pts), dtype=torch.float32)
        inputs = torch.cat([torch.sin(points), torch.cos(points)], 1)
        return Batch(points=points, lengths=torch.tensor(lens), subjects=torch.tensor(subs),
                     streamline_ids=torch.tensor(sids),
                     subject_names=tuple(s for s, _ in spec.ids), inputs=inputs,
                     epoch=spec.epoch, index=spec.index)


def loss_fn(model, batch):
    """Predict the direction to the next point; cosine loss (the user contract)."""
    offsets = batch.offsets
    last = offsets[1:] - 1
    keep = torch.ones(batch.num_points, dtype=torch.bool)
    keep[last] = False
    idx = torch.nonzero(keep).squeeze(1)
    target = batch.points[idx + 1] - batch.points[idx]
    pred = model(batch.inputs[idx])
    cos = torch.nn.functional.cosine_similarity(pred, target, dim=1)
    return (1 - cos).mean(), int(idx.numel())


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Dropout(0.1),
                               torch.nn.Linear(16, 3))


def make_loaders(workers=0):
    """Training and validation DataLoaders over fresh samplers (as a new process builds them)."""
    train_index, valid_index = make_index("train"), make_index("valid", (12,), seed=1)
    sampler = BatchSampler(train_index, SamplerConfig(batch_size=60, units="points"), seed=7)
    vsampler = BatchSampler(valid_index, SamplerConfig(batch_size=60, units="points"), seed=7,
                            shuffle=False)
    kw = dict(batch_size=None, collate_fn=lambda b: b, num_workers=workers,
              generator=torch.Generator().manual_seed(0))
    return (DataLoader(SyntheticBatches(train_index), sampler=sampler, **kw),
            DataLoader(SyntheticBatches(valid_index, jitter=0.0), sampler=vsampler, **kw))


def run(exp, max_epochs, resume=False, workers=0, checkpoint_every=None, crash_at=None,
        patience=None, lr="0.01*2 0.005"):
    """A complete fresh set-up (as a new process would build it), then train."""
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    train, valid = make_loaders(workers)
    user_loss = loss_fn
    if crash_at is not None:
        def user_loss(model, batch, _calls=[0]):  # noqa: B006 - counts calls in this run
            _calls[0] += 1
            if _calls[0] == crash_at:
                raise RuntimeError("simulated crash")
            return loss_fn(model, batch)
    trainer = train_and_validate(
        model, optimizer, user_loss, train, valid_loader=valid, exp_dir=exp,
        max_epochs=max_epochs, lr_schedule=lr, clip_grad_norm=1.0, patience=patience,
        progress=False, resume=resume, checkpoint_every=checkpoint_every,
        config={"note": "test"}, model_config={"kind": "mlp"}, handle_signals=False,
    )
    return model, optimizer, trainer


def assert_same_run(a, b, exp_a, exp_b):
    (model_a, opt_a, _), (model_b, opt_b, _) = a, b
    for (ka, va), (kb, vb) in zip(model_a.state_dict().items(), model_b.state_dict().items(),
                                  strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    for k in sa:
        for name in sa[k]:
            assert torch.equal(torch.as_tensor(sa[k][name]), torch.as_tensor(sb[k][name]))
    logs_a, logs_b = read_logs(exp_a), read_logs(exp_b)
    for name in ("train_loss", "valid_loss", "grad_norm", "unclipped_grad_norm", "lr"):
        np.testing.assert_array_equal(logs_a[name], logs_b[name], err_msg=name)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    exp = tmp_path_factory.mktemp("straight") / "exp"
    return run(exp, 6), exp


def test_resume_at_epoch_boundary_is_exact(straight, tmp_path):
    exp = tmp_path / "exp"
    run(exp, 3)
    resumed = run(exp, 6, resume=True)
    assert len(read_logs(exp)["train_loss"]) == 6
    assert_same_run(straight[0], resumed, straight[1], exp)


def test_resume_mid_epoch_after_crash_is_exact(straight, tmp_path):
    exp = tmp_path / "exp"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(exp, 6, checkpoint_every=2, crash_at=25)  # dies in the middle of an epoch
    resumed = run(exp, 6, resume=True, checkpoint_every=2)
    assert_same_run(straight[0], resumed, straight[1], exp)


def test_resume_with_two_workers_is_exact(straight, tmp_path):
    exp = tmp_path / "exp"
    run(exp, 3, workers=2)
    resumed = run(exp, 6, resume=True, workers=2)
    assert_same_run(straight[0], resumed, straight[1], exp)


def test_finished_run_refuses_to_continue_unless_extended(tmp_path):
    exp = tmp_path / "exp"
    run(exp, 2)
    with pytest.raises(CheckpointError, match="already trained 2 epochs"):
        run(exp, 2, resume=True)
    run(exp, 3, resume=True)
    assert len(read_logs(exp)["train_loss"]) == 3


def test_a_run_stopped_inside_an_epoch_refuses_a_limit_it_passed(tmp_path):
    """A checkpoint inside epoch N+1 with max_epochs N: one clear error, nothing changed."""
    exp = tmp_path / "exp"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(exp, 6, checkpoint_every=2, crash_at=25)
    position = json.loads((exp / "checkpoint" / "meta.json").read_text())["position"]
    done, start = position["epoch"], position["start"]
    assert done >= 1 and start > 0  # inside epoch done + 1
    before = (exp / "checkpoint" / "state.pt").read_bytes()
    with pytest.raises(CheckpointError, match=rf"already trained {done} epochs and {start} "
                       rf"batches of epoch {done + 1} \(max_epochs {done}\); raise max_epochs "
                       rf"above {done} to continue"):
        run(exp, done, resume=True)
    assert (exp / "checkpoint" / "state.pt").read_bytes() == before


def test_crash_between_write_and_rename_then_resume(straight, tmp_path, monkeypatch):
    exp = tmp_path / "exp"
    run(exp, 3)
    real, calls = os.replace, []

    def replace_then_die(src, dst):
        calls.append(dst)
        real(src, dst)
        if str(dst).endswith("checkpoint.old"):  # old moved aside, new not yet in place
            raise OSError("power cut")

    monkeypatch.setattr(atomic.os, "replace", replace_then_die)
    with pytest.raises(OSError, match="power cut"):
        run(exp, 4, resume=True)
    monkeypatch.setattr(atomic.os, "replace", real)
    assert not (exp / "checkpoint").exists()  # the swap was cut in the middle
    resumed = run(exp, 6, resume=True)  # repaired: the complete epoch-4 checkpoint is used
    assert_same_run(straight[0], resumed, straight[1], exp)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_refuses_non_checkpoints_malicious_pickles_and_mismatched_models(tmp_path):
    with pytest.raises(CheckpointError, match="not a tractrain checkpoint"):
        run(tmp_path / "nothing", 2, resume=True)
    exp = tmp_path / "exp"
    run(exp, 1)
    before = (exp / "checkpoint" / "state.pt").read_bytes()

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (exp / "checkpoint" / "state.pt").write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(CheckpointError, match="refused"):
        run(exp, 2, resume=True)
    assert not (tmp_path / "pwned").exists()
    (exp / "checkpoint" / "state.pt").write_bytes(before)

    meta = (exp / "checkpoint" / "meta.json")
    meta.write_text(meta.read_text().replace('"version": 1', '"version": 99'))
    with pytest.raises(CheckpointError, match="version 99 is not supported"):
        run(exp, 2, resume=True)
    meta.write_text(meta.read_text().replace('"version": 99', '"version": 1'))

    global make_model
    original = make_model
    make_model = lambda: torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),  # noqa: E731
                                             torch.nn.Dropout(0.1), torch.nn.Linear(8, 3))
    try:
        with pytest.raises(CheckpointError, match="model parameters don't match"):
            run(exp, 2, resume=True)
    finally:
        make_model = original
    assert (exp / "checkpoint" / "state.pt").read_bytes() == before  # nothing overwritten


def test_patience_stops_and_refuses_resume_unless_raised(tmp_path):
    exp = tmp_path / "exp"
    _, _, trainer = run(exp, 30, patience=1, lr=1e-9)  # lr ~ 0: no improvement after epoch 1
    stopped = trainer.state.epoch
    assert stopped < 30
    with pytest.raises(CheckpointError, match="patience exhausted"):
        run(exp, 30, resume=True, patience=1, lr=1e-9)
    _, _, trainer = run(exp, 30, resume=True, patience=2, lr=1e-9)
    assert trainer.state.epoch == stopped + 1


def test_nan_loss_stops_with_epoch_and_iteration_and_keeps_checkpoint(tmp_path):
    exp = tmp_path / "exp"
    run(exp, 1)
    before = (exp / "checkpoint" / "state.pt").read_bytes()

    def nan_loss(model, batch):
        loss, n = loss_fn(model, batch)
        return loss * float("nan"), n

    model = make_model()
    from tractrain.engine.trainer import create_trainer

    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nan_loss)
    sampler = BatchSampler(make_index("train"), SamplerConfig(batch_size=60, units="points"), 7)
    loader = DataLoader(SyntheticBatches(make_index("train")), sampler=sampler, batch_size=None,
                        collate_fn=lambda b: b)
    with pytest.raises(NonFiniteError, match="epoch 1, iteration 1"):
        trainer.run(loader, max_epochs=1)
    assert (exp / "checkpoint" / "state.pt").read_bytes() == before
    skipping = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nan_loss,
                              nan_policy="skip")
    sampler.set_epoch(0)
    skipping.run(loader, max_epochs=1)
    assert skipping.state.metrics["skipped_batches"] == len(sampler.batches(0))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  make_model().state_dict().values(),
                                                  strict=True))  # no update was applied


@pytest.mark.parametrize("at", ["batch 9", "epoch 1's last batch", "epoch 1's validation"])
def test_sigterm_checkpoints_mid_epoch_and_resume_is_exact(straight, tmp_path, at):
    """SIGTERM during a batch: that batch finishes, a checkpoint is saved, the run stops; the
    resumed run equals an uninterrupted one. After an epoch's last batch, the checkpoint holds
    no batch of that epoch (its end, with validation and logs, had not run): the resumed run
    ends that epoch at once. During validation: the run stops at the epoch's end, with the
    epoch's own checkpoint (no training batch of the next epoch)."""
    length = make_loaders()[0].sampler.epoch_length(0)
    stop_at = {"batch 9": 9, "epoch 1's last batch": length}.get(at)
    exp = tmp_path / "exp"
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)

    def loss_then_signal(model, batch, _calls=[0], _sent=[]):  # noqa: B006
        _calls[0] += model.training
        due = _calls[0] == stop_at if stop_at else not model.training  # a batch, or validation
        if due and not _sent:
            _sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return loss_fn(model, batch)

    train, valid = make_loaders()
    trainer = train_and_validate(model, optimizer, loss_then_signal, train, valid_loader=valid,
                                 exp_dir=exp, max_epochs=6, lr_schedule="0.01*2 0.005",
                                 clip_grad_norm=1.0, progress=False, config={"note": "test"},
                                 model_config={"kind": "mlp"})
    stopped = (0, stop_at) if stop_at else (1, 0)  # (epochs done, batches of the next)
    assert trainer.state.stopped_by_signal == "SIGTERM"
    assert trainer.state.iteration == (stop_at or length)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handler removed afterwards
    position = json.loads((exp / "checkpoint" / "meta.json").read_text())["position"]
    assert (position["epoch"], position["start"]) == stopped
    # crash_at: an epoch that never ends fails the test instead of running forever
    resumed = run(exp, 6, resume=True, crash_at=50 * length)
    assert_same_run(straight[0], resumed, straight[1], exp)


def test_sigterm_in_the_last_epochs_validation_lets_the_run_finish(tmp_path):
    """The last epoch's end is the run's end: a signal there changes nothing (exit 0 for a
    scheduler, no checkpoint to resume that would only say 'already trained')."""
    model = make_model()

    def loss_then_signal(model, batch, _sent=[False]):  # noqa: B006
        if not model.training and not _sent[0]:
            _sent[0] = True
            os.kill(os.getpid(), signal.SIGTERM)
        return loss_fn(model, batch)

    train, valid = make_loaders()
    trainer = train_and_validate(model, torch.optim.Adam(model.parameters(), lr=0.01),
                                 loss_then_signal, train, valid_loader=valid,
                                 exp_dir=tmp_path / "exp", max_epochs=1, progress=False)
    assert getattr(trainer.state, "stopped_by_signal", None) is None
    assert len(read_logs(tmp_path / "exp")["valid_loss"]) == 1


def test_deferred_checks_train_identically_and_still_stop_on_nan(straight, tmp_path):
    """check_every > 1 (the GPU default) keeps values on the device between checks."""
    exp = tmp_path / "exp"
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    train, valid = make_loaders()
    train_and_validate(model, optimizer, loss_fn, train, valid_loader=valid, exp_dir=exp,
                       max_epochs=6, lr_schedule="0.01*2 0.005", clip_grad_norm=1.0,
                       progress=False, config={"note": "test"}, model_config={"kind": "mlp"},
                       handle_signals=False, check_every=4)
    for a, b in zip(straight[0][0].state_dict().values(), model.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    np.testing.assert_allclose(read_logs(exp)["train_loss"], read_logs(straight[1])["train_loss"],
                               rtol=1e-6)
    before = (exp / "checkpoint" / "state.pt").read_bytes()

    def nan_at_third(model, batch, _calls=[0]):  # noqa: B006
        _calls[0] += 1
        loss, n = loss_fn(model, batch)
        return (loss * float("nan") if _calls[0] == 3 else loss), n

    from tractrain.engine.trainer import TrainerEngine, TrainStep
    from tractrain.hooks.checkpoint import Checkpoint

    step = TrainStep(model, optimizer, nan_at_third, check_every=4)
    trainer = TrainerEngine(step)
    # attached before the step's own checks: the save itself must check first
    Checkpoint(exp, {"model": model}, every_iterations=4,
               before_save=step.check_finite).attach(trainer)
    step.attach(trainer)
    train.sampler.set_epoch(0)
    with pytest.raises(NonFiniteError, match="at iteration 3 .*checked every 4"):
        trainer.run(train, max_epochs=1)
    assert trainer.state.iteration == 4  # found at the first check after the bad batch ...
    assert (exp / "checkpoint" / "state.pt").read_bytes() == before  # ... before any save


def test_checkpoint_of_release_0_1_0_still_resumes_exactly(tmp_path):
    """A mid-epoch checkpoint written by tractrain 0.1.0 (tests/data/checkpoint-0.1.0, made by
    this file's ``run(exp, 4, checkpoint_every=2, crash_at=25)``) resumes to the same weights
    and logs as an uninterrupted run of the current code."""
    import shutil
    from pathlib import Path

    fixture = Path(__file__).parent / "data" / "checkpoint-0.1.0" / "checkpoint"
    exp = tmp_path / "old"
    shutil.copytree(fixture, exp / "checkpoint")
    resumed = run(exp, 4, resume=True, checkpoint_every=2)
    straight = run(tmp_path / "straight", 4)
    assert_same_run(straight, resumed, tmp_path / "straight", exp)


class EpochCounter:
    """A producer with state: counts the epochs it saw into ``epochs_counted``."""

    def __init__(self) -> None:
        self.count = 0

    def attach(self, trainer):
        from ignite.engine import Events

        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._count)
        return self

    def _count(self, trainer) -> None:
        self.count += 1
        trainer.state.metrics["epochs_counted"] = float(self.count)

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])


def test_producers_are_checkpointed_by_name_and_old_producer_keys_still_resume(tmp_path):
    from tractrain.hooks.checkpoint import load_checkpoint

    exp = tmp_path / "exp"

    def train(max_epochs: int, resume: bool) -> EpochCounter:
        model, counter = make_model(), EpochCounter()
        train_loader, valid = make_loaders()
        train_and_validate(model, torch.optim.Adam(model.parameters(), lr=0.01), loss_fn,
                           train_loader, valid_loader=valid, exp_dir=exp,
                           max_epochs=max_epochs, producers=(counter,), progress=False,
                           handle_signals=False, resume=resume)
        return counter

    train(2, resume=False)
    _, states = load_checkpoint(exp)
    assert states["epoch_counter"] == {"count": 2}
    states["producer_0"] = states.pop("epoch_counter")  # the key tractrain 0.1 wrote
    torch.save(states, exp / "checkpoint" / "state.pt")
    assert train(3, resume=True).count == 3  # restored from producer_0, then one more epoch


@pytest.mark.parametrize("max_norm", [0.5, 1.0, 3.0])
def test_clipped_norm_on_host_equals_the_tensor_arithmetic(max_norm):
    """The clipped gradient norm logged from a host float (every-iteration checks) is the same
    number as the one computed on the device (deferred checks), clipped or not."""
    from tractrain.engine.trainer import clipped_norm

    rng = np.random.default_rng(0)
    for value in [*rng.uniform(0, 5, size=200), 0.0, 1e-7, 123.456, max_norm]:
        norm = torch.tensor(value, dtype=torch.float32)
        assert clipped_norm(float(norm), max_norm) == float(clipped_norm(norm, max_norm))
