"""The kubelet API's container log endpoint, served by the node agent, so that `kubectl logs [-f]`
(the API server's `pods/log`, which proxies to the node) works on the local cluster.

As a real kubelet: HTTPS on the port the Node announces (`status.daemonEndpoints.kubeletEndpoint`)
with a serving certificate of the cluster CA for 127.0.0.1 (the API server checks it with
--kubelet-certificate-authority); a client certificate of the cluster CA is required (x509
authentication), and its user and groups must be allowed `get` on `nodes/proxy` of this node,
asked of the API server with a SubjectAccessReview (the kubelet's Webhook authorization; a
/containerLogs path is the `proxy` subresource there too). Only
`GET /containerLogs/{namespace}/{pod}/{container}` is served, with `follow`, `tailLines` and
`limitBytes`; the log is the container's file under the pod's folder (restarts appended).
"""

from __future__ import annotations

import os
import re
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BufferedIOBase
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from imagebatch_testing.kubeapi import ApiError, KubeClient

PATH = re.compile(r"^/containerLogs/([^/]+)/([^/]+)/([^/]+)$")
FOLLOW_POLL_SECONDS = 0.2
# (namespace, pod, container) -> the log file, or None; and whether the container may write more.
Finder = Callable[[str, str, str], Path | None]
Running = Callable[[str, str], bool]


def tail_offset(data: bytes, lines: int) -> int:
    """Where the last `lines` lines of `data` start. Pure."""
    if lines <= 0:
        return len(data)
    end = len(data) - 1 if data.endswith(b"\n") else len(data)
    pos = end
    for _ in range(lines):
        pos = data.rfind(b"\n", 0, pos)
        if pos < 0:
            return 0
    return pos + 1


def user_of(cert: dict[str, object]) -> tuple[str, list[str]]:
    """The x509 user (CN) and groups (O) of a peer certificate as ssl reports it. Pure."""
    user, groups = "", []
    for rdn in cert.get("subject", ()):  # type: ignore[attr-defined]
        for key, value in rdn:
            if key == "commonName":
                user = value
            elif key == "organizationName":
                groups.append(value)
    return user, groups


class LogServer:
    """The HTTPS server; `finder` and `running` come from the agent, which knows its pods."""

    def __init__(
        self,
        client: KubeClient,
        node_name: str,
        port: int,
        cert: Path,
        key: Path,
        client_ca: Path,
        finder: Finder,
        running: Running,
    ) -> None:
        self.client = client
        self.node_name = node_name
        self.finder = finder
        self.running = running
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        context.load_verify_locations(str(client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self.httpd.daemon_threads = True
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]

    def start(self) -> None:
        threading.Thread(target=self.httpd.serve_forever, name="kubelet-api", daemon=True).start()

    def allowed(self, user: str, groups: list[str]) -> bool:
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": user,
                "groups": groups,
                "resourceAttributes": {
                    "verb": "get",
                    "resource": "nodes",
                    "subresource": "proxy",
                    "name": self.node_name,
                },
            },
        }
        try:
            answer = self.client.create("/apis/authorization.k8s.io/v1/subjectaccessreviews", review)
        except (ApiError, OSError):
            return False
        return bool((answer.get("status") or {}).get("allowed"))


def _handler(server: LogServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            return  # the agent's log is for pods; a request log would drown it

        def fail(self, code: int, text: str) -> None:
            body = text.encode() + b"\n"
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            cert = self.connection.getpeercert()
            user, groups = user_of(cert or {})
            url = urlsplit(self.path)
            match = PATH.match(url.path)
            if not user:
                self.fail(401, "Unauthorized")
            elif not server.allowed(user, groups):
                self.fail(403, f"Forbidden (user={user}, verb=get, resource=nodes, subresource=proxy)")
            elif match is None:
                self.fail(404, f"the test node agent serves only /containerLogs, not {url.path}")
            else:
                self.logs(match.group(1), match.group(2), match.group(3), parse_qs(url.query))

        def logs(self, namespace: str, pod: str, container: str, query: dict[str, list[str]]) -> None:
            path = server.finder(namespace, pod, container)
            if path is None or not path.exists():
                self.fail(404, f'container "{container}" in pod "{pod}" has no log on this node')
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                stream(self.wfile, path, query, lambda: server.running(namespace, pod))
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
                return  # the client went away (kubectl logs -f ended with ^C)

    return Handler


def stream(out: BufferedIOBase, path: Path, query: dict[str, list[str]], running: Callable[[], bool]) -> None:
    """The log as HTTP chunks: from `tailLines` back (or all), at most `limitBytes`, and with
    `follow` what the container writes next until it has ended."""
    follow = query.get("follow", ["false"])[0] == "true"
    tail = int(query["tailLines"][0]) if "tailLines" in query else None
    limit = int(query["limitBytes"][0]) if "limitBytes" in query else None
    sent = 0

    def chunk(data: bytes) -> None:
        nonlocal sent
        if limit is not None:
            data = data[: max(0, limit - sent)]
        if data:
            out.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            out.flush()
            sent += len(data)

    with open(path, "rb") as f:
        data = f.read()
        chunk(data[tail_offset(data, tail) if tail is not None else 0 :])
        while follow and (limit is None or sent < limit):
            more = f.read()
            if more:
                chunk(more)
            elif not running():
                chunk(f.read())  # what came with the exit
                break
            else:
                time.sleep(FOLLOW_POLL_SECONDS)
    out.write(b"0\r\n\r\n")


def newest_pod_dir(pods_dir: Path, namespace: str, pod: str) -> Path | None:
    """The folder of the newest pod of that name (a name may be reused by a later pod)."""
    # Names and UIDs hold no "_", so the prefix is exact.
    found = list(pods_dir.glob(f"{namespace}_{pod}_*"))
    return max(found, key=lambda p: os.stat(p).st_mtime, default=None)
