"""The operator's watch-fed view of every ImageBatchShard it may see, by namespace and job UID.

Listing a job's shards on every pass costs the whole job each time (4,000 shards: megabytes and
seconds of API server time, every `--interval`, for every job). Instead the operator lists once
per watched namespace (or the cluster) and then follows a watch (imagebatch.shardstore: list,
watch with bookmarks, 410 Gone or an ERROR event lists again, the server ending the watch
watches again, a dropped connection or a 5xx the same after a backoff); a pass reads its job's
shards from memory. The view is a hint, as everywhere: every shard write is fenced by its
resourceVersion, so a pass that acts on a stale entry gets a conflict and sees the change next time.

Until its first list is in, and whenever a watch broke until the next list is in, `shards()`
says None and the caller lists instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import kubernetes

from imagebatch.names import LABEL_JOB_UID
from imagebatch.shardclient import ShardClient
from imagebatch.shardstore import RelistError, ShardStore

JSON = dict[str, Any]
__all__ = ["RelistError", "ShardInformer", "apply_event", "replace"]


def _slim(shard: JSON) -> JSON:
    # managedFields are most of a shard's bytes and no pass reads them.
    meta = {k: v for k, v in (shard.get("metadata") or {}).items() if k != "managedFields"}
    return {**shard, "metadata": meta}


def _state(shard: JSON | None) -> str | None:
    return None if shard is None else str((shard.get("status") or {}).get("state") or "Pending")


def _key(obj: JSON) -> tuple[str, str] | None:
    meta = obj.get("metadata") or {}
    uid, name = (meta.get("labels") or {}).get(LABEL_JOB_UID), meta.get("name")
    return (str(uid), str(name)) if uid and name else None


class _Scope(ShardStore):
    """One namespace (or "" for the cluster): its shards by job UID, and where its watch is.

    A change is a change of a shard's state (added, deleted, claimed, done, ...): that job needs
    a pass now. A lease renewal or a progress report changes no state, so the operator's passes
    do not grow with the workers' writes."""

    def __init__(self, namespace: str, client: ShardClient | None = None) -> None:
        super().__init__(
            None if client is None else lambda until: client.list_shards(namespace, until=until),
            None if client is None else lambda since, until: client.watch(namespace, since, until=until),
            # Any broken watch: passes list for themselves until a new list is in.
            serve_while_resuming=False,
            name=f"shards-{namespace or 'all'}",
        )
        self.namespace = namespace
        self.by_uid: dict[str, dict[str, JSON]] = {}

    def _clear(self) -> None:
        self.by_uid = {}

    def _put(self, obj: JSON) -> bool:
        key = _key(obj)
        if key is None:
            return False
        shards = self.by_uid.setdefault(key[0], {})
        before = _state(shards.get(key[1]))
        shards[key[1]] = _slim(obj)
        return _state(obj) != before

    def _drop(self, obj: JSON) -> bool:
        key = _key(obj)
        shards = self.by_uid.get(key[0]) if key is not None else None
        if key is None or shards is None or shards.pop(key[1], None) is None:
            return False
        if not shards:
            self.by_uid.pop(key[0], None)
        return True


def apply_event(scope: _Scope, event: JSON) -> str | None:
    """One watch event into the scope; the job UID whose shards changed state, if any."""
    changed = scope.apply(event)
    key = None if changed is None else _key(changed)
    return None if key is None else key[0]


def replace(scope: _Scope, items: Iterable[JSON], resource_version: str) -> None:
    scope.replace(items, resource_version)


class ShardInformer:
    def __init__(self, api: kubernetes.client.ApiClient, namespaces: list[str]) -> None:
        client = ShardClient(kubernetes.client.CustomObjectsApi(api))
        self.scopes = [_Scope(ns, client) for ns in namespaces] or [_Scope("", client)]
        # Called (from a watch thread) with the UID of a job whose shards changed state.
        self.on_change: Callable[[str], None] | None = None
        for scope in self.scopes:
            scope.on_change = self._changed

    def _changed(self, shard: JSON) -> None:
        key = _key(shard)
        if key is not None and self.on_change is not None:
            self.on_change(key[0])

    def start(self) -> None:
        for scope in self.scopes:
            scope.start()

    def stop(self) -> None:
        for scope in self.scopes:
            scope.close()

    def shards(self, ns: str, uid: str) -> list[JSON] | None:
        """This job's shards as last seen; None until the namespace's first list is in."""
        for scope in self.scopes:
            if scope.namespace in ("", ns):
                with scope.lock:
                    if not scope.synced:
                        return None
                    return [
                        s for s in scope.by_uid.get(uid, {}).values() if s["metadata"].get("namespace") == ns
                    ]
        return None
