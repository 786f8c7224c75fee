"""``tractrain-track EXPERIMENT --subject S``: a tractogram tracked by a trained model.

Rebuilds the model of ``<exp>`` (best model by default, ``--checkpoint`` for the latest
weights), opens the store of its config, tracks with `tractrain.generation.tracker` and writes a
``.trk``, ``.tck`` or ``.trx`` (`tractrain.data.trx_io`) in RAS+ mm whose header is the
subject's reference volume's (affine, dimensions, voxel sizes, voxel order).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tractrain.bin.common import ArgumentParser, run
from tractrain.bin.flags import path_arg
from tractrain.bin.resume import add_trust_flags
from tractrain.errors import ConfigError
from tractrain.experiment import read_config

if TYPE_CHECKING:
    import numpy as np
    import torch

SEED_SOURCES = ("mask", "valid-streamlines")


def make_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="tractrain-track",
        description="Track a subject with a trained model and write a tractogram (.trk, .tck "
        "or .trx, RAS+ mm, in the subject's reference space).",
    )
    parser.add_argument("experiment", type=path_arg,
                        help="experiment folder written by tractrain-train")
    parser.add_argument("--subject", required=True, help="subject id in the store")
    parser.add_argument("--seeds", type=int, default=1000, metavar="N",
                        help="number of seeds (default: 1000)")
    parser.add_argument("--seeds-from", dest="seeds_from", choices=SEED_SOURCES,
                        default="mask", help="random points in the tracking mask, or the first "
                        "--seed-points points of the subject's streamlines (default: mask)")
    parser.add_argument("--seed-points", dest="seed_points", type=int, default=1, metavar="K",
                        help="with --seeds-from valid-streamlines: prefix points fed to the "
                        "model before it tracks alone (default: 1)")
    parser.add_argument("--checkpoint", action="store_true",
                        help="use the latest checkpoint's weights instead of the best model")
    parser.add_argument("--out", default="tracks.trk", type=path_arg,
                        help="output .trk, .tck or .trx "
                        "(default: tracks.trk)")
    parser.add_argument("--step-mm", dest="step_mm", type=float, default=None, metavar="X",
                        help="step size in mm (default: the training step_size)")
    parser.add_argument("--max-length-mm", dest="max_length_mm", type=float, default=200.0,
                        metavar="X", help="maximum streamline length in mm (default: 200)")
    parser.add_argument("--max-angle", dest="max_angle", type=float, default=None, metavar="DEG",
                        help="stop when a step turns by more than DEG degrees (default: off)")
    parser.add_argument("--both-directions", dest="both_directions", action="store_true",
                        help="also track backward from each seed")
    parser.add_argument("--noise-std", dest="noise_std", type=float, default=0.0, metavar="X",
                        help="Gaussian noise added to each unit direction (default: 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the seeds and noise")
    parser.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    parser.add_argument("--store", default=None, type=path_arg, help="the store, if it moved")
    parser.add_argument("--group", default=None,
                        help="streamline group (reference space, seeds; default: training's)")
    parser.add_argument("--mask-group", dest="mask_group", default=None,
                        help="volume group of the tracking mask (default: non-zero inputs)")
    add_trust_flags(parser, loss=False)
    return parser


def mask_seeds(field, n: int, rng: np.random.Generator) -> torch.Tensor:
    """``n`` points uniform in the tracking mask's voxels, in tracking voxel coordinates."""
    import numpy as np
    import torch

    mask = field.mask if field.mask is not None else torch.ones(
        field.volume.shape[:3], dtype=torch.bool)
    voxels = torch.nonzero(mask.cpu()).numpy()
    if len(voxels) == 0:
        raise ConfigError("--seeds-from mask: the tracking mask is empty")
    pts = voxels[rng.integers(0, len(voxels), n)] + rng.uniform(-0.5, 0.5, (n, 3))
    if field.to_volume is not None:  # the mask's grid -> the tracking grid
        back = np.linalg.inv(field.to_volume.cpu().numpy().astype(np.float64))
        pts = pts @ back[:3, :3].T + back[:3, 3]
    return torch.as_tensor(pts, dtype=torch.float32)


def streamline_prefixes(store, subject: str, group: str, n: int, k: int, step_mm: float,
                        rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """First ``k`` points (resampled to ``step_mm``) of ``n`` random streamlines."""
    import numpy as np
    import torch

    from tractrain.data.augment import resample
    from tractrain.data.store import expand_ranges

    count = len(store.streamline_index(subject, group))
    if count == 0:
        raise ConfigError(f"--seeds-from valid-streamlines: {subject}/{group} has no streamlines")
    ids = np.sort(rng.choice(count, size=min(n, count), replace=False))
    points, lengths = store.gather(subject, group, ids)
    vs = store.streamline_info(subject, group)["voxel_sizes"]
    points, lengths = resample(points, lengths, step_mm, vs)
    keep = np.minimum(lengths, k)
    take = expand_ranges(np.cumsum(lengths) - lengths, keep)
    return torch.from_numpy(points[take]), torch.from_numpy(keep.astype(np.int64))


def trk_header(info: dict) -> dict:
    """nibabel TRK header fields of a reference grid (``Store.streamline_info``)."""
    import nibabel as nib
    import numpy as np
    from nibabel.streamlines import Field

    affine = np.asarray(info["affine"], dtype=np.float64)
    return {
        Field.VOXEL_TO_RASMM: affine.astype(np.float32),
        Field.DIMENSIONS: np.asarray(info["dimensions"], dtype=np.int16),
        Field.VOXEL_SIZES: np.asarray(info["voxel_sizes"], dtype=np.float32),
        Field.VOXEL_ORDER: "".join(nib.aff2axcodes(affine)),
    }


def write_tractogram(path: Path, tracks, info: dict) -> None:
    """Write ``tracks`` (tracking voxel coordinates) in RAS+ mm with ``info``'s header."""
    import nibabel as nib
    import numpy as np
    from nibabel.streamlines import Tractogram

    affine = np.asarray(info["affine"], dtype=np.float64)
    ras = tracks.points.cpu().numpy().astype(np.float64) @ affine[:3, :3].T + affine[:3, 3]
    streamlines = np.split(ras.astype(np.float32), np.cumsum(tracks.lengths.cpu().numpy())[:-1])
    if path.suffix.lower() == ".trx":
        from tractrain.data.trx_io import write_trx

        write_trx(path, streamlines, affine, info["dimensions"])
        return
    tractogram = Tractogram(streamlines, affine_to_rasmm=np.eye(4))
    path.parent.mkdir(parents=True, exist_ok=True)
    header = trk_header(info) if path.suffix.lower() == ".trk" else None
    nib.streamlines.save(tractogram, str(path), header=header)


def recorded_factory(args: argparse.Namespace, exp_dir: Path) -> str:
    """The model factory to use: ``--model``, or the one ``best_model/config.json`` records
    if it is tractrain's own or ``--trust-experiment`` is given (checked, not imported)."""
    from tractrain.bin.resume import trusted_code
    from tractrain.experiment import CONFIG_FILE, ExperimentDir, read_best_model

    if args.model is not None:
        return args.model
    _, model_config = read_best_model(exp_dir)
    recorded = {"model": model_config.get("factory") if isinstance(model_config, dict) else None}
    source = str(ExperimentDir(exp_dir).best_model / CONFIG_FILE)
    return trusted_code(args, recorded, source, ("model",))["model"]


def track_command(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from tractrain.bin.compose import input_config, recorded_store, resolve_device
    from tractrain.data.store import open_store
    from tractrain.engine.reuse import load_model
    from tractrain.generation.field import subject_field
    from tractrain.generation.tracker import STOP_NAMES, continue_tracks

    out = Path(args.out)
    if out.suffix.lower() not in (".trk", ".tck", ".trx"):
        raise ConfigError(f"--out {out}: expected a .trk, .tck or .trx file name")
    if out.suffix.lower() == ".trx":
        from tractrain.data.trx_io import check_available

        check_available(out, "writing")
    if args.seeds < 1 or args.seed_points < 1:
        raise ConfigError("--seeds and --seed-points: expected integers >= 1")
    exp_dir = Path(args.experiment)
    config = read_config(exp_dir)
    factory = recorded_factory(args, exp_dir)
    store = open_store(recorded_store(config, exp_dir, args.store))
    group = args.group or config["group"]
    if group not in store.streamline_groups:
        raise ConfigError(f"--group {group!r}: the store has streamline groups "
                          f"{sorted(store.streamline_groups)}")
    if args.subject not in store.subjects:
        more = " ..." if len(store.subjects) > 8 else ""
        raise ConfigError(f"--subject {args.subject!r}: not in the store (have "
                          f"{', '.join(store.subjects[:8])}{more})")
    device = resolve_device(args.device)
    model = load_model(exp_dir, "checkpoint" if args.checkpoint else "best", device,
                       factory=factory, trust=True)
    step_mm = args.step_mm if args.step_mm is not None else config.get("step_size") or 1.0
    field = subject_field(store, args.subject, group, input_config(config), device,
                          args.mask_group)
    rng = np.random.default_rng(args.seed)
    if args.seeds_from == "mask":
        points = mask_seeds(field, args.seeds, rng)
        lengths = torch.ones(len(points), dtype=torch.int64)
    else:
        points, lengths = streamline_prefixes(store, args.subject, group, args.seeds,
                                              args.seed_points, step_mm, rng)
    generator = torch.Generator().manual_seed(args.seed)
    tracks = continue_tracks(model, field, points, lengths, step_mm=step_mm,
                             max_length_mm=args.max_length_mm, max_angle_deg=args.max_angle,
                             both_directions=args.both_directions, noise_std=args.noise_std,
                             generator=generator)
    info = store.streamline_info(args.subject, group)
    write_tractogram(out, tracks, info)
    counts = torch.bincount(tracks.stops.cpu(), minlength=len(STOP_NAMES) + 1)
    stops = ", ".join(f"{name} {int(counts[code])}" for code, name in STOP_NAMES.items()
                      if int(counts[code]))
    mean_points = float(tracks.lengths.float().mean()) if len(tracks) else 0.0
    print(f"{out}: {len(tracks)} streamlines, {mean_points:.1f} points on average at "
          f"{step_mm} mm; stopped by {stops or 'nothing'}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return run(track_command, args)


if __name__ == "__main__":
    sys.exit(main())
