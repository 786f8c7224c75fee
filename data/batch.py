"""The `Batch`: what a loader hands to the user's ``loss_fn``.

Streamlines are packed flat: ``points[offsets[i]:offsets[i + 1]]`` is streamline ``i``.
Coordinates are in voxel space of the subject's reference volume, origin at the centre of
voxel (0, 0, 0) (see docs/store-format.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


def offsets_of(lengths: torch.Tensor) -> torch.Tensor:
    """(B + 1,) int64 starts of flat-packed streamlines of ``lengths``; last entry is M."""
    zero = torch.zeros(1, dtype=torch.int64, device=lengths.device)
    return torch.cat([zero, torch.cumsum(lengths, 0)])


@dataclass
class Batch:
    """A batch of streamlines, packed flat, with optional per-point input features.

    Attributes:
        points: (M, 3) float32, all streamlines concatenated, voxel coordinates.
        lengths: (B,) int64, points per streamline.
        subjects: (B,) int64, index of each streamline's subject in ``subject_names``.
        streamline_ids: (B,) int64, id of each streamline inside its subject's group.
        subject_names: subject ids, indexed by ``subjects``.
        inputs: (M, F) float32 features interpolated at every point, or None.
        epoch: epoch the batch was drawn for (-1 if unknown).
        index: position of the batch in its epoch (-1 if unknown).
    """

    points: torch.Tensor
    lengths: torch.Tensor
    subjects: torch.Tensor
    streamline_ids: torch.Tensor
    subject_names: tuple[str, ...]
    inputs: torch.Tensor | None = None
    epoch: int = -1
    index: int = -1
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def offsets(self) -> torch.Tensor:
        """(B + 1,) int64 start of each streamline in ``points``; last entry is M."""
        return offsets_of(self.lengths)

    @property
    def num_points(self) -> int:
        return int(self.points.shape[0])

    def _map(self, fn) -> Batch:
        return replace(
            self,
            points=fn(self.points),
            lengths=fn(self.lengths),
            subjects=fn(self.subjects),
            streamline_ids=fn(self.streamline_ids),
            inputs=None if self.inputs is None else fn(self.inputs),
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Copy of the batch with every tensor on ``device``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Called by ``torch.utils.data.DataLoader(pin_memory=True)``."""
        return self._map(lambda t: t.pin_memory())

    def split(self, tensor: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per-streamline views of ``tensor`` (default: ``points``), a list of B tensors."""
        tensor = self.points if tensor is None else tensor
        return list(torch.split(tensor, self.lengths.tolist()))

    def padded(
        self, tensor: torch.Tensor | None = None, value: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, Lmax, C)`` zero-padded copy of ``tensor`` and the lengths, for
        ``torch.nn.utils.rnn.pack_padded_sequence``."""
        padded = torch.nn.utils.rnn.pad_sequence(
            self.split(tensor), batch_first=True, padding_value=value
        )
        return padded, self.lengths
