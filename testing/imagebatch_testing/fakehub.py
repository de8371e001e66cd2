"""A fake Hugging Face hub: a local HTTP server that serves one folder as a model repo.

It answers the first `fail_first` requests with 429 (a rate limit), as the real hub does under
load, and records every request, so tests can check what was retried and what was not asked."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

SHA = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repo_id: str, folder: Path, fail_first: int = 0) -> None:
        self.repo_id = repo_id
        self.folder = folder
        self.fail_first = fail_first
        self.requests: list[tuple[str, str, int]] = []  # method, path, status
        self.lock = threading.Lock()
        self.files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, handler: BaseHTTPRequestHandler, body_wanted: bool) -> None:
        path = handler.path.split("?", 1)[0]
        with self.lock:  # only the model's own requests are rate limited
            failing = self.fail_first > 0 and self.repo_id in path
            if failing:
                self.fail_first -= 1
        status, headers, body = 404, {"X-Error-Code": "RepositoryNotFound"}, b'{"error":"not found"}'
        if failing:
            status, headers, body = 429, {"Retry-After": "0"}, b'{"error":"rate limited"}'
        elif path.startswith(f"/api/models/{self.repo_id}/tree/"):
            dirs = sorted({str(Path(f).parent) for f in self.files} - {"."})
            tree = [{"type": "directory", "path": d, "oid": SHA} for d in dirs] + [
                {
                    "type": "file",
                    "path": f,
                    "size": (self.folder / f).stat().st_size,
                    "oid": hashlib.sha1((self.folder / f).read_bytes()).hexdigest(),
                }
                for f in self.files
            ]
            status, headers, body = 200, {"Content-Type": "application/json"}, json.dumps(tree).encode()
        elif path.startswith(f"/api/models/{self.repo_id}"):
            info: dict[str, Any] = {
                "id": self.repo_id,
                "modelId": self.repo_id,
                "sha": SHA,
                "private": False,
                "tags": [],
                "siblings": [{"rfilename": f} for f in self.files],
            }
            status, headers, body = 200, {"Content-Type": "application/json"}, json.dumps(info).encode()
        elif path.startswith(f"/{self.repo_id}/resolve/"):
            rel = path.split("/resolve/", 1)[1].split("/", 1)[1]
            f = self.folder / rel
            if rel in self.files:
                data = f.read_bytes()
                status, body = 200, data
                headers = {
                    "X-Repo-Commit": SHA,
                    "ETag": '"' + hashlib.sha256(data).hexdigest() + '"',
                    "Content-Type": "application/octet-stream",
                }
            else:
                headers = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": SHA}
        with self.lock:
            self.requests.append((handler.command, path, status))
        handler.send_response(status)
        for k, v in headers.items():
            handler.send_header(k, v)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if body_wanted:
            handler.wfile.write(body)

    @contextmanager
    def running(self) -> Iterator[FakeHub]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub.answer(self, True)

            def do_HEAD(self) -> None:
                hub.answer(self, False)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()
