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
