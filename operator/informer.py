"""The operator's watch-fed view of every ImageBatchShard it may see, by namespace and job UID.

Listing a job's shards on every pass costs the whole job each time (4,000 shards: megabytes and
seconds of API server time, every `--interval`, for every job). Instead the operator lists once
per watched namespace (or the cluster) and then follows a watch; a pass reads its job's shards
from memory. The view is a hint, as everywhere: every shard write is fenced by its
resourceVersion, so a pass that acts on a stale entry gets a conflict and sees the change next time.

    list -> every shard and a resourceVersion; watch from it (with bookmarks):
    ADDED / MODIFIED put, DELETED drops, BOOKMARK moves the version;
    410 Gone (the version is too old) or an ERROR event -> list again;
    the server ending the watch (timeoutSeconds) -> watch again from the last version;
    a dropped connection or a 5xx -> the same, after a backoff (tenacity).

Until its first list is in, `shards()` says None and the caller lists instead.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException
from tenacity import Retrying, retry_if_exception_type, stop_when_event_set, wait_exponential_jitter

from imagebatch.api import GROUP, VERSION
from imagebatch.kubeclient import WATCH_READ_TIMEOUT, WATCH_SECONDS
from imagebatch.names import LABEL_JOB_UID, SHARD_PLURAL

log = logging.getLogger(__name__)
JSON = dict[str, Any]


class RelistError(Exception):
    """The watch cannot go on from its version: list again."""


class _Scope:
    """One namespace (or "" for the cluster): its shards by job UID, and where its watch is."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.by_uid: dict[str, dict[str, JSON]] = {}
        self.resource_version: str | None = None
        self.synced = False


def _slim(shard: JSON) -> JSON:
    # managedFields are most of a shard's bytes and no pass reads them.
    meta = {k: v for k, v in (shard.get("metadata") or {}).items() if k != "managedFields"}
    return {**shard, "metadata": meta}


def _state(shard: JSON | None) -> str | None:
    return None if shard is None else str((shard.get("status") or {}).get("state") or "Pending")


def apply_event(scope: _Scope, event: JSON) -> str | None:
    """One watch event into the scope (pure but for the scope it changes; tested as a table).

    Returns the job UID whose shards changed state (added, deleted, claimed, done, ...): that job
    needs a pass now. A lease renewal or a progress report changes no state and returns None, so
    the operator's passes do not grow with the workers' writes."""
    kind, obj = event.get("type"), event.get("object") or {}
    if kind == "ERROR":
        raise RelistError(str(obj.get("message") or obj))
    rv = (obj.get("metadata") or {}).get("resourceVersion")
    if rv:
        scope.resource_version = str(rv)
    if kind == "BOOKMARK":
        return None
    meta = obj.get("metadata") or {}
    uid = (meta.get("labels") or {}).get(LABEL_JOB_UID)
    name = meta.get("name")
    if not uid or not name:
        return None
    shards = scope.by_uid.setdefault(uid, {})
    before = _state(shards.get(name))
    if kind == "DELETED":
        shards.pop(name, None)
        if not shards:
            scope.by_uid.pop(uid, None)
        return str(uid)
    if kind in ("ADDED", "MODIFIED"):
        shards[name] = _slim(obj)
        return str(uid) if _state(obj) != before else None
    return None


def replace(scope: _Scope, items: Iterable[JSON], resource_version: str) -> None:
    scope.by_uid = {}
    for s in items:
        apply_event(scope, {"type": "ADDED", "object": s})
    scope.resource_version = resource_version
    scope.synced = True


class ShardInformer:
    def __init__(self, api: kubernetes.client.ApiClient, namespaces: list[str]) -> None:
        self.custom = kubernetes.client.CustomObjectsApi(api)
        self.scopes = [_Scope(ns) for ns in namespaces] or [_Scope("")]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # Called (from the watch thread) with the UID of a job whose shards changed state.
        self.on_change: Callable[[str], None] | None = None

    def start(self) -> None:
        for scope in self.scopes:
            t = threading.Thread(target=self._run, args=(scope,), name=f"shards-{scope.namespace or 'all'}")
            t.daemon = True
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()

    def shards(self, ns: str, uid: str) -> list[JSON] | None:
        """This job's shards as last seen; None until the namespace's first list is in."""
        for scope in self.scopes:
            if scope.namespace in ("", ns):
                with self._lock:
                    if not scope.synced:
                        return None
                    return [
                        s for s in scope.by_uid.get(uid, {}).values() if s["metadata"].get("namespace") == ns
                    ]
        return None

    # -- the watch thread -------------------------------------------------------------------------
    def _run(self, scope: _Scope) -> None:
        retrying = Retrying(
            retry=retry_if_exception_type(Exception),
            wait=wait_exponential_jitter(initial=0.5, max=30),
            stop=stop_when_event_set(self._stop),
            reraise=False,
        )
        for attempt in retrying:
            with attempt:
                self._follow(scope)

    def _lister(self, scope: _Scope) -> tuple[Any, tuple[Any, ...]]:
        """The list call of the scope (a watch is the same call with watch=true) and its arguments."""
        if scope.namespace:
            return self.custom.list_namespaced_custom_object, (GROUP, VERSION, scope.namespace, SHARD_PLURAL)
        return self.custom.list_cluster_custom_object, (GROUP, VERSION, SHARD_PLURAL)

    def _follow(self, scope: _Scope) -> None:
        """Lists if it must, then watches until the server ends the watch; raises to back off."""
        while not self._stop.is_set():
            func, args = self._lister(scope)
            if scope.resource_version is None or not scope.synced:
                listed: JSON = json.loads(func(*args, _preload_content=False).data)
                with self._lock:
                    replace(scope, listed.get("items") or [], str(listed["metadata"]["resourceVersion"]))
                log.info(
                    "shards%s: listed %d",
                    f" in {scope.namespace}" if scope.namespace else "",
                    sum(len(v) for v in scope.by_uid.values()),
                )
            kwargs: JSON = {
                "resource_version": scope.resource_version,
                "allow_watch_bookmarks": True,
                "timeout_seconds": WATCH_SECONDS,  # then the informer watches again from its version
                "_request_timeout": WATCH_READ_TIMEOUT,  # not REQUEST_TIMEOUT: that cut quiet watches
            }
            try:
                for event in kubernetes.watch.Watch().stream(func, *args, **kwargs):
                    with self._lock:
                        changed = apply_event(scope, event)
                    if changed is not None and self.on_change is not None:
                        self.on_change(changed)
                    if self._stop.is_set():
                        return
            except Exception as e:
                # Whatever ended the watch (410 Gone, a dropped connection, a refusal), the view may
                # miss changes from now on: passes list for themselves until a new list is in.
                with self._lock:
                    scope.synced = False
                if isinstance(e, RelistError) or (isinstance(e, ApiException) and e.status == 410):
                    log.info("shards: watch from %s is gone (%s); listing again", scope.resource_version, e)
                    continue
                log.warning(
                    "shards: the watch ended (%s: %s); listing again after a pause", type(e).__name__, e
                )
                raise
