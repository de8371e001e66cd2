"""A worker's watch-fed view of its job's shards: listed once, then kept by a watch.

A claim then costs the same with 40 shards or 40,000: the worker picks from this cache and
writes one shard (fenced by its resourceVersion: a conflict means another worker won, and the
watch brings the new version); it never lists the job's shards to find one. An idle worker
sleeps until the watch brings a change instead of listing every few seconds.

The list (label selector of the job's UID), the watch from its resourceVersion and what ends
a watch are imagebatch.shardstore's; here: what the claim loop asks of the shards, and that
the watch lives through everything but the API's refusals (403, 404), backing off as the
worker's API calls do (honouring Retry-After).

Every change bumps `version` and wakes the waiters (a threading.Condition). The cache is only a
hint: every write is fenced by the API server, so a stale entry costs one refused write.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from kubernetes.client.exceptions import ApiException

from imagebatch.errors import ImageBatchError
from imagebatch.shardplan import of_incarnation
from imagebatch.shardstore import RelistError, ShardStore, newer, version_of
from imagebatch.worker import claims
from imagebatch.worker.kube import WaitRetryAfter, is_transient

__all__ = ["Entry", "RelistError", "ShardCache", "ShardSource"]

JSON = dict[str, Any]


class ShardSource(Protocol):
    ns: str
    job: str

    def list_shards_at(self, uid: str, until: threading.Event | None = None) -> tuple[list[JSON], str]: ...

    def watch_shards(
        self, uid: str, resource_version: str, until: threading.Event | None = None
    ) -> Iterator[JSON]: ...


@dataclass(frozen=True)
class Entry:
    """A shard as last seen, with what the claim loop asks of it read once."""

    shard: JSON
    index: int
    state: str

    @classmethod
    def of(cls, shard: JSON) -> Entry:
        # The fields straight from the JSON (a shard just created has no status: Pending):
        # every worker reads every shard write, and a claim validates the status it writes anyway.
        st = shard.get("status") or {}
        return cls(shard, int(shard["spec"]["index"]), str(st.get("state") or "Pending"))


def _retryable(err: BaseException) -> bool:
    """What the watch thread lives through: all but the API's refusals (403: the ServiceAccount may
    not list or watch shards; 404: no such resource), which no retry can change."""
    if isinstance(err, RelistError):
        return True
    if isinstance(err, ApiException):
        return err.status == 410 or is_transient(err)
    return True  # a dropped connection, a timeout, a cut-off line: relist


class ShardCache(ShardStore):
    def __init__(self, kube: ShardSource, uid: str, pod: str = "") -> None:
        super().__init__(
            lambda until: kube.list_shards_at(uid, until),
            lambda since, until: kube.watch_shards(uid, since, until),
            retry=_retryable,
            wait=WaitRetryAfter(),
            name="shard-watch",
        )
        self.kube = kube
        self.uid = uid
        self.pod = pod  # whose claim order (claims.rank) candidates() follows
        self._entries: dict[str, Entry] = {}
        self._pending: dict[str, Entry] = {}
        # Pending shards by the pod's rank, so a claim finds its best few in O(log n). Entries
        # that stopped being Pending are dropped lazily, when they come up.
        self._ranked: list[tuple[bytes, str]] = []
        self._queued: set[str] = set()
        self.version = 0  # bumped on every change; waiters compare it

    # -- what the watch brings (ShardStore's replace and apply; tested as a table) ---------------
    def _clear(self) -> None:
        self._entries.clear()
        self._pending.clear()
        self._ranked.clear()
        self._queued.clear()

    def _put(self, obj: JSON) -> bool:
        name = obj["metadata"]["name"]
        old = self._entries.get(name)
        if not of_incarnation(obj, self.uid):
            return self._drop(obj)
        if old is not None and not newer(version_of(obj), version_of(old.shard)):
            return False
        self._drop(obj)
        self._set(Entry.of(obj))
        return True

    def _drop(self, obj: JSON) -> bool:
        name = obj["metadata"]["name"]
        self._pending.pop(name, None)
        return self._entries.pop(name, None) is not None

    def _changed(self) -> None:
        self.version += 1
        self.lock.notify_all()

    def _set(self, e: Entry) -> None:
        name = e.shard["metadata"]["name"]
        self._entries[name] = e
        if e.state == "Pending":
            self._pending[name] = e
            if name not in self._queued:
                heapq.heappush(self._ranked, (claims.rank(self.pod, name), name))
                self._queued.add(name)

    # -- what the worker's own writes and lists tell it -----------------------------------------
    def lost_race(self, shard: JSON) -> None:
        """A write from this version of the shard was refused (409): someone else wrote it since.
        Not Pending to this cache until the watch brings the newer version, so the claim loop
        does not try it again meanwhile."""
        with self.lock:
            e = self._entries.get(shard["metadata"]["name"])
            if e is not None and version_of(e.shard) == version_of(shard):
                self._pending.pop(shard["metadata"]["name"], None)

    def merge(self, shards: list[JSON]) -> None:
        """A fresh list that disagrees with the cache: each shard put if newer than the cache's."""
        with self.lock:
            for s in shards:
                if self._put(s):
                    self._changed()

    def observe(self, shard: JSON) -> None:
        """A shard as the API answered a write: known now, before its watch event comes."""
        with self.lock:
            if self._put(shard):
                self._changed()

    # -- what the claim loop asks ---------------------------------------------------------------
    def pending(self) -> list[JSON]:
        """Pending shards in index order (O(pending), not O(shards))."""
        with self.lock:
            entries = sorted(self._pending.values(), key=lambda e: e.index)
        return [e.shard for e in entries]

    def candidates(self, k: int) -> list[JSON]:
        """The `k` Pending shards this pod ranks first (claims.ranked's order), in O(k log n)."""
        with self.lock:
            best: list[tuple[bytes, str]] = []
            while self._ranked and len(best) < k:
                item = heapq.heappop(self._ranked)
                if item[1] in self._pending:
                    best.append(item)
                else:
                    self._queued.discard(item[1])
            for item in best:
                heapq.heappush(self._ranked, item)
            return [self._pending[name].shard for _, name in best]

    def pending_count(self) -> int:
        with self.lock:
            return len(self._pending)

    def shards(self) -> list[JSON]:
        with self.lock:
            return [e.shard for e in self._entries.values()]

    def wait(self, since: int, timeout: float) -> int:
        """Waits until `version` passes `since` (a change came), the cache failed or closed, or
        `timeout`; returns the version."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while self.version <= since and self.error is None and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.lock.wait(left)
            return self.version

    def check(self) -> None:
        """Raises what stopped the watch for good (the API refused it), naming what to change."""
        err = self.error
        if err is None:
            return
        if isinstance(err, ApiException):
            raise ImageBatchError(
                f"the worker of ImageBatchJob {self.kube.ns}/{self.kube.job} cannot list and watch its "
                f"ImageBatchShards: {err.status} {err.reason}; its ServiceAccount (spec.workers."
                "serviceAccountName, or the one the operator makes) needs get, list and watch on "
                "imagebatchshards"
            ) from err
        raise err

    def start(self) -> ShardCache:
        super().start()
        return self

    def wait_synced(self, timeout: float | None = None) -> None:
        """Blocks until the first list arrived (or the watch failed: raised)."""
        with self.lock:
            self.lock.wait_for(lambda: self.synced or self.error is not None or self.closed, timeout)
        self.check()
