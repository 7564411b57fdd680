"""A bounded LRU map, safe across threads, that never stores what was computed across a
clear (the routing decisions, the plan bodies).

Both caches are keyed without the capabilities they were computed from, so a probe
refresh or a recorded kernel failure clears them. A thread that missed, computed a value
from the old state and stored it after another thread's clear would bring that state
back. ``generation`` counts the clears: a caller reads it before its lookup and hands it
to :meth:`ClearableLRU.put`, which stores nothing if a clear came in between (the value
still serves that caller).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Hashable


class ClearableLRU:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: OrderedDict = OrderedDict()
        self.lock = threading.Lock()
        self.generation = 0

    def get(self, key: Hashable) -> Any:
        """The value under ``key`` (now the most recent), or None."""
        with self.lock:
            value = self.entries.get(key)
            if value is not None:
                self.entries.move_to_end(key)
            return value

    def put(self, key: Hashable, value: Any, generation: int) -> Any:
        """Store ``value`` unless the map was cleared since ``generation``; returns what
        the map now holds under ``key`` (another thread's value if it stored one first),
        or ``value`` when nothing was stored."""
        with self.lock:
            if generation != self.generation:
                return value
            value = self.entries.setdefault(key, value)
            self.entries.move_to_end(key)
            while len(self.entries) > self.capacity:
                self.entries.popitem(last=False)
            return value

    def clear(self) -> None:
        with self.lock:
            self.generation += 1
            self.entries.clear()

    def __len__(self) -> int:
        return len(self.entries)
