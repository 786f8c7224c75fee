"""Per-iteration overhead of the tractrain engine against a hand-written PyTorch loop.

The contenders train the same model on the same prebuilt in-memory batches, fed by the same
kind of ``DataLoader`` over a real `BatchSampler` (so all pay the same, small, data cost):

* **hand loop**: what a user writes: per batch ``train()``, ``zero_grad``, loss, backward,
  total gradient norm (``get_total_norm``) and clipping with it (``clip_grads_with_norm_``, as
  the trainer does: one norm computation), ``step``, n-weighted epoch loss and mean gradient
  norm; per epoch the lr.
* **hand + epoch writes**: the same loop, plus at each epoch's end the files tractrain's
  BestModel (fsynced folder swap) and NpyLogs (8 ``.npy`` + ``logs.csv``) write, through
  those hooks' own ``step``/``write``: the floor that saving them every epoch sets for any
  engine, a fixed cost per epoch that is large against the 40 ms epochs of the tiny model.
* **tractrain**: ``create_trainer`` + ``SamplerEpochs`` + the default hooks of
  ``train_and_validate`` except those that need a checkpoint or a network: EpochLR, Timing,
  GradNorm, BestModel, Patience, NpyLogs (to a temporary experiment folder) and a disabled
  Progress. Excluded: Checkpoint, GracefulStop (it needs a checkpoint), Comet (offline Comet
  costs ~1 s per run end) and Validation (left out of every contender).

Two models: the demo GRU (``examples/next_direction.py``; realistic compute per iteration) and
a single ``Linear`` layer, where the framework's per-iteration cost is most visible. The
contenders alternate (7 repeats for the GRU; 31 for the Linear model, whose 0.1 s runs are
shorter than this kind of VM's noise bursts), each repeat seeds torch identically, and the
medians are compared; the final weights of every contender must agree, which shows they
computed the same thing.

Printed: a Markdown table (median wall and process-CPU s/iter and their overheads over the
hand loop; the verdict judges tractrain: the demo GRU's wall time against 5 % and the Linear
model's CPU time, steadier on a busy machine, against 10 %), per model the spread of the
per-repeat overheads (for CPU time with a 95 % bootstrap interval of their median: when it
straddles the target, this machine's noise decides the verdict), tractrain's own epoch-end
write time and its overhead over the "hand + epoch writes" floor, then one ``weights equal:``
line per model. Exit status 1 if the contenders' weights or losses differ.

Run: ``.venv/bin/python bench/engine.py [--quick] [--device cpu|cuda] ...`` (``--help``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Events

from tractrain.data.batch import Batch
from tractrain.data.packing import SamplerConfig
from tractrain.data.sampler import BatchSampler
from tractrain.data.split_index import SplitIndex
from tractrain.engine.epochs import SamplerEpochs
from tractrain.engine.optim import EpochLR
from tractrain.engine.trainer import create_trainer
from tractrain.errors import ConfigError, TractrainError
from tractrain.examples.next_direction import loss_fn as gru_loss_fn
from tractrain.examples.next_direction import make_model
from tractrain.hooks.best_model import BestModel
from tractrain.hooks.grad_norm import GradNorm
from tractrain.hooks.logs import NpyLogs
from tractrain.hooks.patience import Patience
from tractrain.hooks.progress import Progress
from tractrain.hooks.timing import Timing

TARGET = 0.05  # allowed overhead of tractrain over the hand loop
CLIP = 1.0
LR_FIRST, LR_LATER = 1e-3, 5e-4  # per-epoch schedule: LR_FIRST for epoch 1, then LR_LATER
LR_SCHEDULE = f"{LR_FIRST}*1 {LR_LATER}"
SEED = 1234
N_SUBJECTS = 2


# --------------------------------------------------------------------------------------------
# data: prebuilt batches behind a real sampler


def make_batches(
    n_batches: int, streamlines: int, points: int, features: int, seed: int = 0
) -> list[Batch]:
    """``n_batches`` deterministic synthetic batches: random-walk streamlines of about
    ``points`` points (+/- 25 %, at least 2) with ``features`` inputs per point."""
    rng = np.random.default_rng(seed)
    low, high = max(2, round(points * 0.75)), max(2, round(points * 1.25))
    out = []
    for index in range(n_batches):
        lengths = rng.integers(low, high + 1, size=streamlines)
        total = int(lengths.sum())
        steps = rng.normal(size=(total, 3))
        steps /= np.linalg.norm(steps, axis=1, keepdims=True)
        starts = np.repeat(rng.uniform(10, 50, size=(streamlines, 3)), lengths, axis=0)
        first = np.repeat(np.cumsum(lengths) - lengths, lengths)
        walk = np.cumsum(steps * 0.5, axis=0)
        walk -= walk[first] - steps[first] * 0.5  # restart the walk at every streamline
        subjects = np.arange(streamlines) % N_SUBJECTS
        out.append(Batch(
            points=torch.from_numpy((starts + walk).astype(np.float32)),
            lengths=torch.from_numpy(lengths.astype(np.int64)),
            subjects=torch.from_numpy(subjects.astype(np.int64)),
            streamline_ids=torch.arange(streamlines, dtype=torch.int64),
            subject_names=tuple(f"sub-{i}" for i in range(N_SUBJECTS)),
            inputs=torch.from_numpy(rng.normal(size=(total, features)).astype(np.float32)),
            index=index,
        ))
    return out


class PrebuiltDataset(torch.utils.data.Dataset):
    """Map-style dataset: the prebuilt batch at ``spec.index`` for each `BatchSpec`."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches

    def __getitem__(self, spec) -> Batch:
        return self.batches[spec.index]

    def __len__(self) -> int:
        return len(self.batches)


def _identity(x):
    return x


def make_loader(batches: list[Batch], streamlines: int) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` over a fresh `BatchSampler` whose epochs have ``len(batches)`` batches
    of ``streamlines`` streamlines each (a fake two-subject split, shuffled per epoch)."""
    per_subject = len(batches) * streamlines // N_SUBJECTS
    counts = [per_subject] * N_SUBJECTS
    counts[0] += len(batches) * streamlines - sum(counts)
    index = SplitIndex(
        "train", "fake", tuple(f"sub-{i}" for i in range(N_SUBJECTS)),
        tuple(np.full(c, 10, dtype=np.int64) for c in counts),
        tuple(np.full(c, 5.0, dtype=np.float32) for c in counts),
    )
    sampler = BatchSampler(index, SamplerConfig(batch_size=streamlines), seed=SEED)
    if sampler.epoch_length() != len(batches):
        raise AssertionError(f"sampler gives {sampler.epoch_length()} batches, "
                             f"expected {len(batches)}")
    return torch.utils.data.DataLoader(PrebuiltDataset(batches), sampler=sampler,
                                       batch_size=None, collate_fn=_identity, num_workers=0)


# --------------------------------------------------------------------------------------------
# models


def linear_loss_fn(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """Regress each point's coordinates from its features (a tiny, cheap task)."""
    return F.mse_loss(model(batch.inputs), batch.points), batch.num_points


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[int], torch.nn.Module]  # n_features -> model
    loss_fn: Callable
    target: float = TARGET  # allowed overhead ...
    on: str = "wall"  # ... of the median wall or process-CPU time per iteration
    repeats: int = 7  # default alternating repeats (full size; --quick: 3)


CASES = (
    Case("demo GRU (h=64)", lambda f: make_model({"n_inputs": f, "hidden_size": 64}),
         gru_loss_fn),
    # the framework's own cost is most visible here: CPU time is the steadier measure, and
    # more repeats (a run lasts ~0.1 s, shorter than this VM's noise bursts) steady the medians
    Case("Linear", lambda f: torch.nn.Linear(f, 3), linear_loss_fn, target=0.10, on="cpu",
         repeats=31),
)


def _fresh(case: Case, features: int, device: torch.device):
    torch.manual_seed(SEED)
    model = case.build(features).to(device)
    return model, torch.optim.Adam(model.parameters(), lr=LR_FIRST)


# --------------------------------------------------------------------------------------------
# contenders


@dataclass
class Run:
    """One timed run: wall and process CPU seconds training, final weights (CPU), epoch losses
    and, for tractrain, the wall seconds spent in the epoch-end hooks from BestModel to NpyLogs
    (the ones that write files)."""

    seconds: float
    cpu_seconds: float
    weights: dict[str, torch.Tensor]
    losses: list[float]
    epoch_io: tuple[float, float] = (0.0, 0.0)  # wall, CPU


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _clock()
    return wall - start[0], cpu - start[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def run_hand_loop(case: Case, batches: list[Batch], epochs: int, streamlines: int,
                  device: torch.device, writes: bool = False) -> Run:
    """The plain PyTorch loop a user would write (gradient norm computed once, as tractrain).

    ``writes``: also do, at each epoch's end, the file writes of tractrain's BestModel and
    NpyLogs (same hooks, same metric names): the floor that saving the best model (fsynced)
    and the logs at every epoch sets, whatever the engine."""
    model, optimizer = _fresh(case, batches[0].inputs.shape[1], device)
    params = list(model.parameters())
    loader = make_loader(batches, streamlines)
    losses = []
    with tempfile.TemporaryDirectory(prefix="bench-hand-") as exp_dir:
        best, logs = BestModel(exp_dir, model), NpyLogs(exp_dir)
        _sync(device)
        start = _clock()
        for epoch in range(epochs):
            epoch_start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = LR_FIRST if epoch == 0 else LR_LATER
            total = count = norm_sum = 0.0
            for batch in loader:
                model.train()
                batch = batch.to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                loss, n = case.loss_fn(model, batch)
                loss.backward()
                norm = torch.nn.utils.get_total_norm(
                    [p.grad for p in params if p.grad is not None])
                torch.nn.utils.clip_grads_with_norm_(params, CLIP, norm)
                optimizer.step()
                total += loss.item() * float(n)
                count += float(n)
                norm_sum += norm.item()  # logged per epoch, as tractrain's GradNorm does
            losses.append(total / count)
            if writes:  # tractrain's 8 epoch metrics (8 .npy files + logs.csv), best model
                seconds, mean_norm = time.perf_counter() - epoch_start, norm_sum / len(batches)
                metrics = {"train_loss": losses[-1], "lr": optimizer.param_groups[0]["lr"],
                           "grad_norm": mean_norm, "unclipped_grad_norm": mean_norm,
                           "unclipped_grad_norm_max": mean_norm, "epoch_time": seconds,
                           "data_wait_share": 0.0, "batches_per_s": len(batches) / seconds}
                best.step(metrics, epoch + 1)
                logs.record(metrics, epoch + 1)
                logs.write()
        _sync(device)
        elapsed = _since(start)
    return Run(*elapsed, _weights(model), losses)


def run_hand_loop_writes(case: Case, batches: list[Batch], epochs: int, streamlines: int,
                         device: torch.device) -> Run:
    """`run_hand_loop` plus tractrain's epoch-end file writes."""
    return run_hand_loop(case, batches, epochs, streamlines, device, writes=True)


def run_tractrain(case: Case, batches: list[Batch], epochs: int, streamlines: int,
                  device: torch.device) -> Run:
    """create_trainer + the default hooks (no checkpoint, Comet or validation)."""
    model, optimizer = _fresh(case, batches[0].inputs.shape[1], device)
    loader = make_loader(batches, streamlines)
    losses, io_start, io = [], [(0.0, 0.0)], [0.0, 0.0]

    def io_started(engine) -> None:
        io_start[0] = _clock()

    def io_done(engine) -> None:
        wall, cpu = _since(io_start[0])
        io[0] += wall
        io[1] += cpu
        losses.append(engine.state.metrics["train_loss"])

    with tempfile.TemporaryDirectory(prefix="bench-engine-") as exp_dir:
        trainer = create_trainer(model, optimizer, case.loss_fn, device=device,
                                 clip_grad_norm=CLIP)
        SamplerEpochs(loader.sampler).attach(trainer)
        EpochLR(LR_SCHEDULE, optimizer).attach(trainer)
        Timing().attach(trainer)
        GradNorm().attach(trainer)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, io_started)
        BestModel(exp_dir, model).attach(trainer)  # the two hooks that write files
        Patience(None).attach(trainer)
        NpyLogs(exp_dir).attach(trainer)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, io_done)
        Progress(enabled=False).attach(trainer)
        trainer.state.max_epochs = epochs
        trainer.state.epoch_length = max(1, loader.sampler.epoch_length())
        _sync(device)
        start = _clock()
        trainer.run(loader, max_epochs=epochs)
        _sync(device)
        elapsed = _since(start)
    return Run(*elapsed, _weights(model), losses, (io[0], io[1]))


CONTENDERS = {"hand loop": run_hand_loop, "hand + epoch writes": run_hand_loop_writes,
              "tractrain": run_tractrain}


# --------------------------------------------------------------------------------------------
# the benchmark


def compare_weights(a: dict, b: dict) -> tuple[str, float]:
    """``("identical" | "allclose" | "DIFFER", max abs difference)``."""
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    if all(torch.equal(a[k], b[k]) for k in a):
        return "identical", diff
    if all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a):
        return "allclose", diff
    return "DIFFER", diff


def bench_case(case: Case, batches: list[Batch], args) -> dict:
    """Alternate the contenders ``--repeats`` times (else the case's own number): per-iteration
    times, the per-epoch file-writing time of tractrain and, per repeat, the weight and loss
    comparison."""
    device = torch.device(args.device)
    for run in CONTENDERS.values():  # warm-up: one epoch each, not timed
        run(case, batches, 1, args.batch_streamlines, device)
    iterations = len(batches) * args.epochs
    times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    cpu: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    io_per_epoch, checks = [], []
    names = list(CONTENDERS)
    repeats = args.repeats or (3 if args.quick else case.repeats)
    for r in range(repeats):
        runs = {}
        for name in names if r % 2 == 0 else names[::-1]:  # ABBA order cancels slow drifts
            runs[name] = CONTENDERS[name](case, batches, args.epochs, args.batch_streamlines,
                                          device)
            times[name].append(runs[name].seconds / iterations)
            cpu[name].append(runs[name].cpu_seconds / iterations)
        hand, tt = runs["hand loop"], runs["tractrain"]
        io_per_epoch.append((tt.epoch_io[0] / args.epochs, tt.epoch_io[1] / args.epochs))
        for other in (tt, runs["hand + epoch writes"]):  # both computed what the hand loop did
            verdict, diff = compare_weights(hand.weights, other.weights)
            checks.append((verdict, diff,
                           bool(np.allclose(hand.losses, other.losses, rtol=1e-6))))
    return {"times": times, "cpu": cpu, "iterations": iterations, "io_per_epoch": io_per_epoch,
            "batches_per_epoch": len(batches), "checks": checks, "repeats": repeats}


def median_interval(values: list[float], level: float = 0.95, resamples: int = 2000
                    ) -> tuple[float, float]:
    """Percentile bootstrap interval of the median of ``values`` (a fixed seed: the same
    values give the same interval)."""
    rng = np.random.default_rng(0)
    samples = rng.choice(np.asarray(values), size=(resamples, len(values)), replace=True)
    medians = np.median(samples, axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(medians, [tail, 100 - tail])
    return float(low), float(high)


def report(results: dict[str, dict]) -> bool:
    """Print the Markdown table, the overhead breakdown and the weight checks; True if both
    contenders ended with equal weights and epoch losses for every model and repeat."""
    print("| model | contender | iterations | median s/iter | overhead % | median CPU s/iter | "
          "CPU overhead % | target |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    notes = []
    cases = {case.name: case for case in CASES}
    for model_name, res in results.items():
        case = cases[model_name]
        hand = statistics.median(res["times"]["hand loop"])
        tt = statistics.median(res["times"]["tractrain"])
        overhead = tt / hand - 1.0
        cpu_hand = statistics.median(res["cpu"]["hand loop"])
        cpu_tt = statistics.median(res["cpu"]["tractrain"])
        cpu_overhead = cpu_tt / cpu_hand - 1.0
        judged = cpu_overhead if case.on == "cpu" else overhead
        verdict = ("PASS" if judged <= case.target else "MISS") + \
            f" ({case.on} <= {case.target:.0%})"
        print(f"| {model_name} | hand loop | {res['iterations']} | {hand:.3e} | | "
              f"{cpu_hand:.3e} | | |")
        floor = statistics.median(res["times"]["hand + epoch writes"]) / hand - 1.0
        cpu_floor = statistics.median(res["cpu"]["hand + epoch writes"]) / cpu_hand - 1.0
        print(f"| {model_name} | hand + epoch writes | {res['iterations']} | "
              f"{hand * (1 + floor):.3e} | {floor * 100:+.1f} | {cpu_hand * (1 + cpu_floor):.3e} "
              f"| {cpu_floor * 100:+.1f} | |")
        print(f"| {model_name} | tractrain | {res['iterations']} | {tt:.3e} | "
              f"{overhead * 100:+.1f} | {cpu_tt:.3e} | {cpu_overhead * 100:+.1f} | {verdict} |")
        paired = [(b / a - 1) * 100 for a, b in zip(res["times"]["hand loop"],
                                                     res["times"]["tractrain"], strict=True)]
        paired_cpu = [(b / a - 1) * 100 for a, b in zip(res["cpu"]["hand loop"],
                                                        res["cpu"]["tractrain"], strict=True)]
        low, high = median_interval(paired_cpu)
        io = statistics.median(wall for wall, _ in res["io_per_epoch"])
        io_cpu = statistics.median(cpu for _, cpu in res["io_per_epoch"])
        best = min(res["times"]["tractrain"]) / min(res["times"]["hand loop"]) - 1
        notes.append(
            f"{model_name}: per-repeat overhead % min {min(paired):+.1f}, median "
            f"{statistics.median(paired):+.1f}, max {max(paired):+.1f}, best-of-"
            f"{len(paired)} {best * 100:+.1f}; per-repeat CPU overhead % median "
            f"{statistics.median(paired_cpu):+.1f} (95 % bootstrap interval {low:+.1f} to "
            f"{high:+.1f}); tractrain's epoch-end file writes (BestModel + "
            f"NpyLogs, fsynced) take {io * 1e3:.1f} ms/epoch ({io_cpu * 1e3:.1f} ms CPU); the "
            f"same writes added to the hand loop cost {cpu_floor * 100:+.1f} % CPU at "
            f"{res['batches_per_epoch']} batches/epoch (the floor of any engine that saves "
            f"them every epoch); tractrain over that floor "
            f"{(cpu_tt / (cpu_hand * (1 + cpu_floor)) - 1) * 100:+.1f} % CPU"
        )
    print()
    for line in notes:
        print(line)
    ok = True
    for model_name, res in results.items():
        verdicts = {v for v, _, _ in res["checks"]}
        worst = max(d for _, d, _ in res["checks"])
        losses_ok = all(lo for _, _, lo in res["checks"])
        good = "DIFFER" not in verdicts and losses_ok
        ok &= good
        word = "identical" if verdicts == {"identical"} else ("allclose" if good else "DIFFER")
        print(f"weights equal: {model_name}: {word} in {res['repeats']} repeats "
              f"(max abs diff {worst:.1e}; epoch losses {'equal' if losses_ok else 'DIFFER'})")
    return ok


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--iterations", type=int, default=None,
                   help="batches per epoch (default 100; quick 8)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default 2; quick 2)")
    p.add_argument("--batch-streamlines", type=int, default=None,
                   help="streamlines per batch (default 32; quick 16)")
    p.add_argument("--points", type=int, default=None,
                   help="about this many points per streamline (default 32; quick 24)")
    p.add_argument("--features", type=int, default=None,
                   help="input features per point (default 16; quick 8)")
    p.add_argument("--repeats", type=int, default=None,
                   help="alternating repeats per contender (default: 7 for the demo GRU, 31 "
                        "for Linear; quick 3)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--quick", action="store_true", help="small sizes, finishes in < 30 s")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = p.parse_args(argv)
    defaults = {"iterations": (100, 8), "epochs": (2, 2), "batch_streamlines": (32, 16),
                "points": (32, 24), "features": (16, 8)}
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for name in [*defaults, "repeats"]:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: expected an integer >= 1, "
                              f"got {getattr(args, name)}")
    if args.threads < 1:
        raise ConfigError(f"--threads: expected an integer >= 1, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: expected a CUDA device, torch sees none")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 if both contenders agree, 1 if not, 2 for a bad option."""
    try:
        args = parse_args(argv)
    except TractrainError as e:
        print(f"bench/engine.py: error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    batches = make_batches(args.iterations, args.batch_streamlines, args.points, args.features)
    print(f"# tractrain engine overhead: {args.iterations} batches/epoch x {args.epochs} epochs, "
          f"{args.batch_streamlines} streamlines x ~{args.points} points x {args.features} "
          f"features, {args.repeats or ('3' if args.quick else 'per-model')} repeats, "
          f"device {args.device}, {torch.get_num_threads()} thread(s), torch "
          f"{torch.__version__}")
    print("# tractrain hooks: EpochLR, Timing, GradNorm, BestModel, Patience, NpyLogs, "
          "Progress(off); excluded: Checkpoint, GracefulStop (needs a checkpoint), Comet "
          "(offline Comet costs ~1 s per run end), Validation (in neither contender)\n")
    results = {case.name: bench_case(case, batches, args) for case in CASES}
    return 0 if report(results) else 1


if __name__ == "__main__":
    sys.exit(main())
