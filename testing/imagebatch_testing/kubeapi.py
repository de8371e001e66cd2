"""A small, dependency-free Kubernetes REST client for the test cluster and its node agent.

Only what the harness, the node agent and the control-plane tests need: JSON requests, errors
with the API's status, and watches. Objects are plain dicts, exactly as the API serves them.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import ssl
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

JSON = dict[str, Any]

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


_pem_dir: str | None = None


def _materialize(data: bytes) -> str:
    """Writes inline kubeconfig data to a private file (ssl needs files), once per content."""
    global _pem_dir  # noqa: PLW0603
    if _pem_dir is None:
        _pem_dir = tempfile.mkdtemp(prefix="kubeapi-")
    path = Path(_pem_dir) / (hashlib.sha256(data).hexdigest()[:32] + ".pem")
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        tmp.chmod(0o600)
        tmp.replace(path)
    return str(path)


class ApiError(Exception):
    """A response from the API server with a status outside 2xx."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.body = body
        try:
            decoded = json.loads(body)
        except ValueError:
            decoded = None
        self.reason: str = decoded.get("reason", "") if isinstance(decoded, dict) else ""
        self.message: str = decoded.get("message", body) if isinstance(decoded, dict) else body
        super().__init__(f"{method} {path}: {status} {self.reason}: {self.message}")


class KubeClient:
    """Talks to one API server with a client certificate or a bearer token."""

    def __init__(
        self,
        server: str,
        *,
        ca_file: str | None = None,
        ca_data: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        token: str | None = None,
        token_file: str | None = None,
        insecure: bool = False,
        timeout: float = 30.0,
    ) -> None:
        url = urllib.parse.urlsplit(server)
        if url.scheme != "https" or not url.hostname:
            raise ValueError(f"need an https server URL, got {server!r}")
        self.server = server.rstrip("/")
        self.host = url.hostname
        self.port = url.port or 443
        self.base_path = url.path.rstrip("/")
        self.token = token
        self.token_file = token_file
        self.timeout = timeout
        self.ca_file = ca_file
        self._ca_data = ca_data
        self._insecure = insecure
        if insecure:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx = ssl.create_default_context(cafile=ca_file, cadata=ca_data)
        if cert_file and key_file:
            ctx.load_cert_chain(cert_file, key_file)
        self.ssl_context = ctx

    @classmethod
    def from_kubeconfig(cls, path: str | os.PathLike[str], context: str | None = None) -> KubeClient:
        """Reads a kubeconfig (the current context unless named); inline data is supported."""
        config_path = Path(path)
        config = yaml.safe_load(config_path.read_text())
        name = context or config.get("current-context")

        def pick(kind: str, wanted: str | None) -> JSON:
            for item in config.get(kind + "s") or []:
                if wanted is None or item.get("name") == wanted:
                    return dict(item.get(kind) or {})
            raise ValueError(f"{path}: no {kind} named {wanted!r}")

        ctx = pick("context", name)
        cluster = pick("cluster", ctx.get("cluster"))
        user = pick("user", ctx.get("user"))
        base = config_path.parent

        def file_of(entry: JSON, key: str) -> str | None:
            if entry.get(key + "-data"):
                return _materialize(base64.b64decode(entry[key + "-data"]))
            if entry.get(key):
                return str(base / entry[key])
            return None

        return cls(
            cluster["server"],
            ca_file=file_of(cluster, "certificate-authority"),
            cert_file=file_of(user, "client-certificate"),
            key_file=file_of(user, "client-key"),
            token=user.get("token"),
            token_file=user.get("tokenFile"),
            insecure=bool(cluster.get("insecure-skip-tls-verify")),
        )

    def with_token(self, token: str) -> KubeClient:
        """A client for the same server and CA that authenticates with a bearer token only."""
        return KubeClient(
            self.server,
            ca_file=self.ca_file,
            ca_data=self._ca_data,
            insecure=self._insecure,
            token=token,
            timeout=self.timeout,
        )

    # -- plumbing ---------------------------------------------------------------------------

    def _connection(self, timeout: float | None) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            self.host, self.port, context=self.ssl_context, timeout=timeout or self.timeout
        )

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "imagebatch-testing"}
        token = self.token
        if self.token_file:
            token = Path(self.token_file).read_text().strip()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def _url(self, path: str, query: Mapping[str, str | int | bool] | None) -> str:
        url = self.base_path + path
        if query:
            items = {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in query.items()}
            url += "?" + urllib.parse.urlencode(items)
        return url

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: Mapping[str, str | int | bool] | None = None,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> JSON:
        """Sends one request and returns the decoded JSON answer (empty dict when there is none)."""
        data = None if body is None else json.dumps(body).encode()
        conn = self._connection(timeout)
        try:
            conn.request(
                method,
                self._url(path, query),
                body=data,
                headers=self._headers(content_type if data is not None else None),
            )
            resp = conn.getresponse()
            raw = resp.read().decode("utf-8", "replace")
        finally:
            conn.close()
        if not 200 <= resp.status < 300:
            raise ApiError(method, path, resp.status, raw)
        if not raw:
            return {}
        decoded = json.loads(raw)
        return decoded if isinstance(decoded, dict) else {"value": decoded}

    def send_raw(
        self, method: str, path: str, data: bytes, query: Mapping[str, str | int | bool] | None = None
    ) -> tuple[int, str]:
        """Sends bytes as they are (JSON this client could not encode, e.g. nested deeper than
        Python's recursion limit) and returns the status and the answer as text."""
        conn = self._connection(None)
        try:
            conn.request(method, self._url(path, query), body=data, headers=self._headers("application/json"))
            resp = conn.getresponse()
            return resp.status, resp.read().decode("utf-8", "replace")
        finally:
            conn.close()

    def get_raw(self, path: str, *, timeout: float | None = None) -> tuple[int, str]:
        """A GET that returns the status and the body as text, for health endpoints."""
        conn = self._connection(timeout)
        try:
            conn.request("GET", self._url(path, None), headers=self._headers(None))
            resp = conn.getresponse()
            return resp.status, resp.read().decode("utf-8", "replace")
        finally:
            conn.close()

    # -- verbs ------------------------------------------------------------------------------

    def get(self, path: str, **query: str | int | bool) -> JSON:
        return self.request("GET", path, query=query)

    def create(self, path: str, body: JSON) -> JSON:
        return self.request("POST", path, body)

    def replace(self, path: str, body: JSON) -> JSON:
        return self.request("PUT", path, body)

    def patch(self, path: str, body: Any, content_type: str = MERGE_PATCH) -> JSON:
        return self.request("PATCH", path, body, content_type=content_type)

    def delete(self, path: str, body: JSON | None = None, **query: str | int | bool) -> JSON:
        return self.request("DELETE", path, body, query=query)

    def get_or_none(self, path: str) -> JSON | None:
        try:
            return self.get(path)
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    def watch(
        self,
        path: str,
        *,
        resource_version: str | None = None,
        timeout_seconds: int = 60,
        **query: str | int | bool,
    ) -> Iterator[JSON]:
        """Yields watch events ({"type": ..., "object": ...}) until the server ends the watch.

        A resource version that is too old ends with an ApiError of status 410; the caller
        lists again then.
        """
        params: dict[str, str | int | bool] = dict(query)
        params.update(watch=True, timeoutSeconds=timeout_seconds, allowWatchBookmarks=True)
        if resource_version:
            params["resourceVersion"] = resource_version
        conn = self._connection(timeout_seconds + 30)
        try:
            conn.request("GET", self._url(path, params), headers=self._headers(None))
            resp = conn.getresponse()
            if resp.status != 200:
                raise ApiError("WATCH", path, resp.status, resp.read().decode("utf-8", "replace"))
            while True:
                line = resp.readline()
                if not line:
                    return
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    raise ApiError("WATCH", path, int(status.get("code") or 500), json.dumps(status))
                yield event
        finally:
            conn.close()
