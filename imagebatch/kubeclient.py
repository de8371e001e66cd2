"""The Kubernetes API client both sides build theirs from: credentials and a request timeout.

The `kubernetes` client waits forever by default; one call hung on a half-open connection
would stall the operator's resync loop (and every job with it) or a worker's lease renewal.
"""

from __future__ import annotations

import os
from typing import Any

import kubernetes

REQUEST_TIMEOUT = (5.0, 30.0)  # seconds to connect, seconds to read
# A watch is a long read: the server ends it after WATCH_SECONDS and sends bookmarks meanwhile, so
# REQUEST_TIMEOUT would cut every quiet watch; a read silent for WATCH_READ_TIMEOUT's second
# figure means a dead connection (or a stopped server).
WATCH_SECONDS = 240
WATCH_READ_TIMEOUT = (5.0, 90.0)


class TimeoutApiClient(kubernetes.client.ApiClient):  # type: ignore[misc]
    def request(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("_request_timeout") is None:
            kwargs["_request_timeout"] = REQUEST_TIMEOUT
        return super().request(*args, **kwargs)


def api_client(retries: bool | None = None) -> kubernetes.client.ApiClient:
    """In-cluster credentials when there are any, the kubeconfig ($KUBECONFIG) otherwise.

    `retries=False` turns off urllib3's own retries, for a caller that retries itself."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    if retries is None:
        return TimeoutApiClient()
    conf = kubernetes.client.Configuration.get_default_copy()
    conf.retries = retries
    return TimeoutApiClient(conf)


def replace_status_if_unchanged(
    custom: Any, plural: str, obj: dict[str, Any], status: dict[str, Any]
) -> bool:
    """Write a custom object's status only if the object is unchanged since it was read.

    The write carries the resourceVersion that was read, so the API server refuses it (409) when
    someone else wrote in between: the optimistic concurrency that shard claims and their fenced
    completion stand on. False on a conflict or when the object is gone.
    """
    from kubernetes.client.exceptions import ApiException

    from imagebatch.api import GROUP, VERSION

    meta = obj["metadata"]
    body = {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "resourceVersion": meta["resourceVersion"],
        },
        "spec": obj["spec"],
        "status": status,
    }
    try:
        custom.replace_namespaced_custom_object_status(
            GROUP, VERSION, meta["namespace"], plural, meta["name"], body
        )
        return True
    except ApiException as e:
        if e.status in (404, 409):
            return False
        raise
