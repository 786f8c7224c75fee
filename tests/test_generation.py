"""Generation validation (hooks/generation.py) and tractrain-track (bin/track.py) on the phantom."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine

from tractrain.data.augment import AugmentConfig
from tractrain.data.batch import load_batch
from tractrain.data.interpolation import InputConfig
from tractrain.data.packing import SamplerConfig, epoch_batches
from tractrain.data.split_index import split_index
from tractrain.examples.next_direction import loss_fn, make_model
from tractrain.experiment import read_logs
from tractrain.generation.scores import endpoint_scores
from tractrain.generation.tracker import Tracks
from tractrain.hooks.best_model import BestModel
from tractrain.hooks.generation import METRICS, GenerationValidation
from tractrain.hooks.logs import NpyLogs

INPUTS = InputConfig("dwi")


pytestmark = pytest.mark.usefixtures("one_thread")


def demo_model(store, hidden: int = 16, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return make_model({"n_inputs": store.volume_groups["dwi"]["n_features"],
                       "hidden_size": hidden})


def test_endpoint_scores_match_a_numpy_reference():
    rng = np.random.default_rng(0)
    lines = [rng.normal(size=(n, 3)).astype(np.float32) for n in (3, 1, 5)]
    tracks = Tracks(torch.as_tensor(np.concatenate(lines)), torch.tensor([3, 1, 5]),
                    torch.zeros(3, dtype=torch.int64))
    refs = rng.normal(size=(3, 3))
    affine = np.diag([2.0, 1.5, 3.0, 1.0])
    affine[:3, 3] = [10, -4, 7]
    scores = endpoint_scores(tracks, torch.as_tensor(refs), affine, within_mm=4.0)
    mm = [nib.affines.apply_affine(affine, s) for s in lines]
    dist = np.array([np.linalg.norm(m[-1] - nib.affines.apply_affine(affine, r))
                     for m, r in zip(mm, refs, strict=True)])
    length = np.array([np.linalg.norm(np.diff(m, axis=0), axis=1).sum() for m in mm])
    np.testing.assert_allclose(scores["dist"], dist, rtol=1e-6)
    np.testing.assert_allclose(scores["length"], length, rtol=1e-6)
    np.testing.assert_array_equal(scores["within"], dist <= 4.0)


def test_hook_writes_logged_metrics_that_best_model_can_monitor(phantom_store, tmp_path):
    store = phantom_store
    model = demo_model(store)
    hook = GenerationValidation(model, store, "bundles", INPUTS, every=2, n_streamlines=8,
                                seed_points=3, step_mm=1.0, within_mm=8.0, seed=1)

    def train_step(engine, _):  # changes the model between epochs, as training would
        with torch.no_grad():
            model.head.bias.add_(torch.tensor([0.3, -0.2, 0.1]) * engine.state.epoch)

    trainer = Engine(train_step)
    hook.attach(trainer)
    best = BestModel(tmp_path, model, {"factory": "x"}, metric="gen_endpoint_dist")
    best.attach(trainer)
    NpyLogs(tmp_path).attach(trainer)
    model.train()
    trainer.run([0], max_epochs=4)

    assert model.training  # the hook restores the mode it found
    logs = read_logs(tmp_path)
    for name in METRICS:
        assert np.isnan(logs[name][[0, 2]]).all()
        assert np.isfinite(logs[name][[1, 3]]).all()
    assert 0.0 <= logs["gen_within"][1] <= 1.0 and logs["gen_length"][1] > 0
    dist = logs["gen_endpoint_dist"]
    record = json.loads((tmp_path / "best_epoch.json").read_text())
    assert record["metric"] == "gen_endpoint_dist"
    assert record["epoch"] == 2 * (1 + int(np.argmin(dist[[1, 3]])))
    assert record["value"] == pytest.approx(np.nanmin(dist))
    header = (tmp_path / "logs" / "logs.csv").read_text().splitlines()[0].split(",")
    assert set(METRICS) <= set(header)

    # the fixed selection: valid subjects only, saved and restored through JSON
    state = json.loads(json.dumps(hook.state_dict()))
    assert {s for s, _ in state["selection"]} <= set(store.splits["valid"])
    assert sum(len(ids) for _, ids in state["selection"]) == 8
    assert state["last"]["epoch"] == 4
    other = GenerationValidation(model, store, "bundles", INPUTS, n_streamlines=8,
                                 seed_points=3, step_mm=1.0, within_mm=8.0, seed=99)
    other.load_state_dict(state)
    assert [(s, ids.tolist()) for s, ids in other.select()] == [
        (s, ids) for s, ids in state["selection"]]
    assert other.evaluate() == pytest.approx(hook.evaluate())  # same seeds, same scores


def train_briefly(store, model, steps: int) -> None:
    """``steps`` Adam steps of the demo loss on the train split (batches of 32 streamlines)."""
    index = split_index(store, "train", "bundles")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    augment = AugmentConfig(step_size=1.0)
    done, epoch = 0, 0
    model.train()
    while done < steps:
        for ids in epoch_batches(index, SamplerConfig(batch_size=32, units="streamlines"),
                                 seed=0, epoch=epoch):
            batch = load_batch(store, ids, group="bundles", augment=augment,
                               rng=np.random.default_rng(done), inputs=INPUTS)
            loss, _ = loss_fn(model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                return
        epoch += 1


def test_trained_demo_model_reaches_the_reference_ends_better(phantom_store):
    store = phantom_store
    model = demo_model(store, hidden=32)
    hook = GenerationValidation(model, store, "bundles", INPUTS, n_streamlines=30,
                                seed_points=3, step_mm=1.0, within_mm=5.0, seed=0)
    before = hook.evaluate()
    train_briefly(store, model, steps=300)
    after = hook.evaluate()
    print(f"\ngeneration validation on the phantom (30 valid streamlines, 3 seed points, "
          f"1 mm steps): untrained {before}, trained {after}")
    assert after["gen_endpoint_dist"] < 0.6 * before["gen_endpoint_dist"]
    assert after["gen_within"] >= before["gen_within"] + 0.15


@pytest.fixture(scope="module")
def experiment(phantom_store, tmp_path_factory) -> Path:
    """A one-epoch demo experiment trained with tractrain-train (in-process: faster)."""
    from tractrain.bin.train import main as train_main

    root = tmp_path_factory.mktemp("experiments")
    status = train_main(["--store", phantom_store.path, "--experiments", str(root),
                         "--name", "gen", "--max-epochs", "1", "--max-batches-train", "4",
                         "--max-batches-valid", "1", "--progress", "false", "--device", "cpu",
                         "--model-config", '{"hidden_size": 16}'])
    assert status == 0
    return root / "gen"


def check_inside(points_mm: np.ndarray, affine: np.ndarray, shape) -> None:
    vox = nib.affines.apply_affine(np.linalg.inv(affine), points_mm)
    assert (vox >= -0.5).all() and (vox <= np.asarray(shape) - 0.5).all()


def test_track_command_writes_a_trk_in_the_subject_space(experiment, phantom_store, tmp_path):
    store = phantom_store
    subject = store.splits["valid"][0]
    out = tmp_path / "tracks.trk"
    result = subprocess.run(
        [sys.executable, "-m", "tractrain.bin.track", str(experiment), "--subject", subject,
         "--seeds", "30", "--both-directions", "--max-angle", "80", "--device", "cpu",
         "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "30 streamlines" in result.stdout

    trk = nib.streamlines.load(str(out))
    info = store.volume_info(subject, "dwi")
    header = trk.header
    np.testing.assert_allclose(header["voxel_to_rasmm"], info["affine"], atol=1e-5)
    assert tuple(header["dimensions"]) == info["shape"][:3]
    np.testing.assert_allclose(header["voxel_sizes"], info["voxel_sizes"])
    assert header["voxel_order"] in ("RAS", b"RAS")
    assert len(trk.streamlines) == 30
    points = np.concatenate(list(trk.streamlines))
    check_inside(points, info["affine"], info["shape"][:3])
    mask = np.any(store.volume(subject, "dwi") != 0, axis=-1)  # the default tracking mask
    ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(info["affine"]), points)).astype(int)
    assert mask[tuple(ijk.T)].all()


def test_track_command_from_checkpoint_and_streamline_seeds(experiment, phantom_store,
                                                            tmp_path, capsys):
    from tractrain.bin.track import main as track_main

    store = phantom_store
    subject = store.splits["valid"][0]
    out = tmp_path / "from_checkpoint.tck"
    status = track_main([str(experiment), "--subject", subject, "--seeds", "12",
                         "--seeds-from", "valid-streamlines", "--seed-points", "3",
                         "--checkpoint", "--device", "cpu", "--out", str(out)])
    assert status == 0
    tck = nib.streamlines.load(str(out))
    assert len(tck.streamlines) == 12
    assert all(len(s) >= 3 for s in tck.streamlines)
    info = store.volume_info(subject, "dwi")
    check_inside(np.concatenate(list(tck.streamlines)), info["affine"], info["shape"][:3])
    # the seed prefixes are the first points of the subject's streamlines (in RAS+ mm)
    firsts = np.array([s[0] for s in tck.streamlines])
    points, lengths = store.gather(subject, "bundles", np.arange(len(store.streamline_index(
        subject, "bundles"))))
    starts = nib.affines.apply_affine(info["affine"], points[np.cumsum(lengths) - lengths])
    nearest = np.linalg.norm(firsts[:, None] - starts[None], axis=2).min(axis=1)
    assert nearest.max() < 1e-3

    capsys.readouterr()
    assert track_main([str(experiment), "--subject", "nobody", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--subject 'nobody'" in err and len(err.splitlines()) == 1
    assert track_main([str(experiment), "--subject", subject, "--out", "x.nii"]) == 2
    assert "--out" in capsys.readouterr().err
    before = out.read_bytes()  # a step of 0 mm is refused, not read as "the default step"
    assert track_main([str(experiment), "--subject", subject, "--step-mm", "0", "--device",
                       "cpu", "--out", str(out)]) == 2
    assert "step_mm: expected a finite number > 0, got 0.0" in capsys.readouterr().err
    assert out.read_bytes() == before
