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
    """The streamlines of one split and group: per subject, points and mm of each streamline.

    ``ids`` are the streamlines' ids in the store (default: all of them, ``0..n-1``); a subset
    (`subset`, e.g. a validation sample) keeps its store ids here."""

    split: str
    group: str
    subjects: tuple[str, ...]
    lengths: tuple[np.ndarray, ...]
    lengths_mm: tuple[np.ndarray, ...]
    ids: tuple[np.ndarray, ...] | None = None

    def __post_init__(self) -> None:
        subjects = tuple(str(s) for s in self.subjects)
        if len(set(subjects)) != len(subjects):
            raise ConfigError(f"SplitIndex.subjects: expected unique ids, got {list(subjects)}")
        if len(self.lengths) != len(subjects) or len(self.lengths_mm) != len(subjects):
            raise ConfigError(
                f"SplitIndex: expected one lengths and lengths_mm array per subject "
                f"({len(subjects)}), got {len(self.lengths)} and {len(self.lengths_mm)}"
            )
        given = self.ids if self.ids is not None else [None] * len(subjects)
        if len(given) != len(subjects):
            raise ConfigError(f"SplitIndex.ids: expected one array per subject ({len(subjects)}),"
                              f" got {len(given)}")
        lengths, lengths_mm, all_ids = [], [], []
        for name, n, mm, ids in zip(subjects, self.lengths, self.lengths_mm, given, strict=True):
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
            ids = np.arange(n.size, dtype=np.int64) if ids is None else np.array(ids, np.int64)
            if ids.shape != n.shape:
                raise ConfigError(f"SplitIndex[{name}].ids: expected {n.size} ids (one per "
                                  f"streamline), got shape {ids.shape}")
            for array in (n, mm, ids):
                array.flags.writeable = False
            lengths.append(n)
            lengths_mm.append(mm)
            all_ids.append(ids)
        object.__setattr__(self, "ids", tuple(all_ids))
        object.__setattr__(self, "subjects", subjects)
        object.__setattr__(self, "lengths", tuple(lengths))
        object.__setattr__(self, "lengths_mm", tuple(lengths_mm))

    @property
    def counts(self) -> np.ndarray:
        """(S,) int64 number of streamlines per subject."""
        return np.array([n.size for n in self.lengths], dtype=np.int64)

    def subset(self, positions: tuple[np.ndarray, ...]) -> SplitIndex:
        """The index of the streamlines at ``positions`` (one int array per subject, positions
        in this index, in the order given); their store ids are kept."""
        if len(positions) != len(self.subjects):
            raise ConfigError(f"SplitIndex.subset: expected one positions array per subject "
                              f"({len(self.subjects)}), got {len(positions)}")
        pos = [np.asarray(p, dtype=np.int64) for p in positions]
        return SplitIndex(self.split, self.group, self.subjects,
                          tuple(n[p] for n, p in zip(self.lengths, pos, strict=True)),
                          tuple(mm[p] for mm, p in zip(self.lengths_mm, pos, strict=True)),
                          tuple(i[p] for i, p in zip(self.ids, pos, strict=True)))


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
