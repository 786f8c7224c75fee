"""Distributed data-parallel training: 2 gloo processes on CPU against a single-process
reference over the same global batches; rank-0-only checkpoints; exact distributed resume."""

from __future__ import annotations

import math
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from tractrain.data.batch import Batch
from tractrain.data.packing import SamplerConfig
from tractrain.data.sampler import BatchSampler
from tractrain.data.split_index import SplitIndex
from tractrain.engine import distributed
from tractrain.engine.fit import train_and_validate
from tractrain.errors import CheckpointError, ConfigError
from tractrain.experiment import read_logs
from tractrain.util import unwrap

WORLD = 2
LR = 0.01
CLIP = 0.5
CONFIG = SamplerConfig(batch_size=6, units="streamlines")  # equal batch sizes
SEED = 5


def make_index(split: str, counts=(23, 18), seed=0) -> SplitIndex:
    rng = np.random.default_rng(seed)
    lengths = tuple(rng.integers(4, 12, size=k).astype(np.int64) for k in counts)
    return SplitIndex(split, "g", tuple(f"s{i}" for i in range(len(counts))), lengths,
                      tuple((x * 0.5).astype(np.float32) for x in lengths))


TRAIN, VALID = make_index("train"), make_index("valid", (27,), seed=1)


class Streamlines(Dataset):
    """Deterministic curved streamlines from (subject, id); inputs = sin/cos of the points."""

    def __init__(self, index: SplitIndex) -> None:
        self.index = index

    def __getitem__(self, spec) -> Batch:
        pts, lens = [], []
        for subject, ids in spec.ids:
            sub = self.index.subjects.index(subject)
            for i in ids.tolist():
                n = int(self.index.lengths[sub][i])
                t = np.arange(n, dtype=np.float64)[:, None]
                a = 0.3 * i + sub
                pts.append(np.hstack([np.cos(a) * t, np.sin(a) * t, np.sin(0.7 * t + a)]))
                lens.append(n)
        points = torch.tensor(np.concatenate(pts), dtype=torch.float32)
        k = len(lens)
        return Batch(points=points, lengths=torch.tensor(lens), subjects=torch.zeros(k),
                     streamline_ids=torch.zeros(k), subject_names=(),
                     inputs=torch.cat([torch.sin(points), torch.cos(points)], 1),
                     epoch=spec.epoch, index=spec.index)


def loss_fn(model, batch):
    """Next-direction cosine loss, n = number of predicted points (the user contract)."""
    keep = torch.ones(batch.num_points, dtype=torch.bool)
    keep[batch.offsets[1:] - 1] = False
    idx = torch.nonzero(keep).squeeze(1)
    target = batch.points[idx + 1] - batch.points[idx]
    cos = torch.nn.functional.cosine_similarity(model(batch.inputs[idx]), target, dim=1)
    return (1 - cos).mean(), int(idx.numel())


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def train_run(exp: Path, max_epochs: int, resume=False, crash_at=None, checkpoint_every=None):
    """One rank's complete set-up (as a fresh process builds it), then train."""
    rank, world = idist.get_rank(), idist.get_world_size()
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    sampler = BatchSampler(TRAIN, CONFIG, SEED, rank, world, drop_uneven=True)
    vsampler = BatchSampler(VALID, CONFIG, SEED, rank, world, shuffle=False)
    kw = dict(batch_size=None, collate_fn=lambda b: b, generator=torch.Generator().manual_seed(0))
    steps = [0]

    def user_loss(model, batch):
        if model.training:
            steps[0] += 1
            if steps[0] == crash_at:  # the same step on every rank: no rank waits forever
                raise RuntimeError("simulated crash")
        return loss_fn(model, batch)

    train_and_validate(
        model, optimizer, user_loss, DataLoader(Streamlines(TRAIN), sampler=sampler, **kw),
        valid_loader=DataLoader(Streamlines(VALID), sampler=vsampler, **kw), exp_dir=exp,
        max_epochs=max_epochs, clip_grad_norm=CLIP, progress=False, resume=resume,
        checkpoint_every=checkpoint_every, config={"note": "dist"}, model_config={},
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(local_rank: int, out: str) -> None:
    """Every rank: reductions, then runs A (1 epoch), B (2 epochs), C (crash + resume)."""
    from tractrain.hooks import checkpoint as checkpoint_module

    torch.set_num_threads(1)
    rank, out = idist.get_rank(), Path(out)
    writes: list[str] = []
    original = checkpoint_module.atomic_write_dir

    def counting(path, write):
        writes.append(str(path))
        return original(path, write)

    checkpoint_module.atomic_write_dir = counting
    result = {
        "rank": rank, "world": distributed.get_world_size(), "main": distributed.is_main(),
        "mean": distributed.all_reduce_mean(float(rank + 1), weight=float(rank + 1)),
        "sum": distributed.all_reduce_sum([rank, 1.5]),
        "any": [distributed.any_rank(rank == 1), distributed.any_rank(False)],
        "gathered": distributed.all_gather_objects({"r": rank}),
    }
    result["a"] = train_run(out / "a", 1)
    result["writes_a"] = list(writes)
    result["b"] = train_run(out / "b", 2)
    try:  # epoch 2 holds steps 4-6: crash at step 5, after the mid-epoch checkpoint of step 4
        train_run(out / "c", 2, crash_at=5, checkpoint_every=2)
    except RuntimeError as err:
        result["crash"] = str(err)
    result["c"] = train_run(out / "c", 2, resume=True, checkpoint_every=2)
    torch.save(result, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    # fork: the ranks start in a fraction of a second (spawn re-imports torch in each)
    distributed.run_distributed(_worker, WORLD, "gloo", args=(str(out),), start_method="fork")
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _specs(index, epoch, world, rank, drop_uneven=True, shuffle=True):
    sampler = BatchSampler(index, CONFIG, SEED, rank, world, shuffle=shuffle,
                           drop_uneven=drop_uneven)
    sampler.set_epoch(epoch)
    return list(sampler)


def reference_epoch():
    """Single process, plain torch: step j averages the mean losses of both ranks' j-th batch
    (what DDP's gradient averaging computes); returns weights, train and valid loss."""
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    data = Streamlines(TRAIN)
    shards = [_specs(TRAIN, 0, WORLD, r) for r in range(WORLD)]
    total = count = 0.0
    for pair in zip(*shards, strict=True):
        optimizer.zero_grad()
        losses = [loss_fn(model, data[spec]) for spec in pair]
        loss = sum(mean for mean, _ in losses) / len(losses)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        total += sum(float(m.detach()) * n for m, n in losses)
        count += sum(n for _, n in losses)
    with torch.no_grad():  # every validation batch, unsharded
        vdata = Streamlines(VALID)
        vl = [loss_fn(model, vdata[s]) for s in _specs(VALID, 0, 1, 0, False, False)]
    valid = sum(float(m) * n for m, n in vl) / sum(n for _, n in vl)
    return model.state_dict(), total / count, valid


def test_collectives_reduce_over_ranks(ranks):
    _, results = ranks
    for rank, res in enumerate(results):
        assert res["rank"] == rank and res["world"] == WORLD and res["main"] == (rank == 0)
        assert res["mean"] == pytest.approx((1 * 1 + 2 * 2) / 3)
        assert res["sum"] == [0 + 1, 3.0]
        assert res["any"] == [True, False]
        assert res["gathered"] == [{"r": 0}, {"r": 1}]


def test_shards_are_disjoint_equal_and_cover_the_even_part():
    every = _specs(TRAIN, 0, 1, 0)
    shards = [_specs(TRAIN, 0, WORLD, r) for r in range(WORLD)]
    assert len(every) % WORLD == 1  # the data leave one batch over: it must be dropped
    assert [len(s) for s in shards] == [len(every) // WORLD] * WORLD
    got = sorted(spec.index for shard in shards for spec in shard)
    assert got == list(range(WORLD * (len(every) // WORLD)))
    for shard in shards:
        for spec in shard:
            assert spec == every[spec.index]


def test_two_processes_equal_one_process_over_the_global_batches(ranks):
    out, results = ranks
    weights, train_loss, valid_loss = reference_epoch()
    for res in results:  # DDP keeps the ranks identical
        for name, value in weights.items():
            torch.testing.assert_close(res["a"][name], value, rtol=1e-5, atol=1e-6)
    logs = read_logs(out / "a")
    assert logs["train_loss"] == pytest.approx([train_loss], rel=1e-6)
    assert logs["valid_loss"] == pytest.approx([valid_loss], rel=1e-5)
    start = make_model().state_dict()
    assert not torch.allclose(weights["0.weight"], start["0.weight"])  # it did train


def test_only_rank_zero_writes(ranks):
    out, results = ranks
    assert results[0]["writes_a"] == [str(out / "a" / "checkpoint")]  # once, after epoch 1
    assert results[1]["writes_a"] == []
    assert sorted(p.name for p in (out / "a").iterdir()) == [
        "best_epoch.json", "best_model", "checkpoint", "logs"]
    assert sorted(p.name for p in (out / "a" / "logs").iterdir() if not p.name.startswith("."))


def test_resumed_distributed_run_matches_uninterrupted(ranks):
    out, results = ranks
    for res in results:
        assert res["crash"] == "simulated crash"
        for name, value in res["b"].items():
            assert torch.equal(res["c"][name], value), name
    logs_b, logs_c = read_logs(out / "b"), read_logs(out / "c")
    for name in ("train_loss", "valid_loss", "grad_norm", "lr"):
        np.testing.assert_array_equal(logs_b[name], logs_c[name], err_msg=name)
    assert len(logs_c["train_loss"]) == 2 and all(math.isfinite(x) for x in logs_c["train_loss"])


def test_single_process_helpers_are_identities():
    model = make_model()
    assert distributed.auto_model(model) is model and unwrap(model) is model
    assert distributed.all_reduce_sum([1, 2.5]) == [1.0, 2.5]
    assert distributed.all_reduce_mean(3.0, 2.0) == 3.0
    assert distributed.is_main() and not distributed.is_distributed()
    seen = []
    distributed.run_distributed(lambda r, x: seen.append((r, x)), 1, "gloo", args=("x",))
    assert seen == [(0, "x")]


@pytest.mark.parametrize("kw, match", [({"nproc": 0}, "nproc_per_node"),
                                       ({"nproc": 2, "backend": "mpi"}, "backend")])
def test_run_distributed_refuses_bad_options(kw, match):
    with pytest.raises(ConfigError, match=match):
        distributed.run_distributed(print, **kw)


def test_per_rank_state_refuses_a_single_process_checkpoint():
    state = distributed.PerRank(torch.nn.Linear(1, 1), "rng")
    assert state.state_dict()["world_size"] == 1
    with pytest.raises(CheckpointError, match="rng: .*single-process"):
        state.load_state_dict({"python": 1})


def test_fewer_validation_batches_than_processes_is_one_line_before_anything(tmp_path, capsys):
    """`--max-batches-valid 1` with 2 processes would leave one rank without a validation
    batch (ignite then fails on that rank and the other reports a lost peer): refused at
    start, exit 2, one line, no folder."""
    from tractrain.bin.train import main as train_main

    status = train_main(["--experiments", str(tmp_path / "e"), "--nproc-per-node", "2",
                         "--max-batches-valid", "1", "--progress", "false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert "--max-batches-valid 1 with --nproc-per-node 2" in err[0]
    assert not (tmp_path / "e").exists()


def test_every_rank_refuses_a_validation_split_smaller_than_the_world(phantom_store):
    """Under torchrun the world size is known only in the ranks: each computes the same global
    batch count, so all refuse together instead of one waiting for the other."""
    from tractrain.bin.compose import eval_loader, validation_index
    from tractrain.bin.options import defaults

    config = {**defaults(), "max_batches_valid": 1}
    index = validation_index(phantom_store, "bundles", config)
    for rank in (0, 1):
        with pytest.raises(ConfigError, match="1 batch\\(es\\) for 2 processes"):
            eval_loader(phantom_store, config, index, max_batches=1, rank=rank, world_size=2)
    assert len(eval_loader(phantom_store, config, index, max_batches=1).sampler) == 1
