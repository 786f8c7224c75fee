"""The streamlines of one split: per subject, how many and how long (points and mm).

`split_index(store, split, group)` reads only the lengths; the resulting `SplitIndex` is what
`tractrain.data.packing.epoch_batches` packs into batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tractrain.errors import ConfigError


@dataclass(frozen=True, eq=False)
class SplitIndex:
    """The streamlines of one split and group: per subject, points and mm of each streamline."""

    split: str
    group: str
    subjects: tuple[str, ...]
    lengths: tuple[np.ndarray, ...]
    lengths_mm: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        subjects = tuple(str(s) for s in self.subjects)
        if len(set(subjects)) != len(subjects):
            raise ConfigError(f"SplitIndex.subjects: expected unique ids, got {list(subjects)}")
        if len(self.lengths) != len(subjects) or len(self.lengths_mm) != len(subjects):
            raise ConfigError(
                f"SplitIndex: expected one lengths and lengths_mm array per subject "
                f"({len(subjects)}), got {len(self.lengths)} and {len(self.lengths_mm)}"
            )
        lengths, lengths_mm = [], []
        for name, n, mm in zip(subjects, self.lengths, self.lengths_mm, strict=True):
            n = np.array(n, dtype=np.int64)
            mm = np.array(mm, dtype=np.float32)
            if n.ndim != 1 or mm.shape != n.shape:
                raise ConfigError(
                    f"SplitIndex[{name}]: expected 1-D lengths and lengths_mm of equal size, "
                    f"got shapes {n.shape} and {mm.shape}"
                )
            if n.size and n.min() < 1:
                raise ConfigError(f"SplitIndex[{name}].lengths: expected >= 1 point each")
            if mm.size and not (np.isfinite(mm).all() and mm.min() >= 0):
                raise ConfigError(f"SplitIndex[{name}].lengths_mm: expected finite values >= 0")
            n.flags.writeable = False
            mm.flags.writeable = False
            lengths.append(n)
            lengths_mm.append(mm)
        object.__setattr__(self, "subjects", subjects)
        object.__setattr__(self, "lengths", tuple(lengths))
        object.__setattr__(self, "lengths_mm", tuple(lengths_mm))

    @property
    def counts(self) -> np.ndarray:
        """(S,) int64 number of streamlines per subject."""
        return np.array([n.size for n in self.lengths], dtype=np.int64)


def split_index(store: Any, split: str, group: str) -> SplitIndex:
    """Index of ``split`` in ``store`` for streamline ``group`` (reads only the lengths)."""
    splits = store.splits
    if split not in splits:
        raise ConfigError(f"split {split!r}: unknown, the store has splits {sorted(splits)}")
    subjects = [str(s) for s in splits[split]]
    if not subjects:
        raise ConfigError(f"split {split!r}: expected at least one subject, it has none")
    lengths, lengths_mm = [], []
    for subject in subjects:
        info = store.streamline_index(subject, group)
        lengths.append(info.lengths)
        lengths_mm.append(info.lengths_mm)
    index = SplitIndex(split, group, tuple(subjects), tuple(lengths), tuple(lengths_mm))
    if index.counts.sum() == 0:
        raise ConfigError(
            f"split {split!r}: expected streamlines in group {group!r}, its subjects have none"
        )
    return index
