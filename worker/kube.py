"""The worker's only door to the Kubernetes API: its job, its shards, a prompt ConfigMap.

Everything goes through the pod's ServiceAccount (least privilege: see operator/builders.py).
Status writes carry the resourceVersion they were read at, so two writers never both win.
"""

from __future__ import annotations

import json
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from imagebatch.api import GROUP, VERSION
from imagebatch.errors import ImageBatchError, PromptFileError
from imagebatch.kubeclient import api_client, replace_status_if_unchanged
from imagebatch.names import JOB_PLURAL, SHARD_PLURAL
from imagebatch.shardplan import of_incarnation, shard_selector

JSON = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"


def _client() -> kubernetes.client.ApiClient:
    return api_client()


class WorkerKube:
    def __init__(self, namespace: str, job: str, api: kubernetes.client.ApiClient | None = None) -> None:
        self.ns = namespace
        self.job = job
        self.api = api or _client()
        self.custom = kubernetes.client.CustomObjectsApi(self.api)
        self.core = kubernetes.client.CoreV1Api(self.api)

    def get_job(self) -> JSON:
        resp = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.ns, JOB_PLURAL, self.job, _preload_content=False
        )
        data: JSON = json.loads(resp.data)
        return data

    def read_config_map(self, name: str, key: str) -> str:
        try:
            resp = self.core.read_namespaced_config_map(name, self.ns, _preload_content=False)
        except ApiException as e:
            raise PromptFileError(
                f"spec.promptsFrom.configMapKeyRef: cannot read ConfigMap {name}: {e.status} {e.reason}"
            ) from None
        value = (json.loads(resp.data).get("data") or {}).get(key)
        if value is None:
            raise PromptFileError(f"spec.promptsFrom.configMapKeyRef: ConfigMap {name} has no key {key!r}")
        return str(value)

    def list_shards(self, uid: str) -> list[JSON]:
        """The shards of the job with this UID (the worker's own job object's): never those of an
        earlier job of the same name that are still being deleted."""
        resp = self.custom.list_namespaced_custom_object(
            GROUP,
            VERSION,
            self.ns,
            SHARD_PLURAL,
            label_selector=shard_selector(self.job, uid),
            _preload_content=False,
        )
        items: list[JSON] = json.loads(resp.data).get("items", [])
        return [s for s in items if of_incarnation(s, uid)]

    def get_shard(self, name: str) -> JSON | None:
        try:
            resp = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.ns, SHARD_PLURAL, name, _preload_content=False
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        data: JSON = json.loads(resp.data)
        return data

    def create_shard(self, obj: JSON) -> bool:
        """False when this job's shard exists already (another worker planned it first). A shard
        of that name that is not this job's is never taken for it: that is an error."""
        try:
            self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, SHARD_PLURAL, obj)
            return True
        except ApiException as e:
            if e.status != 409:
                raise
        name = obj["metadata"]["name"]
        existing = self.get_shard(name)
        if existing is None:
            return self.create_shard(obj)  # deleted in between: ours to make after all
        uid = obj["metadata"]["ownerReferences"][0]["uid"]
        if not of_incarnation(existing, uid):
            raise ImageBatchError(
                f"ImageBatchShard {self.ns}/{name} exists and is not a shard of ImageBatchJob {self.job} "
                f"(uid {uid}); the worker does not adopt it: delete that ImageBatchShard"
            )
        return False

    def replace_shard_status(self, shard: JSON, status: JSON) -> bool:
        """Writes a shard's status if it has not changed since it was read; False on a conflict."""
        return replace_status_if_unchanged(self.custom, SHARD_PLURAL, shard, status)

    def annotate_shard(self, name: str, annotations: dict[str, str]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            self.ns,
            SHARD_PLURAL,
            name,
            {"metadata": {"annotations": annotations}},
            _content_type=MERGE_PATCH,
        )
