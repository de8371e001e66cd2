"""A fault-injecting HTTP proxy in front of the test API server.

Clients speak plain HTTP to it on 127.0.0.1; it forwards every request over TLS to the real API
server as the identity of the KubeClient it is given (its client certificate or token) and
streams the answer back (watches too). A Fault answers instead of the API server: the first
`times` requests that match its method and path get its status, with a Retry-After header and a
Status body, as an API server under load answers (429 from API priority and fairness, 503).

    with FaultProxy(client, [Fault("GET", "/api/v1/namespaces/ns/configmaps/p", times=2)]) as proxy:
        ...  # a kubernetes ApiClient with host=proxy.url
    proxy.seen("GET", path)  # requests that reached the proxy, answered by a fault or not
"""

from __future__ import annotations

import http.client
import json
import threading
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from imagebatch_testing.kubeapi import KubeClient

# Not forwarded: they describe one hop (RFC 9110 7.6.1), and the proxy frames bodies itself.
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host"}
REASONS = {429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout"}


@dataclass
class Fault:
    method: str
    path: str  # the request's path, without its query
    status: int = 429
    times: int = 1
    retry_after: int | None = 1
    served: int = 0

    def body(self) -> bytes:
        return json.dumps(
            {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": f"injected by the test's fault proxy ({self.served} of {self.times})",
                "reason": REASONS.get(self.status, "InternalError"),
                "code": self.status,
            }
        ).encode()


class FaultProxy:
    def __init__(self, upstream: KubeClient, faults: list[Fault] | None = None) -> None:
        self.upstream = upstream
        self.faults = list(faults or [])
        self._seen: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: the client's connection pool is used

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _any(self) -> None:
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_PATCH = do_DELETE = _any  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def seen(self, method: str, path: str) -> int:
        with self._lock:
            return self._seen[(method, path)]

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- one request ------------------------------------------------------------------------------
    def _fault_for(self, method: str, path: str) -> Fault | None:
        with self._lock:
            self._seen[(method, path)] += 1
            for f in self.faults:
                if f.method == method and f.path == path and f.served < f.times:
                    f.served += 1
                    return f
        return None

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        path = urllib.parse.urlsplit(h.path).path
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        fault = self._fault_for(h.command, path)
        if fault is not None:
            data = fault.body()
            h.send_response(fault.status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            if fault.retry_after is not None:
                h.send_header("Retry-After", str(fault.retry_after))
            h.end_headers()
            h.wfile.write(data)
            return
        headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP_HEADERS | {"accept-encoding"}}
        if self.upstream.token:
            headers["Authorization"] = f"Bearer {self.upstream.token}"
        conn = http.client.HTTPSConnection(
            self.upstream.host, self.upstream.port, context=self.upstream.ssl_context, timeout=600
        )
        try:
            conn.request(h.command, self.upstream.base_path + h.path, body=body, headers=headers)
            resp = conn.getresponse()
            h.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in HOP_HEADERS | {"content-length"}:
                    h.send_header(k, v)
            if resp.getheader("Content-Length") is not None:
                data = resp.read()
                h.send_header("Content-Length", str(len(data)))
                h.end_headers()
                h.wfile.write(data)
                return
            # A stream (a watch): passed on chunk by chunk as it comes.
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            while chunk := resp.read1(65536):
                h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                h.wfile.flush()
            h.wfile.write(b"0\r\n\r\n")
        except (OSError, http.client.HTTPException):
            h.close_connection = True  # the client sees a dropped connection, as from a real proxy
        finally:
            conn.close()
