"""ImageBatchShards through the Kubernetes API: the one shard client of the operator and the worker.

One return convention: a shard read or written comes back as the API answered it (a dict), or
None when it is gone or the write lost a race (409: someone else wrote since it was read); a
create says whether it created (False: this job's shard of that name exists already); a list
comes back with its resourceVersion, where a watch of it starts. Conflicts and "already exists"
are answers, not errors. One set of errors: NotOwnedError, EarlierIncarnationError (and the
watch's RelistError, imagebatch.shardstore).

How a request is made is the caller's (`call`): the worker retries what an API server under load
or restarting answers, the operator makes each call once (its next pass is its retry).
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes.client.exceptions import ApiException

from imagebatch.api import GROUP, VERSION
from imagebatch.errors import ImageBatchError
from imagebatch.kubeclient import WATCH_READ_TIMEOUT, WATCH_SECONDS
from imagebatch.names import LABEL_JOB_UID, SHARD_PLURAL
from imagebatch.shardplan import forgery, of_incarnation, ownership, shard_selector

JSON = dict[str, Any]
# call(request, until) -> the response: makes the request (retrying it or not) and returns its
# answer; `until` set means its owner closed, so retries end early.
Call = Callable[[Callable[[], Any], threading.Event | None], Any]


def call_once(request: Callable[[], Any], until: threading.Event | None = None) -> Any:
    return request()


class NotOwnedError(ImageBatchError):
    """An object made for a job (a shard, the worker Job, its RBAC) exists and is not the job's:
    never adopt it (it may hold or grant more than the job should get, or count someone else's
    work as this job's)."""

    def __init__(self, kind: str, namespace: str, name: str, job: str) -> None:
        self.kind, self.namespace, self.name, self.job = kind, namespace, name, job
        super().__init__(
            f"{kind} {namespace}/{name} exists and is not owned by ImageBatchJob {job} (no owner reference "
            f"to it); imagebatch does not adopt it: delete or rename that {kind}, or name the job differently"
        )


class EarlierIncarnationError(Exception):
    """An object belongs to an earlier ImageBatchJob of the same name (deleted and re-created):
    the garbage collector is deleting it. Neither adopt it (it was made for another spec) nor
    fail the job: the operator waits for it to go; a worker pod of the earlier job has nothing
    to do."""

    def __init__(self, kind: str, namespace: str, name: str, job: str) -> None:
        self.kind, self.namespace, self.name, self.job = kind, namespace, name, job
        super().__init__(
            f"waiting for the garbage collector to delete {kind} {namespace}/{name}, which belongs to an "
            f"earlier ImageBatchJob {job} (deleted and re-created under the same name)"
        )


def check_owned(obj: JSON, kind: str, ns: str, job: str, uid: str) -> None:
    """Raises unless `obj` is the job's own child (see shardplan.ownership)."""
    whose = ownership(obj, job, uid)
    if whose == "earlier":
        raise EarlierIncarnationError(kind, ns, obj["metadata"]["name"], job)
    if whose == "foreign":
        raise NotOwnedError(kind, ns, obj["metadata"]["name"], job)


def sort_out(shards: list[JSON], uid: str) -> tuple[list[JSON], dict[str, str]]:
    """The job's own shards, and those that carry its UID label but are not its by every other
    name (shardplan.forgery) as {name: why}: never counted, only reported."""
    ours: list[JSON] = []
    forged: dict[str, str] = {}
    for s in shards:
        why = forgery(s, uid)
        if why is None:
            ours.append(s)
        elif (s.get("metadata", {}).get("labels") or {}).get(LABEL_JOB_UID) == uid:
            forged[str(s["metadata"].get("name"))] = why
    return ours, forged


class ShardClient:
    def __init__(self, custom: Any, call: Call = call_once) -> None:
        self.custom = custom  # kubernetes.client.CustomObjectsApi, or a fake of it
        self.call = call
        self.bytes_read = 0  # bytes of API answers (bodies, watch streams): the claim benchmark's

    def _json(self, request: Callable[[], Any], until: threading.Event | None = None) -> Any:
        resp = self.call(request, until)
        self.bytes_read += len(resp.data)
        return json.loads(resp.data)

    def _list(self, ns: str, selector: str | None, **kw: Any) -> Any:
        # ns "": every namespace. A watch is the same call with watch=True.
        if ns:
            return self.custom.list_namespaced_custom_object(
                GROUP, VERSION, ns, SHARD_PLURAL, label_selector=selector, _preload_content=False, **kw
            )
        return self.custom.list_cluster_custom_object(
            GROUP, VERSION, SHARD_PLURAL, label_selector=selector, _preload_content=False, **kw
        )

    def list_shards(
        self, ns: str, selector: str | None = None, until: threading.Event | None = None
    ) -> tuple[list[JSON], str]:
        """The shards of `ns` ("": all namespaces) that match `selector`, and the list's version."""

        def list_shards() -> Any:
            return self._list(ns, selector)

        data = self._json(list_shards, until)
        return list(data.get("items") or []), str(data["metadata"]["resourceVersion"])

    def list_of_job(
        self, ns: str, job: str, uid: str, until: threading.Event | None = None
    ) -> tuple[list[JSON], dict[str, str], str]:
        """The shards of the job with this UID only, never those of an earlier job of that name
        still being deleted nor forged ones (returned apart, see `sort_out`); and the version."""
        items, version = self.list_shards(ns, shard_selector(job, uid), until)
        ours, forged = sort_out(items, uid)
        return ours, forged, version

    def watch(
        self,
        ns: str,
        resource_version: str,
        selector: str | None = None,
        until: threading.Event | None = None,
    ) -> Iterator[JSON]:
        """The watch events (ADDED, MODIFIED, DELETED, BOOKMARK, ERROR) after `resource_version`,
        until the server ends the watch. Opening it goes through `call`; an error while reading it
        is raised (the store resumes or lists again)."""

        def watch_shards() -> Any:
            return self._list(
                ns,
                selector,
                watch=True,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                # Jittered, so 64 workers do not all come back at once.
                timeout_seconds=random.randint(WATCH_SECONDS // 2, WATCH_SECONDS),
                _request_timeout=WATCH_READ_TIMEOUT,  # not REQUEST_TIMEOUT: that cut quiet watches
            )

        resp = self.call(watch_shards, until)
        try:
            buf = b""
            # amt=None: each chunk as it comes (a size would wait for that many bytes of events).
            for chunk in resp.stream(None, decode_content=True):
                self.bytes_read += len(chunk)
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
            if buf.strip():
                yield json.loads(buf)
        finally:
            resp.release_conn()

    def get(self, ns: str, name: str) -> JSON | None:
        def get_shard() -> Any:
            return self.custom.get_namespaced_custom_object(
                GROUP, VERSION, ns, SHARD_PLURAL, name, _preload_content=False
            )

        try:
            data: JSON = self._json(get_shard)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return data

    def create(self, obj: JSON) -> bool:
        """Creates a planned shard; False when this job's shard of that name exists already
        (planned by another worker or an earlier pass). Raises NotOwnedError when the name is
        taken by a shard that is not this job's: adopting it would count someone else's work."""
        meta = obj["metadata"]
        ns, name = meta["namespace"], meta["name"]

        def create_shard() -> Any:
            return self.custom.create_namespaced_custom_object(
                GROUP, VERSION, ns, SHARD_PLURAL, obj, _preload_content=False
            )

        try:
            self.call(create_shard, None)
            return True
        except ApiException as e:
            # A 409 may also be our own create whose answer was lost, retried: the check below
            # finds the shard ours either way.
            if e.status != 409:
                raise
        existing = self.get(ns, name)
        if existing is None:
            return self.create(obj)  # deleted in between: ours to make after all
        owner = meta["ownerReferences"][0]
        if not of_incarnation(existing, owner["uid"]):
            raise NotOwnedError("ImageBatchShard", ns, name, owner["name"])
        return False

    def replace_status(self, shard: JSON, status: JSON) -> JSON | None:
        """Writes a shard's status if the shard has not changed since it was read (the
        resourceVersion it carries, so two writers never both win): the shard as written, or
        None on a conflict or when the shard is gone.

        A write whose answer was lost (a timeout) and that is then refused as a conflict may be
        our own write, applied (a retry of it met its own result): the shard is read back, and if
        it holds exactly this status the write counts as ours."""
        meta = shard["metadata"]
        ns, name = meta["namespace"], meta["name"]
        body = {
            "apiVersion": shard["apiVersion"],
            "kind": shard["kind"],
            "metadata": {"name": name, "namespace": ns, "resourceVersion": meta["resourceVersion"]},
            "spec": shard["spec"],
            "status": status,
        }
        unanswered = False

        def replace_shard_status() -> Any:
            nonlocal unanswered
            try:
                return self.custom.replace_namespaced_custom_object_status(
                    GROUP, VERSION, ns, SHARD_PLURAL, name, body, _preload_content=False
                )
            except Exception as e:
                unanswered = unanswered or not isinstance(e, ApiException) or e.status in (0, 408, 504)
                raise

        try:
            written: JSON = self._json(replace_shard_status)
            return written
        except ApiException as e:
            if e.status not in (404, 409):
                raise
            if e.status == 409 and unanswered:
                current = self.get(ns, name)
                if current is not None and current.get("status") == status:
                    return current
            return None


def client_of(owner: Any, call: Call = call_once) -> ShardClient:
    """`owner`'s ShardClient over its `custom` API, made on first use (tests build an API module
    with __new__ and set `custom` only) and again when `custom` was replaced."""
    client: ShardClient | None = owner.__dict__.get("_shard_client")
    if client is None or client.custom is not owner.custom:
        client = owner.__dict__["_shard_client"] = ShardClient(owner.custom, call)
    return client
