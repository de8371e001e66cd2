"""The operator's only door to the Kubernetes API (the `kubernetes` client; kopf only watches).

Objects go in and out as plain dicts, exactly as the API serves them, so the pure modules never
see client classes. Shards go through the shared shard client (imagebatch.shardclient), each call
made once: the next pass is the retry. Conflicts and "already exists" are answers, not errors: a reconcile that
loses a race simply sees the new state on its next pass.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from imagebatch.api import GROUP, VERSION
from imagebatch.kubeclient import api_client
from imagebatch.names import JOB_PLURAL, LABEL_COMPONENT, LABEL_JOB
from imagebatch.operator.informer import ShardInformer
from imagebatch.shardclient import (
    EarlierIncarnationError,
    NotOwnedError,
    ShardClient,
    check_owned,
    client_of,
    sort_out,
)
from imagebatch.timeutil import format_micro, now_utc

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
COMPONENT = "imagebatch-operator"
KUEUE_GROUP, KUEUE_VERSION, LOCAL_QUEUE_PLURAL = "kueue.x-k8s.io", "v1beta2", "localqueues"
WORKLOAD_PLURAL = "workloads"
JSON = dict[str, Any]
# The shared contract's, here too: the operator's passes catch them from this module.
__all__ = ["EarlierIncarnationError", "NotOwnedError", "OperatorKube", "check_owned"]


def load_client_config() -> kubernetes.client.ApiClient:
    return api_client()


def _json(resp: Any) -> JSON:
    data: JSON = json.loads(resp.data)
    return data


def _status(err: ApiException) -> int:
    return int(err.status or 0)


def _body(err: ApiException) -> str:
    return err.body.decode(errors="replace") if isinstance(err.body, bytes) else str(err.body or "")


class KueueNotInstalledError(Exception):
    """The API server serves no Kueue LocalQueues: Kueue is not installed."""


class OperatorKube:
    def __init__(self, api: kubernetes.client.ApiClient | None = None) -> None:
        self.api = api or load_client_config()
        self.custom = kubernetes.client.CustomObjectsApi(self.api)
        self.batch = kubernetes.client.BatchV1Api(self.api)
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.rbac = kubernetes.client.RbacAuthorizationV1Api(self.api)
        self.shard_informer: ShardInformer | None = None
        # Shards labelled with a job's UID that are not that job's by every other name (see
        # shardplan.forgery): {uid: {shard name: why}}, for the pass to report (never adopt).
        self._forged: dict[str, dict[str, str]] = {}
        self._forged_lock = threading.Lock()

    @property
    def shard_client(self) -> ShardClient:
        return client_of(self)

    def _ours(self, shards: list[JSON], uid: str) -> list[JSON]:
        ours, forged = sort_out(shards, uid)
        self._remember_forged(uid, forged)
        return ours

    def _remember_forged(self, uid: str, forged: dict[str, str]) -> None:
        with self._forged_lock:
            if forged:
                self._forged[uid] = forged
            else:
                self._forged.pop(uid, None)

    def forged_shards(self, uid: str) -> dict[str, str]:
        """Shards the last listing of this job ignored as forged: {name: why}."""
        with self._forged_lock:
            return dict(self._forged.get(uid, {}))

    def start_informers(self, namespaces: list[str]) -> None:
        """Follows the shards of the watched namespaces (all when empty) by watch from now on."""
        self.shard_informer = ShardInformer(self.api, namespaces)
        self.shard_informer.start()

    # -- ImageBatchJob ---------------------------------------------------------------------------
    def list_jobs(self, namespaces: list[str]) -> list[JSON]:
        """ImageBatchJobs in the watched namespaces (all when the list is empty)."""
        if not namespaces:
            resp = self.custom.list_cluster_custom_object(GROUP, VERSION, JOB_PLURAL, _preload_content=False)
            items: list[JSON] = _json(resp).get("items", [])
            return items
        out: list[JSON] = []
        for ns in namespaces:
            resp = self.custom.list_namespaced_custom_object(
                GROUP, VERSION, ns, JOB_PLURAL, _preload_content=False
            )
            out += _json(resp).get("items", [])
        return out

    def patch_job_status(self, ns: str, name: str, status: JSON) -> None:
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, ns, JOB_PLURAL, name, {"status": status}, _content_type=MERGE_PATCH
        )

    def delete_job(self, ns: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, ns, JOB_PLURAL, name, propagation_policy="Background"
            )
        except ApiException as e:
            if _status(e) != 404:
                raise

    # -- ImageBatchShard -------------------------------------------------------------------------
    def list_shards(self, ns: str, job: str, uid: str, fresh: bool = False) -> list[JSON]:
        """The shards of the job with this UID only (not those of an earlier job of that name):
        from the watch-fed informer when it runs and has listed, else (or `fresh`) from a LIST."""
        if self.shard_informer is not None and not fresh:
            cached = self.shard_informer.shards(ns, uid)
            if cached is not None:
                return self._ours(cached, uid)
        ours, forged, _ = self.shard_client.list_of_job(ns, job, uid)
        self._remember_forged(uid, forged)
        return ours

    def create_shard(self, obj: JSON) -> bool:
        """Creates a planned shard; False if this job's shard of that name exists already (planned
        by a worker or an earlier pass). Raises NotOwnedError if the name is taken by a shard that
        is not this job's: adopting it would count someone else's work as this job's."""
        return self.shard_client.create(obj)

    def create(self, obj: JSON) -> bool:
        """Creates any object this operator owns; False if it exists already."""
        try:
            self._create(obj)
            return True
        except ApiException as e:
            if _status(e) == 409:
                return False
            raise

    def _create(self, obj: JSON) -> None:
        ns = obj["metadata"]["namespace"]
        kind = obj["kind"]
        if kind == "Job":
            self.batch.create_namespaced_job(ns, obj)
        elif kind == "ServiceAccount":
            self.core.create_namespaced_service_account(ns, obj)
        elif kind == "Role":
            self.rbac.create_namespaced_role(ns, obj)
        elif kind == "RoleBinding":
            self.rbac.create_namespaced_role_binding(ns, obj)
        else:
            raise ValueError(f"cannot create a {kind}")

    def ensure_owned(self, obj: JSON) -> None:
        """Creates a job's ServiceAccount, Role or RoleBinding, or checks that the existing one is
        the job's own (owner reference to the job's UID) and brings a Role's rules up to date (a
        ConfigMap source may have changed). Raises NotOwnedError for anyone else's object, and
        EarlierIncarnationError for one of an earlier job of the same name."""
        if self.create(obj):
            return
        meta = obj["metadata"]
        ns, name, kind = meta["namespace"], meta["name"], obj["kind"]
        read = {
            "ServiceAccount": self.core.read_namespaced_service_account,
            "Role": self.rbac.read_namespaced_role,
            "RoleBinding": self.rbac.read_namespaced_role_binding,
        }[kind]
        existing = _json(read(name, ns, _preload_content=False))
        owner = meta["ownerReferences"][0]
        check_owned(existing, kind, ns, owner["name"], owner["uid"])
        if kind == "Role" and existing.get("rules") != obj["rules"]:
            self.rbac.patch_namespaced_role(name, ns, {"rules": obj["rules"]}, _content_type=MERGE_PATCH)

    def replace_shard_status(self, shard: JSON, status: JSON) -> bool:
        """Writes a shard's status if it has not changed since it was read; False on a conflict
        or when the shard is gone (ShardClient.replace_status)."""
        return self.shard_client.replace_status(shard, status) is not None

    # -- the worker Job and its pods -------------------------------------------------------------
    def get_worker_job(self, ns: str, name: str) -> JSON | None:
        try:
            return _json(self.batch.read_namespaced_job(name, ns, _preload_content=False))
        except ApiException as e:
            if _status(e) == 404:
                return None
            raise

    def patch_worker_job(self, ns: str, name: str, patch: JSON) -> None:
        self.batch.patch_namespaced_job(name, ns, patch, _content_type=MERGE_PATCH)

    def delete_worker_job(self, ns: str, name: str) -> None:
        try:
            self.batch.delete_namespaced_job(name, ns, propagation_policy="Background")
        except ApiException as e:
            if _status(e) != 404:
                raise

    def list_worker_pods(self, ns: str, job: str) -> list[JSON]:
        resp = self.core.list_namespaced_pod(
            ns, label_selector=f"{LABEL_JOB}={job},{LABEL_COMPONENT}=worker", _preload_content=False
        )
        items: list[JSON] = _json(resp).get("items", [])
        return items

    # -- Kueue ------------------------------------------------------------------------------------
    def local_queue_exists(self, ns: str, name: str) -> bool | None:
        """Whether Kueue's LocalQueue exists; None when that cannot be told (the operator may not
        read LocalQueues, an API error): then nothing is claimed about it. Raises
        KueueNotInstalledError when the API server serves no LocalQueues at all."""
        try:
            self.custom.get_namespaced_custom_object(
                KUEUE_GROUP, KUEUE_VERSION, ns, LOCAL_QUEUE_PLURAL, name, _preload_content=False
            )
            return True
        except ApiException as e:
            if _status(e) != 404:
                return None
            # An object's 404 names it (a Status body); an API server without the resource type
            # answers a bare 404 page.
            if f"{LOCAL_QUEUE_PLURAL}.{KUEUE_GROUP}" in _body(e):
                return False
            raise KueueNotInstalledError(str(ns)) from None

    def worker_workloads(self, ns: str, name: str) -> list[JSON]:
        """The Kueue Workloads owned by a Job named `name` (this worker Job's, and any left by an
        earlier one of that name that is still being deleted); [] when they cannot be read."""
        try:
            resp = self.custom.list_namespaced_custom_object(
                KUEUE_GROUP, KUEUE_VERSION, ns, WORKLOAD_PLURAL, _preload_content=False
            )
        except ApiException as e:
            if _status(e) in (403, 404):
                return []  # not allowed to read them, or no Kueue: the message stays general
            raise
        return [
            wl
            for wl in _json(resp).get("items", [])
            if any(
                r.get("kind") == "Job" and r.get("name") == name
                for r in wl["metadata"].get("ownerReferences") or []
            )
        ]

    # -- prompt sources and events ---------------------------------------------------------------
    def read_config_map_key(self, ns: str, name: str, key: str) -> str | None:
        try:
            cm = _json(self.core.read_namespaced_config_map(name, ns, _preload_content=False))
        except ApiException as e:
            if _status(e) == 404:
                return None
            raise
        value = (cm.get("data") or {}).get(key)
        return None if value is None else str(value)

    def post_event(self, job: JSON, type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on the ImageBatchJob; losing one is not worth failing a reconcile."""
        meta = job["metadata"]
        now = format_micro(now_utc())
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": job.get("apiVersion"),
                "kind": job.get("kind"),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "firstTimestamp": now[:19] + "Z",
            "lastTimestamp": now[:19] + "Z",
            "count": 1,
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": os.environ.get("POD_NAME", COMPONENT),
        }
        try:
            self.core.create_namespaced_event(meta["namespace"], body)
        except ApiException as e:
            log.warning(
                "cannot post event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], e.reason
            )
