"""``tractrain-eval EXPERIMENT``: the loss of a trained model on a split, per subject and overall.

The loader is the validation loader of training, rebuilt from ``<exp>/config.json`` (same
inputs and batch budget, deterministic augmentation, fixed order) without the batch cap, so on
the valid split the overall loss is the run's ``valid_loss`` for the same weights. A model that
implements the generation contract is also scored by tracking (`GenerationValidation`'s
``gen_endpoint_dist``, ``gen_within``, ``gen_length``). The table is printed and written to
``<exp>/eval/<split>.json`` and ``.csv``.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from pathlib import Path

from tractrain.bin.common import ArgumentParser, run
from tractrain.bin.flags import path_arg
from tractrain.bin.options import GEN_METRICS
from tractrain.bin.resume import add_trust_flags, trusted_code
from tractrain.errors import ConfigError
from tractrain.experiment import ExperimentDir, read_best_epoch, read_config

SPLITS = ("test", "valid", "train")
COLUMNS = ("subject", "n", "batches", "loss")


def make_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="tractrain-eval",
        description="Evaluate a trained model on a split of its store: the n-weighted loss "
        "per subject and overall (plus generation scores if the model can track); prints a "
        "table and writes EXPERIMENT/eval/<split>.json and .csv.",
    )
    parser.add_argument("experiment", type=path_arg,
                        help="experiment folder written by tractrain-train")
    parser.add_argument("--split", choices=SPLITS, default="test",
                        help="store split to evaluate (default: test)")
    parser.add_argument("--which", choices=("best", "checkpoint"), default="best",
                        help="best model or latest checkpoint weights (default: best)")
    parser.add_argument("--store", metavar="PATH", default=None, type=path_arg,
                        help="the store, if it moved (default: the training store)")
    parser.add_argument("--gen-streamlines", dest="gen_streamlines", type=int, default=None,
                        metavar="N", help="streamlines tracked for the generation scores; 0 "
                        "skips them (default: the training gen_streamlines, or 100)")
    parser.add_argument("--num-workers", dest="num_workers", type=int, default=0, metavar="N",
                        help="DataLoader workers (does not change the batches; default: 0)")
    parser.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    add_trust_flags(parser, loss=True)
    return parser


def weights_epoch(exp_dir: Path, which: str) -> int | None:
    """The epoch whose weights ``which`` holds (None if unknown)."""
    if which == "best":
        best = read_best_epoch(exp_dir)
        return None if best is None else int(best["epoch"])
    from tractrain.hooks.checkpoint import read_meta

    return read_meta(exp_dir, repair=False).get("epoch")


def generation_scores(model, store, config: dict, split: str, n: int, device) -> dict | None:
    """`GenerationValidation`'s scores on ``split``, or None if the model cannot track."""
    if n < 1 or not all(callable(getattr(model, k, None)) for k in ("init_state", "step")):
        return None
    from tractrain.bin.compose import input_config
    from tractrain.hooks.generation import GenerationValidation

    scorer = GenerationValidation(model, store, config["group"], input_config(config),
                                  n_streamlines=n, within_mm=config.get("gen_within_mm") or 5.0,
                                  step_mm=config.get("step_size") or 1.0, split=split,
                                  seed=config["seed"], device=device)
    return scorer.evaluate()


def evaluate_experiment(args: argparse.Namespace) -> dict:
    """The report of ``tractrain-eval`` (see `format_table` and `to_csv`)."""
    from tractrain.bin.compose import (
        device_inputs,
        eval_loader,
        open_run_store,
        recorded_store,
        resolve_device,
    )
    from tractrain.bin.track import recorded_factory
    from tractrain.data.split_index import split_index
    from tractrain.engine.evaluate import evaluate, subject_index
    from tractrain.engine.reuse import load_model
    from tractrain.imports import import_object

    exp_dir = Path(args.experiment)
    config = {**read_config(exp_dir), "num_workers": args.num_workers}
    config = trusted_code(args, config, str(ExperimentDir(exp_dir).config), ("loss",))
    factory = recorded_factory(args, exp_dir)
    if args.num_workers < 0:
        raise ConfigError(f"--num-workers {args.num_workers}: expected >= 0")
    store = open_run_store({**config, "store": recorded_store(config, exp_dir, args.store)})
    group = config["group"]
    if group not in store.streamline_groups:
        raise ConfigError(f"{store.path}: no streamline group {group!r} (the training group); "
                          f"it has {sorted(store.streamline_groups)}")
    if not store.splits.get(args.split):
        have = sorted(k for k, v in store.splits.items() if v)
        raise ConfigError(f"--split {args.split}: {store.path} has no {args.split} subjects "
                          f"(non-empty splits: {', '.join(have) or 'none'})")
    device = resolve_device(args.device)
    model = load_model(exp_dir, args.which, device, factory=factory, trust=True)
    loss_fn = import_object(config["loss"], "loss")
    prepare = device_inputs(store, config)
    index = split_index(store, args.split, group)

    def loss_on(loader, desc: str) -> dict:
        return evaluate(model, loss_fn, loader, device=device, prepare_batch=prepare,
                        progress=None, desc=desc)

    subjects = [{"subject": s, **loss_on(eval_loader(store, config, subject_index(index, s)), s)}
                for s in index.subjects]
    whole = eval_loader(store, config, index)  # the overall loss and the demo's baselines
    overall = loss_on(whole, args.split)
    n_gen = args.gen_streamlines
    if n_gen is None:
        n_gen = config.get("gen_streamlines") or 100
    return {"experiment": str(exp_dir), "split": args.split, "which": args.which,
            "epoch": weights_epoch(exp_dir, args.which), "store": str(store.path),
            **overall, "subjects": subjects,
            "generation": generation_scores(model, store, config, args.split, n_gen, device),
            "baselines": demo_baselines(config, whole)}


def demo_baselines(config: dict, loader) -> dict | None:
    """For the demo's loss: the trivial predictors' scores on the same points (see
    `tractrain.examples.next_direction.baselines`); None for any other loss."""
    from tractrain.bin.options import DEMO_LOSS

    if config.get("loss") != DEMO_LOSS:
        return None
    from tractrain.examples.next_direction import baselines

    return baselines(loader)


def _cell(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def rows(report: dict) -> list[dict]:
    """One row per subject, then ``all`` (which carries the generation scores)."""
    table = [{k: s[k] for k in COLUMNS} for s in report["subjects"]]
    table.append({"subject": "all", **{k: report[k] for k in COLUMNS[1:]},
                  **(report["generation"] or {})})
    return table


def format_table(report: dict) -> str:
    """The report as an aligned text table."""
    columns = list(COLUMNS) + (list(GEN_METRICS) if report["generation"] else [])
    cells = [columns] + [[_cell(r[c]) if c in r else "" for c in columns] for r in rows(report)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in cells]
    epoch = f" (epoch {report['epoch']})" if report["epoch"] is not None else ""
    base = report.get("baselines")
    if base:
        lines.append(f"baselines on the same {base['n']} steps: repeat previous direction "
                     f"{base['previous_direction']:.6g} | best constant direction "
                     f"{base['constant_direction']:.6g} (model: {report['loss']:.6g})")
    return "\n".join([f"{report['experiment']}: {report['split']} split, {report['which']} "
                      f"weights{epoch}", *lines])


def to_csv(report: dict) -> str:
    columns = list(COLUMNS) + (list(GEN_METRICS) if report["generation"] else [])
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows(report))
    return out.getvalue()


def eval_command(args: argparse.Namespace) -> int:
    from tractrain.atomic import atomic_write_bytes, atomic_write_json

    report = evaluate_experiment(args)
    folder = ExperimentDir(args.experiment).eval
    folder.mkdir(exist_ok=True)
    atomic_write_json(folder / f"{args.split}.json", report)
    atomic_write_bytes(folder / f"{args.split}.csv", to_csv(report).encode())
    print(format_table(report))
    print(f"written: {folder / args.split}.json, .csv", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return run(eval_command, args)


if __name__ == "__main__":
    sys.exit(main())
