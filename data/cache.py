"""A least-recently-used cache bounded by bytes, not by item count."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

import numpy as np


class ByteLRU:
    """LRU cache of numpy arrays whose total ``nbytes`` stays within ``max_bytes``.

    An item larger than the whole budget is returned but not kept. ``max_bytes=None`` means
    unbounded.
    """

    def __init__(self, max_bytes: int | None) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list:
        return list(self._items)

    def get(self, key: Hashable, load: Callable[[], np.ndarray]) -> np.ndarray:
        """Cached value of ``key``, calling ``load()`` on a miss."""
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        self.misses += 1
        value = load()
        self.put(key, value)
        return value

    def put(self, key: Hashable, value: np.ndarray) -> None:
        if key in self._items:
            self.nbytes -= self._items.pop(key).nbytes
        if self.max_bytes is not None and value.nbytes > self.max_bytes:
            return
        self._items[key] = value
        self.nbytes += value.nbytes
        while self.max_bytes is not None and self.nbytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.nbytes -= old.nbytes
            self.evictions += 1

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0
