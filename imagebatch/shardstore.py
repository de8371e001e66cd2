"""The one list/watch/relist core of a watch-fed view of ImageBatchShards.

The operator's informer (every shard of a namespace or the cluster, by job UID) and the
worker's cache (its job's shards, by label selector) are this loop with their own state:

    list -> the shards and a resourceVersion; watch from it (with bookmarks):
        ADDED / MODIFIED put the shard, DELETED drops it, BOOKMARK moves the version,
        ERROR (410 Gone: the version is too old) -> list again (RelistError);
    the server ending the watch (timeoutSeconds) -> watch again from the last version;
    a dropped connection, a read timeout, a 5xx -> the same after a backoff, as client-go's
        reflector does (a version too old by then is answered 410: list again);
    anything unreadable in the stream -> list again: only a list is sure.

A view is only a hint: every shard write is fenced by its resourceVersion, so acting on a stale
entry costs one refused write. What a side keeps of each shard is its own (`_clear`, `_put`,
`_drop`, under `lock`); what it retries, how long it waits, and whether its view is served
while a broken watch resumes are its parameters.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import urllib3
from kubernetes.client.exceptions import ApiException
from tenacity import Retrying, retry_if_exception, stop_when_event_set, wait_exponential_jitter

log = logging.getLogger(__name__)

JSON = dict[str, Any]
CONNECTION_ERRORS = (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)


class RelistError(Exception):
    """The watch cannot go on from where it is (410 Gone, an ERROR event): list again."""


def version_of(obj: JSON) -> str | None:
    rv = (obj.get("metadata") or {}).get("resourceVersion")
    return str(rv) if rv else None


def newer(new: str | None, old: str | None) -> bool:
    """Whether `new` is a later version than `old`. resourceVersions are opaque, but etcd's are
    integers: comparing them keeps a write's own answer from being undone by an older event
    still on its way. Anything else is taken as newer, as the watch delivers in order."""
    if new is None or old is None or not (new.isdigit() and old.isdigit()):
        return True
    return int(new) > int(old)


def _retry_all(err: BaseException) -> bool:
    return True


class ShardStore:
    """A view kept by list and watch. Subclasses keep the shards (`_clear`, `_put`, `_drop`,
    each under `lock` and returning whether the view changed) and may react to a change
    (`_changed`, under the lock; `on_change`, outside it, from the watch thread).

    `lister(until)` lists: (shards, resourceVersion); `watcher(version, until)` watches from it.
    `retry(err)`: whether the watch thread lives through `err` (else it stops and keeps it in
    `error`); `wait`: tenacity's wait between tries. `serve_while_resuming`: whether the view is
    still served (`synced`) while a broken watch resumes from its last version; False: any
    broken watch unsyncs the view until a fresh list is in (its users list for themselves)."""

    def __init__(
        self,
        lister: Callable[[threading.Event], tuple[list[JSON], str]] | None = None,
        watcher: Callable[[str, threading.Event], Iterable[JSON]] | None = None,
        *,
        retry: Callable[[BaseException], bool] = _retry_all,
        wait: Any = None,
        serve_while_resuming: bool = True,
        name: str = "shards",
    ) -> None:
        self.lister, self.watcher = lister, watcher
        self.retry, self.serve_while_resuming, self.name = retry, serve_while_resuming, name
        self.wait_strategy = wait if wait is not None else wait_exponential_jitter(multiplier=0.5, max=30)
        self.lock = threading.Condition()
        self.resource_version: str | None = None  # where the next watch starts; None: list first
        self.synced = False
        self.error: BaseException | None = None  # what stopped the watch thread for good
        self.lists = 0
        self.events = 0
        # Called from the watch thread, outside the lock, with each shard whose change mattered.
        self.on_change: Callable[[JSON], None] | None = None
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what a side keeps (under the lock) ----------------------------------------------------------
    def _clear(self) -> None:
        raise NotImplementedError

    def _put(self, obj: JSON) -> bool:
        raise NotImplementedError

    def _drop(self, obj: JSON) -> bool:
        raise NotImplementedError

    def _changed(self) -> None:
        """The view changed (a list, or an event that mattered): under the lock."""

    # -- what the API brings (pure but for the view; tested as tables) -------------------------------
    def replace(self, shards: Iterable[JSON], resource_version: str) -> None:
        """A fresh list: the whole view, and where its watch starts."""
        with self.lock:
            self._clear()
            for s in shards:
                self._put(s)
            self.resource_version = resource_version
            self.synced = True
            self.lists += 1
            self._changed()

    def apply(self, event: JSON) -> JSON | None:
        """One watch event; returns the shard if the view changed for it. Raises RelistError when
        the watch cannot go on (an ERROR event)."""
        kind = event.get("type")
        obj: JSON = event.get("object") or {}
        with self.lock:
            self.events += 1
            if kind == "ERROR":
                # 410 Gone (the version fell out of the server's window) or any other error the
                # server reports in the stream: only a fresh list is sure to be right.
                self.resource_version = None
                raise RelistError(f"{obj.get('code')} {obj.get('reason')}: {obj.get('message')}")
            changed = False
            if kind in ("ADDED", "MODIFIED"):
                changed = self._put(obj)
            elif kind == "DELETED":
                changed = self._drop(obj)
            self.resource_version = version_of(obj) or self.resource_version
            if changed:
                self._changed()
        return obj if changed else None

    # -- the watch thread ----------------------------------------------------------------------------
    def start(self) -> ShardStore:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()
        with self.lock:
            self.lock.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def _run(self) -> None:
        # Lives until close(): transient trouble (an API outage) is waited out with backoff,
        # however long; only what `retry` refuses ends it, kept in `error` for the users.
        retrying = Retrying(
            retry=retry_if_exception(self.retry),
            wait=self.wait_strategy,
            stop=stop_when_event_set(self._closed),
            sleep=self._pause,
            before_sleep=lambda s: log.warning(
                "%s: the watch ended (%s); listing or watching again (attempt %d)",
                self.name,
                s.outcome.exception() if s.outcome else "",
                s.attempt_number,
            ),
            reraise=True,
        )
        try:
            while not self._closed.is_set():
                retrying(self._list_and_watch)
        except BaseException as e:
            if not self._closed.is_set():
                log.error("%s: the watch stopped: %s", self.name, e)
                with self.lock:
                    self.error = e
                    self.lock.notify_all()

    def _pause(self, seconds: float) -> None:
        self._closed.wait(seconds)  # close() cuts a backoff short

    def _list_and_watch(self) -> None:
        """One watch, listing first if needed; returns when the server ends the watch."""
        assert self.lister is not None and self.watcher is not None
        try:
            if self.resource_version is None or not self.synced:
                shards, listed_at = self.lister(self._closed)
                self.replace(shards, listed_at)
                log.info("%s: listed %d", self.name, len(shards))
            since = self.resource_version
            assert since is not None
            for event in self.watcher(since, self._closed):
                if self._closed.is_set():
                    return
                changed = self.apply(event)
                if changed is not None and self.on_change is not None:
                    self.on_change(changed)
        except ApiException as e:
            if e.status == 410:
                self.resource_version = None  # too old to resume from
            self._broken()
            raise
        except (RelistError, *CONNECTION_ERRORS):
            # A dropped connection or a silent one (a stopped server): resume from the last
            # version seen; the server says 410 if it is too old.
            self._broken()
            raise
        except Exception:
            self.resource_version = None  # something unreadable in the stream: only a list is sure
            self._broken()
            raise

    def _broken(self) -> None:
        if not self.serve_while_resuming:
            with self.lock:
                self.synced = False
