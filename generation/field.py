"""What the tracker sees of a subject: the `TrackingField` (input features to interpolate at
any point, and where tracking may go), built from a store by `subject_field`.

Points are voxel coordinates of the streamlines' reference grid with the origin at the centre
of voxel (0, 0, 0) (see docs/store-format.md); `tractrain.generation.tracker` tracks in it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tractrain.data.interpolation import InputConfig, interpolate_inputs
from tractrain.errors import ConfigError


@dataclass
class TrackingField:
    """A subject as the tracker sees it: inputs to interpolate and where tracking may go.

    Attributes:
        volume: (X, Y, Z, F) input volume (any float dtype) on the tracking device.
        inputs: what to interpolate (volume group, neighbourhood, outside policy).
        voxel_sizes: (3,) mm per voxel of the tracking grid (the streamlines' grid).
        volume_voxel_sizes: (3,) mm per voxel of ``volume`` (for neighbourhood offsets).
        to_volume: (4, 4) map from tracking voxel coordinates to ``volume``'s, None if equal.
        mask: (X, Y, Z) bool tracking mask on ``volume``'s grid; None: the whole volume.
    """

    volume: torch.Tensor
    inputs: InputConfig
    voxel_sizes: torch.Tensor
    volume_voxel_sizes: torch.Tensor
    to_volume: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.volume.device

    def _in_volume(self, points: torch.Tensor) -> torch.Tensor:
        if self.to_volume is None:
            return points
        t = self.to_volume.to(points.device, torch.float32)
        return points @ t[:3, :3].T + t[:3, 3]

    def features(self, points: torch.Tensor) -> torch.Tensor:
        """(n, F * N) input features at ``points`` (n, 3) (tracking voxel coordinates)."""
        return interpolate_inputs(self.volume, self._in_volume(points), self.inputs,
                                  self.volume_voxel_sizes)

    def inside(self, points: torch.Tensor) -> torch.Tensor:
        """(n,) bool: the nearest voxel of each point is in the volume and in the mask."""
        p = self._in_volume(points)
        finite = torch.isfinite(p).all(dim=1)
        ijk = torch.round(torch.nan_to_num(p, nan=-1.0, posinf=-1.0, neginf=-1.0))
        shape = torch.tensor(self.volume.shape[:3], device=p.device, dtype=p.dtype)
        ok = finite & ((ijk >= 0) & (ijk <= shape - 1)).all(dim=1)
        if self.mask is None:
            return ok
        ijk = torch.minimum(ijk.clamp(min=0), shape - 1).to(torch.int64)
        return ok & self.mask[ijk[:, 0], ijk[:, 1], ijk[:, 2]]


def subject_field(store, subject: str, group: str, inputs: InputConfig,
                  device: torch.device | str = "cpu",
                  mask_group: str | None = None) -> TrackingField:
    """The `TrackingField` of ``subject`` in the voxel grid of its streamline ``group``.

    The tracking mask is the first feature > 0.5 of volume group ``mask_group`` (same grid as
    the input volume) or, by default, the voxels where any input feature is non-zero (the store
    builder standardises inputs to exactly 0 outside the volume's mask).
    """
    volume = torch.from_numpy(np.ascontiguousarray(store.volume(subject, inputs.volume_group)))
    volume = volume.to(device)
    vinfo = store.volume_info(subject, inputs.volume_group)
    sinfo = store.streamline_info(subject, group)
    to_volume = None
    if not np.allclose(sinfo["affine"], vinfo["affine"], atol=1e-5):
        to_volume = torch.as_tensor(np.linalg.inv(vinfo["affine"]) @ sinfo["affine"],
                                    dtype=torch.float32, device=volume.device)
    if mask_group is None:
        mask = (volume != 0).any(dim=3)
    else:
        if mask_group not in store.volume_groups:
            raise ConfigError(f"mask_group {mask_group!r}: the store has volume groups "
                              f"{sorted(store.volume_groups)}")
        raw = store.volume(subject, mask_group)
        if tuple(raw.shape[:3]) != tuple(volume.shape[:3]):
            raise ConfigError(f"mask_group {mask_group!r}: {subject} grid {raw.shape[:3]} "
                              f"differs from {inputs.volume_group!r}'s {tuple(volume.shape[:3])}")
        mask = torch.from_numpy(np.asarray(raw[..., 0]) > 0.5).to(volume.device)
    return TrackingField(
        volume=volume, inputs=inputs,
        voxel_sizes=torch.as_tensor(sinfo["voxel_sizes"], dtype=torch.float32),
        volume_voxel_sizes=torch.as_tensor(vinfo["voxel_sizes"], dtype=torch.float64),
        to_volume=to_volume, mask=mask)
