"""``tractrain-store-info STORE``: what a store holds, and with ``--check`` whether training
can rely on it (exit 1 and one line per failure when not).

The computations are `tractrain.data.inspect_store`'s; this module only prints them.
"""

from __future__ import annotations

import argparse
import json
import sys

from tractrain.bin.common import ArgumentParser, run
from tractrain.bin.flags import add_bool_flag, path_arg

EXIT_CHECK_FAILED = 1


def make_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="tractrain-store-info",
        description="Summarize a tractrain store (format, provenance, splits, groups, "
        "streamline counts and lengths per subject, stored size); with --check, verify what "
        "training relies on (points inside the volume, inputs not all zeros, no NaN/inf, "
        "consistent offsets) and exit 1 if a check fails. Reads subject by subject.",
    )
    parser.add_argument("store", type=path_arg, help="store folder (.zarr) or .zip")
    parser.add_argument("--check", action="store_true",
                        help="also read every point and volume and check them")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document instead of text (keys: see "
                        "docs/store-format.md)")
    parser.add_argument("--max-outside", type=float, default=0.01, metavar="SHARE",
                        help="--check fails when a subject has more than this share of its "
                        "points outside the reference volume (default: 0.01)")
    parser.add_argument("--max-zero-inputs", type=float, default=0.05, metavar="SHARE",
                        help="--check fails when a subject has more than this share of points "
                        "whose interpolated inputs are all zero (default: 0.05)")
    add_bool_flag(parser, "--progress", "progress",
                  help="progress bar of --check (default: when stderr is a terminal)")
    parser.add_argument("--quiet", dest="progress", action="store_const", const=False,
                        help="same as --progress false")
    return parser


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def header_lines(head: dict) -> list[str]:
    prov = head["provenance"]
    splits = ", ".join(f"{k} {len(v)}" + (f" ({', '.join(v)})" if v else "")
                       for k, v in head["splits"].items())
    lines = [f"store: {head['path']} ({head['format']} v{head['version']}, "
             f"{len(head['subjects'])} subjects)",
             f"provenance: {prov.get('tool', '?')}, created {prov.get('created', '?')}, "
             f"config {prov.get('config_path')}, root {prov.get('root')}",
             f"splits: {splits}"]
    for name, meta in head["volume_groups"].items():
        names = meta["feature_names"]
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        lines.append(f"volume group {name}: {meta['n_features']} features ({shown}), "
                     f"{meta['dtype']}")
    for name, meta in head["streamline_groups"].items():
        lines.append(f"streamline group {name}: data per streamline "
                     f"{', '.join(meta['dps_keys']) or 'none'}")
    return lines


def subject_line(subject: str, info: dict) -> str:
    parts = []
    for name, v in info["volumes"].items():
        parts.append(f"{name} {'x'.join(map(str, v['shape']))} {v['dtype']}, voxel "
                     f"{'x'.join(f'{s:g}' for s in v['voxel_sizes'])} mm")
    for name, s in info["streamlines"].items():
        pts, mm = s["points_per_streamline"], s["length_mm"]
        text = f"{name} {s['n_streamlines']} streamlines, {s['n_points']} points"
        if pts is not None:
            text += (f", points/streamline {pts['min']:.0f}/{pts['mean']:.1f}/{pts['max']:.0f}"
                     f" (min/mean/max), length {mm['min']:.1f}/{mm['mean']:.1f}/"
                     f"{mm['median']:.1f}/{mm['max']:.1f} mm (min/mean/median/max)")
        parts.append(text)
    return f"{subject} ({info['split'] or 'no split'}): " + "; ".join(parts) + \
        f"; {_size(info['stored_bytes'])}"


def check_line(subject: str, result: dict) -> str:
    parts = []
    for name, s in result["streamlines"].items():
        zero = ", ".join(f"{v} {100 * z:.1f}%" for v, z in s["zero_input_share"].items())
        parts.append(f"{name} {100 * s['outside_share']:.1f}% outside, all-zero inputs "
                     f"{zero or '-'}, {s['non_finite_points']} NaN/inf points")
    status = "ok" if not result["failures"] else f"{len(result['failures'])} failure(s)"
    return f"  check {subject}: {'; '.join(parts)}: {status}"


def info(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tractrain.data import inspect_store
    from tractrain.data.store import open_store
    from tractrain.errors import ConfigError, StoreError

    for flag in ("max_outside", "max_zero_inputs"):
        value = getattr(args, flag)
        if not 0 <= value <= 1:
            raise ConfigError(f"--{flag.replace('_', '-')}: expected a share in [0, 1], "
                              f"got {value}")
    store = open_store(args.store, cache_bytes=0)
    head = inspect_store.store_header(store)
    doc = {**head, "subject_info": {}, "stored_bytes": 0}
    if not args.json:
        print("\n".join(header_lines(head)), flush=True)
    failures: list[str] = []
    checks: dict = {}
    # the bar of --check; by default (None) tqdm shows it only on a terminal
    disable = True if not args.check else (None if args.progress is None else not args.progress)
    bar = tqdm(store.subjects, desc="store-info", unit="subject", file=sys.stderr,
               disable=disable, leave=False)
    for subject in bar:
        bar.set_postfix_str(subject)
        try:
            summary = inspect_store.subject_summary(store, subject)
            result = inspect_store.check_subject(store, subject, args.max_outside,
                                                 args.max_zero_inputs) if args.check else None
        except StoreError as err:  # a damaged array: a failed check, or the error without
            if not args.check:
                raise
            failures.append(str(err))
            continue
        doc["subject_info"][subject] = summary
        doc["stored_bytes"] += summary["stored_bytes"]
        if not args.json:
            bar.write(subject_line(subject, summary), file=sys.stdout)
        if result is not None:
            checks[subject] = result
            failures += result["failures"]
            if not args.json:
                bar.write(check_line(subject, result), file=sys.stdout)
    bar.close()
    if args.check:
        doc["check"] = {"passed": not failures, "failures": failures,
                        "limits": {"max_outside": args.max_outside,
                                   "max_zero_inputs": args.max_zero_inputs},
                        "subjects": checks}
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(f"stored: {_size(doc['stored_bytes'])}"
              + (f"; check {'passed' if not failures else 'FAILED'}" if args.check else ""))
    for line in failures:
        print(f"tractrain-store-info: check failed: {line}", file=sys.stderr)
    return EXIT_CHECK_FAILED if failures else 0


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return run(info, args)


if __name__ == "__main__":
    sys.exit(main())
