"""Where a batch is built: the `Batch` handed to the user's ``loss_fn``, and `load_batch`,
which turns a batch's streamline ids into one (gather, augment, interpolate inputs).

Streamlines are packed flat: ``points[offsets[i]:offsets[i + 1]]`` is streamline ``i``.
Coordinates are in voxel space of the subject's reference volume, origin at the centre of
voxel (0, 0, 0) (see docs/store-format.md).

``load_batch`` is a pure function of (store, ids, configs, rng): the same arguments give the
same batch. The RNG comes from the caller (``BatchSpec.rng()`` = ``batch_rng(seed, epoch,
index)``), never from a generator copied into DataLoader workers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from tractrain.data.augment import AugmentConfig, apply_augment
from tractrain.data.cache import ByteLRU
from tractrain.data.interpolation import InputConfig, interpolate_inputs
from tractrain.errors import ConfigError


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


BatchIds = Sequence[tuple[str, np.ndarray]]


def _voxel_transform(store, subject: str, group: str, volume_group: str) -> np.ndarray | None:
    """4x4 map from the streamlines' voxel grid to the volume's, or None if they are equal."""
    sl = store.streamline_info(subject, group)["affine"]
    vol = store.volume_info(subject, volume_group)["affine"]
    if np.allclose(sl, vol, atol=1e-5):
        return None
    return np.linalg.inv(vol) @ sl


def subject_inputs(store, subject: str, group: str, points: np.ndarray | torch.Tensor,
                   inputs: InputConfig, volume: torch.Tensor) -> torch.Tensor:
    """Features (M, F * N) of ``inputs`` at one subject's points (streamline voxel space)."""
    info = store.volume_info(subject, inputs.volume_group)
    pts = torch.as_tensor(points, device=volume.device)
    transform = _voxel_transform(store, subject, group, inputs.volume_group)
    if transform is not None:
        t = torch.as_tensor(transform, dtype=torch.float32, device=volume.device)
        pts = pts @ t[:3, :3].T + t[:3, 3]
    return interpolate_inputs(volume, pts, inputs, info["voxel_sizes"])


def load_batch(
    store,
    ids: BatchIds,
    *,
    group: str,
    augment: AugmentConfig | None = None,
    rng: np.random.Generator | None = None,
    inputs: InputConfig | None = None,
    epoch: int = -1,
    index: int = -1,
) -> Batch:
    """Gather the streamlines ``ids`` (``[(subject, ids), ...]``) of ``group``, augment them,
    and (if ``inputs``) interpolate the input volume at every point, on the CPU."""
    if augment is not None and augment.is_random and rng is None:
        raise ConfigError("load_batch: random augmentation needs an rng (BatchSpec.rng())")
    names = tuple(subject for subject, _ in ids)
    points, lengths, subjects, sids, feats = [], [], [], [], []
    for k, (subject, sub_ids) in enumerate(ids):
        sub_ids = np.asarray(sub_ids, dtype=np.int64)
        pts, lens = store.gather(subject, group, sub_ids)
        if augment is not None:
            voxel_sizes = store.streamline_info(subject, group)["voxel_sizes"]
            pts, lens, parent = apply_augment(pts, lens, augment, rng, voxel_sizes)
            sub_ids = sub_ids[parent]
        points.append(np.ascontiguousarray(pts, dtype=np.float32))
        lengths.append(np.asarray(lens, dtype=np.int64))
        subjects.append(np.full(len(lens), k, dtype=np.int64))
        sids.append(sub_ids)
        if inputs is not None:
            volume = torch.from_numpy(store.volume(subject, inputs.volume_group))
            feats.append(subject_inputs(store, subject, group, points[-1], inputs, volume))
    return Batch(
        points=torch.from_numpy(np.concatenate(points) if points else np.zeros((0, 3), "f4")),
        lengths=torch.from_numpy(np.concatenate(lengths) if lengths else np.zeros(0, "i8")),
        subjects=torch.from_numpy(np.concatenate(subjects) if subjects else np.zeros(0, "i8")),
        streamline_ids=torch.from_numpy(np.concatenate(sids) if sids else np.zeros(0, "i8")),
        subject_names=names,
        inputs=torch.cat(feats) if feats else None,
        epoch=epoch,
        index=index,
    )


class DeviceInputs:
    """Interpolate inputs on a device (e.g. the GPU) in the main process.

    Keeps subjects' volumes on ``device`` in an LRU cache bounded by ``cache_bytes``. A volume
    larger than the whole budget is refused (`ConfigError`), never uploaded again at every
    batch: at construction for ``subjects`` (from the store's shapes), else at first use.
    Use as the trainer's ``prepare_batch``: ``batch = device_inputs(batch, device)``.
    """

    def __init__(self, store, group: str, inputs: InputConfig, cache_bytes: int = 2 * 2**30,
                 subjects: Sequence[str] = ()) -> None:
        self.store, self.group, self.inputs = store, group, inputs
        self.volumes = ByteLRU(cache_bytes)
        for subject in subjects:
            self._check_size(subject, self.volume_bytes(subject))

    def volume_bytes(self, subject: str) -> int:
        """Bytes a subject's volume takes on the device (its shape and dtype in the store)."""
        group = self.inputs.volume_group
        shape = self.store.volume_info(subject, group)["shape"]
        itemsize = np.dtype(self.store.volume_groups[group].get("dtype") or "float32").itemsize
        return math.prod(int(d) for d in shape) * itemsize

    def _check_size(self, subject: str, size: int) -> None:
        budget = self.volumes.max_bytes
        if budget is not None and size > budget:
            raise ConfigError(
                f"device_cache_gb {budget / 2**30:.3g}: the {self.inputs.volume_group!r} volume of "
                f"subject {subject!r} takes {size / 2**30:.3g} GiB on the device; raise "
                "device_cache_gb above that or interpolate in the workers")

    def _upload(self, subject: str, device: torch.device) -> torch.Tensor:
        volume = torch.from_numpy(self.store.volume(subject, self.inputs.volume_group))
        self._check_size(subject, volume.nbytes)
        return volume.to(device)

    def __call__(self, batch: Batch, device: torch.device | str) -> Batch:
        device = torch.device(device)
        counts = self._point_counts(batch)  # read before the copy: no device sync per batch
        batch = batch.to(device, non_blocking=True)
        feats = []
        per_subject = torch.split(batch.points, counts)
        for subject, points in zip(batch.subject_names, per_subject, strict=True):
            volume = self.volumes.get((subject, self.inputs.volume_group, str(device)),
                                      lambda s=subject: self._upload(s, device))
            feats.append(subject_inputs(self.store, subject, self.group, points, self.inputs,
                                        volume))
        batch.inputs = torch.cat(feats)
        return batch

    @staticmethod
    def _point_counts(batch: Batch) -> list[int]:
        """Points of each subject of the batch (its points are grouped by subject)."""
        point_counts = torch.zeros(len(batch.subject_names), dtype=torch.int64,
                                   device=batch.lengths.device)
        point_counts.index_add_(0, batch.subjects, batch.lengths)
        return point_counts.tolist()
