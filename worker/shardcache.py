"""A worker's watch-fed view of its job's shards: listed once, then kept by a watch.

A claim then costs the same with 40 shards or 40,000: the worker picks from this cache and
writes one shard (fenced by its resourceVersion: a conflict means another worker won, and the
watch brings the new version); it never lists the job's shards to find one. An idle worker
sleeps until the watch brings a change instead of listing every few seconds.

    list (label selector of the job's UID) -> the shards and a resourceVersion
    watch from it (with bookmarks): ADDED / MODIFIED put the shard, DELETED drops it,
        BOOKMARK moves the resourceVersion, ERROR (410 Gone: it is too old) relists
    the server ends the watch (timeoutSeconds): watch again from the last resourceVersion
    a dropped connection, a read timeout, a 5xx: the same, after a backoff (tenacity); a
        version too old by then is answered 410: relist

Every change bumps `version` and wakes the waiters (a threading.Condition). The cache is only a
hint: every write is fenced by the API server, so a stale entry costs one refused write.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import urllib3
from kubernetes.client.exceptions import ApiException
from tenacity import Retrying, retry_if_exception, stop_when_event_set

from imagebatch.errors import ImageBatchError
from imagebatch.shardplan import of_incarnation
from imagebatch.worker import claims
from imagebatch.worker.kube import WaitRetryAfter, is_transient

log = logging.getLogger(__name__)

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
    holder: str | None

    @classmethod
    def of(cls, shard: JSON) -> Entry:
        # The two fields straight from the JSON (a shard just created has no status: Pending):
        # every worker reads every shard write, and a claim validates the status it writes anyway.
        st = shard.get("status") or {}
        return cls(shard, int(shard["spec"]["index"]), str(st.get("state") or "Pending"), st.get("holder"))


CONNECTION_ERRORS = (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)


class RelistError(Exception):
    """The watch cannot go on from where it is (410 Gone, an ERROR event): list again."""


def _rv(obj: JSON) -> str | None:
    rv = (obj.get("metadata") or {}).get("resourceVersion")
    return str(rv) if rv else None


def _newer(new: str | None, old: str | None) -> bool:
    """Whether `new` is a later version than `old`. resourceVersions are opaque, but etcd's are
    integers: comparing them keeps a write's own answer (observe) from being undone by an older
    event still on its way. Anything else is taken as newer, as the watch delivers in order."""
    if new is None or old is None or not (new.isdigit() and old.isdigit()):
        return True
    return int(new) > int(old)


def _retryable(err: BaseException) -> bool:
    """What the watch thread lives through: all but the API's refusals (403: the ServiceAccount may
    not list or watch shards; 404: no such resource), which no retry can change."""
    if isinstance(err, RelistError):
        return True
    if isinstance(err, ApiException):
        return err.status == 410 or is_transient(err)
    return True  # a dropped connection, a timeout, a cut-off line: relist


class ShardCache:
    def __init__(self, kube: ShardSource, uid: str, pod: str = "") -> None:
        self.kube = kube
        self.uid = uid
        self.pod = pod  # whose claim order (claims.rank) candidates() follows
        self._cond = threading.Condition()
        self._entries: dict[str, Entry] = {}
        self._pending: dict[str, Entry] = {}
        self._claimed: dict[str, str | None] = {}  # name -> holder
        # Pending shards by the pod's rank, so a claim finds its best few in O(log n). Entries
        # that stopped being Pending are dropped lazily, when they come up.
        self._ranked: list[tuple[bytes, str]] = []
        self._queued: set[str] = set()
        self._rv: str | None = None  # where the next watch starts; None: list first
        self.version = 0  # bumped on every change; waiters compare it
        self.synced = False
        self.error: BaseException | None = None
        self.lists = 0
        self.events = 0
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what the API brings: the state changes (pure but for the lock; tested as a table) ----
    def replace(self, shards: list[JSON], resource_version: str) -> None:
        """A fresh list: the whole state, and where its watch starts."""
        with self._cond:
            self._entries.clear()
            self._pending.clear()
            self._claimed.clear()
            self._ranked.clear()
            self._queued.clear()
            for s in shards:
                if of_incarnation(s, self.uid):
                    self._set(Entry.of(s))
            self._rv = resource_version
            self.synced = True
            self.lists += 1
            self._changed()

    def apply(self, event: JSON) -> None:
        """One watch event. Raises RelistError when the watch cannot go on (an ERROR event)."""
        kind = event.get("type")
        obj: JSON = event.get("object") or {}
        with self._cond:
            self.events += 1
            if kind == "ERROR":
                # 410 Gone (the version fell out of the server's window) or any other error
                # the server reports in the stream: only a fresh list is sure to be right.
                self._rv = None
                raise RelistError(f"{obj.get('code')} {obj.get('reason')}: {obj.get('message')}")
            if kind == "BOOKMARK":
                self._rv = _rv(obj) or self._rv
                return
            if kind in ("ADDED", "MODIFIED"):
                self._put(obj)
            elif kind == "DELETED" and self._drop(obj["metadata"]["name"]):
                self._changed()
            self._rv = _rv(obj) or self._rv

    def lost_race(self, shard: JSON) -> None:
        """A write from this version of the shard was refused (409): someone else wrote it since.
        Not Pending to this cache until the watch brings the newer version, so the claim loop
        does not try it again meanwhile."""
        with self._cond:
            e = self._entries.get(shard["metadata"]["name"])
            if e is not None and _rv(e.shard) == _rv(shard):
                self._pending.pop(shard["metadata"]["name"], None)

    def merge(self, shards: list[JSON]) -> None:
        """A fresh list that disagrees with the cache: each shard put if newer than the cache's."""
        with self._cond:
            for s in shards:
                self._put(s)

    def observe(self, shard: JSON) -> None:
        """A shard as the API answered a write: known now, before its watch event comes."""
        with self._cond:
            self._put(shard)

    def _put(self, obj: JSON) -> None:
        name = obj["metadata"]["name"]
        old = self._entries.get(name)
        if not of_incarnation(obj, self.uid):
            if self._drop(name):
                self._changed()
            return
        if old is not None and not _newer(_rv(obj), _rv(old.shard)):
            return
        self._drop(name)
        self._set(Entry.of(obj))
        self._changed()

    def _set(self, e: Entry) -> None:
        name = e.shard["metadata"]["name"]
        self._entries[name] = e
        if e.state == "Pending":
            self._pending[name] = e
            if name not in self._queued:
                heapq.heappush(self._ranked, (claims.rank(self.pod, name), name))
                self._queued.add(name)
        elif e.state == "Claimed":
            self._claimed[name] = e.holder

    def _drop(self, name: str) -> bool:
        self._pending.pop(name, None)
        self._claimed.pop(name, None)
        return self._entries.pop(name, None) is not None

    def _changed(self) -> None:
        self.version += 1
        self._cond.notify_all()

    # -- what the claim loop asks ---------------------------------------------------------------
    def pending(self) -> list[JSON]:
        """Pending shards in index order (O(pending), not O(shards))."""
        with self._cond:
            entries = sorted(self._pending.values(), key=lambda e: e.index)
        return [e.shard for e in entries]

    def candidates(self, k: int) -> list[JSON]:
        """The `k` Pending shards this pod ranks first (claims.ranked's order), in O(k log n)."""
        with self._cond:
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
        with self._cond:
            return len(self._pending)

    def claimed_by_others(self, holder: str) -> bool:
        with self._cond:
            return any(h != holder for h in self._claimed.values())

    def shards(self) -> list[JSON]:
        with self._cond:
            return [e.shard for e in self._entries.values()]

    def resource_version(self) -> str | None:
        with self._cond:
            return self._rv

    def wait(self, since: int, timeout: float) -> int:
        """Waits until `version` passes `since` (a change came), the cache failed or closed, or
        `timeout`; returns the version."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.version <= since and self.error is None and not self._closed.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
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

    # -- the watch thread -----------------------------------------------------------------------
    def start(self) -> ShardCache:
        self._thread = threading.Thread(target=self._run, name="shard-watch", daemon=True)
        self._thread.start()
        return self

    def wait_synced(self, timeout: float | None = None) -> None:
        """Blocks until the first list arrived (or the watch failed: raised)."""
        with self._cond:
            self._cond.wait_for(
                lambda: self.synced or self.error is not None or self._closed.is_set(), timeout
            )
        self.check()

    def close(self) -> None:
        self._closed.set()
        with self._cond:
            self._cond.notify_all()

    def _run(self) -> None:
        # Lives as long as the worker (until close()): transient trouble (an API outage) is waited
        # out with backoff, however long; only a refusal ends it, for the claim loop to report.
        retry = Retrying(
            retry=retry_if_exception(_retryable),
            wait=WaitRetryAfter(),
            stop=stop_when_event_set(self._closed),
            sleep=self._pause,
            before_sleep=lambda s: log.warning(
                "shard watch: %s; listing again (attempt %d)",
                s.outcome.exception() if s.outcome else "",
                s.attempt_number,
            ),
            reraise=True,
        )
        try:
            while not self._closed.is_set():
                retry(self._list_and_watch)
        except BaseException as e:
            if not self._closed.is_set():
                log.error("shard watch stopped: %s", e)
                with self._cond:
                    self.error = e
                    self._cond.notify_all()

    def _pause(self, seconds: float) -> None:
        self._closed.wait(seconds)  # close() cuts a backoff short

    def _list_and_watch(self) -> None:
        """One watch, listing first if needed; returns when the server ends the watch."""
        try:
            if self._rv is None:
                shards, listed_at = self.kube.list_shards_at(self.uid, self._closed)
                self.replace(shards, listed_at)
            since = self._rv
            assert since is not None
            for event in self.kube.watch_shards(self.uid, since, self._closed):
                if self._closed.is_set():
                    return
                self.apply(event)
        except ApiException as e:
            if e.status == 410:
                self._rv = None  # too old to resume from
            raise
        except (RelistError, *CONNECTION_ERRORS):
            # A dropped connection or a silent one (a stopped server): resume from the last
            # version seen, as client-go's reflector does; the server says 410 if it is too old.
            raise
        except Exception:
            self._rv = None  # something unreadable in the stream: only a list is sure
            raise
