"""Scores of generated streamlines against reference ones (pure; used by the generation hook)."""

from __future__ import annotations

import numpy as np
import torch

from tractrain.generation.tracker import Tracks


def endpoint_scores(tracks: Tracks, reference_ends: torch.Tensor, affine: np.ndarray,
                    within_mm: float) -> dict[str, np.ndarray]:
    """Per-streamline ``dist`` (mm, generated vs reference last point), ``within`` (bool) and
    ``length`` (mm) of ``tracks``, with the voxel -> mm ``affine`` of their grid."""
    linear = torch.as_tensor(np.asarray(affine, dtype=np.float64)[:3, :3], dtype=torch.float64)
    ends = tracks.last_points().detach().cpu().to(torch.float64)
    ref = torch.as_tensor(reference_ends, dtype=torch.float64).cpu()
    dist = ((ends - ref) @ linear.T).norm(dim=1)
    pts = tracks.points.detach().cpu().to(torch.float64) @ linear.T
    lengths = tracks.lengths.cpu()
    ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    same = ids[1:] == ids[:-1]  # consecutive points of one streamline
    seg = (pts[1:] - pts[:-1]).norm(dim=1)[same]
    length = torch.zeros(len(lengths), dtype=torch.float64).index_add_(0, ids[1:][same], seg)
    return {"dist": dist.numpy(), "within": (dist <= within_mm).numpy(),
            "length": length.numpy()}
