"""A work queue of job passes with deduplication, as client-go's workqueue (controller-runtime's
controllers run on one): no tenant waits for another.

- A key (a job's UID) is queued at most once however often it is added: a burst of watch events
  or resync ticks for one job makes one pass, with the newest body.
- A key is never processed by two workers at once; added while it is processed, it is queued
  again when that pass ends (`done`), so no change is missed.
- Workers take keys in the order they were queued, so a job whose pass is slow (a 20,000-shard
  plan, an API call that hangs) holds one worker and only its own key; every other job's passes go
  on in the other workers.

Pure threading, no Kubernetes: tests/unit/test_workqueue.py drives it directly.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class WorkQueue(Generic[K, V]):
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._order: deque[K] = deque()
        self._latest: dict[K, V] = {}  # queued keys (and keys added while processing): newest value
        self._processing: set[K] = set()
        self._closed = False

    def add(self, key: K, value: V) -> None:
        """Queues a pass of `key` with `value` (the newest value wins while it waits)."""
        with self._cond:
            if self._closed:
                return
            new = key not in self._latest
            self._latest[key] = value
            if new and key not in self._processing:
                self._order.append(key)
                self._cond.notify()

    def get(self, timeout: float | None = None) -> tuple[K, V] | None:
        """The next key to process and its newest value; None when closed or after `timeout`."""
        with self._cond:
            while not self._order and not self._closed:
                if not self._cond.wait(timeout):
                    return None
            if self._closed:
                return None
            key = self._order.popleft()
            self._processing.add(key)
            return key, self._latest.pop(key)

    def done(self, key: K) -> None:
        """Ends the pass of `key`; one added meanwhile is queued now."""
        with self._cond:
            self._processing.discard(key)
            if key in self._latest:
                self._order.append(key)
                self._cond.notify()

    def forget(self, key: K) -> None:
        """Drops a queued pass of a key that is gone (a deleted job)."""
        with self._cond:
            if self._latest.pop(key, None) is not None and key not in self._processing:
                self._order.remove(key)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._order)

    def processing(self) -> set[K]:
        with self._cond:
            return set(self._processing)
