"""The worker's only door to the Kubernetes API: its job, its shards, a prompt ConfigMap.

Everything goes through the pod's ServiceAccount (least privilege: see operator/builders.py);
shards through the shared shard client (imagebatch.shardclient), each of its calls retried here.
Status writes carry the resourceVersion they were read at, so two writers never both win.

Every call retries what an API server under load or restarting answers (429 and 5xx, honouring
Retry-After; timeouts and dropped connections) with jittered exponential backoff (tenacity), for
up to API_RETRY_SECONDS: an outage of the control plane must neither crash a worker (its shard
would be redone) nor fail a job. Other answers (403, 404 of a ConfigMap, 422) are the user's to
fix and are raised at once.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

import kubernetes
import urllib3
from kubernetes.client.exceptions import ApiException
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    stop_when_event_set,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from imagebatch.api import GROUP, VERSION
from imagebatch.errors import PromptFileError
from imagebatch.kubeclient import api_client
from imagebatch.names import JOB_PLURAL, SHARD_PLURAL
from imagebatch.shardclient import ShardClient, client_of
from imagebatch.shardplan import shard_selector

log = logging.getLogger(__name__)

JSON = dict[str, Any]
T = TypeVar("T")
MERGE_PATCH = "application/merge-patch+json"

# Answers worth another try: a request timeout, a rate limit (the API server's max-in-flight or
# API priority and fairness), server errors and an unreachable or restarting server.
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# How long one call keeps trying. Longer than any restart of a control plane; a worker whose API
# stays away longer exits with the error (the Job retries the pod).
API_RETRY_SECONDS = 900.0
WAIT_FIRST = 0.5
WAIT_MAX = 30.0
RETRY_AFTER_MAX = 60.0


def is_transient(err: BaseException) -> bool:
    """An error of the API's availability, not of the request: another try may work."""
    if isinstance(err, ApiException):
        if err.status == 0:
            # The client's own failure before any answer (kubernetes wraps urllib3's SSLError, a
            # handshake that timed out against a stopped server, as status 0). A certificate the
            # client refuses does not heal by itself.
            return "CERTIFICATE_VERIFY_FAILED" not in str(err.reason)
        return err.status in TRANSIENT_STATUS
    return isinstance(err, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError))


def retry_after(err: BaseException | None) -> float | None:
    """The server's Retry-After of a 429/503, in seconds (a number or an HTTP date), if any."""
    headers = getattr(err, "headers", None)
    value = headers.get("Retry-After") if headers else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class WaitRetryAfter:
    """tenacity's wait: the server's Retry-After when it sent one (capped), else jittered
    exponential backoff."""

    def __init__(self, first: float = WAIT_FIRST, most: float = WAIT_MAX) -> None:
        self.backoff = wait_random_exponential(multiplier=first, max=most)

    def __call__(self, state: RetryCallState) -> float:
        err = state.outcome.exception() if state.outcome is not None else None
        told = retry_after(err)
        if told is not None:
            # A little jitter, so the workers told the same second do not come back as one.
            return min(told, RETRY_AFTER_MAX) + random.uniform(0, 0.25)
        return float(self.backoff(state))


def _log_retry(state: RetryCallState) -> None:
    err = state.outcome.exception() if state.outcome is not None else None
    wait = state.next_action.sleep if state.next_action is not None else 0.0
    fn = getattr(state.fn, "__name__", "API call")
    log.warning("%s: %s; trying again in %.1fs (attempt %d)", fn, _describe(err), wait, state.attempt_number)


def _describe(err: BaseException | None) -> str:
    if isinstance(err, ApiException):
        return f"{err.status} {err.reason}"
    return f"{type(err).__name__}: {err}"


def retrying(seconds: float = API_RETRY_SECONDS, until: threading.Event | None = None) -> Retrying:
    """Retries transient errors for up to `seconds`, or until `until` is set (its owner closed)."""
    stop: stop_base = stop_after_delay(seconds)
    sleep: Callable[[float], Any] = time.sleep
    if until is not None:
        stop = stop | stop_when_event_set(until)
        sleep = until.wait
    return Retrying(
        retry=retry_if_exception(is_transient),
        wait=WaitRetryAfter(),
        stop=stop,
        before_sleep=_log_retry,
        sleep=sleep,
        reraise=True,
    )


def _client() -> kubernetes.client.ApiClient:
    # No retries inside urllib3: they are invisible here, and a write retried there after a lost
    # answer would look like a lost race (see replace_shard_status).
    return api_client(retries=False)


class WorkerKube:
    # Class defaults: tests build one with __new__ and set only what they use.
    retry_seconds = API_RETRY_SECONDS
    _bytes_read = 0  # of its own calls; its shard client counts its own

    def __init__(self, namespace: str, job: str, api: kubernetes.client.ApiClient | None = None) -> None:
        self.ns = namespace
        self.job = job
        self.api = api or _client()
        self.custom = kubernetes.client.CustomObjectsApi(self.api)
        self.core = kubernetes.client.CoreV1Api(self.api)

    def _call(self, fn: Callable[[], T], until: threading.Event | None = None) -> T:
        # Each call is a named inner function: its __name__ names it in the retry warnings.
        return retrying(self.retry_seconds, until)(fn)

    def _json(self, fn: Callable[[], Any], until: threading.Event | None = None) -> Any:
        resp = self._call(fn, until)
        self._bytes_read += len(resp.data)
        return json.loads(resp.data)

    @property
    def bytes_read(self) -> int:
        """Bytes of API responses read (bodies, watch streams included): the claim benchmark's."""
        return self._bytes_read + self.shard_client.bytes_read

    def get_job(self) -> JSON:
        def get_job() -> Any:
            return self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.ns, JOB_PLURAL, self.job, _preload_content=False
            )

        data: JSON = self._json(get_job)
        return data

    def read_config_map(self, name: str, key: str) -> str:
        def read_config_map() -> Any:
            return self.core.read_namespaced_config_map(name, self.ns, _preload_content=False)

        try:
            data = self._json(read_config_map)
        except ApiException as e:
            if is_transient(e):
                raise  # it outlasted the retries: the API, not the user's ConfigMap
            raise PromptFileError(
                f"spec.promptsFrom.configMapKeyRef: cannot read ConfigMap {name}: {e.status} {e.reason}"
            ) from None
        value = (data.get("data") or {}).get(key)
        if value is None:
            raise PromptFileError(f"spec.promptsFrom.configMapKeyRef: ConfigMap {name} has no key {key!r}")
        return str(value)

    # -- ImageBatchShards: the shared shard client (imagebatch.shardclient), every call retried --
    @property
    def shard_client(self) -> ShardClient:
        return client_of(self, self._call)

    def list_shards_at(self, uid: str, until: threading.Event | None = None) -> tuple[list[JSON], str]:
        """The shards of the job with this UID (the worker's own job object's), never those of an
        earlier job of the same name that are still being deleted; and the list's
        resourceVersion, where a watch of them starts. Retries end early once `until` is set."""
        shards, _, version = self.shard_client.list_of_job(self.ns, self.job, uid, until)
        return shards, version

    def list_shards(self, uid: str) -> list[JSON]:
        return self.list_shards_at(uid)[0]

    def watch_shards(
        self, uid: str, resource_version: str, until: threading.Event | None = None
    ) -> Iterator[JSON]:
        """The watch events of the job's shards after `resource_version` (ShardClient.watch)."""
        return self.shard_client.watch(self.ns, resource_version, shard_selector(self.job, uid), until)

    def get_shard(self, name: str) -> JSON | None:
        return self.shard_client.get(self.ns, name)

    def create_shard(self, obj: JSON) -> bool:
        """False when this job's shard exists already (another worker planned it first); a shard
        of that name that is not this job's is never taken for it: NotOwnedError."""
        return self.shard_client.create(obj)

    def replace_shard_status(self, shard: JSON, status: JSON) -> JSON | None:
        """The fenced status write (ShardClient.replace_status): the shard as written, or None."""
        meta = shard["metadata"]
        if "namespace" not in meta:
            shard = {**shard, "metadata": {**meta, "namespace": self.ns}}
        return self.shard_client.replace_status(shard, status)

    def annotate_shard(self, name: str, annotations: dict[str, str]) -> None:
        def annotate_shard() -> Any:
            return self.custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                self.ns,
                SHARD_PLURAL,
                name,
                {"metadata": {"annotations": annotations}},
                _content_type=MERGE_PATCH,
                _preload_content=False,
            )

        self._json(annotate_shard)
